"""Standalone Number Token Loss (NTL_SPEC §2.1-2.4) as Triton kernels and ``torch.library`` ops.

Forward: reads only the K number-token columns of each row (and, with reweigh, the full row once
for ``LSE_V``); writes the per-row loss and the row statistic the backward needs (``LSE_V`` with
reweigh). Backward: without reweigh the gradient is zeros plus the K number columns; with reweigh
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
    number_token_terms,
    row_block,
    row_labels,
    row_logsumexp,
    store_dense_gradient,
)

__all__ = ["ntl_forward", "ntl_backward"]


@triton.jit
def _ntl_forward_kernel(
    logits_ptr, stride_m, labels_ptr,
    number_ids_ptr, number_values_ptr, number_index_ptr, value_order_ptr, value_rank_ptr,
    ntl_ptr, lse_ptr,
    M, V, K, ignore_index, squash_min, squash_scale, reweigh_constant, sigma,
    LOSS: tl.constexpr, SQUASH: tl.constexpr, REWEIGH: tl.constexpr, GAUSSIAN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows, row_mask = row_block(M, BLOCK_M)
    row_ptrs = logits_ptr + rows * stride_m
    label, in_range, bad, valid, rank, y = row_labels(
        labels_ptr, number_index_ptr, value_rank_ptr, number_values_ptr, rows, V, ignore_index
    )
    ids, values, gaps, k_mask = number_columns(
        number_ids_ptr, number_values_ptr, value_order_ptr, K, ntl_ptr, BLOCK_K
    )
    zn = tl.load(row_ptrs[:, None] + ids[None, :], mask=k_mask[None, :], other=float("-inf"))
    zn = zn.to(ntl_ptr.dtype.element_ty)
    lse_n, q, loss, dloss, target = number_token_terms(
        zn, k_mask, values, gaps, rank, y.to(zn.dtype), squash_min, squash_scale, sigma,
        LOSS, SQUASH, GAUSSIAN, BLOCK_K,
    )
    if REWEIGH:
        lse = row_logsumexp(row_ptrs, V, ntl_ptr, BLOCK_V)
        mass = tl.exp(lse_n - lse)
        loss = mass * loss + reweigh_constant * (1.0 - mass)
    else:
        lse = lse_n  # unused by the backward
    loss = tl.where(valid, loss, 0.0)
    loss = tl.where(bad, float("nan"), loss)
    tl.store(ntl_ptr + rows, loss, mask=row_mask)
    tl.store(lse_ptr + rows, lse, mask=row_mask)


@triton.jit
def _ntl_backward_kernel(
    logits_ptr, stride_m, grad_ptr, stride_gm, labels_ptr, lse_ptr, grad_ntl_ptr,
    number_ids_ptr, number_values_ptr, number_index_ptr, value_order_ptr, value_rank_ptr,
    M, V, K, ignore_index, squash_min, squash_scale, reweigh_constant, sigma,
    LOSS: tl.constexpr, SQUASH: tl.constexpr, REWEIGH: tl.constexpr, GAUSSIAN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows, row_mask = row_block(M, BLOCK_M)
    row_ptrs = logits_ptr + rows * stride_m
    grad_row_ptrs = grad_ptr + rows * stride_gm
    label, in_range, bad, valid, rank, y = row_labels(
        labels_ptr, number_index_ptr, value_rank_ptr, number_values_ptr, rows, V, ignore_index
    )
    ids, values, gaps, k_mask = number_columns(
        number_ids_ptr, number_values_ptr, value_order_ptr, K, lse_ptr, BLOCK_K
    )
    zn = tl.load(row_ptrs[:, None] + ids[None, :], mask=k_mask[None, :], other=float("-inf"))
    zn = zn.to(lse_ptr.dtype.element_ty)
    lse_n, q, loss, dloss, target = number_token_terms(
        zn, k_mask, values, gaps, rank, y.to(zn.dtype), squash_min, squash_scale, sigma,
        LOSS, SQUASH, GAUSSIAN, BLOCK_K,
    )
    upstream = tl.where(valid, tl.load(grad_ntl_ptr + rows).to(zn.dtype), 0.0)
    if REWEIGH:
        # ∂L'/∂z_k = m ∂L/∂z_k + (L - c) p_k (1[k∈N] - m): dense -(L - c) m p_k, then N fixed up
        lse = tl.load(lse_ptr + rows)
        mass = tl.exp(lse_n - lse)
        spread = loss - reweigh_constant
        store_dense_gradient(row_ptrs, grad_row_ptrs, row_mask, V, lse, -upstream * spread * mass, BLOCK_V)
        p_n = tl.exp(zn - lse[:, None])
        number_grad = upstream[:, None] * (
            mass[:, None] * dloss + (spread * (1.0 - mass))[:, None] * p_n
        )
        tl.debug_barrier()  # the number columns' exact values land after the dense write
    else:
        number_grad = upstream[:, None] * dloss
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
    """Per-row NTL ``(M,)`` and the row statistic the backward reads (``LSE_V`` with reweigh).

    ``tables`` = ``(number_ids, number_values, number_index, value_order, value_rank)`` of a
    :class:`~ntl_fast.NumberTokenTable` covering the logits' V columns.
    """
    check_row_inputs(logits, labels, loss)
    num_rows, vocab_size = logits.shape
    dtype = accumulation_dtype(logits.dtype)
    ntl = torch.empty(num_rows, dtype=dtype, device=logits.device)
    lse = torch.empty(num_rows, dtype=dtype, device=logits.device)
    if num_rows == 0:
        return ntl, lse
    scalars, switches = kernel_options(loss, squash, squash_min, squash_scale, reweigh,
                                        reweigh_constant, gaussian_sigma, ignore_index)
    num_numbers = tables[0].numel()
    settings = launch_settings(num_rows, vocab_size, num_numbers, full_row=reweigh)
    grid = (triton.cdiv(num_rows, settings["BLOCK_M"]),)
    _ntl_forward_kernel[grid](
        logits, logits.stride(0), labels, *tables, ntl, lse,
        num_rows, vocab_size, num_numbers, *scalars, **switches, **settings,
    )
    return ntl, lse


@ntl_forward.register_fake
def _ntl_forward_fake(logits, labels, tables, *options):
    dtype = accumulation_dtype(logits.dtype)
    return logits.new_empty(logits.shape[:1], dtype=dtype), logits.new_empty(logits.shape[:1], dtype=dtype)


@torch.library.custom_op("ntl_fast::triton_ntl_backward", mutates_args=())
def ntl_backward(
    grad_ntl: Tensor, logits: Tensor, labels: Tensor, lse: Tensor, tables: List[Tensor],
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
        logits, logits.stride(0), grad, grad.stride(0), labels, lse, grad_ntl.contiguous(), *tables,
        num_rows, vocab_size, num_numbers, *scalars, **switches, **settings,
    )
    return grad


@ntl_backward.register_fake
def _ntl_backward_fake(grad_ntl, logits, labels, lse, tables, *options):
    return logits.new_empty(logits.shape)


def _setup_context(ctx, inputs, output):
    logits, labels, tables, *options = inputs
    ctx.save_for_backward(logits, labels, output[1], *tables)
    ctx.options = options


def _backward(ctx, grad_ntl, grad_lse):
    logits, labels, lse, *tables = ctx.saved_tensors
    if grad_ntl is None:
        grad_ntl = torch.zeros_like(lse)
    grad = ntl_backward(grad_ntl, logits, labels, lse, tables, *ctx.options)
    return (grad, None, [None] * len(tables)) + (None,) * len(ctx.options)


ntl_forward.register_autograd(_backward, setup_context=_setup_context)
