"""Cross-entropy (or Gaussian-CE) fused with the Number Token Loss (docs/math.md §2), in Triton.

Forward, per row: ONE pass over the vocabulary in BLOCK_V chunks (online max / log-sum-exp), plus
a gather of the label column and of the K number-token columns; it writes CE, NTL and the row
statistics saved for the backward (row max and log-sums, so that ``p_k`` is formed from ``z_k -
max``, never from a rounded ``LSE_V``; the number-token terms are recomputed there from the K
columns, which costs nothing next to the row).

Backward, per row: one more read of the row and one write of its gradient,
``grad_ce (p - target) + grad_ntl ∂NTL/∂z``. The dense part ``a p_k`` is written for every column
(``a = grad_ce``, minus ``grad_ntl (L - c) m`` with reweigh); after a barrier, the K number
columns and the label column are overwritten with their exact values, computed from logits that
were read before any write (so the same kernel can write the gradient into the logits' buffer).

Ops: ``ntl_fast::triton_ce_ntl_forward``, ``ntl_fast::triton_ce_ntl_backward`` and its in-place
twin ``ntl_fast::triton_ce_ntl_backward_`` (mutates ``logits``).
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import (
    accumulation_dtype,
    check_row_inputs,
    kernel_options,
    launch_settings,
    number_columns,
    number_logits,
    number_token_terms,
    row_block,
    row_labels,
    row_logsumexp,
    scaled,
    store_dense_gradient,
)

__all__ = ["ce_ntl_forward", "ce_ntl_backward", "ce_ntl_backward_"]


@triton.jit
def _ce_ntl_forward_kernel(
    logits_ptr, stride_m, labels_ptr, stride_label,
    number_ids_ptr, number_values_ptr, number_index_ptr, value_order_ptr, value_rank_ptr, is_number_ptr,
    ce_ptr, ntl_ptr, stats_ptr,
    M, V, K, ignore_index, squash_min, squash_scale, reweigh_constant, sigma,
    LOSS: tl.constexpr, SQUASH: tl.constexpr, REWEIGH: tl.constexpr, GAUSSIAN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows, row_mask = row_block(M, BLOCK_M)
    row_ptrs = logits_ptr + rows * stride_m
    shift, log_sum, log_text = row_logsumexp(row_ptrs, V, is_number_ptr, ntl_ptr, BLOCK_V, REWEIGH)
    label, in_range, bad, valid, rank, y = row_labels(
        labels_ptr, stride_label, number_index_ptr, value_rank_ptr, number_values_ptr, rows, V,
        ignore_index,
    )
    ids, values, k_mask, next_ids, next_values, has_next = number_columns(
        number_ids_ptr, number_values_ptr, value_order_ptr, K, ntl_ptr, BLOCK_K
    )
    zn, zn_next = number_logits(row_ptrs, ids, k_mask, next_ids, has_next, shift, LOSS)
    lse_n, q, loss, dloss, target = number_token_terms(
        zn, zn_next, k_mask, has_next, values, next_values, rank, y.to(zn.dtype), squash_min, squash_scale, sigma,
        LOSS, SQUASH, GAUSSIAN, BLOCK_K,
    )
    if REWEIGH:
        mass = tl.exp(lse_n - log_sum)
        loss = mass * loss + reweigh_constant * tl.exp(log_text - log_sum)
    ce = log_sum - (tl.load(row_ptrs + label).to(log_sum.dtype) - shift)
    if GAUSSIAN:
        gaussian_ce = log_sum - tl.sum(target * tl.where(k_mask[None, :], zn, 0.0), axis=1)
        ce = tl.where(valid, gaussian_ce, ce)
    ce = tl.where(in_range, ce, 0.0)
    loss = tl.where(valid, loss, 0.0)
    tl.store(ce_ptr + rows, tl.where(bad, float("nan"), ce), mask=row_mask)
    tl.store(ntl_ptr + rows, tl.where(bad, float("nan"), loss), mask=row_mask)
    tl.store(stats_ptr + rows, shift, mask=row_mask)
    tl.store(stats_ptr + M + rows, log_sum, mask=row_mask)
    tl.store(stats_ptr + 2 * M + rows, log_text, mask=row_mask)


@triton.jit
def _ce_ntl_backward_kernel(
    logits_ptr, stride_m, grad_ptr, stride_gm, labels_ptr, stride_label, stats_ptr,
    grad_ce_ptr, grad_ntl_ptr,
    number_ids_ptr, number_values_ptr, number_index_ptr, value_order_ptr, value_rank_ptr, is_number_ptr,
    M, V, K, ignore_index, squash_min, squash_scale, reweigh_constant, sigma,
    LOSS: tl.constexpr, SQUASH: tl.constexpr, REWEIGH: tl.constexpr, GAUSSIAN: tl.constexpr,
    INPLACE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows, row_mask = row_block(M, BLOCK_M)
    row_ptrs = logits_ptr + rows * stride_m
    grad_row_ptrs = grad_ptr + rows * stride_gm
    shift = tl.load(stats_ptr + rows)
    log_sum = tl.load(stats_ptr + M + rows)
    label, in_range, bad, valid, rank, y = row_labels(
        labels_ptr, stride_label, number_index_ptr, value_rank_ptr, number_values_ptr, rows, V,
        ignore_index,
    )
    ids, values, k_mask, next_ids, next_values, has_next = number_columns(
        number_ids_ptr, number_values_ptr, value_order_ptr, K, stats_ptr, BLOCK_K
    )
    # every logit this program needs besides the streamed row, read before any gradient write
    zn, zn_next = number_logits(row_ptrs, ids, k_mask, next_ids, has_next, shift, LOSS)
    z_label = tl.load(row_ptrs + label).to(log_sum.dtype) - shift
    lse_n, q, loss, dloss, target = number_token_terms(
        zn, zn_next, k_mask, has_next, values, next_values, rank, y.to(zn.dtype), squash_min, squash_scale, sigma,
        LOSS, SQUASH, GAUSSIAN, BLOCK_K,
    )
    upstream_ce = tl.where(in_range, tl.load(grad_ce_ptr + rows).to(log_sum.dtype), 0.0)
    upstream_ntl = tl.where(valid, tl.load(grad_ntl_ptr + rows).to(log_sum.dtype), 0.0)
    p_n = tl.exp(zn - log_sum[:, None])
    # CE target over N: Gaussian (§2.5) or one-hot at a number label; 0 for other labels
    ce_target = tl.where(valid[:, None], target, 0.0)
    number_grad = scaled(upstream_ce[:, None], p_n - ce_target)
    if REWEIGH:
        # ∂L'/∂z_k = m ∂L/∂z_k + (L - c) p_k (1[k∈N] - m), with 1 - m the text mass
        mass = tl.exp(lse_n - log_sum)
        text_mass = tl.exp(tl.load(stats_ptr + 2 * M + rows) - log_sum)
        spread = loss - reweigh_constant
        dense = upstream_ce - scaled(upstream_ntl, spread * mass)
        number_grad += scaled(
            upstream_ntl[:, None], mass[:, None] * dloss + (spread * text_mass)[:, None] * p_n
        )
    else:
        dense = upstream_ce
        number_grad += scaled(upstream_ntl[:, None], dloss)
    # a label outside N: p_l - 1 (a number label is one of the K columns)
    label_grad = scaled(dense, tl.exp(z_label - log_sum)) - upstream_ce
    if INPLACE:
        tl.debug_barrier()  # the gathers above complete before the row is overwritten
    store_dense_gradient(row_ptrs, grad_row_ptrs, row_mask, V, shift, log_sum, dense, BLOCK_V)
    tl.debug_barrier()  # the exact values of K + 1 columns land after the dense write
    tl.store(
        grad_row_ptrs[:, None] + ids[None, :],
        number_grad.to(grad_ptr.dtype.element_ty),
        mask=row_mask[:, None] & k_mask[None, :],
    )
    tl.store(
        grad_row_ptrs + label,
        label_grad.to(grad_ptr.dtype.element_ty),
        mask=row_mask & in_range & (valid == 0),
    )


@torch.library.custom_op("ntl_fast::triton_ce_ntl_forward", mutates_args=())
def ce_ntl_forward(
    logits: Tensor, labels: Tensor, tables: List[Tensor],
    loss: str, squash: bool, squash_min: float, squash_scale: float,
    reweigh: bool, reweigh_constant: float, gaussian_sigma: Optional[float], ignore_index: int,
    inplace: bool,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Per-row CE and NTL, each ``(M,)`` float32 (float64 for float64 logits), and the row
    statistics the backward reads: ``(3, M)`` = row max (0 where not finite), ``log Σ_V exp(z -
    max)``, and the same over the non-number tokens (``LSE_V`` = the first two summed).

    ``tables`` = ``(number_ids, number_values, number_index, value_order, value_rank, is_number)``.
    ``inplace`` only selects the backward (:func:`ce_ntl_backward_`); the forward never writes
    the logits.
    """
    check_row_inputs(logits, labels, loss)
    num_rows, vocab_size = logits.shape
    dtype = accumulation_dtype(logits.dtype)
    ce, ntl = (torch.empty(num_rows, dtype=dtype, device=logits.device) for _ in range(2))
    stats = torch.empty((3, num_rows), dtype=dtype, device=logits.device)
    if num_rows == 0:
        return ce, ntl, stats
    scalars, switches = kernel_options(loss, squash, squash_min, squash_scale, reweigh,
                                        reweigh_constant, gaussian_sigma, ignore_index)
    num_numbers = tables[0].numel()
    settings = launch_settings(num_rows, vocab_size, num_numbers, full_row=True)
    grid = (triton.cdiv(num_rows, settings["BLOCK_M"]),)
    _ce_ntl_forward_kernel[grid](
        logits, logits.stride(0), labels, labels.stride(0), *tables, ce, ntl, stats,
        num_rows, vocab_size, num_numbers, *scalars, **switches, **settings,
    )
    return ce, ntl, stats


@ce_ntl_forward.register_fake
def _ce_ntl_forward_fake(logits, labels, tables, *options):
    dtype = accumulation_dtype(logits.dtype)
    rows = logits.shape[:1]
    return (logits.new_empty(rows, dtype=dtype), logits.new_empty(rows, dtype=dtype),
            logits.new_empty((3,) + tuple(rows), dtype=dtype))


def _launch_backward(grad, grad_ce, grad_ntl, logits, labels, stats, tables, options, inplace):
    num_rows, vocab_size = logits.shape
    if num_rows == 0:
        return
    scalars, switches = kernel_options(*options)
    num_numbers = tables[0].numel()
    settings = launch_settings(num_rows, vocab_size, num_numbers, full_row=True)
    grid = (triton.cdiv(num_rows, settings["BLOCK_M"]),)
    _ce_ntl_backward_kernel[grid](
        logits, logits.stride(0), grad, grad.stride(0), labels, labels.stride(0), stats.contiguous(),
        grad_ce.contiguous(), grad_ntl.contiguous(), *tables,
        num_rows, vocab_size, num_numbers, *scalars, **switches, INPLACE=inplace, **settings,
    )


@torch.library.custom_op("ntl_fast::triton_ce_ntl_backward", mutates_args=())
def ce_ntl_backward(
    grad_ce: Tensor, grad_ntl: Tensor, logits: Tensor, labels: Tensor, stats: Tensor,
    tables: List[Tensor],
    loss: str, squash: bool, squash_min: float, squash_scale: float,
    reweigh: bool, reweigh_constant: float, gaussian_sigma: Optional[float], ignore_index: int,
) -> Tensor:
    """``grad_ce (p - target) + grad_ntl ∂NTL/∂z`` per row, a new ``(M, V)`` tensor."""
    grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    options = (loss, squash, squash_min, squash_scale, reweigh, reweigh_constant, gaussian_sigma,
               ignore_index)
    _launch_backward(grad, grad_ce, grad_ntl, logits, labels, stats, tables, options, inplace=False)
    return grad


@ce_ntl_backward.register_fake
def _ce_ntl_backward_fake(grad_ce, grad_ntl, logits, labels, stats, tables, *options):
    return logits.new_empty(logits.shape)


@torch.library.custom_op("ntl_fast::triton_ce_ntl_backward_", mutates_args=("logits",))
def ce_ntl_backward_(
    grad_ce: Tensor, grad_ntl: Tensor, logits: Tensor, labels: Tensor, stats: Tensor,
    tables: List[Tensor],
    loss: str, squash: bool, squash_min: float, squash_scale: float,
    reweigh: bool, reweigh_constant: float, gaussian_sigma: Optional[float], ignore_index: int,
) -> None:
    """:func:`ce_ntl_backward` written into ``logits`` itself (saves an (M, V) allocation).

    Hazard: afterwards ``logits`` holds the gradient, not the logits; anything else that reads
    them (a second loss on the same logits, logging, a leaf's ``.grad`` aliasing its data) sees
    gradients.
    """
    options = (loss, squash, squash_min, squash_scale, reweigh, reweigh_constant, gaussian_sigma,
               ignore_index)
    _launch_backward(logits, grad_ce, grad_ntl, logits, labels, stats, tables, options, inplace=True)


def _setup_context(ctx, inputs, output):
    logits, labels, tables, *options, inplace = inputs
    ctx.save_for_backward(logits, labels, output[2], *tables)
    ctx.options = options
    ctx.inplace = inplace


def _backward(ctx, grad_ce, grad_ntl, grad_stats):
    logits, labels, stats, *tables = ctx.saved_tensors
    if grad_ce is None:
        grad_ce = torch.zeros_like(stats[0])
    if grad_ntl is None:
        grad_ntl = torch.zeros_like(stats[0])
    if ctx.inplace:
        ce_ntl_backward_(grad_ce, grad_ntl, logits, labels, stats, tables, *ctx.options)
        grad = logits
    else:
        grad = ce_ntl_backward(grad_ce, grad_ntl, logits, labels, stats, tables, *ctx.options)
    return (grad, None, [None] * len(tables)) + (None,) * (len(ctx.options) + 1)


ce_ntl_forward.register_autograd(_backward, setup_context=_setup_context)
