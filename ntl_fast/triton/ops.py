"""The Triton backend's ``torch.library`` ops, their fake implementations and their autograd.

Every op of the backend is defined here, and so is every forward/backward pairing
(``register_autograd``): the kernels (``cross_entropy_with_ntl``, ``number_token_loss``,
``_common``) know nothing of autograd. The fakes let ``torch.compile(fullgraph=True)`` trace
through each op.

Ops (namespace ``ntl_fast``), ``tables`` = the 7 tensors of ``NumberTokenTable.kernel_tensors()``
and the options those of :func:`~ntl_fast.triton._common.loss_options`:

* ``triton_ntl_forward`` -> (ntl, stats), differentiable through ``triton_ntl_backward``;
* ``triton_ce_ntl_forward`` -> (ce, ntl, stats), differentiable through ``triton_ce_ntl_backward``
  or, with ``inplace``, its twin ``triton_ce_ntl_backward_`` that writes into the logits;
* ``triton_ce_ntl_loss_and_grad`` -> (ce, ntl, grad) and ``triton_ce_ntl_loss_and_grad_`` -> (ce,
  ntl) with the gradient written into the logits: loss and gradient in one pass, not differentiable;
* ``triton_scale_gradient_``: ``grad *= grad_output`` in place, ``grad_output`` read on the device.
"""

from __future__ import annotations

from typing import List, Tuple

import torch
import triton
from torch import Tensor

from ..config import accumulation_dtype
from . import _common
from ._common import check_row_inputs
from .cross_entropy_with_ntl import launch_ce_ntl_backward, launch_ce_ntl_forward
from .number_token_loss import launch_ntl_backward, launch_ntl_forward

__all__ = ["ntl_forward", "ntl_backward", "ce_ntl_forward", "ce_ntl_backward", "ce_ntl_backward_",
           "ce_ntl_loss_and_grad", "ce_ntl_loss_and_grad_", "scale_gradient_"]


OPTIONS_SCHEMA = ("str loss, bool squash, float squash_min, float squash_scale, bool reweigh, float reweigh_constant, "
                  "float? gaussian_sigma, int ignore_index")


def _op(name: str, inputs: str, outputs: str, extra: str = "", mutates=()):
    """Defines ``ntl_fast::triton_<name>``: ``inputs`` (schema text), the table tensors, the loss
    options of :func:`~ntl_fast.triton._common.loss_options` (written here once) and ``extra``."""
    schema = f"({inputs}, Tensor[] tables, {OPTIONS_SCHEMA}{extra}) -> {outputs}"
    return torch.library.custom_op(f"ntl_fast::triton_{name}", mutates_args=mutates, schema=schema)


def _rows(logits: Tensor, count: int) -> List[Tensor]:
    """``count`` new per-row tensors in the accumulation dtype."""
    dtype = accumulation_dtype(logits.dtype)
    return [logits.new_empty(logits.shape[:1], dtype=dtype) for _ in range(count)]


def _stats(logits: Tensor) -> Tensor:
    return logits.new_zeros((3,) + tuple(logits.shape[:1]), dtype=accumulation_dtype(logits.dtype))


# ------------------------------------------------------------------------------ NTL
@_op("ntl_forward", "Tensor logits, Tensor labels", "(Tensor, Tensor)")
def ntl_forward(logits: Tensor, labels: Tensor, tables: List[Tensor], *options) -> Tuple[Tensor, Tensor]:
    """Per-row NTL ``(M,)`` and the row statistics the backward reads with reweigh: ``(3, M)`` =
    row max, ``log Σ_V exp(z - max)`` and the same over the non-number tokens (zeros without
    reweigh)."""
    check_row_inputs(logits, labels, options[0])
    (ntl,), stats = _rows(logits, 1), _stats(logits)
    launch_ntl_forward(logits, labels, tables, options, ntl, stats)
    return ntl, stats


@ntl_forward.register_fake
def _(logits, labels, tables, *options):
    return _rows(logits, 1)[0], _stats(logits)


@_op("ntl_backward", "Tensor grad_ntl, Tensor logits, Tensor labels, Tensor stats", "Tensor")
def ntl_backward(grad_ntl: Tensor, logits: Tensor, labels: Tensor, stats: Tensor, tables: List[Tensor],
                 *options) -> Tensor:
    """``grad_ntl[i] * ∂NTL_i/∂logits[i]`` as an ``(M, V)`` tensor of the logits' dtype."""
    # without reweigh only the K number columns are non-zero
    reweigh = options[4]  # in the order of loss_options
    grad = (torch.empty_like if reweigh else torch.zeros_like)(logits, memory_format=torch.contiguous_format)
    launch_ntl_backward(grad, grad_ntl, logits, labels, stats, tables, options)
    return grad


@ntl_backward.register_fake
def _(grad_ntl, logits, labels, stats, tables, *options):
    return logits.new_empty(logits.shape)


def _ntl_setup_context(ctx, inputs, output):
    logits, labels, tables, *options = inputs
    ctx.save_for_backward(logits, labels, output[1], *tables)
    ctx.options = options


def _ntl_backward(ctx, grad_ntl, grad_stats):
    logits, labels, stats, *tables = ctx.saved_tensors
    if grad_ntl is None:
        grad_ntl = torch.zeros_like(stats[0])
    grad = ntl_backward(grad_ntl, logits, labels, stats, tables, *ctx.options)
    return (grad, None, [None] * len(tables)) + (None,) * len(ctx.options)


ntl_forward.register_autograd(_ntl_backward, setup_context=_ntl_setup_context)


# ------------------------------------------------------------------------------ CE + NTL, two passes
@_op("ce_ntl_forward", "Tensor logits, Tensor labels", "(Tensor, Tensor, Tensor)", extra=", bool inplace")
def ce_ntl_forward(logits: Tensor, labels: Tensor, tables: List[Tensor], *options_and_inplace
                   ) -> Tuple[Tensor, Tensor, Tensor]:
    """Per-row CE and NTL, each ``(M,)`` float32 (float64 for float64 logits), and the row
    statistics the backward reads: ``(3, M)`` = row max (0 where not finite), ``log Σ_V exp(z -
    max)``, and the same over the non-number tokens (``LSE_V`` = the first two summed).

    ``inplace`` only selects the backward (:func:`ce_ntl_backward_`); the forward never writes
    the logits.
    """
    options = options_and_inplace[:-1]
    check_row_inputs(logits, labels, options[0])
    (ce, ntl), stats = _rows(logits, 2), _stats(logits)
    launch_ce_ntl_forward(logits, labels, tables, options, ce, ntl, stats)
    return ce, ntl, stats


@ce_ntl_forward.register_fake
def _(logits, labels, tables, *options):
    return (*_rows(logits, 2), _stats(logits))


_BACKWARD_INPUTS = "Tensor grad_ce, Tensor grad_ntl, Tensor{} logits, Tensor labels, Tensor stats"


@_op("ce_ntl_backward", _BACKWARD_INPUTS.format(""), "Tensor")
def ce_ntl_backward(grad_ce: Tensor, grad_ntl: Tensor, logits: Tensor, labels: Tensor, stats: Tensor,
                    tables: List[Tensor], *options) -> Tensor:
    """``grad_ce (p - target) + grad_ntl ∂NTL/∂z`` per row, a new ``(M, V)`` tensor."""
    grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    launch_ce_ntl_backward(grad, grad_ce, grad_ntl, logits, labels, stats, tables, options)
    return grad


@ce_ntl_backward.register_fake
def _(grad_ce, grad_ntl, logits, labels, stats, tables, *options):
    return logits.new_empty(logits.shape)


@_op("ce_ntl_backward_", _BACKWARD_INPUTS.format("(a!)"), "()", mutates=("logits",))
def ce_ntl_backward_(grad_ce: Tensor, grad_ntl: Tensor, logits: Tensor, labels: Tensor, stats: Tensor,
                     tables: List[Tensor], *options) -> None:
    """:func:`ce_ntl_backward` written into ``logits`` itself (saves an (M, V) allocation).

    Hazard: afterwards ``logits`` holds the gradient, not the logits; anything else that reads
    them (a second loss on the same logits, logging, a leaf's ``.grad`` aliasing its data) sees
    gradients.
    """
    launch_ce_ntl_backward(logits, grad_ce, grad_ntl, logits, labels, stats, tables, options)


def _ce_ntl_setup_context(ctx, inputs, output):
    logits, labels, tables, *options, inplace = inputs
    ctx.save_for_backward(logits, labels, output[2], *tables)
    ctx.options = options
    ctx.inplace = inplace


def _ce_ntl_backward(ctx, grad_ce, grad_ntl, grad_stats):
    logits, labels, stats, *tables = ctx.saved_tensors
    grad_ce = torch.zeros_like(stats[0]) if grad_ce is None else grad_ce
    grad_ntl = torch.zeros_like(stats[0]) if grad_ntl is None else grad_ntl
    if ctx.inplace:
        ce_ntl_backward_(grad_ce, grad_ntl, logits, labels, stats, tables, *ctx.options)
        grad = logits
    else:
        grad = ce_ntl_backward(grad_ce, grad_ntl, logits, labels, stats, tables, *ctx.options)
    return (grad, None, [None] * len(tables)) + (None,) * (len(ctx.options) + 1)


ce_ntl_forward.register_autograd(_ce_ntl_backward, setup_context=_ce_ntl_setup_context)


# ------------------------------------------------------------------------------ CE + NTL, one pass
_ONE_PASS_INPUTS = "Tensor{} logits, Tensor labels, Tensor ce_scale, Tensor ntl_scale"


@_op("ce_ntl_loss_and_grad", _ONE_PASS_INPUTS.format(""), "(Tensor, Tensor, Tensor)")
def ce_ntl_loss_and_grad(logits: Tensor, labels: Tensor, ce_scale: Tensor, ntl_scale: Tensor, tables: List[Tensor],
                         *options) -> Tuple[Tensor, Tensor, Tensor]:
    """Per-row CE and NTL and ``d(Σ ce_scale·ce + Σ ntl_scale·ntl)/d logits`` (logits' dtype),
    from one kernel. Rows whose two scales are 0 read nothing: zero losses, zero gradient."""
    check_row_inputs(logits, labels, options[0])
    ce, ntl = _rows(logits, 2)
    grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    launch_ce_ntl_forward(logits, labels, tables, options, ce, ntl, grad=grad, scales=(ce_scale, ntl_scale))
    return ce, ntl, grad


@ce_ntl_loss_and_grad.register_fake
def _(logits, labels, ce_scale, ntl_scale, tables, *options):
    return (*_rows(logits, 2), logits.new_empty(logits.shape))


@_op("ce_ntl_loss_and_grad_", _ONE_PASS_INPUTS.format("(a!)"), "(Tensor, Tensor)", mutates=("logits",))
def ce_ntl_loss_and_grad_(logits: Tensor, labels: Tensor, ce_scale: Tensor, ntl_scale: Tensor, tables: List[Tensor],
                          *options) -> Tuple[Tensor, Tensor]:
    """:func:`ce_ntl_loss_and_grad` with the gradient written over the (contiguous) logits."""
    check_row_inputs(logits, labels, options[0])
    if not logits.is_contiguous():
        raise ValueError("the gradient can only overwrite contiguous logits")
    ce, ntl = _rows(logits, 2)
    launch_ce_ntl_forward(logits, labels, tables, options, ce, ntl, grad=logits, scales=(ce_scale, ntl_scale))
    return ce, ntl


@ce_ntl_loss_and_grad_.register_fake
def _(logits, labels, ce_scale, ntl_scale, tables, *options):
    return tuple(_rows(logits, 2))


# ------------------------------------------------------------------------------ gradient scale
SCALE_BLOCK = 4096


@torch.library.custom_op("ntl_fast::triton_scale_gradient_", mutates_args=("grad",))
def scale_gradient_(grad: Tensor, grad_output: Tensor) -> None:
    """``grad *= grad_output`` in place (``grad`` contiguous, ``grad_output`` one element on its
    device, read there: no host synchronisation, and nothing but a launch when it is 1)."""
    if not grad.is_contiguous() or grad_output.numel() != 1:
        raise ValueError("scale_gradient_ takes a contiguous gradient and a one-element grad_output")
    if grad.numel():
        _common.scale_kernel[(triton.cdiv(grad.numel(), SCALE_BLOCK),)](
            grad, grad.numel(), grad_output.reshape(1), BLOCK=SCALE_BLOCK, num_warps=8
        )


@scale_gradient_.register_fake
def _(grad, grad_output):
    return None
