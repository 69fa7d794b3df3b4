"""The loss and its gradient in one pass over the logits, for any backend (:class:`~ntl_fast.backends.Backend`).

Under reduction ``"mean"`` or ``"sum"`` every row's upstream gradients are ``ce_scale[r]·g`` and
``ntl_scale[r]·g`` with one scalar ``g = grad_output``, known up to ``g`` before the backward. So
the backend's ``ce_ntl_loss_and_grad`` writes ``d(Σ ce_scale·ce + Σ ntl_scale·ntl)/d logits`` while
it computes the losses (one read of the logits, one write of the gradient), and the backward only
multiplies by ``g`` — on the device, through the backend's ``scale_gradient_``.
"""

from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

from .backends import Backend
from .config import LossConfig
from .table import NumberTokenTable

__all__ = ["cross_entropy_with_ntl_and_gradient"]


class _CrossEntropyWithNTLAndGradient(torch.autograd.Function):
    """``Σ ce_scale·ce + Σ ntl_scale·ntl`` whose logits gradient the backend writes in the forward.

    Outputs ``(total, ce_rows, ntl_rows)``; only ``total`` is differentiable.
    """

    @staticmethod
    def forward(ctx, logits, labels, ce_scale, ntl_scale, table, config, backend, inplace):
        ce_rows, ntl_rows, grad = backend.ce_ntl_loss_and_grad(
            logits, labels, table, config, ce_scale, ntl_scale, inplace=inplace
        )
        if inplace:
            # another user that saved these logits for its backward now fails loudly instead of
            # reading the gradient
            torch.autograd.graph.increment_version(logits)
        # saved, not kept on ctx: released right after the backward, the returned gradient can then
        # become logits.grad without a copy
        ctx.save_for_backward(grad)
        ctx.backend = backend
        ctx.mark_non_differentiable(ce_rows, ntl_rows)
        total = (ce_scale * ce_rows).sum() + (ntl_scale * ntl_rows).sum()
        return total, ce_rows, ntl_rows

    @staticmethod
    def backward(ctx, grad_total, _grad_ce_rows, _grad_ntl_rows):
        (grad,) = ctx.saved_tensors
        if torch.compiler.is_compiling():
            grad = (grad * grad_total).to(grad.dtype)
        elif grad.device.type != "cpu" or grad_total.item() != 1:  # reading a CPU scalar costs no sync
            grad = ctx.backend.scale_gradient_(grad, grad_total)
        return grad, None, None, None, None, None, None, None


def cross_entropy_with_ntl_and_gradient(
    logits2d: Tensor,
    labels1d: Tensor,
    table: NumberTokenTable,
    config: LossConfig,
    ce_scale: Tensor,
    ntl_scale: Tensor,
    backend: Backend,
    inplace: bool = False,
) -> Tuple[Tensor, Tensor, Tensor]:
    """``(total, ce_rows, ntl_rows)``: ``total = Σ ce_scale·ce + Σ ntl_scale·ntl``, differentiable
    with respect to ``logits2d`` through the gradient ``backend`` computed in the forward; the rows
    ``(M,)`` are detached.

    ``inplace=True`` writes that gradient over the logits (eager mode only; ignored while
    ``torch.compile`` traces): they hold the gradient, not the logits, from the forward on. The
    caller checks that the backend fuses these logits (``backend.fuses_loss_and_grad``) and that
    nothing but ``logits2d`` needs a gradient.
    """
    inplace = bool(inplace) and not torch.compiler.is_compiling()
    return _CrossEntropyWithNTLAndGradient.apply(
        logits2d, labels1d, ce_scale, ntl_scale, table, config, backend, inplace
    )
