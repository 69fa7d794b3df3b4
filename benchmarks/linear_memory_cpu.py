"""Peak host memory of CE + NTL from the LM head: materialised logits vs the chunked path (CPU).

Each variant runs in a fresh subprocess and reports its peak resident set size
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``); the ``inputs`` variant only allocates the
inputs and their gradients, so ``peak - peak(inputs)`` is the extra memory of a variant.

    python benchmarks/linear_memory_cpu.py                      # fp32, H=1024, V=32128, M=4096
    python benchmarks/linear_memory_cpu.py --tokens 1024 --vocab 8192 --hidden 256
"""

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

VARIANTS = ("inputs", "materialised", "fused")


def run_variant(args) -> None:
    import torch

    import ntl_fast
    from ntl_fast.linear import linear_cross_entropy_with_ntl

    torch.manual_seed(0)
    table = ntl_fast.NumberTokenTable.from_values({100 + d: float(d) for d in range(10)}, vocab_size=args.vocab)
    hidden = torch.randn(args.tokens, args.hidden, requires_grad=True)
    weight = (torch.randn(args.vocab, args.hidden) / args.hidden**0.5).requires_grad_()
    labels = torch.randint(0, args.vocab, (args.tokens,))
    labels[::3] = 100 + torch.randint(0, 10, labels[::3].shape)
    backend = ntl_fast.explain_backend("cpu", args.backend).name
    start = time.perf_counter()
    if args.variant == "inputs":
        hidden.grad = torch.zeros_like(hidden)
        weight.grad = torch.zeros_like(weight)
        loss = torch.zeros(())
    elif args.variant == "materialised":
        logits = hidden @ weight.T
        loss = ntl_fast.cross_entropy_with_ntl(logits, labels, table, backend=backend).loss
        loss.backward()
    else:
        loss = linear_cross_entropy_with_ntl(hidden, weight, labels, table, backend=backend,
                                             chunk_size=args.chunk_size).loss
        loss.backward()
    seconds = time.perf_counter() - start
    peak_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    print(json.dumps({"variant": args.variant, "backend": backend, "peak_bytes": peak_bytes,
                      "seconds": seconds, "loss": float(loss)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=32128)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--chunk-size", type=int, default=None)
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        run_variant(args)
        return
    results = {}
    for variant in VARIANTS:
        command = [sys.executable, __file__, "--variant", variant, "--tokens", str(args.tokens),
                   "--hidden", str(args.hidden), "--vocab", str(args.vocab), "--backend", args.backend]
        if args.chunk_size:
            command += ["--chunk-size", str(args.chunk_size)]
        results[variant] = json.loads(subprocess.run(command, check=True, capture_output=True,
                                                     text=True).stdout.strip().splitlines()[-1])
    mib = 1 << 20
    base = results["inputs"]["peak_bytes"]
    logits_mib = args.tokens * args.vocab * 4 / mib
    print(f"M={args.tokens} H={args.hidden} V={args.vocab} fp32, backend={results['fused']['backend']}; "
          f"fp32 logits alone = {logits_mib:.0f} MiB")
    print(f"inputs + grads peak RSS: {base / mib:.0f} MiB")
    for variant in ("materialised", "fused"):
        extra = (results[variant]["peak_bytes"] - base) / mib
        print(f"{variant:>12}: extra peak {extra:8.0f} MiB   fwd+bwd {results[variant]['seconds']:.2f} s   "
              f"loss {results[variant]['loss']:.6f}")
    ratio = (results["fused"]["peak_bytes"] - base) / (results["materialised"]["peak_bytes"] - base)
    print(f"extra-memory ratio fused / materialised: {ratio:.3f}")


if __name__ == "__main__":
    main()
