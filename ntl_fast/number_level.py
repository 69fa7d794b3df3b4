"""Number-level NTL (docs/math.md §2.7) in vectorised torch ops: no Python loop over numbers.

The readable per-run loop is :func:`ntl_fast.reference.number_level_rows`; this computes the same
``(loss, first_digit)`` with cumulative sums and one scatter, without a host synchronisation.

Every number is identified by the flat index of its first digit. For each position of a run the
index of that first digit comes from a running maximum of run starts; digit counts and the
``10^e``-weighted sums of ``y`` and ``ŷ`` are then scattered onto it. A run's first digit carries
its own index, so the per-number sums land exactly where the loss is placed.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .labels import label_positions
from .reference import accumulation_dtype, expected_value, number_softmax
from .table import NumberTokenTable

__all__ = ["number_level_rows", "number_runs"]


def _shift_right(mask: Tensor, steps: int) -> Tensor:
    """``mask[:, t - steps]`` (False before the start of the row)."""
    pad = torch.zeros_like(mask[:, :steps])
    return torch.cat([pad, mask[:, :-steps]], dim=1) if mask.shape[1] > steps else torch.zeros_like(mask)


def _shift_left(mask: Tensor, steps: int) -> Tensor:
    """``mask[:, t + steps]`` (False past the end of the row)."""
    pad = torch.zeros_like(mask[:, :steps])
    return torch.cat([mask[:, steps:], pad], dim=1) if mask.shape[1] > steps else torch.zeros_like(mask)


def number_runs(
    is_digit: Tensor, labels: Tensor, float_level: bool, dot_id: Optional[int], max_number_length: int
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Segment ``(B, T)`` digit masks into numbers.

    Returns ``(first_digit, in_number, owner, exponent)``: the mask of each number's first digit;
    the mask of positions inside a number (digits, and joining dots with ``float_level``); the
    flat index ``b * T + t`` of the first digit of the number each position belongs to (0 off
    numbers); and each digit's exponent ``R - r`` clamped to ``max_number_length - 1``.
    """
    batch, length = is_digit.shape
    digit_before = _shift_right(is_digit, 1)
    if float_level and dot_id is not None:
        is_dot = labels == dot_id
        joining_dot = is_dot & digit_before & _shift_left(is_digit, 1)
        in_number = is_digit | joining_dot
        continues = digit_before | (_shift_right(joining_dot, 1) & is_digit)
    else:
        in_number = is_digit
        continues = digit_before
    first_digit = in_number & ~continues  # a run always opens on a digit
    positions = torch.arange(length, device=is_digit.device).expand(batch, length)
    start = torch.where(first_digit, positions, torch.full_like(positions, -1))
    start = torch.cummax(start, dim=1).values.clamp_min(0)
    rows = torch.arange(batch, device=is_digit.device)[:, None] * length
    owner = torch.where(in_number, rows + start, torch.zeros_like(start))

    digits_so_far = torch.cumsum(is_digit.to(torch.int64), dim=1)  # inclusive count along the row
    digits_before_run = digits_so_far.gather(1, start) - 1  # the run's first digit counts itself
    count = torch.zeros(batch * length, dtype=torch.int64, device=is_digit.device)
    count = count.scatter_add(0, owner.reshape(-1), is_digit.to(torch.int64).reshape(-1))
    run_length = count[owner]
    exponent = (run_length - (digits_so_far - digits_before_run)).clamp(0, max_number_length - 1)
    return first_digit, in_number, owner, exponent


def number_level_rows(
    logits: Tensor,
    labels: Tensor,
    table: NumberTokenTable,
    *,
    float_level: bool = False,
    dot_id: Optional[int] = None,
    max_number_length: int = 20,
    ignore_index: int = -100,
) -> Tuple[Tensor, Tensor]:
    """Number-level loss of ``(B, T, V)`` logits with ``(B, T)`` labels (docs/math.md §2.7).

    Returns ``(loss, first_digit)``, both ``(B, T)``: ``|Ŷ - Y| / (|Ŷ| + |Y| + ε)`` of each number
    at its first digit (0 elsewhere, NaN at bad labels) and the mask of those first digits.
    Always float32 (float64 for float64 logits), as :func:`ntl_fast.reference.number_level_rows`.
    """
    # float64 inside (B·T·K numbers, nothing next to the logits): near a saturated error, e.g.
    # Y = 0 where the loss is Ŷ/(Ŷ + ε), float32 cancels a gradient of ~ε/Ŷ² to 0
    dtype = torch.float64
    batch, length = labels.shape
    _, bad, number_index = label_positions(labels.reshape(-1), table, ignore_index)
    number_index = number_index.view(batch, length)
    is_digit = number_index >= 0
    first_digit, _, owner, exponent = number_runs(
        is_digit, labels, float_level, dot_id, max_number_length
    )
    number_values = table.number_values.to(dtype)
    # only the K number-token columns are read: ŷ needs nothing else
    number_logits = logits.reshape(batch * length, -1).index_select(1, table.number_ids).to(dtype)
    # positions that are no digit get exactly a zero gradient, whatever their logits (inf, NaN)
    number_logits = torch.where(is_digit.reshape(-1, 1), number_logits, torch.zeros_like(number_logits))
    y_hat = expected_value(number_softmax(number_logits), number_values).view(batch, length)
    y = number_values[number_index.clamp_min(0)]
    scale = torch.pow(torch.tensor(10.0, dtype=dtype, device=logits.device), exponent.to(dtype))
    zero = torch.zeros((), dtype=dtype, device=logits.device)
    flat_owner = owner.reshape(-1)
    target = torch.zeros(batch * length, dtype=dtype, device=logits.device).scatter_add(
        0, flat_owner, torch.where(is_digit, y * scale, zero).reshape(-1)
    )
    prediction = torch.zeros(batch * length, dtype=dtype, device=logits.device).scatter_add(
        0, flat_owner, torch.where(is_digit, y_hat * scale, zero).reshape(-1)
    )
    eps = torch.finfo(torch.float32).eps
    error = (prediction - target).abs() / (prediction.abs() + target.abs() + eps)
    loss = torch.where(first_digit.reshape(-1), error, zero).view(batch, length)
    loss = torch.where(bad.view(batch, length), torch.full_like(loss, float("nan")), loss)
    return loss.to(accumulation_dtype(logits.dtype)), first_digit
