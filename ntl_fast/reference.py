"""The math of the project in plain PyTorch: the test oracle and the readable specification.

Every function here works on one row of logits per position: ``logits`` is ``(M, V)`` and
``labels`` is ``(M,)``. They return per-position losses, ``0`` where a position does not count
and NaN where a label is out of range (which the public API rejects before getting here when
``validate=True``). Reductions, weights and normalisers live in :mod:`ntl_fast.functional`, so
every backend shares them. Gradients come from autograd; the closed forms of docs/math.md §2 are
checked against these functions in the tests.

:func:`ntl_rows` and :func:`ce_ntl_rows` compute in float64 whatever the logits' dtype and return
float32 (float64 for float64 logits), as the kernels do: the float32 results are then the
correctly rounded values, also on rows where float32 arithmetic itself is ill-conditioned (a
reweigh constant in the thousands cancelling against ``m ∂L/∂z``).

Notation (docs/math.md §2): ``N`` the number-token ids, ``q`` the softmax over the number tokens,
``p`` the softmax over the full vocabulary, ``y`` the label's value, ``ŷ = Σ q_j v_j``.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from .config import LossConfig, accumulation_dtype
from .labels import label_positions
from .table import NumberTokenTable

__all__ = [
    "accumulation_dtype",
    "label_positions",
    "number_softmax",
    "expected_value",
    "wasserstein",
    "wasserstein_cdf",
    "gaussian_targets",
    "regression_loss",
    "reweigh_by_number_mass",
    "centered",
    "only_rows",
    "ntl_rows",
    "ce_ntl_rows",
    "number_level_rows",
    "unsupported_reason",
    "fuses_loss_and_grad",
    "ce_ntl_loss_and_grad",
    "scale_gradient_",
]


def number_softmax(number_logits: Tensor) -> Tensor:
    """``q_j = exp(z_j - LSE_N)``: the softmax over the number tokens only."""
    return torch.softmax(number_logits, dim=-1)


def expected_value(q: Tensor, number_values: Tensor) -> Tensor:
    """``ŷ = Σ_j q_j v_j``."""
    return (q * number_values).sum(-1)


def wasserstein(q: Tensor, distances_to_label: Tensor) -> Tensor:
    """NTL-WAS (§2.2): ``Σ_j q_j D(y, v_j)``, W1 between q and the one-hot target."""
    return (q * distances_to_label).sum(-1)


def wasserstein_cdf(q: Tensor, target: Tensor, table: NumberTokenTable) -> Tensor:
    """W1 between q and a target distribution t over N in CDF form (§2.3).

    ``Σ_{k<K} |F_q(k) - F_t(k)| (v_(k+1) - v_(k))`` with the tokens sorted by value.
    """
    order = table.value_order
    cdf_q = torch.cumsum(q[:, order], dim=-1)[:, :-1]
    cdf_t = torch.cumsum(target[:, order], dim=-1)[:, :-1]
    return ((cdf_q - cdf_t).abs() * table.sorted_gaps.to(q.dtype)).sum(-1)


def gaussian_targets(y: Tensor, number_values: Tensor, sigma: float) -> Tensor:
    """Gaussian label smoothing over N (§2.5): ``t_j ∝ exp(-½((v_j - y)/σ)²)``."""
    return torch.softmax(-0.5 * ((number_values[None, :] - y[:, None]) / sigma) ** 2, dim=-1)


def regression_loss(diff: Tensor, loss: str) -> Tensor:
    """``f(ŷ - y)`` of §2.1: square, absolute value, or Huber with δ = 1."""
    if loss == "mse":
        return diff * diff
    if loss == "mae":
        return diff.abs()
    if loss == "huber":
        absolute = diff.abs()
        return torch.where(absolute < 1.0, 0.5 * diff * diff, absolute - 0.5)
    raise ValueError(f"not a regression loss: {loss!r}")


def reweigh_by_number_mass(loss: Tensor, number_mass: Tensor, text_mass: Tensor, constant: float) -> Tensor:
    """§2.4: ``m L + c (1 - m)``, punishing mass put on text where a number belongs.

    ``text_mass`` is ``1 - m`` computed on its own (:func:`number_and_text_mass`): ``1 - m`` itself
    would be rounding noise times ``c`` when m is 1 to the last bit (every text logit ``-inf``).
    """
    return number_mass * loss + constant * text_mass


def number_and_text_mass(z: Tensor, is_number: Tensor) -> Tuple[Tensor, Tensor]:
    """``m = Σ_{k∈N} p_k`` and ``1 - m = Σ_{k∉N} p_k`` per row, as ``σ(±(LSE_N - LSE_T))``.

    Both masses, and their gradients, keep their relative precision at either end: autograd of
    ``Σ_{k∉N} p_k`` over a log-softmax forms ``∂(1 - m)/∂z_j = p_j - p_j (1 - m)`` for a text
    column, a difference that is float64 rounding noise once m < 1e-14, where the exact value is
    ``p_j m``. Through the log-odds ``d = LSE_N - LSE_T`` it is ``σ'(d) ∂d/∂z_j``, a product.
    A row whose text logits are all ``-inf`` has m = 1 and a zero gradient through ``LSE_T``; a
    ``+inf``/NaN text logit makes both masses NaN (one among the numbers makes q NaN).
    """
    text = torch.where(is_number, torch.full_like(z, -math.inf), z)
    lse_text = torch.logsumexp(text, dim=-1)
    has_text = lse_text.detach() != -math.inf  # NaN stays: a NaN logit poisons the row
    # a row whose text logits are all -inf: logsumexp's backward would be exp(-inf - (-inf))
    safe = torch.logsumexp(torch.where(has_text[:, None], text, torch.zeros_like(text)), dim=-1)
    lse_text = torch.where(has_text, safe, torch.full_like(safe, -math.inf))
    lse_numbers = torch.logsumexp(z[:, is_number], dim=-1)
    log_odds = lse_numbers - lse_text
    number_mass = torch.exp(torch.nn.functional.logsigmoid(log_odds))
    text_mass = torch.exp(torch.nn.functional.logsigmoid(-log_odds))
    poisoned = torch.isnan(lse_text) | (lse_text == math.inf)
    nan = torch.full_like(number_mass, math.nan)
    return torch.where(poisoned, nan, number_mass), torch.where(poisoned, nan, text_mass)


def centered(z: Tensor) -> Tensor:
    """``z - max_k z_k`` per row (the max detached; 0 where it is not finite).

    Every loss here is invariant under adding a constant to a row; working on centered logits
    keeps it so in floating point, where ``z - LSE_V`` with a rounded ``LSE_V`` of large magnitude
    (logits near ±1e4) would not be. An all ``-inf`` row stays ``-inf``; an ``inf``/NaN row stays
    non-finite.
    """
    row_max = z.detach().amax(dim=-1, keepdim=True)
    return z - torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))


def only_rows(z: Tensor, rows: Tensor) -> Tensor:
    """``z`` on the selected rows, 0 elsewhere: a row that does not count gets exactly a zero
    gradient, whatever its logits (``0 * NaN`` would be NaN)."""
    return torch.where(rows[:, None], z, torch.zeros_like(z))


def _per_position_ntl(
    z: Tensor, number_index: Tensor, table: NumberTokenTable, config: LossConfig,
) -> Tensor:
    """NTL of every row as if its label were the number token ``number_index`` (clamped)."""
    index = number_index.clamp_min(0)
    number_values = table.number_values.to(z.dtype)
    y = number_values[index]
    number_logits = z[:, table.number_ids]
    q = number_softmax(number_logits)
    if config.loss == "was":
        distances = table.distance_matrix(config.squash_factor).to(z.dtype)[index]
        loss = wasserstein(q, distances)
    elif config.loss == "was_cdf":
        if config.gaussian_sigma is None:
            target = torch.nn.functional.one_hot(index, table.num_numbers).to(z.dtype)
        else:
            target = gaussian_targets(y, number_values, config.gaussian_sigma)
        loss = wasserstein_cdf(q, target, table)
    else:
        # ŷ - y as Σ q_j (v_j - y): the label's own term is exactly 0, so a prediction close to y
        # keeps its relative precision (ŷ - y from a rounded ŷ loses ~eps·|v| absolute)
        loss = regression_loss((q * (number_values[None, :] - y[:, None])).sum(-1), config.loss)
    if config.reweigh:
        number_mass, text_mass = number_and_text_mass(z, table.is_number)
        loss = reweigh_by_number_mass(
            loss, number_mass, text_mass, table.reweigh_constant(config.loss, config.squash_factor)
        )
    return loss


def ntl_rows(logits: Tensor, labels: Tensor, table: NumberTokenTable, config: LossConfig) -> Tensor:
    """Per-position NTL: ``(M,)``, 0 off the NTL-valid positions, NaN at bad labels."""
    _, bad, number_index = label_positions(labels, table, config.ignore_index)
    z = centered(only_rows(logits.to(torch.float64), number_index >= 0))
    loss = _per_position_ntl(z, number_index, table, config)
    loss = torch.where(number_index >= 0, loss, torch.zeros_like(loss))
    loss = torch.where(bad, torch.full_like(loss, float("nan")), loss)
    return loss.to(accumulation_dtype(logits.dtype))


def ce_ntl_rows(
    logits: Tensor, labels: Tensor, table: NumberTokenTable, config: LossConfig,
    inplace: bool = False,
) -> Tuple[Tensor, Tensor]:
    """Per-position cross-entropy (§2.6, or Gaussian-CE §2.5) and NTL, each ``(M,)``.

    ``inplace`` (the kernel backends' in-place backward) has no effect: autograd owns this backward.

    CE is 0 at ignored positions; NTL is 0 off the NTL-valid positions; both NaN at bad labels.
    """
    in_range, bad, number_index = label_positions(labels, table, config.ignore_index)
    z = centered(only_rows(logits.to(torch.float64), in_range))
    lse_vocab = torch.logsumexp(z, dim=-1)
    safe_labels = torch.where(in_range, labels, torch.zeros_like(labels)).long()
    ce = lse_vocab - z.gather(1, safe_labels[:, None]).squeeze(1)
    if config.gaussian_sigma is not None:
        number_values = table.number_values.to(z.dtype)
        y = number_values[number_index.clamp_min(0)]
        target = gaussian_targets(y, number_values, config.gaussian_sigma)
        gaussian_ce = lse_vocab - (target * z[:, table.number_ids]).sum(-1)
        ce = torch.where(number_index >= 0, gaussian_ce, ce)
    ce = torch.where(in_range, ce, torch.zeros_like(ce))
    # NTL on the NTL-valid rows only: a text label whose number logits are all -inf has no q
    z = only_rows(z, number_index >= 0)
    ntl = _per_position_ntl(z, number_index, table, config)
    ntl = torch.where(number_index >= 0, ntl, torch.zeros_like(ntl))
    nan = torch.full_like(ce, float("nan"))
    dtype = accumulation_dtype(logits.dtype)
    return torch.where(bad, nan, ce).to(dtype), torch.where(bad, nan, ntl).to(dtype)


# --------------------------------------------------------------------------------- backend interface
# The rest of the ntl_fast.backends.Backend contract; ce_ntl_loss_and_grad is the oracle of the
# kernel backends' one-pass loss and gradient.
def unsupported_reason(device) -> Optional[str]:
    """None: plain PyTorch serves every device."""
    return None


def fuses_loss_and_grad(logits: Tensor) -> bool:
    """False: the public API takes the two-pass autograd path with the reference."""
    return False


def ce_ntl_loss_and_grad(
    logits: Tensor, labels: Tensor, table: NumberTokenTable, config: LossConfig, ce_scale: Tensor,
    ntl_scale: Tensor, inplace: bool = False,
) -> Tuple[Tensor, Tensor, Tensor]:
    """:func:`ce_ntl_rows` and ``d(Σ ce_scale·ce + Σ ntl_scale·ntl)/d logits`` by autograd, detached.

    The gradient has the logits' dtype; ``inplace=True`` writes it over the logits and returns them.
    """
    with torch.enable_grad():
        z = logits.detach().requires_grad_()
        ce, ntl = ce_ntl_rows(z, labels, table, config)
        (grad,) = torch.autograd.grad((ce_scale * ce).sum() + (ntl_scale * ntl).sum(), z)
    if inplace:
        with torch.no_grad():
            grad = logits.copy_(grad)
    return ce.detach(), ntl.detach(), grad


def scale_gradient_(grad: Tensor, grad_output: Tensor) -> Tensor:
    """``grad *= grad_output`` in place (``grad_output`` a 0-d tensor on grad's device); returns ``grad``."""
    return grad.mul_(grad_output)


def _number_runs(number_index: Tensor, labels: Tensor, float_level: bool, dot_id: Optional[int]):
    """Yield ``(row, digit positions)`` for every number along the rows.

    A number is a maximal run of NTL-valid positions; with ``float_level`` a single ``.`` label
    between two digits joins the run but is no digit (docs/math.md §2.7).
    """
    is_digit = (number_index >= 0).tolist()
    is_dot = (labels == dot_id).tolist() if float_level and dot_id is not None else None
    for row, digits in enumerate(is_digit):
        length = len(digits)
        t = 0
        while t < length:
            if not digits[t]:
                t += 1
                continue
            run = [t]
            t += 1
            while t < length:
                if digits[t]:
                    run.append(t)
                    t += 1
                elif (is_dot is not None and is_dot[row][t] and t + 1 < length
                      and digits[t + 1] and digits[t - 1]):
                    t += 1  # the dot joins the run, the digit after it follows
                else:
                    break
            yield row, run


def number_level_rows(
    logits: Tensor,
    labels: Tensor,
    table: NumberTokenTable,
    *,
    float_level: bool = False,
    dot_id: Optional[int] = None,
    max_number_length: int = 20,
    ignore_index: int = -100,
) -> Tuple[Tensor, Tensor]:
    """Number-level loss (§2.7) of ``(B, T, V)`` logits with ``(B, T)`` labels.

    Returns ``(loss, first_digit)``, both ``(B, T)``: the symmetric relative error
    ``|Ŷ - Y| / (|Ŷ| + |Y| + ε)`` of each number placed at its first digit (0 elsewhere), and the
    mask of those first digits. Always float32 (float64 for float64 logits).
    """
    dtype = accumulation_dtype(logits.dtype)
    batch, length = labels.shape
    flat_labels = labels.reshape(-1)
    _, bad, number_index = label_positions(flat_labels, table, ignore_index)
    number_index = number_index.view(batch, length)
    z = logits.to(dtype).reshape(batch * length, -1)
    number_values = table.number_values.to(dtype)
    q = number_softmax(z[:, table.number_ids])
    y_hat = expected_value(q, number_values).view(batch, length)
    y = number_values[number_index.clamp_min(0)]
    eps = torch.finfo(torch.float32).eps
    rows, firsts, values = [], [], []
    for row, digits in _number_runs(number_index, labels, float_level, dot_id):
        exponents = [min(len(digits) - 1 - r, max_number_length - 1) for r in range(len(digits))]
        scale = torch.tensor([10.0 ** e for e in exponents], dtype=dtype, device=logits.device)
        target = (y[row, digits] * scale).sum()
        prediction = (y_hat[row, digits] * scale).sum()
        values.append((prediction - target).abs() / (prediction.abs() + target.abs() + eps))
        rows.append(row)
        firsts.append(digits[0])
    # zeros that keep the graph, so an empty batch still has a gradient (and never y_hat * 0,
    # which is NaN where a position that is no digit has NaN logits)
    loss = torch.where(torch.zeros_like(y_hat, dtype=torch.bool), y_hat, torch.zeros_like(y_hat))
    first_digit = torch.zeros(batch, length, dtype=torch.bool, device=logits.device)
    if values:
        index = (torch.tensor(rows, device=logits.device), torch.tensor(firsts, device=logits.device))
        loss = loss.index_put(index, torch.stack(values))
        first_digit[index] = True
    loss = torch.where(bad.view(batch, length), torch.full_like(loss, float("nan")), loss)
    return loss, first_digit
