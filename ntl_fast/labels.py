"""Which positions count, and the causal shift: the one home of the label rule (docs/math.md §3).

A position counts for cross-entropy iff its label is not ``ignore_index`` and lies in ``[0, V)``;
it counts for NTL iff it also is a number token. ``ignore_index`` may itself lie in ``[0, V)``
(it is then ignored, not scored). Every part of the package that scores or counts positions —
the loss functions, the modules, the Trainer and causal-LM integrations, :mod:`ntl_fast.distributed`
— classifies labels with :func:`label_positions` and shifts them with :func:`causal_shift`.

The causal shift moves the labels, never the logits: position t is scored against label t + 1,
and the last position, which predicts nothing, gets ``ignore_index``. The logits keep their shape
``(..., T, V)``, so they reach the kernels as a view, and the last position's gradient is the
zero row an ignored position gets anyway.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .table import NumberTokenTable

__all__ = ["causal_shift", "label_positions", "count_positions"]

Labels = Union[Tensor, Sequence[Tensor]]


def causal_shift(labels: Tensor, ignore_index: int, weights: Optional[Tensor] = None
                 ) -> Tuple[Tensor, Optional[Tensor]]:
    """Labels (and weights) shifted left by one along the last axis: position t gets label t + 1;
    the last position gets ``ignore_index`` (and weight 0). Shapes are unchanged.

    Args:
        labels (Tensor): ``(..., T)`` token ids, T >= 1.
        ignore_index (int): the label of the padded last position.
        weights (Tensor, optional): ``(..., T)`` per-position weights, shifted alike.

    Returns:
        tuple[Tensor, Optional[Tensor]]: the shifted labels and weights (None without weights).
    """
    pad = labels.new_full(labels.shape[:-1] + (1,), ignore_index)
    shifted = torch.cat([labels[..., 1:], pad], dim=-1)
    if weights is not None:
        weights = torch.cat([weights[..., 1:], weights.new_zeros(weights.shape[:-1] + (1,))], dim=-1)
    return shifted, weights


def label_positions(labels: Tensor, table: NumberTokenTable, ignore_index: int) -> Tuple[Tensor, Tensor, Tensor]:
    """Classify each label, with ``V = table.vocab_size``.

    Returns ``(in_range, bad, number_index)``: the labels that count for CE (in ``[0, V)`` and not
    ``ignore_index``); the labels that are neither in range nor ``ignore_index`` (the loss functions
    reject them, or score them NaN under ``validate=False``); and each label's position in N (-1
    where it is not a number token). A position counts for NTL iff ``number_index >= 0``.
    """
    vocab_size = table.vocab_size
    ignored = labels == ignore_index
    in_range = (labels >= 0) & (labels < vocab_size) & ~ignored
    bad = ~in_range & ~ignored
    safe = torch.where(in_range, labels, torch.zeros_like(labels)).long()
    number_index = torch.where(in_range, table.number_index[safe], torch.full_like(safe, -1))
    return in_range, bad, number_index


def count_positions(labels: Labels, table: NumberTokenTable, ignore_index: int = -100,
                    weights: Optional[Labels] = None, *, shift_labels: bool = False) -> Tuple[Tensor, Tensor]:
    """``(ce_count, ntl_count)``: how many positions count for CE and for NTL (the denominators of
    the two means), over one label tensor or a sequence of them (the micro-batches of one step).

    Args:
        labels (Tensor or sequence of Tensors): token ids, ``ignore_index`` for ignored positions.
        table (NumberTokenTable): the number tokens; ``V = table.vocab_size`` (pass
            ``table.resized(V)`` for a wider LM head). Moved to the labels' device (cached).
        ignore_index (int): default -100.
        weights (Tensor or sequence of Tensors, optional): one per label tensor, of its shape: the
            counts become sums of the counted positions' weights.
        shift_labels (bool): keyword only; count what the causal shift scores (default False).

    Returns:
        tuple[Tensor, Tensor]: 0-d tensors on the first label tensor's device, int64 without
        weights (exact at any size), float32 with them; no host synchronisation.

    Raises:
        ValueError: no label tensor, or a different number of weight tensors.
    """
    label_list = [labels] if isinstance(labels, Tensor) else list(labels)
    weight_list = [] if weights is None else [weights] if isinstance(weights, Tensor) else list(weights)
    if not label_list:
        raise ValueError("labels: expected a tensor or a non-empty sequence of tensors")
    if weight_list and len(weight_list) != len(label_list):
        raise ValueError(f"weights: {len(weight_list)} tensors for {len(label_list)} label tensors")
    device = label_list[0].device
    table = table.to(device)
    totals = torch.zeros(2, dtype=torch.float32 if weight_list else torch.int64, device=device)
    for index, part in enumerate(label_list):
        part = part.detach().to(device)
        part_weights = weight_list[index].detach().to(device) if weight_list else None
        if shift_labels:
            part, part_weights = causal_shift(part, ignore_index, part_weights)
        in_range, _, number_index = label_positions(part.reshape(-1), table, ignore_index)
        counted = torch.stack([in_range, number_index >= 0]).to(totals.dtype)
        if part_weights is not None:
            counted = counted * part_weights.reshape(-1).to(torch.float32)
        totals = totals + counted.sum(-1)
    return totals[0], totals[1]
