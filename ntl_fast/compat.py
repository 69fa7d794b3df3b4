"""Drop-in replacements for the authors' ``ntloss`` classes (version 0.3.2), served by ntl_fast.

    # before                                   # after
    from ntloss import NTLoss                  from ntl_fast.compat import NTLoss
    loss_fn = NTLoss(tokenizer)                loss_fn = NTLoss(tokenizer)
    ntl = loss_fn(logits, labels)              ntl = loss_fn(logits, labels)

Same constructor and call signatures, same defaults, same numbers (the tests compare each class
with ``ntloss`` 0.3.2), computed by ntl_fast's backends through its public functions. In
particular **reweighing is on by default here**, as in ``ntloss`` (docs/math.md §2.4), whereas
ntl_fast's own functions follow the paper and leave it off: ``NTLoss(tokenizer)(logits, labels)``
equals ``ntl_fast.number_token_loss(logits, labels, table, reweigh=True)``.

Where these classes differ from ``ntloss``:

- The tokenizer is never changed. Where ``ntloss`` silently calls ``tokenizer.add_tokens`` for
  missing digit tokens, the constructor raises ``ValueError`` naming them; add them yourself
  (``tokenizer.add_tokens([...])`` and ``model.resize_token_embeddings(len(tokenizer))``).
- Losses are float32 (float64 for float64 logits) whatever the logits' dtype; ``ntloss`` returns
  the logits' dtype (bfloat16 for bfloat16 logits).
- A mean over no number position is 0 with a zero gradient (``ntloss``: a constant 0 without a
  gradient).
- Logits may have any leading shape ``(..., V)`` (``ntloss``: exactly ``(B, T, V)``); labels may be
  int32 as well as int64; out-of-range labels raise ``ValueError`` (``validate=True``).
- Two keyword-only extras: ``backend`` (``"auto"``, ``"triton"``, ``"cpp"``, ``"reference"``) and
  ``validate`` (the label check, one device-to-host read per call; see
  :func:`ntl_fast.number_token_loss`).
"""

from __future__ import annotations

import abc
import math
from typing import Any, Callable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import reference
from .functional import _check_inputs, _check_values, _reduce, _rows, number_level_loss, number_token_loss
from .number_level import number_runs
from .predict import predict_numbers
from .table import NumberTokenTable

__all__ = ["NTLoss", "NTLossDotProduct", "NumberLevelLoss"]

# The torch functions with a kernel (docs/math.md §2.1); Huber and smooth-L1 at their default
# δ = β = 1 are the same function. Any other callable runs through the reference.
_KERNEL_LOSSES = {F.mse_loss: "mse", F.l1_loss: "mae", F.huber_loss: "huber", F.smooth_l1_loss: "huber"}


def _tokenizer_length(tokenizer: Any) -> int:
    if hasattr(tokenizer, "get_vocab_size"):  # a raw `tokenizers.Tokenizer`
        return int(tokenizer.get_vocab_size(with_added_tokens=True))
    return len(tokenizer)


def _ntloss_table(tokenizer: Any, vocab_size: int, digit_level: bool) -> NumberTokenTable:
    """The table ``ntloss`` builds, without touching the tokenizer.

    Digit level: the single ASCII digits, as :meth:`NumberTokenTable.from_tokenizer`. Otherwise
    ``ntloss``'s own rule: every token that Python's ``float()`` reads as a finite number
    (``" 5"``, ``"1e5"`` and ``"٣"`` included, unlike ntl_fast's stricter native rule of
    docs/math.md §1).
    """
    if digit_level:
        return NumberTokenTable.from_tokenizer(tokenizer, vocab_size=vocab_size, digit_level=True)
    vocab = tokenizer.get_vocab()
    values = torch.full((vocab_size,), float("nan"))
    for token, token_id in vocab.items():
        try:
            value = float(token)
        except ValueError:
            continue
        if math.isfinite(value):
            if token_id >= vocab_size:
                raise ValueError(f"vocab_size={vocab_size} is smaller than the tokenizer (token id {token_id})")
            values[token_id] = value
    return NumberTokenTable(values, dot_id=vocab.get("."))


def _float_weights(loss_weights: Optional[Tensor]) -> Optional[Tensor]:
    if isinstance(loss_weights, Tensor) and not loss_weights.is_floating_point():
        return loss_weights.to(torch.float32)
    return loss_weights


class _CompatLoss(abc.ABC):
    """What the three classes share: the table, ``ntloss``'s attributes, and the V check."""

    def __init__(self, tokenizer: Any, vocab_size: Optional[int], digit_level: bool, reweigh: bool,
                 backend: str, validate: bool) -> None:
        if not isinstance(reweigh, bool):
            raise TypeError(f"reweigh must be a bool, got {reweigh!r}")
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size if vocab_size is not None else _tokenizer_length(tokenizer)
        self.digit_level = digit_level
        self.reweigh = reweigh
        self.backend = backend
        self.validate = validate
        self.table = _ntloss_table(tokenizer, self.vocab_size, digit_level)
        # ntloss's attribute names, for code that reads them
        self.number_values = self.table.values
        self.is_number_token = self.table.is_number
        self.number_token_ids = self.table.number_ids

    def __call__(self, *args: Any, **kwargs: Any) -> Tensor:
        return self.forward(*args, **kwargs)

    def _table_for(self, logits: Tensor) -> NumberTokenTable:
        if not isinstance(logits, Tensor):
            raise TypeError(f"logits must be a Tensor, got {type(logits).__name__}")
        if logits.dim() >= 1 and logits.shape[-1] != self.vocab_size:
            raise ValueError(
                f"logits have {logits.shape[-1]} columns but vocab_size is {self.vocab_size}: pass "
                f"vocab_size= the LM head's output size to the constructor"
            )
        return self.table.to(logits.device)

    @abc.abstractmethod
    def forward(self, logits: Tensor, labels: Tensor, loss_weights: Optional[Tensor] = None,
                reduction: str = "mean", ignore_index: int = -100) -> Tensor:
        """The loss of ``logits (..., V)`` against ``labels (...)``; each class defines it."""


class NTLoss(_CompatLoss):
    """NTL-WAS with ``ntloss.NTLoss``'s interface and defaults (docs/math.md §2.2, §2.4).

    Args:
        tokenizer: a Hugging Face tokenizer (or anything with ``get_vocab()`` and ``len()``); only
            read.
        vocab_size (int, optional): the logits' last dimension. Default ``len(tokenizer)``.
            Logits with another width are a ``ValueError`` (as in ``ntloss``).
        digit_level (bool): True (default): the number tokens are the digits ``0``-``9``.
            False: every token ``float()`` reads as a finite number.
        reweigh (bool): scale by the number mass, ``m L + c (1 - m)``, ``c = 1.01 * max distance``.
            Default True, as ``ntloss`` (the paper did not use it).
        squash_factor (float, optional): > 1: map non-zero distances onto ``[1, squash_factor]``.
            Default None (raw distances).
        backend (str): keyword only; ``"auto"`` (default), ``"triton"``, ``"cpp"`` or ``"reference"``.
        validate (bool): keyword only; check label values eagerly (default True; one
            device-to-host read per call).

    Raises:
        ValueError: the tokenizer lacks digit tokens (``ntloss`` would add them to it), has no
            number token or only number tokens, is larger than ``vocab_size``, or
            ``squash_factor <= 1``.
    """

    def __init__(self, tokenizer: Any, vocab_size: Optional[int] = None, digit_level: bool = True,
                 reweigh: bool = True, squash_factor: Optional[float] = None, *,
                 backend: str = "auto", validate: bool = True) -> None:
        super().__init__(tokenizer, vocab_size, digit_level, reweigh, backend, validate)
        self.squash_factor = squash_factor
        self.max_dist = self.table.reweigh_constant("was", squash_factor) / 1.01

    def forward(self, logits: Tensor, labels: Tensor, loss_weights: Optional[Tensor] = None,
                reduction: str = "mean", ignore_index: int = -100) -> Tensor:
        """NTL-WAS of ``logits (..., V)`` against ``labels (...)``.

        Args:
            logits (Tensor): float32, bfloat16, float16 or float64 logits.
            labels (Tensor): int64 (or int32) token ids; ``ignore_index`` marks positions to skip.
            loss_weights (Tensor, optional): ``(...)`` per-position weights >= 0.
            reduction (str): ``"mean"`` (default; over the number positions, weighted),
                ``"sum"`` or ``"none"`` (a tensor of the labels' shape).
            ignore_index (int): default -100.

        Returns:
            Tensor: a scalar, or the labels' shape for ``"none"``; float32 (float64 for float64
            logits).

        Raises:
            TypeError, ValueError: as :func:`ntl_fast.number_token_loss`, and ``ValueError`` when
            the logits' width is not ``vocab_size``.
        """
        return number_token_loss(
            logits, labels, self._table_for(logits), loss="was", squash_factor=self.squash_factor,
            reweigh=self.reweigh, reduction=reduction, weights=_float_weights(loss_weights),
            ignore_index=ignore_index, validate=self.validate, backend=self.backend,
        )


class NTLossDotProduct(_CompatLoss):
    """NTL-MSE and its relatives with ``ntloss.NTLossDotProduct``'s interface (docs/math.md §2.1).

    ``loss_function(ŷ, y, reduction="none")`` scores the expected value ``ŷ`` against the label's
    value ``y``. ``F.mse_loss`` (default), ``F.l1_loss``, ``F.huber_loss`` and
    ``F.smooth_l1_loss`` (both at their default δ = β = 1) run on ntl_fast's kernels; any other
    callable with that signature runs through the PyTorch reference (autograd, no fused kernel).

    Args:
        tokenizer, vocab_size, digit_level, reweigh, backend, validate: as :class:`NTLoss`.
            The reweigh constant is ``c = 1.01 * max(|f(v_min, v_max)|, |f(v_max, v_min)|)``.
        loss_function (Callable): default ``torch.nn.functional.mse_loss``.

    Raises:
        ValueError: as :class:`NTLoss`.
        TypeError: ``loss_function`` is not callable.
    """

    def __init__(self, tokenizer: Any, vocab_size: Optional[int] = None, digit_level: bool = True,
                 reweigh: bool = True, loss_function: Callable = F.mse_loss, *,
                 backend: str = "auto", validate: bool = True) -> None:
        super().__init__(tokenizer, vocab_size, digit_level, reweigh, backend, validate)
        if not callable(loss_function):
            raise TypeError(f"loss_function must be callable, got {loss_function!r}")
        self.loss_function = loss_function
        self.kernel_loss = _KERNEL_LOSSES.get(loss_function)
        low = torch.tensor(self.table.min_value)
        high = torch.tensor(self.table.max_value)
        self.max_dist = float(torch.maximum(loss_function(low, high).abs(), loss_function(high, low).abs()))

    def forward(self, logits: Tensor, labels: Tensor, loss_weights: Optional[Tensor] = None,
                reduction: str = "mean", ignore_index: int = -100) -> Tensor:
        """``loss_function(ŷ, y)`` at the number positions, reduced. Arguments, return value and
        errors as :meth:`NTLoss.forward`."""
        table = self._table_for(logits)
        weights = _float_weights(loss_weights)
        if self.kernel_loss is not None:
            return number_token_loss(
                logits, labels, table, loss=self.kernel_loss, reweigh=self.reweigh, reduction=reduction,
                weights=weights, ignore_index=ignore_index, validate=self.validate, backend=self.backend,
            )
        return self._reference_forward(logits, labels, table, weights, reduction, ignore_index)

    def _reference_forward(self, logits: Tensor, labels: Tensor, table: NumberTokenTable,
                           weights: Optional[Tensor], reduction: str, ignore_index: int) -> Tensor:
        """docs/math.md §2.1 with a user's ``f``, from the reference's building blocks."""
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"reduction must be one of ('mean', 'sum', 'none'), got {reduction!r}")
        shape = labels.shape if isinstance(labels, Tensor) else None
        prepared = _rows(logits, labels, table, weights, False, self.validate, ignore_index, "reference")
        logits2d, labels1d, weights1d = prepared.logits, prepared.labels, prepared.weights
        z = logits2d.to(reference.accumulation_dtype(logits2d.dtype))
        _, bad, number_index = reference.label_positions(labels1d, table, ignore_index)
        is_number = number_index >= 0
        # f sees the number positions only (as in ntloss): it may be undefined elsewhere
        number_logits = z[is_number][:, table.number_ids]
        values = table.number_values.to(z.dtype)
        y_hat = reference.expected_value(reference.number_softmax(number_logits), values)
        scored = self.loss_function(y_hat, values[number_index[is_number]], reduction="none").to(z.dtype)
        if self.reweigh:
            mass, text_mass = _masses(z[is_number], table, z.dtype)
            scored = reference.reweigh_by_number_mass(scored, mass, text_mass, 1.01 * self.max_dist)
        rows = torch.zeros(z.shape[0], dtype=z.dtype, device=z.device).masked_scatter(is_number, scored)
        rows = torch.where(bad, torch.full_like(rows, float("nan")), rows)
        return _reduce(rows, is_number, weights1d, reduction, None, shape)

    def predict_numbers(self, logits: Tensor) -> Tuple[Tensor, Tensor]:
        """``(ŷ, number mass)`` at every position of ``logits (..., V)``: see
        :func:`ntl_fast.predict_numbers`."""
        return tuple(predict_numbers(logits, self._table_for(logits)))


def _masses(logits: Tensor, table: NumberTokenTable, dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
    """``(m, 1 - m)`` at every position of ``logits (..., V)`` from the log-odds of number and text
    tokens (:func:`ntl_fast.reference.number_and_text_mass`): each keeps its relative precision,
    and so does its gradient, when the other is 1 to the last bit (docs/math.md §2.4)."""
    z = logits.to(dtype)
    is_number = torch.zeros(z.shape[-1], dtype=torch.bool, device=z.device)
    is_number[table.number_ids] = True  # the logits' width: a padded head has text columns past V
    mass, text_mass = reference.number_and_text_mass(z.reshape(-1, z.shape[-1]), is_number)
    return mass.view(z.shape[:-1]), text_mass.view(z.shape[:-1])


class NumberLevelLoss(NTLossDotProduct):
    """The number-level loss with ``ntloss.NumberLevelLoss``'s interface (docs/math.md §2.7).

    ``reweigh=True`` (the default, as in ``ntloss``, whose own docstring calls this path
    unrefined) returns ``m L + 1.01 (1 - m)`` for each number, ``m`` being the number mass at the
    number's first digit; ``reweigh=False`` is :func:`ntl_fast.number_level_loss`.

    Args:
        tokenizer, vocab_size, reweigh, backend, validate: as :class:`NTLoss` (always digit level).
        float_level (bool): a single ``.`` between digits joins a number (``12.5`` is one number).
            Default False. Needs a ``.`` token in the vocabulary.
        max_number_length (int): exponents are clamped to ``max_number_length - 1``. Default 20.

    Raises:
        ValueError: as :class:`NTLoss`; ``float_level=True`` without a ``.`` token (at the call).
    """

    def __init__(self, tokenizer: Any, vocab_size: Optional[int] = None, float_level: bool = False,
                 reweigh: bool = True, max_number_length: int = 20, *,
                 backend: str = "auto", validate: bool = True) -> None:
        super().__init__(tokenizer, vocab_size, True, reweigh, F.l1_loss, backend=backend, validate=validate)
        self.float_level = float_level
        self.max_number_length = max_number_length
        self.dot = self.table.dot_id
        self.max_dist = 1.0  # the symmetric relative error lies in [0, 1]

    def forward(self, logits: Tensor, labels: Tensor, loss_weights: Optional[Tensor] = None,
                reduction: str = "mean", ignore_index: int = -100) -> Tensor:
        """The number-level loss of ``logits (..., T, V)`` against ``labels (..., T)``; the mean is
        over numbers, weights are read at each number's first digit. Return value and errors as
        :meth:`NTLoss.forward`."""
        table = self._table_for(logits)
        weights = _float_weights(loss_weights)
        options = dict(float_level=self.float_level, dot_token_id=self.dot,
                       max_number_length=self.max_number_length, ignore_index=ignore_index,
                       validate=self.validate)
        if not self.reweigh:
            return number_level_loss(logits, labels, table, reduction=reduction, weights=weights, **options)
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"reduction must be one of ('mean', 'sum', 'none'), got {reduction!r}")
        rows = number_level_loss(logits, labels, table, reduction="none", **options)
        _check_inputs(logits, labels, table, weights)
        if weights is not None and self.validate and not torch.compiler.is_compiling():
            _check_values(labels, logits.shape[-1], ignore_index, weights)
        labels2d = labels.reshape(-1, labels.shape[-1])
        number_index = reference.label_positions(labels2d.reshape(-1), table, ignore_index)[2]
        first_digit = number_runs((number_index >= 0).view(labels2d.shape), labels2d, self.float_level, self.dot,
                                  self.max_number_length)[0].view(labels.shape)
        mass, text_mass = _masses(logits, table, reference.accumulation_dtype(logits.dtype))
        reweighed = reference.reweigh_by_number_mass(rows, mass, text_mass, 1.01 * self.max_dist)
        rows = torch.where(first_digit, reweighed, torch.zeros_like(rows))
        weights1d = None if weights is None else weights.reshape(-1)
        return _reduce(rows.reshape(-1), first_digit.reshape(-1), weights1d, reduction, None, labels.shape)
