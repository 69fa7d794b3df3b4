"""The one dispatch point: which backend computes the per-position losses, and why.

A backend is a module implementing :class:`Backend` (per-position losses, differentiable with
respect to the logits, and the one-pass loss and gradient). :mod:`ntl_fast.reference` is the
plain-PyTorch oracle; :mod:`ntl_fast.cpp` and :mod:`ntl_fast.triton` are the kernel backends.
Reductions, weights, normalisers and input checks are shared and live in
:mod:`ntl_fast.functional`; the autograd Function of the one-pass path in :mod:`ntl_fast.fused`.

``backend="auto"`` picks, in order: Triton for CUDA tensors when Triton imports; the compiled
C++/CUDA operators when the extension is built; the PyTorch reference otherwise.
:func:`explain_backend` names the choice and the reason without running anything.
"""

from __future__ import annotations

import importlib
import os
import warnings
from types import ModuleType
from typing import TYPE_CHECKING, Callable, Dict, NamedTuple, Optional, Protocol, Tuple, runtime_checkable

import torch
from torch import Tensor

if TYPE_CHECKING:
    from .config import LossConfig
    from .table import NumberTokenTable

__all__ = ["BACKENDS", "Backend", "BackendChoice", "explain_backend", "get_backend"]

BACKENDS = ("auto", "reference", "triton", "cpp")


@runtime_checkable
class Backend(Protocol):
    """What every backend module implements, as module-level functions.

    Shapes: ``logits2d (M, V)`` in float32, bfloat16, float16 or float64 whose last dimension is
    dense; ``labels1d (M,)`` int64 or int32; ``table`` resized to V and on the logits' device.
    Per-position results are float32 (float64 for float64 logits): 0 where a position does not
    count (docs/math.md §3), NaN at a label that is neither in ``[0, V)`` nor ``ignore_index``.
    """

    def unsupported_reason(self, device: torch.device) -> Optional[str]:
        """None when the backend can run on ``device``, else why not, in words."""

    def ntl_rows(self, logits2d: Tensor, labels1d: Tensor, table: "NumberTokenTable", config: "LossConfig"
                 ) -> Tensor:
        """Per-position NTL ``(M,)``, differentiable with respect to the logits."""

    def ce_ntl_rows(self, logits2d: Tensor, labels1d: Tensor, table: "NumberTokenTable", config: "LossConfig",
                    inplace: bool = False) -> Tuple[Tensor, Tensor]:
        """Per-position CE (or Gaussian-CE) and NTL ``(M,)`` each, from one read of the logits,
        differentiable; ``inplace=True`` lets a kernel backend's backward write the gradient into
        the logits' buffer."""

    def fuses_loss_and_grad(self, logits2d: Tensor) -> bool:
        """Whether :meth:`ce_ntl_loss_and_grad` serves these logits (their device and dtype). On CUDA
        only float32 and bfloat16 qualify: a float16 gradient stored before the loss scale is applied
        underflows, so float16 keeps the two-pass path."""

    def ce_ntl_loss_and_grad(self, logits2d: Tensor, labels1d: Tensor, table: "NumberTokenTable",
                             config: "LossConfig", ce_scale: Tensor, ntl_scale: Tensor, inplace: bool = False
                             ) -> Tuple[Tensor, Tensor, Tensor]:
        """``(ce (M,), ntl (M,), grad (M, V))`` with ``grad = d(Σ ce_scale·ce + Σ ntl_scale·ntl)/d logits``
        in the logits' dtype, from one read of the logits; ``ce_scale``, ``ntl_scale`` are ``(M,)``
        in the result dtype. ``inplace=True`` writes the gradient into the logits' buffer and
        returns that buffer. Not differentiable itself (:mod:`ntl_fast.fused` wraps it)."""

    def scale_gradient_(self, grad: Tensor, grad_output: Tensor) -> Tensor:
        """``grad *= grad_output`` in place and return ``grad``; ``grad_output`` is a 0-d tensor on
        grad's device, read on the device (never ``.item()`` on CUDA); free (no pass over ``grad``)
        when it is 1 on the CUDA kernel backends; works under ``torch.compile``."""


class BackendChoice(NamedTuple):
    """The backend that serves a device, and why it was chosen.

    Attributes:
        name (str): ``"triton"``, ``"cpp"`` or ``"reference"``.
        reason (str): why, in words (e.g. which import failed).
    """

    name: str
    reason: str


def _triton_usable(device: torch.device) -> Optional[str]:
    """None when the Triton kernels can run on ``device``, else the reason they cannot."""
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return "Triton runs CPU tensors only in its interpreter (TRITON_INTERPRET=1)"
    if device.type not in ("cuda", "cpu"):
        return f"Triton does not serve {device.type} tensors"
    return _import_error("ntl_fast.triton")


def _cpp_usable(device: torch.device) -> Optional[str]:
    reason = _import_error("ntl_fast.cpp")
    if reason is not None:
        return reason
    return _MODULES["ntl_fast.cpp"].unsupported_reason(device)


_IMPORT_ERRORS: Dict[str, Optional[str]] = {}
_MODULES: Dict[str, ModuleType] = {}


def _import_error(module_name: str) -> Optional[str]:
    if module_name not in _IMPORT_ERRORS:
        try:
            _MODULES[module_name] = importlib.import_module(module_name)
            _IMPORT_ERRORS[module_name] = None
        except ImportError as error:  # the optional dependency or the extension is missing
            _IMPORT_ERRORS[module_name] = f"{module_name} is unavailable: {error}"
    return _IMPORT_ERRORS[module_name]


def load_backends() -> None:
    """Import every backend once, eagerly, so that dispatch under ``torch.compile`` is plain
    dictionary lookups (ntl_fast's ``__init__`` calls this)."""
    for module_name, _ in _CHECKS.values():
        _import_error(module_name)


_warned_cpu_fallback = False


def _warn_cpu_fallback(reason: str) -> None:
    global _warned_cpu_fallback
    if _warned_cpu_fallback or torch.compiler.is_compiling():
        return
    _warned_cpu_fallback = True
    warnings.warn(
        f"ntl_fast: the C++ extension is not available ({reason}); CPU tensors use the slower "
        f"PyTorch reference. Build it with `pip install --no-build-isolation -e .` from the "
        f"source tree, with torch installed first.",
        RuntimeWarning,
        stacklevel=3,
    )


_CHECKS: Dict[str, Tuple[str, Callable[[torch.device], Optional[str]]]] = {
    "triton": ("ntl_fast.triton", _triton_usable),
    "cpp": ("ntl_fast.cpp", _cpp_usable),
    "reference": ("ntl_fast.reference", lambda device: None),
}


def explain_backend(device, backend: str = "auto") -> BackendChoice:
    """Name the backend that serves tensors on ``device`` and the reason, running nothing.

    Args:
        device (Tensor, torch.device or str): the tensors' device (a tensor stands for its own).
        backend (str): ``"auto"`` (default): Triton for CUDA tensors when it imports, else the
            compiled operators when built, else the reference; or ``"triton"``, ``"cpp"``,
            ``"reference"`` to check that one.

    Returns:
        BackendChoice: ``(name, reason)``. With ``"auto"`` on a CPU without the C++ extension,
        the first call also warns once (``RuntimeWarning``) with the command that builds it.

    Raises:
        ValueError: an unknown ``backend``.
        RuntimeError: an explicit ``backend`` that cannot serve the device, with the reason.
    """
    if isinstance(device, torch.Tensor):
        device = device.device
    device = torch.device(device)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend != "auto":
        reason = _CHECKS[backend][1](device)
        if reason is not None:
            raise RuntimeError(f"backend={backend!r} cannot serve {device.type} tensors: {reason}")
        return BackendChoice(backend, "requested explicitly")
    if device.type == "cuda":
        triton_reason = _triton_usable(device)
        if triton_reason is None:
            return BackendChoice("triton", "CUDA tensors and Triton is importable")
        cpp_reason = _cpp_usable(device)
        if cpp_reason is None:
            return BackendChoice("cpp", f"CUDA tensors; Triton unusable ({triton_reason})")
        return BackendChoice(
            "reference", f"no kernel backend for CUDA: {triton_reason}; {cpp_reason}"
        )
    cpp_reason = _cpp_usable(device)
    if cpp_reason is None:
        return BackendChoice("cpp", f"{device.type} tensors and the C++ extension is built")
    if device.type == "cpu":
        _warn_cpu_fallback(cpp_reason)
    return BackendChoice("reference", f"no kernel backend for {device.type}: {cpp_reason}")


def get_backend(name: str) -> Backend:
    """The module implementing backend ``name`` (see :class:`Backend`); ``name`` is one of
    ``"triton"``, ``"cpp"``, ``"reference"`` (``KeyError`` otherwise)."""
    module_name = _CHECKS[name][0]
    if module_name not in _MODULES:
        _import_error(module_name)
    return _MODULES[module_name]
