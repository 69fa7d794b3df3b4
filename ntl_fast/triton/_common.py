"""Row math and launch settings shared by the Triton kernels of this package.

The kernels work on tiles of ``BLOCK_M`` rows. Number tokens are gathered in *value order*
(``number_ids[value_order[k]]``), so the CDF form of W1 (NTL_SPEC §2.3) is a cumulative sum along
the tile; every other variant is invariant under that permutation. A label's position in that
order is ``value_rank[number_index[label]]``: one V-table read per row, outside any loop.

Accumulation dtype: the kernels cast to the element type of their float32 (float64 for float64
logits) loss outputs, passed to the helpers as ``acc_ptr``.
"""

from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..config import LossConfig
from ..table import NumberTokenTable

# Loss variants as compile-time codes (one kernel, specialised per variant).
WAS, MSE, MAE, HUBER, WAS_CDF = 0, 1, 2, 3, 4
LOSS_CODES = {"was": WAS, "mse": MSE, "mae": MAE, "huber": HUBER, "was_cdf": WAS_CDF}

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# Launch settings. The interpreter costs ~0.3 ms per op per program, so it takes many rows per
# program and small vocabulary chunks (tests then exercise tails). On CUDA a program owns one row
# and streams its vocabulary in CUDA_BLOCK_V chunks; number-token-only kernels take several rows.
INTERPRET_BLOCK_M = 64
INTERPRET_BLOCK_V = 128
CUDA_BLOCK_V = 4096
CUDA_NUM_WARPS = 8
CUDA_NUMBER_TILE = 2048  # rows x BLOCK_K elements per program of the number-token-only kernel


def launch_settings(num_rows: int, vocab_size: int, num_numbers: int, full_row: bool) -> dict:
    """``BLOCK_M``, ``BLOCK_V``, ``BLOCK_K`` and ``num_warps`` for one launch (shapes only)."""
    block_k = triton.next_power_of_2(num_numbers)
    if INTERPRET:
        block_v = min(INTERPRET_BLOCK_V, triton.next_power_of_2(vocab_size))
        return dict(BLOCK_M=INTERPRET_BLOCK_M, BLOCK_V=block_v, BLOCK_K=block_k, num_warps=1)
    block_v = min(CUDA_BLOCK_V, triton.next_power_of_2(vocab_size))
    if full_row:
        warps = CUDA_NUM_WARPS if block_v >= 2048 else 4
        return dict(BLOCK_M=1, BLOCK_V=block_v, BLOCK_K=block_k, num_warps=warps)
    block_m = max(1, min(32, CUDA_NUMBER_TILE // block_k))
    return dict(BLOCK_M=block_m, BLOCK_V=block_v, BLOCK_K=block_k, num_warps=4)


def table_tensors(table: NumberTokenTable) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The table's tensors the kernels read, in the order the ops take them."""
    return table.number_ids, table.number_values, table.number_index, table.value_order, table.value_rank


def loss_options(config: LossConfig, table: NumberTokenTable):
    """Config and table constants as op arguments (host floats: no device sync).

    Returns ``(loss, squash, squash_min, squash_scale, reweigh, reweigh_constant, gaussian_sigma,
    ignore_index)``; the squash map is ``D' = 1 + (D - squash_min) * squash_scale`` for D > 0.
    """
    squash = config.squash_factor is not None
    squash_min, scale = table.squash_map(config.squash_factor) if squash else (table.min_distance, 0.0)
    constant = table.reweigh_constant(config.loss, config.squash_factor) if config.reweigh else 0.0
    return (config.loss, squash, float(squash_min), float(scale), config.reweigh,
            float(constant), config.gaussian_sigma, config.ignore_index)


def kernel_options(loss, squash, squash_min, squash_scale, reweigh, reweigh_constant,
                   gaussian_sigma, ignore_index):
    """The op arguments as the kernels take them: runtime scalars and constexpr switches."""
    scalars = (ignore_index, squash_min, squash_scale, reweigh_constant, sigma_or_one(gaussian_sigma))
    switches = dict(LOSS=LOSS_CODES[loss], SQUASH=squash, REWEIGH=reweigh,
                    GAUSSIAN=gaussian_sigma is not None)
    return scalars, switches


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def sigma_or_one(gaussian_sigma: Optional[float]) -> float:
    return 1.0 if gaussian_sigma is None else float(gaussian_sigma)


def check_row_inputs(logits: Tensor, labels: Tensor, loss: str) -> None:
    """Shape-only checks of a direct op call (the public API checks more, before this)."""
    if logits.dim() != 2 or labels.dim() != 1 or labels.shape[0] != logits.shape[0]:
        raise ValueError(
            f"expected logits (M, V) and labels (M,), got {tuple(logits.shape)} and {tuple(labels.shape)}"
        )
    if logits.stride(-1) != 1:
        raise ValueError("logits must be contiguous along the vocabulary dimension")
    if loss not in LOSS_CODES:
        raise ValueError(f"loss must be one of {tuple(LOSS_CODES)}, got {loss!r}")


# --------------------------------------------------------------------------------- row helpers
@triton.jit
def row_block(M, BLOCK_M: tl.constexpr):
    """This program's rows (int64; clamped to M - 1 so every load is in bounds) and their mask."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    return tl.minimum(rows, M - 1), rows < M


@triton.jit
def row_labels(labels_ptr, number_index_ptr, value_rank_ptr, number_values_ptr, rows, V, ignore_index):
    """Classify each row's label (NTL_SPEC §2, §4); a bad label never indexes memory.

    Returns ``(label, in_range, bad, valid, rank, y)``: the label clamped into ``[0, V)``; whether
    it counts for CE; whether it is neither in range nor ignore_index; whether the row is
    NTL-valid; the label's position among the number tokens sorted by value; its value.
    """
    label = tl.load(labels_ptr + rows).to(tl.int64)
    in_range = (label >= 0) & (label < V)
    bad = (label != ignore_index) & ((label < 0) | (label >= V))
    label = tl.where(in_range, label, 0)
    number = tl.load(number_index_ptr + label)
    valid = in_range & (number >= 0)
    number = tl.maximum(number, 0)
    rank = tl.load(value_rank_ptr + number)
    y = tl.load(number_values_ptr + number)
    return label, in_range, bad, valid, rank, y


@triton.jit
def row_logsumexp(row_ptrs, V, acc_ptr, BLOCK_V: tl.constexpr):
    """``LSE_V`` of each row by an online max / sum over BLOCK_V chunks (one read of the row)."""
    cols = tl.arange(0, BLOCK_V)
    x = tl.load(row_ptrs[:, None] + cols[None, :], mask=(cols < V)[None, :], other=float("-inf"))
    x = x.to(acc_ptr.dtype.element_ty)
    running_max = tl.max(x, axis=1)
    running_sum = tl.sum(tl.exp(x - running_max[:, None]), axis=1)
    for start in range(BLOCK_V, V, BLOCK_V):
        c = start + cols
        x = tl.load(row_ptrs[:, None] + c[None, :], mask=(c < V)[None, :], other=float("-inf"))
        x = x.to(acc_ptr.dtype.element_ty)
        new_max = tl.maximum(running_max, tl.max(x, axis=1))
        running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(
            tl.exp(x - new_max[:, None]), axis=1
        )
        running_max = new_max
    return running_max + tl.log(running_sum)


@triton.jit
def number_columns(number_ids_ptr, number_values_ptr, value_order_ptr, K, acc_ptr, BLOCK_K: tl.constexpr):
    """The number tokens in value order: ``(ids, values, gaps, mask)``, BLOCK_K wide.

    ``gaps[k] = v_(k+1) - v_(k)`` (0 for the last token and the padding).
    """
    k = tl.arange(0, BLOCK_K)
    mask = k < K
    has_next = (k + 1) < K
    order = tl.load(value_order_ptr + k, mask=mask, other=0)
    next_order = tl.load(value_order_ptr + k + 1, mask=has_next, other=0)
    ids = tl.load(number_ids_ptr + order, mask=mask, other=0)
    values = tl.load(number_values_ptr + order, mask=mask, other=0.0).to(acc_ptr.dtype.element_ty)
    next_values = tl.load(number_values_ptr + next_order, mask=has_next, other=0.0)
    gaps = tl.where(has_next, next_values.to(acc_ptr.dtype.element_ty) - values, 0.0)
    return ids, values, gaps, mask


@triton.jit
def number_token_terms(
    zn, mask, values, gaps, rank, y, squash_min, squash_scale, sigma,
    LOSS: tl.constexpr, SQUASH: tl.constexpr, GAUSSIAN: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """NTL of each row before reweighing, from its number logits ``zn`` (-inf in the padding).

    Returns ``(lse_n, q, loss, dloss, target)``: ``LSE_N``, the softmax over the number tokens, L,
    ``∂L/∂z_j`` (NTL_SPEC §2.1-2.3) and the target over N (Gaussian §2.5 when GAUSSIAN, else the
    one-hot at ``rank``; meaningful on NTL-valid rows only).
    """
    k = tl.arange(0, BLOCK_K)
    z_max = tl.max(zn, axis=1)
    e = tl.exp(zn - z_max[:, None])
    total = tl.sum(e, axis=1)
    lse_n = z_max + tl.log(total)
    q = e / total[:, None]
    if GAUSSIAN:
        d = (values[None, :] - y[:, None]) / sigma
        g = tl.where(mask[None, :], -0.5 * d * d, float("-inf"))
        g = tl.exp(g - tl.max(g, axis=1)[:, None])
        target = g / tl.sum(g, axis=1)[:, None]
    else:
        target = tl.where(k[None, :] == rank[:, None], 1.0, 0.0).to(zn.dtype)
    if LOSS == 0:  # WAS: Σ q_j D(y, v_j)
        distance = tl.abs(y[:, None] - values[None, :])
        if SQUASH:
            distance = tl.where(distance > 0, 1.0 + (distance - squash_min) * squash_scale, 0.0)
        loss = tl.sum(q * distance, axis=1)
        dloss = q * (distance - loss[:, None])
    elif LOSS == 4:  # WAS_CDF: Σ_k |F_q(k) - F_t(k)| gap_k
        cdf_diff = tl.cumsum(q, axis=1) - tl.cumsum(target, axis=1)
        loss = tl.sum(tl.abs(cdf_diff) * gaps[None, :], axis=1)
        slope = tl.where(cdf_diff > 0, 1.0, tl.where(cdf_diff < 0, -1.0, 0.0)) * gaps[None, :]
        # a_j = Σ_{k >= rank(j)} slope_k, a suffix sum
        suffix = tl.sum(slope, axis=1)[:, None] - tl.cumsum(slope, axis=1) + slope
        dloss = q * (suffix - tl.sum(q * suffix, axis=1)[:, None])
    else:  # f(ŷ - y) with f = square, abs or Huber (δ = 1)
        y_hat = tl.sum(q * values[None, :], axis=1)
        diff = y_hat - y
        sign = tl.where(diff > 0, 1.0, tl.where(diff < 0, -1.0, 0.0))
        if LOSS == 1:
            loss = diff * diff
            slope = 2.0 * diff
        elif LOSS == 2:
            loss = tl.abs(diff)
            slope = sign
        else:
            small = tl.abs(diff) < 1.0
            loss = tl.where(small, 0.5 * diff * diff, tl.abs(diff) - 0.5)
            slope = tl.where(small, diff, sign)
        dloss = slope[:, None] * q * (values[None, :] - y_hat[:, None])
    return lse_n, q, loss, dloss, target


@triton.jit
def store_dense_gradient(row_ptrs, grad_row_ptrs, row_mask, V, lse_v, coefficient, BLOCK_V: tl.constexpr):
    """``grad[k] = coefficient * p_k`` for every column (one read of the row, one write)."""
    cols = tl.arange(0, BLOCK_V)
    for start in range(0, V, BLOCK_V):
        c = start + cols
        col_mask = (c < V)[None, :]
        x = tl.load(row_ptrs[:, None] + c[None, :], mask=col_mask, other=float("-inf"))
        p = tl.exp(x.to(lse_v.dtype) - lse_v[:, None])
        tl.store(
            grad_row_ptrs[:, None] + c[None, :],
            (coefficient[:, None] * p).to(grad_row_ptrs.dtype.element_ty),
            mask=col_mask & row_mask[:, None],
        )
