"""Global counts for exact means under data parallelism and gradient accumulation (docs/math.md §3).

A mean over a global batch split across ranks and micro-batches is ``Σ_parts sum_part / count``
with one global ``count`` per term: CE counts the non-ignored positions, NTL the number
positions. Pass them as ``ce_normalizer`` / ``ntl_normalizer``; each part then contributes its
exact share, and summing the parts' losses (and gradients) gives the global mean. DDP and FSDP
*average* gradients over ranks, so multiply each rank's loss by the world size::

    ce_count, ntl_count = global_counts([mb["labels"] for mb in micro_batches], table, shift_labels=True)
    for mb in micro_batches:
        out = cross_entropy_with_ntl(logits, mb["labels"], table, shift_labels=True,
                                     ce_normalizer=ce_count, ntl_normalizer=ntl_count)
        (out.loss * world_size).backward()

The counts stay on the device: no host synchronisation (the all-reduce is a collective, not a read).
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist
from torch import Tensor

from .table import NumberTokenTable

__all__ = ["token_counts", "global_counts"]

Labels = Union[Tensor, Sequence[Tensor]]


def _as_list(value) -> list:
    if value is None:
        return []
    return [value] if isinstance(value, Tensor) else list(value)


def token_counts(
    labels: Labels,
    table: NumberTokenTable,
    ignore_index: int = -100,
    weights: Optional[Labels] = None,
    *,
    shift_labels: bool = False,
) -> Tuple[Tensor, Tensor]:
    """Local ``(ce_count, ntl_count)``: float32 0-d tensors on the labels' device.

    ``labels`` is one tensor or a sequence of micro-batches; with ``weights`` (same structure)
    the counts are weight sums, as the weighted means of :func:`ntl_fast.cross_entropy_with_ntl`
    use. ``shift_labels=True`` drops each row's first label, as the loss functions do.

    Args:
        labels (Tensor or sequence of Tensors): token ids, ``ignore_index`` for ignored positions.
        table (NumberTokenTable): the number tokens (moved to the labels' device, cached).
        ignore_index (int): default -100.
        weights (Tensor or sequence of Tensors, optional): per-position weights, one tensor per
            label tensor, of the same shapes.
        shift_labels (bool): keyword only; count as the causal shift scores (default False).

    Returns:
        tuple[Tensor, Tensor]: ``(ce_count, ntl_count)``: the (weighted) numbers of non-ignored
        positions and of number positions, float32 0-d tensors; no host synchronisation.

    Raises:
        ValueError: no label tensor, or a different number of weight tensors.
    """
    label_list = _as_list(labels)
    weight_list = _as_list(weights)
    if not label_list:
        raise ValueError("labels: expected a tensor or a non-empty sequence of tensors")
    if weight_list and len(weight_list) != len(label_list):
        raise ValueError(f"weights: {len(weight_list)} tensors for {len(label_list)} label tensors")
    device = label_list[0].device
    table = table.to(device)
    totals = torch.zeros(2, dtype=torch.float32, device=device)
    for index, part in enumerate(label_list):
        part_weights = weight_list[index] if weight_list else None
        if shift_labels:
            part = part[..., 1:]
            part_weights = None if part_weights is None else part_weights[..., 1:]
        flat = part.reshape(-1).long()
        # every label other than ignore_index counts for CE (the loss rejects out-of-range ones);
        # ids past the table (a padded LM head) are text tokens
        counts_for_ce = (flat != ignore_index) & (flat >= 0)
        known = counts_for_ce & (flat < table.vocab_size)
        safe = torch.where(known, flat, torch.zeros_like(flat))
        is_number = known & (table.number_index[safe] >= 0)
        counted = torch.stack([counts_for_ce, is_number]).to(torch.float32)
        if part_weights is not None:
            counted = counted * part_weights.reshape(-1).to(torch.float32)
        totals = totals + counted.sum(-1)
    return totals[0], totals[1]


def global_counts(
    labels: Labels,
    table: NumberTokenTable,
    ignore_index: int = -100,
    weights: Optional[Labels] = None,
    group: Optional["dist.ProcessGroup"] = None,
    *,
    shift_labels: bool = False,
) -> Tuple[Tensor, Tensor]:
    """:func:`token_counts` summed over the ranks of ``group`` (one all-reduce).

    Without an initialised process group this is :func:`token_counts`.

    Args:
        labels, table, ignore_index, weights, shift_labels: as :func:`token_counts`.
        group (ProcessGroup, optional): the ranks to sum over; default the world.

    Returns:
        tuple[Tensor, Tensor]: the global ``(ce_count, ntl_count)``, float32 0-d tensors on the
        labels' device, the same on every rank: pass them as ``ce_normalizer`` /
        ``ntl_normalizer``.

    Raises:
        ValueError: as :func:`token_counts`; the all-reduce's own errors.
    """
    ce_count, ntl_count = token_counts(labels, table, ignore_index=ignore_index, weights=weights,
                                       shift_labels=shift_labels)
    if dist.is_available() and dist.is_initialized():
        both = torch.stack([ce_count, ntl_count])
        dist.all_reduce(both, op=dist.ReduceOp.SUM, group=group)
        ce_count, ntl_count = both[0], both[1]
    return ce_count, ntl_count
