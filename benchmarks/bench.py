"""Benchmark runner: ntl_fast's backends against what users would otherwise run.

Operations: ``ce_ntl`` (cross-entropy + 0.3 NTL-WAS), ``ntl`` (standalone NTL-WAS), ``ce``
(cross-entropy alone: the bar "NTL for free" is measured against), and from an LM head's input
(``hidden (M, H)``, ``weight (V, H)``): ``linear_ce_ntl`` (LM head fused, logits never whole)
against ``matmul_ce_ntl`` (``hidden @ weight.T`` materialised, then the fused CE + NTL). Providers: ntl_fast's
``triton`` / ``cpp`` / ``reference`` backends, the reference under ``torch.compile``, the authors'
``ntloss`` with ``torch.nn.functional.cross_entropy``, plain torch CE, Liger's CE alone and with ``ntloss``'s NTL
where installed.
Modes: ``fwd``, ``bwd`` (backward of a retained graph) and ``full`` (forward + backward).

Times: CUDA events (median, p20, p80 of repeated runs) on a GPU, the host clock on a CPU.
Peak memory: above the inputs (gradients of the inputs included; ``grad_mib`` gives their size,
so the extra memory, everything above the inputs and their gradients, is
``peak_mib - grad_mib``), from the CUDA allocator on a GPU; on a CPU from the growth of the
resident set of a fresh process per measurement (``--cpu-memory``). On a GPU each time is also
given as a multiple of the bandwidth floor of docs/math.md §5 (one read of the logits, plus one write
of the gradient when a backward runs, at the device-to-device copy rate measured in the same run).

    python benchmarks/bench.py --preset gpu-check --out benchmarks/results/gpu.csv
    python benchmarks/bench.py --preset cpu --cpu-memory --out benchmarks/results/cpu.csv
    python benchmarks/bench.py --preset full          # the full sweep (GPU)
    python benchmarks/bench.py --summarize results.csv  # the table of multiples of a run

``--dry-run`` runs a preset's argument parsing and set-up (providers, inputs, modes, floors, CSV)
once on tiny CPU tensors, a nominal bandwidth and no timing worth reading: what
``benchmarks/gpu_check.sh --dry-run`` checks on a machine without a GPU (set TRITON_INTERPRET=1
for the Triton provider). Exit status 1 when any measurement failed.
"""

from __future__ import annotations

import argparse
import csv
import ctypes
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import ntl_fast  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
NTL_WEIGHT = 0.3
FIRST_DIGIT_ID = 15  # where a T5-like vocabulary keeps its digits; any ids would do
LINEAR_OPS = ("linear_ce_ntl", "matmul_ce_ntl")
# --dry-run: rows, vocabulary cap (above the digits' ids), hidden size, a nominal copy rate (B/s)
DRY_RUN_M, DRY_RUN_V, DRY_RUN_H, DRY_RUN_BANDWIDTH = 16, 96, 32, 1e12
PRESETS = {
    # what benchmarks/gpu_check.sh runs (the cpp provider separately, once its CUDA build is done)
    "gpu-check": dict(ops=["ce_ntl", "ntl", "ce"], M=[16384], V=[32128, 128256], dtypes=["bf16"],
                      modes=["full", "fwd"],
                      providers=["triton", "reference", "ntloss", "torch-ce", "liger-ce", "liger-ce+ntloss"]),
    "gpu-linear": dict(ops=list(LINEAR_OPS), M=[16384], V=[128256], H=4096, dtypes=["bf16"], modes=["full"],
                       providers=["triton"]),
    "cpu": dict(ops=["ce_ntl", "ntl"], M=[1024, 4096], V=[32128], dtypes=["fp32", "bf16"], modes=["full"],
                providers=["cpp", "reference", "reference-compiled", "ntloss"]),
    "cpu-linear": dict(ops=list(LINEAR_OPS), M=[4096], V=[32128], H=1024, dtypes=["fp32"], modes=["full"],
                       providers=["cpp"]),
    "full": dict(ops=["ce_ntl", "ntl", "ce"] + list(LINEAR_OPS), M=[4096, 16384], V=[32128, 128256, 151936],
                 H=4096, dtypes=["bf16", "fp32"], modes=["full", "fwd", "bwd"],
                 providers=["triton", "cpp", "reference", "reference-compiled", "ntloss", "torch-ce", "liger-ce",
                            "liger-ce+ntloss"]),
    "quick": dict(ops=["ce_ntl", "ntl"] + list(LINEAR_OPS), M=[256], V=[1000], H=64, dtypes=["fp32"],
                  modes=["full"], providers=["cpp", "reference", "ntloss"]),
}


# ----------------------------------------------------------------------------- inputs
def make_table(vocab_size: int) -> ntl_fast.NumberTokenTable:
    return ntl_fast.NumberTokenTable.from_values(
        {FIRST_DIGIT_ID + d: float(d) for d in range(10)}, vocab_size=vocab_size
    )


def _filled(shape, scale: float, dtype: torch.dtype, device: str, generator) -> torch.Tensor:
    """Normal values filled in slices, so that making the inputs leaves no memory high-water mark
    above them (a CPU peak-memory probe measures growth from there)."""
    tensor = torch.empty(shape, dtype=dtype, device=device)
    for start in range(0, shape[0], 256):
        rows = tensor[start:start + 256]
        rows.copy_(scale * torch.randn(rows.shape, generator=generator))
    return tensor


def make_labels(M: int, V: int, device: str, generator) -> torch.Tensor:
    """15% digits, 5% ignored, the rest text tokens."""
    draw = torch.rand(M, generator=generator)
    text = torch.randint(FIRST_DIGIT_ID + 10, V, (M,), generator=generator)
    digits = torch.randint(FIRST_DIGIT_ID, FIRST_DIGIT_ID + 10, (M,), generator=generator)
    labels = torch.where(draw < 0.15, digits, text)
    return torch.where(draw > 0.95, torch.full_like(labels, -100), labels).to(device)


def make_inputs(M: int, V: int, dtype: torch.dtype, device: str, seed: int = 0):
    """Logits ~ N(0, 2²) and labels."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return _filled((M, V), 2.0, dtype, device, generator), make_labels(M, V, device, generator)


def make_case(op: str, M: int, V: int, H: int, dtype: torch.dtype, device: str):
    """``(differentiated inputs, labels)`` of an operation: the logits, or hidden and weight."""
    if op in LINEAR_OPS:
        generator = torch.Generator(device="cpu").manual_seed(0)
        hidden = _filled((M, H), 0.25, dtype, device, generator)
        weight = _filled((V, H), H**-0.5, dtype, device, generator)
        return (hidden.requires_grad_(), weight.requires_grad_()), make_labels(M, V, device, generator)
    logits, labels = make_inputs(M, V, dtype, device)
    return (logits.requires_grad_(),), labels


class _WordLevelStandIn:
    """The three tokenizer methods `ntloss` calls, for a vocabulary of digits and filler tokens."""

    def __init__(self, vocab_size: int):
        self.vocab = {f"<t{i}>": i for i in range(vocab_size)}
        for digit in range(10):
            del self.vocab[f"<t{FIRST_DIGIT_ID + digit}>"]
            self.vocab[str(digit)] = FIRST_DIGIT_ID + digit

    def __len__(self):
        return len(self.vocab)

    def get_vocab(self):
        return dict(self.vocab)

    def add_tokens(self, tokens):
        return 0


# ----------------------------------------------------------------------------- providers
def build_provider(name: str, op: str, V: int, device: str) -> Optional[Callable]:
    """A function (*inputs, labels) -> scalar loss, or None where the provider is unavailable."""
    table = make_table(V).to(device)
    if name in ("triton", "cpp", "reference"):
        try:
            ntl_fast.explain_backend(device, name)
        except RuntimeError as error:
            print(f"  skip {name}: {error}", file=sys.stderr)
            return None
        if op == "linear_ce_ntl":
            return lambda h, w, y: ntl_fast.linear_cross_entropy_with_ntl(
                h, w, y, table, ntl_weight=NTL_WEIGHT, validate=False, backend=name).loss
        if op == "matmul_ce_ntl":
            return lambda h, w, y: ntl_fast.cross_entropy_with_ntl(
                h @ w.t(), y, table, ntl_weight=NTL_WEIGHT, validate=False, backend=name).loss
        if op == "ce_ntl":
            return lambda z, y: ntl_fast.cross_entropy_with_ntl(
                z, y, table, ntl_weight=NTL_WEIGHT, validate=False, backend=name).loss
        if op == "ntl":
            return lambda z, y: ntl_fast.number_token_loss(z, y, table, validate=False, backend=name)
        return None
    if name == "reference-compiled":
        if op == "ce_ntl":
            function = lambda z, y: ntl_fast.cross_entropy_with_ntl(  # noqa: E731
                z, y, table, ntl_weight=NTL_WEIGHT, validate=False, backend="reference").loss
        elif op == "ntl":
            function = lambda z, y: ntl_fast.number_token_loss(z, y, table, validate=False, backend="reference")  # noqa: E731
        else:
            return None
        return torch.compile(function, dynamic=False)
    if op in LINEAR_OPS:
        return None
    if name == "ntloss":
        try:
            from ntloss import NTLoss
        except ImportError as error:
            print(f"  skip ntloss: {error}", file=sys.stderr)
            return None
        authors = NTLoss(_WordLevelStandIn(V), vocab_size=V, reweigh=False)
        if op == "ce_ntl":
            return lambda z, y: F.cross_entropy(z, y) + NTL_WEIGHT * authors(z[:, None], y[:, None])
        if op == "ntl":
            return lambda z, y: authors(z[:, None], y[:, None])
        return None
    if name == "torch-ce":
        return (lambda z, y: F.cross_entropy(z, y)) if op == "ce" else None
    if name in ("liger-ce", "liger-ce+ntloss"):
        wanted = "ce" if name == "liger-ce" else "ce_ntl"
        if op != wanted or device != "cuda":
            return None
        try:
            from liger_kernel.ops.cross_entropy import LigerCrossEntropyFunction
        except ImportError as error:
            print(f"  skip {name}: {error}", file=sys.stderr)
            return None
        if name == "liger-ce":
            return lambda z, y: LigerCrossEntropyFunction.apply(z, y)[0]
        authors = build_provider("ntloss", "ntl", V, device)  # Liger's CE plus the authors' eager NTL
        if authors is None:
            return None
        return lambda z, y: LigerCrossEntropyFunction.apply(z, y)[0] + NTL_WEIGHT * authors(z, y)
    raise ValueError(f"unknown provider {name!r}")


# ----------------------------------------------------------------------------- timing
def _quantiles(times: List[float]):
    times = sorted(times)
    pick = lambda q: times[min(len(times) - 1, int(q * len(times)))]  # noqa: E731
    return statistics.median(times), pick(0.2), pick(0.8)


def _time(run: Callable[[], None], device: str, repeats: int, warmup: int):
    for _ in range(warmup):
        run()
    times = []
    if device == "cuda":
        torch.cuda.synchronize()
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(repeats):
            begin = time.perf_counter()
            run()
            times.append(1e3 * (time.perf_counter() - begin))
    return _quantiles(times)


def mode_runner(function: Callable, inputs, labels: torch.Tensor, mode: str) -> Callable[[], None]:
    def clear():
        for tensor in inputs:
            tensor.grad = None

    if mode == "fwd":
        def run():
            function(*inputs, labels)
        return run
    if mode == "full":
        def run():
            clear()
            function(*inputs, labels).backward()
        return run
    loss = function(*inputs, labels)

    def run():
        clear()
        loss.backward(retain_graph=True)
    return run


def copy_bandwidth(device: str) -> float:
    """Device-to-device copy rate in bytes/s (bytes read + bytes written)."""
    source = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    median, _, _ = _time(lambda: target.copy_(source), device, repeats=20, warmup=3)
    return 2 * source.numel() / (median / 1e3)


def floor_ms(M: int, V: int, dtype: torch.dtype, mode: str, bandwidth: float) -> float:
    """docs/math.md §5: read the logits once; write the gradient once when a backward runs."""
    element = torch.finfo(dtype).bits // 8
    passes = 1 if mode == "fwd" else 2
    return 1e3 * passes * M * V * element / bandwidth


# ----------------------------------------------------------------------------- memory
def peak_memory_cuda(run: Callable[[], None]) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    run()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def _proc_status_mib(field: str) -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak_rss() -> None:
    """Return freed heap memory to the system, then reset the resident-set high-water mark to
    the current RSS (Linux >= 4.0). A child inherits its parent's mark through fork and exec,
    and a new tensor could otherwise land in freed but still resident heap pages unseen."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


def peak_memory_cpu(provider: str, op: str, M: int, V: int, H: int, dtype: str, mode: str) -> float:
    """Growth of the resident set's high-water mark in a fresh process running the op once."""
    command = [sys.executable, os.path.abspath(__file__), "--memory-probe",
               json.dumps(dict(provider=provider, op=op, M=M, V=V, H=H, dtype=dtype, mode=mode))]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        print(f"  memory probe failed (exit {result.returncode}): {result.stderr.strip()[-300:]}", file=sys.stderr)
        return float("nan")
    return float(result.stdout.strip().splitlines()[-1])


def memory_probe(spec: Dict) -> None:
    dtype = DTYPES[spec["dtype"]]
    inputs, labels = make_case(spec["op"], spec["M"], spec["V"], spec["H"], dtype, "cpu")
    function = build_provider(spec["provider"], spec["op"], spec["V"], "cpu")
    # load code paths, thread pools (and compile) on a small case first
    small_inputs, small_labels = make_case(spec["op"], 8, spec["V"], min(spec["H"], 64), dtype, "cpu")
    if spec["provider"] == "reference-compiled":
        small_inputs, small_labels = inputs, labels
    mode_runner(function, small_inputs, small_labels, "full")()
    for tensor in inputs:
        tensor.grad = None
    _reset_peak_rss()
    before = _proc_status_mib("VmRSS")
    mode_runner(function, inputs, labels, spec["mode"])()
    print(_proc_status_mib("VmHWM") - before)


# ----------------------------------------------------------------------------- main
@dataclass
class Row:
    op: str
    provider: str
    mode: str
    M: int
    V: int
    dtype: str
    median_ms: float
    p20_ms: float
    p80_ms: float
    peak_mib: float
    grad_mib: float
    H: Optional[int]
    floor_ms: Optional[float]
    x_floor: Optional[float]
    device: str
    torch: str
    triton: str
    commit: str
    date: str


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def _device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()} x{os.cpu_count()} cores"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None)
    parser.add_argument("--ops", nargs="+")
    parser.add_argument("--providers", nargs="+")
    parser.add_argument("--modes", nargs="+", choices=["fwd", "bwd", "full"])
    parser.add_argument("--M", nargs="+", type=int)
    parser.add_argument("--V", nargs="+", type=int)
    parser.add_argument("--H", type=int, default=None, help="hidden size of the LM-head operations")
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--cpu-memory", action="store_true", help="measure CPU peak memory (a process each)")
    parser.add_argument("--out", default=None, help="CSV file to append to")
    parser.add_argument("--dry-run", action="store_true",
                        help="the preset's set-up once on tiny CPU tensors (see the module's docstring)")
    parser.add_argument("--summarize", metavar="CSV", help="print the table of multiples of a results CSV")
    parser.add_argument("--memory-probe", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_probe:
        memory_probe(json.loads(args.memory_probe))
        return 0
    if args.summarize:
        print_summary(read_rows(args.summarize))
        return 0
    preset = PRESETS[args.preset or ("gpu-check" if args.device == "cuda" else "cpu")]
    ops = args.ops or preset["ops"]
    providers = args.providers or preset["providers"]
    modes = args.modes or preset["modes"]
    sizes_m, sizes_v = args.M or preset["M"], args.V or preset["V"]
    dtypes = args.dtypes or preset["dtypes"]
    hidden_size = args.H or preset.get("H", 1024)
    device = args.device
    repeats = args.repeats or (20 if device == "cuda" else 5)
    warmup = 2 if device == "cpu" else 5
    if args.dry_run:
        device, repeats, warmup, args.cpu_memory = "cpu", 1, 0, False
        sizes_m, sizes_v, hidden_size = [DRY_RUN_M], sorted({min(V, DRY_RUN_V) for V in sizes_v}), DRY_RUN_H
    bandwidth = copy_bandwidth(device) if device == "cuda" else (DRY_RUN_BANDWIDTH if args.dry_run else None)
    if bandwidth:
        print(f"device-to-device copy: {bandwidth / 1e12:.2f} TB/s" + (" (nominal: dry run)" if args.dry_run else ""))
    triton_version = "none"
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        pass
    rows: List[Row] = []
    failures = 0
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    for V in sizes_v:
        for M in sizes_m:
            for dtype_name in dtypes:
                dtype = DTYPES[dtype_name]
                cases = {}
                for op in ops:
                    kind = "linear" if op in LINEAR_OPS else "logits"
                    if kind not in cases:
                        cases.clear()  # one set of large inputs at a time
                        cases[kind] = make_case(op, M, V, hidden_size, dtype, device)
                    inputs, labels = cases[kind]
                    H = hidden_size if kind == "linear" else None
                    grad_mib = sum(t.numel() * t.element_size() for t in inputs) / 2**20
                    for provider in providers:
                        function = build_provider(provider, op, V, device)
                        if function is None:
                            if args.dry_run:
                                print(f"  {op}/{provider}: skipped (not provided, or not on CPU)")
                            continue
                        for mode in modes:
                            try:
                                run = mode_runner(function, inputs, labels, mode)
                                median, p20, p80 = _time(run, device, repeats, warmup=warmup)
                                if device == "cuda":
                                    peak = peak_memory_cuda(run)
                                elif args.cpu_memory:
                                    peak = peak_memory_cpu(provider, op, M, V, hidden_size, dtype_name, mode)
                                else:
                                    peak = float("nan")
                            except (RuntimeError, torch.cuda.OutOfMemoryError) as error:
                                print(f"  {op}/{provider}/{mode} M={M} V={V} {dtype_name} failed: {error}",
                                      file=sys.stderr)
                                failures += 1
                                if device == "cuda":
                                    torch.cuda.empty_cache()
                                continue
                            floor = floor_ms(M, V, dtype, mode, bandwidth) if bandwidth and kind == "logits" else None
                            row = Row(op, provider, mode, M, V, dtype_name, median, p20, p80, peak,
                                      grad_mib if mode != "fwd" else 0.0, H, floor,
                                      (median / floor) if floor else None, _device_name(device),
                                      torch.__version__, triton_version, _commit(), stamp)
                            rows.append(row)
                            extra = f"  {row.x_floor:5.2f}x floor" if floor else ""
                            print(f"{op:13s} {provider:19s} {mode:4s} M={M:6d} V={V:6d} {dtype_name}: "
                                  f"{median:9.3f} ms [{p20:.3f}, {p80:.3f}]  peak {peak:9.1f} MiB{extra}",
                                  flush=True)
                cases.clear()
                if device == "cuda":
                    torch.cuda.empty_cache()
    if args.out and rows:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        new = not os.path.exists(args.out)
        with open(args.out, "a", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(Row.__dataclass_fields__))
            if new:
                writer.writeheader()
            for row in rows:
                writer.writerow(row.__dict__)
        print(f"appended {len(rows)} rows to {args.out}")
    print_ratios(rows)
    if failures:
        print(f"{failures} measurements failed (messages above)", file=sys.stderr)
    return 1 if failures else 0


def print_ratios(rows: List[Row]) -> None:
    """Side-by-side speed-ups of ntl_fast against the baselines measured in this run."""
    index = {(r.op, r.provider, r.mode, r.M, r.V, r.dtype): r.median_ms for r in rows}
    lines = []
    for (op, provider, mode, M, V, dtype), median in index.items():
        if provider not in ("triton", "cpp"):
            continue
        for baseline in ("ntloss", "liger-ce+ntloss", "reference", "reference-compiled"):
            other = index.get((op, baseline, mode, M, V, dtype))
            if other:
                lines.append(f"{op} {mode} M={M} V={V} {dtype}: {provider} is {other / median:.2f}x "
                             f"faster than {baseline}")
        if op == "linear_ce_ntl":
            other = [r for r in rows if (r.op, r.provider, r.mode, r.M, r.V, r.dtype) == (
                "matmul_ce_ntl", provider, mode, M, V, dtype)]
            mine = [r for r in rows
                    if (r.op, r.provider, r.mode, r.M, r.V, r.dtype) == (op, provider, mode, M, V, dtype)]
            if other and mine:
                extra_mine = mine[0].peak_mib - mine[0].grad_mib
                extra_other = other[0].peak_mib - other[0].grad_mib
                lines.append(f"linear_ce_ntl {mode} M={M} V={V} {dtype} ({provider}): "
                             f"{median / other[0].median_ms:.2f}x "
                             f"the time and {extra_mine / extra_other:.3f}x the extra memory of matmul_ce_ntl")
        if op == "ce_ntl":
            for bar in ("liger-ce", "torch-ce"):
                other = index.get(("ce", bar, mode, M, V, dtype))
                if other:
                    lines.append(f"ce_ntl {mode} M={M} V={V} {dtype}: {provider} takes {median / other:.2f}x "
                                 f"the time of {bar} alone")
    if lines:
        print("\n".join(["", "ratios (same run):"] + lines))


def read_rows(path: str) -> List[Row]:
    """The rows of a results CSV, numbers parsed (empty fields become None)."""
    fields = Row.__dataclass_fields__
    rows = []
    with open(path, newline="") as handle:
        for raw in csv.DictReader(handle):
            values = {}
            for name, field in fields.items():
                text = raw.get(name, "")
                kind = str(field.type)
                if text in ("", "None"):
                    values[name] = None
                elif "int" in kind:
                    values[name] = int(text)
                elif "float" in kind:
                    values[name] = float(text)
                else:
                    values[name] = text
            rows.append(Row(**values))
    return rows


# the summary's baseline columns: for each operation, the (op, provider) it is divided by
# (provider None: the row's own provider)
BASELINE_COLUMNS = [
    ("x ntloss", {"ce_ntl": ("ce_ntl", "ntloss"), "ntl": ("ntl", "ntloss")}),
    ("x liger+ntloss", {"ce_ntl": ("ce_ntl", "liger-ce+ntloss")}),
    ("x torch-ce", {"ce_ntl": ("ce", "torch-ce")}),
    ("x liger-ce", {"ce_ntl": ("ce", "liger-ce")}),
    ("x materialised", {"linear_ce_ntl": ("matmul_ce_ntl", None)}),
]


def print_summary(rows: List[Row]) -> None:
    """Each measurement as a multiple of the bandwidth floor and of each baseline's time (< 1: faster)."""
    index = {(r.op, r.provider, r.mode, r.M, r.V, r.dtype): r.median_ms for r in rows}
    print(f"{'op':14s} {'provider':16s} {'mode':4s} {'M':>6s} {'V':>6s} {'dtype':5s} {'ms':>9s} {'x floor':>9s}"
          + "".join(f" {label:>14s}" for label, _ in BASELINE_COLUMNS))
    for r in rows:
        cells = []
        for _, by_op in BASELINE_COLUMNS:
            op, provider = by_op.get(r.op, (None, None))
            other = index.get((op, provider or r.provider, r.mode, r.M, r.V, r.dtype)) if op else None
            same = (op, provider) == (r.op, r.provider)
            cells.append(f" {r.median_ms / other:14.3g}" if other and not same else " " * 15)
        floor = f"{r.x_floor:9.3g}" if r.x_floor else " " * 9
        print(f"{r.op:14s} {r.provider:16s} {r.mode:4s} {r.M:6d} {r.V:6d} {r.dtype:5s} {r.median_ms:9.3f} {floor}"
              + "".join(cells))


if __name__ == "__main__":
    sys.exit(main())
