"""LM-head-fused CE + NTL against the materialised path, on a GPU: time and extra peak memory.

Materialised: ``logits = hidden @ weight.T`` then ``cross_entropy_with_ntl`` (the fused CE + NTL
kernel). Fused: ``linear_cross_entropy_with_ntl`` (logits never exist whole). Memory is counted
above the inputs and their gradients, which any method must hold (issue 6's rule).

    python benchmarks/bench_linear.py --M 16384 --H 4096 --V 128256 --dtype bf16 --out results.csv
"""

from __future__ import annotations

import argparse
import csv
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import ntl_fast  # noqa: E402
from benchmarks.bench import DTYPES, _time, make_inputs, make_table  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--M", type=int, default=16384)
    parser.add_argument("--H", type=int, default=4096)
    parser.add_argument("--V", type=int, default=128256)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--chunk-sizes", type=int, nargs="*", default=[], help="rows per chunk to try besides the default")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    device = "cuda"
    dtype = DTYPES[args.dtype]
    table = make_table(args.V).to(device)
    torch.manual_seed(0)
    hidden = (torch.randn(args.M, args.H, device=device) / 4).to(dtype).requires_grad_()
    weight = (torch.randn(args.V, args.H, device=device) / args.H**0.5).to(dtype).requires_grad_()
    _, labels = make_inputs(args.M, args.V, dtype, "cpu")
    labels = labels.to(device)

    def materialised():
        logits = hidden @ weight.t()
        return ntl_fast.cross_entropy_with_ntl(logits, labels, table, validate=False).loss

    variants = {"materialised": materialised}
    for chunk in [None] + args.chunk_sizes:
        name = "fused" if chunk is None else f"fused-chunk{chunk}"
        variants[name] = (lambda chunk=chunk: ntl_fast.linear_cross_entropy_with_ntl(
            hidden, weight, labels, table, validate=False, chunk_size=chunk).loss)

    def step(function):
        def run():
            hidden.grad = weight.grad = None
            function().backward()
        return run

    # the gradients of the inputs exist in every method: keep them allocated while measuring
    step(materialised)()
    reference_loss = materialised().item()
    rows = []
    for name, function in variants.items():
        run = step(function)
        median, p20, p80 = _time(run, device, args.repeats, warmup=2)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run()
        torch.cuda.synchronize()
        extra = (torch.cuda.max_memory_allocated() - base) / 2**20
        loss = function().item()
        rows.append(dict(variant=name, M=args.M, H=args.H, V=args.V, dtype=args.dtype, median_ms=median,
                         p20_ms=p20, p80_ms=p80, extra_peak_mib=extra, loss=loss,
                         device=torch.cuda.get_device_name(), torch=torch.__version__))
        print(f"{name:20s} {median:9.2f} ms [{p20:.2f}, {p80:.2f}]  extra peak {extra:9.1f} MiB  "
              f"loss {loss:.6f} (materialised {reference_loss:.6f})", flush=True)
    base = rows[0]
    for row in rows[1:]:
        print(f"{row['variant']}: {row['median_ms'] / base['median_ms']:.2f}x the time, "
              f"{row['extra_peak_mib'] / base['extra_peak_mib']:.3f}x the extra memory of the materialised path")
    if args.out:
        new = not os.path.exists(args.out)
        with open(args.out, "a", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            if new:
                writer.writeheader()
            writer.writerows(rows)


if __name__ == "__main__":
    main()
