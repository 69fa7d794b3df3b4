"""``torch.nn.Module`` wrappers: build the number-token table once, call like any loss."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from .config import LossConfig, check_reduction
from .functional import NTLOutput, Normalizer, cross_entropy_with_ntl, number_token_loss
from .table import NumberTokenTable

__all__ = ["NumberTokenLoss", "CrossEntropyWithNTL"]


def _table(tokenizer: Any, table: Optional[NumberTokenTable], vocab_size: Optional[int],
           digit_level: bool, include_marked: bool) -> NumberTokenTable:
    if (tokenizer is None) == (table is None):
        raise ValueError("pass exactly one of tokenizer= and table=")
    if table is not None:
        if not isinstance(table, NumberTokenTable):
            raise TypeError(f"table must be a NumberTokenTable, got {type(table).__name__}")
        return table
    return NumberTokenTable.from_tokenizer(
        tokenizer, vocab_size=vocab_size, digit_level=digit_level, include_marked=include_marked
    )


class _TableModule(torch.nn.Module):
    """Holds a table and hands out its copy on the device of the logits."""

    def __init__(self, table: NumberTokenTable) -> None:
        super().__init__()
        self.table = table

    def table_for(self, logits: Tensor) -> NumberTokenTable:
        return self.table.to(logits.device)


class NumberTokenLoss(_TableModule):
    """The Number Token Loss as a module (see :func:`ntl_fast.number_token_loss`).

    Build it from a Hugging Face tokenizer (``NumberTokenLoss(tokenizer)``) or a table
    (``NumberTokenLoss(table=...)``). ``shift_labels=True`` for causal LMs whose logits at
    position t predict the label at t + 1.
    """

    def __init__(
        self,
        tokenizer: Any = None,
        *,
        table: Optional[NumberTokenTable] = None,
        vocab_size: Optional[int] = None,
        digit_level: bool = True,
        include_marked: bool = False,
        loss: str = "was",
        squash_factor: Optional[float] = None,
        reweigh: bool = False,
        reduction: str = "mean",
        ignore_index: int = -100,
        shift_labels: bool = False,
        validate: bool = True,
        backend: str = "auto",
    ) -> None:
        super().__init__(_table(tokenizer, table, vocab_size, digit_level, include_marked))
        LossConfig(loss, squash_factor, reweigh, None, ignore_index)  # fail at construction
        check_reduction(reduction)
        self.options = dict(
            loss=loss, squash_factor=squash_factor, reweigh=reweigh, reduction=reduction,
            ignore_index=ignore_index, shift_labels=shift_labels, validate=validate, backend=backend,
        )

    def forward(self, logits: Tensor, labels: Tensor, weights: Optional[Tensor] = None,
                normalizer: Normalizer = None) -> Tensor:
        return number_token_loss(
            logits, labels, self.table_for(logits), weights=weights, normalizer=normalizer, **self.options
        )

    def extra_repr(self) -> str:
        return f"{self.table!r}, " + ", ".join(f"{k}={v!r}" for k, v in self.options.items())


class CrossEntropyWithNTL(_TableModule):
    """Cross-entropy + ``ntl_weight`` x NTL as a module (see :func:`ntl_fast.cross_entropy_with_ntl`).

    Returns an :class:`~ntl_fast.NTLOutput` ``(loss, ce, ntl)``.
    """

    def __init__(
        self,
        tokenizer: Any = None,
        *,
        table: Optional[NumberTokenTable] = None,
        vocab_size: Optional[int] = None,
        digit_level: bool = True,
        include_marked: bool = False,
        ntl_weight: float = 0.3,
        loss: str = "was",
        gaussian_sigma: Optional[float] = None,
        squash_factor: Optional[float] = None,
        reweigh: bool = False,
        reduction: str = "mean",
        ignore_index: int = -100,
        shift_labels: bool = False,
        validate: bool = True,
        backend: str = "auto",
    ) -> None:
        super().__init__(_table(tokenizer, table, vocab_size, digit_level, include_marked))
        LossConfig(loss, squash_factor, reweigh, gaussian_sigma, ignore_index)
        check_reduction(reduction)
        self.options = dict(
            ntl_weight=ntl_weight, loss=loss, gaussian_sigma=gaussian_sigma,
            squash_factor=squash_factor, reweigh=reweigh, reduction=reduction,
            ignore_index=ignore_index, shift_labels=shift_labels, validate=validate, backend=backend,
        )

    def forward(self, logits: Tensor, labels: Tensor, weights: Optional[Tensor] = None,
                ce_normalizer: Normalizer = None, ntl_normalizer: Normalizer = None) -> NTLOutput:
        return cross_entropy_with_ntl(
            logits, labels, self.table_for(logits), weights=weights,
            ce_normalizer=ce_normalizer, ntl_normalizer=ntl_normalizer, **self.options,
        )

    def extra_repr(self) -> str:
        return f"{self.table!r}, " + ", ".join(f"{k}={v!r}" for k, v in self.options.items())
