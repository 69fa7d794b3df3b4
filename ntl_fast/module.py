"""``torch.nn.Module`` wrappers: build the number-token table once, call like any loss.

:class:`NumberTokenLoss` (NTL alone), :class:`CrossEntropyWithNTL` (CE + λ·NTL from the logits)
and :class:`LinearCrossEntropyWithNTL` (CE + λ·NTL from the LM head's input). Each holds a
:class:`~ntl_fast.NumberTokenTable` and its options, and hands the table to the logits' device.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from .config import LossConfig, check_reduction
from .functional import NTLOutput, Normalizer, cross_entropy_with_ntl, number_token_loss
from .linear import check_chunk_size, linear_cross_entropy_with_ntl
from .table import NumberTokenTable

__all__ = ["NumberTokenLoss", "CrossEntropyWithNTL", "LinearCrossEntropyWithNTL"]


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


def _checked_options(**options: Any) -> dict:
    """The loss functions' keyword ``options``, checked now as a call would check them: a module or
    a Trainer fails at construction, not at its first step."""
    LossConfig(options.get("loss", "was"), options.get("squash_factor"), options.get("reweigh", False),
               options.get("gaussian_sigma"), options.get("ignore_index", -100))
    check_reduction(options.get("reduction", "mean"))
    return options


class _TableModule(torch.nn.Module):
    """Holds a table and hands out its copy on the device of the logits."""

    def __init__(self, table: NumberTokenTable) -> None:
        super().__init__()
        self.table = table

    def table_for(self, logits: Tensor) -> NumberTokenTable:
        return self.table.to(logits.device)

    def extra_repr(self) -> str:
        return f"{self.table!r}, " + ", ".join(f"{k}={v!r}" for k, v in self.options.items())


class NumberTokenLoss(_TableModule):
    """The Number Token Loss as a module (see :func:`ntl_fast.number_token_loss`).

    Build it from a Hugging Face tokenizer (``NumberTokenLoss(tokenizer)``) or a table
    (``NumberTokenLoss(table=...)``). ``shift_labels=True`` for causal LMs whose logits at
    position t predict the label at t + 1.

    Args:
        tokenizer: a Hugging Face or ``tokenizers`` tokenizer to build the table from (only read).
            Pass exactly one of ``tokenizer`` and ``table``.
        table (NumberTokenTable, optional): keyword only; a ready table instead of a tokenizer.
        vocab_size (int, optional): the logits' width V when it exceeds the tokenizer.
        digit_level (bool): number tokens are the digits 0-9 (default True); see
            :meth:`NumberTokenTable.from_tokenizer`.
        include_marked (bool): also accept ``▁5``-style marked tokens (default False).
        loss, squash_factor, reweigh, reduction, ignore_index, shift_labels, validate, backend:
            as :func:`ntl_fast.number_token_loss`; defaults ``"was"``, None, False, ``"mean"``,
            -100, False, True, ``"auto"``.

    Raises:
        ValueError, TypeError: invalid options, both or neither of ``tokenizer``/``table``, or a
            tokenizer the table cannot be built from — at construction, not at the first call.
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
        self.options = _checked_options(
            loss=loss, squash_factor=squash_factor, reweigh=reweigh, reduction=reduction,
            ignore_index=ignore_index, shift_labels=shift_labels, validate=validate, backend=backend,
        )

    def forward(self, logits: Tensor, labels: Tensor, weights: Optional[Tensor] = None,
                normalizer: Normalizer = None) -> Tensor:
        """NTL of ``logits (..., V)`` against ``labels (...)``; ``weights`` per position and
        ``normalizer`` (the mean's denominator) as :func:`ntl_fast.number_token_loss`, which
        gives the return value and the errors."""
        return number_token_loss(
            logits, labels, self.table_for(logits), weights=weights, normalizer=normalizer, **self.options
        )


class _CrossEntropyModule(_TableModule):
    """The table and the CE + NTL options that :class:`CrossEntropyWithNTL` and
    :class:`LinearCrossEntropyWithNTL` share."""

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
        self.options = _checked_options(
            ntl_weight=ntl_weight, loss=loss, gaussian_sigma=gaussian_sigma, squash_factor=squash_factor,
            reweigh=reweigh, reduction=reduction, ignore_index=ignore_index, shift_labels=shift_labels,
            validate=validate, backend=backend,
        )


class CrossEntropyWithNTL(_CrossEntropyModule):
    """Cross-entropy + ``ntl_weight`` x NTL as a module (see :func:`ntl_fast.cross_entropy_with_ntl`).

    Returns an :class:`~ntl_fast.NTLOutput` ``(loss, ce, ntl)``.

    Args:
        tokenizer, table, vocab_size, digit_level, include_marked: as :class:`NumberTokenLoss`.
        ntl_weight, loss, gaussian_sigma, squash_factor, reweigh, reduction, ignore_index,
        shift_labels, validate, backend: as :func:`ntl_fast.cross_entropy_with_ntl`; defaults 0.3,
            ``"was"``, None, None, False, ``"mean"``, -100, False, True, ``"auto"``.

    Raises:
        ValueError, TypeError: as :class:`NumberTokenLoss`, at construction.
    """

    def forward(self, logits: Tensor, labels: Tensor, weights: Optional[Tensor] = None,
                ce_normalizer: Normalizer = None, ntl_normalizer: Normalizer = None) -> NTLOutput:
        """CE + NTL of ``logits (..., V)`` against ``labels (...)``; ``weights``, ``ce_normalizer``
        and ``ntl_normalizer`` as :func:`ntl_fast.cross_entropy_with_ntl`, which gives the return
        value (:class:`~ntl_fast.NTLOutput`) and the errors."""
        return cross_entropy_with_ntl(
            logits, labels, self.table_for(logits), weights=weights,
            ce_normalizer=ce_normalizer, ntl_normalizer=ntl_normalizer, **self.options,
        )


class LinearCrossEntropyWithNTL(_CrossEntropyModule):
    """CE + ``ntl_weight`` x NTL from the LM head's input, as a module (see
    :func:`ntl_fast.linear_cross_entropy_with_ntl`): the ``tokens x V`` logits never exist whole.

    The module holds the table and the options, not the LM head: pass the head's parameters at
    each call, as with Liger's ``LigerFusedLinearCrossEntropyLoss`` (whose ``forward`` takes
    ``(lin_weight, _input, target, bias)``; this one takes ``(hidden, weight, labels, bias)``)::

        loss_fn = ntl_fast.LinearCrossEntropyWithNTL(tokenizer, vocab_size=head.weight.shape[0],
                                                     shift_labels=True)
        out = loss_fn(hidden_states, head.weight, labels, bias=head.bias)
        out.loss.backward()   # gradients reach hidden_states, head.weight and head.bias

    Args:
        tokenizer: a Hugging Face or ``tokenizers`` tokenizer to build the table from (only read).
            Pass exactly one of ``tokenizer`` and ``table``.
        table (NumberTokenTable, optional): keyword only; a ready table instead of a tokenizer.
        vocab_size (int, optional): the LM head's row count V when it exceeds the tokenizer.
        digit_level (bool): number tokens are the digits 0-9 (default True), see
            :meth:`NumberTokenTable.from_tokenizer`.
        include_marked (bool): also accept ``▁5``-style marked digits (default False).
        chunk_size (int, optional): rows per chunk (default: from a memory budget and the device,
            :func:`ntl_fast.linear.default_chunk_size`: 32 MiB of logits on the CPU; on CUDA
            ``min(device memory / 64, 512 MiB)``, at least 4 waves of rows over the SMs).
        ntl_weight, loss, gaussian_sigma, squash_factor, reweigh, reduction, ignore_index,
        shift_labels, validate, backend: as :func:`ntl_fast.cross_entropy_with_ntl`; defaults
            0.3, ``"was"``, None, None, False, ``"mean"``, -100, False, True, ``"auto"``.

    Raises:
        ValueError, TypeError: at construction for invalid options or a tokenizer without the
            digit tokens; at the call as :func:`ntl_fast.linear_cross_entropy_with_ntl`.
    """

    def __init__(self, tokenizer: Any = None, *, chunk_size: Optional[int] = None, **options: Any) -> None:
        check_chunk_size(chunk_size)
        super().__init__(tokenizer, **options)
        self.options["chunk_size"] = chunk_size

    def forward(self, hidden: Tensor, weight: Tensor, labels: Tensor, bias: Optional[Tensor] = None,
                weights: Optional[Tensor] = None, ce_normalizer: Normalizer = None,
                ntl_normalizer: Normalizer = None) -> NTLOutput:
        """CE + NTL of ``hidden (..., H) @ weight (V, H).T + bias (V,)`` against ``labels (...)``.

        ``weights`` are per-position loss weights; ``ce_normalizer`` / ``ntl_normalizer`` replace
        the means' counts (global counts under accumulation or data parallelism). Returns an
        :class:`~ntl_fast.NTLOutput` ``(loss, ce, ntl)``.
        """
        return linear_cross_entropy_with_ntl(
            hidden, weight, labels, self.table_for(hidden), bias=bias, weights=weights,
            ce_normalizer=ce_normalizer, ntl_normalizer=ntl_normalizer, **self.options,
        )
