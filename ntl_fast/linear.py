"""CE + NTL straight from the LM head's input: ``hidden @ weight.T (+ bias)`` is never materialised.

For a large vocabulary the logits dominate training memory: M x V floats, and as much again for
their gradient (M = 4096 tokens, V = 32k: 0.5 GB each in float32). Here the rows are processed in
chunks. For ``reduction="mean"``/``"sum"`` the loss is a fixed linear combination of per-row
losses whose coefficients (weights over the global counts) are known before any logit exists, so
each chunk's gradient is computed in the forward pass, right after its logits, and folded into
``grad_hidden``, ``grad_weight`` and ``grad_bias``; the chunk's logits are freed before the next
one. The backward then only scales these by the incoming scalar gradient. For
``reduction="none"`` the upstream gradient is per row, so the backward recomputes each chunk.

Any backend serves the chunks through its ``ce_ntl_rows``, so the results equal
``cross_entropy_with_ntl(hidden @ weight.T + bias, labels, ...)``.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from .backends import explain_backend, get_backend
from .config import LossConfig, check_reduction
from .functional import (
    _FLOAT_DTYPES, NTLOutput, Normalizer, _check_inputs, _check_values, _float_weights, _ignore_zero_weight,
    _is_compiling, _row_scale,
)
from .reference import accumulation_dtype, label_positions
from .table import NumberTokenTable

__all__ = ["linear_cross_entropy_with_ntl", "default_chunk_size"]

_CHUNK_BYTES = 64 << 20  # float32 logits of one chunk; the backend's temporaries scale with it


def default_chunk_size(num_rows: int, vocab_size: int) -> int:
    """Rows per chunk: about 64 MiB of float32 logits (e.g. 522 rows for V = 32,128)."""
    rows = max(1, _CHUNK_BYTES // (4 * vocab_size))
    if rows >= 64:
        rows -= rows % 32  # friendlier matmul shapes
    return min(rows, num_rows)


def _chunk_pass(
    hidden: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    labels: Tensor,
    table: NumberTokenTable,
    config: LossConfig,
    backend,
    ce_scale: Tensor,
    ntl_scale: Tensor,
    ntl_weight: Union[float, Tensor],
    chunk_size: int,
    needs: Tuple[bool, bool, bool],
    rows_out: Optional[Tuple[Tensor, Tensor]] = None,
):
    """One sweep over the row chunks.

    Accumulates ``Σ ce_r · ce_scale_r`` and ``Σ ntl_r · ntl_scale_r`` and, where ``needs`` asks,
    the gradients of ``Σ ce_r ce_scale_r + ntl_weight Σ ntl_r ntl_scale_r`` with respect to
    hidden, weight and bias. ``rows_out`` receives the unscaled per-row losses when given.
    """
    num_rows = hidden.shape[0]
    need_hidden, need_weight, need_bias = needs
    want_grad = need_hidden or need_weight or need_bias
    acc = accumulation_dtype(hidden.dtype)
    # a float32 accumulator across chunks for half-precision parameters (one rounding at the end)
    param_acc = acc if weight.dtype in (torch.bfloat16, torch.float16) else weight.dtype
    ce_total = torch.zeros((), dtype=acc, device=hidden.device)
    ntl_total = torch.zeros((), dtype=acc, device=hidden.device)
    grad_hidden = torch.empty_like(hidden) if need_hidden else None
    grad_weight = torch.zeros(weight.shape, dtype=param_acc, device=weight.device) if need_weight else None
    grad_bias = torch.zeros(bias.shape, dtype=param_acc, device=bias.device) if need_bias else None
    for start in range(0, num_rows, chunk_size):
        end = min(start + chunk_size, num_rows)
        rows_hidden = hidden[start:end]
        with torch.no_grad():
            logits = torch.nn.functional.linear(rows_hidden, weight, bias)
        with torch.enable_grad():
            logits.requires_grad_(want_grad)
            # the chunk's logits are private to this sweep, so a kernel may reuse their buffer
            ce_rows, ntl_rows = backend.ce_ntl_rows(logits, labels[start:end], table, config, inplace=True)
            ce_part = (ce_rows * ce_scale[start:end]).sum()
            ntl_part = (ntl_rows * ntl_scale[start:end]).sum()
            if want_grad:
                (grad_logits,) = torch.autograd.grad(ce_part + ntl_weight * ntl_part, logits)
        ce_total += ce_part.detach()
        ntl_total += ntl_part.detach()
        if rows_out is not None:
            rows_out[0][start:end] = ce_rows.detach()
            rows_out[1][start:end] = ntl_rows.detach()
        del logits, ce_rows, ntl_rows, ce_part, ntl_part
        if not want_grad:
            continue
        if need_hidden:
            torch.mm(grad_logits, weight, out=grad_hidden[start:end])
        if need_weight:
            if param_acc == weight.dtype:
                grad_weight.addmm_(grad_logits.t(), rows_hidden)
            else:
                grad_weight += (grad_logits.t() @ rows_hidden).to(param_acc)
        if need_bias:
            grad_bias += grad_logits.sum(0, dtype=param_acc)
        del grad_logits
    return ce_total, ntl_total, grad_hidden, grad_weight, grad_bias


def _scaled(grad: Optional[Tensor], factor: Tensor, dtype: torch.dtype) -> Optional[Tensor]:
    return None if grad is None else (grad * factor.to(grad.dtype)).to(dtype)


class _LinearCrossEntropyWithNTL(torch.autograd.Function):
    """Chunked CE + NTL of ``hidden (M, H) @ weight (V, H).T + bias`` against ``labels (M,)``.

    Outputs ``(loss, ce, ntl)``: scalars, or per-row tensors when ``per_row`` (reduction "none").
    Only ``loss`` is differentiable.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, ce_factor, ntl_factor, ntl_weight, table, config,
                backend, chunk_size, per_row):
        needs = tuple(ctx.needs_input_grad[:3])
        ctx.backend, ctx.table, ctx.config, ctx.chunk_size, ctx.per_row = (
            backend, table, config, chunk_size, per_row,
        )
        ctx.ntl_weight = ntl_weight
        if per_row:
            num_rows = hidden.shape[0]
            acc = ce_factor.dtype
            rows = (torch.empty(num_rows, dtype=acc, device=hidden.device),
                    torch.empty(num_rows, dtype=acc, device=hidden.device))
            _chunk_pass(hidden, weight, bias, labels, table, config, backend, ce_factor, ntl_factor,
                        ntl_weight, chunk_size, (False, False, False), rows_out=rows)
            ctx.save_for_backward(hidden, weight, bias, labels, ce_factor, ntl_factor)
            ctx.needs = needs
            ce = rows[0] * ce_factor
            ntl = rows[1] * ntl_factor
            total = ce + ntl_weight * ntl
        else:
            ce, ntl, ctx.grad_hidden, ctx.grad_weight, ctx.grad_bias = _chunk_pass(
                hidden, weight, bias, labels, table, config, backend, ce_factor, ntl_factor,
                ntl_weight, chunk_size, needs,
            )
            ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
            ctx.consumed = False
            total = ce + ntl_weight * ntl
        ctx.mark_non_differentiable(ce, ntl)
        return total, ce, ntl

    @staticmethod
    def backward(ctx, grad_total, _grad_ce, _grad_ntl):
        if ctx.per_row:
            hidden, weight, bias, labels, ce_factor, ntl_factor = ctx.saved_tensors
            upstream = grad_total.to(ce_factor.dtype)
            _, _, grad_hidden, grad_weight, grad_bias = _chunk_pass(
                hidden, weight, bias, labels, ctx.table, ctx.config, ctx.backend,
                ce_factor * upstream, ntl_factor * upstream, ctx.ntl_weight, ctx.chunk_size, ctx.needs,
            )
            grad_weight = None if grad_weight is None else grad_weight.to(weight.dtype)
            grad_bias = None if grad_bias is None else grad_bias.to(bias.dtype)
        else:
            if ctx.consumed:
                # the gradients were precomputed in the forward and released after the first use
                raise RuntimeError(
                    "linear_cross_entropy_with_ntl: backward through the same loss twice "
                    "(retain_graph=True) is not supported with reduction='mean'/'sum'; recompute the loss"
                )
            ctx.consumed = True
            hidden_dtype, weight_dtype, bias_dtype = ctx.dtypes
            grad_hidden = _scaled(ctx.grad_hidden, grad_total, hidden_dtype)
            grad_weight = _scaled(ctx.grad_weight, grad_total, weight_dtype)
            grad_bias = _scaled(ctx.grad_bias, grad_total, bias_dtype)
            ctx.grad_hidden = ctx.grad_weight = ctx.grad_bias = None
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None, None, None, None, None


def _check_linear(hidden: Tensor, weight: Tensor, bias: Optional[Tensor]) -> None:
    if not isinstance(hidden, Tensor):
        raise TypeError(f"hidden must be a Tensor, got {type(hidden).__name__}")
    if not isinstance(weight, Tensor):
        raise TypeError(f"weight must be a Tensor, got {type(weight).__name__}")
    if hidden.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"hidden must be float32, bfloat16, float16 or float64, got {hidden.dtype}")
    if hidden.dim() < 1 or hidden.numel() == 0:
        raise ValueError(f"hidden must be a non-empty (..., H) tensor, got shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"weight must be (V, H) with H = hidden.shape[-1] = {hidden.shape[-1]}, got {tuple(weight.shape)}"
        )
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight is {weight.dtype} but hidden {hidden.dtype}: cast one (or use autocast)")
    if weight.device != hidden.device:
        raise ValueError(f"weight is on {weight.device} but hidden on {hidden.device}")
    if bias is not None:
        if not isinstance(bias, Tensor):
            raise TypeError(f"bias must be a Tensor or None, got {type(bias).__name__}")
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"bias must be ({weight.shape[0]},), got {tuple(bias.shape)}")
        if bias.dtype != hidden.dtype or bias.device != hidden.device:
            raise ValueError(f"bias must be {hidden.dtype} on {hidden.device}, got {bias.dtype} on {bias.device}")


def linear_cross_entropy_with_ntl(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    table: NumberTokenTable,
    *,
    bias: Optional[Tensor] = None,
    ntl_weight: Union[float, Tensor] = 0.3,
    loss: str = "was",
    gaussian_sigma: Optional[float] = None,
    ce_normalizer: Normalizer = None,
    ntl_normalizer: Normalizer = None,
    squash_factor: Optional[float] = None,
    reweigh: bool = False,
    reduction: str = "mean",
    weights: Optional[Tensor] = None,
    ignore_index: int = -100,
    shift_labels: bool = False,
    validate: bool = True,
    backend: str = "auto",
    chunk_size: Optional[int] = None,
) -> NTLOutput:
    """:func:`ntl_fast.cross_entropy_with_ntl` of ``hidden @ weight.T + bias``, without the logits.

    ``hidden (..., H)`` is the LM head's input, ``weight (V, H)`` (and ``bias (V,)``) its
    parameters, ``labels (...)``. The rows are processed ``chunk_size`` at a time (default: about
    64 MiB of float32 logits per chunk), so peak memory holds one chunk of logits instead of all
    M x V of them and their gradient. Gradients flow to ``hidden``, ``weight`` and ``bias``.
    Under ``torch.autocast`` the three are cast to the autocast dtype first, as ``F.linear``
    would. Every other option means what it means in :func:`ntl_fast.cross_entropy_with_ntl`.

    Args:
        hidden (Tensor): ``(..., H)`` float32, bfloat16, float16 or float64.
        weight (Tensor): ``(V, H)``, the LM head's weight, same dtype and device as ``hidden``.
        labels (Tensor): ``(...)`` int64 or int32 token ids in ``[0, V)``, or ``ignore_index``.
        table (NumberTokenTable): on the device of ``hidden``; ``V >= table.vocab_size``.
        bias (Tensor, optional): ``(V,)``, the LM head's bias. Default None.
        chunk_size (int, optional): rows per chunk, >= 1. Default: about 64 MiB of float32
            logits (:func:`default_chunk_size`).
        ntl_weight, loss, gaussian_sigma, ce_normalizer, ntl_normalizer, squash_factor, reweigh,
        reduction, weights, ignore_index, shift_labels, validate, backend: as
            :func:`ntl_fast.cross_entropy_with_ntl` (defaults 0.3, ``"was"``, None, None, None,
            None, False, ``"mean"``, None, -100, False, True, ``"auto"``).

    Returns:
        NTLOutput: ``(loss, ce, ntl)`` as :func:`ntl_fast.cross_entropy_with_ntl`. With
        ``"mean"``/``"sum"`` the gradients are computed during the forward and only scaled in the
        backward, so a second backward through the same loss raises ``RuntimeError``.

    Raises:
        TypeError: non-tensor or mismatched dtypes of ``hidden``, ``weight``, ``bias``; a
            non-numeric ``ntl_weight``; and the errors of :func:`ntl_fast.cross_entropy_with_ntl`.
        ValueError: ``weight`` not ``(V, H)``, ``bias`` not ``(V,)``, devices that differ, an
            invalid ``chunk_size``, and the errors of :func:`ntl_fast.cross_entropy_with_ntl`.
    """
    if isinstance(ntl_weight, bool) or not isinstance(ntl_weight, (int, float, Tensor)):
        raise TypeError(f"ntl_weight must be a number, got {ntl_weight!r}")
    if isinstance(ntl_weight, Tensor):
        ntl_weight = ntl_weight.detach()
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                   or chunk_size < 1):
        raise ValueError(f"chunk_size must be an int >= 1 or None, got {chunk_size!r}")
    config = LossConfig(loss, squash_factor, reweigh, gaussian_sigma, ignore_index)
    check_reduction(reduction)
    if isinstance(hidden, Tensor) and torch.is_autocast_enabled(hidden.device.type):
        dtype = torch.get_autocast_dtype(hidden.device.type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    _check_linear(hidden, weight, bias)
    vocab_size = weight.shape[0]
    # a zero-stride stand-in for the logits lets the shared checks run without allocating them
    logits_shape = hidden.new_empty(()).expand(*hidden.shape[:-1], vocab_size)
    _check_inputs(logits_shape, labels, table, weights)
    weights = _float_weights(weights)
    if shift_labels:
        if hidden.dim() < 2 or hidden.shape[-2] < 2:
            raise ValueError(
                f"shift_labels=True needs hidden of shape (..., T, H) with T >= 2, got {tuple(hidden.shape)}"
            )
        hidden, labels = hidden[..., :-1, :], labels[..., 1:]
        weights = None if weights is None else weights[..., 1:]
    if validate and not _is_compiling():
        _check_values(labels, vocab_size, ignore_index, weights)
    shape = labels.shape
    hidden2d = hidden.reshape(-1, hidden.shape[-1])
    labels1d = labels.reshape(-1)
    weights1d = None if weights is None else weights.reshape(-1)
    labels1d = _ignore_zero_weight(labels1d, weights1d, ignore_index)
    row_table = table.resized(vocab_size)
    acc = accumulation_dtype(hidden.dtype)
    in_range, _, number_index = label_positions(labels1d, row_table, ignore_index)
    # each row's share of the loss: weights over the means' counts ("none": the weights alone)
    scale_reduction = "sum" if reduction == "none" else reduction
    ce_factor = _row_scale(in_range, weights1d, scale_reduction, ce_normalizer, acc)
    ntl_factor = _row_scale(number_index >= 0, weights1d, scale_reduction, ntl_normalizer, acc)
    chunk = chunk_size or default_chunk_size(hidden2d.shape[0], vocab_size)
    choice = explain_backend(hidden2d.device, backend)
    total, ce, ntl = _LinearCrossEntropyWithNTL.apply(
        hidden2d, weight, bias, labels1d, ce_factor, ntl_factor, ntl_weight, row_table, config,
        get_backend(choice.name), chunk, reduction == "none",
    )
    if reduction == "none":
        total, ce, ntl = total.view(shape), ce.view(shape), ntl.view(shape)
    return NTLOutput(total, ce, ntl)
