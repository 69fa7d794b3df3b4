"""Standalone Number Token Loss (docs/math.md §2.1-2.4) as Triton kernels and ``torch.library`` ops.

Forward: reads only the K number-token columns of each row (and, with reweigh, the full row once
for its max and log-sums); writes the per-row loss and the row statistics the backward needs
(with reweigh). Backward: without reweigh the gradient is zeros plus the K number columns; with reweigh
it is dense (``∂L'/∂z_k`` involves ``p_k`` for every k), one read and one write of each row.

Ops: ``ntl_fast::triton_ntl_forward`` and ``ntl_fast::triton_ntl_backward``.
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

__all__ = ["ntl_forward", "ntl_backward"]


@triton.jit
def _ntl_forward_kernel(
    logits_ptr, stride_m, labels_ptr, stride_label,
    number_ids_ptr, number_values_ptr, number_index_ptr, value_order_ptr, value_rank_ptr, is_number_ptr,
    ntl_ptr, stats_ptr,
    M, V, K, ignore_index, squash_min, squash_scale, reweigh_constant, sigma,
    LOSS: tl.constexpr, SQUASH: tl.constexpr, REWEIGH: tl.constexpr, GAUSSIAN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows, row_mask = row_block(M, BLOCK_M)
    row_ptrs = logits_ptr + rows * stride_m
    label, in_range, bad, valid, rank, y = row_labels(
        labels_ptr, stride_label, number_index_ptr, value_rank_ptr, number_values_ptr, rows, V,
        ignore_index,
    )
    ids, values, k_mask, next_ids, next_values, has_next = number_columns(
        number_ids_ptr, number_values_ptr, value_order_ptr, K, ntl_ptr, BLOCK_K
    )
    if REWEIGH:
        shift, log_sum, log_text = row_logsumexp(row_ptrs, V, is_number_ptr, ntl_ptr, BLOCK_V, True)
    else:
        shift = tl.zeros([BLOCK_M], dtype=ntl_ptr.dtype.element_ty)
    zn, zn_next = number_logits(row_ptrs, ids, k_mask, next_ids, has_next, shift, LOSS)
    lse_n, q, loss, dloss, target = number_token_terms(
        zn, zn_next, k_mask, has_next, values, next_values, rank, y.to(zn.dtype), squash_min, squash_scale, sigma,
        LOSS, SQUASH, GAUSSIAN, BLOCK_K,
    )
    if REWEIGH:
        mass = tl.exp(lse_n - log_sum)
        loss = mass * loss + reweigh_constant * tl.exp(log_text - log_sum)
        tl.store(stats_ptr + rows, shift, mask=row_mask)
        tl.store(stats_ptr + M + rows, log_sum, mask=row_mask)
        tl.store(stats_ptr + 2 * M + rows, log_text, mask=row_mask)
    loss = tl.where(valid, loss, 0.0)
    loss = tl.where(bad, float("nan"), loss)
    tl.store(ntl_ptr + rows, loss, mask=row_mask)


@triton.jit
def _ntl_backward_kernel(
    logits_ptr, stride_m, grad_ptr, stride_gm, labels_ptr, stride_label, stats_ptr, grad_ntl_ptr,
    number_ids_ptr, number_values_ptr, number_index_ptr, value_order_ptr, value_rank_ptr, is_number_ptr,
    M, V, K, ignore_index, squash_min, squash_scale, reweigh_constant, sigma,
    LOSS: tl.constexpr, SQUASH: tl.constexpr, REWEIGH: tl.constexpr, GAUSSIAN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows, row_mask = row_block(M, BLOCK_M)
    row_ptrs = logits_ptr + rows * stride_m
    grad_row_ptrs = grad_ptr + rows * stride_gm
    label, in_range, bad, valid, rank, y = row_labels(
        labels_ptr, stride_label, number_index_ptr, value_rank_ptr, number_values_ptr, rows, V,
        ignore_index,
    )
    ids, values, k_mask, next_ids, next_values, has_next = number_columns(
        number_ids_ptr, number_values_ptr, value_order_ptr, K, stats_ptr, BLOCK_K
    )
    if REWEIGH:
        shift = tl.load(stats_ptr + rows)
        log_sum = tl.load(stats_ptr + M + rows)
    else:
        shift = tl.zeros([BLOCK_M], dtype=stats_ptr.dtype.element_ty)
    zn, zn_next = number_logits(row_ptrs, ids, k_mask, next_ids, has_next, shift, LOSS)
    lse_n, q, loss, dloss, target = number_token_terms(
        zn, zn_next, k_mask, has_next, values, next_values, rank, y.to(zn.dtype), squash_min, squash_scale, sigma,
        LOSS, SQUASH, GAUSSIAN, BLOCK_K,
    )
    upstream = tl.where(valid, tl.load(grad_ntl_ptr + rows).to(zn.dtype), 0.0)
    if REWEIGH:
        # ∂L'/∂z_k = m ∂L/∂z_k + (L - c) p_k (1[k∈N] - m): dense -(L - c) m p_k, then N fixed up
        mass = tl.exp(lse_n - log_sum)
        text_mass = tl.exp(tl.load(stats_ptr + 2 * M + rows) - log_sum)
        spread = loss - reweigh_constant
        store_dense_gradient(
            row_ptrs, grad_row_ptrs, row_mask, V, shift, log_sum, -scaled(upstream, spread * mass), BLOCK_V
        )
        p_n = tl.exp(zn - log_sum[:, None])
        number_grad = scaled(
            upstream[:, None], mass[:, None] * dloss + (spread * text_mass)[:, None] * p_n
        )
        tl.debug_barrier()  # the number columns' exact values land after the dense write
    else:
        number_grad = scaled(upstream[:, None], dloss)
    tl.store(
        grad_row_ptrs[:, None] + ids[None, :],
        number_grad.to(grad_ptr.dtype.element_ty),
        mask=row_mask[:, None] & k_mask[None, :],
    )


@torch.library.custom_op("ntl_fast::triton_ntl_forward", mutates_args=())
def ntl_forward(
    logits: Tensor, labels: Tensor, tables: List[Tensor],
    loss: str, squash: bool, squash_min: float, squash_scale: float,
    reweigh: bool, reweigh_constant: float, gaussian_sigma: Optional[float], ignore_index: int,
) -> Tuple[Tensor, Tensor]:
    """Per-row NTL ``(M,)`` and the row statistics the backward reads with reweigh: ``(3, M)`` =
    row max, ``log Σ_V exp(z - max)`` and the same over the non-number tokens (zeros without
    reweigh).

    ``tables`` = ``(number_ids, number_values, number_index, value_order, value_rank, is_number)``
    of a :class:`~ntl_fast.NumberTokenTable` covering the logits' V columns.
    """
    check_row_inputs(logits, labels, loss)
    num_rows, vocab_size = logits.shape
    dtype = accumulation_dtype(logits.dtype)
    ntl = torch.empty(num_rows, dtype=dtype, device=logits.device)
    stats = torch.zeros((3, num_rows), dtype=dtype, device=logits.device)
    if num_rows == 0:
        return ntl, stats
    scalars, switches = kernel_options(loss, squash, squash_min, squash_scale, reweigh,
                                        reweigh_constant, gaussian_sigma, ignore_index)
    num_numbers = tables[0].numel()
    settings = launch_settings(num_rows, vocab_size, num_numbers, full_row=reweigh)
    grid = (triton.cdiv(num_rows, settings["BLOCK_M"]),)
    _ntl_forward_kernel[grid](
        logits, logits.stride(0), labels, labels.stride(0), *tables, ntl, stats,
        num_rows, vocab_size, num_numbers, *scalars, **switches, **settings,
    )
    return ntl, stats


@ntl_forward.register_fake
def _ntl_forward_fake(logits, labels, tables, *options):
    dtype = accumulation_dtype(logits.dtype)
    return (logits.new_empty(logits.shape[:1], dtype=dtype),
            logits.new_empty((3,) + tuple(logits.shape[:1]), dtype=dtype))


@torch.library.custom_op("ntl_fast::triton_ntl_backward", mutates_args=())
def ntl_backward(
    grad_ntl: Tensor, logits: Tensor, labels: Tensor, stats: Tensor, tables: List[Tensor],
    loss: str, squash: bool, squash_min: float, squash_scale: float,
    reweigh: bool, reweigh_constant: float, gaussian_sigma: Optional[float], ignore_index: int,
) -> Tensor:
    """``grad_ntl[i] * ∂NTL_i/∂logits[i]`` as an ``(M, V)`` tensor of the logits' dtype."""
    num_rows, vocab_size = logits.shape
    # without reweigh only the K number columns are non-zero
    allocate = torch.empty if reweigh else torch.zeros
    grad = allocate((num_rows, vocab_size), dtype=logits.dtype, device=logits.device)
    if num_rows == 0:
        return grad
    scalars, switches = kernel_options(loss, squash, squash_min, squash_scale, reweigh,
                                        reweigh_constant, gaussian_sigma, ignore_index)
    num_numbers = tables[0].numel()
    settings = launch_settings(num_rows, vocab_size, num_numbers, full_row=reweigh)
    grid = (triton.cdiv(num_rows, settings["BLOCK_M"]),)
    _ntl_backward_kernel[grid](
        logits, logits.stride(0), grad, grad.stride(0), labels, labels.stride(0), stats.contiguous(),
        grad_ntl.contiguous(), *tables,
        num_rows, vocab_size, num_numbers, *scalars, **switches, **settings,
    )
    return grad


@ntl_backward.register_fake
def _ntl_backward_fake(grad_ntl, logits, labels, stats, tables, *options):
    return logits.new_empty(logits.shape)


def _setup_context(ctx, inputs, output):
    logits, labels, tables, *options = inputs
    ctx.save_for_backward(logits, labels, output[1], *tables)
    ctx.options = options


def _backward(ctx, grad_ntl, grad_stats):
    logits, labels, stats, *tables = ctx.saved_tensors
    if grad_ntl is None:
        grad_ntl = torch.zeros_like(stats[0])
    grad = ntl_backward(grad_ntl, logits, labels, stats, tables, *ctx.options)
    return (grad, None, [None] * len(tables)) + (None,) * len(ctx.options)


ntl_forward.register_autograd(_backward, setup_context=_setup_context)
