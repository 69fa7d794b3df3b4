"""The LM-head loss in row chunks: CE + NTL of ``hidden @ weight.T + bias`` without the M x V logits.

:func:`ntl_fast.linear_cross_entropy_with_ntl` checks its inputs, works out each row's share of
the loss and calls :class:`LinearCrossEntropyWithNTLFunction` here, which owns the chunk loop and
its forward/backward pairing.

**One sweep.** The rows are taken ``chunk_size`` at a time. A chunk's logits come from one
``F.linear`` and live only while that chunk is processed. With reduction ``"mean"``/``"sum"``
the loss is a fixed linear combination of per-row losses whose coefficients are known before
any logit exists, so each chunk's logits gradient is computed right away (in the same pass as
its losses where the backend fuses the two, ``fuses_loss_and_grad``; over the chunk's logits
buffer where the backend writes in place) and folded into ``grad_hidden``, ``grad_weight`` and
``grad_bias`` before the next chunk; the backward only scales them by the incoming scalar. With
``"none"`` the upstream gradient is per row, so the backward sweeps again.

**Memory.** Above the inputs and their gradients (in their own dtypes) one chunk of logits is
alive, plus the backend's per-row statistics and a float32 ``(V,)`` bias accumulator; a
backend whose one-pass op cannot write the gradient over the logits (the C++ operator on the
CPU returns a new tensor, copied over them) holds a second chunk-sized buffer while it runs. No
``V x H`` buffer besides ``grad_weight`` itself exists: each chunk's
``grad_logits.T @ hidden_chunk`` is accumulated by a matmul into ``grad_weight``
(``addmm_``), never materialised on its own. The chunk size comes from a memory budget and the
device (:func:`chunk_plan`, :func:`chunk_rows`).

**Where rounding happens** (compared with the materialised ``F.linear`` + loss):

- logits: one rounding to the input dtype per element, as ``F.linear`` of the whole batch;
- losses and their logits gradient: computed in float32 (float64 for float64 inputs) from those
  logits, the gradient rounded once to the input dtype, as in the materialised path;
- ``grad_hidden``: one matmul per chunk over the full vocabulary, one rounding per element, as
  in the materialised path;
- ``grad_weight``: a running sum in the weight's dtype. Each chunk's product is formed and added
  in float32 inside the matmul and the sum rounded once per chunk: ``ceil(M / chunk_size)``
  roundings instead of one. Exact to float32 for float32 weights; for bfloat16 each rounding is
  at most half a unit in the last place (2^-9 relative) of the running sum, which is why the
  default chunks are large (a handful per step), not a few rows;
- ``grad_bias``: summed over all rows in float32, rounded once at the end;
- the backward multiplies the three in place by the upstream gradient: exact when it is 1 (the
  usual ``loss.backward()``), one more rounding otherwise.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Tuple, Union

import torch
from torch import Tensor

from .config import LossConfig, accumulation_dtype
from .table import NumberTokenTable

__all__ = ["ChunkPlan", "chunk_plan", "chunk_rows", "device_chunk_plan", "LinearCrossEntropyWithNTLFunction"]

# CPU: 32 MiB of logits per chunk. A chunk that large already runs the matmuls at full speed
# (>= 64 rows) and costs one Python iteration per ~10^7 logits; more only raises the peak.
_CPU_BUDGET = 32 << 20
_CPU_MIN_ROWS = 64
# CUDA: 1/64 of the device memory, at most 512 MiB (e.g. 2,048 rows of bf16 logits at V = 128,256),
# and at least 4 waves of rows over the SMs so that the row-wise loss kernels fill the device.
_CUDA_BUDGET_CAP = 512 << 20
_CUDA_MEMORY_SHARE = 64
_CUDA_WAVES = 4
_ROW_MULTIPLE = 64  # matmul-friendly row counts
_MIN_ROWS_OVER_BUDGET = 4  # the minimum row count may exceed the budget by this factor, no more


class ChunkPlan(NamedTuple):
    """How large a chunk may be on a device.

    Attributes:
        budget_bytes (int): the logits of one chunk, in their own dtype, should fit in this.
        min_rows (int): rows a chunk should have to keep the device busy (a multiple of 64).
    """

    budget_bytes: int
    min_rows: int


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def chunk_plan(device_type: str, multi_processor_count: int = 0, total_memory: int = 0) -> ChunkPlan:
    """The chunk budget of a device from its properties (a pure function).

    CUDA: ``min(total_memory / 64, 512 MiB)`` of logits, and at least 4 waves of rows over the
    ``multi_processor_count`` SMs. Other devices (CPU): 32 MiB and at least 64 rows.
    """
    if device_type == "cuda":
        budget = min(total_memory // _CUDA_MEMORY_SHARE, _CUDA_BUDGET_CAP) if total_memory else _CUDA_BUDGET_CAP
        return ChunkPlan(budget, _round_up(max(1, _CUDA_WAVES * multi_processor_count), _ROW_MULTIPLE))
    return ChunkPlan(_CPU_BUDGET, _CPU_MIN_ROWS)


def device_chunk_plan(device: Union[torch.device, str]) -> ChunkPlan:
    """:func:`chunk_plan` of ``device``, reading the SM count and memory of a CUDA device."""
    device = torch.device(device)
    if device.type != "cuda":
        return chunk_plan(device.type)
    properties = torch.cuda.get_device_properties(device)
    return chunk_plan("cuda", properties.multi_processor_count, properties.total_memory)


def chunk_rows(num_rows: int, vocab_size: int, element_size: int, plan: ChunkPlan) -> int:
    """Rows per chunk for ``num_rows`` rows of ``vocab_size`` logits of ``element_size`` bytes.

    As many rows as the budget holds, rounded down to a multiple of 64; raised to
    ``plan.min_rows`` where the budget holds fewer, as long as that stays within 4x the budget;
    at least 1 and at most ``num_rows`` (a pure function).
    """
    row_bytes = vocab_size * element_size
    rows = plan.budget_bytes // row_bytes
    if rows >= _ROW_MULTIPLE:
        rows -= rows % _ROW_MULTIPLE
    rows = max(rows, min(plan.min_rows, _MIN_ROWS_OVER_BUDGET * plan.budget_bytes // row_bytes), 1)
    return min(rows, num_rows)


# --------------------------------------------------------------------------------- the sweep
def _loss_and_grad(backend, logits: Tensor, labels: Tensor, table: NumberTokenTable, config: LossConfig,
                   ce_scale: Tensor, ntl_scale: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Per-row CE and NTL of a chunk and ``d(Σ ce_scale·ce + Σ ntl_scale·ntl)/d logits``.

    The chunk's logits are private to the sweep, so the gradient may be written over them. Where
    the backend fuses the loss and its gradient for these logits (``fuses_loss_and_grad``), one
    call reads each logit once; otherwise its differentiable ``ce_ntl_rows`` and autograd take two
    passes (forward, then backward).
    """
    if backend.fuses_loss_and_grad(logits):
        return backend.ce_ntl_loss_and_grad(logits, labels, table, config, ce_scale, ntl_scale, inplace=True)
    with torch.enable_grad():
        logits.requires_grad_()
        ce_rows, ntl_rows = backend.ce_ntl_rows(logits, labels, table, config, inplace=True)
        objective = (ce_rows * ce_scale).sum() + (ntl_rows * ntl_scale).sum()
        (grad,) = torch.autograd.grad(objective, logits)
    return ce_rows.detach(), ntl_rows.detach(), grad


@torch.no_grad()  # also under a backward with create_graph=True: the sweep differentiates by itself
def _sweep(
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

    Returns ``Σ ce_r·ce_scale_r``, ``Σ ntl_r·ntl_scale_r`` and, where ``needs`` asks, the
    gradients of ``Σ ce_r·ce_scale_r + ntl_weight·Σ ntl_r·ntl_scale_r`` with respect to hidden,
    weight and bias, in their dtypes. ``rows_out`` receives the unscaled per-row losses.
    """
    num_rows = hidden.shape[0]
    need_hidden, need_weight, need_bias = needs
    want_grad = need_hidden or need_weight or need_bias
    acc = accumulation_dtype(hidden.dtype)
    ce_total = torch.zeros((), dtype=acc, device=hidden.device)
    ntl_total = torch.zeros((), dtype=acc, device=hidden.device)
    grad_hidden = torch.empty_like(hidden) if need_hidden else None
    grad_weight = torch.empty_like(weight, memory_format=torch.contiguous_format) if need_weight else None
    grad_bias = torch.zeros(bias.shape, dtype=acc, device=bias.device) if need_bias else None
    for start in range(0, num_rows, chunk_size):
        end = min(start + chunk_size, num_rows)
        rows_hidden, rows_labels = hidden[start:end], labels[start:end]
        rows_ce_scale, rows_ntl_scale = ce_scale[start:end], ntl_scale[start:end]
        logits = torch.nn.functional.linear(rows_hidden, weight, bias)
        if want_grad:
            ce_rows, ntl_rows, grad_logits = _loss_and_grad(
                backend, logits, rows_labels, table, config, rows_ce_scale, ntl_weight * rows_ntl_scale
            )
        else:
            ce_rows, ntl_rows = backend.ce_ntl_rows(logits, rows_labels, table, config)
        del logits
        ce_total += (ce_rows * rows_ce_scale).sum()
        ntl_total += (ntl_rows * rows_ntl_scale).sum()
        if rows_out is not None:
            rows_out[0][start:end] = ce_rows
            rows_out[1][start:end] = ntl_rows
        if not want_grad:
            continue
        if need_hidden:
            torch.mm(grad_logits, weight, out=grad_hidden[start:end])
        if need_weight:
            # the chunk's product is added in float32 inside the matmul: no V x H temporary
            if start == 0:
                torch.mm(grad_logits.t(), rows_hidden, out=grad_weight)
            else:
                grad_weight.addmm_(grad_logits.t(), rows_hidden)
        if need_bias:
            grad_bias += grad_logits.sum(0, dtype=acc)
        del grad_logits
    if grad_bias is not None:
        grad_bias = grad_bias.to(bias.dtype)
    return ce_total, ntl_total, grad_hidden, grad_weight, grad_bias


def _scale_(grad: Optional[Tensor], factor: Tensor) -> Optional[Tensor]:
    """``grad *= factor`` in place (exact when the factor is 1)."""
    return None if grad is None else grad.mul_(factor)


class LinearCrossEntropyWithNTLFunction(torch.autograd.Function):
    """Chunked CE + NTL of ``hidden (M, H) @ weight (V, H).T + bias`` against ``labels (M,)``.

    ``ce_factor`` and ``ntl_factor`` are each row's share of the loss (weights over the means'
    counts; the weights alone for ``per_row``). Outputs ``(loss, ce, ntl)``: scalars, or per-row
    tensors when ``per_row`` (reduction ``"none"``). Only ``loss`` is differentiable.
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
            rows = (torch.empty(num_rows, dtype=ce_factor.dtype, device=hidden.device),
                    torch.empty(num_rows, dtype=ce_factor.dtype, device=hidden.device))
            _sweep(hidden, weight, bias, labels, table, config, backend, ce_factor, ntl_factor,
                   ntl_weight, chunk_size, (False, False, False), rows_out=rows)
            ctx.save_for_backward(hidden, weight, bias, labels, ce_factor, ntl_factor)
            ctx.needs = needs
            ce = rows[0] * ce_factor
            ntl = rows[1] * ntl_factor
        else:
            ce, ntl, ctx.grad_hidden, ctx.grad_weight, ctx.grad_bias = _sweep(
                hidden, weight, bias, labels, table, config, backend, ce_factor, ntl_factor,
                ntl_weight, chunk_size, needs,
            )
            ctx.consumed = False
        ctx.mark_non_differentiable(ce, ntl)
        return ce + ntl_weight * ntl, ce, ntl

    @staticmethod
    def backward(ctx, grad_total, _grad_ce, _grad_ntl):
        if ctx.per_row:
            hidden, weight, bias, labels, ce_factor, ntl_factor = ctx.saved_tensors
            upstream = grad_total.to(ce_factor.dtype)
            _, _, grad_hidden, grad_weight, grad_bias = _sweep(
                hidden, weight, bias, labels, ctx.table, ctx.config, ctx.backend,
                ce_factor * upstream, ntl_factor * upstream, ctx.ntl_weight, ctx.chunk_size, ctx.needs,
            )
        else:
            if ctx.consumed:
                # the gradients were computed in the forward and handed out by the first backward
                raise RuntimeError(
                    "linear_cross_entropy_with_ntl: backward through the same loss twice "
                    "(retain_graph=True) is not supported with reduction='mean'/'sum'; recompute the loss"
                )
            ctx.consumed = True
            grad_hidden, grad_weight, grad_bias = (
                _scale_(grad, grad_total) for grad in (ctx.grad_hidden, ctx.grad_weight, ctx.grad_bias)
            )
            ctx.grad_hidden = ctx.grad_weight = ctx.grad_bias = None
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None, None, None, None, None
