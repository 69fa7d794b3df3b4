"""The adversarial differential fuzzer's case generator, oracles and backends (docs/math.md §4, §6).

One generator serves every backend. A case is a :class:`Spec`: a few primitive fields (a seed,
sizes, dtypes, memory layouts, masks, bad input, options) from which :func:`build` rebuilds the
tensors deterministically, so a failure is reproduced by the ``Spec`` alone
(:func:`reproduction` prints a self-contained snippet).

Oracles:

- the float64 reference (``backend="reference"`` on the float64 copy of the same rounded input):
  wherever it is finite the backend must match it within the tolerances of docs/math.md §6. For
  reweighed gradients from non-float64 logits §6 conditions the scale on the gradient's two terms,
  ``max(max|b|, max|∇(mL)|, max|c ∇m|)``: ∇(mL) is the float64 reference's gradient of the same
  call with the reweigh constant c set to 0 (``helpers.without_reweigh_constant``, a test-only
  patch of the table) and ``c ∇m = ∇(mL) - ∇L'`` (:func:`reweighed_gradient_scales`; the
  invariances and the CUDA emulation use the same scale); losses and float64 keep ``max|b|``;
  where a row holds ``+inf``/NaN logits or an out-of-range label (``validate=False``) and the
  reference is non-finite, the backend must be non-finite too; rows that do not count (ignored,
  zero weight) must give exactly 0 loss and exactly 0 gradient whatever their logits;
- invariances that need no reference, on the backend itself: two identical calls are bitwise
  identical; the contiguous copies of every input give bitwise the same numbers; adding a
  constant to each row (logits on a 2^-10 grid, |z + c| < 2^14, float32/float64) changes nothing
  beyond the tolerances; permuting the vocabulary together with the table permutes the gradient;
  splitting the batch in two and summing with global normalisers gives the full mean. Like the
  reference check, they leave the gradient of a row holding ``+inf``/NaN logits open (docs/math.md
  §4) and compare every other row's.

Options and their invalid combinations (the generator never draws these; each raises a
``ValueError``/``TypeError`` at the API, tested elsewhere):

- ``squash_factor`` needs ``loss="was"``;
- ``gaussian_sigma`` exists only for CE + NTL (``cross_entropy_with_ntl``, its module, the LM-head
  function and the Trainer), not for ``number_token_loss``;
- ``inplace`` exists only for ``cross_entropy_with_ntl``;
- ``number_level_loss`` takes no ``loss``/``reweigh``/``squash``/``gaussian_sigma`` and needs a
  digit table; the Trainer always shifts (a causal model) and always means;
- normalisers have no effect with ``reduction="none"`` (valid, drawn anyway);
- ``shift_labels`` needs a sequence axis with T >= 2 (the generator always has one).

Backends are listed in :data:`BACKENDS`; a new one is one entry: the ``backend=`` name the public
API takes and a context manager to run it under ("triton-gpu-tiles" is Triton with a GPU launch's
block settings), or a runner of its own ("cuda-emulation": the CUDA kernels' device code on the
CPU, tests/cuda_emulation, checked against the C++ operators on each case's rows).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import math
import random
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch

import ntl_fast
from ntl_fast import NumberTokenTable, backends, reference
from ntl_fast.functional import _reduce

from helpers import reweighed_scale, tolerances, without_reweigh_constant

# ----------------------------------------------------------------------------- backends


@dataclass(frozen=True)
class Backend:
    """How the fuzzer runs one backend: the public API's ``backend=`` name and a context, or a
    ``runner(case)`` of its own for kernels that no public ``backend=`` reaches."""

    api_name: str
    context: Callable[[], contextlib.AbstractContextManager]
    available: Callable[[], Optional[str]]  # None, or why it cannot run here
    runner: Optional[Callable[["Case"], None]] = None
    functions: Tuple[str, ...] = ()  # the functions it serves; () for all


def _triton_settings(profile: str):
    def context():
        from ntl_fast.triton import _common
        return _common.use_launch_settings(profile)
    return context


def _reason(name: str) -> Callable[[], Optional[str]]:
    def reason():
        try:
            backends.explain_backend("cpu", name)
        except RuntimeError as error:
            return str(error)
        return None
    return reason


BACKENDS: Dict[str, Backend] = {
    "reference": Backend("reference", contextlib.nullcontext, _reason("reference")),
    "cpp": Backend("cpp", contextlib.nullcontext, _reason("cpp")),
    # Triton's interpreter with its own tiling (many rows and 128-wide vocabulary blocks per program)
    "triton": Backend("triton", _triton_settings("interpret"), _reason("triton")),
    # the same kernels with the settings a GPU launch uses (one row and CUDA_BLOCK_V-wide blocks per program)
    "triton-gpu-tiles": Backend("triton", _triton_settings("cuda"), _reason("triton")),
    # the CUDA kernels' device code run on the CPU (tests/cuda_emulation), against the C++ operators
    "cuda-emulation": Backend("cpp", contextlib.nullcontext, lambda: _cuda_emulation_reason(),
                              runner=lambda case: check_cuda_emulation(case), functions=("ce", "ntl")),
}

# ----------------------------------------------------------------------------- the case

FUNCTIONS = ("ce", "ntl", "module_ce", "module_ntl", "linear", "trainer", "number_level")
LOSSES = ntl_fast.LOSSES  # every variant LossKind defines
REDUCTIONS = ("mean", "sum", "none")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float64": torch.float64}
MASKS = ("none", "leading", "text", "all_but_label", "numbers_under_text", "big_negative", "finfo_max",
         "confident_wrong")
POISONS = ("none", "inf", "nan", "bad_label")
LAYOUTS = ("contiguous", "transposed", "sliced", "expanded")
WEIGHTS = ("none", "float", "int", "bool", "zero_some")
NORMALIZERS = ("none", "number", "tensor")
INVARIANCES = ("none", "repeat", "layout", "shift", "permute", "split")


@dataclass(frozen=True)
class Spec:
    """Everything a case is made of; :func:`build` turns it into tensors and a call."""

    seed: int = 0
    function: str = "ce"
    table: str = "digits"          # "digits", "irregular" (K small, duplicates), "multi" (K up to ~1,110)
    num_numbers: int = 10
    vocab_size: int = 40
    batch: int = 2
    length: int = 3
    dtype: str = "float32"
    scale: float = 3.0
    label_dtype: str = "int64"
    logits_layout: str = "contiguous"
    labels_layout: str = "contiguous"
    weights_layout: str = "contiguous"
    mask: str = "none"
    poison: str = "none"
    poison_weight_zero: bool = False  # poisoned rows get weight 0 (and then must count for nothing)
    ignore_inside: bool = False       # ignore_index is a token id inside [0, V)
    loss: str = "was"
    reweigh: bool = False
    squash: Optional[float] = None
    sigma: Optional[float] = None
    reduction: str = "mean"
    normalizer: str = "none"
    weights: str = "none"
    shift_labels: bool = False
    inplace: bool = False
    float_level: bool = False
    minus_inf_bias: bool = False
    invariance: str = "none"


def invalid_reason(spec: Spec) -> Optional[str]:
    """Why an option combination is not a valid call (see the module docstring), else None."""
    ce_like = spec.function in ("ce", "module_ce", "linear", "trainer")
    if spec.squash is not None and spec.loss != "was":
        return "squash_factor needs loss='was'"
    if spec.sigma is not None and not ce_like:
        return "gaussian_sigma is a CE + NTL option"
    if spec.inplace and spec.function != "ce":
        return "inplace is a cross_entropy_with_ntl option"
    if spec.function == "number_level" and (spec.reweigh or spec.squash is not None or spec.loss != "was"
                                            or spec.table != "digits"):
        return "number_level_loss takes no NTL variant and needs a digit table"
    if spec.float_level and spec.function != "number_level":
        return "float_level is a number_level_loss option"
    if spec.function == "trainer" and (not spec.shift_labels or spec.reduction != "mean" or spec.weights != "none"
                                       or spec.normalizer != "none"):
        return "the Trainer shifts, means, and takes no weights or normalisers"
    if spec.minus_inf_bias and spec.function != "linear":
        return "a bias exists only for the LM-head function"
    if spec.function == "trainer" and (spec.poison == "bad_label" or spec.ignore_inside):
        return "the Trainer validates its labels and ignores -100"
    return None


@dataclass
class Case:
    spec: Spec
    table: NumberTokenTable
    logits: torch.Tensor            # the input as the call sees it (dtype, layout); for "linear": hidden
    labels: torch.Tensor
    weights: Optional[torch.Tensor]
    kwargs: dict
    linear: Optional[Tuple[torch.Tensor, Optional[torch.Tensor]]] = None  # (weight, bias) of the LM head
    poisoned: Optional[torch.Tensor] = None  # (batch, out_length) bool: rows expected non-finite
    # per gradient, the scale of docs/math.md §6 where it is conditioned (reweighed, non-float64
    # logits): set by check_against_oracle, used by the invariances too; None: max|b|
    gradient_scales: Optional[Tuple[float, ...]] = None


def _table(spec: Spec, generator: torch.Generator) -> NumberTokenTable:
    vocab_size, k = spec.vocab_size, spec.num_numbers
    ids = torch.randperm(vocab_size, generator=generator)[:k]
    if spec.table == "digits":
        values = torch.arange(10, dtype=torch.float32)
    elif spec.table == "multi":
        # a multi-digit vocabulary (LLaMA-3: 0-999) plus some decimals, signs and duplicates
        base = torch.arange(k, dtype=torch.float32) % 1000
        extra = torch.randint(-50, 50, (k,), generator=generator).float() / 4
        values = torch.where(torch.arange(k) >= 1000, extra, base)
    else:
        values = torch.randint(-20, 40, (k,), generator=generator).float() / 2  # duplicates likely
        values[0] = values[-1]
    if values.unique().numel() < 2:
        values[0] = values[0] + 1
    mapping = {int(i): float(v) for i, v in zip(ids[:k], values[:k])}
    dot_id = None
    if spec.float_level:
        text = [i for i in range(vocab_size) if i not in mapping]
        dot_id = text[0]
    return NumberTokenTable.from_values(mapping, vocab_size=vocab_size, dot_id=dot_id)


def _layout(tensor: torch.Tensor, layout: str, generator: torch.Generator) -> torch.Tensor:
    """The same values in another memory layout (the values are unchanged)."""
    if layout == "transposed":
        return tensor.transpose(0, 1).contiguous().transpose(0, 1)
    if layout == "sliced":
        padded = torch.zeros((tensor.shape[0], tensor.shape[1] * 2) + tuple(tensor.shape[2:]), dtype=tensor.dtype)
        padded[:, ::2] = tensor
        return padded[:, ::2]
    if layout == "expanded":  # stride 0 along the batch: only where every batch row is the same
        return tensor[:1].expand_as(tensor) if torch.equal(tensor, tensor[:1].expand_as(tensor)) else tensor
    return tensor


def build(spec: Spec) -> Case:
    """The tensors and the call of ``spec`` (deterministic)."""
    reason = invalid_reason(spec)
    if reason is not None:
        raise ValueError(f"invalid spec: {reason}")
    generator = torch.Generator().manual_seed(spec.seed)
    table = _table(spec, generator)
    dtype = DTYPES[spec.dtype]
    vocab_size, batch, length = spec.vocab_size, spec.batch, spec.length
    ignore_index = -100
    if spec.ignore_inside:
        text_ids = (~table.is_number).nonzero().flatten()
        ignore_index = int(text_ids[torch.randint(0, text_ids.numel(), (1,), generator=generator)])

    # labels: numbers, text, ignored
    draw = torch.rand(batch, length, generator=generator)
    numbers = table.number_ids[torch.randint(0, table.num_numbers, (batch, length), generator=generator)]
    text = torch.randint(0, vocab_size, (batch, length), generator=generator)
    labels = torch.where(draw < 0.55, numbers, text)
    labels = torch.where(draw > 0.85, torch.full_like(labels, ignore_index), labels)
    if spec.float_level and table.dot_id is not None:
        labels = torch.where((draw > 0.5) & (draw < 0.6), torch.full_like(labels, table.dot_id), labels)

    # logits on a 2^-10 grid, |z| < 2^13, so that a shift by |c| < 2^13 is exact
    logits = torch.randn(batch, length, vocab_size, generator=generator, dtype=torch.float64) * spec.scale
    logits = (torch.round(logits * 1024) / 1024).clamp(-8000, 8000)
    shift = 1 if spec.shift_labels else 0
    out_length = length - shift
    # the logits row that predicts each label (after the causal shift) and that label
    predicting = logits[:, :out_length]
    scored = labels[:, shift:]
    _apply_mask(spec, predicting, scored, table, generator)

    poisoned = torch.zeros(batch, out_length, dtype=torch.bool)
    if spec.poison != "none":
        poisoned = torch.rand(batch, out_length, generator=generator) < 0.3
        poisoned[0, 0] = True
        rows = poisoned.nonzero().tolist()
        for b, t in rows:
            if spec.poison == "bad_label":
                labels[b, t + shift] = vocab_size + 3 if (b + t) % 2 == 0 else -7
            else:
                column = int(torch.randint(0, vocab_size, (1,), generator=generator))
                logits[b, t, column] = math.inf if spec.poison == "inf" else math.nan

    weights = None
    if spec.weights != "none" or spec.poison_weight_zero:
        if spec.weights in ("int", "bool"):
            weights = torch.randint(0, 3 if spec.weights == "int" else 2, (batch, length), generator=generator)
            weights = weights.to(torch.int64 if spec.weights == "int" else torch.bool)
        else:
            weights = torch.rand(batch, length, generator=generator, dtype=torch.float64).float() * 2
            if spec.weights == "zero_some":
                weights = torch.where(torch.rand(batch, length, generator=generator) < 0.4,
                                      torch.zeros_like(weights), weights)
        if spec.poison_weight_zero:
            padded = torch.zeros(batch, length, dtype=torch.bool)
            padded[:, shift:] = poisoned
            weights = torch.where(padded, torch.zeros_like(weights), weights)

    if spec.logits_layout == "expanded":
        # every batch row equal to the first, so that a stride-0 view holds the same values
        logits, labels, poisoned = (t[:1].expand_as(t).clone() for t in (logits, labels, poisoned))
        weights = None if weights is None else weights[:1].expand_as(weights).clone()

    label_dtype = torch.int32 if spec.label_dtype == "int32" else torch.int64
    labels = _layout(labels.to(label_dtype), spec.labels_layout, generator)
    if weights is not None:
        weights = _layout(weights, spec.weights_layout, generator)
    kwargs = _kwargs(spec, ignore_index, table, labels, weights)
    case = Case(spec, table, None, labels, weights, kwargs, poisoned=poisoned & ~_zero_weight(spec, weights, shift))
    if spec.function == "linear":
        hidden_size = 8
        weight = torch.randn(vocab_size, hidden_size, generator=generator, dtype=torch.float64) / 2
        hidden = torch.randn(batch, length, hidden_size, generator=generator, dtype=torch.float64)
        bias = torch.randn(vocab_size, generator=generator, dtype=torch.float64)
        if spec.minus_inf_bias:
            text_ids = (~table.is_number).nonzero().flatten()
            masked = text_ids[torch.randperm(text_ids.numel(), generator=generator)[: max(1, text_ids.numel() // 2)]]
            masked = masked[~torch.isin(masked, labels.long().flatten())]
            bias[masked] = -math.inf
        case.logits = _layout(hidden.to(dtype), spec.logits_layout, generator)
        case.linear = (weight.to(dtype), bias.to(dtype))
    else:
        case.logits = _layout(logits.to(dtype), spec.logits_layout, generator)
    return case


def _zero_weight(spec: Spec, weights: Optional[torch.Tensor], shift: int) -> torch.Tensor:
    if weights is None:
        return torch.zeros((spec.batch, spec.length - shift), dtype=torch.bool)
    return weights[:, shift:] == 0


def _apply_mask(spec: Spec, logits: torch.Tensor, labels: torch.Tensor, table: NumberTokenTable,
                generator: torch.Generator) -> None:
    """-inf (or big negative) masks on some rows; the label's logit always stays finite.
    ``confident_wrong`` is no mask but a confident prediction far from the label: a number row's
    number token of the most distant value gets the row's largest logit plus 6-14, so q is one-hot
    but for e^-6..e^-14 (the gradient's terms then cancel unless measured from that token). Not
    more: the float64 oracle's own autograd forms x_l - E_q[x] directly, exact only while e^-margin
    times the values' spread stays far above float64's rounding of |x| (at 30, 2^-47 came out for
    a 1.08e-14 gradient)."""
    if spec.mask == "none":
        return
    if spec.mask == "confident_wrong":
        _confident_wrong(logits, labels, table, generator)
        return
    dtype = DTYPES[spec.dtype]
    value = {"big_negative": -1e6, "finfo_max": -torch.finfo(dtype).max}.get(spec.mask, -math.inf)
    vocab_size = logits.shape[-1]
    rows = torch.rand(labels.shape, generator=generator) < 0.6
    is_number = table.is_number
    for b, t in rows.nonzero().tolist():
        label = int(labels[b, t])
        keep = logits[b, t, label].item() if 0 <= label < vocab_size else None
        if spec.mask in ("leading", "big_negative", "finfo_max"):
            width = int(torch.randint(1, vocab_size, (1,), generator=generator))
            logits[b, t, :width] = value
        elif spec.mask == "text":
            logits[b, t, ~is_number] = value
        elif spec.mask == "all_but_label":
            logits[b, t, :] = value
        elif spec.mask == "numbers_under_text" and not (0 <= label < vocab_size and bool(is_number[label])):
            logits[b, t, is_number] = value
        if keep is not None:
            logits[b, t, label] = keep


def _confident_wrong(logits: torch.Tensor, labels: torch.Tensor, table: NumberTokenTable,
                     generator: torch.Generator) -> None:
    index = table.number_index
    for b, t in (torch.rand(labels.shape, generator=generator) < 0.6).nonzero().tolist():
        label = int(labels[b, t])
        if not (0 <= label < logits.shape[-1]) or int(index[label]) < 0:
            continue
        distance = (table.number_values - table.number_values[int(index[label])]).abs()
        far = int(table.number_ids[int(distance.argmax())])
        margin = int(torch.randint(6, 15, (1,), generator=generator))
        logits[b, t, far] = logits[b, t].max() + margin  # stays on the 2^-10 grid


def _kwargs(spec: Spec, ignore_index: int, table: NumberTokenTable, labels, weights) -> dict:
    kwargs = dict(reduction=spec.reduction, ignore_index=ignore_index, shift_labels=spec.shift_labels,
                  validate=spec.poison != "bad_label")
    if spec.function == "number_level":
        kwargs["float_level"] = spec.float_level
    else:
        kwargs.update(loss=spec.loss, squash_factor=spec.squash, reweigh=spec.reweigh)
    if spec.function in ("ce", "module_ce", "linear", "trainer"):
        kwargs["gaussian_sigma"] = spec.sigma
    if spec.function == "ce":
        kwargs["inplace"] = spec.inplace
    if spec.normalizer != "none":
        names = (("ce_normalizer", "ntl_normalizer") if spec.function in ("ce", "module_ce", "linear")
                 else ("normalizer",))
        for index, name in enumerate(names):
            count = 3.5 + index * 2
            kwargs[name] = count if spec.normalizer == "number" else torch.tensor(count)
    return kwargs


# ----------------------------------------------------------------------------- running a case


def _differentiable(outputs):
    return outputs.loss if isinstance(outputs, tuple) else outputs


def _as_tuple(outputs) -> Tuple[torch.Tensor, ...]:
    return tuple(outputs) if isinstance(outputs, tuple) else (outputs,)


def call(case: Case, backend_name: str, logits=None, labels=None, weights=None, table=None, kwargs=None,
         linear=None, function=None, upstream=None):
    """Run the case's function on ``backend_name`` (``"reference"`` for the oracle).

    Returns ``(outputs, gradients)``: the outputs as a tuple (detached) and the gradients of
    ``Σ upstream · loss`` with respect to the differentiable inputs (None when nothing could
    be differentiated); ``upstream`` defaults to :func:`_upstream` of this call's own loss.
    """
    spec = case.spec
    function = spec.function if function is None else function
    logits = case.logits if logits is None else logits
    labels = case.labels if labels is None else labels
    weights = case.weights if weights is None and kwargs is None else weights
    table = case.table if table is None else table
    kwargs = dict(case.kwargs if kwargs is None else kwargs)
    linear = case.linear if linear is None else linear
    leaf = logits.detach().clone().requires_grad_()
    # an intermediate, as logits are in training: the in-place backward may overwrite it
    source = leaf * 1 if spec.inplace else leaf
    inputs = [leaf]
    if function == "ce":
        out = ntl_fast.cross_entropy_with_ntl(source, labels, table, weights=weights, backend=backend_name, **kwargs)
    elif function == "ntl":
        out = ntl_fast.number_token_loss(source, labels, table, weights=weights, backend=backend_name, **kwargs)
    elif function in ("module_ce", "module_ntl"):
        normalizers = {k: kwargs.pop(k) for k in ("ce_normalizer", "ntl_normalizer", "normalizer") if k in kwargs}
        module_class = ntl_fast.CrossEntropyWithNTL if spec.function == "module_ce" else ntl_fast.NumberTokenLoss
        module = module_class(table=table, backend=backend_name, **kwargs)
        out = module(source, labels, weights, **normalizers)
    elif function == "number_level":
        out = ntl_fast.number_level_loss(source, labels, table, weights=weights, **kwargs)
    elif function == "trainer":
        out = _trainer_loss(source, labels, table, backend_name, kwargs)
    elif function == "linear":
        weight, bias = (t.detach().clone().requires_grad_() for t in linear)
        inputs += [weight, bias]
        out = ntl_fast.linear_cross_entropy_with_ntl(
            source, weight, labels, table, bias=bias, weights=weights, backend=backend_name,
            chunk_size=LINEAR_CHUNK, **kwargs
        )
    else:
        raise ValueError(function)
    loss = _differentiable(out)
    upstream = _upstream(loss) if upstream is None else upstream.to(loss.dtype)
    gradients = None
    if loss.requires_grad:
        gradients = torch.autograd.grad((loss * upstream).sum(), inputs, allow_unused=True)
        gradients = tuple(torch.zeros_like(i) if g is None else g for i, g in zip(inputs, gradients))
    return tuple(o.detach() for o in _as_tuple(out)), gradients


def _upstream(loss: torch.Tensor) -> torch.Tensor:
    """Deterministic positive upstream gradients; 0 where the loss is not finite."""
    if loss.dim() == 0:
        return torch.ones((), dtype=loss.dtype)
    values = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype).view(loss.shape)
    return torch.where(torch.isfinite(loss.detach()), values, torch.zeros_like(values))


def _trainer_loss(logits, labels, table, backend_name, kwargs):
    """``NTLTrainer.compute_loss`` on a causal model (label shift by the Trainer), evaluation mode."""
    from ntl_fast.integrations.trainer import NTLTrainer

    class Model(torch.nn.Module):
        config = type("Config", (), {"is_encoder_decoder": False})()

        def forward(self, input_ids):
            return {"logits": logits}

    trainer = object.__new__(NTLTrainer)
    trainer.number_token_table = table
    trainer.ntl_options = dict(ntl_weight=0.3, loss=kwargs["loss"], gaussian_sigma=kwargs["gaussian_sigma"],
                               squash_factor=kwargs["squash_factor"], reweigh=kwargs["reweigh"], backend=backend_name)
    trainer.ntl_shift_labels = True
    trainer._ntl_items_in_batch = None
    model = Model().eval()
    return trainer.compute_loss(model, {"input_ids": labels, "labels": labels})


def oracle(case: Case, upstream: Optional[torch.Tensor] = None):
    """The float64 reference on the same rounded input, contiguous (``upstream``: see :func:`call`)."""
    logits = case.logits.detach().to(torch.float64).contiguous()
    if case.spec.mask == "finfo_max" and case.spec.sigma is None:
        # -finfo.max is a mask written as a number: in float64 it is no longer the most negative
        # value, so the oracle sees the mask it stands for. Gaussian-CE is the exception
        # (docs/math.md §4): it weighs each number token's log-probability, which for this finite
        # logit is finite (~1e38), where a -inf mask gives +inf, so the oracle keeps the number.
        logits = logits.masked_fill(logits == -torch.finfo(case.logits.dtype).max, -math.inf)
    linear = None if case.linear is None else tuple(t.to(torch.float64) for t in case.linear)
    if case.spec.function == "linear":
        return _linear_oracle(case, logits, linear, _linear_logits(case), upstream)
    if case.spec.function == "number_level":
        return _number_level_oracle(case, logits)
    kwargs = dict(case.kwargs)
    function = None
    if case.spec.function == "trainer":  # the Trainer's label shift against the function's
        kwargs.update(ntl_weight=0.3, shift_labels=True)
        function = "ce"
    return call(case, "reference", logits=logits, labels=case.labels.contiguous(),
                weights=None if case.weights is None else case.weights.contiguous(), kwargs=kwargs,
                linear=linear, function=function, upstream=upstream)


def reweighed_gradient_scales(case: Case, upstream: torch.Tensor, want_gradients) -> Optional[Tuple[float, ...]]:
    """docs/math.md §6's scale of each gradient of a reweighed case from non-float64 logits:
    ``max(max|b|, max|∇(mL)|, max|c ∇m|)``, ∇(mL) from the float64 reference with c = 0 and the
    same upstream gradients, ``c ∇m = ∇(mL) - ∇L'``; None where the plain ``max|b|`` holds."""
    if not case.spec.reweigh or case.logits.dtype == torch.float64 or want_gradients is None:
        return None
    with without_reweigh_constant(case.table):
        _, mass_gradients = oracle(case, upstream=upstream)
    free = _free_gradient_rows(case)
    scales = []
    for index, (exact, mass) in enumerate(zip(want_gradients, mass_gradients)):
        if free is not None and index == 0:  # the rows check_against_oracle leaves out
            exact, mass = (torch.where(free[..., None], torch.zeros_like(t), t) for t in (exact, mass))
        scales.append(reweighed_scale(exact, mass))
    return tuple(scales)


LINEAR_CHUNK = 3


def _linear_logits(case: Case) -> torch.Tensor:
    """The LM head's logits rounded in the input dtype exactly as the function forms them (the same
    row chunks: a matmul's rounding may depend on its shape), then float64."""
    hidden, (weight, bias) = case.logits, case.linear
    rows = hidden.reshape(-1, hidden.shape[-1])  # every row, also under shift_labels (labels shift)
    chunks = [torch.nn.functional.linear(rows[start:start + LINEAR_CHUNK], weight, bias)
              for start in range(0, rows.shape[0], LINEAR_CHUNK)]
    return torch.cat(chunks).to(torch.float64).view(*hidden.shape[:-1], weight.shape[0])


def _linear_oracle(case: Case, hidden, linear, logits, upstream=None):
    """CE + NTL of the rounded logits by the reference, chained to hidden, weight and bias in float64."""
    kwargs = dict(case.kwargs)
    leaf = logits.clone().requires_grad_()
    out = ntl_fast.cross_entropy_with_ntl(leaf, case.labels, case.table, weights=case.weights,
                                          backend="reference", **kwargs)
    loss = out.loss
    upstream = _upstream(loss) if upstream is None else upstream
    if not loss.requires_grad:
        return tuple(o.detach() for o in out), None
    (grad_logits,) = torch.autograd.grad((loss * upstream).sum(), leaf)
    weight, bias = linear
    flat = grad_logits.reshape(-1, grad_logits.shape[-1])
    hidden_flat = hidden.reshape(-1, hidden.shape[-1])
    # d/d hidden contracts over V (151,936 terms): in the input dtype, as the function does, so
    # that only the difference in d/d logits is compared, not a matmul's own rounding
    dtype = case.logits.dtype
    grad_hidden = (flat.to(dtype) @ case.linear[0]).to(torch.float64).view(hidden.shape)
    grad_weight = flat.t() @ hidden_flat
    grad_bias = flat.sum(0)
    return tuple(o.detach() for o in out), (grad_hidden, grad_weight, grad_bias)


def _number_level_oracle(case: Case, logits):
    """The readable per-run loop of the reference, with the shared reduction."""
    kwargs = case.kwargs
    labels, weights = case.labels, case.weights
    leaf = logits.clone().requires_grad_()
    z = leaf
    if kwargs["shift_labels"]:
        z, labels = z[..., :-1, :], labels[..., 1:]
        weights = None if weights is None else weights[..., 1:]
    rows, first = reference.number_level_rows(
        z, labels.long(), case.table, float_level=kwargs["float_level"], dot_id=case.table.dot_id,
        ignore_index=kwargs["ignore_index"],
    )
    weights1d = None if weights is None else weights.reshape(-1).to(torch.float64)
    loss = _reduce(rows.reshape(-1), first.reshape(-1), weights1d, kwargs["reduction"],
                   kwargs.get("normalizer"), labels.shape)
    upstream = _upstream(loss)
    (grad,) = torch.autograd.grad((loss * upstream).sum(), leaf)
    return (loss.detach(),), (grad,)


# ----------------------------------------------------------------------------- comparisons


OVERFLOW_MARGIN = 2.0**8  # docs/math.md §6


class Mismatch(AssertionError):
    pass


def _close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, gradient: bool, what: str,
           must_be_nonfinite: Optional[torch.Tensor] = None, scale: Optional[float] = None) -> None:
    """docs/math.md §6 over the elements where ``expected`` is finite; where it is not and the
    element is marked ``must_be_nonfinite`` (poisoned input), ``actual`` must not be finite.
    ``scale``: the conditioned scale of a reweighed gradient (:func:`reweighed_gradient_scales`),
    in place of ``max|b|`` where it is larger."""
    actual = actual.detach().double()
    expected = expected.detach().double()
    if actual.shape != expected.shape:
        raise Mismatch(f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}")
    finite = torch.isfinite(expected)
    if must_be_nonfinite is not None:
        required = ~finite & must_be_nonfinite.expand_as(finite)
        if torch.isfinite(actual[required]).any():
            raise Mismatch(f"{what}: finite where the reference is not (poisoned input): "
                           f"{actual[required].tolist()[:8]}")
    rtol, atol = tolerances(dtype, gradient)
    if dtype != torch.float64:
        # docs/math.md §6: an exact result within OVERFLOW_MARGIN of float32's largest value may
        # overflow (to the infinity of its sign) in a float32 sum; either answer is right there.
        # So may a float16 gradient within a factor 1 + rtol of float16's largest value (65504)
        limit = torch.finfo(torch.float32).max / OVERFLOW_MARGIN
        if gradient and dtype == torch.float16:
            limit = torch.finfo(torch.float16).max / (1 + rtol)
        edge = finite & (expected.abs() > limit)
        finite = finite & ~(edge & torch.isinf(actual) & (torch.sign(actual) == torch.sign(expected)))
    if not finite.any():
        return
    a, b = actual[finite], expected[finite]
    if not torch.isfinite(a).all():
        raise Mismatch(f"{what}: non-finite where the reference is finite: {a[~torch.isfinite(a)].tolist()[:8]}")
    scale = max(scale or 0.0, b.abs().max().item())
    error = (a - b).abs().max().item()
    if not error <= rtol * scale + atol:
        raise Mismatch(f"{what}: max error {error:.3e} > {rtol * scale + atol:.3e} (rtol {rtol}, scale {scale:.3e})")


def _identical(first, second, what: str) -> None:
    for index, (a, b) in enumerate(zip(first, second)):
        if a is None and b is None:
            continue
        if a.shape != b.shape \
                or not torch.equal(torch.nan_to_num(a, 7.0, 8.0, 9.0), torch.nan_to_num(b, 7.0, 8.0, 9.0)) \
                or not torch.equal(torch.isnan(a), torch.isnan(b)):
            raise Mismatch(f"{what}: element {index} differs")


def _per_row_poison(case: Case, output: torch.Tensor) -> Optional[torch.Tensor]:
    if output.dim() == 0:
        return torch.tensor(bool(case.poisoned.any()))
    if case.spec.function == "number_level":  # a poisoned digit spoils its whole number
        return torch.tensor(bool(case.poisoned.any()))
    return case.poisoned.view(output.shape) if case.poisoned.numel() == output.numel() else None


def check_against_oracle(case: Case, backend_name: str) -> None:
    want_outputs, want_gradients = oracle(case)
    # the oracle's upstream gradients (0 where its loss is not finite) on both sides
    upstream = _upstream(want_outputs[0])
    outputs, gradients = call(case, backend_name, upstream=upstream)
    dtype = case.logits.dtype
    for index, (got, want) in enumerate(zip(outputs, want_outputs)):
        _close(got, want, dtype, False, f"output {index}", _per_row_poison(case, want))
    if want_gradients is None:
        return
    if gradients is None:
        raise Mismatch("no gradient where the reference has one")
    names = ("d/d logits",) if case.spec.function != "linear" else ("d/d hidden", "d/d weight", "d/d bias")
    free = _free_gradient_rows(case)
    case.gradient_scales = reweighed_gradient_scales(case, upstream, want_gradients)
    scales = case.gradient_scales or (None,) * len(names)
    for name, got, want, scale in zip(names, gradients, want_gradients, scales):
        if free is not None and name == "d/d logits":
            # a row with inf/NaN logits has no meaningful gradient of its own: only the others count
            got, want = (torch.where(free[..., None], torch.zeros_like(t), t) for t in (got, want.to(got.dtype)))
        _close(got, want, dtype, True, name, scale=scale)
    _check_rows_that_do_not_count(case, gradients)


def _free_gradient_rows(case: Case) -> Optional[torch.Tensor]:
    """The logits rows (B, T) whose gradient is unconstrained: poisoned rows that count."""
    spec = case.spec
    if spec.poison in ("none", "bad_label") or spec.function == "linear":
        return None
    rows = torch.zeros(spec.batch, spec.length, dtype=torch.bool)
    if spec.function == "number_level":  # a poisoned digit spoils its whole number
        rows[:] = bool(case.poisoned.any())
    else:
        rows[:, : case.poisoned.shape[1]] = case.poisoned
    return rows


def _check_rows_that_do_not_count(case: Case, gradients) -> None:
    """Ignored and zero-weight rows: exactly 0 gradient, whatever their logits."""
    spec = case.spec
    if spec.function in ("linear", "number_level", "trainer"):
        return
    shift = 1 if spec.shift_labels else 0
    labels = case.labels.long()[:, shift:]
    quiet = labels == case.kwargs["ignore_index"]
    if case.weights is not None:
        quiet |= case.weights[:, shift:] == 0
    if spec.function in ("ntl", "module_ntl"):
        in_range = (labels >= 0) & (labels < spec.vocab_size)
        quiet |= ~(in_range & case.table.is_number[labels.clamp(0, spec.vocab_size - 1)])
    rows = gradients[0][:, : spec.length - shift][quiet]
    if (rows != 0).any():
        raise Mismatch("a row that counts for nothing has a non-zero gradient")


def check_invariance(case: Case, backend_name: str) -> None:
    spec = case.spec
    if spec.invariance == "repeat":
        _identical(_flat(call(case, backend_name)), _flat(call(case, backend_name)), "two identical calls")
    elif spec.invariance == "layout":
        contiguous = call(case, backend_name, logits=case.logits.contiguous(), labels=case.labels.contiguous(),
                          weights=None if case.weights is None else case.weights.contiguous(),
                          kwargs=case.kwargs)
        _identical(_flat(call(case, backend_name)), _flat(contiguous), "the contiguous copies")
    elif spec.invariance == "shift":
        _check_shift(case, backend_name)
    elif spec.invariance == "permute":
        _check_permutation(case, backend_name)
    elif spec.invariance == "split":
        _check_split(case, backend_name)


def _flat(result):
    outputs, gradients = result
    return tuple(outputs) + (tuple(gradients) if gradients is not None else ())


def _compare_results(got, want, dtype, what, case: Case) -> None:
    """docs/math.md §6 between two results of the backend, with the case's ``gradient_scales`` (the
    same conditioned scales: an invariance leaves both terms unchanged). The gradient of a poisoned
    row is left open (docs/math.md §4), so it is compared on the other rows only."""
    (outputs, gradients), (want_outputs, want_gradients) = got, want
    for index, (a, b) in enumerate(zip(outputs, want_outputs)):
        _close(a, b, dtype, False, f"{what}: output {index}")
    if want_gradients is not None and gradients is not None:
        free = _free_gradient_rows(case)
        scales = case.gradient_scales or (None,) * len(gradients)
        for index, (a, b, scale) in enumerate(zip(gradients, want_gradients, scales)):
            if free is not None and index == 0:
                a, b = (torch.where(free[..., None], torch.zeros_like(t), t) for t in (a, b))
            _close(a, b, dtype, True, f"{what}: gradient", scale=scale)


def _check_shift(case: Case, backend_name: str) -> None:
    """Adding c_row to each row (exact in float32: a 2^-10 grid, |z + c| < 2^14)."""
    if case.logits.dtype not in (torch.float32, torch.float64) or case.spec.function == "linear":
        return
    generator = torch.Generator().manual_seed(case.spec.seed + 1)
    rows = case.logits.shape[:-1]
    shift = torch.randint(-8000 * 1024, 8000 * 1024, rows, generator=generator).to(case.logits.dtype) / 1024
    shifted = case.logits + shift[..., None]
    _compare_results(call(case, backend_name, logits=shifted), call(case, backend_name),
                     case.logits.dtype, "row shift", case)


def _check_permutation(case: Case, backend_name: str) -> None:
    """Token ids permuted together with the table: the same losses, the gradient permuted."""
    spec = case.spec
    if spec.function == "linear":
        return
    vocab_size = spec.vocab_size
    generator = torch.Generator().manual_seed(spec.seed + 2)
    perm = torch.randperm(vocab_size, generator=generator)  # old id k becomes perm[k]
    ignore_index = case.kwargs["ignore_index"]
    if 0 <= ignore_index < vocab_size:  # keep an in-vocabulary ignore_index where it is
        where = int((perm == ignore_index).nonzero())
        perm[where], perm[ignore_index] = perm[ignore_index].clone(), ignore_index
    values = torch.full((vocab_size,), math.nan)
    values[perm] = case.table.values
    dot_id = None if case.table.dot_id is None else int(perm[case.table.dot_id])
    table = NumberTokenTable(values, dot_id=dot_id)
    labels = case.labels.long()
    in_range = (labels >= 0) & (labels < vocab_size)
    moved = torch.where(in_range, perm[labels.clamp(0, vocab_size - 1)], labels).to(case.labels.dtype)
    logits = torch.empty_like(case.logits.contiguous())
    logits[..., perm] = case.logits
    outputs, gradients = call(case, backend_name, logits=logits, labels=moved, table=table,
                              weights=case.weights, kwargs=case.kwargs)
    if gradients is not None:
        gradients = (gradients[0][..., perm],)
    _compare_results((outputs, gradients), call(case, backend_name), case.logits.dtype, "vocabulary permutation",
                     case)


def _check_split(case: Case, backend_name: str) -> None:
    """The batch split in two, each half divided by the global counts: the full mean."""
    spec = case.spec
    if spec.function not in ("ce", "ntl") or spec.reduction != "mean" or spec.normalizer != "none" or spec.batch < 2:
        return
    shift = 1 if spec.shift_labels else 0
    labels = case.labels.long()[:, shift:]
    weights = None if case.weights is None else case.weights[:, shift:].double()
    ignore_index = case.kwargs["ignore_index"]
    in_range = (labels >= 0) & (labels < spec.vocab_size) & (labels != ignore_index)
    is_number = in_range & case.table.is_number[labels.clamp(0, spec.vocab_size - 1)]
    counts = [(mask.double() if weights is None else torch.where(mask, weights, 0.0)).sum().item()
              for mask in (in_range, is_number)]
    kwargs = dict(case.kwargs)
    if spec.function == "ce":
        kwargs.update(ce_normalizer=counts[0], ntl_normalizer=counts[1])
    else:
        kwargs.update(normalizer=counts[1])
    half = spec.batch // 2
    parts = []
    for rows in (slice(0, half), slice(half, None)):
        parts.append(call(case, backend_name, logits=case.logits[rows], labels=case.labels[rows],
                          weights=None if case.weights is None else case.weights[rows], kwargs=kwargs))
    outputs = tuple(a + b for a, b in zip(parts[0][0], parts[1][0]))
    gradients = None
    if parts[0][1] is not None and parts[1][1] is not None:
        gradients = (torch.cat([parts[0][1][0], parts[1][1][0]]),)
    full = call(case, backend_name)
    if not all(bool(torch.isfinite(o).all()) for o in full[0]):
        return
    _compare_results((outputs, gradients), full, case.logits.dtype, "batch split with global normalisers",
                     case)


def _cuda_emulation_reason() -> Optional[str]:
    reason = _reason("cpp")()
    if reason is not None:
        return reason
    try:
        from cuda_emulation import harness
        harness.build("memcheck")
    except Exception as error:  # no g++, or the harness is missing
        return f"the CUDA emulation cannot be built: {error}"
    return None


def check_cuda_emulation(case: Case) -> None:
    """The emulated CUDA forward and backward on the case's rows, against the C++ CPU operators
    (NaN/inf positions exact, docs/math.md §6 otherwise) and free of the emulation's reports
    (races, divergent barriers, out-of-bounds accesses). The C++ operators are checked against
    the float64 oracle by the "cpp" backend, on the same cases."""
    from cuda_emulation import harness
    from ntl_fast.config import LossConfig

    spec, kwargs = case.spec, case.kwargs
    logits, labels, weights = case.logits, case.labels, case.weights
    if spec.shift_labels:
        logits, labels = logits[..., :-1, :], labels[..., 1:]
        weights = None if weights is None else weights[..., 1:]
    logits = logits.reshape(-1, spec.vocab_size).contiguous()
    labels = labels.reshape(-1).contiguous()
    if weights is not None:  # as the public API does: a zero-weight position is ignored
        labels = torch.where(weights.reshape(-1) != 0, labels, torch.full_like(labels, kwargs["ignore_index"]))
    config = LossConfig(spec.loss, spec.squash, spec.reweigh, spec.sigma if spec.function == "ce" else None,
                        kwargs["ignore_index"])
    upstream = torch.linspace(0.5, 1.5, labels.numel(), dtype=torch.float64)
    with_ce = spec.function == "ce"
    cases = [harness.Case.from_table("forward", "forward", logits, labels, case.table, config, with_ce=with_ce)]
    for kernel in ("backward", "backward_inplace") if with_ce and spec.inplace else ("backward",):
        cases.append(harness.Case.from_table(kernel, kernel, logits, labels, case.table, config, with_ce=with_ce,
                                             grad_ce=upstream, grad_ntl=upstream.flip(0)))
    problems = []
    for emulated, result in zip(cases, harness.run(cases)):
        expected = harness.reference(emulated)
        conditioned = "grad" in expected and spec.reweigh and logits.dtype != torch.float64
        if conditioned:  # docs/math.md §6: the reweighed gradient's scale includes its two terms
            cpu_grad, grad = expected.pop("grad"), result.outputs.pop("grad", None)
        problems += [f"{emulated.kernel}: {problem}" for problem in harness.compare(emulated, result, expected)]
        if conditioned:
            problems += [f"{emulated.kernel}: {problem}"
                         for problem in _emulated_reweighed_gradient(emulated, grad, cpu_grad)]
    if problems:
        raise Mismatch("; ".join(problems[:6]))


def _emulated_reweighed_gradient(emulated, grad, cpu_grad) -> list:
    """The emulated gradient of a reweighed case against the C++ operators' (NaN and infinities
    exact), within docs/math.md §6's conditioned bound: the scale includes ∇(mL) and c ∇m from the
    float64 reference of the same rows."""
    if grad is None:
        return ["grad: missing from the emulation's outputs"]
    got, want = grad.double(), cpu_grad.double()
    finite = torch.isfinite(want)
    if not torch.equal(torch.nan_to_num(got[~finite], 7.0, 8.0, 9.0), torch.nan_to_num(want[~finite], 7.0, 8.0, 9.0)) \
            or not torch.isfinite(got[finite]).all():
        return ["grad: NaN or infinities differ from the CPU operators"]

    grad_ce, grad_ntl = emulated.grad_ce.double(), emulated.grad_ntl.double()

    def exact_gradient():  # of Σ grad_ce·CE + grad_ntl·NTL; rows with a non-finite loss count for nothing
        logits = emulated.logits.detach().double().requires_grad_()
        if emulated.with_ce:
            ce, ntl = reference.ce_ntl_rows(logits, emulated.labels, emulated.table, emulated.config)
            total = (torch.nan_to_num(ce) * grad_ce).sum() + (torch.nan_to_num(ntl) * grad_ntl).sum()
        else:
            ntl = reference.ntl_rows(logits, emulated.labels, emulated.table, emulated.config)
            total = (torch.nan_to_num(ntl) * grad_ntl).sum()
        return torch.autograd.grad(total, logits)[0]

    exact = exact_gradient()
    with without_reweigh_constant(emulated.table):
        mass = exact_gradient()
    from cuda_emulation import harness
    rtol, atol = harness._tolerance(emulated, "grad")  # as for every other output of the emulation
    scale = max(reweighed_scale(exact, mass), want[finite].abs().max().item() if finite.any() else 0.0)
    error = (got[finite] - want[finite]).abs().max().item() if finite.any() else 0.0
    if error > rtol * scale + atol:
        return [f"grad: max |diff| {error:.3g} > {rtol * scale + atol:.3g} (conditioned scale {scale:.3g})"]
    return []


def run_case(spec: Spec, backend_name: str) -> None:
    """Every check of one case on one backend; raises :class:`Mismatch` with a reproduction."""
    backend = BACKENDS[backend_name]
    try:
        case = build(spec)
        with backend.context():
            if backend.runner is not None:
                backend.runner(case)
                return
            check_against_oracle(case, backend.api_name)
            check_invariance(case, backend.api_name)
    except Exception as error:  # every failure, crashes included, gets its reproduction
        raise Mismatch(f"{type(error).__name__}: {error}\n{reproduction(spec, backend_name)}") from error


def reproduction(spec: Spec, backend_name: str) -> str:
    fields = ", ".join(f"{f.name}={getattr(spec, f.name)!r}" for f in dataclasses.fields(spec)
                       if getattr(spec, f.name) != f.default)
    return (
        "Reproduce (from the repository root):\n"
        "    import os, sys; os.environ.setdefault('TRITON_INTERPRET', '1'); sys.path.insert(0, 'tests')\n"
        "    import torch, ntl_fast\n"
        "    from fuzz_cases import Spec, build, run_case, call, oracle\n"
        f"    spec = Spec({fields})\n"
        "    case = build(spec)  # case.logits, case.labels, case.weights, case.table, case.kwargs\n"
        f"    run_case(spec, {backend_name!r})  # or: call(case, {BACKENDS[backend_name].api_name!r}), oracle(case)\n"
    )


# ----------------------------------------------------------------------------- pairwise option coverage

OPTION_FACTORS: Dict[str, Sequence] = {
    "function": ("ce", "ntl", "module_ce", "module_ntl", "linear"),
    "loss": LOSSES,
    "reweigh": (False, True),
    "squash": (None, 2.5),
    "sigma": (None, 0.7),
    "reduction": REDUCTIONS,
    "normalizer": NORMALIZERS,
    "weights": WEIGHTS,
    "shift_labels": (False, True),
    "inplace": (False, True),
    "dtype": tuple(DTYPES),
}


@functools.lru_cache(maxsize=None)
def pairwise_specs(seed: int = 0) -> Tuple[Spec, ...]:
    """Option combinations covering every valid pair of values of :data:`OPTION_FACTORS`
    (greedy, deterministic), each on a small case."""
    names = list(OPTION_FACTORS)
    valid = []
    for values in itertools.product(*OPTION_FACTORS.values()):
        spec = Spec(**dict(zip(names, values)))
        if invalid_reason(spec) is None:
            valid.append(values)
    uncovered = {(i, a, j, b) for values in valid for (i, a), (j, b) in itertools.combinations(enumerate(values), 2)}
    rng = random.Random(seed)
    chosen = []
    while uncovered:
        best, best_gain = None, -1
        for values in rng.sample(valid, min(400, len(valid))):
            gain = sum((i, a, j, b) in uncovered for (i, a), (j, b) in itertools.combinations(enumerate(values), 2))
            if gain > best_gain:
                best, best_gain = values, gain
        if best_gain == 0:  # the sample missed the rest: take a combination holding an uncovered pair
            i, a, j, b = next(iter(uncovered))
            best = next(v for v in valid if v[i] == a and v[j] == b)
        chosen.append(best)
        uncovered -= {(i, a, j, b) for (i, a), (j, b) in itertools.combinations(enumerate(best), 2)}
    specs = []
    for index, values in enumerate(chosen):
        options = dict(zip(names, values))
        specs.append(Spec(seed=index, table="irregular" if index % 2 else "digits",
                          num_numbers=7 if index % 2 else 10, vocab_size=29 + index % 5, batch=2, length=3,
                          **options))
    return tuple(specs)
