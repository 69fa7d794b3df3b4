"""Cross-entropy (or Gaussian-CE) fused with the Number Token Loss (docs/math.md §2): the kernels.

Forward, per row: one read of the row in BLOCK_V chunks (per-lane running max / sum, one reduction
at the end), plus a gather of the label column and of the K number-token columns; it writes CE and
NTL and either

* the row statistics saved for a later backward (row max and log-sums, so that ``p_k`` is formed
  from ``z_k - max``, never from a rounded ``LSE_V``), or
* with ``GRAD``, the gradient of ``Σ ce_scale·ce + Σ ntl_scale·ntl`` right away (one pass: loss and
  gradient from the same kernel, optionally into the logits' own buffer).

Backward, per row: one more read of the row and one write of its gradient, ``grad_ce (p - target)
+ grad_ntl ∂NTL/∂z``. Both kernels call :func:`row_losses` for the per-row losses and gradient
(:func:`~ntl_fast.triton._common.store_row_gradient`).

DRAM traffic of the one-pass form, 1 read + 1 write of the logits by design at every V:

* a row of at most 8192 logits (``RESIDENT``, ``_common.cuda_resident_blocks``) is loaded once into
  the program's registers; its statistics, and then its gradient, come from those registers;
* a wider row is streamed for its statistics, then swept again (from its end backwards, so that
  the first chunks re-read are the last read) to write the gradient. That second read stays in
  L2 by construction: the launch takes a persistent grid of P programs looping over the rows
  (``_common.one_pass_programs``), P x (row bytes + gradient row bytes) <= half the L2 (at V =
  128256, a 256 KB bf16 row: 51 programs on a 50 MB L2, 102 in place; at V = 32128, one per SM).

Either way the K number columns and the label are gathered again after the row's read (K reads
per row, against V), from L1/L2: the row was read just before. ``_common.ONE_PASS_PROGRAMS`` (or
the environment's ``NTL_FAST_ONE_PASS_PROGRAMS``) overrides P, 0 for one program per row: the
unbounded grid, whose second reads reach DRAM once the resident programs' rows exceed L2 (2 reads
+ 1 write, the two-pass path's traffic without its second launch).

Ignored rows (a label that does not count, zero scales or zero upstream gradients) read nothing
and get a zero gradient row. The ops wrapping these kernels live in :mod:`ntl_fast.triton.ops`.
"""

from __future__ import annotations

from typing import Optional

import triton
import triton.language as tl
from torch import Tensor

from ._common import kernel_options, launch_rows, reweighed, row_labels, row_logsumexp, row_logsumexp_resident
from ._common import row_number_terms, row_upstream, store_row_gradient, store_row_gradient_tiled
from ._common import tiled_number_summary

__all__ = ["launch_ce_ntl_forward", "launch_ce_ntl_backward"]


@triton.jit
def row_losses(row_ptrs, grad_row_ptrs, row_mask, active, V, label, in_range, valid, rank, y, shift, log_sum, log_text,
               number_ids_ptr, number_values_ptr, value_order_ptr, is_number_ptr, K, squash_min, squash_scale, sigma,
               reweigh_constant, upstream_ce, upstream_ntl, LOSS: tl.constexpr, SQUASH: tl.constexpr,
               GAUSSIAN: tl.constexpr, REWEIGH: tl.constexpr, GRAD: tl.constexpr, INPLACE: tl.constexpr,
               BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, TILED: tl.constexpr, resident=None,
               RESIDENT: tl.constexpr = False):
    """CE and NTL of each row from its statistics (``shift``, ``log_sum``, ``log_text``) and, with
    ``GRAD``, its gradient written to ``grad_row_ptrs``: what the forward and the backward kernels
    share. Every logit it needs besides the streamed row (number columns, label) is read before
    any gradient write, so the gradient may overwrite the logits. With RESIDENT the row is
    ``resident`` (held in registers) and the gradient's dense part reads nothing."""
    if TILED:  # K > BLOCK_K: the number tokens in tiles, their per-k terms formed again by the gradient
        y = y.to(shift.dtype)
        rank = rank.to(tl.int32)  # a position among K < 2**31 (and so is kstar): one register, not two
        z_max, total, lse_n, g_max, g_sum, loss, diff, target_zn, kstar, a_total, a_ref = tiled_number_summary(
            row_ptrs, active, shift, rank, y, number_ids_ptr, number_values_ptr, value_order_ptr, K,
            squash_min, squash_scale, sigma, LOSS, SQUASH, GAUSSIAN, BLOCK_K,
        )
    else:
        ids, k_mask, zn, lse_n, loss, dloss, target = row_number_terms(
            row_ptrs, active, shift, rank, y, number_ids_ptr, number_values_ptr, value_order_ptr, K,
            squash_min, squash_scale, sigma, LOSS, SQUASH, GAUSSIAN, BLOCK_K,
        )
    z_label = tl.load(row_ptrs + label, mask=active, other=0.0).to(log_sum.dtype) - shift
    ce = log_sum - z_label
    if GAUSSIAN:
        if TILED:
            gaussian_ce = log_sum - target_zn
        else:
            gaussian_ce = log_sum - tl.sum(target * tl.where(k_mask[None, :], zn, 0.0), axis=1)
        ce = tl.where(valid, gaussian_ce, ce)
    ntl = loss
    if REWEIGH:
        ntl = reweighed(loss, lse_n, log_sum, log_text, reweigh_constant)
    if GRAD:
        if TILED:
            store_row_gradient_tiled(
                row_ptrs, grad_row_ptrs, row_mask, active, V, label, in_range, valid, shift, log_sum, log_text,
                z_label, rank, y, number_ids_ptr, number_values_ptr, value_order_ptr, is_number_ptr, K, squash_min,
                squash_scale, sigma, z_max, total, lse_n, g_max, g_sum, loss, diff, kstar, a_total, a_ref,
                upstream_ce, upstream_ntl, reweigh_constant, LOSS, SQUASH, GAUSSIAN, REWEIGH, INPLACE, BLOCK_V, BLOCK_K,
                resident, RESIDENT,
            )
        else:
            store_row_gradient(
                row_ptrs, grad_row_ptrs, row_mask, active, V, label, in_range, valid, shift, log_sum, log_text, ids,
                k_mask, zn, z_label, lse_n, loss, dloss, target, upstream_ce, upstream_ntl, reweigh_constant,
                REWEIGH, INPLACE, BLOCK_V, resident, RESIDENT,
            )
    return ce, ntl


@triton.jit
def forward_rows(
    block, logits_ptr, stride_m, labels_ptr, stride_label,
    number_ids_ptr, number_values_ptr, number_index_ptr, value_order_ptr, value_rank_ptr, sorted_gaps_ptr,
    is_number_ptr, ce_ptr, ntl_ptr, stats_ptr, grad_ptr, stride_gm, ce_scale_ptr, ntl_scale_ptr,
    M, V, K, ignore_index, squash_min, squash_scale, reweigh_constant, sigma,
    LOSS: tl.constexpr, SQUASH: tl.constexpr, REWEIGH: tl.constexpr, GAUSSIAN: tl.constexpr,
    GRAD: tl.constexpr, INPLACE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr, TILED: tl.constexpr, RESIDENT: tl.constexpr,
):
    """The forward of the BLOCK_M rows of row block ``block`` (None: the program id)."""
    rows, row_mask, label, in_range, bad, valid, rank, y = row_labels(
        labels_ptr, stride_label, number_index_ptr, value_rank_ptr, number_values_ptr, M, V, ignore_index, BLOCK_M,
        block,
    )
    row_ptrs = logits_ptr + rows * stride_m
    if GRAD:  # a row whose scales are both 0 counts for nothing: no read, zero losses and gradient
        upstream_ce, upstream_ntl, active = row_upstream(
            ce_scale_ptr, ntl_scale_ptr, rows, row_mask, in_range, valid, ntl_ptr
        )
    else:
        active = row_mask & in_range
    if RESIDENT:  # the whole row in one block: read once, the gradient formed from these registers
        resident, shift, log_sum, log_text = row_logsumexp_resident(row_ptrs, active, V, is_number_ptr, ntl_ptr,
                                                                    BLOCK_M, BLOCK_V, REWEIGH)
    else:
        resident = None
        shift, log_sum, log_text = row_logsumexp(row_ptrs, active, V, is_number_ptr, ntl_ptr, BLOCK_M, BLOCK_V,
                                                 REWEIGH)
    if GRAD:
        grad_row_ptrs = grad_ptr + rows * stride_gm
    else:  # no gradient: the upstream scales are never read
        grad_row_ptrs = row_ptrs
        upstream_ce = log_sum
        upstream_ntl = log_sum
    ce, ntl = row_losses(
        row_ptrs, grad_row_ptrs, row_mask, active, V, label, in_range, valid, rank, y, shift, log_sum, log_text,
        number_ids_ptr, number_values_ptr, value_order_ptr, is_number_ptr, K, squash_min, squash_scale, sigma,
        reweigh_constant, upstream_ce, upstream_ntl, LOSS, SQUASH, GAUSSIAN, REWEIGH, GRAD, INPLACE, BLOCK_V,
        BLOCK_K, TILED, resident, RESIDENT,
    )
    tl.store(ce_ptr + rows, tl.where(bad, float("nan"), tl.where(in_range & active, ce, 0.0)), mask=row_mask)
    tl.store(ntl_ptr + rows, tl.where(bad, float("nan"), tl.where(valid & active, ntl, 0.0)), mask=row_mask)
    if not GRAD:
        tl.store(stats_ptr + rows, shift, mask=row_mask)
        tl.store(stats_ptr + M + rows, log_sum, mask=row_mask)
        tl.store(stats_ptr + 2 * M + rows, log_text, mask=row_mask)


@triton.jit
def _ce_ntl_forward_kernel(
    logits_ptr, stride_m, labels_ptr, stride_label,
    number_ids_ptr, number_values_ptr, number_index_ptr, value_order_ptr, value_rank_ptr, sorted_gaps_ptr,
    is_number_ptr, ce_ptr, ntl_ptr, stats_ptr, grad_ptr, stride_gm, ce_scale_ptr, ntl_scale_ptr,
    M, V, K, ignore_index, squash_min, squash_scale, reweigh_constant, sigma,
    LOSS: tl.constexpr, SQUASH: tl.constexpr, REWEIGH: tl.constexpr, GAUSSIAN: tl.constexpr,
    GRAD: tl.constexpr, INPLACE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr, TILED: tl.constexpr, RESIDENT: tl.constexpr = False,
):
    """One program per BLOCK_M rows; with GRAD (one pass) a program takes the row blocks ``pid,
    pid + P, ...`` of a grid of P programs (:func:`~ntl_fast.triton._common.one_pass_programs`)."""
    if GRAD:
        for block in range(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.num_programs(0)):
            forward_rows(
                block, logits_ptr, stride_m, labels_ptr, stride_label, number_ids_ptr, number_values_ptr,
                number_index_ptr, value_order_ptr, value_rank_ptr, sorted_gaps_ptr, is_number_ptr, ce_ptr, ntl_ptr,
                stats_ptr, grad_ptr, stride_gm, ce_scale_ptr, ntl_scale_ptr, M, V, K, ignore_index, squash_min,
                squash_scale, reweigh_constant, sigma, LOSS, SQUASH, REWEIGH, GAUSSIAN, GRAD, INPLACE, BLOCK_M,
                BLOCK_V, BLOCK_K, TILED, RESIDENT,
            )
    else:  # the same call without the row loop: a two-pass forward keeps the registers it had without one
        forward_rows(
            None, logits_ptr, stride_m, labels_ptr, stride_label, number_ids_ptr, number_values_ptr,
            number_index_ptr, value_order_ptr, value_rank_ptr, sorted_gaps_ptr, is_number_ptr, ce_ptr, ntl_ptr,
            stats_ptr, grad_ptr, stride_gm, ce_scale_ptr, ntl_scale_ptr, M, V, K, ignore_index, squash_min,
            squash_scale, reweigh_constant, sigma, LOSS, SQUASH, REWEIGH, GAUSSIAN, GRAD, INPLACE, BLOCK_M,
            BLOCK_V, BLOCK_K, TILED, RESIDENT,
        )


@triton.jit
def _ce_ntl_backward_kernel(
    logits_ptr, stride_m, grad_ptr, stride_gm, labels_ptr, stride_label, stats_ptr, grad_ce_ptr, grad_ntl_ptr,
    number_ids_ptr, number_values_ptr, number_index_ptr, value_order_ptr, value_rank_ptr, sorted_gaps_ptr,
    is_number_ptr, M, V, K, ignore_index, squash_min, squash_scale, reweigh_constant, sigma,
    LOSS: tl.constexpr, SQUASH: tl.constexpr, REWEIGH: tl.constexpr, GAUSSIAN: tl.constexpr,
    INPLACE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
    TILED: tl.constexpr,
):
    rows, row_mask, label, in_range, bad, valid, rank, y = row_labels(
        labels_ptr, stride_label, number_index_ptr, value_rank_ptr, number_values_ptr, M, V, ignore_index, BLOCK_M
    )
    row_ptrs = logits_ptr + rows * stride_m
    upstream_ce, upstream_ntl, active = row_upstream(grad_ce_ptr, grad_ntl_ptr, rows, row_mask, in_range, valid,
                                                     stats_ptr)
    shift = tl.load(stats_ptr + rows)
    log_sum = tl.load(stats_ptr + M + rows)
    log_text = tl.load(stats_ptr + 2 * M + rows)
    row_losses(
        row_ptrs, grad_ptr + rows * stride_gm, row_mask, active, V, label, in_range, valid, rank, y, shift, log_sum,
        log_text, number_ids_ptr, number_values_ptr, value_order_ptr, is_number_ptr, K, squash_min, squash_scale,
        sigma, reweigh_constant, upstream_ce, upstream_ntl, LOSS, SQUASH, GAUSSIAN, REWEIGH, True, INPLACE, BLOCK_V,
        BLOCK_K, TILED,
    )


def launch_ce_ntl_forward(logits: Tensor, labels: Tensor, tables, options, ce: Tensor, ntl: Tensor,
                          stats: Optional[Tensor] = None, grad: Optional[Tensor] = None,
                          scales: Optional[tuple] = None) -> None:
    """Runs the forward into ``ce``, ``ntl`` and ``stats`` (``(3, M)``), or, given ``grad`` and
    ``scales = (ce_scale, ntl_scale)``, into ``ce``, ``ntl`` and ``grad`` (one pass; ``grad`` may be
    ``logits`` itself). ``tables``: the 7 tensors of ``NumberTokenTable.kernel_tensors()``."""
    scalars, switches = kernel_options(*options)
    one_pass = grad is not None
    ce_scale, ntl_scale = (s.contiguous() for s in scales) if one_pass else (ce, ntl)
    launch_rows(_ce_ntl_forward_kernel, logits, tables[0].numel(), True,
                logits, logits.stride(0), labels, labels.stride(0), *tables, ce, ntl, ce if one_pass else stats,
                grad if one_pass else ce, grad.stride(0) if one_pass else 0, ce_scale, ntl_scale,
                *logits.shape, tables[0].numel(), *scalars, **switches,
                GRAD=one_pass, INPLACE=one_pass and grad.data_ptr() == logits.data_ptr())


def launch_ce_ntl_backward(grad: Tensor, grad_ce: Tensor, grad_ntl: Tensor, logits: Tensor, labels: Tensor,
                           stats: Tensor, tables, options) -> None:
    """``grad_ce (p - target) + grad_ntl ∂NTL/∂z`` per row into ``grad`` (may be ``logits``)."""
    scalars, switches = kernel_options(*options)
    launch_rows(_ce_ntl_backward_kernel, logits, tables[0].numel(), True,
                logits, logits.stride(0), grad, grad.stride(0), labels, labels.stride(0), stats.contiguous(),
                grad_ce.contiguous(), grad_ntl.contiguous(), *tables, *logits.shape, tables[0].numel(), *scalars,
                backward="ce_ntl_backward", **switches, INPLACE=grad.data_ptr() == logits.data_ptr())
