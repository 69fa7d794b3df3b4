"""Decisions of docs/math.md §4 and §6 that the fuzzer found open, each pinned by a test.

- Gradients stored in float16/bfloat16 are one rounding of the exact value: relative for normal
  numbers, absolute (half the smallest subnormal) at the bottom of the range.
- A number token masked at -finfo.max is a finite logit: Gaussian-CE, which weighs its
  log-probability, is then finite and huge, where a -inf mask gives +inf.
- A reweighed gradient (§2.4) is the sum of two terms, ∇(mL) and -c∇m, that can cancel to a result
  ~1e4 times smaller (MSE on values 0-999: c ≈ 1e6). From float32, bfloat16 or float16 logits it is
  accurate relative to those terms, its condition, and is judged on the scale
  max(max|b|, max|∇(mL)|, max|c∇m|); from float64 logits on the plain max|b|.
- A float16 gradient whose exact value lies beyond float16's largest value (65504) rounds to the
  infinity of its sign (reweighed MSE on values 0-999 gets there).
"""

import math

import pytest
import torch

import ntl_fast
from ntl_fast import NumberTokenTable, backends

from helpers import (
    assert_spec_close, digit_table, half_subnormal, random_labels, reweighed_scale, tolerances,
    without_reweigh_constant,
)

KERNEL_BACKENDS = ["reference", "cpp", "triton"]


def _backend_or_skip(name: str) -> str:
    try:
        backends.explain_backend("cpu", name)
    except RuntimeError as error:
        pytest.skip(f"backend {name!r} unavailable here: {error}")
    return name


def _tiny_gradients(backend: str, dtype: torch.dtype):
    """CE + NTL whose mean divides by a large normaliser: every gradient is below float16's
    smallest normal (6.1e-5), so the stored gradient is a subnormal."""
    generator = torch.Generator().manual_seed(0)
    table = digit_table(vocab_size=40)
    logits = (3 * torch.randn(8, 40, generator=generator)).to(dtype)
    labels = random_labels((8,), table, generator=generator)
    kwargs = dict(ce_normalizer=3e6, ntl_normalizer=3e6)
    got = logits.clone().requires_grad_()
    ntl_fast.cross_entropy_with_ntl(got, labels, table, backend=backend, **kwargs).loss.backward()
    exact = logits.double().requires_grad_()
    ntl_fast.cross_entropy_with_ntl(exact, labels, table, backend="reference", **kwargs).loss.backward()
    return got.grad, exact.grad


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_float16_gradients_at_the_bottom_of_the_range_are_one_rounding_away(backend):
    gradient, exact = _tiny_gradients(_backend_or_skip(backend), torch.float16)
    assert exact.abs().max() < torch.finfo(torch.float16).smallest_normal  # the case is what it claims
    assert_spec_close(gradient, exact, torch.float16, gradient=True, what=backend)
    # the absolute term is what one rounding costs here: the exact values rounded to float16 (the
    # best any backend can store) already miss by more than the relative term alone allows
    rounded = exact.to(torch.float16).double()
    rtol, atol = tolerances(torch.float16, gradient=True)
    assert atol == half_subnormal(torch.float16) == 2.0**-25
    assert (rounded - exact).abs().max() > rtol * exact.abs().max()
    assert (rounded - exact).abs().max() <= atol


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gaussian_ce_under_a_finfo_max_mask_is_the_finite_formula_value(backend, dtype):
    backend = _backend_or_skip(backend)
    table = digit_table(vocab_size=40)
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 40, generator=generator).to(dtype)
    labels = table.number_ids[torch.tensor([2, 5, 7])]
    masked = table.number_ids[:4]  # number tokens 0-3: each carries Gaussian target mass
    for row in range(3):
        logits[row, masked] = -torch.finfo(dtype).max
        logits[row, labels[row]] = 1.0  # the label stays finite
    kwargs = dict(gaussian_sigma=1.0, reduction="none")
    out = ntl_fast.cross_entropy_with_ntl(logits, labels, table, backend=backend, **kwargs)
    exact = ntl_fast.cross_entropy_with_ntl(logits.double(), labels, table, backend="reference", **kwargs)
    assert torch.isfinite(out.ce).all() and (out.ce > 1e30).all()
    assert_spec_close(out.ce, exact.ce, dtype, what="ce")
    assert_spec_close(out.ntl, exact.ntl, dtype, what="ntl")
    # the same mask written as -inf: +inf, as the formula says
    infinite = ntl_fast.cross_entropy_with_ntl(
        logits.masked_fill(logits == -torch.finfo(dtype).max, -math.inf), labels, table, backend=backend, **kwargs
    )
    assert torch.isposinf(infinite.ce).all()
    assert_spec_close(infinite.ntl, exact.ntl, dtype, what="ntl under -inf")


def _cancelling_reweighed_mse():
    """MSE reweighed on values 0-999 at ids 0-999 (c = 1.01·999² ≈ 1e6) and 3,000 text tokens; one
    row labelled 0. Most number mass sits on 999, a little is spread thin over 0-899, and the text
    logits sit at the level (found by bisection in float64) where the two terms of ∂L'/∂z_999
    cancel: every element of the gradient is then ~1e4 times smaller than those terms."""
    numbers, text = 1000, 3000
    table = NumberTokenTable.from_values({i: float(i) for i in range(numbers)}, vocab_size=numbers + text)
    logits = torch.full((1, numbers + text), -10.0)
    logits[0, 900:999] = -40.0
    logits[0, 999] = 0.0
    logits[0, numbers:] = -6.5708010383286695
    return logits, torch.tensor([0]), table


def _reweighed_mse_gradient(logits, labels, table, backend="reference"):
    leaf = logits.clone().requires_grad_()
    ntl_fast.number_token_loss(leaf, labels, table, loss="mse", reweigh=True, reduction="sum",
                               backend=backend).backward()
    return leaf.grad


def _the_two_terms(logits, labels, table):
    """∇L' and ∇(mL) in float64 (the reference with c = 0), and the scale of docs/math.md §6."""
    exact = _reweighed_mse_gradient(logits.double(), labels, table)
    with without_reweigh_constant(table):
        mass = _reweighed_mse_gradient(logits.double(), labels, table)
    scale = reweighed_scale(exact, mass)
    # the case is what it claims: the terms are >= 1e3 times the result
    assert scale >= 1e3 * exact.abs().max().item()
    return exact, mass, scale


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_a_reweighed_gradient_is_accurate_relative_to_its_two_terms(backend):
    backend = _backend_or_skip(backend)
    logits, labels, table = _cancelling_reweighed_mse()
    exact, _, scale = _the_two_terms(logits, labels, table)
    gradient = _reweighed_mse_gradient(logits, labels, table, backend)
    assert gradient.dtype == torch.float32
    assert_spec_close(gradient, exact, torch.float32, gradient=True, what=f"{backend} float32", scale=scale)
    # float64 logits are accumulated in float64 (reference, C++ and Triton alike): the plain bound
    exact64 = _reweighed_mse_gradient(logits.double(), labels, table, backend)
    assert exact64.dtype == torch.float64
    assert_spec_close(exact64, exact, torch.float64, gradient=True, what=f"{backend} float64")


@pytest.mark.parametrize("evaluation", ["float32 formula", "cpp"])
def test_the_plain_float32_bound_is_out_of_reach_for_a_reweighed_gradient(evaluation):
    """Why the scale includes the terms: with each ingredient of §2.4's formula rounded once to
    float32, ``m ∂L/∂z + (L - c) ∂m/∂z`` evaluated in float32 misses rtol·max|b| tenfold, and so does
    the C++ backend; both stay within rtol·(the terms)."""
    logits, labels, table = _cancelling_reweighed_mse()
    exact, mass, scale = _the_two_terms(logits, labels, table)
    if evaluation == "cpp":
        gradient = _reweighed_mse_gradient(logits, labels, table, _backend_or_skip("cpp"))
    else:
        z = logits.double()
        p = torch.softmax(z, dim=-1)
        is_number = table.is_number.to(torch.float64)
        m = (p * is_number).sum()
        grad_m = p * (is_number - m)  # ∂m/∂z
        with without_reweigh_constant(table):  # m L
            loss = ntl_fast.number_token_loss(z, labels, table, loss="mse", reweigh=True, reduction="sum") / m
        m_grad_loss = mass - loss * grad_m  # ∇(mL) - L ∇m
        constant = torch.tensor(table.reweigh_constant("mse"), dtype=torch.float32)
        gradient = m_grad_loss.float() + (loss.float() - constant) * grad_m.float()
    rtol, atol = tolerances(torch.float32, gradient=True)
    error = (gradient.double() - exact).abs().max().item()
    assert error > 10 * (rtol * exact.abs().max().item() + atol)
    assert_spec_close(gradient, exact, torch.float32, gradient=True, what=evaluation, scale=scale)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_a_float16_gradient_beyond_65504_is_the_infinity_of_its_sign(backend):
    """Reweighed MSE on values 0-999 (c ≈ 1e6), the mass shared by the label 500 and one text token:
    their exact gradients, ±c/4 ≈ ±2.5e5, lie beyond float16's range; ±inf is their rounding."""
    backend = _backend_or_skip(backend)
    numbers = 1000
    table = NumberTokenTable.from_values({i: float(i) for i in range(numbers)}, vocab_size=numbers + 8)
    logits = torch.full((1, numbers + 8), -30.0)
    logits[0, 500] = 0.0
    logits[0, numbers] = 0.0  # one text token as likely as the number 500
    logits, labels = logits.half(), torch.tensor([500])
    exact = _reweighed_mse_gradient(logits.double(), labels, table)
    gradient = _reweighed_mse_gradient(logits, labels, table, backend)
    beyond = exact.abs() > torch.finfo(torch.float16).max
    assert beyond.sum() == 2 and (exact[beyond].abs() > 2e5).all()  # the case is what it claims
    assert torch.isinf(gradient[beyond]).all() and torch.equal(gradient[beyond].sign(), exact[beyond].sign().half())
    with without_reweigh_constant(table):
        mass = _reweighed_mse_gradient(logits.double(), labels, table)
    assert_spec_close(gradient[~beyond], exact[~beyond], torch.float16, gradient=True, what=backend,
                      scale=reweighed_scale(exact[~beyond], mass[~beyond]))
