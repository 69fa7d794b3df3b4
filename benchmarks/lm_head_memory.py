"""The LM-head loss with and without the logits: extra peak memory and time, side by side.

``chunked``: :func:`ntl_fast.linear_cross_entropy_with_ntl` (the logits exist one chunk of rows at
a time). ``materialised``: ``cross_entropy_with_ntl(hidden @ weight.T, ...)`` (all M x V logits and
their gradient). Both run forward + backward of CE + 0.3 NTL-WAS on the same inputs, in one
process, alternately.

Extra peak memory: the most memory alive at any moment of one forward + backward beyond the
inputs and the gradients of the inputs in their own dtypes. It comes from the allocator's own
accounting: ``torch.profiler`` with ``profile_memory=True`` records every allocation and free of
the device's allocator (the C++ operators' internal buffers included) with its address; replaying
them in order gives the live bytes at each moment, and the allocations that end as
``hidden.grad`` / ``weight.grad`` (matched by address) are subtracted while alive. The inputs
exist before the measurement starts, so they never count. Time: the median (and 20th/80th
percentiles) of ``--repeats`` runs of each path, the two paths alternating, after one warm-up
each, without the profiler.

    python benchmarks/lm_head_memory.py                      # CPU: M=2048, H=512, V=32128, fp32 and bf16
    python benchmarks/lm_head_memory.py --device cuda --M 16384 --H 4096 --V 128256 --dtypes bf16
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Callable, Dict, List, Optional

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import ntl_fast  # noqa: E402
from benchmarks.bench import NTL_WEIGHT, _commit, _device_name, make_labels, make_table  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PATHS = ("chunked", "materialised")
FIELDS = ["path", "dtype", "M", "H", "V", "backend", "chunk_size", "median_ms", "p20_ms", "p80_ms",
          "extra_peak_mib", "grad_mib", "x_extra_vs_materialised", "x_time_vs_materialised", "device", "torch",
          "commit", "date"]


def make_inputs(M: int, H: int, V: int, dtype: torch.dtype, device: str, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(M, H, generator=generator).to(device=device, dtype=dtype).requires_grad_()
    weight = (torch.randn(V, H, generator=generator) / H**0.5).to(device=device, dtype=dtype).requires_grad_()
    return hidden, weight, make_labels(M, V, device, generator), make_table(V).to(device)


def make_runner(path: str, hidden, weight, labels, table, backend: str,
                chunk_size: Optional[int] = None) -> Callable[[], None]:
    def run():
        hidden.grad = weight.grad = None
        if path == "chunked":
            out = ntl_fast.linear_cross_entropy_with_ntl(hidden, weight, labels, table, ntl_weight=NTL_WEIGHT,
                                                         validate=False, backend=backend, chunk_size=chunk_size)
        else:
            out = ntl_fast.cross_entropy_with_ntl(hidden @ weight.t(), labels, table, ntl_weight=NTL_WEIGHT,
                                                  validate=False, backend=backend)
        out.loss.backward()
    return run


def _synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def extra_peak_bytes(run: Callable[[], None], inputs, device: str) -> int:
    """Peak of (live allocator bytes - live bytes of the inputs' final gradients) during ``run``."""
    for tensor in inputs:
        tensor.grad = None
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    _synchronize(device)
    with profile(activities=activities, profile_memory=True) as prof:
        run()
        _synchronize(device)
    with tempfile.TemporaryDirectory() as folder:
        trace_path = os.path.join(folder, "trace.json")
        prof.export_chrome_trace(trace_path)
        with open(trace_path) as handle:
            trace = json.load(handle)
    device_type = 1 if device == "cuda" else 0
    events = sorted((event for event in trace["traceEvents"] if event.get("name") == "[memory]"
                     and event["args"].get("Device Type") == device_type), key=lambda event: event["ts"])
    # a gradient is the last allocation at its address (earlier ones there were freed temporaries)
    grad_addresses = {tensor.grad.untyped_storage().data_ptr() for tensor in inputs}
    last_allocation: Dict[int, int] = {}
    for index, event in enumerate(events):
        if event["args"]["Addr"] in grad_addresses and event["args"]["Bytes"] > 0:
            last_allocation[event["args"]["Addr"]] = index
    live = live_grads = peak = 0
    allocated = set()
    for index, event in enumerate(events):
        size, address = event["args"]["Bytes"], event["args"]["Addr"]
        if size > 0:
            allocated.add(address)
        elif address not in allocated:
            continue  # memory allocated before the measurement (a previous result) being freed
        else:
            allocated.discard(address)
        live += size
        if address in last_allocation and index >= last_allocation[address]:
            live_grads += size
        peak = max(peak, live - live_grads)
    return peak


def time_paths(runners: Dict[str, Callable[[], None]], repeats: int, device: str) -> Dict[str, List[float]]:
    times: Dict[str, List[float]] = {path: [] for path in runners}
    for run in runners.values():  # warm-up
        run()
    for _ in range(repeats):
        for path, run in runners.items():
            _synchronize(device)
            begin = time.perf_counter()
            run()
            _synchronize(device)
            times[path].append(1e3 * (time.perf_counter() - begin))
    return times


def _quantile(values: List[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def measure(M: int, H: int, V: int, dtype_name: str, device: str, backend: str, repeats: int) -> List[Dict]:
    hidden, weight, labels, table = make_inputs(M, H, V, DTYPES[dtype_name], device)
    runners = {path: make_runner(path, hidden, weight, labels, table, backend) for path in PATHS}
    grads = {}
    extra = {}
    for path, run in runners.items():
        extra[path] = extra_peak_bytes(run, (hidden, weight), device)
        grads[path] = (hidden.grad.clone(), weight.grad.clone())
    grad_mib = (hidden.grad.nbytes + weight.grad.nbytes) / 2**20
    for name, chunked, materialised in zip(("hidden", "weight"), grads["chunked"], grads["materialised"]):
        error = (chunked.double() - materialised.double()).abs().max().item()
        scale = materialised.double().abs().max().item()
        print(f"  {dtype_name}: grad {name} max |chunked - materialised| = {error:.2e} (max |grad| {scale:.2e})")
    del grads
    times = time_paths(runners, repeats, device)
    median = {path: statistics.median(values) for path, values in times.items()}
    chosen = ntl_fast.explain_backend(device, backend).name
    chunk = ntl_fast.linear.default_chunk_size(M, V, DTYPES[dtype_name], device)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    rows = []
    for path in PATHS:
        rows.append(dict(
            path=path, dtype=dtype_name, M=M, H=H, V=V, backend=chosen, chunk_size=chunk if path == "chunked" else "",
            median_ms=round(median[path], 1), p20_ms=round(_quantile(times[path], 0.2), 1),
            p80_ms=round(_quantile(times[path], 0.8), 1), extra_peak_mib=round(extra[path] / 2**20, 2),
            grad_mib=round(grad_mib, 2),
            x_extra_vs_materialised=round(extra[path] / extra["materialised"], 4),
            x_time_vs_materialised=round(median[path] / median["materialised"], 4),
            device=_device_name(device), torch=torch.__version__, commit=_commit(), date=stamp,
        ))
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--M", type=int, default=2048)
    parser.add_argument("--H", type=int, default=512)
    parser.add_argument("--V", type=int, default=32128)
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=None, help="CSV to write (default: print only)")
    args = parser.parse_args(argv)
    rows = []
    for dtype_name in args.dtypes.split(","):
        rows += measure(args.M, args.H, args.V, dtype_name, args.device, args.backend, args.repeats)
        for row in rows[-2:]:
            print(f"{row['path']:>12} {row['dtype']}: {row['median_ms']:9.1f} ms, extra {row['extra_peak_mib']:8.2f}"
                  f" MiB: {row['x_time_vs_materialised']:.3f}x time, {row['x_extra_vs_materialised']:.3f}x extra")
    if args.out:
        with open(args.out, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=FIELDS)
            writer.writeheader()
            writer.writerows(rows)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
