"""The public loss functions: input checks, label shifting, reductions, then one backend call.

:func:`number_token_loss` (NTL alone), :func:`cross_entropy_with_ntl` (CE + λ·NTL) and
:func:`number_level_loss` (whole numbers); the math is docs/math.md. Everything here runs on the
device without host synchronisation, except the optional eager label-range and weight-sign check
(``validate=True``: one device-to-host read per call; skipped with ``validate=False`` and while
``torch.compile`` traces).
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Tuple, Union

import torch
from torch import Tensor

from .backends import Backend, explain_backend, get_backend
from .config import LossConfig, accumulation_dtype, check_reduction
from .fused import cross_entropy_with_ntl_and_gradient
from .labels import causal_shift, label_positions
from .number_level import number_level_rows  # vectorised; reference.number_level_rows is the oracle
from .table import NumberTokenTable

__all__ = ["NTLOutput", "number_token_loss", "cross_entropy_with_ntl", "number_level_loss"]

Normalizer = Union[None, int, float, Tensor]

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_LABEL_DTYPES = (torch.int64, torch.int32)


class NTLOutput(NamedTuple):
    """What the CE + NTL functions return.

    Attributes:
        loss (Tensor): ``ce + ntl_weight * ntl``, differentiable: call ``loss.backward()``.
        ce (Tensor): the cross-entropy term, detached (for logging).
        ntl (Tensor): the Number Token Loss term (before ``ntl_weight``), detached.
    """

    loss: Tensor
    ce: Tensor
    ntl: Tensor


# --------------------------------------------------------------------------------- checks
def _is_compiling() -> bool:
    return torch.compiler.is_compiling()


def _check_logits(logits: Tensor, table: NumberTokenTable) -> None:
    """The logits' and the table's types, dtype, shape and device (docs/math.md §4)."""
    if not isinstance(logits, Tensor):
        raise TypeError(f"logits must be a Tensor, got {type(logits).__name__}")
    if not isinstance(table, NumberTokenTable):
        raise TypeError(f"table must be a NumberTokenTable, got {type(table).__name__}")
    if logits.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"logits must be float32, bfloat16, float16 or float64, got {logits.dtype}")
    if logits.dim() < 1 or logits.numel() == 0:
        raise ValueError(f"logits must be a non-empty (..., V) tensor, got shape {tuple(logits.shape)}")
    if table.device != logits.device:
        raise ValueError(
            f"the table is on {table.device} but logits on {logits.device}: use table.to(logits.device)"
        )
    if logits.shape[-1] < table.vocab_size:
        raise ValueError(
            f"logits have {logits.shape[-1]} columns but the table covers {table.vocab_size} "
            f"token ids: the logits need a column for every token"
        )


def _check_inputs(
    logits: Tensor, labels: Tensor, table: NumberTokenTable, weights: Optional[Tensor]
) -> None:
    """Shape, dtype and device checks (docs/math.md §4); none of them reads device memory."""
    _check_logits(logits, table)
    if not isinstance(labels, Tensor):
        raise TypeError(f"labels must be a Tensor, got {type(labels).__name__}")
    if labels.dtype not in _LABEL_DTYPES:
        raise TypeError(f"labels must be int64 or int32, got {labels.dtype}")
    if logits.dim() < 1 or logits.numel() == 0:
        raise ValueError(f"logits must be a non-empty (..., V) tensor, got shape {tuple(logits.shape)}")
    if tuple(labels.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"labels must have the logits' shape without the vocabulary dimension: logits "
            f"{tuple(logits.shape)} need labels {tuple(logits.shape[:-1])}, got {tuple(labels.shape)}"
        )
    if labels.device != logits.device:
        raise ValueError(f"labels are on {labels.device} but logits on {logits.device}")
    if weights is not None:
        if not isinstance(weights, Tensor):
            raise TypeError(f"weights must be a Tensor or None, got {type(weights).__name__}")
        if weights.is_complex():
            raise TypeError(f"weights must be a real (float, integer or bool) tensor, got {weights.dtype}")
        if tuple(weights.shape) != tuple(labels.shape):
            raise ValueError(
                f"weights must have the labels' shape {tuple(labels.shape)}, got {tuple(weights.shape)}"
            )
        if weights.device != logits.device:
            raise ValueError(f"weights are on {weights.device} but logits on {logits.device}")


def _float_weights(weights: Optional[Tensor]) -> Optional[Tensor]:
    """Integer and bool weights (``torch.ones_like(labels)``) as float32; float weights unchanged."""
    if weights is None or weights.is_floating_point():
        return weights
    return weights.to(torch.float32)


def _ignore_zero_weight(labels: Tensor, weights: Optional[Tensor], ignore_index: int) -> Tensor:
    """Labels with every zero-weight position set to ``ignore_index``: such a position counts for
    nothing, so it gets exactly 0 loss and 0 gradient whatever its logits (even inf or NaN, and
    an out-of-range label under ``validate=False``). Its weight, 0, adds nothing to a mean."""
    if weights is None:
        return labels
    return torch.where(weights != 0, labels, torch.full_like(labels, ignore_index))


def _check_values(labels: Tensor, vocab_size: int, ignore_index: int, weights: Optional[Tensor]) -> None:
    """The eager value checks of docs/math.md §4 (one device-to-host read each)."""
    bad = ((labels < 0) | (labels >= vocab_size)) & (labels != ignore_index)
    if bool(bad.any()):
        position = torch.nonzero(bad)[0].tolist()
        value = int(labels[tuple(position)])
        raise ValueError(
            f"labels must be in [0, {vocab_size}) or equal ignore_index={ignore_index}: "
            f"found {value} at position {tuple(position)}"
        )
    if weights is not None and bool((~(weights >= 0)).any()):
        raise ValueError("weights must be >= 0 (and not NaN)")


def _shifted(logits: Tensor, labels: Tensor, table: NumberTokenTable, weights: Optional[Tensor], shift_labels: bool,
             validate: bool, ignore_index: int) -> Tuple[Tensor, Optional[Tensor]]:
    """Check, and for causal models shift the labels (never the logits): ``(labels, weights)``
    aligned with the logits' positions, float weights."""
    _check_inputs(logits, labels, table, weights)
    weights = _float_weights(weights)
    if shift_labels:
        if logits.dim() < 2 or logits.shape[-2] < 2:
            raise ValueError(
                f"shift_labels=True needs logits of shape (..., T, V) with T >= 2, got {tuple(logits.shape)}"
            )
        labels, weights = causal_shift(labels, ignore_index, weights)
    if validate and not _is_compiling():
        _check_values(labels, logits.shape[-1], ignore_index, weights)
    return labels, weights


class _Rows(NamedTuple):
    """One call's inputs as a backend takes them."""

    logits: Tensor  # (M, V): a view of the caller's logits whenever their last dimension is dense
    labels: Tensor  # (M,), shifted; zero-weight positions set to ignore_index
    weights: Optional[Tensor]  # (M,) float
    table: NumberTokenTable  # resized to V
    backend: Backend
    shape: torch.Size  # the labels' shape: what reduction "none" returns (before dropping a shifted end)


def _rows(logits: Tensor, labels: Tensor, table: NumberTokenTable, weights: Optional[Tensor], shift_labels: bool,
          validate: bool, ignore_index: int, backend: str) -> _Rows:
    """Check, shift, flatten to rows and pick the backend."""
    labels, weights = _shifted(logits, labels, table, weights, shift_labels, validate, ignore_index)
    vocab_size = logits.shape[-1]
    logits2d = logits.reshape(-1, vocab_size)
    if logits2d.stride(-1) != 1:
        logits2d = logits2d.contiguous()
    labels1d = labels.reshape(-1)
    weights1d = None if weights is None else weights.reshape(-1)
    choice = explain_backend(logits2d.device, backend)
    return _Rows(logits2d, _ignore_zero_weight(labels1d, weights1d, ignore_index), weights1d,
                 table.resized(vocab_size), get_backend(choice.name), labels.shape)


# --------------------------------------------------------------------------------- reductions
def _safe_divide(total: Tensor, count: Tensor) -> Tensor:
    """``total / count``, and 0 (with a zero gradient) for a mean over an empty set."""
    return total / torch.where(count != 0, count, torch.ones_like(count))


def _mean_count(counted: Tensor, weights: Optional[Tensor], normalizer: Normalizer, dtype: torch.dtype) -> Tensor:
    """The denominator of a mean (docs/math.md §3): the weights of the counted positions summed (their
    number without weights), or ``normalizer`` when given."""
    if normalizer is None:
        if weights is None:
            return counted.sum().to(dtype)
        weights = weights.to(dtype)
        return torch.where(counted, weights, torch.zeros_like(weights)).sum()
    count = torch.as_tensor(normalizer, dtype=dtype, device=counted.device)
    if count.dim() != 0:
        raise ValueError(f"a normalizer must be a number or a 0-d tensor, got shape {tuple(count.shape)}")
    return count


def _reduce(
    rows: Tensor,
    counted: Tensor,
    weights: Optional[Tensor],
    reduction: str,
    normalizer: Normalizer,
    shape: torch.Size,
) -> Tensor:
    """Apply weights and a reduction to per-position losses (docs/math.md §3).

    ``counted`` marks the positions the mean is over; ``rows`` is 0 elsewhere.
    """
    # a zero weight gives exactly 0 (and a zero gradient), also where the row's loss is NaN
    weighted = rows if weights is None else torch.where(weights != 0, rows * weights.to(rows.dtype), 0.0)
    if reduction == "none":
        return weighted.view(shape)
    total = weighted.sum()
    if reduction == "sum":
        return total
    return _safe_divide(total, _mean_count(counted, weights, normalizer, rows.dtype))


def _scored(values: Tensor, reduction: str, shift_labels: bool) -> Tensor:
    """Reduction "none" after the causal shift: a view without the last position, which predicts
    nothing (its label is the padding)."""
    return values[..., :-1] if shift_labels and reduction == "none" else values


def _row_scale(
    counted: Tensor, weights: Optional[Tensor], reduction: str, normalizer: Normalizer, dtype: torch.dtype
) -> Tensor:
    """``d _reduce(rows, ...) / d rows`` for reduction "mean" or "sum": the weights (ones without
    them), divided by the mean's count."""
    scale = torch.ones(counted.shape, dtype=dtype, device=counted.device) if weights is None else weights.to(dtype)
    if reduction == "sum":
        return scale
    return _safe_divide(scale, _mean_count(counted, weights, normalizer, dtype))


def _one_pass(rows: _Rows, reduction: str, *others) -> bool:
    """Whether the loss and its gradient come from one pass (:mod:`ntl_fast.fused`): the backend
    serves these logits so, the reduction fixes every row's upstream gradient up to one scalar, a
    backward will follow, and no other input needs a gradient."""
    return (
        reduction != "none"
        and torch.is_grad_enabled()
        and rows.logits.requires_grad
        and not any(isinstance(other, Tensor) and other.requires_grad for other in others)
        and rows.backend.fuses_loss_and_grad(rows.logits)
    )


# --------------------------------------------------------------------------------- public API
def number_token_loss(
    logits: Tensor,
    labels: Tensor,
    table: NumberTokenTable,
    *,
    loss: str = "was",
    squash_factor: Optional[float] = None,
    reweigh: bool = False,
    reduction: str = "mean",
    weights: Optional[Tensor] = None,
    ignore_index: int = -100,
    normalizer: Normalizer = None,
    shift_labels: bool = False,
    validate: bool = True,
    backend: str = "auto",
) -> Tensor:
    """The Number Token Loss of ``logits (..., V)`` against ``labels (...)`` (docs/math.md §2).

    Positions whose label is a number token are scored: ``loss="was"`` is the Wasserstein-1
    distance ``Σ_j q_j |y - v_j|`` (optionally squashed), ``"mse"``/``"mae"``/``"huber"`` score
    the expected value ``ŷ = Σ_j q_j v_j``, ``"was_cdf"`` is W1 in CDF form; ``q`` is the softmax
    over the number tokens. ``reduction="mean"`` averages over the number positions only
    (weighted by ``weights``, or divided by ``normalizer`` when given, e.g. a global count under
    data parallelism); a mean over no position is 0 with a zero gradient. Returns float32
    (float64 for float64 logits). Integer and bool ``weights`` are read as float32; a position
    of weight 0 (or labelled ``ignore_index``, which may be a token id) counts for nothing:
    exactly 0 loss and 0 gradient, whatever its logits (inf, NaN) or label.

    Args:
        logits (Tensor): ``(..., V)`` float32, bfloat16, float16 or float64, any layout. V may
            exceed ``table.vocab_size`` (a padded LM head: the extra ids are text tokens).
        labels (Tensor): ``(...)`` int64 or int32 token ids in ``[0, V)``, or ``ignore_index``.
        table (NumberTokenTable): the number tokens and their values, on the logits' device
            (``table.to(logits.device)``).
        loss (str): ``"was"`` (default, NTL-WAS, §2.2), ``"mse"``, ``"mae"``, ``"huber"`` (δ = 1)
            (§2.1), or ``"was_cdf"`` (§2.3).
        squash_factor (float, optional): ``s > 1``, ``loss="was"`` only: map the non-zero
            distances linearly onto ``[1, s]`` (for multi-digit vocabularies). Default None.
        reweigh (bool): ``m L + c (1 - m)`` with ``m`` the probability mass on number tokens
            (§2.4): ``ntloss``'s default, not the paper's. Default False.
        reduction (str): ``"mean"`` (default; over the number positions, §3), ``"sum"``, or
            ``"none"`` (a tensor of the labels' shape, 0 off the number positions).
        weights (Tensor, optional): ``(...)`` per-position weights >= 0 (floating-point, integer or
            bool, read as float32); the mean becomes ``Σ w L / Σ w`` over the number positions.
        ignore_index (int): the label of positions that count for nothing. Default -100.
        normalizer (int, float or 0-d Tensor, optional): replaces the mean's denominator (e.g.
            the global number-position count from :func:`ntl_fast.global_counts`).
        shift_labels (bool): score position t against label t + 1 (causal LMs; the output then
            has one position less). The labels are shifted (the last position gets
            ``ignore_index``), never the logits: no copy of them is made. Default False.
        validate (bool): check label values (and weight signs) eagerly: one device-to-host read
            per call, which on a GPU waits for the queued work. Pass False in production, or run
            under ``torch.compile`` (skipped while tracing); a bad label then yields NaN, never an
            out-of-bounds access. Default True.
        backend (str): ``"auto"`` (default; see :func:`ntl_fast.explain_backend`), ``"triton"``,
            ``"cpp"`` or ``"reference"``.

    Returns:
        Tensor: a 0-d tensor for ``"mean"``/``"sum"``, the labels' shape for ``"none"``; float32
        (float64 for float64 logits); differentiable with respect to ``logits``.

    Raises:
        TypeError: wrong argument types or dtypes (logits, labels, table, weights, reweigh).
        ValueError: shape, device or vocabulary-size mismatches, an empty tensor, an unknown
            ``loss``/``reduction``, ``squash_factor <= 1`` or with a loss other than ``"was"``,
            a non-0-d ``normalizer``; with ``validate=True``, labels outside ``[0, V)`` that are
            not ``ignore_index``, and negative or NaN weights.
        RuntimeError: an explicit ``backend`` that cannot serve the logits' device.
    """
    config = LossConfig(loss, squash_factor, reweigh, None, ignore_index)
    check_reduction(reduction)
    rows = _rows(logits, labels, table, weights, shift_labels, validate, ignore_index, backend)
    losses = rows.backend.ntl_rows(rows.logits, rows.labels, rows.table, config)
    counted = label_positions(rows.labels, rows.table, ignore_index)[2] >= 0
    return _scored(_reduce(losses, counted, rows.weights, reduction, normalizer, rows.shape), reduction, shift_labels)


def cross_entropy_with_ntl(
    logits: Tensor,
    labels: Tensor,
    table: NumberTokenTable,
    *,
    ntl_weight: float = 0.3,
    loss: str = "was",
    gaussian_sigma: Optional[float] = None,
    ce_normalizer: Normalizer = None,
    ntl_normalizer: Normalizer = None,
    squash_factor: Optional[float] = None,
    reweigh: bool = False,
    reduction: str = "mean",
    weights: Optional[Tensor] = None,
    ignore_index: int = -100,
    shift_labels: bool = False,
    validate: bool = True,
    backend: str = "auto",
    inplace: bool = False,
) -> NTLOutput:
    """Cross-entropy plus ``ntl_weight`` times the Number Token Loss, from one pass over the logits.

    ``loss = ce + ntl_weight * ntl`` is differentiable; ``ce`` and ``ntl`` are returned detached.
    CE is averaged over the non-ignored positions (or divided by ``ce_normalizer``, e.g. Hugging
    Face's ``num_items_in_batch``), NTL over the number positions (or ``ntl_normalizer``): two
    different counts (docs/math.md §3). ``gaussian_sigma`` turns the CE targets of number
    positions into a Gaussian over the number tokens (Gaussian-CE, §2.5); with
    ``loss="was_cdf"`` NTL is then W1 against those same targets (the paper's GCE + NTL).
    Gaussian targets put mass on every number token, so a number position whose label is finite
    but some number token's logit is ``-inf`` (masked) has CE ``+inf``, as the math says.

    Where the backend offers it (``fuses_loss_and_grad``: the C++ backend on CPU tensors) and with
    reduction ``"mean"``/``"sum"``, the gradient is computed in the same pass as the loss (every
    row's share of the loss is known up to the one scalar ``grad_output``), so a forward that
    requires grad holds one logits-sized gradient until the backward, which then only scales it
    by ``grad_output`` on the device (nothing to do when it is 1).

    Args:
        logits, labels, table: as :func:`number_token_loss`.
        ntl_weight (float or 0-d Tensor): λ in ``CE + λ·NTL``; the paper uses 0.3 (default).
        loss (str): the NTL variant, as :func:`number_token_loss`. Default ``"was"``.
        gaussian_sigma (float, optional): σ > 0 of the Gaussian-CE targets; None (default) keeps
            one-hot CE targets.
        ce_normalizer, ntl_normalizer (int, float or 0-d Tensor, optional): replace the two means'
            denominators (global counts under gradient accumulation or data parallelism).
        squash_factor, reweigh, reduction, weights, ignore_index, shift_labels, validate, backend:
            as :func:`number_token_loss` (defaults None, False, ``"mean"``, None, -100, False,
            True, ``"auto"``); ``weights`` weigh CE and NTL alike.
        inplace (bool): write the gradient into the logits' own buffer, saving one logits-sized
            allocation: in the forward on the one-pass path, else in the backward of a kernel
            backend (the reference's two-pass path ignores it). Afterwards the logits hold the
            gradient, not the logits: anything reading them later (metrics, a second loss, logging)
            sees gradients, and another autograd user that saved them fails in its backward. The
            logits must not be a leaf that requires grad (pass the output of the layer that
            computes them). Ignored where the logits are not one dense block (e.g. expanded: rows
            sharing memory cannot each hold their own gradient) and while ``torch.compile``
            traces the one-pass path. Default False.

    Returns:
        NTLOutput: ``(loss, ce, ntl)``, 0-d tensors (the labels' shape for ``"none"``), float32
        (float64 for float64 logits); only ``loss`` carries a gradient.

    Raises:
        TypeError: as :func:`number_token_loss`, and a non-numeric ``ntl_weight``.
        ValueError: as :func:`number_token_loss`, ``gaussian_sigma <= 0``, and ``inplace=True``
            with logits that are a leaf requiring grad.
        RuntimeError: an explicit ``backend`` that cannot serve the logits' device.
    """
    if isinstance(ntl_weight, bool) or not isinstance(ntl_weight, (int, float, Tensor)):
        raise TypeError(f"ntl_weight must be a number, got {ntl_weight!r}")
    config = LossConfig(loss, squash_factor, reweigh, gaussian_sigma, ignore_index)
    check_reduction(reduction)
    if inplace and isinstance(logits, Tensor) and logits.is_leaf and logits.requires_grad:
        raise ValueError(
            "inplace=True overwrites logits with their gradient, but logits is a leaf tensor that requires "
            "grad (its .grad would be its own buffer): pass inplace=False, or the output of the layer that "
            "computes the logits"
        )
    rows = _rows(logits, labels, table, weights, shift_labels, validate, ignore_index, backend)
    # rows that share memory (expanded logits) cannot each receive their own gradient in place
    inplace = inplace and rows.logits.is_contiguous()
    in_range, _, number_index = label_positions(rows.labels, rows.table, ignore_index)
    is_number = number_index >= 0
    total = None
    if _one_pass(rows, reduction, rows.weights, ntl_weight, ce_normalizer, ntl_normalizer):
        acc = accumulation_dtype(rows.logits.dtype)
        ce_scale = _row_scale(in_range, rows.weights, reduction, ce_normalizer, acc)
        ntl_scale = ntl_weight * _row_scale(is_number, rows.weights, reduction, ntl_normalizer, acc)
        total, ce_rows, ntl_rows = cross_entropy_with_ntl_and_gradient(
            rows.logits, rows.labels, rows.table, config, ce_scale, ntl_scale, rows.backend, inplace
        )
    else:
        ce_rows, ntl_rows = rows.backend.ce_ntl_rows(rows.logits, rows.labels, rows.table, config, inplace=inplace)
    ce = _reduce(ce_rows, in_range, rows.weights, reduction, ce_normalizer, rows.shape)
    ntl = _reduce(ntl_rows, is_number, rows.weights, reduction, ntl_normalizer, rows.shape)
    if total is None:
        total = ce + ntl_weight * ntl
    return NTLOutput(*(_scored(value, reduction, shift_labels) for value in (total, ce.detach(), ntl.detach())))


def number_level_loss(
    logits: Tensor,
    labels: Tensor,
    table: NumberTokenTable,
    *,
    float_level: bool = False,
    dot_token_id: Optional[int] = None,
    max_number_length: int = 20,
    reduction: str = "mean",
    weights: Optional[Tensor] = None,
    ignore_index: int = -100,
    normalizer: Normalizer = None,
    shift_labels: bool = False,
    validate: bool = True,
) -> Tensor:
    """Number-level NTL (docs/math.md §2.7): symmetric relative error of whole numbers.

    Along the last axis of ``labels (..., T)``, each maximal run of digit labels is one number
    ``Y = Σ y_r 10^(R-r)``, predicted as ``Ŷ = Σ ŷ_r 10^(R-r)``; its loss
    ``|Ŷ - Y| / (|Ŷ| + |Y| + ε)`` sits at its first digit, where ``weights`` are read; the mean is
    over numbers. ``float_level=True`` lets a single ``.`` between digits join a number (its id
    from ``dot_token_id`` or the table). Digit tables only. No reweighing (``ntloss``'s default
    reweighing of this loss is :class:`ntl_fast.compat.NumberLevelLoss`).

    Args:
        logits (Tensor): ``(..., T, V)`` float logits (a sequence axis is needed).
        labels (Tensor): ``(..., T)`` token ids or ``ignore_index``.
        table (NumberTokenTable): a digit table (values 0-9), on the logits' device.
        float_level (bool): read ``12.5`` as one number. Default False.
        dot_token_id (int, optional): the ``.`` token's id; default ``table.dot_id``.
        max_number_length (int): exponents are clamped to ``max_number_length - 1``. Default 20.
        reduction, weights, ignore_index, normalizer, shift_labels, validate: as
            :func:`number_token_loss` (the mean is over numbers, weights read at first digits).

    Returns:
        Tensor: 0-d for ``"mean"``/``"sum"``; ``(..., T)`` for ``"none"`` (each number's loss at
        its first digit, 0 elsewhere); float32 (float64 for float64 logits).

    Raises:
        TypeError: as :func:`number_token_loss`.
        ValueError: as :func:`number_token_loss`; labels without a sequence axis; a table with
            values other than digits (with ``validate=True``); ``max_number_length < 1``;
            ``float_level=True`` without a ``.`` token id.
    """
    check_reduction(reduction)
    if isinstance(max_number_length, bool) or not isinstance(max_number_length, int) or max_number_length < 1:
        raise ValueError(f"max_number_length must be an int >= 1, got {max_number_length!r}")
    if isinstance(labels, Tensor) and labels.dim() < 1:
        raise ValueError("labels of the number-level loss need a sequence axis (..., T)")
    labels, weights = _shifted(logits, labels, table, weights, shift_labels, validate, ignore_index)
    non_digit = (table.number_values != table.number_values.round()) | (table.number_values < 0) | (
        table.number_values > 9
    )
    if validate and not _is_compiling() and bool(non_digit.any()):
        raise ValueError("number_level_loss needs a digit-level table (number tokens with values 0-9)")
    dot_id = dot_token_id if dot_token_id is not None else table.dot_id
    if float_level and dot_id is None:
        raise ValueError("float_level=True needs the '.' token id: pass dot_token_id or build the table with one")
    length, vocab_size = labels.shape[-1], logits.shape[-1]
    rows, first_digit = number_level_rows(
        logits.reshape(-1, length, vocab_size),
        labels.reshape(-1, length),
        table.resized(vocab_size),
        float_level=float_level,
        dot_id=dot_id,
        max_number_length=max_number_length,
        ignore_index=ignore_index,
    )
    weights1d = None if weights is None else weights.reshape(-1)
    losses = _reduce(rows.reshape(-1), first_digit.reshape(-1), weights1d, reduction, normalizer, labels.shape)
    return _scored(losses, reduction, shift_labels)
