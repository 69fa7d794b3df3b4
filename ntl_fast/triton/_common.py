"""Row math and launch settings shared by the Triton kernels of this package.

The kernels work on tiles of ``BLOCK_M`` rows. Number tokens are gathered in *value order*
(``number_ids[value_order[k]]``), so the CDF form of W1 (docs/math.md §2.3) is a cumulative sum along
the tile; every other variant is invariant under that permutation. A label's position in that
order is ``value_rank[number_index[label]]``: one V-table read per row, outside any loop.

Accumulation dtype: the kernels cast to the element type of their float32 (float64 for float64
logits) loss outputs, passed to the helpers as ``acc_ptr``.
"""

from __future__ import annotations

import contextlib
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
# 2048 columns x 8 warps: 8 logits (16 bytes of bf16) per thread and chunk. With 4096, ptxas
# spilled the standalone NTL forward's three running sums (reweighing) at K = 10 (sm_90, bf16);
# benchmarks/triton_aot.py gates every specialisation on that.
CUDA_BLOCK_V = 2048
CUDA_NUM_WARPS = 8
CUDA_NUMBER_TILE = 2048  # rows x BLOCK_K elements per program of the number-token-only kernel

# Which settings launches take: the interpreter's, or a CUDA launch's. Tests switch to "cuda"
# under the interpreter (use_launch_settings) to run the exact tiling a GPU runs.
_launch_profile = "interpret" if INTERPRET else "cuda"


@contextlib.contextmanager
def use_launch_settings(profile: str):
    """Launch with ``profile`` ("interpret" or "cuda") settings inside the ``with`` block."""
    global _launch_profile
    if profile not in ("interpret", "cuda"):
        raise ValueError(f"profile must be 'interpret' or 'cuda', got {profile!r}")
    previous, _launch_profile = _launch_profile, profile
    try:
        yield
    finally:
        _launch_profile = previous


def launch_settings(num_rows: int, vocab_size: int, num_numbers: int, full_row: bool) -> dict:
    """``BLOCK_M``, ``BLOCK_V``, ``BLOCK_K`` and ``num_warps`` for one launch (shapes only)."""
    block_k = triton.next_power_of_2(num_numbers)
    if _launch_profile == "interpret":
        block_v = min(INTERPRET_BLOCK_V, triton.next_power_of_2(vocab_size))
        return dict(BLOCK_M=INTERPRET_BLOCK_M, BLOCK_V=block_v, BLOCK_K=block_k, num_warps=1)
    block_v = min(CUDA_BLOCK_V, triton.next_power_of_2(vocab_size))
    if full_row:
        warps = CUDA_NUM_WARPS if block_v >= 2048 else 4
        return dict(BLOCK_M=1, BLOCK_V=block_v, BLOCK_K=block_k, num_warps=warps)
    block_m = max(1, min(32, CUDA_NUMBER_TILE // block_k))
    return dict(BLOCK_M=block_m, BLOCK_V=block_v, BLOCK_K=block_k, num_warps=4)


def table_tensors(table: NumberTokenTable) -> Tuple[Tensor, ...]:
    """The table's tensors the kernels read, in the order the ops take them."""
    return (table.number_ids, table.number_values, table.number_index, table.value_order,
            table.value_rank, table.is_number)


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
def row_labels(labels_ptr, stride_label, number_index_ptr, value_rank_ptr, number_values_ptr, rows, V,
               ignore_index):
    """Classify each row's label (docs/math.md §2, §4); a bad label never indexes memory.

    Returns ``(label, in_range, bad, valid, rank, y)``: the label clamped into ``[0, V)``; whether
    it counts for CE; whether it is neither in range nor ignore_index; whether the row is
    NTL-valid; the label's position among the number tokens sorted by value; its value.
    ``ignore_index`` may lie inside ``[0, V)``: such labels are ignored, not scored.
    """
    label = tl.load(labels_ptr + rows * stride_label).to(tl.int64)
    ignored = label == ignore_index
    in_range = (label >= 0) & (label < V) & (ignored == 0)
    bad = (ignored == 0) & ((label < 0) | (label >= V))
    label = tl.where(in_range, label, 0)
    number = tl.load(number_index_ptr + label)
    valid = in_range & (number >= 0)
    number = tl.maximum(number, 0)
    rank = tl.load(value_rank_ptr + number)
    y = tl.load(number_values_ptr + number)
    return label, in_range, bad, valid, rank, y


@triton.jit
def finite_or_zero(x):
    """``x`` where finite, else 0: the shift that keeps an all ``-inf`` block at ``exp(-inf) = 0``
    instead of ``exp(-inf - (-inf)) = NaN`` (an ``inf``/NaN row stays non-finite through its sum)."""
    return tl.where((x > float("-inf")) & (x < float("inf")), x, 0.0)


@triton.jit
def scaled(upstream, term):
    """``upstream * term``, exactly 0 where ``upstream == 0``: rows that do not count (ignored,
    zero weight, no NTL label) get a zero gradient even when their logits are inf or NaN."""
    return tl.where(upstream == 0, 0.0, upstream * term)


@triton.jit
def row_logsumexp(row_ptrs, V, is_number_ptr, acc_ptr, BLOCK_V: tl.constexpr, TEXT: tl.constexpr):
    """Row statistics by an online max / sum over BLOCK_V chunks (one read of the row).

    Returns ``(shift, log_sum, log_text)``: the row max (0 where not finite), ``log Σ_k exp(z_k -
    shift)`` (so ``LSE_V = shift + log_sum``) and, with TEXT, the same sum over the non-number
    tokens only (``1 - m = exp(log_text - log_sum)`` without cancellation, docs/math.md §2.4).
    Callers form ``(z - shift) - log_sum``, never ``z - LSE_V``: a rounded LSE_V of large
    magnitude would cost the shift invariance of §4.
    """
    cols = tl.arange(0, BLOCK_V)
    x = tl.load(row_ptrs[:, None] + cols[None, :], mask=(cols < V)[None, :], other=float("-inf"))
    x = x.to(acc_ptr.dtype.element_ty)
    running_max = tl.max(x, axis=1)
    e = tl.exp(x - finite_or_zero(running_max)[:, None])
    running_sum = tl.sum(e, axis=1)
    if TEXT:
        is_text = tl.load(is_number_ptr + cols, mask=cols < V, other=1) == 0
        running_text = tl.sum(tl.where(is_text[None, :], e, 0.0), axis=1)
    else:
        running_text = running_sum
    for start in range(BLOCK_V, V, BLOCK_V):
        c = start + cols
        x = tl.load(row_ptrs[:, None] + c[None, :], mask=(c < V)[None, :], other=float("-inf"))
        x = x.to(acc_ptr.dtype.element_ty)
        new_max = tl.maximum(running_max, tl.max(x, axis=1))
        shift = finite_or_zero(new_max)
        alpha = tl.exp(running_max - shift)  # 0 while every earlier logit was -inf
        e = tl.exp(x - shift[:, None])
        running_sum = running_sum * alpha + tl.sum(e, axis=1)
        if TEXT:
            is_text = tl.load(is_number_ptr + c, mask=c < V, other=1) == 0
            running_text = running_text * alpha + tl.sum(tl.where(is_text[None, :], e, 0.0), axis=1)
        running_max = new_max
    return finite_or_zero(running_max), tl.log(running_sum), tl.log(running_text)


@triton.jit
def number_columns(number_ids_ptr, number_values_ptr, value_order_ptr, K, acc_ptr, BLOCK_K: tl.constexpr):
    """The number tokens in value order, BLOCK_K wide: ``(ids, values, mask)`` and the same one
    position further along the order, ``(next_ids, next_values, has_next)`` (for the CDF form)."""
    k = tl.arange(0, BLOCK_K)
    mask = k < K
    has_next = (k + 1) < K
    order = tl.load(value_order_ptr + k, mask=mask, other=0)
    next_order = tl.load(value_order_ptr + k + 1, mask=has_next, other=0)
    ids = tl.load(number_ids_ptr + order, mask=mask, other=0)
    next_ids = tl.load(number_ids_ptr + next_order, mask=has_next, other=0)
    values = tl.load(number_values_ptr + order, mask=mask, other=0.0).to(acc_ptr.dtype.element_ty)
    next_values = tl.load(number_values_ptr + next_order, mask=has_next, other=0.0).to(acc_ptr.dtype.element_ty)
    return ids, values, mask, next_ids, next_values, has_next


@triton.jit
def number_logits(row_ptrs, ids, mask, next_ids, has_next, shift, LOSS: tl.constexpr):
    """``(zn, zn_next)``: each row's number logits in value order minus ``shift`` (-inf in the
    padding), and, for the CDF form, the same one position further (``zn`` otherwise)."""
    zn = tl.load(row_ptrs[:, None] + ids[None, :], mask=mask[None, :], other=float("-inf"))
    zn = zn.to(shift.dtype) - shift[:, None]
    if LOSS == 4:
        zn_next = tl.load(row_ptrs[:, None] + next_ids[None, :], mask=has_next[None, :], other=float("-inf"))
        zn_next = zn_next.to(shift.dtype) - shift[:, None]
    else:
        zn_next = zn
    return zn, zn_next


@triton.jit
def number_token_terms(
    zn, zn_next, mask, has_next, values, next_values, rank, y, squash_min, squash_scale, sigma,
    LOSS: tl.constexpr, SQUASH: tl.constexpr, GAUSSIAN: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """NTL of each row before reweighing, from its number logits ``zn`` (-inf in the padding;
    ``zn_next`` one position further along the value order, read by the CDF form only).

    Returns ``(lse_n, q, loss, dloss, target)``: ``LSE_N``, the softmax over the number tokens, L,
    ``∂L/∂z_j`` (docs/math.md §2.1-2.3) and the target over N (Gaussian §2.5 when GAUSSIAN, else the
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
        g_max = tl.max(g, axis=1)
        g = tl.exp(g - g_max[:, None])
        g_sum = tl.sum(g, axis=1)
        target = g / g_sum[:, None]
    else:
        target = tl.where(k[None, :] == rank[:, None], 1.0, 0.0).to(zn.dtype)
    if LOSS == 0:  # WAS: Σ q_j D(y, v_j)
        distance = tl.abs(y[:, None] - values[None, :])
        if SQUASH:
            distance = tl.where(distance > 0, 1.0 + (distance - squash_min) * squash_scale, 0.0)
        loss = tl.sum(q * distance, axis=1)
        dloss = q * (distance - loss[:, None])
    elif LOSS == 4:  # WAS_CDF: Σ_k |F_q(k) - F_t(k)| gap_k
        # F_q(k) - F_t(k) from its lighter side: the prefix sum of q - t, or minus the suffix sum
        # beyond k (q and t one position further along, each computed like q and t themselves).
        # A confident prediction's tail above the label is then summed directly, never as 1 - q_l
        # from a q_l rounded near 1.
        q_next = tl.exp(zn_next - z_max[:, None]) / total[:, None]
        if GAUSSIAN:
            dn = (next_values[None, :] - y[:, None]) / sigma
            t_next = tl.where(has_next[None, :], tl.exp(-0.5 * dn * dn - g_max[:, None]), 0.0) / g_sum[:, None]
        else:
            t_next = tl.where(k[None, :] + 1 == rank[:, None], 1.0, 0.0).to(zn.dtype)
        prefix = tl.cumsum(q - target, axis=1)
        suffix = -tl.cumsum(q_next - t_next, axis=1, reverse=True)
        lighter_prefix = tl.cumsum(q + target, axis=1) <= tl.cumsum(q_next + t_next, axis=1, reverse=True)
        cdf_diff = tl.where(lighter_prefix, prefix, suffix)
        gaps = tl.where(has_next, next_values - values, 0.0)
        loss = tl.sum(tl.abs(cdf_diff) * gaps[None, :], axis=1)
        slope = tl.where(cdf_diff > 0, 1.0, tl.where(cdf_diff < 0, -1.0, 0.0)) * gaps[None, :]
        # a_j = Σ_{k >= rank(j)} slope_k, a suffix sum
        suffix = tl.sum(slope, axis=1)[:, None] - tl.cumsum(slope, axis=1) + slope
        # a_j - Σ q_i a_i with a measured from the a of the most likely token: that token's own
        # term is then exactly 0, and a confident prediction keeps its gradient's precision
        likeliest = tl.argmax(tl.where(q == q, q, -1.0), axis=1)  # a row without q (NaN) picks any
        suffix -= tl.sum(tl.where(k[None, :] == likeliest[:, None], suffix, 0.0), axis=1)[:, None]
        dloss = q * (suffix - tl.sum(q * suffix, axis=1)[:, None])
    else:  # f(ŷ - y) with f = square, abs or Huber (δ = 1)
        # ŷ - y as Σ q_j (v_j - y): the label's own term is exactly 0, so a prediction close to y
        # keeps its relative precision (a rounded ŷ minus y loses ~eps·|v| absolute)
        offsets = values[None, :] - y[:, None]
        diff = tl.sum(q * offsets, axis=1)
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
        dloss = slope[:, None] * q * (offsets - diff[:, None])
    return lse_n, q, loss, dloss, target


@triton.jit
def store_dense_gradient(row_ptrs, grad_row_ptrs, row_mask, V, shift, log_sum, coefficient,
                         BLOCK_V: tl.constexpr):
    """``grad[k] = coefficient * p_k`` for every column (one read of the row, one write), with
    ``p_k = exp((z_k - shift) - log_sum)``; exactly 0 on rows whose coefficient is 0."""
    cols = tl.arange(0, BLOCK_V)
    for start in range(0, V, BLOCK_V):
        c = start + cols
        col_mask = (c < V)[None, :]
        x = tl.load(row_ptrs[:, None] + c[None, :], mask=col_mask, other=float("-inf"))
        p = tl.exp((x.to(log_sum.dtype) - shift[:, None]) - log_sum[:, None])
        tl.store(
            grad_row_ptrs[:, None] + c[None, :],
            scaled(coefficient[:, None], p).to(grad_row_ptrs.dtype.element_ty),
            mask=col_mask & row_mask[:, None],
        )
