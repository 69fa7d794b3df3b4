"""Number-token tables (docs/math.md §1): which vocabulary ids are numbers, and their values.

A table is built once on the host from a tokenizer (or from explicit values) and is immutable
afterwards. Every backend reads the same tensors from it; the scalar constants a kernel needs
(value range, squash bounds, reweigh constants) are computed here once, as Python floats, so no
loss call ever has to synchronise with the device to get them.
"""

from __future__ import annotations

import math
import re
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

__all__ = ["NumberTokenTable"]

# One leading marker that tokenizers put on word-initial pieces: SentencePiece, byte-level BPE, plain.
_MARKERS = ("\u2581", "\u0120", " ")
# ASCII-only decimal literal (docs/math.md §1); deliberately stricter than Python's float().
_NUMBER_RE = re.compile(r"^[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)$")
_DIGITS = "0123456789"


def _strip_marker(token: str) -> Optional[str]:
    """The token without its one leading marker, or None when it has none."""
    for marker in _MARKERS:
        if token.startswith(marker) and len(token) > len(marker):
            return token[len(marker):]
    return None


def _digit_value(token: str, include_marked: bool) -> Optional[float]:
    if len(token) == 1 and token in _DIGITS:
        return float(token)
    if include_marked:
        bare = _strip_marker(token)
        if bare is not None and len(bare) == 1 and bare in _DIGITS:
            return float(bare)
    return None


def _number_value(token: str, include_marked: bool) -> Optional[float]:
    text = token
    if include_marked:
        bare = _strip_marker(token)
        if bare is not None:
            text = bare
    if not _NUMBER_RE.match(text):
        return None
    value = float(text)
    return value if math.isfinite(value) else None


def _tokenizer_vocab(tokenizer: Any) -> Tuple[Dict[str, int], int]:
    """(token -> id, number of ids) for a Hugging Face or a raw `tokenizers` tokenizer."""
    if not hasattr(tokenizer, "get_vocab"):
        raise TypeError(
            f"tokenizer must provide get_vocab() (a Hugging Face or `tokenizers` tokenizer), "
            f"got {type(tokenizer).__name__}"
        )
    vocab = dict(tokenizer.get_vocab())
    if hasattr(tokenizer, "get_vocab_size"):  # tokenizers.Tokenizer
        size = int(tokenizer.get_vocab_size(with_added_tokens=True))
    else:
        size = len(tokenizer)
    if vocab:
        size = max(size, max(vocab.values()) + 1)
    return vocab, size


class NumberTokenTable:
    """The number tokens of a vocabulary and their values (docs/math.md §1).

    Build it with :meth:`from_tokenizer` or :meth:`from_values`; the constructor takes the dense
    value vector ``values`` (``(V,)``, NaN for non-number tokens; anything ``torch.as_tensor``
    accepts) and an optional ``dot_id`` (the ``.`` token, for the float-level number-level loss).
    It raises ``ValueError`` for an empty vocabulary, infinite values, a vocabulary with no number
    token or only number tokens, and a ``dot_id`` outside ``[0, V)``.

    Attributes (all on :attr:`device`):
        values: ``(V,)`` float32, the value of each token id, NaN off the number tokens.
        is_number: ``(V,)`` bool mask of the number tokens.
        number_ids: ``(K,)`` int64, the number-token ids in increasing order (the set N).
        number_values: ``(K,)`` float32, their values.
        number_index: ``(V,)`` int64, the position of each id in ``number_ids``, -1 off N.
        value_order: ``(K,)`` int64, positions in ``number_ids`` sorted by value (stable).
        value_rank: ``(K,)`` int64, the inverse permutation of ``value_order``.
        sorted_gaps: ``(K-1,)`` float32, ``v_(k+1) - v_(k)`` of the values sorted ascending.

    Host-side constants (Python floats, no device sync to read): ``vocab_size``,
    ``num_numbers`` (K), ``min_value``, ``max_value``, ``min_distance`` and ``max_distance``
    (the smallest and largest non-zero ``|v_i - v_j|`` over N x N), and ``dot_id``.
    """

    def __init__(self, values: Tensor, *, dot_id: Optional[int] = None) -> None:
        values = torch.as_tensor(values).detach().to(device="cpu", dtype=torch.float32).flatten()
        vocab_size = values.numel()
        if vocab_size == 0:
            raise ValueError("values: the vocabulary is empty")
        if torch.isinf(values).any():
            raise ValueError("values: number-token values must be finite (NaN marks non-numbers)")
        is_number = ~torch.isnan(values)
        num_numbers = int(is_number.sum())
        if num_numbers == 0:
            raise ValueError("the vocabulary has no number tokens: NTL has nothing to score")
        if num_numbers == vocab_size:
            raise ValueError(
                "every token of the vocabulary is a number token: at least one must not be "
                "(text positions and ignore_index need one)"
            )
        if dot_id is not None and not 0 <= dot_id < vocab_size:
            raise ValueError(f"dot_id={dot_id} is outside the vocabulary [0, {vocab_size})")
        number_ids = torch.nonzero(is_number).flatten()
        number_values = values[number_ids]
        number_index = torch.full((vocab_size,), -1, dtype=torch.int64)
        number_index[number_ids] = torch.arange(num_numbers)
        value_order = torch.sort(number_values, stable=True).indices
        value_rank = torch.empty_like(value_order)
        value_rank[value_order] = torch.arange(num_numbers)
        sorted_values = number_values[value_order]

        self.values = values
        self.is_number = is_number
        self.number_ids = number_ids
        self.number_values = number_values
        self.number_index = number_index
        self.value_order = value_order
        self.value_rank = value_rank
        self.sorted_gaps = sorted_values[1:] - sorted_values[:-1]
        self.vocab_size = vocab_size
        self.num_numbers = num_numbers
        self.dot_id = dot_id
        self.min_value = float(sorted_values[0])
        self.max_value = float(sorted_values[-1])
        distances = (number_values[:, None] - number_values[None, :]).abs()
        nonzero = distances[distances > 0]
        # With a single distinct value every distance is 0; squash then maps nothing.
        self.min_distance = float(nonzero.min()) if nonzero.numel() else 0.0
        self.max_distance = float(distances.max())
        self._distance_cache: Dict[Optional[float], Tensor] = {}
        self._resized_cache: Dict[int, "NumberTokenTable"] = {}
        self._device_cache: Dict[torch.device, "NumberTokenTable"] = {torch.device("cpu"): self}
        self._check_contents()

    KERNEL_TENSORS = ("number_ids", "number_values", "number_index", "value_order", "value_rank",
                      "sorted_gaps", "is_number")

    def kernel_tensors(self) -> Tuple[Tensor, ...]:
        """The tensors every kernel backend receives, in the order of :attr:`KERNEL_TENSORS` (one
        list for all backends; each reads the ones its algorithm needs)."""
        return tuple(getattr(self, name) for name in self.KERNEL_TENSORS)

    def _check_contents(self) -> None:
        """What every kernel indexes with, checked once, here (docs/math.md §1, §4): ids unique, sorted
        and in ``[0, V)``, ``number_index`` their inverse, ``value_order`` a permutation sorting
        the values and ``value_rank`` its inverse, values and their distances finite in float32."""
        k, vocab_size = self.num_numbers, self.vocab_size
        ids = self.number_ids
        positions = torch.arange(k)
        if ids.dtype != torch.int64 or ids.shape != (k,) or k == 0:
            raise ValueError(f"number_ids must be a non-empty int64 (K,) tensor, got {ids.dtype} {tuple(ids.shape)}")
        if bool((ids < 0).any()) or bool((ids >= vocab_size).any()):
            raise ValueError(f"number_ids must lie in [0, {vocab_size})")
        if k > 1 and not bool((ids[1:] > ids[:-1]).all()):
            raise ValueError("number_ids must be unique and increasing")
        if not torch.equal(self.number_index[ids], positions) or int((self.number_index >= 0).sum()) != k:
            raise ValueError("number_index must map each number id to its position in number_ids, -1 elsewhere")
        if not bool(torch.isfinite(self.number_values).all()):
            raise ValueError("values: number-token values must be finite")
        if not torch.equal(torch.sort(self.value_order).values, positions):
            raise ValueError("value_order must be a permutation of range(K)")
        if not torch.equal(self.value_rank[self.value_order], positions):
            raise ValueError("value_rank must be the inverse permutation of value_order")
        if not bool((self.sorted_gaps >= 0).all()):
            raise ValueError("value_order must sort the number values ascending")
        if not math.isfinite(self.max_distance):
            raise ValueError(
                f"values: the spread of the number values [{self.min_value:g}, {self.max_value:g}] "
                f"overflows float32; NTL's distances must be finite"
            )

    # ----------------------------------------------------------------------------- builders
    @classmethod
    def from_tokenizer(
        cls,
        tokenizer: Any,
        vocab_size: Optional[int] = None,
        digit_level: bool = True,
        include_marked: bool = False,
    ) -> "NumberTokenTable":
        """Build the table of a Hugging Face (or raw ``tokenizers``) tokenizer.

        Args:
            tokenizer: anything with ``get_vocab()``; it is only read, never changed.
            vocab_size: the logits' last dimension V, when the LM head is padded beyond the
                tokenizer (ids past the tokenizer are non-number tokens). Default: the tokenizer's
                size. A tokenizer larger than ``vocab_size`` is an error.
            digit_level: number tokens are the single ASCII digits 0-9 (the paper's setting).
                Otherwise any token spelling an ASCII decimal literal (``12``, ``1.5``, ``-3``).
            include_marked: also accept tokens with one leading ``▁``, ``Ġ`` or space
                (``▁5`` has value 5). Off by default, as in ``ntloss``.

        Returns:
            NumberTokenTable: on the CPU (move it with :meth:`to`); ``dot_id`` is the ``.``
            token's id when the vocabulary has one.

        Raises:
            TypeError: ``tokenizer`` has no ``get_vocab()``.
            ValueError: ``vocab_size`` smaller than the tokenizer; in digit mode, missing digit
                tokens (named in the message; the tokenizer is not changed); no number token, or
                only number tokens.
        """
        vocab, tokenizer_size = _tokenizer_vocab(tokenizer)
        if vocab_size is None:
            vocab_size = tokenizer_size
        elif vocab_size < tokenizer_size:
            raise ValueError(
                f"vocab_size={vocab_size} is smaller than the tokenizer ({tokenizer_size} ids): "
                f"the logits must have a column for every token"
            )
        values = torch.full((vocab_size,), float("nan"), dtype=torch.float32)
        parse = _digit_value if digit_level else _number_value
        for token, token_id in vocab.items():
            value = parse(token, include_marked)
            if value is not None:
                values[token_id] = value
        if digit_level:
            present = {int(v) for v in values[~torch.isnan(values)].tolist()}
            missing = [d for d in _DIGITS if int(d) not in present]
            if missing:
                raise ValueError(
                    f"the tokenizer lacks digit tokens {missing}: digit-level NTL needs each "
                    f"digit 0-9 as a token of its own (add them explicitly, e.g. "
                    f"tokenizer.add_tokens({missing}), and resize the model's embeddings)"
                )
        dot_id = vocab.get(".")
        return cls(values, dot_id=dot_id)

    @classmethod
    def from_values(
        cls,
        values: Union[Mapping[int, float], Sequence[float], Tensor],
        vocab_size: Optional[int] = None,
        dot_id: Optional[int] = None,
    ) -> "NumberTokenTable":
        """Build a table without a tokenizer.

        Args:
            values: either a mapping ``{token_id: value}`` of the number tokens, or a dense
                sequence/tensor of length V with NaN for non-number tokens.
            vocab_size: V. Required with a mapping; with a dense vector, pads it with
                non-number tokens up to V.
            dot_id: the id of the ``.`` token, for the float-level number-level loss.

        Returns:
            NumberTokenTable: on the CPU.

        Raises:
            ValueError: a mapping without ``vocab_size``, ids outside ``[0, vocab_size)``,
                non-finite values, ``vocab_size`` below the dense length, and the constructor's
                errors.
        """
        if isinstance(values, Mapping):
            if vocab_size is None:
                raise ValueError("vocab_size is required when values is a mapping {id: value}")
            dense = torch.full((vocab_size,), float("nan"), dtype=torch.float32)
            for token_id, value in values.items():
                if isinstance(token_id, bool) or int(token_id) != token_id:
                    raise ValueError(f"values: token ids must be integers, got {token_id!r}")
                if not 0 <= int(token_id) < vocab_size:
                    raise ValueError(f"values: token id {token_id} is outside [0, {vocab_size})")
                value = float(value)
                if not math.isfinite(value):
                    raise ValueError(f"values: token id {token_id} has non-finite value {value}")
                dense[int(token_id)] = value
        else:
            dense = torch.as_tensor(values, dtype=torch.float32).detach().cpu().flatten()
            if vocab_size is not None:
                if vocab_size < dense.numel():
                    raise ValueError(
                        f"vocab_size={vocab_size} is smaller than the {dense.numel()} values given"
                    )
                pad = torch.full((vocab_size - dense.numel(),), float("nan"))
                dense = torch.cat([dense, pad])
        return cls(dense, dot_id=dot_id)

    # ----------------------------------------------------------------------------- devices
    @property
    def device(self) -> torch.device:
        """The device of the table's tensors."""
        return self.values.device

    def to(self, device: Union[str, torch.device]) -> "NumberTokenTable":
        """This table on ``device`` (a str or ``torch.device``): a cached copy, so calling it at
        every step costs a dictionary lookup; the table itself is never changed."""
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        cached = self._device_cache.get(device)
        if cached is None:
            cached = object.__new__(type(self))
            cached.__dict__.update(self.__dict__)
            for name in ("values",) + self.KERNEL_TENSORS:
                setattr(cached, name, getattr(self, name).to(device))
            cached._distance_cache = {}
            cached._resized_cache = {}
            self._device_cache[device] = cached
        return cached

    def resized(self, vocab_size: int) -> "NumberTokenTable":
        """This table for logits with ``vocab_size >= V`` columns (extra ids are non-number tokens;
        cached). Raises ``ValueError`` when ``vocab_size < V``."""
        if vocab_size == self.vocab_size:
            return self
        if vocab_size < self.vocab_size:
            raise ValueError(f"cannot shrink a table of {self.vocab_size} ids to {vocab_size}")
        cached = self._resized_cache.get(vocab_size)
        if cached is None:
            values = torch.full((vocab_size,), float("nan"))
            values[: self.vocab_size] = self.values.cpu()
            cached = NumberTokenTable(values, dot_id=self.dot_id).to(self.device)
            self._resized_cache[vocab_size] = cached
        return cached

    # ----------------------------------------------------------------------------- distances
    def squash_map(self, squash_factor: float) -> Tuple[float, float]:
        """``(d_min, scale)`` of the squash map ``D' = 1 + (D - d_min) * scale`` (Python floats).

        Raises ``TypeError``/``ValueError`` unless ``squash_factor`` is a number > 1."""
        check_squash_factor(squash_factor)
        span = self.max_distance - self.min_distance
        return self.min_distance, ((squash_factor - 1.0) / span if span > 0 else 0.0)

    def squash(self, distance: Tensor, squash_factor: Optional[float]) -> Tensor:
        """Map non-zero distances linearly onto ``[1, squash_factor]`` (docs/math.md §2.2).

        ``D' = 1 + (D - d_min)(s - 1)/(d_max - d_min)`` for D > 0, 0 where D = 0; every non-zero
        distance maps to 1 when ``d_max == d_min``. ``None`` returns the distances unchanged.
        """
        if squash_factor is None:
            return distance
        d_min, scale = self.squash_map(squash_factor)
        squashed = 1.0 + (distance - d_min) * scale
        return torch.where(distance > 0, squashed, torch.zeros_like(distance))

    def distance_matrix(self, squash_factor: Optional[float] = None) -> Tensor:
        """The K x K table ``D(v_i, v_j) = |v_i - v_j|``, squashed if asked (cached, float32)."""
        cached = self._distance_cache.get(squash_factor)
        if cached is None:
            distance = (self.number_values[:, None] - self.number_values[None, :]).abs()
            cached = self.squash(distance, squash_factor)
            self._distance_cache[squash_factor] = cached
        return cached

    def reweigh_constant(self, loss: str, squash_factor: Optional[float] = None) -> float:
        """``c = 1.01 * max_dist`` of docs/math.md §2.4 for a loss variant (a Python float).

        ``loss`` is one of ``"was"`` (with the optional ``squash_factor``), ``"was_cdf"``,
        ``"mse"``, ``"mae"``, ``"huber"``; anything else raises ``ValueError``."""
        spread = self.max_value - self.min_value
        if loss == "was":
            # pure Python: this runs inside torch.compile'd code, where float(tensor) would sync
            max_dist = self.max_distance
            if squash_factor is not None and max_dist > 0:
                d_min, scale = self.squash_map(squash_factor)
                max_dist = 1.0 + (max_dist - d_min) * scale
        elif loss == "was_cdf":
            max_dist = spread
        elif loss == "mse":
            max_dist = spread * spread
        elif loss == "mae":
            max_dist = spread
        elif loss == "huber":
            max_dist = 0.5 * spread * spread if spread < 1.0 else spread - 0.5
        else:
            raise ValueError(f"reweigh is not defined for loss={loss!r}")
        return 1.01 * max_dist

    def __repr__(self) -> str:
        return (
            f"NumberTokenTable(vocab_size={self.vocab_size}, num_numbers={self.num_numbers}, "
            f"values=[{self.min_value:g}, {self.max_value:g}], device={self.device})"
        )


def check_squash_factor(squash_factor: float) -> None:
    if not isinstance(squash_factor, (int, float)) or isinstance(squash_factor, bool):
        raise TypeError(f"squash_factor must be a number > 1 or None, got {squash_factor!r}")
    if not squash_factor > 1:
        raise ValueError(f"squash_factor must be > 1 (1 would recover cross-entropy), got {squash_factor}")
