"""The compiled C++/CUDA backend: the ``ntl_fast::*`` operators of ``csrc/``.

The schemas live in ``csrc/ntl_fast.cpp`` and the kernels in ``csrc/cpu`` and ``csrc/cuda``; this
module only registers what Python must (fake kernels for ``torch.compile``, autograd) and exposes
the backend interface of :mod:`ntl_fast.backends`: ``ntl_rows``, ``ce_ntl_rows`` (the semantics
of :mod:`ntl_fast.reference`) and ``unsupported_reason``, plus ``ce_ntl_loss_and_grad`` (losses and
gradient in one pass, for reductions "mean" and "sum") where ``fuses_loss_and_grad`` says so.

Importing it raises ImportError when the extension has not been built.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .config import LossConfig
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


def unsupported_reason(device) -> Optional[str]:
    """None when the compiled operators serve ``device``, else why they cannot."""
    device = torch.device(device)
    if device.type == "cpu":
        return None
    if device.type == "cuda":
        if torch._C._dispatch_has_kernel_for_dispatch_key("ntl_fast::ce_ntl_forward", "CUDA"):
            return None
        return "ntl_fast._C was built without CUDA kernels (rebuild with a CUDA torch)"
    return f"the compiled operators do not serve {device.type} tensors"


def fuses_loss_and_grad(logits: Tensor) -> bool:
    """Whether :func:`ce_ntl_loss_and_grad` serves these logits: CPU only (the op has no CUDA kernel)."""
    return logits.device.type == "cpu"


def scale_gradient_(grad: Tensor, grad_output: Tensor) -> Tensor:
    """``grad *= grad_output`` in place (``grad_output`` a 0-d tensor on grad's device); returns ``grad``."""
    return grad.mul_(grad_output)


# --------------------------------------------------------------------------------- op arguments
def _table_args(table: NumberTokenTable) -> Tuple[Tensor, ...]:
    return (table.number_ids, table.number_values, table.number_index, table.value_order,
            table.sorted_gaps)


def _option_args(table: NumberTokenTable, config: LossConfig) -> tuple:
    constant = table.reweigh_constant(config.loss, config.squash_factor) if config.reweigh else 0.0
    return (config.loss, config.squash_factor, table.min_distance, table.max_distance,
            config.reweigh, constant, config.gaussian_sigma, config.ignore_index)


_NUM_TABLE = 5
_NUM_OPTIONS = 8


# --------------------------------------------------------------------------------- fake kernels
_ROW_STATS = 5  # values per row that a forward saves for its backward (RowStats, csrc/ntl_math.h)


def _row_like(logits: Tensor, *width: int) -> Tensor:
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    return logits.new_empty(logits.shape[:1] + tuple(width), dtype=dtype)


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


# --------------------------------------------------------------------------------- autograd
def _row_grad(grad: Optional[Tensor], row_stats: Tensor) -> Tensor:
    return row_stats.new_zeros(row_stats.shape[:1]) if grad is None else grad


def _ntl_setup(ctx, inputs, output):
    logits, labels = inputs[:2]
    table = inputs[2:2 + _NUM_TABLE]
    ctx.options = inputs[2 + _NUM_TABLE:]
    _, row_stats = output
    ctx.save_for_backward(logits, labels, row_stats, *table)


def _ntl_backward(ctx, grad_ntl, grad_row_stats):
    logits, labels, row_stats, *table = ctx.saved_tensors
    grad_logits = None
    if ctx.needs_input_grad[0]:
        grad_logits = _ops.ntl_backward(
            _row_grad(grad_ntl, row_stats), logits, labels, row_stats, *table, *ctx.options
        )
    return (grad_logits,) + (None,) * (1 + _NUM_TABLE + _NUM_OPTIONS)


def _ce_ntl_setup(ctx, inputs, output):
    logits, labels = inputs[:2]
    table = inputs[2:2 + _NUM_TABLE]
    ctx.options = inputs[2 + _NUM_TABLE:2 + _NUM_TABLE + _NUM_OPTIONS]
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
            _ops.ce_ntl_backward_(logits, grad_ce, grad_ntl, labels, row_stats, *table, *ctx.options)
            # The dispatcher does not bump the version of a custom op's mutated argument here.
            torch.autograd.graph.increment_version(logits)
            grad_logits = logits
        else:
            grad_logits = _ops.ce_ntl_backward(
                grad_ce, grad_ntl, logits, labels, row_stats, *table, *ctx.options
            )
    return (grad_logits,) + (None,) * (1 + _NUM_TABLE + _NUM_OPTIONS + 1)


torch.library.register_autograd("ntl_fast::ntl_forward", _ntl_backward, setup_context=_ntl_setup)
torch.library.register_autograd("ntl_fast::ce_ntl_forward", _ce_ntl_backward, setup_context=_ce_ntl_setup)


# --------------------------------------------------------------------------------- backend API
def _contiguous(logits: Tensor) -> Tensor:
    return logits if logits.is_contiguous() else logits.contiguous()


def ntl_rows(logits: Tensor, labels: Tensor, table: NumberTokenTable, config: LossConfig) -> Tensor:
    """Per-position NTL ``(M,)``: 0 off the NTL-valid positions, NaN at bad labels."""
    loss, _ = _ops.ntl_forward(
        _contiguous(logits), labels, *_table_args(table), *_option_args(table, config)
    )
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
        _contiguous(logits), labels, *_table_args(table), *_option_args(table, config), inplace
    )
    return ce, ntl


def ce_ntl_loss_and_grad(
    logits: Tensor, labels: Tensor, table: NumberTokenTable, config: LossConfig, ce_scale: Tensor,
    ntl_scale: Tensor, inplace: bool = False,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Per-position CE and NTL ``(M,)`` and ``d(Σ ce_scale·ce + Σ ntl_scale·ntl)/d logits``, from one
    read of the logits (each row's gradient is written while the row is still in cache).

    Not differentiable itself: :func:`ntl_fast.cross_entropy_with_ntl` wraps it for the reductions
    whose per-row upstream gradients are known before the backward (``"mean"``, ``"sum"``).
    """
    ce, ntl, grad = _ops.ce_ntl_loss_and_grad(
        _contiguous(logits), labels, ce_scale, ntl_scale, *_table_args(table), *_option_args(table, config)
    )
    if inplace:  # the gradient ends in the logits' buffer (the op itself writes a new tensor)
        with torch.no_grad():
            grad = logits.copy_(grad)
    return ce, ntl, grad
