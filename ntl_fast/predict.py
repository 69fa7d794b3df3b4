"""What the model predicts as a number at each position: for evaluation and logging.

    pred = ntl_fast.predict_numbers(logits, table.to(logits.device))
    pred.expected_value   # (...,) ŷ = Σ_j q_j v_j, the value NTL-MSE scores (docs/math.md §2)
    pred.number_mass      # (...,) m, the probability the model puts on number tokens at all

This is the authors' ``NTLossDotProduct.predict_numbers`` for any vocabulary and any leading
shape, built from the reference math (:mod:`ntl_fast.reference`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .functional import _check_logits
from .reference import accumulation_dtype, expected_value, number_softmax
from .table import NumberTokenTable

__all__ = ["NumberPrediction", "predict_numbers"]


class NumberPrediction(NamedTuple):
    """The number the model predicts at each position, and how sure it is that one belongs there.

    Attributes:
        expected_value: ``(...,)`` tensor, ``ŷ = Σ_{j∈N} q_j v_j`` with ``q`` the softmax over the
            number tokens only (docs/math.md §2).
        number_mass: ``(...,)`` tensor, ``m = Σ_{j∈N} p_j`` with ``p`` the softmax over the whole
            vocabulary: the probability that the next token is a number token at all.
    """

    expected_value: Tensor
    number_mass: Tensor


def predict_numbers(logits: Tensor, table: NumberTokenTable) -> NumberPrediction:
    """The expected number value and the number mass at every position of ``logits``.

    Every position gets a prediction, whatever its label (positions that should hold text have a
    low ``number_mass``). Differentiable, runs on any device, no host synchronisation.

    Args:
        logits (Tensor): ``(..., V)`` float32, bfloat16, float16 or float64, with
            ``V >= table.vocab_size`` (ids past the table are text tokens).
        table (NumberTokenTable): the number tokens and their values, on the logits' device
            (``table.to(logits.device)``).

    Returns:
        NumberPrediction: ``(expected_value, number_mass)``, each of shape ``logits.shape[:-1]``,
        float32 (float64 for float64 logits). ``number_mass`` is computed as
        ``exp(LSE_N - LSE_V)``, so it stays accurate when it is tiny.

    Raises:
        TypeError: ``logits`` is not a floating-point tensor of a supported dtype, or ``table``
            is not a :class:`NumberTokenTable`.
        ValueError: ``logits`` is empty, has fewer than ``table.vocab_size`` columns, or lives on
            another device than ``table``.
    """
    _check_logits(logits, table)
    z = logits.to(accumulation_dtype(logits.dtype))
    number_logits = z.index_select(-1, table.number_ids)
    values = expected_value(number_softmax(number_logits), table.number_values.to(z.dtype))
    mass = torch.exp(torch.logsumexp(number_logits, dim=-1) - torch.logsumexp(z, dim=-1))
    return NumberPrediction(values, mass)
