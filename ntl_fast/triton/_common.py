"""Row math and launch settings shared by the Triton kernels of this package.

The kernels work on tiles of ``BLOCK_M`` rows. Number tokens are gathered in *value order*
(``number_ids[value_order[k]]``), so the CDF form of W1 (docs/math.md §2.3) is a cumulative sum along
the tile; every other variant is invariant under that permutation. A label's position in that
order is ``value_rank[number_index[label]]``: one V-table read per row, outside any loop.

Tables wider than MAX_BLOCK_K number tokens are taken in MAX_BLOCK_K-wide tiles (``TILED``
kernels; registers then do not grow with K): a running max and sum give ``LSE_N`` (and the
Gaussian target's normaliser), later sweeps over the tiles form L and the gradient, and WAS_CDF
carries its prefix sums forwards and its suffix sums backwards across tiles. Each sweep gathers
the K number logits again (K reads per row, against V for the row itself). Up to MAX_BLOCK_K the
kernels run the one-tile code, unchanged.

Every kernel takes the table tensors of :meth:`~ntl_fast.NumberTokenTable.kernel_tensors` (the
list all kernel backends receive; ``sorted_gaps`` goes unread here: the kernels difference the
values they gather). Accumulation dtype: :func:`ntl_fast.config.accumulation_dtype`; the kernels
cast to the element type of their loss output, passed to the helpers as ``acc_ptr``.

Rows that count for nothing (an ignored or invalid label, a zero upstream gradient) read no logit:
their loads are masked by an ``active`` row mask, and their gradient rows are written as zeros.
"""

from __future__ import annotations

import contextlib
import os
from typing import Optional

import triton
import triton.language as tl
from torch import Tensor

from ..config import LossConfig, LossKind
from ..table import NumberTokenTable

# The loss variants as named compile-time values (one kernel, specialised per variant), taken from
# the one definition of the codes, ntl_fast.config.LossKind.
WAS = tl.constexpr(LossKind.WAS.value)
MSE = tl.constexpr(LossKind.MSE.value)
MAE = tl.constexpr(LossKind.MAE.value)
HUBER = tl.constexpr(LossKind.HUBER.value)
WAS_CDF = tl.constexpr(LossKind.WAS_CDF.value)
# what a sweep over WAS_CDF's suffix-side tiles does (:func:`cdf_suffix_sweep`)
SUFFIX_LOSS = tl.constexpr(0)
SUFFIX_OFFSET = tl.constexpr(1)
SUFFIX_GRADIENT = tl.constexpr(2)

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# Launch settings. The interpreter costs ~0.3 ms per op per program, so it takes many rows per
# program and small vocabulary chunks (tests then exercise tails). On CUDA a program owns one row
# and streams its vocabulary in chunks (cuda_row_blocks); number-token-only kernels take several rows.
INTERPRET_BLOCK_M = 64
INTERPRET_BLOCK_V = 128
CUDA_BLOCK_V = 2048  # the widest vocabulary chunk (see cuda_row_blocks)
LOGITS_PER_THREAD = 8  # per chunk: one 16-byte load of bf16 (two of fp32)
CUDA_NUMBER_TILE = 2048  # rows x BLOCK_K elements per program of the number-token-only kernel
# The widest number-token tile: a larger table is processed in BLOCK_K-wide tiles (TILED kernels),
# so registers stop growing with K.
MAX_BLOCK_K = 256
CUDA_TILED_NUMBER_TILE = 512  # rows x BLOCK_K elements per program of a tiled number-token-only kernel
# WAS_CDF's tiled sweeps carry about twice the state of the other variants': its number-token-only
# programs take half the rows, and its launches cap ptxas's registers (.maxnreg). Triton declares
# the exact block size (.reqntid); without a cap ptxas then picks its own occupancy target and
# spills the values a sweep leaves idle (row statistics, the label logit, the losses) to reach it,
# while under a cap it keeps them in registers. Per kernel, a cap ptxas fits without a spill
# (benchmarks/triton_aot.py checks it): 64 (4 programs of 8 warps per SM) for the full-row
# forward, 44 for the CE + NTL backward (56 with reweigh: its text mass, spread and coefficients),
# 56 for the NTL backward and the number-token-only kernels. The CE + NTL backward fits 44 because
# its tiled sweeps hold the label rank and kstar as int32 and write the label column before the
# number columns (the label and its gradient dead during the sweeps): 69-72 registers before.
CUDA_CDF_TILED_NUMBER_TILE = 256
CUDA_CDF_TILED_MAX_REGISTERS = dict(forward=64, ce_ntl_backward=44, ce_ntl_backward_reweigh=56, ntl_backward=56,
                                    number_only=56)

# One pass (loss and gradient from one kernel, GRAD). A row of at most CUDA_RESIDENT_BLOCK_V logits
# is held whole in one program's registers (RESIDENT, see cuda_resident_blocks for the measured
# choice): one read and one write of the logits. A wider row (V = 32128 and 128256 among them) is
# streamed twice (statistics, then the gradient sweep); its second read is served by L2 only while
# the rows in flight fit there, so those launches take a persistent grid of one_pass_programs()
# programs that loop over the rows: L2 holds them by construction.
CUDA_RESIDENT_BLOCK_V = 8192
CUDA_RESIDENT_WARPS = 16
CUDA_RESIDENT_MAX_REGISTERS = 128
CUDA_RESIDENT_TILED_FP32_MAX_REGISTERS = 88
CUDA_RESIDENT_TILED_MAX_REGISTERS = 108
INTERPRET_RESIDENT_BLOCK_V = INTERPRET_BLOCK_V  # the interpreter runs both forms (V <= 128 resident)
# A streamed one-pass launch with tiled K (not WAS_CDF, which has its own cap): under no cap ptxas
# picked an occupancy target and spilled 4-8 bytes at 32-40 registers (bf16, reweigh + Gaussian).
CUDA_ONE_PASS_TILED_MAX_REGISTERS = 64
# The NTL backward over full rows (reweigh) with tiled K, likewise: uncapped, ptxas took 32 registers
# and spilled 4-8 bytes (float32); under 40 (six programs of 8 warps per SM) no spill.
CUDA_NTL_BACKWARD_TILED_MAX_REGISTERS = 40
# Device facts when torch cannot report them (an H100 / H200: 50 MB of L2, 132 SMs).
FALLBACK_L2_BYTES = 50 * 2**20
FALLBACK_SM_COUNT = 132
# Programs of a one-pass launch: None = the L2 bound of one_pass_programs(); 0 = one program per
# row block (unbounded); n > 0 = n programs. Set from NTL_FAST_ONE_PASS_PROGRAMS at import.
ONE_PASS_PROGRAMS: Optional[int] = (int(os.environ["NTL_FAST_ONE_PASS_PROGRAMS"])
                                    if os.environ.get("NTL_FAST_ONE_PASS_PROGRAMS") else None)
# The grid of the latest one-pass launch (programs, row blocks, and why): what a benchmark reports.
last_one_pass_grid: dict = {}

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


def cuda_row_blocks(vocab_size: int) -> tuple:
    """``(BLOCK_V, num_warps)`` of a CUDA program that streams one row of ``vocab_size`` logits.

    Each thread keeps LOGITS_PER_THREAD running maxima and sums (one vector load per chunk, no
    cross-thread reduction until the row ends), so ``BLOCK_V = 256 * num_warps``:

    ==================  =========  =========
    V                   BLOCK_V    num_warps
    ==================  =========  =========
    <= 256              next_pow2  1
    257 - 512           512        2
    513 - 1024          1024       4
    >= 1025             2048       8
    ==================  =========  =========

    Wider chunks (4096 columns) made ptxas spill the standalone NTL forward's three running sums
    (reweighing) at K = 10 (sm_90, bf16); benchmarks/triton_aot.py gates every specialisation on
    that and records each launch's ``blocks`` and ``num_warps`` per V in its table.

    The one-pass forward instead holds rows of at most CUDA_RESIDENT_BLOCK_V = 8192 logits whole
    (:func:`cuda_resident_blocks`: one block of next_pow2(V), 16 warps); these chunks serve wider
    rows, on the L2-bounded grid of :func:`one_pass_programs`.
    """
    block_v = min(CUDA_BLOCK_V, triton.next_power_of_2(vocab_size))
    return block_v, max(1, block_v // (32 * LOGITS_PER_THREAD))


def cuda_resident_blocks(vocab_size: int) -> Optional[tuple]:
    """``(BLOCK_V, num_warps)`` of a one-pass CUDA program that holds its whole row in registers,
    or None when the row is too wide (it is then streamed, :func:`cuda_row_blocks`, on the grid of
    :func:`one_pass_programs`).

    ``BLOCK_V = next_pow2(V)`` up to CUDA_RESIDENT_BLOCK_V = 8192 with CUDA_RESIDENT_WARPS = 16
    (16 logits per thread; fewer warps below 4096 columns, as cuda_row_blocks) and a register cap
    of CUDA_RESIDENT_MAX_REGISTERS = 128 (the most 512 threads get; without it ptxas picks a
    64-register occupancy target and spills 12-16 bytes at K = 1110), 88 for float32 rows with
    tiled K (CUDA_RESIDENT_TILED_FP32_MAX_REGISTERS: under 128 ptxas took 95-96 registers on sm_80,
    more than K = 10's 76-79 + 16; under 88 it takes 72-80, no spill) and 108 for bfloat16 rows
    with tiled K (CUDA_RESIDENT_TILED_MAX_REGISTERS: under 128 ptxas took 113 on sm_80 for the
    variants without reweigh, K = 10's 95-96 + 17; under 108 it takes 93-108 on sm_80 and 94-96 on
    sm_90, no spill; one program per SM either way). Measured with
    benchmarks/triton_aot.py (triton 3.8, every loss, reweigh, Gaussian and in-place switch, bf16
    and fp32, K = 10 and 1110): no spill on sm_90 nor sm_80 at BLOCK_V = 8192 (the table's one-pass
    rows at V = 8000). Wider blocks spill: 16384 (16 warps) spills WAS_CDF (bf16, 20-36 bytes);
    32768 spills at 16 warps (reweigh 8-192 bytes, WAS_CDF 72-204), at 32 warps (36-244) and at
    8 warps (255 registers and 230-280 bytes). WAS_CDF with tiled K (K > MAX_BLOCK_K) is never
    held: at 8192 its tiled sweeps spill 4-28 bytes under the 128 cap (launch_settings streams it).
    """
    block_v = triton.next_power_of_2(vocab_size)
    if block_v > CUDA_RESIDENT_BLOCK_V:
        return None
    return block_v, max(1, min(CUDA_RESIDENT_WARPS, block_v // (32 * LOGITS_PER_THREAD)))


def launch_settings(num_rows: int, vocab_size: int, num_numbers: int, full_row: bool, cdf: bool = False,
                    backward: Optional[str] = None, one_pass: bool = False, reweigh: bool = False,
                    element_size: int = 2) -> dict:
    """``BLOCK_M``, ``BLOCK_V``, ``BLOCK_K``, ``TILED`` and ``num_warps`` for one launch (shapes only,
    but for ``cdf``: a tiled CUDA WAS_CDF launch also gets ``maxnreg``, by kernel kind: ``backward``
    is None, "ce_ntl_backward" or "ntl_backward"; its number-token-only programs take fewer rows).

    ``BLOCK_K`` is ``next_pow2(K)`` capped at MAX_BLOCK_K; ``TILED`` says whether the K number tokens
    take several tiles (``K <= MAX_BLOCK_K`` is one tile: the kernels' untiled code). ``one_pass``
    (the forward with GRAD) adds ``RESIDENT``: whether the row fits in one block, held in registers
    (next_pow2(V) <= CUDA_RESIDENT_BLOCK_V; INTERPRET_RESIDENT_BLOCK_V in the interpreter)."""
    block_k = triton.next_power_of_2(num_numbers)
    tiled = block_k > MAX_BLOCK_K
    if tiled:
        block_k = MAX_BLOCK_K
    resident = dict(RESIDENT=False) if one_pass else {}
    if _launch_profile == "interpret":
        block_v = min(INTERPRET_BLOCK_V, triton.next_power_of_2(vocab_size))
        if one_pass:
            resident = dict(RESIDENT=triton.next_power_of_2(vocab_size) <= INTERPRET_RESIDENT_BLOCK_V)
        return dict(BLOCK_M=INTERPRET_BLOCK_M, BLOCK_V=block_v, BLOCK_K=block_k, TILED=tiled, num_warps=1,
                    **resident)
    block_v, warps = cuda_row_blocks(vocab_size)
    cdf = cdf and tiled
    if one_pass and full_row and not cdf and cuda_resident_blocks(vocab_size) is not None:
        block_v, warps = cuda_resident_blocks(vocab_size)
        cap = CUDA_RESIDENT_MAX_REGISTERS
        if tiled:
            cap = CUDA_RESIDENT_TILED_FP32_MAX_REGISTERS if element_size >= 4 else CUDA_RESIDENT_TILED_MAX_REGISTERS
        return dict(BLOCK_M=1, BLOCK_V=block_v, BLOCK_K=block_k, TILED=tiled, num_warps=warps, RESIDENT=True,
                    maxnreg=cap)
    kind = (backward or "forward") if full_row else "number_only"
    if reweigh and f"{kind}_reweigh" in CUDA_CDF_TILED_MAX_REGISTERS:
        kind = f"{kind}_reweigh"
    cap = dict(maxnreg=CUDA_CDF_TILED_MAX_REGISTERS[kind]) if cdf else {}
    if one_pass and tiled and full_row and not cdf:  # see CUDA_ONE_PASS_TILED_MAX_REGISTERS
        cap = dict(maxnreg=CUDA_ONE_PASS_TILED_MAX_REGISTERS)
    if backward == "ntl_backward" and tiled and full_row and not cdf:
        cap = dict(maxnreg=CUDA_NTL_BACKWARD_TILED_MAX_REGISTERS)
    if full_row:
        return dict(BLOCK_M=1, BLOCK_V=block_v, BLOCK_K=block_k, TILED=tiled, num_warps=warps, **cap, **resident)
    tile = (CUDA_CDF_TILED_NUMBER_TILE if cdf else CUDA_TILED_NUMBER_TILE) if tiled else CUDA_NUMBER_TILE
    block_m = max(1, min(32, tile // block_k))
    return dict(BLOCK_M=block_m, BLOCK_V=block_v, BLOCK_K=block_k, TILED=tiled, num_warps=4, **cap)


def device_facts(device) -> tuple:
    """``(L2 bytes, SM count)`` of a CUDA device, else FALLBACK_L2_BYTES and FALLBACK_SM_COUNT."""
    import torch

    if getattr(device, "type", None) == "cuda":
        properties = torch.cuda.get_device_properties(device)
        return (getattr(properties, "L2_cache_size", 0) or FALLBACK_L2_BYTES,
                properties.multi_processor_count or FALLBACK_SM_COUNT)
    return FALLBACK_L2_BYTES, FALLBACK_SM_COUNT


def one_pass_programs(num_blocks: int, block_rows: int, row_bytes: int, grad_row_bytes: int, resident: bool,
                      device=None) -> tuple:
    """``(P, why)``: the programs of a one-pass launch over ``num_blocks`` blocks of ``block_rows``
    rows; program ``i`` takes blocks ``i, i + P, ...``.

    A resident row (read once) needs no bound: P = num_blocks. A streamed row is read a second
    time by the gradient sweep, which hits L2 by construction when the rows in flight fit in half
    of it: ``P x block_rows x (row_bytes + grad_row_bytes) <= L2 / 2`` (``grad_row_bytes`` is 0 in
    place), rounded down to whole waves of one program per SM when at least one wave fits. At V =
    128256 on a 50 MB L2 that is 51 bf16 programs (102 in place), 25 fp32 (51 in place): under one
    per SM, the price of the guarantee; at V = 32128, 132 bf16 (one wave), 101 fp32.
    ONE_PASS_PROGRAMS overrides P (0: unbounded)."""
    if ONE_PASS_PROGRAMS is not None:
        programs = ONE_PASS_PROGRAMS or num_blocks
        why = "ONE_PASS_PROGRAMS" if ONE_PASS_PROGRAMS else "unbounded (ONE_PASS_PROGRAMS = 0)"
    elif resident:
        programs, why = num_blocks, "resident rows: one program per row block"
    else:
        l2_bytes, sm_count = device_facts(device)
        fit = max(1, (l2_bytes // 2) // max(1, block_rows * (row_bytes + grad_row_bytes)))
        programs = fit // sm_count * sm_count if fit >= sm_count else fit
        why = (f"L2 bound: {fit} programs x {block_rows} rows x {row_bytes + grad_row_bytes} bytes fit in half of "
               f"{l2_bytes} bytes ({sm_count} SMs)")
    return max(1, min(num_blocks, programs)), why


def launch_rows(kernel, logits: Tensor, num_numbers: int, full_row: bool, *args, backward: Optional[str] = None,
                **constants) -> None:
    """Launches ``kernel`` over the rows of ``logits`` (nothing for M = 0) with this profile's
    settings (:func:`launch_settings`): one program per ``BLOCK_M`` rows, or, for the one-pass
    forward (``GRAD``; its ``args`` hold the gradient buffer), :func:`one_pass_programs` programs
    looping over them (recorded in ``last_one_pass_grid``)."""
    num_rows, vocab_size = logits.shape
    if num_rows == 0:
        return
    cdf = constants.get("LOSS") == LossKind.WAS_CDF.value
    one_pass = bool(constants.get("GRAD"))
    settings = launch_settings(num_rows, vocab_size, num_numbers, full_row, cdf, backward, one_pass,
                               bool(constants.get("REWEIGH")), logits.element_size())
    num_blocks = triton.cdiv(num_rows, settings["BLOCK_M"])
    grid = num_blocks
    if one_pass:
        row_bytes = vocab_size * logits.element_size()
        grad_row_bytes = 0 if constants.get("INPLACE") else row_bytes
        grid, why = one_pass_programs(num_blocks, settings["BLOCK_M"], row_bytes, grad_row_bytes,
                                      settings["RESIDENT"], logits.device)
        last_one_pass_grid.clear()
        last_one_pass_grid.update(programs=grid, row_blocks=num_blocks, resident=settings["RESIDENT"], why=why)
    kernel[(grid,)](*args, **constants, **settings)


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
    switches = dict(LOSS=LossKind.of(loss).value, SQUASH=squash, REWEIGH=reweigh,
                    GAUSSIAN=gaussian_sigma is not None)
    return scalars, switches


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
    LossKind.of(loss)  # ValueError naming the variants


# --------------------------------------------------------------------------------- row helpers
@triton.jit
def row_labels(labels_ptr, stride_label, number_index_ptr, value_rank_ptr, number_values_ptr, M, V, ignore_index,
               BLOCK_M: tl.constexpr, block=None):
    """This program's rows and their labels, classified (docs/math.md §2, §4); a bad label never
    indexes memory.

    Returns ``(rows, row_mask, label, in_range, bad, valid, rank, y)``: the rows (int64; clamped
    to M - 1 so every load is in bounds) and which are real; the label clamped into ``[0, V)``; whether
    it counts for CE; whether it is neither in range nor ignore_index; whether the row is
    NTL-valid; the label's position among the number tokens sorted by value; its value.
    ``ignore_index`` may lie inside ``[0, V)``: such labels are ignored, not scored. ``block``: the
    row block (of BLOCK_M rows) of a program that loops over several; the program id by default.
    """
    if block is None:
        rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    else:  # block * BLOCK_M < M + BLOCK_M: no int32 overflow before the widening
        rows = (block * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    row_mask = rows < M
    rows = tl.minimum(rows, M - 1)
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
    return rows, row_mask, label, in_range, bad, valid, rank, y


@triton.jit
def row_upstream(grad_ce_ptr, grad_ntl_ptr, rows, row_mask, in_range, valid, acc_ptr):
    """Each row's upstream gradients of CE and NTL (0 where the row does not count for them) and
    ``active``: whether the row has a gradient at all (only those rows read their logits)."""
    upstream_ce = tl.where(in_range, tl.load(grad_ce_ptr + rows).to(acc_ptr.dtype.element_ty), 0.0)
    upstream_ntl = tl.where(valid, tl.load(grad_ntl_ptr + rows).to(acc_ptr.dtype.element_ty), 0.0)
    return upstream_ce, upstream_ntl, row_mask & ((upstream_ce != 0) | (upstream_ntl != 0))


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
def row_logsumexp(row_ptrs, active, V, is_number_ptr, acc_ptr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr,
                  TEXT: tl.constexpr):
    """Row statistics from one read of each active row, in BLOCK_V chunks.

    Every lane (thread element) keeps its own running max and sum over the columns it sees, one
    ``exp`` per logit (``exp(-|x - max|)`` rescales whichever side is smaller), and the lanes are
    combined by one reduction when the row ends: no cross-thread barrier inside the loop.

    Returns ``(shift, log_sum, log_text)``: the row max (0 where not finite), ``log Σ_k exp(z_k -
    shift)`` (so ``LSE_V = shift + log_sum``) and, with TEXT, the same sum over the non-number
    tokens only (``1 - m = exp(log_text - log_sum)`` without cancellation, docs/math.md §2.4).
    Callers form ``(z - shift) - log_sum``, never ``z - LSE_V``: a rounded LSE_V of large
    magnitude would cost the shift invariance of §4. Inactive rows read nothing (-inf sums).
    """
    cols = tl.arange(0, BLOCK_V)
    lane_max = tl.full([BLOCK_M, BLOCK_V], float("-inf"), acc_ptr.dtype.element_ty)
    lane_sum = tl.zeros([BLOCK_M, BLOCK_V], acc_ptr.dtype.element_ty)
    lane_text = tl.zeros([BLOCK_M, BLOCK_V], acc_ptr.dtype.element_ty)
    for start in range(0, V, BLOCK_V):
        c = start + cols
        x = tl.load(row_ptrs[:, None] + c[None, :], mask=active[:, None] & (c < V)[None, :], other=float("-inf"))
        x = x.to(acc_ptr.dtype.element_ty)
        above = x > lane_max
        # exp(-|x - max|): the old sum's rescale when x is the new max, x's term otherwise; a -inf
        # logit adds 0 (also while the lane max is still -inf); +inf and NaN stay non-finite
        t = tl.where(x == float("-inf"), 0.0, tl.exp(-tl.abs(x - lane_max)))
        lane_sum = tl.where(above, lane_sum * t + 1.0, lane_sum + t)
        if TEXT:
            text = tl.load(is_number_ptr + c, mask=c < V, other=1) == 0
            lane_text = tl.where(above, lane_text * t + tl.where(text, 1.0, 0.0)[None, :],
                                 lane_text + tl.where(text[None, :], t, 0.0))
        lane_max = tl.maximum(lane_max, x)
    shift = finite_or_zero(tl.max(lane_max, axis=1))
    weight = tl.exp(lane_max - shift[:, None])  # 0 on lanes that saw only -inf
    log_sum = tl.log(tl.sum(lane_sum * weight, axis=1))
    if TEXT:
        log_text = tl.log(tl.sum(lane_text * weight, axis=1))
    else:
        log_text = log_sum
    return shift, log_sum, log_text


@triton.jit
def row_logsumexp_resident(row_ptrs, active, V, is_number_ptr, acc_ptr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr,
                           TEXT: tl.constexpr):
    """:func:`row_logsumexp` of rows that fit in one BLOCK_V-wide block (``V <= BLOCK_V``): the row is
    loaded once and kept, so the gradient is formed from these registers (no second read).

    Returns ``(x, shift, log_sum, log_text)`` with ``x`` the row as loaded, in the logits' dtype
    (a bf16 row takes half the registers of its float32 values; -inf past V and on inactive
    rows)."""
    c = tl.arange(0, BLOCK_V)
    x = tl.load(row_ptrs[:, None] + c[None, :], mask=active[:, None] & (c < V)[None, :], other=float("-inf"))
    shift = finite_or_zero(tl.max(x.to(acc_ptr.dtype.element_ty), axis=1))
    e = tl.exp(x.to(acc_ptr.dtype.element_ty) - shift[:, None])  # 0 at -inf; +inf and NaN stay non-finite
    if TEXT:
        text = tl.load(is_number_ptr + c, mask=c < V, other=1) == 0
        log_text = tl.log(tl.sum(tl.where(text[None, :], e, 0.0), axis=1))
    log_sum = tl.log(tl.sum(e, axis=1))
    if not TEXT:
        log_text = log_sum
    return x, shift, log_sum, log_text


@triton.jit
def number_columns(number_ids_ptr, number_values_ptr, value_order_ptr, K, like, BLOCK_K: tl.constexpr):
    """The number tokens in value order, BLOCK_K wide: ``(ids, values, mask)`` and the same one
    position further along the order, ``(next_ids, next_values, has_next)`` (for the CDF form);
    values in the dtype of ``like``."""
    k = tl.arange(0, BLOCK_K)
    mask = k < K
    has_next = (k + 1) < K
    order = tl.load(value_order_ptr + k, mask=mask, other=0)
    next_order = tl.load(value_order_ptr + k + 1, mask=has_next, other=0)
    ids = tl.load(number_ids_ptr + order, mask=mask, other=0)
    next_ids = tl.load(number_ids_ptr + next_order, mask=has_next, other=0)
    values = tl.load(number_values_ptr + order, mask=mask, other=0.0).to(like.dtype)
    next_values = tl.load(number_values_ptr + next_order, mask=has_next, other=0.0).to(like.dtype)
    return ids, values, mask, next_ids, next_values, has_next


@triton.jit
def number_logits(row_ptrs, active, ids, mask, next_ids, has_next, shift, LOSS: tl.constexpr):
    """``(zn, zn_next)``: each active row's number logits in value order minus ``shift`` (-inf in
    the padding), and, for the CDF form, the same one position further (``zn`` otherwise)."""
    zn = tl.load(row_ptrs[:, None] + ids[None, :], mask=active[:, None] & mask[None, :], other=float("-inf"))
    zn = zn.to(shift.dtype) - shift[:, None]
    if LOSS == WAS_CDF:
        zn_next = tl.load(row_ptrs[:, None] + next_ids[None, :], mask=active[:, None] & has_next[None, :],
                          other=float("-inf"))
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
    if LOSS == WAS:  # WAS: Σ q_j D(y, v_j)
        distance = gradient_variable(values[None, :], y[:, None], squash_min, squash_scale, LOSS, SQUASH)
        loss = tl.sum(q * distance, axis=1)
        dloss = centred_on_likeliest(q, distance, k)
    elif LOSS == WAS_CDF:  # WAS_CDF: Σ_k |F_q(k) - F_t(k)| gap_k
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
        if LOSS == MSE:
            loss = diff * diff
            slope = 2.0 * diff
        elif LOSS == MAE:
            loss = tl.abs(diff)
            slope = sign
        else:
            small = tl.abs(diff) < 1.0
            loss = tl.where(small, 0.5 * diff * diff, tl.abs(diff) - 0.5)
            slope = tl.where(small, diff, sign)
        dloss = slope[:, None] * centred_on_likeliest(q, values[None, :] + tl.zeros_like(q), k)
    return lse_n, q, loss, dloss, target


@triton.jit
def centred_on_likeliest(q, x, k):
    """``q_j (x_j - Σ_i q_i x_i)`` (x: v for the regression losses, D(y, v) for WAS; k the tile's
    positions), formed as ``q_j ((x_j - x_l) - Σ_i q_i (x_i - x_l))`` with l the likeliest token:
    that token's own term is then exactly 0, and a confident prediction far from y keeps its
    gradient's precision (``x_l - E_q[x]`` taken directly cancels down to rounding noise of |x|).
    (An argmax: ``x_l`` as a max over the tokens at the largest logit instead made ptxas spill the
    number-token-only Huber backward on sm_80.)"""
    likeliest = tl.argmax(tl.where(q == q, q, -1.0), axis=1)  # a row without q (NaN) picks any
    x_l = tl.sum(tl.where(k[None, :] == likeliest[:, None], x, 0.0), axis=1)
    from_likeliest = x - x_l[:, None]
    return q * (from_likeliest - tl.sum(q * from_likeliest, axis=1)[:, None])


@triton.jit
def row_number_terms(row_ptrs, active, shift, rank, y, number_ids_ptr, number_values_ptr, value_order_ptr, K,
                     squash_min, squash_scale, sigma, LOSS: tl.constexpr, SQUASH: tl.constexpr,
                     GAUSSIAN: tl.constexpr, BLOCK_K: tl.constexpr):
    """The number-token part of each row: gathers its K number logits (active rows only) and
    returns ``(ids, k_mask, zn, lse_n, loss, dloss, target)`` of :func:`number_token_terms`, with
    ``zn`` the number logits in value order minus ``shift``."""
    ids, values, k_mask, next_ids, next_values, has_next = number_columns(
        number_ids_ptr, number_values_ptr, value_order_ptr, K, shift, BLOCK_K
    )
    zn, zn_next = number_logits(row_ptrs, active, ids, k_mask, next_ids, has_next, shift, LOSS)
    lse_n, q, loss, dloss, target = number_token_terms(
        zn, zn_next, k_mask, has_next, values, next_values, rank, y.to(zn.dtype), squash_min, squash_scale, sigma,
        LOSS, SQUASH, GAUSSIAN, BLOCK_K,
    )
    return ids, k_mask, zn, lse_n, loss, dloss, target


@triton.jit
def number_tile(row_ptrs, active, start, shift, y, number_ids_ptr, number_values_ptr, value_order_ptr, K, sigma,
                GAUSSIAN: tl.constexpr, BLOCK_K: tl.constexpr):
    """The BLOCK_K number tokens at value-order positions ``start + arange(BLOCK_K)`` (a tile of a
    TILED kernel): ``(k, ids, mask, values, zn, g)`` with ``zn`` the number logits minus ``shift``
    (-inf in the padding and on inactive rows) and, with GAUSSIAN, ``g`` the log of the unnormalised
    Gaussian target (§2.5; -inf in the padding)."""
    k = start + tl.arange(0, BLOCK_K)
    mask = k < K
    order = tl.load(value_order_ptr + k, mask=mask, other=0)
    ids = tl.load(number_ids_ptr + order, mask=mask, other=0)
    values = tl.load(number_values_ptr + order, mask=mask, other=0.0).to(shift.dtype)
    zn = tl.load(row_ptrs[:, None] + ids[None, :], mask=active[:, None] & mask[None, :], other=float("-inf"))
    zn = zn.to(shift.dtype) - shift[:, None]
    if GAUSSIAN:
        d = (values[None, :] - y[:, None]) / sigma
        g = tl.where(mask[None, :], -0.5 * d * d, float("-inf"))
    else:
        g = zn
    return k, ids, mask, values, zn, g


@triton.jit
def online_exp_sum(run_max, run_sum, x):
    """Folds the tile ``x`` into a running ``(max, Σ exp(x - max))`` per row; a row that has seen
    only -inf keeps ``(-inf, 0)``, and a +inf or NaN stays non-finite as in one tile."""
    new_max = tl.maximum(run_max, tl.max(x, axis=1))
    base = tl.where(new_max == float("-inf"), 0.0, new_max)
    run_sum = run_sum * tl.exp(run_max - base) + tl.sum(tl.exp(x - base[:, None]), axis=1)
    return new_max, run_sum


@triton.jit
def tiled_number_summary(row_ptrs, active, shift, rank, y, number_ids_ptr, number_values_ptr, value_order_ptr, K,
                         squash_min, squash_scale, sigma, LOSS: tl.constexpr, SQUASH: tl.constexpr,
                         GAUSSIAN: tl.constexpr, BLOCK_K: tl.constexpr):
    """The row-level number-token quantities of :func:`number_token_terms` for K > BLOCK_K, in
    BLOCK_K tiles.

    One sweep folds each tile into a running max and sum of the number logits (and of the Gaussian
    target's exponents); a second forms ``q`` and the target per tile and sums L's terms. Returns
    ``(z_max, total, lse_n, g_max, g_sum, loss, diff, target_zn, kstar, a_total, a_ref)``: ``q_k =
    exp(zn_k - z_max) / total``, ``t_k = exp(g_k - g_max) / g_sum`` (GAUSSIAN), L, ``ŷ - y = Σ q_k
    (v_k - y)`` (the regression losses), ``Σ_k t_k zn_k`` (the Gaussian CE's target term) and the
    gradient's origin: for WAS_CDF the values of :func:`cdf_loss_tiled` (``kstar, a_total, a_ref``);
    for the others ``a_ref = x_l``, x at the likeliest token l (x: v, or D(y, v) for WAS), and
    ``a_total = Σ_k q_k (x_k - x_l)`` (kstar unused), as :func:`centred_on_likeliest` forms them."""
    z_max = tl.zeros_like(shift) + float("-inf")
    total = tl.zeros_like(shift)
    g_max = tl.zeros_like(shift) + float("-inf")
    g_sum = tl.zeros_like(shift)
    likeliest = tl.zeros_like(rank)
    for start in range(0, K, BLOCK_K):
        k, ids, mask, values, zn, g = number_tile(row_ptrs, active, start, shift, y, number_ids_ptr,
                                                  number_values_ptr, value_order_ptr, K, sigma, GAUSSIAN, BLOCK_K)
        # the first position of the largest number logit (the largest q), in [0, K)
        tile_max = tl.max(zn, axis=1)
        tile_first = tl.min(tl.where(zn == tile_max[:, None], k[None, :], K), axis=1).to(rank.dtype)
        likeliest = tl.where(tile_max > z_max, tile_first, likeliest)
        z_max, total = online_exp_sum(z_max, total, zn)
        if GAUSSIAN:
            g_max, g_sum = online_exp_sum(g_max, g_sum, g)
    lse_n = z_max + tl.log(total)
    loss = tl.zeros_like(shift)
    diff = tl.zeros_like(shift)
    target_zn = tl.zeros_like(shift)
    if LOSS == WAS_CDF:
        loss, kstar, a_total, a_ref = cdf_loss_tiled(
            row_ptrs, active, shift, rank, y, likeliest, number_ids_ptr, number_values_ptr, value_order_ptr, K,
            sigma, z_max, total, g_max, g_sum, GAUSSIAN, BLOCK_K,
        )
    else:  # x at the likeliest token: one gathered value per row, no reduction
        kstar = tl.zeros_like(rank)
        a_total = tl.zeros_like(shift)
        v_l = tl.load(number_values_ptr + tl.load(value_order_ptr + likeliest)).to(shift.dtype)
        a_ref = gradient_variable(v_l, y, squash_min, squash_scale, LOSS, SQUASH)
    for start in range(0, K, BLOCK_K):
        k, ids, mask, values, zn, g = number_tile(row_ptrs, active, start, shift, y, number_ids_ptr,
                                                  number_values_ptr, value_order_ptr, K, sigma, GAUSSIAN, BLOCK_K)
        q = tl.exp(zn - z_max[:, None]) / total[:, None]
        if GAUSSIAN:
            target = tl.exp(g - g_max[:, None]) / g_sum[:, None]
            target_zn += tl.sum(target * tl.where(mask[None, :], zn, 0.0), axis=1)
        if LOSS != WAS_CDF:
            x = gradient_variable(values[None, :], y[:, None], squash_min, squash_scale, LOSS, SQUASH)
            a_total += tl.sum(tl.where(mask[None, :], q * (x - a_ref[:, None]), 0.0), axis=1)
            if LOSS == WAS:
                loss += tl.sum(tl.where(mask[None, :], q * x, 0.0), axis=1)
            else:
                diff += tl.sum(tl.where(mask[None, :], q * (values[None, :] - y[:, None]), 0.0), axis=1)
    if (LOSS != WAS) and (LOSS != WAS_CDF):
        if LOSS == MSE:
            loss = diff * diff
        elif LOSS == MAE:
            loss = tl.abs(diff)
        else:
            loss = tl.where(tl.abs(diff) < 1.0, 0.5 * diff * diff, tl.abs(diff) - 0.5)
    return z_max, total, lse_n, g_max, g_sum, loss, diff, target_zn, kstar, a_total, a_ref


@triton.jit
def gradient_variable(v, y, squash_min, squash_scale, LOSS: tl.constexpr, SQUASH: tl.constexpr):
    """x of the gradient ``q_k (x_k - E_q[x])`` at values ``v`` for labels ``y`` (broadcast
    together): D(y, v) for WAS (§2.2, squashed with SQUASH), v for the regression losses."""
    if LOSS == WAS:
        x = tl.abs(y - v)
        if SQUASH:
            x = tl.where(x > 0, 1.0 + (x - squash_min) * squash_scale, 0.0)
    else:
        x = v + tl.zeros_like(y)
    return x


@triton.jit
def cdf_tile(row_ptrs, active, start, shift, rank, y, number_ids_ptr, number_values_ptr, value_order_ptr, K, sigma,
             z_max, total, g_max, g_sum, region, GAUSSIAN: tl.constexpr, NEXT: tl.constexpr, BLOCK_K: tl.constexpr):
    """One tile of the CDF form (WAS_CDF, K > BLOCK_K): ``(k, ids, inside, gaps, zn, q, t, q_next,
    t_next)`` as in :func:`number_token_terms`, read only where ``region`` (rows x tile) holds
    (``inside``: region and a real position; zn is -inf and q, t 0 elsewhere). With NEXT, the next
    position's q and t, except at the tile's last position (0 there: the next tile's first, which
    the caller carries); without, no next values (0)."""
    k = start + tl.arange(0, BLOCK_K)
    mask = k < K
    order = tl.load(value_order_ptr + k, mask=mask, other=0)
    ids = tl.load(number_ids_ptr + order, mask=mask, other=0)
    values = tl.load(number_values_ptr + order, mask=mask, other=0.0).to(shift.dtype)
    has_next = (k + 1) < K
    next_values = tl.load(number_values_ptr + tl.load(value_order_ptr + k + 1, mask=has_next, other=0),
                          mask=has_next, other=0.0).to(shift.dtype)
    inside = region & mask[None, :]
    zn = tl.load(row_ptrs[:, None] + ids[None, :], mask=active[:, None] & inside, other=float("-inf"))
    zn = zn.to(shift.dtype) - shift[:, None]
    q = tl.where(inside, tl.exp(zn - z_max[:, None]) / total[:, None], 0.0)
    if GAUSSIAN:
        d = (values[None, :] - y[:, None]) / sigma
        t = tl.where(inside, tl.exp(-0.5 * d * d - g_max[:, None]) / g_sum[:, None], 0.0)
    else:
        t = tl.where(inside & (k[None, :] == rank[:, None]), 1.0, 0.0).to(q.dtype)
    if NEXT:
        in_tile = has_next & (tl.arange(0, BLOCK_K) < BLOCK_K - 1)
        inside_next = region & in_tile[None, :]
        next_ids = tl.load(number_ids_ptr + tl.load(value_order_ptr + k + 1, mask=in_tile, other=0),
                           mask=in_tile, other=0)
        zn_next = tl.load(row_ptrs[:, None] + next_ids[None, :], mask=active[:, None] & inside_next,
                          other=float("-inf"))
        q_next = tl.where(inside_next, tl.exp((zn_next.to(shift.dtype) - shift[:, None]) - z_max[:, None])
                          / total[:, None], 0.0)
        if GAUSSIAN:
            dn = (next_values[None, :] - y[:, None]) / sigma
            t_next = tl.where(inside_next, tl.exp(-0.5 * dn * dn - g_max[:, None]) / g_sum[:, None], 0.0)
        else:
            t_next = tl.where(inside_next & (k[None, :] + 1 == rank[:, None]), 1.0, 0.0).to(q.dtype)
    else:
        q_next = q * 0.0
        t_next = q_next
    gaps = tl.where(has_next, next_values - values, 0.0)
    return k, ids, inside, gaps, zn, q, t, q_next, t_next


@triton.jit
def sign_of(x):
    return tl.where(x > 0, 1.0, tl.where(x < 0, -1.0, 0.0))


@triton.jit
def cdf_prefix_tile(row_ptrs, active, start, shift, rank, y, number_ids_ptr, number_values_ptr, value_order_ptr, K,
                    sigma, z_max, total, g_max, g_sum, kstar, a_total, carry_p, carry_slope,
                    GAUSSIAN: tl.constexpr, BLOCK_K: tl.constexpr):
    """A tile of the positions ``k < kstar`` (where ``F_q - F_t`` is taken from its prefix sum):
    ``(k, ids, inside, zn, q, t, prefix, gaps, a)`` with ``a_k = Σ_{j >= k} slope_j = a_total - Σ_{j < k}
    slope_j``, and the carries of the prefix sums of ``q - t`` and of the slope into the next tile."""
    k0 = start + tl.arange(0, BLOCK_K)
    region = k0[None, :] < kstar[:, None]
    k, ids, inside, gaps, zn, q, t, q_next, t_next = cdf_tile(
        row_ptrs, active, start, shift, rank, y, number_ids_ptr, number_values_ptr, value_order_ptr, K, sigma,
        z_max, total, g_max, g_sum, region, GAUSSIAN, False, BLOCK_K,
    )
    d = q - t
    prefix = tl.cumsum(d, axis=1) + carry_p[:, None]
    slope = tl.where(inside, sign_of(prefix) * gaps[None, :], 0.0)
    a = a_total[:, None] - (tl.cumsum(slope, axis=1) - slope + carry_slope[:, None])
    return k, ids, inside, zn, q, t, prefix, gaps, a, carry_p + tl.sum(d, axis=1), carry_slope + tl.sum(slope, axis=1)


@triton.jit
def cdf_suffix_tile(row_ptrs, active, start, shift, rank, y, number_ids_ptr, number_values_ptr, value_order_ptr, K,
                    sigma, z_max, total, g_max, g_sum, kstar, carry_s, carry_a, carry_first,
                    GAUSSIAN: tl.constexpr, BLOCK_K: tl.constexpr):
    """A tile of the positions ``k >= kstar`` (``F_q - F_t`` as minus the suffix sum beyond k),
    taken from the last tile backwards: ``(k, ids, inside, zn, q, t, suffix, gaps, a)`` with ``a_k =
    Σ_{j >= k} slope_j``, and the carries into the previous tile: the suffix sums and ``q - t`` at
    this tile's first position (the previous tile's last next value: a tile never reads a column
    of the tile after it, which a gradient sweep may have overwritten)."""
    lane = tl.arange(0, BLOCK_K)
    region = (start + lane)[None, :] >= kstar[:, None]
    k, ids, inside, gaps, zn, q, t, q_next, t_next = cdf_tile(
        row_ptrs, active, start, shift, rank, y, number_ids_ptr, number_values_ptr, value_order_ptr, K, sigma,
        z_max, total, g_max, g_sum, region, GAUSSIAN, True, BLOCK_K,
    )
    dn = tl.where(region & (lane == BLOCK_K - 1)[None, :], carry_first[:, None], q_next - t_next)
    suffix = -(tl.cumsum(dn, axis=1, reverse=True) + carry_s[:, None])
    slope = tl.where(inside, sign_of(suffix) * gaps[None, :], 0.0)
    a = tl.cumsum(slope, axis=1, reverse=True) + carry_a[:, None]
    first = tl.sum(tl.where((lane == 0)[None, :], q - t, 0.0), axis=1)
    return (k, ids, inside, zn, q, t, suffix, gaps, a, carry_s + tl.sum(dn, axis=1), carry_a + tl.sum(slope, axis=1),
            first)


@triton.jit
def cdf_suffix_sweep(row_ptrs, active, shift, rank, y, likeliest, a_ref, number_ids_ptr, number_values_ptr,
                     value_order_ptr, K, sigma, z_max, total, g_max, g_sum, kstar, MODE: tl.constexpr,
                     GAUSSIAN: tl.constexpr, BLOCK_K: tl.constexpr, grad_row_ptrs=None, row_mask=None, offset=None,
                     valid=None, log_sum=None, mass=None, text_mass=None, spread=None, upstream_ce=None,
                     upstream_ntl=None, REWEIGH: tl.constexpr = False):
    """The suffix-side tiles of WAS_CDF (``k >= kstar``), from the last tile backwards (a tile
    never reads a column of the tile after it, which a gradient sweep may have overwritten).
    Returns ``(s, at_likeliest, Σ slope)`` over them, where by ``MODE``:

    * ``SUFFIX_LOSS``: ``s = Σ |F_q - F_t| gap`` and ``at_likeliest`` is ``a`` at the likeliest;
    * ``SUFFIX_OFFSET``: ``s = Σ q_j (a_j - a_ref)`` (:func:`cdf_gradient_offset`);
    * ``SUFFIX_GRADIENT``: the tiles' gradient columns are written (the keyword arguments, as in
      :func:`number_gradient`).
    """
    num_tiles = tl.cdiv(K, BLOCK_K)
    carry_s = tl.zeros_like(shift)
    carry_a = tl.zeros_like(shift)
    carry_first = tl.zeros_like(shift)
    total_sum = tl.zeros_like(shift)
    at_likeliest = tl.zeros_like(shift)
    for i in range(0, num_tiles):
        k, ids, inside, zn, q, t, suffix, gaps, a, carry_s, carry_a, carry_first = cdf_suffix_tile(
            row_ptrs, active, (num_tiles - 1 - i) * BLOCK_K, shift, rank, y, number_ids_ptr, number_values_ptr,
            value_order_ptr, K, sigma, z_max, total, g_max, g_sum, kstar, carry_s, carry_a, carry_first, GAUSSIAN,
            BLOCK_K,
        )
        if MODE == SUFFIX_LOSS:
            total_sum += tl.sum(tl.where(inside, tl.abs(suffix) * gaps[None, :], 0.0), axis=1)
            at_likeliest += tl.sum(tl.where(inside & (k[None, :] == likeliest[:, None]), a, 0.0), axis=1)
        elif MODE == SUFFIX_OFFSET:
            total_sum += tl.sum(tl.where(inside, q * (a - a_ref[:, None]), 0.0), axis=1)
        else:
            store_cdf_gradient(grad_row_ptrs, row_mask, ids, inside, zn, q, t, a, a_ref, offset, valid, log_sum, mass,
                               text_mass, spread, upstream_ce, upstream_ntl, REWEIGH)
    return total_sum, at_likeliest, carry_a


@triton.jit
def cdf_loss_tiled(row_ptrs, active, shift, rank, y, likeliest, number_ids_ptr, number_values_ptr, value_order_ptr,
                   K, sigma, z_max, total, g_max, g_sum, GAUSSIAN: tl.constexpr, BLOCK_K: tl.constexpr):
    """WAS_CDF over tiles (docs/math.md §2.3): ``F_q(k) - F_t(k)`` from its lighter side, as in
    :func:`number_token_terms`. Positions whose prefix mass ``Σ_{j <= k} (q_j + t_j)`` is at most 1
    (half the total) take the prefix sum, carried forwards across tiles; the others (``k >= kstar``;
    the prefix mass only grows) take minus the suffix sum, carried backwards from the last tile.

    Returns ``(loss, kstar, a_total, a_ref)``: L, the first suffix-side position, ``Σ_k slope_k``
    and ``a`` at the likeliest position (the gradient's origin, see :func:`cdf_gradient_offset`)."""
    loss = tl.zeros_like(shift)
    kstar = tl.zeros_like(rank)
    carry_p = tl.zeros_like(shift)
    carry_w = tl.zeros_like(shift)
    carry_slope = tl.zeros_like(shift)
    excl_ref = tl.zeros_like(shift)  # Σ_{j < likeliest} slope_j where the likeliest is prefix-side
    everywhere = tl.zeros_like(rank)[:, None] == 0
    for start in range(0, K, BLOCK_K):
        k, ids, inside, gaps, zn, q, t, q_next, t_next = cdf_tile(
            row_ptrs, active, start, shift, rank, y, number_ids_ptr, number_values_ptr, value_order_ptr, K, sigma,
            z_max, total, g_max, g_sum, everywhere, GAUSSIAN, False, BLOCK_K,
        )
        prefix = tl.cumsum(q - t, axis=1) + carry_p[:, None]
        lighter = inside & (tl.cumsum(q + t, axis=1) + carry_w[:, None] <= 1.0)
        loss += tl.sum(tl.where(lighter, tl.abs(prefix) * gaps[None, :], 0.0), axis=1)
        kstar += tl.sum(lighter.to(rank.dtype), axis=1)
        slope = tl.where(lighter, sign_of(prefix) * gaps[None, :], 0.0)
        excl = tl.cumsum(slope, axis=1) - slope + carry_slope[:, None]
        excl_ref += tl.sum(tl.where(lighter & (k[None, :] == likeliest[:, None]), excl, 0.0), axis=1)
        carry_p += tl.sum(q - t, axis=1)
        carry_w += tl.sum(q + t, axis=1)
        carry_slope += tl.sum(slope, axis=1)
    suffix_loss, a_hi_ref, carry_a = cdf_suffix_sweep(
        row_ptrs, active, shift, rank, y, likeliest, shift, number_ids_ptr, number_values_ptr, value_order_ptr, K,
        sigma, z_max, total, g_max, g_sum, kstar, SUFFIX_LOSS, GAUSSIAN, BLOCK_K,
    )
    loss += suffix_loss
    a_total = carry_slope + carry_a
    a_ref = tl.where(likeliest < kstar, a_total - excl_ref, a_hi_ref)
    return loss, kstar, a_total, a_ref


@triton.jit
def cdf_gradient_offset(row_ptrs, active, shift, rank, y, number_ids_ptr, number_values_ptr, value_order_ptr, K,
                        sigma, z_max, total, g_max, g_sum, kstar, a_total, a_ref,
                        GAUSSIAN: tl.constexpr, BLOCK_K: tl.constexpr):
    """``Σ_j q_j (a_j - a_ref)``: ``∂L/∂z_j = q_j (a_j - a_ref - Σ_i q_i (a_i - a_ref))`` with
    ``a_j = Σ_{k >= j} slope_k`` measured from the likeliest position's (whose own term is then
    exactly 0), as in :func:`number_token_terms`."""
    offset = tl.zeros_like(shift)
    carry_p = tl.zeros_like(shift)
    carry_slope = tl.zeros_like(shift)
    for start in range(0, K, BLOCK_K):
        k, ids, inside, zn, q, t, prefix, gaps, a, carry_p, carry_slope = cdf_prefix_tile(
            row_ptrs, active, start, shift, rank, y, number_ids_ptr, number_values_ptr, value_order_ptr, K, sigma,
            z_max, total, g_max, g_sum, kstar, a_total, carry_p, carry_slope, GAUSSIAN, BLOCK_K,
        )
        offset += tl.sum(tl.where(inside, q * (a - a_ref[:, None]), 0.0), axis=1)
    suffix_offset, _, _ = cdf_suffix_sweep(
        row_ptrs, active, shift, rank, y, kstar, a_ref, number_ids_ptr, number_values_ptr, value_order_ptr, K,
        sigma, z_max, total, g_max, g_sum, kstar, SUFFIX_OFFSET, GAUSSIAN, BLOCK_K,
    )
    return offset + suffix_offset


@triton.jit
def number_tile_terms(row_ptrs, active, start, shift, rank, y, number_ids_ptr, number_values_ptr, value_order_ptr,
                      K, squash_min, squash_scale, sigma, z_max, total, g_max, g_sum, diff, x_l, spread,
                      LOSS: tl.constexpr, SQUASH: tl.constexpr, GAUSSIAN: tl.constexpr, BLOCK_K: tl.constexpr):
    """One tile's ``(ids, mask, zn, dloss, target)`` of a TILED kernel, from the row-level values
    of :func:`tiled_number_summary` (the per-k formulas of :func:`number_token_terms`; ``x_l`` and
    ``spread = Σ q (x - x_l)`` its ``a_ref`` and ``a_total``)."""
    k, ids, mask, values, zn, g = number_tile(row_ptrs, active, start, shift, y, number_ids_ptr, number_values_ptr,
                                              value_order_ptr, K, sigma, GAUSSIAN, BLOCK_K)
    q = tl.exp(zn - z_max[:, None]) / total[:, None]
    if GAUSSIAN:
        target = tl.exp(g - g_max[:, None]) / g_sum[:, None]
    else:
        target = tl.where(k[None, :] == rank[:, None], 1.0, 0.0).to(zn.dtype)
    x = gradient_variable(values[None, :], y[:, None], squash_min, squash_scale, LOSS, SQUASH)
    dloss = q * ((x - x_l[:, None]) - spread[:, None])
    if LOSS != WAS:
        sign = tl.where(diff > 0, 1.0, tl.where(diff < 0, -1.0, 0.0))
        if LOSS == MSE:
            slope = 2.0 * diff
        elif LOSS == MAE:
            slope = sign
        else:
            slope = tl.where(tl.abs(diff) < 1.0, diff, sign)
        dloss = slope[:, None] * dloss
    return ids, mask, zn, dloss, target


@triton.jit
def reweighed(loss, lse_n, log_sum, log_text, reweigh_constant):
    """``m L + c (1 - m)`` (docs/math.md §2.4), the text mass ``1 - m`` from its own log-sum."""
    return tl.exp(lse_n - log_sum) * loss + reweigh_constant * tl.exp(log_text - log_sum)


@triton.jit
def store_dense_gradient(row_ptrs, grad_row_ptrs, row_mask, active, V, shift, log_sum, coefficient,
                         BLOCK_V: tl.constexpr, is_number_ptr=None, SKIP_NUMBERS: tl.constexpr = False,
                         resident=None, RESIDENT: tl.constexpr = False):
    """``grad[k] = coefficient * p_k`` for every column (with SKIP_NUMBERS every column but the
    number tokens', which keep their logits), with ``p_k = exp((z_k - shift) - log_sum)``; exactly
    0 on rows whose coefficient is 0, and inactive rows read nothing.

    With RESIDENT, ``resident`` is the whole row (``V <= BLOCK_V``, :func:`row_logsumexp_resident`)
    and nothing is read. Otherwise the chunks go from the row's end to its start: right after a
    sweep that read the row from its start (the one-pass forward), its last chunks are the
    likeliest still to be in L2."""
    cols = tl.arange(0, BLOCK_V)
    if RESIDENT:
        store_softmax_chunk(grad_row_ptrs, row_mask, cols, resident, V, shift, log_sum, coefficient, is_number_ptr,
                            SKIP_NUMBERS)
    else:
        num_chunks = tl.cdiv(V, BLOCK_V)
        for chunk in range(0, num_chunks):
            c = (num_chunks - 1 - chunk) * BLOCK_V + cols
            x = tl.load(row_ptrs[:, None] + c[None, :], mask=(c < V)[None, :] & active[:, None], other=float("-inf"))
            store_softmax_chunk(grad_row_ptrs, row_mask, c, x, V, shift, log_sum, coefficient, is_number_ptr,
                                SKIP_NUMBERS)


@triton.jit
def store_softmax_chunk(grad_row_ptrs, row_mask, c, x, V, shift, log_sum, coefficient, is_number_ptr,
                        SKIP_NUMBERS: tl.constexpr):
    """``grad[c] = coefficient * exp((x - shift) - log_sum)`` for the columns ``c`` (below V; with
    SKIP_NUMBERS not the number tokens') of logits ``x``."""
    col_mask = (c < V)[None, :]
    p = tl.exp((x.to(log_sum.dtype) - shift[:, None]) - log_sum[:, None])
    if SKIP_NUMBERS:
        col_mask = col_mask & (tl.load(is_number_ptr + c, mask=c < V, other=1) == 0)[None, :]
    tl.store(
        grad_row_ptrs[:, None] + c[None, :],
        scaled(coefficient[:, None], p).to(grad_row_ptrs.dtype.element_ty),
        mask=col_mask & row_mask[:, None],
    )


@triton.jit
def gradient_coefficients(loss, lse_n, log_sum, log_text, upstream_ce, upstream_ntl, reweigh_constant,
                          REWEIGH: tl.constexpr):
    """Per row: the number mass ``m``, the text mass ``1 - m`` and ``L - c`` (read only with
    reweigh: without it the three are ``lse_n``, unused) and the coefficient ``a`` of the dense
    part ``a p_k``."""
    if REWEIGH:
        mass = tl.exp(lse_n - log_sum)
        text_mass = tl.exp(log_text - log_sum)
        spread = loss - reweigh_constant
        dense = upstream_ce - scaled(upstream_ntl, spread * mass)
    else:
        mass = lse_n
        text_mass = lse_n
        spread = lse_n
        dense = upstream_ce
    return mass, text_mass, spread, dense


@triton.jit
def store_label_gradient(grad_row_ptrs, row_mask, label, in_range, valid, label_grad):
    """The label column of a label outside N (``dense p_l - upstream_ce``); a number label is one
    of the K columns."""
    tl.store(grad_row_ptrs + label, label_grad.to(grad_row_ptrs.dtype.element_ty),
             mask=row_mask & in_range & (valid == 0))


@triton.jit
def store_row_gradient(row_ptrs, grad_row_ptrs, row_mask, active, V, label, in_range, valid, shift, log_sum,
                       log_text, ids, k_mask, zn, z_label, lse_n, loss, dloss, target, upstream_ce, upstream_ntl,
                       reweigh_constant, REWEIGH: tl.constexpr, INPLACE: tl.constexpr, BLOCK_V: tl.constexpr,
                       resident=None, RESIDENT: tl.constexpr = False):
    """Writes ``upstream_ce (p - target) + upstream_ntl ∂NTL/∂z`` into each row's gradient.

    ``loss`` is L before reweighing; ``upstream_*`` are 0 where they do not apply (a row that
    does not count for CE / NTL). The dense part ``a p_k`` goes to every column (``a =
    upstream_ce``, minus ``upstream_ntl (L - c) m`` with reweigh); after a barrier, the K number
    columns and the label column are overwritten with their exact values, computed from logits
    (``zn``, ``z_label``) read before any write, so the gradient may overwrite the logits. With
    RESIDENT the dense part comes from the row held in ``resident`` (no second read).
    """
    mass, text_mass, spread, dense = gradient_coefficients(loss, lse_n, log_sum, log_text, upstream_ce,
                                                           upstream_ntl, reweigh_constant, REWEIGH)
    number_grad = number_gradient(zn, dloss, target, valid, log_sum, mass, text_mass, spread, upstream_ce,
                                  upstream_ntl, REWEIGH)
    label_grad = scaled(dense, tl.exp(z_label - log_sum)) - upstream_ce
    if INPLACE:
        tl.debug_barrier()  # the gathers complete before the row is overwritten
    store_dense_gradient(row_ptrs, grad_row_ptrs, row_mask, active, V, shift, log_sum, dense, BLOCK_V,
                         resident=resident, RESIDENT=RESIDENT)
    tl.debug_barrier()  # the exact values of K + 1 columns land after the dense write
    tl.store(
        grad_row_ptrs[:, None] + ids[None, :],
        number_grad.to(grad_row_ptrs.dtype.element_ty),
        mask=row_mask[:, None] & k_mask[None, :],
    )
    store_label_gradient(grad_row_ptrs, row_mask, label, in_range, valid, label_grad)


@triton.jit
def store_row_gradient_tiled(row_ptrs, grad_row_ptrs, row_mask, active, V, label, in_range, valid, shift, log_sum,
                             log_text, z_label, rank, y, number_ids_ptr, number_values_ptr, value_order_ptr,
                             is_number_ptr, K, squash_min, squash_scale, sigma, z_max, total, lse_n, g_max, g_sum,
                             loss, diff, kstar, a_total, a_ref, upstream_ce, upstream_ntl, reweigh_constant,
                             LOSS: tl.constexpr, SQUASH: tl.constexpr, GAUSSIAN: tl.constexpr,
                             REWEIGH: tl.constexpr, INPLACE: tl.constexpr, BLOCK_V: tl.constexpr,
                             BLOCK_K: tl.constexpr, resident=None, RESIDENT: tl.constexpr = False):
    """:func:`store_row_gradient` for K > BLOCK_K: the dense part skips the number columns (so
    their logits survive an in-place write), then the label column (written only when it is not a
    number column), then :func:`store_number_gradient_tiled` writes the number columns tile by
    tile: the label and its gradient are dead before the number sweeps (registers)."""
    mass, text_mass, spread, dense = gradient_coefficients(loss, lse_n, log_sum, log_text, upstream_ce,
                                                           upstream_ntl, reweigh_constant, REWEIGH)
    label_grad = scaled(dense, tl.exp(z_label - log_sum)) - upstream_ce
    if INPLACE:
        tl.debug_barrier()  # the label gather completes before the row is overwritten
    store_dense_gradient(row_ptrs, grad_row_ptrs, row_mask, active, V, shift, log_sum, dense, BLOCK_V,
                         is_number_ptr, True, resident, RESIDENT)
    tl.debug_barrier()  # the label column lands after the dense write
    store_label_gradient(grad_row_ptrs, row_mask, label, in_range, valid, label_grad)
    store_number_gradient_tiled(
        row_ptrs, grad_row_ptrs, row_mask, active, shift, rank, y, number_ids_ptr, number_values_ptr,
        value_order_ptr, K, squash_min, squash_scale, sigma, z_max, total, g_max, g_sum, loss, diff, kstar, a_total,
        a_ref, valid, log_sum, mass, text_mass, spread, upstream_ce, upstream_ntl, LOSS, SQUASH, GAUSSIAN, REWEIGH,
        BLOCK_K,
    )


@triton.jit
def number_gradient(zn, dloss, target, valid, log_sum, mass, text_mass, spread, upstream_ce, upstream_ntl,
                    REWEIGH: tl.constexpr):
    """The exact gradient of a tile's number columns (see :func:`store_row_gradient`)."""
    p_n = tl.exp(zn - log_sum[:, None])
    number_grad = scaled(upstream_ce[:, None], p_n - tl.where(valid[:, None], target, 0.0))
    if REWEIGH:
        number_grad += scaled(upstream_ntl[:, None], mass[:, None] * dloss + (spread * text_mass)[:, None] * p_n)
    else:
        number_grad += scaled(upstream_ntl[:, None], dloss)
    return number_grad


@triton.jit
def store_cdf_gradient(grad_row_ptrs, row_mask, ids, inside, zn, q, t, a, a_ref, offset, valid, log_sum, mass,
                       text_mass, spread, upstream_ce, upstream_ntl, REWEIGH: tl.constexpr):
    """Writes a WAS_CDF tile's number columns: ``∂L/∂z_j = q_j (a_j - a_ref - offset)``."""
    dloss = q * ((a - a_ref[:, None]) - offset[:, None])
    number_grad = number_gradient(zn, dloss, t, valid, log_sum, mass, text_mass, spread, upstream_ce, upstream_ntl,
                                  REWEIGH)
    tl.store(grad_row_ptrs[:, None] + ids[None, :], number_grad.to(grad_row_ptrs.dtype.element_ty),
             mask=row_mask[:, None] & inside)


@triton.jit
def store_number_gradient_tiled(row_ptrs, grad_row_ptrs, row_mask, active, shift, rank, y, number_ids_ptr,
                                number_values_ptr, value_order_ptr, K, squash_min, squash_scale, sigma, z_max, total,
                                g_max, g_sum, loss, diff, kstar, a_total, a_ref, valid, log_sum, mass, text_mass,
                                spread, upstream_ce, upstream_ntl, LOSS: tl.constexpr, SQUASH: tl.constexpr,
                                GAUSSIAN: tl.constexpr, REWEIGH: tl.constexpr, BLOCK_K: tl.constexpr):
    """Writes the K number columns of each row, tile by tile, from the values of
    :func:`tiled_number_summary`. WAS_CDF writes its prefix-side positions going forwards, then its
    suffix-side ones from the last tile backwards: a tile only reads columns not yet written."""
    if LOSS == WAS_CDF:
        offset = cdf_gradient_offset(
            row_ptrs, active, shift, rank, y, number_ids_ptr, number_values_ptr, value_order_ptr, K, sigma,
            z_max, total, g_max, g_sum, kstar, a_total, a_ref, GAUSSIAN, BLOCK_K,
        )
        carry_p = tl.zeros_like(shift)
        carry_slope = tl.zeros_like(shift)
        for start in range(0, K, BLOCK_K):
            k, ids, inside, zn, q, t, prefix, gaps, a, carry_p, carry_slope = cdf_prefix_tile(
                row_ptrs, active, start, shift, rank, y, number_ids_ptr, number_values_ptr, value_order_ptr, K,
                sigma, z_max, total, g_max, g_sum, kstar, a_total, carry_p, carry_slope, GAUSSIAN, BLOCK_K,
            )
            store_cdf_gradient(grad_row_ptrs, row_mask, ids, inside, zn, q, t, a, a_ref, offset, valid, log_sum, mass,
                               text_mass, spread, upstream_ce, upstream_ntl, REWEIGH)
        cdf_suffix_sweep(
            row_ptrs, active, shift, rank, y, kstar, a_ref, number_ids_ptr, number_values_ptr, value_order_ptr, K,
            sigma, z_max, total, g_max, g_sum, kstar, SUFFIX_GRADIENT, GAUSSIAN, BLOCK_K, grad_row_ptrs, row_mask,
            offset, valid, log_sum, mass, text_mass, spread, upstream_ce, upstream_ntl, REWEIGH,
        )
    else:
        for start in range(0, K, BLOCK_K):
            ids, k_mask, zn, dloss, target = number_tile_terms(
                row_ptrs, active, start, shift, rank, y, number_ids_ptr, number_values_ptr, value_order_ptr, K,
                squash_min, squash_scale, sigma, z_max, total, g_max, g_sum, diff, a_ref, a_total, LOSS, SQUASH,
                GAUSSIAN, BLOCK_K,
            )
            number_grad = number_gradient(zn, dloss, target, valid, log_sum, mass, text_mass, spread, upstream_ce,
                                          upstream_ntl, REWEIGH)
            tl.store(grad_row_ptrs[:, None] + ids[None, :], number_grad.to(grad_row_ptrs.dtype.element_ty),
                     mask=row_mask[:, None] & k_mask[None, :])


@triton.jit
def scale_kernel(grad_ptr, numel, factor_ptr, BLOCK: tl.constexpr):
    """``grad *= factor[0]`` in place; every program returns at once when the factor is 1, so the
    usual backward (``grad_output == 1``) costs a launch and one scalar read, no pass over grad."""
    factor = tl.load(factor_ptr).to(tl.float32)
    if factor != 1.0:
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < numel
        grad = tl.load(grad_ptr + offsets, mask=mask)
        tl.store(grad_ptr + offsets, (grad.to(tl.float32) * factor).to(grad_ptr.dtype.element_ty), mask=mask)
