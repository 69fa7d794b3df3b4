"""The compiled C++/CUDA backend: the ``ntl_fast::*`` operators of ``csrc/``.

The schemas live in ``csrc/ntl_fast.cpp`` and the kernels in ``csrc/cpu`` and ``csrc/cuda``; this
module registers what Python must (fake kernels for ``torch.compile``, the autograd of the forward
ops) and implements the backend interface of :mod:`ntl_fast.backends`: ``unsupported_reason``,
``ntl_rows`` and ``ce_ntl_rows`` (the semantics of :mod:`ntl_fast.reference`), and the one-pass
``ce_ntl_loss_and_grad`` with ``fuses_loss_and_grad`` and ``scale_gradient_``.

Every op receives the table as one list, ``NumberTokenTable.kernel_tensors()``, and the options
as :func:`_option_args` gives them (the loss as its ``LossKind`` code).

Importing it raises ImportError when the extension has not been built.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .config import LossConfig, LossKind, accumulation_dtype
from .table import NumberTokenTable

try:
    from . import _C  # noqa: F401  (loading the library registers the operators)
except ImportError as error:  # pragma: no cover - depends on the build
    raise ImportError(
        "the compiled operators ntl_fast._C are not built; build them with "
        "`pip install --no-build-isolation -e .` (a C++17 compiler and the installed torch are "
        f"needed; CUDA kernels are added when torch has CUDA): {error}"
    ) from error

__all__ = ["ntl_rows", "ce_ntl_rows", "ce_ntl_loss_and_grad", "fuses_loss_and_grad", "scale_gradient_",
           "unsupported_reason"]

_ops = torch.ops.ntl_fast


def _has_cuda_kernel(op: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"ntl_fast::{op}", "CUDA")


# Fixed once the library is loaded; read here so that dispatch under torch.compile reads constants.
_CUDA_KERNELS = _has_cuda_kernel("ce_ntl_forward")
_CUDA_LOSS_AND_GRAD = _has_cuda_kernel("ce_ntl_loss_and_grad")
# float16 keeps the two-pass path on CUDA: a gradient stored in float16 before the loss scale is
# applied underflows.
_CUDA_LOSS_AND_GRAD_DTYPES = (torch.float32, torch.bfloat16)


def unsupported_reason(device) -> Optional[str]:
    """None when the compiled operators serve ``device``, else why they cannot."""
    device = torch.device(device)
    if device.type == "cpu":
        return None
    if device.type == "cuda":
        if _CUDA_KERNELS:
            return None
        return "ntl_fast._C was built without CUDA kernels (rebuild with a CUDA torch)"
    return f"the compiled operators do not serve {device.type} tensors"


def fuses_loss_and_grad(logits: Tensor) -> bool:
    """Whether :func:`ce_ntl_loss_and_grad` serves these logits: on CPU every dtype; on CUDA
    float32 and bfloat16, where the extension has the CUDA kernel."""
    if logits.device.type == "cpu":
        return True
    return logits.device.type == "cuda" and _CUDA_LOSS_AND_GRAD and logits.dtype in _CUDA_LOSS_AND_GRAD_DTYPES


# --------------------------------------------------------------------------------- op arguments
def _option_args(table: NumberTokenTable, config: LossConfig) -> tuple:
    """The options of every op (``NTL_OPTIONS_SCHEMA`` of ``csrc/ntl_checks.h``), in order."""
    constant = table.reweigh_constant(config.loss, config.squash_factor) if config.reweigh else 0.0
    return (int(LossKind.of(config.loss)), config.squash_factor, table.min_distance, table.max_distance,
            config.reweigh, constant, config.gaussian_sigma, config.ignore_index)


_NUM_OPTIONS = 8


# --------------------------------------------------------------------------------- fake kernels
_ROW_STATS = 5  # values per row that a forward saves for its backward (RowStats, csrc/ntl_math.h)


def _row_like(logits: Tensor, *width: int) -> Tensor:
    return logits.new_empty(logits.shape[:1] + tuple(width), dtype=accumulation_dtype(logits.dtype))


@torch.library.register_fake("ntl_fast::ntl_forward")
def _ntl_forward_fake(logits, labels, *args):
    return _row_like(logits), _row_like(logits, _ROW_STATS)


@torch.library.register_fake("ntl_fast::ce_ntl_forward")
def _ce_ntl_forward_fake(logits, labels, *args):
    return _row_like(logits), _row_like(logits), _row_like(logits, _ROW_STATS)


@torch.library.register_fake("ntl_fast::ntl_backward")
def _ntl_backward_fake(grad_ntl, logits, *args):
    return torch.empty_like(logits)


@torch.library.register_fake("ntl_fast::ce_ntl_backward")
def _ce_ntl_backward_fake(grad_ce, grad_ntl, logits, *args):
    return torch.empty_like(logits)


@torch.library.register_fake("ntl_fast::ce_ntl_backward_")
def _ce_ntl_backward_inplace_fake(logits, *args):
    return None


@torch.library.register_fake("ntl_fast::ce_ntl_loss_and_grad")
def _ce_ntl_loss_and_grad_fake(logits, labels, *args):
    return _row_like(logits), _row_like(logits), torch.empty_like(logits)


@torch.library.register_fake("ntl_fast::ce_ntl_loss_and_grad_")
def _ce_ntl_loss_and_grad_inplace_fake(logits, labels, *args):
    return _row_like(logits), _row_like(logits)


@torch.library.register_fake("ntl_fast::scale_gradient_")
def _scale_gradient_fake(grad, grad_output):
    return None


# --------------------------------------------------------------------------------- autograd
def _row_grad(grad: Optional[Tensor], row_stats: Tensor) -> Tensor:
    return row_stats.new_zeros(row_stats.shape[:1]) if grad is None else grad


def _input_grads(ctx, grad_logits: Optional[Tensor]) -> tuple:
    """The backward's return, shaped as the inputs the op received (a list of Nones for the table;
    no entry for a trailing default the dispatcher left out): the logits' gradient, else None."""
    return (grad_logits,) + tuple(
        [None] * len(needs) if isinstance(needs, (list, tuple)) else None for needs in ctx.needs_input_grad[1:]
    )


def _ntl_setup(ctx, inputs, output):
    logits, labels, table = inputs[:3]
    ctx.options = inputs[3:]
    _, row_stats = output
    ctx.save_for_backward(logits, labels, row_stats, *table)


def _ntl_backward(ctx, grad_ntl, grad_row_stats):
    logits, labels, row_stats, *table = ctx.saved_tensors
    grad_logits = None
    if ctx.needs_input_grad[0]:
        grad_logits = _ops.ntl_backward(_row_grad(grad_ntl, row_stats), logits, labels, row_stats, table,
                                        *ctx.options)
    return _input_grads(ctx, grad_logits)


def _ce_ntl_setup(ctx, inputs, output):
    logits, labels, table = inputs[:3]
    ctx.options = inputs[3:3 + _NUM_OPTIONS]
    ctx.inplace = inputs[-1]
    _, _, row_stats = output
    # Saved through autograd: a later in-place gradient write bumps the logits' version, so any
    # other user that saved the same logits fails loudly instead of reading the gradient.
    ctx.save_for_backward(logits, labels, row_stats, *table)


def _ce_ntl_backward(ctx, grad_ce, grad_ntl, grad_row_stats):
    logits, labels, row_stats, *table = ctx.saved_tensors
    grad_logits = None
    if ctx.needs_input_grad[0]:
        grad_ce = _row_grad(grad_ce, row_stats)
        grad_ntl = _row_grad(grad_ntl, row_stats)
        if ctx.inplace:
            _ops.ce_ntl_backward_(logits, grad_ce, grad_ntl, labels, row_stats, table, *ctx.options)
            # The dispatcher does not bump the version of a custom op's mutated argument here.
            torch.autograd.graph.increment_version(logits)
            grad_logits = logits
        else:
            grad_logits = _ops.ce_ntl_backward(grad_ce, grad_ntl, logits, labels, row_stats, table, *ctx.options)
    return _input_grads(ctx, grad_logits)


torch.library.register_autograd("ntl_fast::ntl_forward", _ntl_backward, setup_context=_ntl_setup)
torch.library.register_autograd("ntl_fast::ce_ntl_forward", _ce_ntl_backward, setup_context=_ce_ntl_setup)


# --------------------------------------------------------------------------------- backend API
def _contiguous(logits: Tensor) -> Tensor:
    return logits if logits.is_contiguous() else logits.contiguous()


def ntl_rows(logits: Tensor, labels: Tensor, table: NumberTokenTable, config: LossConfig) -> Tensor:
    """Per-position NTL ``(M,)``: 0 off the NTL-valid positions, NaN at bad labels."""
    loss, _ = _ops.ntl_forward(_contiguous(logits), labels, table.kernel_tensors(), *_option_args(table, config))
    return loss


def ce_ntl_rows(
    logits: Tensor, labels: Tensor, table: NumberTokenTable, config: LossConfig, inplace: bool = False
) -> Tuple[Tensor, Tensor]:
    """Per-position cross-entropy (or Gaussian-CE) and NTL, each ``(M,)``, from one pass.

    ``inplace=True`` writes the gradient over the logits' buffer in the backward (eager mode only;
    under ``torch.compile`` the functional backward is used).
    """
    inplace = bool(inplace) and not torch.compiler.is_compiling()
    ce, ntl, _ = _ops.ce_ntl_forward(
        _contiguous(logits), labels, table.kernel_tensors(), *_option_args(table, config), inplace
    )
    return ce, ntl


def ce_ntl_loss_and_grad(
    logits: Tensor, labels: Tensor, table: NumberTokenTable, config: LossConfig, ce_scale: Tensor,
    ntl_scale: Tensor, inplace: bool = False,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Per-position CE and NTL ``(M,)`` and ``d(Σ ce_scale·ce + Σ ntl_scale·ntl)/d logits`` in the
    logits' dtype, from one read of the logits (each row's gradient is written while the row is
    still in cache). Serves what :func:`fuses_loss_and_grad` accepts.

    ``inplace=True`` writes the gradient over the logits' buffer and returns that buffer: the
    logits then hold the gradient. Refused for a leaf that requires grad (its values are the
    parameters autograd differentiates). Not differentiable itself: the public API wraps it for the
    reductions whose per-row upstream gradients are known before the backward (``"mean"``,
    ``"sum"``); the backward then only scales the gradient by ``grad_output`` (:func:`scale_gradient_`).
    """
    args = (labels, ce_scale, ntl_scale, table.kernel_tensors(), *_option_args(table, config))
    if not inplace:
        return _ops.ce_ntl_loss_and_grad(_contiguous(logits), *args)
    if logits.is_leaf and logits.requires_grad:
        raise RuntimeError(
            "ntl_fast: inplace=True writes the gradient over the logits, which a leaf that requires grad "
            "cannot take; pass the output of an operation (e.g. the LM head's) or use inplace=False"
        )
    if logits.is_contiguous():
        ce, ntl = _ops.ce_ntl_loss_and_grad_(logits, *args)
        if not torch.compiler.is_compiling():
            # The dispatcher does not bump the version of a custom op's mutated argument: without
            # this, a saved user of the logits would read the gradient instead of failing.
            torch.autograd.graph.increment_version(logits)
    else:  # the kernels write rows densely: compute aside, then copy into the strided buffer
        ce, ntl, grad = _ops.ce_ntl_loss_and_grad(logits.contiguous(), *args)
        logits.copy_(grad)
    return ce, ntl, logits


def scale_gradient_(grad: Tensor, grad_output: Tensor) -> Tensor:
    """``grad *= grad_output`` in place and return ``grad``; ``grad_output`` is a 0-d tensor on
    ``grad``'s device, read there (no host sync on CUDA). Free when it is 1: no pass over ``grad``."""
    _ops.scale_gradient_(grad, grad_output)
    return grad
