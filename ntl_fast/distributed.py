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

from typing import Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

from .labels import Labels, count_positions
from .table import NumberTokenTable

__all__ = ["token_counts", "global_counts"]


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
    use. ``shift_labels=True`` counts what the causal shift scores, as the loss functions do. A
    position counts for CE iff its label is not ``ignore_index`` and lies in ``[0, V)``
    (``V = table.vocab_size``), for NTL iff it also is a number token
    (:func:`ntl_fast.labels.count_positions`).

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
    counts = count_positions(labels, table, ignore_index, weights, shift_labels=shift_labels)
    return counts[0].to(torch.float32), counts[1].to(torch.float32)


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
