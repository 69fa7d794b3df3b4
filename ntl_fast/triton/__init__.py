"""The Triton backend: fused kernels for NTL and CE + NTL, registered as ``torch.library`` ops.

Same contract as :func:`ntl_fast.reference.ntl_rows` / :func:`ntl_fast.reference.ce_ntl_rows`
(per-row losses, differentiable w.r.t. the logits). Runs CUDA tensors, and CPU tensors in
Triton's interpreter (``TRITON_INTERPRET=1`` set before this package is imported).

Ops (namespace ``ntl_fast``): ``triton_ntl_forward`` / ``triton_ntl_backward`` and
``triton_ce_ntl_forward`` / ``triton_ce_ntl_backward`` / ``triton_ce_ntl_backward_`` (in place),
each with a fake implementation, so ``torch.compile(fullgraph=True)`` traces through them.
"""

from __future__ import annotations

from typing import Tuple

import triton  # noqa: F401  (ImportError here tells the dispatcher Triton is missing)
from torch import Tensor

from ..config import LossConfig
from ..table import NumberTokenTable
from ._common import loss_options, table_tensors
from .cross_entropy_with_ntl import ce_ntl_backward, ce_ntl_backward_, ce_ntl_forward
from .number_token_loss import ntl_backward, ntl_forward

__all__ = [
    "ntl_rows",
    "ce_ntl_rows",
    "ntl_forward",
    "ntl_backward",
    "ce_ntl_forward",
    "ce_ntl_backward",
    "ce_ntl_backward_",
    "fuses_loss_and_grad",
]


def _row_table(table: NumberTokenTable, vocab_size: int) -> NumberTokenTable:
    return table if table.vocab_size == vocab_size else table.resized(vocab_size)


def ntl_rows(logits: Tensor, labels: Tensor, table: NumberTokenTable, config: LossConfig) -> Tensor:
    """Per-position NTL ``(M,)``: 0 off the NTL-valid positions, NaN at bad labels."""
    table = _row_table(table, logits.shape[-1])
    ntl, _ = ntl_forward(logits, labels, list(table_tensors(table)), *loss_options(config, table))
    return ntl


def ce_ntl_rows(
    logits: Tensor, labels: Tensor, table: NumberTokenTable, config: LossConfig,
    inplace: bool = False,
) -> Tuple[Tensor, Tensor]:
    """Per-position CE (Gaussian-CE at number positions with ``gaussian_sigma``) and NTL.

    ``inplace=True``: the backward writes the gradient into the logits' buffer instead of a new
    M x V tensor. Afterwards those logits hold gradients: only use it when nothing else reads
    them after this loss (no second loss on them, no logging after backward).
    """
    table = _row_table(table, logits.shape[-1])
    ce, ntl, _ = ce_ntl_forward(
        logits, labels, list(table_tensors(table)), *loss_options(config, table), inplace
    )
    return ce, ntl


def fuses_loss_and_grad(logits: Tensor) -> bool:
    """False: the loss and its gradient take two passes here (forward, then backward)."""
    return False
