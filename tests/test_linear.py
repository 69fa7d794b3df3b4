"""linear_cross_entropy_with_ntl against cross_entropy_with_ntl on the materialised logits."""

import pytest
import torch

from ntl_fast import cross_entropy_with_ntl
from ntl_fast.linear import default_chunk_size, linear_cross_entropy_with_ntl
from helpers import assert_spec_close, digit_table, irregular_table, random_labels

CASES = [
    dict(),
    dict(reduction="sum"),
    dict(reduction="none"),
    dict(loss="mse", reweigh=True),
    dict(loss="was", squash_factor=3.0, shift_labels=True),
    dict(loss="was_cdf", gaussian_sigma=1.0),
    dict(loss="huber", ce_normalizer=37.0, ntl_normalizer=torch.tensor(11.0)),
    dict(weights=True, ignore_index=-1),
    dict(weights=True, reduction="none", shift_labels=True, ntl_weight=2.0),
]


def _inputs(dtype, table, batch=3, length=21, hidden_size=24, bias=True, ignore_index=-100, seed=0):
    generator = torch.Generator().manual_seed(seed)
    vocab_size = table.vocab_size + 5  # a padded head: more rows than the tokenizer has ids
    hidden = torch.randn(batch, length, hidden_size, generator=generator).to(dtype).requires_grad_()
    weight = (torch.randn(vocab_size, hidden_size, generator=generator) / 2).to(dtype).requires_grad_()
    bias_tensor = torch.randn(vocab_size, generator=generator).to(dtype).requires_grad_() if bias else None
    labels = random_labels((batch, length), table, ignore_index=ignore_index, generator=generator)
    weights = torch.rand(batch, length, generator=generator)
    return hidden, weight, bias_tensor, labels, weights


def _compare(case, dtype, table, chunk_size, bias=True):
    options = dict(case)
    ignore_index = options.get("ignore_index", -100)
    hidden, weight, bias_tensor, labels, weights = _inputs(dtype, table, bias=bias, ignore_index=ignore_index)
    if options.pop("weights", False):
        options["weights"] = weights
    params = [hidden, weight] + ([bias_tensor] if bias else [])

    fused = linear_cross_entropy_with_ntl(hidden, weight, labels, table, bias=bias_tensor,
                                          chunk_size=chunk_size, backend="reference", **options)
    logits = torch.nn.functional.linear(hidden, weight, bias_tensor)
    expected = cross_entropy_with_ntl(logits, labels, table, backend="reference", **options)
    for name in ("loss", "ce", "ntl"):
        assert_spec_close(getattr(fused, name), getattr(expected, name), torch.float32, what=name)
    assert fused.ce.grad_fn is None and fused.ntl.grad_fn is None
    upstream = torch.rand(fused.loss.shape, generator=torch.Generator().manual_seed(5))
    grads = torch.autograd.grad((fused.loss * upstream).sum(), params)
    expected_grads = torch.autograd.grad((expected.loss * upstream).sum(), params)
    for name, actual, wanted in zip(("hidden", "weight", "bias"), grads, expected_grads):
        assert actual.dtype == wanted.dtype
        assert_spec_close(actual, wanted, dtype, gradient=True, what=f"grad {name}")


@pytest.mark.parametrize("case", CASES, ids=lambda case: ",".join(f"{k}" for k in case) or "default")
@pytest.mark.parametrize("chunk_size", [7, 64])
def test_matches_materialised_logits_fp32(case, chunk_size):
    _compare(case, torch.float32, digit_table(vocab_size=40), chunk_size)


@pytest.mark.parametrize("case", [dict(), dict(reduction="none", loss="mse", reweigh=True)])
def test_irregular_table_no_bias(case):
    _compare(case, torch.float32, irregular_table(), chunk_size=10, bias=False)


@pytest.mark.parametrize("case", [dict(), dict(reduction="none"), dict(loss="was_cdf", shift_labels=True)])
def test_matches_materialised_logits_bf16(case):
    _compare(case, torch.bfloat16, digit_table(vocab_size=40), chunk_size=16)


def test_frozen_head_and_no_grad():
    table = digit_table(vocab_size=40)
    hidden, weight, _, labels, _ = _inputs(torch.float32, table, bias=False)
    weight.requires_grad_(False)
    out = linear_cross_entropy_with_ntl(hidden, weight, labels, table, chunk_size=8, backend="reference")
    (grad,) = torch.autograd.grad(out.loss, hidden)
    expected = cross_entropy_with_ntl(hidden @ weight.T, labels, table, backend="reference")
    (wanted,) = torch.autograd.grad(expected.loss, hidden)
    assert_spec_close(grad, wanted, torch.float32, gradient=True)
    with torch.no_grad():
        out = linear_cross_entropy_with_ntl(hidden, weight, labels, table, backend="reference")
    assert out.loss.grad_fn is None
    assert_spec_close(out.loss, expected.loss, torch.float32)


def test_autocast_bf16_casts_like_linear():
    table = digit_table(vocab_size=40)
    hidden, weight, bias, labels, _ = _inputs(torch.float32, table)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = linear_cross_entropy_with_ntl(hidden, weight, labels, table, bias=bias, backend="reference")
        expected = cross_entropy_with_ntl(torch.nn.functional.linear(hidden, weight, bias), labels, table,
                                          backend="reference")
    assert_spec_close(out.loss, expected.loss, torch.bfloat16)
    grads = torch.autograd.grad(out.loss, [hidden, weight, bias])
    wanted = torch.autograd.grad(expected.loss, [hidden, weight, bias])
    for actual, reference_grad in zip(grads, wanted):
        assert actual.dtype == torch.float32
        assert_spec_close(actual, reference_grad, torch.bfloat16, gradient=True)


def test_empty_mean_is_zero_with_gradient():
    table = digit_table(vocab_size=40)
    hidden, weight, _, labels, _ = _inputs(torch.float32, table, bias=False)
    labels = torch.full_like(labels, -100)
    out = linear_cross_entropy_with_ntl(hidden, weight, labels, table, backend="reference")
    assert out.loss.item() == 0 and out.loss.grad_fn is not None
    out.loss.backward()
    assert hidden.grad.abs().max() == 0 and weight.grad.abs().max() == 0


def test_bad_inputs_are_named():
    table = digit_table(vocab_size=40)
    hidden, weight, _, labels, _ = _inputs(torch.float32, table, bias=False)
    with pytest.raises(ValueError, match="weight must be"):
        linear_cross_entropy_with_ntl(hidden, weight[:, :5], labels, table)
    with pytest.raises(TypeError, match="weight is"):
        linear_cross_entropy_with_ntl(hidden, weight.double(), labels, table)
    with pytest.raises(ValueError, match="labels must"):
        linear_cross_entropy_with_ntl(hidden, weight, labels[:, :3], table)
    with pytest.raises(ValueError, match="found 999"):
        linear_cross_entropy_with_ntl(hidden, weight, torch.full_like(labels, 999), table)
    with pytest.raises(ValueError, match="chunk_size"):
        linear_cross_entropy_with_ntl(hidden, weight, labels, table, chunk_size=0)


def test_default_chunk_size_bounds_chunk_logits():
    assert default_chunk_size(4096, 32128) * 32128 * 4 <= 64 << 20
    assert default_chunk_size(10, 32128) == 10
    assert default_chunk_size(10**6, 10**7) == 1


def _kernel_backend(name):
    from ntl_fast import explain_backend

    try:
        explain_backend("cpu", name)
    except RuntimeError as error:
        pytest.skip(str(error))
    return name


@pytest.mark.parametrize("name", ["cpp", "triton"])
@pytest.mark.parametrize("case", [dict(), dict(reduction="none", loss="mse", reweigh=True),
                                  dict(loss="was_cdf", gaussian_sigma=1.0, shift_labels=True)])
def test_kernel_backends_serve_the_chunks(name, case):
    backend = _kernel_backend(name)
    table = digit_table(vocab_size=40)
    hidden, weight, bias, labels, _ = _inputs(torch.float32, table)
    fused = linear_cross_entropy_with_ntl(hidden, weight, labels, table, bias=bias, chunk_size=16,
                                          backend=backend, **case)
    expected = cross_entropy_with_ntl(torch.nn.functional.linear(hidden, weight, bias), labels, table,
                                      backend="reference", **case)
    assert_spec_close(fused.loss, expected.loss, torch.float32)
    grads = torch.autograd.grad(fused.loss.sum(), [hidden, weight, bias])
    wanted = torch.autograd.grad(expected.loss.sum(), [hidden, weight, bias])
    for actual, reference_grad in zip(grads, wanted):
        assert_spec_close(actual, reference_grad, torch.float32, gradient=True)


def test_second_backward_is_refused_not_wrong():
    table = digit_table(vocab_size=40)
    hidden, weight, _, labels, _ = _inputs(torch.float32, table, bias=False)
    out = linear_cross_entropy_with_ntl(hidden, weight, labels, table, backend="reference")
    out.loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="twice"):
        out.loss.backward()
