"""Benchmark runner: ntl_fast's backends against what users would otherwise run.

Operations: ``ce_ntl`` (cross-entropy + 0.3 NTL-WAS), ``ntl`` (standalone NTL-WAS), ``ce``
(cross-entropy alone: the bar "NTL for free" is measured against), and from an LM head's input
(``hidden (M, H)``, ``weight (V, H)``): ``linear_ce_ntl`` (LM head fused, logits never whole)
against ``matmul_ce_ntl`` (``hidden @ weight.T`` materialised, then the fused CE + NTL); the causal
shift of a causal LM on logits ``(B, T, V)`` (``B = SHIFT_BATCH``, ``M = B·T``): ``ce_ntl_shift``
(``shift_labels=True``) against ``ce_ntl_shifted`` (the labels shifted by hand, padded with the ignore
index: what ``shift_labels`` should cost), whose peak memory the ratios give as multiples of the logits.
``copy`` (provider ``torch``: the logits copied into a preallocated buffer, one read and one write
of them) is the bandwidth floor measured in the same run on any device; the ratios give each forward
+ backward as a multiple of it. Providers: ntl_fast's
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

Traffic: each measurement also gives the DRAM bytes its operation moves by design (``read_mb``,
``write_mb``) and their ratio to the floor's bytes (``traffic_x_floor``: one read of the logits, plus
one write of the gradient when a backward runs), so the distance to the floor is visible where only a
CPU ran. ``traffic_basis`` says how they were counted:

- ``design``: ntl_fast's kernels (Triton, C++ CPU and CUDA operators) and Liger's cross-entropy, by
  their design: a one-pass path (``fuses_loss_and_grad``) reads the logits once and writes the
  gradient in the forward, its backward moves nothing for ``grad_output = 1``; a two-pass path reads
  them in the forward, reads them again and writes the gradient in the backward; NTL alone reads only
  the K number-token columns of the number rows (one cache line each) and writes a dense gradient;
  Liger's CE reads each row twice (max and sum, then the gradient) and writes its gradient in place.
- ``aten ops``: eager code (the reference, ``ntloss``, torch CE, and the glue around any kernel:
  slicing copies, casts, zero-filled buffers): every aten operation run is counted as reading its
  tensor inputs and writing its outputs once (views move nothing; ``copy_``/``fill_`` do not read
  their destination; gathers read only what they return, scatters write only their source), from
  one run under a dispatch mode.

Cache assumption: nothing stays in cache between two operations or two passes (the M x V logits are
far larger than any last-level cache), and a row read twice within one kernel is counted twice: a
bfloat16 row at V = 128256 is 256 KB, larger than a block's shared memory, so a second read of it is
cheap only while it stays in L2, which the design cannot promise. Ignored rows are counted as read
(5% of the benchmark's labels). ``reference-compiled`` is not modelled (Inductor decides its fusion).

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
SHIFT_OPS = ("ce_ntl_shift", "ce_ntl_shifted")
SHIFT_BATCH = 4  # sequences in the causal-shift cases: logits (SHIFT_BATCH, M / SHIFT_BATCH, V)
# --dry-run: rows, vocabulary cap (above the digits' ids), hidden size, a nominal copy rate (B/s)
DRY_RUN_M, DRY_RUN_V, DRY_RUN_H, DRY_RUN_BANDWIDTH = 16, 96, 32, 1e12
PRESETS = {
    # what benchmarks/gpu_check.sh runs (the cpp provider separately, once its CUDA build is done)
    "gpu-check": dict(ops=["copy", "ce_ntl", "ntl", "ce"], M=[16384], V=[32128, 128256], dtypes=["bf16"],
                      modes=["full", "fwd"],
                      providers=["torch", "triton", "reference", "ntloss", "torch-ce", "liger-ce",
                                 "liger-ce+ntloss"]),
    "gpu-linear": dict(ops=list(LINEAR_OPS), M=[16384], V=[128256], H=4096, dtypes=["bf16"], modes=["full"],
                       providers=["triton"]),
    "cpu": dict(ops=["copy", "ce_ntl", "ntl"] + list(SHIFT_OPS), M=[1024, 4096], V=[32128], dtypes=["fp32", "bf16"],
                modes=["full"], providers=["torch", "cpp", "reference", "reference-compiled", "ntloss"]),
    # the causal shift alone (B = 4, T = 512, as a causal LM's batch): bench.py --preset cpu-shift --cpu-memory
    "cpu-shift": dict(ops=list(SHIFT_OPS), M=[2048], V=[32128], dtypes=["fp32"], modes=["full"],
                      providers=["cpp"]),
    "cpu-linear": dict(ops=list(LINEAR_OPS), M=[4096], V=[32128], H=1024, dtypes=["fp32"], modes=["full"],
                       providers=["cpp"]),
    "full": dict(ops=["copy", "ce_ntl", "ntl", "ce"] + list(LINEAR_OPS) + list(SHIFT_OPS), M=[4096, 16384],
                 V=[32128, 128256, 151936],
                 H=4096, dtypes=["bf16", "fp32"], modes=["full", "fwd", "bwd"],
                 providers=["torch", "triton", "cpp", "reference", "reference-compiled", "ntloss", "torch-ce",
                            "liger-ce", "liger-ce+ntloss"]),
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
    if op in SHIFT_OPS:
        if M % SHIFT_BATCH or M // SHIFT_BATCH < 2:
            raise ValueError(f"{op} needs M divisible by {SHIFT_BATCH} into sequences of >= 2 positions, got M={M}")
        logits, labels = logits.view(SHIFT_BATCH, M // SHIFT_BATCH, V), labels.view(SHIFT_BATCH, M // SHIFT_BATCH)
    return (logits.requires_grad_(),), labels


def _copy_logits() -> Callable:
    """The floor: the logits copied into a buffer allocated once (one read, one write of them)."""
    buffers = {}

    def copy(z, y):
        key = (z.shape, z.dtype, z.device)
        if key not in buffers:
            buffers.clear()
            buffers[key] = torch.empty_like(z, requires_grad=False)
        return buffers[key].copy_(z.detach())
    return copy


def shift_labels_by_hand(labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Labels (B, T) shifted left by one, the last position padded with ``ignore_index``."""
    return torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), ignore_index)], dim=1)


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
    if op == "copy":
        return _copy_logits() if name == "torch" else None
    if name == "torch":
        return None
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
        if op == "ce_ntl_shift":
            if name == "reference":
                return None
            return lambda z, y: ntl_fast.cross_entropy_with_ntl(
                z, y, table, ntl_weight=NTL_WEIGHT, validate=False, backend=name, shift_labels=True).loss
        if op == "ce_ntl_shifted":
            if name == "reference":
                return None
            return lambda z, y: ntl_fast.cross_entropy_with_ntl(
                z, shift_labels_by_hand(y), table, ntl_weight=NTL_WEIGHT, validate=False, backend=name).loss
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
        # the authors' NTL first: Liger's CE overwrites the logits with their gradient in place
        return lambda z, y: NTL_WEIGHT * authors(z, y) + LigerCrossEntropyFunction.apply(z, y)[0]
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
    if getattr(function, "__name__", "") == "copy":  # the floor: no backward
        return lambda: function(*inputs, labels)

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


# ----------------------------------------------------------------------------- traffic (bytes by design)
CACHE_LINE = 64  # bytes a scattered read of one number-token column moves per row


@dataclass
class Traffic:
    read: float  # bytes
    write: float
    basis: str


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)


def _nbytes(tensors) -> float:
    seen, total = set(), 0
    for t in tensors:
        key = (t.data_ptr(), t.numel(), tuple(t.stride()), t.dtype)
        if key not in seen and t.device.type != "meta":
            seen.add(key)
            total += t.numel() * t.element_size()
    return float(total)


# aten operations that do not read some of their tensor arguments (by position), or write sparsely
_SHAPE_ONLY = {"zeros_like", "ones_like", "empty_like", "full_like", "new_zeros", "new_ones", "new_empty",
               "new_full", "randn_like", "rand_like"}
_EMPTY = {"empty", "empty_like", "new_empty", "empty_strided", "new_empty_strided"}
_NOT_READ = {"copy_": (0,), "fill_": (0,), "zero_": (0,), "nll_loss_backward": (1,), "nll_loss2d_backward": (1,)}
# gathers: read from their source (argument 0) only what they return
_GATHER = {"nll_loss_forward", "nll_loss2d_forward", "gather", "index_select", "take_along_dim", "index"}
_SPARSE_WRITE = {"index_put_": 2, "_index_put_impl_": 2, "scatter_": 3, "scatter_add_": 3, "index_add_": 3,
                 "index_copy_": 3, "put_": 2}


def _kernel_design(name: str, args, kwargs) -> Optional[Traffic]:
    """Bytes of one call of a compiled ntl_fast operator (C++ CPU or CUDA), by its design."""
    logits = args[0] if name != "ce_ntl_backward" else args[2]
    if name == "ntl_backward":
        logits = args[1]
    if not isinstance(logits, torch.Tensor):
        return None
    L = float(logits.numel() * logits.element_size())
    if name in ("ce_ntl_loss_and_grad",):
        return Traffic(L, L, "design")
    if name == "ce_ntl_forward":
        return Traffic(L, 0.0, "design")
    if name in ("ce_ntl_backward", "ce_ntl_backward_"):
        return Traffic(L, L, "design")
    if name in ("ntl_forward", "ntl_backward"):
        labels = args[1] if name == "ntl_forward" else args[2]
        table_ids = args[2] if name == "ntl_forward" else args[4]
        rows = int(torch.isin(labels.reshape(-1), table_ids).sum()) if isinstance(table_ids, torch.Tensor) else 0
        columns = rows * table_ids.numel() * CACHE_LINE if isinstance(table_ids, torch.Tensor) else 0.0
        return Traffic(float(columns), L if name == "ntl_backward" else 0.0, "design")
    return None


class _ByteCounter(torch.utils._python_dispatch.TorchDispatchMode):
    """Sums the bytes each operation run under it reads and writes (see the module's docstring)."""

    def __init__(self):
        super().__init__()
        self.read = self.write = 0.0
        self.kernels = 0  # calls of ntl_fast's compiled operators

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        namespace, name = func.namespace, func._schema.name.split("::")[-1]
        if namespace == "ntl_fast":
            design = _kernel_design(name, args, kwargs)
            self.kernels += 1
            if design is not None:
                self.read += design.read
                self.write += design.write
                return out
        inputs = [t for t in _tensors(args)]
        outputs = [t for t in _tensors(out)]
        mutable = func._schema.is_mutable
        if not mutable and outputs and all(any(o.untyped_storage().data_ptr() == i.untyped_storage().data_ptr()
                                                for i in inputs) for o in outputs):
            return out  # a view, or an operation returning its input
        if name in _EMPTY:
            return out
        if name in _SHAPE_ONLY:
            self.write += _nbytes(outputs)
            return out
        if name in _SPARSE_WRITE and len(args) > _SPARSE_WRITE[name]:
            source = list(_tensors(args[_SPARSE_WRITE[name]]))
            self.read += _nbytes(t for i, a in enumerate(args) if i != 0 for t in _tensors(a))
            self.write += _nbytes(source)
            return out
        if name in _GATHER:
            self.read += _nbytes(t for a in args[1:] for t in _tensors(a)) + _nbytes(outputs)
            self.write += _nbytes(outputs)
            return out
        skip = _NOT_READ.get(name, ())
        read = [t for i, a in enumerate(args) if i not in skip for t in _tensors(a)]
        read += [t for key, a in kwargs.items() if key != "out" for t in _tensors(a)]
        self.read += _nbytes(read)
        self.write += _nbytes(outputs)
        return out


def _one_pass(provider: str, logits: torch.Tensor) -> bool:
    """Whether ntl_fast's ``provider`` backend writes the gradient in the forward for these logits
    (its ``fuses_loss_and_grad``, called with the logits or, on older versions, their device)."""
    import importlib

    try:
        fuses = importlib.import_module(f"ntl_fast.{provider}").fuses_loss_and_grad
    except (ImportError, AttributeError):
        return False
    try:
        return bool(fuses(logits.detach().reshape(-1, logits.shape[-1])))
    except (TypeError, AttributeError, RuntimeError):
        return bool(fuses(logits.device))


def _invisible_kernels(provider: str, op: str, mode: str, inputs, labels, V: int) -> Optional[Traffic]:
    """Design bytes of the kernels a dispatch mode cannot see (Triton's; Liger's CE)."""
    logits = inputs[0]
    L = float(logits.numel() * logits.element_size())
    passes = {"fwd": ("fwd",), "bwd": ("bwd",), "full": ("fwd", "bwd")}[mode]
    read = write = 0.0
    if provider == "triton" and op in ("ce_ntl", "ntl", "ce_ntl_shift", "ce_ntl_shifted_labels"):
        if op != "ntl" and _one_pass(provider, logits):
            table = (0.0, 0.0) if passes == ("bwd",) else (L, L)
            return Traffic(*table, "design")
        for part in passes:
            if op == "ntl":
                numbers = int(((labels >= FIRST_DIGIT_ID) & (labels < FIRST_DIGIT_ID + 10)).sum())
                read += numbers * 10 * CACHE_LINE
                write += L if part == "bwd" else 0.0
            else:
                read += L
                write += L if part == "bwd" else 0.0
        return Traffic(read, write, "design")
    if provider in ("liger-ce", "liger-ce+ntloss"):
        # forward: two reads of each row, the gradient written in place; backward: nothing for 1.0
        if "fwd" in passes:
            read, write = 2 * L, L
        return Traffic(read, write, "design")
    return None


def measure_traffic(provider: str, op: str, mode: str, function: Callable, inputs, labels, V: int
                    ) -> Optional[Traffic]:
    """Bytes one call moves (see the module's docstring), from one extra run under a byte counter."""
    if provider == "reference-compiled":
        return None
    for tensor in inputs:
        tensor.grad = None
    counter = _ByteCounter()
    if mode == "bwd":
        loss = function(*inputs, labels)
        with counter:
            loss.backward()
    else:
        with counter:
            loss = function(*inputs, labels)
            if mode == "full" and loss.requires_grad:
                loss.backward()
    for tensor in inputs:
        tensor.grad = None
    basis = "aten ops"
    read, write = counter.read, counter.write
    if counter.kernels:
        basis = "design + aten ops"
    else:
        hidden = _invisible_kernels(provider, op, mode, inputs, labels, V)
        if hidden is not None:
            read, write, basis = read + hidden.read, write + hidden.write, "design + aten ops"
        elif provider == "triton":
            return None  # Triton kernels the design table does not cover (the LM-head path)
    return Traffic(read, write, basis)


def floor_bytes(inputs, mode: str) -> float:
    """docs/math.md §5 in bytes: one read of the logits; plus one write of the gradient when a backward runs.
    For the LM-head operations: the logits they would have (M x V in the inputs' dtype)."""
    if len(inputs) == 2:
        hidden, weight = inputs
        L = hidden.shape[0] * weight.shape[0] * hidden.element_size()
    else:
        L = inputs[0].numel() * inputs[0].element_size()
    return float(L if mode == "fwd" else 2 * L)


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
    read_mb: Optional[float]
    write_mb: Optional[float]
    traffic_x_floor: Optional[float]
    traffic_basis: Optional[str]
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
    parser.add_argument("--targets", metavar="CSV", help="print the performance targets met or missed in a results CSV")
    parser.add_argument("--memory-probe", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_probe:
        memory_probe(json.loads(args.memory_probe))
        return 0
    if args.summarize:
        print_summary(read_rows(args.summarize))
        return 0
    if args.targets:
        print_targets(read_rows(args.targets))
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
                    kind = "linear" if op in LINEAR_OPS else "shift" if op in SHIFT_OPS else "logits"
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
                            if op == "copy" and mode != "full":
                                continue  # the floor of forward + backward
                            try:
                                run = mode_runner(function, inputs, labels, mode)
                                run()  # compiles, autotunes: not under the byte counter
                                try:  # the second warm-up run, counted
                                    traffic = measure_traffic(provider, op, mode, function, inputs, labels, V)
                                except (RuntimeError, TypeError) as error:
                                    print(f"  traffic of {op}/{provider}/{mode}: not counted ({error})",
                                          file=sys.stderr)
                                    traffic = None
                                median, p20, p80 = _time(run, device, repeats, warmup=max(0, warmup - 2))
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
                            floor = floor_ms(M, V, dtype, mode, bandwidth) if bandwidth and kind != "linear" else None
                            least = floor_bytes(inputs, mode)
                            row = Row(op, provider, mode, M, V, dtype_name, median, p20, p80, peak,
                                      grad_mib if mode != "fwd" else 0.0, H, floor,
                                      (median / floor) if floor else None,
                                      traffic.read / 1e6 if traffic else None, traffic.write / 1e6 if traffic else None,
                                      (traffic.read + traffic.write) / least if traffic else None,
                                      traffic.basis if traffic else None, _device_name(device),
                                      torch.__version__, triton_version, _commit(), stamp)
                            rows.append(row)
                            extra = f"  {row.x_floor:5.2f}x floor" if floor else ""
                            moved = (f"  traffic R {traffic.read / 1e6:8.1f} + W {traffic.write / 1e6:8.1f} MB = "
                                     f"{row.traffic_x_floor:4.2f}x floor bytes" if traffic else "  traffic n/a")
                            print(f"{op:13s} {provider:19s} {mode:4s} M={M:6d} V={V:6d} {dtype_name}: "
                                  f"{median:9.3f} ms [{p20:.3f}, {p80:.3f}]  peak {peak:9.1f} MiB{extra}{moved}",
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
        if op in SHIFT_OPS:
            key = (op, provider, mode, M, V, dtype)
            mine = [r for r in rows if (r.op, r.provider, r.mode, r.M, r.V, r.dtype) == key]
            logits_mib = M * V * (torch.finfo(DTYPES[dtype]).bits // 8) / 2**20
            if mine and mine[0].peak_mib == mine[0].peak_mib:  # not NaN: measured
                lines.append(f"{op} {mode} M={M} V={V} {dtype} ({provider}): peak above the inputs "
                             f"{mine[0].peak_mib / logits_mib:.2f}x the logits (the gradient alone: 1.00x)")
            if op == "ce_ntl_shift":
                other = index.get(("ce_ntl_shifted", provider, mode, M, V, dtype))
                if other:
                    lines.append(f"ce_ntl_shift {mode} M={M} V={V} {dtype}: {provider} takes {median / other:.2f}x "
                                 f"the time of the labels shifted by hand")
        if op == "ce_ntl":
            for bar in ("liger-ce", "torch-ce"):
                other = index.get(("ce", bar, mode, M, V, dtype))
                if other:
                    lines.append(f"ce_ntl {mode} M={M} V={V} {dtype}: {provider} takes {median / other:.2f}x "
                                 f"the time of {bar} alone")
    if lines:
        print("\n".join(["", "ratios (same run):"] + lines))


def check_targets(rows: List[Row]) -> List[str]:
    """The performance targets, each as met or missed by the measurements of one run (ratios only:
    every comparison is between rows of the same (M, V, dtype) from the same file)."""
    index = {(r.op, r.provider, r.mode, r.M, r.V, r.dtype): r for r in rows}
    lines = []

    def verdict(ok: bool) -> str:
        return "MET   " if ok else "MISSED"

    for (op, provider, mode, M, V, dtype), r in index.items():
        if provider not in ("triton", "cpp"):
            continue
        size = f"M={M} V={V} {dtype} {provider}"
        if op == "ce_ntl" and mode == "full":
            copy = index.get(("copy", "torch", "full", M, V, dtype))
            if copy:
                ratio = r.median_ms / copy.median_ms
                # a GPU target: on a CPU the row work is bound by its exps, not by memory (shown, not judged)
                cpu = (r.device or "").endswith(" cores")
                lines.append(f"{'info  ' if cpu else verdict(ratio <= 1.25)} CE + NTL fwd+bwd <= 1.25x the copy of "
                             f"the logits{' (a GPU target)' if cpu else ''}: {ratio:.2f}x ({size})")
            authors = index.get(("ce_ntl", "ntloss", "full", M, V, dtype))
            if authors:
                ratio = authors.median_ms / r.median_ms
                wanted = 4.0 if (r.device or "").endswith(" cores") else 3.0  # the CPU suite's bar; a GPU's
                lines.append(f"{verdict(ratio >= wanted)} CE + NTL fwd+bwd >= {wanted:g}x faster than ntloss + "
                             f"torch CE: "
                             f"{ratio:.2f}x ({size})")
            liger = index.get(("ce", "liger-ce", "full", M, V, dtype))
            if liger:
                ratio = r.median_ms / liger.median_ms
                lines.append(f"{verdict(ratio <= 1.05)} CE + NTL fwd+bwd <= 1.05x Liger's CE alone: "
                             f"{ratio:.2f}x ({size})")
            if dtype == "bf16":
                fp32 = index.get(("ce_ntl", provider, "full", M, V, "fp32"))
                if fp32:
                    ratio = r.median_ms / fp32.median_ms
                    lines.append(f"{verdict(ratio <= 1.0)} bfloat16 logits at least as fast as float32: "
                                 f"{ratio:.2f}x the float32 time ({size})")
            if r.traffic_x_floor is not None:
                lines.append(f"{verdict(r.traffic_x_floor <= 1.05)} one read + one write of the logits by design: "
                             f"{r.traffic_x_floor:.2f}x the floor's bytes ({size})")
        if op == "ntl" and mode == "fwd":
            authors = index.get(("ntl", "ntloss", "fwd", M, V, dtype))
            if authors:
                ratio = authors.median_ms / r.median_ms
                lines.append(f"{verdict(ratio >= 10)} NTL forward >= 10x faster than ntloss: {ratio:.2f}x ({size})")
        if op == "ce_ntl_shift" and mode == "full" and r.peak_mib == r.peak_mib:
            logits_mib = M * V * (torch.finfo(DTYPES[dtype]).bits // 8) / 2**20
            ratio = r.peak_mib / logits_mib
            lines.append(f"{verdict(ratio <= 1.1)} shift_labels=True: peak above the inputs <= 1.1x the logits: "
                         f"{ratio:.2f}x ({size})")
        if op == "linear_ce_ntl":
            other = index.get(("matmul_ce_ntl", provider, mode, M, V, dtype))
            if other and other.peak_mib == other.peak_mib and r.peak_mib == r.peak_mib:
                extra = (r.peak_mib - r.grad_mib) / max(other.peak_mib - other.grad_mib, 1e-9)
                time_ratio = r.median_ms / other.median_ms
                lines.append(f"{verdict(extra <= 0.25 and time_ratio <= 1.3)} LM-head path: extra peak <= 1/4 of the "
                             f"materialised path at <= 1.3x its time: {extra:.3f}x the extra memory, "
                             f"{time_ratio:.2f}x the time ({size})")
    return lines


def print_targets(rows: List[Row]) -> None:
    lines = check_targets(rows)
    print("\n".join(["targets (ratios within this file's run):"] + (lines or ["  none measurable from these rows"])))


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
    ("x copy", {op: ("copy", "torch") for op in ("ce_ntl", "ntl", "ce") + SHIFT_OPS}),
]


def print_summary(rows: List[Row]) -> None:
    """Each measurement as a multiple of the bandwidth floor (time on a GPU; bytes by design anywhere)
    and of each baseline's time (< 1: faster)."""
    index = {(r.op, r.provider, r.mode, r.M, r.V, r.dtype): r.median_ms for r in rows}
    print(f"{'op':14s} {'provider':16s} {'mode':4s} {'M':>6s} {'V':>6s} {'dtype':5s} {'ms':>9s} {'x floor':>9s}"
          f" {'bytes x floor':>13s}"
          + "".join(f" {label:>14s}" for label, _ in BASELINE_COLUMNS))
    for r in rows:
        cells = []
        for _, by_op in BASELINE_COLUMNS:
            op, provider = by_op.get(r.op, (None, None))
            other = index.get((op, provider or r.provider, r.mode, r.M, r.V, r.dtype)) if op else None
            same = (op, provider) == (r.op, r.provider)
            cells.append(f" {r.median_ms / other:14.3g}" if other and not same else " " * 15)
        floor = f"{r.x_floor:9.3g}" if r.x_floor else " " * 9
        moved = f"{r.traffic_x_floor:13.3g}" if r.traffic_x_floor is not None else f"{'n/a':>13s}"
        print(f"{r.op:14s} {r.provider:16s} {r.mode:4s} {r.M:6d} {r.V:6d} {r.dtype:5s} {r.median_ms:9.3f} {floor} "
              f"{moved}" + "".join(cells))


if __name__ == "__main__":
    sys.exit(main())
