"""Number-level NTL (docs/math.md §2.7): the vectorised ops vs the reference per-number Python loop.

    python benchmarks/number_level_cpu.py                     # B=64, T=256, V=1024, fp32, CPU
    python benchmarks/number_level_cpu.py --batch 8 --length 128 --vocab 32128
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

import torch  # noqa: E402

from ntl_fast import NumberTokenTable, reference  # noqa: E402
from ntl_fast.number_level import number_level_rows  # noqa: E402


def median_seconds(function, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--float-level", action="store_true")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    dot = 3
    table = NumberTokenTable.from_values({10 + d: float(d) for d in range(10)}, vocab_size=args.vocab, dot_id=dot)
    shape = (args.batch, args.length)
    draw = torch.rand(shape)
    labels = torch.where(draw < 0.5, 10 + torch.randint(0, 10, shape), torch.randint(20, args.vocab, shape))
    labels = torch.where((draw > 0.85) & (draw < 0.9), torch.full_like(labels, dot), labels)
    labels = torch.where(draw > 0.95, torch.full_like(labels, -100), labels)
    logits = torch.randn(*shape, args.vocab, requires_grad=True)
    options = dict(float_level=args.float_level, dot_id=dot)

    def forward_backward(function):
        def run():
            loss, first = function(logits, labels, table, **options)
            (loss.sum() / first.sum()).backward()
            logits.grad = None
        return run

    results = {}
    for name, function in (("reference loop", reference.number_level_rows), ("vectorised", number_level_rows)):
        forward = median_seconds(lambda: function(logits, labels, table, **options), args.repeats)
        both = median_seconds(forward_backward(function), args.repeats)
        results[name] = (forward, both)
    numbers = int(number_level_rows(logits, labels, table, **options)[1].sum())
    print(f"B={args.batch} T={args.length} V={args.vocab} fp32 float_level={args.float_level}: "
          f"{numbers} numbers, {torch.get_num_threads()} threads")
    for name, (forward, both) in results.items():
        print(f"{name:>15}: forward {forward * 1e3:9.2f} ms   forward+backward {both * 1e3:9.2f} ms")
    reference_times, fast_times = results["reference loop"], results["vectorised"]
    print(f"speed-up: forward {reference_times[0] / fast_times[0]:.1f}x, "
          f"forward+backward {reference_times[1] / fast_times[1]:.1f}x")


if __name__ == "__main__":
    main()
