"""Runs the CUDA kernels of ``csrc/cuda/ntl_kernels.cu`` on the CPU and compares them with the C++
CPU operators (README.md in this folder tells how the emulation works).

API (also for case generators such as a fuzzer)::

    build(kind, target="driver") -> Path
        Compiles the driver: kind "memcheck" (AddressSanitizer + UBSan) or "racecheck" (the
        kernel file instrumented for the race checker, + UBSan). Cached by source hash under
        build/cuda_emulation/. Raises BuildUnavailable without g++. target="selftest" builds
        the emulation's own test (selftest.cu).
    run(cases, kind="memcheck", skip_barrier=None, timeout=600) -> List[Result]
        Runs each Case through its kernel in the emulation; skip_barrier "file:line" leaves that
        barrier out. Result.outputs: the kernel's tensors ("ce", "ntl",
        "row_stats" for "forward"; "grad" for the backwards); Result.reports: what the
        emulation found (races, divergent barriers, early exits, deadlocks); Result.error: a
        failed launch.
    reference(case) -> Dict[str, Tensor]
        The same outputs from the C++ CPU operators, through the backend functions of
        ntl_fast.cpp (ntl_rows, ce_ntl_rows and autograd, ce_ntl_loss_and_grad); only the saved
        row statistics come from the forward operator itself, called by its schema's argument
        names.
    compare(case, result) -> List[str]
        Every disagreement (tolerances of docs/math.md §6; exact where both backends run the
        same code) and every report; empty when the kernel agrees.
    check(cases, kind, skip_barrier=None) -> Dict[str, List[str]]
        run + compare: the failing cases by name.
    barrier_sites() -> List[str]; barrier_removal(site, cases, kind) -> List[str]
        The block barriers of the kernels, and what goes wrong without one of them.

A Case (``Case.from_table`` is the same constructor) holds the operators' inputs: ``kernel``
(one of KERNELS), ``logits`` (M, V) float32/bfloat16/float16/float64, ``labels`` (M,) int64/int32,
``table`` (a NumberTokenTable; the kernels get its tensors by name, so a copy with corrupted
tensors tests what the kernels do with them), ``config`` (a LossConfig), ``with_ce``,
``grad_ce`` / ``grad_ntl`` (M,): the upstream gradients of the backwards and the per-row scales
``ce_scale`` / ``ntl_scale`` of the one-pass kernels, ``grad_output`` (a 0-d tensor, for
"scale_gradient", which scales the logits' buffer in place), ``misaligned`` (every buffer starts
one element off 16-byte alignment), ``saved_table`` (the table the saved rows come from, when
``table`` is one the CPU forward refuses), ``workspace_rows`` (the backwards and one-pass kernels
get a number-token workspace with room for that many rows only, so their rows go through it in
several chunks; default: the size the CUDA wrapper allocates), ``launch`` (for the one-pass
launch: the emulated device's ``device_smem_optin`` / ``device_l2`` / ``device_sms`` in place of
an H100-like device's, and ``rows_in_flight`` / ``row_in_smem``, the environment variables
NTL_FAST_CUDA_ROWS_IN_FLIGHT / NTL_FAST_CUDA_ROW_IN_SMEM; see csrc/cuda/ntl_kernels.h). The backwards get the row
statistics from the CPU forward, so both sides differentiate from the same saved rows.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
KERNEL_SOURCE = Path("csrc/cuda/ntl_kernels.cu")
BUILD_ROOT = ROOT / "build" / "cuda_emulation"
KERNELS = ("forward", "backward", "backward_inplace", "loss_and_grad", "loss_and_grad_inplace", "scale_gradient")
# The table tensors the CUDA kernels read (CudaRows), by NumberTokenTable attribute name.
KERNEL_TABLE = ("number_ids", "number_values", "number_index", "value_order", "sorted_gaps")


class BuildUnavailable(RuntimeError):
    """No C++ compiler to build the emulation with."""


# --------------------------------------------------------------------------------- source rewrite
_LAUNCH = re.compile(r"([A-Za-z_][\w:]*(?:\s*<[^<>;(){}]*>)?)\s*<<<(.*?)>>>\s*\(", re.S)
_EXTERN_SHARED = re.compile(
    r"^([ \t]*)extern\s+__shared__\s+(?:__align__\(\s*\d+\s*\)\s+)?([^;\[]+?)\s+(\w+)\s*\[\s*\]\s*;[ \t]*$", re.M
)
_SHARED = re.compile(r"__shared__\s+([^;{}]+);")
_NAME = re.compile(r"[A-Za-z_]\w*")


def _split_top_level(text: str) -> List[str]:
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch in "<([":
            depth += 1
        elif ch in ">)]":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    return parts + [text[start:]]


def _shared_declaration(match: re.Match) -> str:
    declaration = match.group(1)
    declarators = _split_top_level(declaration)
    first = declarators[0].split("[")[0]
    names = [_NAME.findall(first)[-1]] + [_NAME.match(d.strip()).group(0) for d in declarators[1:]]
    return f"static {declaration};" + "".join(f" NTL_EMU_SHARED({n});" for n in names)


def rewrite_cuda_source(text: str, path: str) -> str:
    """The CUDA syntax no macro can express, rewritten on the same lines (so __LINE__ and the
    compiler's messages keep the .cu file's line numbers): kernel launches, ``__shared__``
    declarations (static, registered for poisoning and race checks), ``extern __shared__``."""
    text = _LAUNCH.sub(r"::ntl_emu::launch(\1, ::ntl_emu::configure(\2))(", text)
    text = _EXTERN_SHARED.sub(
        r"\1#define \3 (reinterpret_cast<\2*>(::ntl_emu::dynamic_shared_memory()))", text
    )
    text = _SHARED.sub(_shared_declaration, text)
    if "<<<" in text or re.search(r"\bextern\s+__shared__", text):
        raise ValueError(f"{path}: a launch or extern __shared__ the rewrite does not understand")
    return f'#line 1 "{path}"\n' + text


# --------------------------------------------------------------------------------- build
def _compiler() -> str:
    """g++ (or $CXX, which must take GCC's flags: the race checker relies on GCC's
    -fsanitize=thread instrumentation and its --param)."""
    compiler = os.environ.get("CXX", "g++")
    if shutil.which(compiler) is None:
        raise BuildUnavailable(f"no C++ compiler ({compiler}) on the PATH")
    return compiler


def _sources() -> List[Path]:
    return sorted(
        [ROOT / KERNEL_SOURCE, *sorted((ROOT / "csrc").glob("*.h")), *sorted((ROOT / "csrc/cuda").glob("*.h")),
         *sorted(HERE.glob("*.h")), *sorted(HERE.glob("*.cpp")), *sorted((HERE / "include").glob("*.h")),
         Path(__file__).resolve()]
    )


COMMON_FLAGS = ["-std=c++17", "-O1", "-g", "-fno-omit-frame-pointer", "-Wall", "-Wno-unknown-pragmas"]


def _math_flags() -> List[str]:
    """The code-generation flags of the CPU operators this process loaded (-O3, and AVX2+FMA where
    ntl_fast picked its AVX2 build, see ntl_fast/_extension.py): the kernel file gets them too, so
    the compiler contracts the shared math of ntl_math.h into the same instructions on both sides,
    and outputs computed by that code alone can be compared bit for bit."""
    from ntl_fast import cpp  # noqa: F401  (loads ntl_fast._C, the AVX2 build where the CPU runs it)

    library = os.path.normpath(sys.modules["ntl_fast._C"].__file__)
    flags = ["-O3"]
    if os.path.basename(os.path.dirname(library)) == "_avx2":
        flags += ["-mavx2", "-mfma", "-mf16c"]
    return flags


UBSAN = ["-fsanitize=undefined", "-fno-sanitize-recover=all"]
BUILD_FLAGS = {
    # kind: (kernel file flags, runtime and driver flags, link flags)
    "memcheck": (["-fsanitize=address"] + UBSAN, ["-fsanitize=address"] + UBSAN, ["-fsanitize=address"] + UBSAN),
    # Only the kernel file is instrumented: its accesses call the hooks of emulation_runtime.cpp
    # (GCC's -fsanitize=thread instrumentation, without the ThreadSanitizer runtime).
    "racecheck": (["-fsanitize=thread", "--param=tsan-instrument-func-entry-exit=0"] + UBSAN,
                  ["-DNTL_EMU_RACECHECK"] + UBSAN, UBSAN),
}


# target: (the .cu file, the host file beside it); the self-test's .cu has its own main().
TARGETS = {
    "driver": (KERNEL_SOURCE, HERE / "driver.cpp"),
    "selftest": (Path("tests/cuda_emulation/selftest.cu"), None),
}


def build(kind: str = "memcheck", target: str = "driver") -> Path:
    """The executable of ``target`` ("driver": the kernels of ntl_kernels.cu behind the case file
    protocol; "selftest": selftest.cu) in build ``kind`` ("memcheck" or "racecheck"), built once
    per source hash."""
    if kind not in BUILD_FLAGS:
        raise ValueError(f"kind must be one of {sorted(BUILD_FLAGS)}, got {kind!r}")
    compiler = _compiler()
    cuda_source, host_source = TARGETS[target]
    digest = hashlib.sha256()
    for path in _sources() + [ROOT / cuda_source]:
        digest.update(str(path).encode() + path.read_bytes())
    digest.update(repr((BUILD_FLAGS[kind], _math_flags())).encode() + compiler.encode())
    out_dir = BUILD_ROOT / f"{target}-{kind}-{digest.hexdigest()[:16]}"
    binary = out_dir / target
    if binary.exists():
        return binary
    # Built aside and renamed into place: concurrent test processes never see half a build.
    BUILD_ROOT.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=out_dir.name + ".", dir=BUILD_ROOT))
    try:
        rewritten = work / (cuda_source.name + ".cc")
        rewritten.write_text(rewrite_cuda_source((ROOT / cuda_source).read_text(), str(cuda_source)))
        kernel_flags, host_flags, link_flags = BUILD_FLAGS[kind]
        kernel_flags = kernel_flags + _math_flags()
        includes = ["-I", str(HERE / "include"), "-I", str(HERE), "-I", str(ROOT / cuda_source.parent)]
        objects = []
        units = [(rewritten, kernel_flags), (HERE / "emulation_runtime.cpp", host_flags)]
        if host_source is not None:
            units.append((host_source, host_flags))
        for source, flags in units:
            obj = work / (source.name + ".o")
            _compile([compiler, *COMMON_FLAGS, *flags, *includes, "-c", str(source), "-o", str(obj)])
            objects.append(str(obj))
        _compile([compiler, *COMMON_FLAGS, *link_flags, *objects, "-o", str(work / target)])
        try:
            os.rename(work, out_dir)
        except OSError:  # another process finished the same build first
            pass
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return binary


def _compile(command: List[str]) -> None:
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"build failed: {' '.join(command)}\n{done.stdout}{done.stderr}")


# --------------------------------------------------------------------------------- cases
@dataclass
class Case:
    name: str
    kernel: str
    logits: Tensor
    labels: Tensor
    table: "NumberTokenTable"  # noqa: F821  (ntl_fast.table)
    config: "LossConfig"  # noqa: F821  (ntl_fast.config)
    with_ce: bool = True
    grad_ce: Optional[Tensor] = None
    grad_ntl: Optional[Tensor] = None
    misaligned: bool = False
    saved_table: Optional["NumberTokenTable"] = None  # noqa: F821  (the table of the saved rows; default: table)
    grad_output: Optional[Tensor] = None
    workspace_rows: Optional[int] = None
    launch: Optional[Dict[str, int]] = None

    @classmethod
    def from_table(cls, name: str, kernel: str, logits: Tensor, labels: Tensor, table, config, **kwargs) -> "Case":
        """A case from a NumberTokenTable and a LossConfig (the constructor itself)."""
        return cls(name, kernel, logits, labels, table, config, **kwargs)


# What a case may set of the one-pass launch (driver.cpp, configure_device).
LAUNCH_FIELDS = ("device_smem_optin", "device_l2", "device_sms", "rows_in_flight", "row_in_smem")


@dataclass
class Result:
    outputs: Dict[str, Tensor] = field(default_factory=dict)
    reports: List[str] = field(default_factory=list)
    report_count: int = 0
    error: Optional[str] = None
    barriers: List[str] = field(default_factory=list)


_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.float64: 3, torch.int32: 4,
                torch.int64: 5, torch.uint8: 6}
_CODE_DTYPES = {code: dtype for dtype, code in _DTYPE_CODES.items()}


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _backend():
    from ntl_fast import cpp  # importing it registers torch.ops.ntl_fast

    return cpp


def _loss_code(loss: str) -> int:
    from ntl_fast.config import LossKind

    return int(LossKind.of(loss))


def _reweigh_constant(table, config) -> float:
    return table.reweigh_constant(config.loss, config.squash_factor) if config.reweigh else 0.0


def _call_operator(name: str, table, config, **inputs) -> tuple:
    """torch.ops.ntl_fast.<name> on CPU tensors, every argument given by its schema name: the
    table as the one tensor list of NumberTokenTable.kernel_tensors() where the schema takes a
    list, else tensor by tensor; the loss as its name or its LossKind code, as the schema types it."""
    _backend()
    op = getattr(torch.ops.ntl_fast, name).default
    values = dict(inputs, squash_factor=config.squash_factor, min_distance=table.min_distance,
                  max_distance=table.max_distance, reweigh=config.reweigh,
                  reweigh_constant=_reweigh_constant(table, config), gaussian_sigma=config.gaussian_sigma,
                  ignore_index=config.ignore_index)
    kwargs = {}
    for argument in op._schema.arguments:
        kind = str(argument.type)
        if argument.name == "loss":
            kwargs["loss"] = config.loss if kind == "str" else _loss_code(config.loss)
        elif kind == "List[Tensor]" or kind == "Tensor[]":
            kwargs[argument.name] = list(table.kernel_tensors())
        elif argument.name in values:
            kwargs[argument.name] = values[argument.name]
        elif hasattr(table, argument.name) and isinstance(getattr(table, argument.name), Tensor):
            kwargs[argument.name] = getattr(table, argument.name)
        elif argument.name.startswith("inplace"):
            kwargs[argument.name] = False
        elif not argument.has_default_value():
            raise RuntimeError(f"ntl_fast::{name}: no value for the schema argument {argument.name} ({kind})")
    return op(**kwargs)


def _forward_rows(case: Case) -> Tensor:
    """The row statistics of the CPU forward (LSE_V, LSE_N, log(1 - m)): the backwards' saved rows,
    on both sides."""
    table = case.saved_table if case.saved_table is not None else case.table
    name = "ce_ntl_forward" if case.with_ce else "ntl_forward"
    return _call_operator(name, table, case.config, logits=case.logits, labels=case.labels)[-1]


def _kernel_options(table, config) -> Dict[str, object]:
    """The Options struct the CUDA wrapper builds (ntl_checks.h make_options) from the op arguments."""
    squash_factor, span = config.squash_factor, table.max_distance - table.min_distance
    sigma = config.gaussian_sigma
    return {
        "loss": _loss_code(config.loss), "squash": int(squash_factor is not None),
        "squash_min": float(table.min_distance),
        "squash_scale": (squash_factor - 1.0) / span if squash_factor is not None and span > 0 else 0.0,
        "reweigh": int(config.reweigh), "reweigh_constant": float(_reweigh_constant(table, config)),
        "gaussian": int(sigma is not None), "sigma": float(sigma) if sigma is not None else 0.0,
        "ignore_index": int(config.ignore_index),
    }


def _encode(case: Case) -> Dict[str, Tensor]:
    if case.kernel not in KERNELS:
        raise ValueError(f"case {case.name}: kernel must be one of {KERNELS}, got {case.kernel!r}")
    M, V = case.logits.shape
    fields: Dict[str, Tensor] = {
        "kernel": torch.tensor(list(case.kernel.encode()), dtype=torch.uint8),
        "M": torch.tensor([M]), "V": torch.tensor([V]), "logits": case.logits, "labels": case.labels,
        "with_ce": torch.tensor([int(case.with_ce)]), "misaligned": torch.tensor([int(case.misaligned)]),
    }
    for name in KERNEL_TABLE:
        fields[name] = getattr(case.table, name)
    for name, value in _kernel_options(case.table, case.config).items():
        fields[name] = torch.tensor([value], dtype=torch.float64 if isinstance(value, float) else torch.int64)
    acc = _acc(case.logits.dtype)
    if case.kernel == "scale_gradient":
        fields["grad_output"] = case.grad_output.to(acc).reshape(1)
    elif case.kernel != "forward":
        if case.kernel.startswith("backward"):
            fields["row_stats"] = _forward_rows(case)
        fields["grad_ntl"] = case.grad_ntl.to(acc)
        if case.with_ce:
            fields["grad_ce"] = case.grad_ce.to(acc)
        if case.workspace_rows is not None:
            fields["workspace_rows"] = torch.tensor([case.workspace_rows])
    for name, value in (case.launch or {}).items():
        if name not in LAUNCH_FIELDS:
            raise ValueError(f"unknown launch field {name!r}")
        fields[name] = torch.tensor([int(value)], dtype=torch.int64)
    return fields


def _write(path: Path, records: Sequence[Dict[str, Tensor]]) -> None:
    with open(path, "wb") as f:
        f.write(b"NTLEMU01" + struct.pack("<I", len(records)))
        for record in records:
            f.write(struct.pack("<I", len(record)))
            for name, tensor in record.items():
                # a fresh 1-D buffer: contiguous() keeps the stride of a one-element view (e.g. the
                # last label of a sliced row), which view(torch.uint8) refuses
                flat = tensor.detach().cpu().reshape(-1)
                tensor = torch.empty(flat.numel(), dtype=flat.dtype).copy_(flat)
                f.write(struct.pack("<H", len(name)) + name.encode())
                f.write(struct.pack("<BQ", _DTYPE_CODES[tensor.dtype], tensor.numel()))
                f.write(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")


def _read(path: Path) -> List[Dict[str, Tensor]]:
    data = path.read_bytes()
    if data[:8] != b"NTLEMU01":
        raise RuntimeError(f"{path} is not a results file")
    (count,), pos, records = struct.unpack_from("<I", data, 8), 12, []
    for _ in range(count):
        (fields,), pos, record = struct.unpack_from("<I", data, pos), pos + 4, {}
        for _ in range(fields):
            (length,) = struct.unpack_from("<H", data, pos)
            name = data[pos + 2:pos + 2 + length].decode()
            code, numel = struct.unpack_from("<BQ", data, pos + 2 + length)
            pos += 2 + length + 9
            dtype = _CODE_DTYPES[code]
            size = numel * torch.empty((), dtype=dtype).element_size()
            raw = torch.frombuffer(bytearray(data[pos:pos + size]), dtype=torch.uint8) if size else None
            record[name] = raw.view(dtype) if raw is not None else torch.empty(0, dtype=dtype)
            pos += size
        records.append(record)
    return records


def _text(tensor: Tensor) -> str:
    return bytes(tensor.tolist()).decode()


def run(cases: Sequence[Case], kind: str = "memcheck", skip_barrier: Optional[str] = None,
        timeout: float = 600) -> List[Result]:
    """Runs every case in the emulation (one driver process for the batch)."""
    binary = build(kind)
    env = dict(os.environ)
    env.pop("NTL_EMU_SKIP_BARRIER", None)
    if skip_barrier:
        env["NTL_EMU_SKIP_BARRIER"] = skip_barrier
    env.setdefault("ASAN_OPTIONS", "detect_leaks=0")
    with tempfile.TemporaryDirectory(prefix="ntl_emu_") as tmp:
        cases_file, results_file = Path(tmp) / "cases.bin", Path(tmp) / "results.bin"
        _write(cases_file, [_encode(case) for case in cases])
        done = subprocess.run([str(binary), str(cases_file), str(results_file)], capture_output=True, text=True,
                              timeout=timeout, env=env)
        if done.returncode != 0:
            raise RuntimeError(f"the {kind} driver failed (exit {done.returncode}):\n{done.stderr[-6000:]}")
        records = _read(results_file)
    results = []
    for case, record in zip(cases, records):
        result = Result(report_count=int(record.pop("report_count")[0]),
                        reports=[line for line in _text(record.pop("reports")).splitlines() if line],
                        barriers=[b for b in _text(record.pop("barriers")).split(";") if b])
        if "error" in record:
            result.error = _text(record.pop("error"))
        shape = {"grad": case.logits.shape, "row_stats": (case.logits.shape[0], 5)}
        result.outputs = {name: t.reshape(shape.get(name, t.shape)) for name, t in record.items()}
        results.append(result)
    return results


# --------------------------------------------------------------------------------- reference
def reference(case: Case) -> Dict[str, Tensor]:
    """The outputs of ``case`` from the C++ CPU operators, through ntl_fast.cpp's functions."""
    cpp = _backend()
    acc = _acc(case.logits.dtype)
    if case.kernel == "scale_gradient":
        return {"grad": case.logits.clone().mul_(case.grad_output.to(acc))}
    if case.kernel.startswith("loss_and_grad"):
        ce, ntl, grad = cpp.ce_ntl_loss_and_grad(case.logits, case.labels, case.table, case.config,
                                                 case.grad_ce.to(acc), case.grad_ntl.to(acc))
        return {"ce": ce, "ntl": ntl, "grad": grad}
    if case.kernel == "forward":
        if case.with_ce:
            ce, ntl = cpp.ce_ntl_rows(case.logits, case.labels, case.table, case.config)
            return {"ce": ce, "ntl": ntl, "row_stats": _forward_rows(case)}
        return {"ntl": cpp.ntl_rows(case.logits, case.labels, case.table, case.config),
                "row_stats": _forward_rows(case)}
    # The backwards (in place or not: the same values) through the operators' autograd, which
    # differentiates from the CPU forward's own saved rows.
    logits = case.logits.clone().requires_grad_(True)
    if case.with_ce:
        ce, ntl = cpp.ce_ntl_rows(logits, case.labels, case.table, case.config)
        (grad,) = torch.autograd.grad((ce, ntl), logits, (case.grad_ce.to(acc), case.grad_ntl.to(acc)))
    else:
        ntl = cpp.ntl_rows(logits, case.labels, case.table, case.config)
        (grad,) = torch.autograd.grad(ntl, logits, case.grad_ntl.to(acc))
    return {"grad": grad}


def _exact(case: Case, name: str) -> bool:
    """Outputs that both backends compute with the same code of ntl_math.h from the same inputs:
    LSE_N, and NTL without reweighing (no LSE_V in it)."""
    return name == "ntl" and not case.config.reweigh


def _tolerance(case: Case, name: str) -> Tuple[float, float]:
    """(rtol, atol) of docs/math.md §6 for this output."""
    low_precision = case.logits.dtype in (torch.bfloat16, torch.float16)
    if name == "grad":
        return (2e-2, 1e-6) if low_precision else (1e-5, 1e-6)
    return (1e-4, 1e-6) if low_precision else (1e-5, 1e-6)


def compare(case: Case, result: Result, expected: Optional[Dict[str, Tensor]] = None) -> List[str]:
    """Every way ``result`` disagrees with the CPU operators, plus the emulation's reports."""
    problems = [f"emulation: {report}" for report in result.reports]
    if result.report_count > len(result.reports):
        problems.append(f"emulation: {result.report_count - len(result.reports)} more reports")
    if result.error:
        return problems + [f"launch failed: {result.error}"]
    expected = reference(case) if expected is None else expected
    for name, want in expected.items():
        got = result.outputs.get(name)
        if got is None:
            problems.append(f"{name}: missing from the emulation's outputs")
            continue
        want64, got64 = want.double(), got.double()
        nan_w, nan_g = torch.isnan(want64), torch.isnan(got64)
        if not torch.equal(nan_w, nan_g):
            problems.append(f"{name}: NaN at flat indices {nan_g.flatten().nonzero().flatten()[:6].tolist()} "
                            f"emulated, {nan_w.flatten().nonzero().flatten()[:6].tolist()} on CPU")
            continue
        finite = torch.isfinite(want64)
        if not torch.equal(want64[~finite & ~nan_w], got64[~finite & ~nan_w]) or \
                not torch.equal(finite, torch.isfinite(got64)):
            problems.append(f"{name}: infinities differ")
            continue
        w, g = want64[finite], got64[finite]
        if _exact(case, name):
            if not torch.equal(w, g):
                problems.append(f"{name}: not bitwise equal, max |diff| {(w - g).abs().max().item():.3g}")
            continue
        rtol, atol = _tolerance(case, name)
        bound = rtol * (w.abs().max().item() if w.numel() else 0.0) + atol
        diff = (w - g).abs().max().item() if w.numel() else 0.0
        if diff > bound:
            problems.append(f"{name}: max |diff| {diff:.3g} > {bound:.3g}")
    return problems


def check(cases: Sequence[Case], kind: str = "memcheck", skip_barrier: Optional[str] = None) -> Dict[str, List[str]]:
    """Runs and compares ``cases``; the failing ones by name, with their problems."""
    failures = {}
    for case, result in zip(cases, run(cases, kind, skip_barrier)):
        problems = compare(case, result)
        if problems:
            failures[case.name] = problems
    return failures


def barrier_sites() -> List[str]:
    """Every block barrier in the kernel file and the shared headers, as "file:line"."""
    pattern = re.compile(r"__syncthreads(?:_or|_and|_count)?\s*\(")
    sites = []
    for path in [ROOT / KERNEL_SOURCE, *sorted((ROOT / "csrc").glob("*.h")), *sorted((ROOT / "csrc/cuda").glob("*.h"))]:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("//")[0]
            if pattern.search(code):
                sites.append(f"{path.name}:{number}")
    return sites


def barrier_removal(site: str, cases: Sequence[Case], kind: str) -> List[str]:
    """What goes wrong when the barrier at ``site`` is left out: the failing cases' problems, or
    the driver's own failure (a sanitizer stops it, e.g. on a poisoned bool). Empty: not caught."""
    try:
        failures = check(cases, kind, skip_barrier=site)
    except RuntimeError as error:
        return [str(error).splitlines()[-1]]
    return [f"{name}: {problems[0]}" for name, problems in failures.items()]
