"""Standalone Number Token Loss (docs/math.md §2.1-2.4): the kernels.

Forward: reads only the K number-token columns of each NTL-valid row (and, with reweigh, the full
row once for its max and log-sums); writes the per-row loss and the row statistics the backward
needs (with reweigh). Backward: without reweigh the gradient is zeros plus the K number columns;
with reweigh it is dense (``∂L'/∂z_k`` involves ``p_k`` for every k), one read and one write of
each row. Rows that do not count read nothing. The ops live in :mod:`ntl_fast.triton.ops`.
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from ._common import kernel_options, launch_rows, reweighed, row_labels, row_logsumexp
from ._common import row_number_terms, scaled, store_number_gradient_tiled, store_row_gradient, store_row_gradient_tiled
from ._common import tiled_number_summary

__all__ = ["launch_ntl_forward", "launch_ntl_backward"]


@triton.jit
def _ntl_forward_kernel(
    logits_ptr, stride_m, labels_ptr, stride_label,
    number_ids_ptr, number_values_ptr, number_index_ptr, value_order_ptr, value_rank_ptr, sorted_gaps_ptr,
    is_number_ptr, ntl_ptr, stats_ptr,
    M, V, K, ignore_index, squash_min, squash_scale, reweigh_constant, sigma,
    LOSS: tl.constexpr, SQUASH: tl.constexpr, REWEIGH: tl.constexpr, GAUSSIAN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, TILED: tl.constexpr,
):
    rows, row_mask, label, in_range, bad, valid, rank, y = row_labels(
        labels_ptr, stride_label, number_index_ptr, value_rank_ptr, number_values_ptr, M, V, ignore_index, BLOCK_M
    )
    row_ptrs = logits_ptr + rows * stride_m
    active = row_mask & valid
    if REWEIGH:
        shift, log_sum, log_text = row_logsumexp(row_ptrs, active, V, is_number_ptr, ntl_ptr, BLOCK_M, BLOCK_V, True)
    else:
        shift = tl.zeros([BLOCK_M], dtype=ntl_ptr.dtype.element_ty)
    if TILED:
        z_max, total, lse_n, g_max, g_sum, loss, diff, target_zn, kstar, a_total, a_ref = tiled_number_summary(
            row_ptrs, active, shift, rank, y.to(shift.dtype), number_ids_ptr, number_values_ptr, value_order_ptr, K,
            squash_min, squash_scale, sigma, LOSS, SQUASH, GAUSSIAN, BLOCK_K,
        )
    else:
        ids, k_mask, zn, lse_n, loss, dloss, target = row_number_terms(
            row_ptrs, active, shift, rank, y, number_ids_ptr, number_values_ptr, value_order_ptr, K,
            squash_min, squash_scale, sigma, LOSS, SQUASH, GAUSSIAN, BLOCK_K,
        )
    if REWEIGH:
        loss = reweighed(loss, lse_n, log_sum, log_text, reweigh_constant)
        tl.store(stats_ptr + rows, shift, mask=row_mask)
        tl.store(stats_ptr + M + rows, log_sum, mask=row_mask)
        tl.store(stats_ptr + 2 * M + rows, log_text, mask=row_mask)
    tl.store(ntl_ptr + rows, tl.where(bad, float("nan"), tl.where(valid, loss, 0.0)), mask=row_mask)


@triton.jit
def _ntl_backward_kernel(
    logits_ptr, stride_m, grad_ptr, stride_gm, labels_ptr, stride_label, stats_ptr, grad_ntl_ptr,
    number_ids_ptr, number_values_ptr, number_index_ptr, value_order_ptr, value_rank_ptr, sorted_gaps_ptr,
    is_number_ptr, M, V, K, ignore_index, squash_min, squash_scale, reweigh_constant, sigma,
    LOSS: tl.constexpr, SQUASH: tl.constexpr, REWEIGH: tl.constexpr, GAUSSIAN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, TILED: tl.constexpr,
):
    rows, row_mask, label, in_range, bad, valid, rank, y = row_labels(
        labels_ptr, stride_label, number_index_ptr, value_rank_ptr, number_values_ptr, M, V, ignore_index, BLOCK_M
    )
    grad_row_ptrs = grad_ptr + rows * stride_gm
    upstream = tl.where(valid, tl.load(grad_ntl_ptr + rows).to(stats_ptr.dtype.element_ty), 0.0)
    active = row_mask & (upstream != 0)
    if REWEIGH:
        shift = tl.load(stats_ptr + rows)
    else:
        shift = tl.zeros([BLOCK_M], dtype=stats_ptr.dtype.element_ty)
    if TILED:
        row_ptrs = logits_ptr + rows * stride_m
        y = y.to(shift.dtype)
        rank = rank.to(tl.int32)  # a position among K < 2**31 (and so is kstar): one register, not two
        z_max, total, lse_n, g_max, g_sum, loss, diff, target_zn, kstar, a_total, a_ref = tiled_number_summary(
            row_ptrs, active, shift, rank, y, number_ids_ptr, number_values_ptr, value_order_ptr, K,
            squash_min, squash_scale, sigma, LOSS, SQUASH, GAUSSIAN, BLOCK_K,
        )
        if REWEIGH:
            no_ce = tl.zeros([BLOCK_M], dtype=stats_ptr.dtype.element_ty)
            store_row_gradient_tiled(
                row_ptrs, grad_row_ptrs, row_mask, active, V, label, in_range, valid, shift,
                tl.load(stats_ptr + M + rows), tl.load(stats_ptr + 2 * M + rows), no_ce, rank, y, number_ids_ptr,
                number_values_ptr, value_order_ptr, is_number_ptr, K, squash_min, squash_scale, sigma, z_max, total,
                lse_n, g_max, g_sum, loss, diff, kstar, a_total, a_ref, no_ce, upstream, reweigh_constant, LOSS, SQUASH,
                GAUSSIAN, REWEIGH, False, BLOCK_V, BLOCK_K,
            )
        else:  # the gradient buffer starts at zero: only the number columns, tile by tile
            no_ce = tl.zeros([BLOCK_M], dtype=stats_ptr.dtype.element_ty)
            store_number_gradient_tiled(
                row_ptrs, grad_row_ptrs, row_mask, active, shift, rank, y, number_ids_ptr, number_values_ptr,
                value_order_ptr, K, squash_min, squash_scale, sigma, z_max, total, g_max, g_sum, loss, diff, kstar,
                a_total, a_ref, valid, no_ce, no_ce, no_ce, no_ce, no_ce, upstream, LOSS, SQUASH, GAUSSIAN, False,
                BLOCK_K,
            )
    else:
        ids, k_mask, zn, lse_n, loss, dloss, target = row_number_terms(
            logits_ptr + rows * stride_m, active, shift, rank, y, number_ids_ptr, number_values_ptr, value_order_ptr,
            K, squash_min, squash_scale, sigma, LOSS, SQUASH, GAUSSIAN, BLOCK_K,
        )
        if REWEIGH:
            # dense -(L - c) m p_k, then the number columns: the CE + NTL gradient without its CE part
            no_ce = tl.zeros([BLOCK_M], dtype=stats_ptr.dtype.element_ty)
            store_row_gradient(
                logits_ptr + rows * stride_m, grad_row_ptrs, row_mask, active, V, label, in_range, valid, shift,
                tl.load(stats_ptr + M + rows), tl.load(stats_ptr + 2 * M + rows), ids, k_mask, zn, no_ce, lse_n,
                loss, dloss, target, no_ce, upstream, reweigh_constant, REWEIGH, False, BLOCK_V,
            )
        else:  # the gradient buffer starts at zero: only the number columns
            tl.store(
                grad_row_ptrs[:, None] + ids[None, :],
                scaled(upstream[:, None], dloss).to(grad_ptr.dtype.element_ty),
                mask=row_mask[:, None] & k_mask[None, :],
            )


def launch_ntl_forward(logits: Tensor, labels: Tensor, tables, options, ntl: Tensor, stats: Tensor) -> None:
    """Per-row NTL into ``ntl`` and, with reweigh, the row statistics into ``stats`` ``(3, M)``."""
    scalars, switches = kernel_options(*options)
    launch_rows(_ntl_forward_kernel, logits, tables[0].numel(), switches["REWEIGH"],
                logits, logits.stride(0), labels, labels.stride(0), *tables, ntl, stats,
                *logits.shape, tables[0].numel(), *scalars, **switches)


def launch_ntl_backward(grad: Tensor, grad_ntl: Tensor, logits: Tensor, labels: Tensor, stats: Tensor, tables,
                        options) -> None:
    """``grad_ntl[i] * ∂NTL_i/∂logits[i]`` into ``grad`` (zero-filled unless reweigh)."""
    scalars, switches = kernel_options(*options)
    launch_rows(_ntl_backward_kernel, logits, tables[0].numel(), switches["REWEIGH"],
                logits, logits.stride(0), grad, grad.stride(0), labels, labels.stride(0), stats.contiguous(),
                grad_ntl.contiguous(), *tables, *logits.shape, tables[0].numel(), *scalars, backward="ntl_backward",
                **switches)
