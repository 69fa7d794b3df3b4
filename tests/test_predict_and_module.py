"""ntl_fast.predict_numbers and the LinearCrossEntropyWithNTL module."""

import pytest
import torch

import ntl_fast
from helpers import assert_spec_close, digit_table, irregular_table, random_labels
from test_table import DIGITS, TEXT, make_tokenizer


# ------------------------------------------------------------------ predict_numbers
@pytest.mark.parametrize("make_table", [digit_table, irregular_table], ids=["digits", "irregular"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_predict_numbers_is_the_expected_value_and_the_number_mass(make_table, dtype):
    table = make_table()
    generator = torch.Generator().manual_seed(1)
    logits = (4 * torch.randn(2, 5, table.vocab_size + 3, generator=generator)).to(dtype)
    prediction = ntl_fast.predict_numbers(logits, table)
    assert prediction.expected_value.shape == (2, 5) and prediction.number_mass.shape == (2, 5)
    assert prediction.expected_value.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    # written out from the definitions of docs/math.md §2, in float64
    z = logits.double()
    q = torch.softmax(z[..., table.number_ids], dim=-1)
    expected = (q * table.number_values.double()).sum(-1)
    mass = torch.softmax(z, dim=-1)[..., table.number_ids].sum(-1)
    assert_spec_close(prediction.expected_value, expected, torch.float32, what="expected value")
    assert_spec_close(prediction.number_mass, mass, torch.float32, what="number mass")


def test_predict_numbers_certain_prediction_and_masked_text():
    table = digit_table(vocab_size=20, first_id=3)
    logits = torch.full((1, 20), -float("inf"))
    logits[0, 3 + 7] = 0.0  # all mass on the digit 7
    prediction = ntl_fast.predict_numbers(logits, table)
    assert prediction.expected_value.item() == pytest.approx(7.0)
    assert prediction.number_mass.item() == pytest.approx(1.0)
    text = torch.zeros(1, 20)
    text[0, 0] = 50.0  # nearly all mass on a text token: a tiny but accurate mass
    tiny = ntl_fast.predict_numbers(text, table).number_mass.item()
    assert tiny == pytest.approx(10 * torch.exp(torch.tensor(-50.0, dtype=torch.float64)).item(), rel=1e-4)


def test_predict_numbers_has_a_gradient():
    table = digit_table()
    logits = torch.randn(3, table.vocab_size, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda x: ntl_fast.predict_numbers(x, table).expected_value, (logits,))
    torch.autograd.gradcheck(lambda x: ntl_fast.predict_numbers(x, table).number_mass, (logits,))


def test_predict_numbers_bad_input_is_named():
    table = digit_table(vocab_size=40)
    with pytest.raises(ValueError, match="columns"):
        ntl_fast.predict_numbers(torch.randn(2, 30), table)
    with pytest.raises(TypeError, match="logits"):
        ntl_fast.predict_numbers(torch.zeros(2, 40, dtype=torch.int64), table)
    with pytest.raises(TypeError, match="table"):
        ntl_fast.predict_numbers(torch.randn(2, 40), None)


# ------------------------------------------------------------------ LinearCrossEntropyWithNTL
@pytest.mark.parametrize("options", [dict(), dict(loss="mse", reweigh=True, reduction="sum"),
                                     dict(shift_labels=True, ntl_weight=1.0, chunk_size=5)],
                         ids=["default", "mse-reweigh-sum", "shift-chunked"])
def test_linear_module_equals_the_function(options):
    table = digit_table(vocab_size=40)
    generator = torch.Generator().manual_seed(2)
    hidden = torch.randn(2, 9, 16, generator=generator, requires_grad=True)
    head = torch.nn.Linear(16, 43)
    labels = random_labels((2, 9), table, generator=generator)
    module = ntl_fast.LinearCrossEntropyWithNTL(table=table, **options)
    out = module(hidden, head.weight, labels, bias=head.bias)
    expected = ntl_fast.linear_cross_entropy_with_ntl(hidden, head.weight, labels, table, bias=head.bias,
                                                      **options)
    for name in ("loss", "ce", "ntl"):
        assert_spec_close(getattr(out, name), getattr(expected, name), torch.float32, what=name)
    # and the function is CE + NTL of the materialised logits
    function_options = {k: v for k, v in options.items() if k != "chunk_size"}
    materialised = ntl_fast.cross_entropy_with_ntl(head(hidden), labels, table, **function_options)
    assert_spec_close(out.loss, materialised.loss, torch.float32, what="vs materialised logits")
    grads = torch.autograd.grad(out.loss, [hidden, head.weight, head.bias])
    wanted = torch.autograd.grad(materialised.loss, [hidden, head.weight, head.bias])
    for name, actual, reference in zip(("hidden", "weight", "bias"), grads, wanted):
        assert_spec_close(actual, reference, torch.float32, gradient=True, what=f"grad {name}")


def test_linear_module_from_a_tokenizer_with_a_padded_head():
    tokenizer = make_tokenizer(TEXT + DIGITS)
    module = ntl_fast.LinearCrossEntropyWithNTL(tokenizer, vocab_size=len(tokenizer) + 6)
    assert module.table.vocab_size == len(tokenizer) + 6
    assert "ntl_weight=0.3" in repr(module)
    hidden = torch.randn(4, 8)
    labels = torch.tensor([tokenizer.convert_tokens_to_ids("7"), 2, -100, tokenizer.convert_tokens_to_ids("0")])
    out = module(hidden, torch.randn(len(tokenizer) + 6, 8), labels)
    assert torch.isfinite(out.loss).item() and out.ntl.item() > 0


def test_linear_module_rejects_bad_options_at_construction():
    table = digit_table()
    with pytest.raises(ValueError, match="pass exactly one"):
        ntl_fast.LinearCrossEntropyWithNTL()
    with pytest.raises(ValueError, match="loss must be one of"):
        ntl_fast.LinearCrossEntropyWithNTL(table=table, loss="l2")
    with pytest.raises(ValueError, match="chunk_size"):
        ntl_fast.LinearCrossEntropyWithNTL(table=table, chunk_size=0)
