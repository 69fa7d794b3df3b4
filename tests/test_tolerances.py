"""Decisions of docs/math.md §4 and §6 that the fuzzer found open, each pinned by a test.

- Gradients stored in float16/bfloat16 are one rounding of the exact value: relative for normal
  numbers, absolute (half the smallest subnormal) at the bottom of the range.
- A number token masked at -finfo.max is a finite logit: Gaussian-CE, which weighs its
  log-probability, is then finite and huge, where a -inf mask gives +inf.
"""

import math

import pytest
import torch

import ntl_fast
from ntl_fast import backends

from helpers import assert_spec_close, digit_table, half_subnormal, random_labels, tolerances

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
