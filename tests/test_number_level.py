"""The vectorised number-level loss (docs/math.md §2.7) against the per-run reference loop and ntloss."""

import pytest
import torch

from ntl_fast import NumberTokenTable, number_level_loss, reference
from ntl_fast.number_level import number_level_rows
from helpers import assert_spec_close, digit_table

DOT = 3


def _digit_heavy_labels(batch, length, table, generator, ignore_fraction=0.1):
    """Long digit runs broken by text, dots and ignore_index (including inside numbers)."""
    digits = table.number_ids[torch.randint(0, 10, (batch, length), generator=generator)]
    text = torch.randint(17, table.vocab_size, (batch, length), generator=generator)
    draw = torch.rand(batch, length, generator=generator)
    labels = torch.where(draw < 0.65, digits, text)
    labels = torch.where((draw >= 0.65) & (draw < 0.8), torch.full_like(labels, DOT), labels)
    return torch.where(draw > 1 - ignore_fraction, torch.full_like(labels, -100), labels)


@pytest.mark.parametrize("float_level", [False, True])
@pytest.mark.parametrize("max_number_length", [20, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rows_match_reference_loop(float_level, max_number_length, dtype):
    table = digit_table(vocab_size=40, dot_id=DOT)
    generator = torch.Generator().manual_seed(7 + max_number_length + float_level)
    for trial in range(6):
        batch, length = 1 + trial % 3, [1, 2, 5, 17, 33, 64][trial]
        labels = _digit_heavy_labels(batch, length, table, generator)
        if trial == 3:  # runs touching both ends of the rows
            labels[:, :4] = table.number_ids[5]
            labels[:, -4:] = table.number_ids[9]
        logits = (3 * torch.randn(batch, length, 40, generator=generator, dtype=dtype)).requires_grad_()
        options = dict(float_level=float_level, dot_id=DOT, max_number_length=max_number_length)
        expected, expected_first = reference.number_level_rows(logits, labels, table, **options)
        actual, actual_first = number_level_rows(logits, labels, table, **options)
        assert torch.equal(actual_first, expected_first)
        assert_spec_close(actual, expected, dtype, what="loss")
        upstream = torch.rand(batch, length, generator=generator, dtype=dtype)
        (grad_expected,) = torch.autograd.grad((expected * upstream).sum(), logits)
        (grad_actual,) = torch.autograd.grad((actual * upstream).sum(), logits)
        assert_spec_close(grad_actual, grad_expected, dtype, gradient=True, what="grad")


def test_runs_are_segmented_as_specified():
    table = digit_table(vocab_size=20, first_id=10, dot_id=DOT)
    d = lambda digit: 10 + digit  # noqa: E731
    # "12.34 5 6.7.8 ?9": ignore_index (?) splits a number; float_level joins "6.7.8"
    labels = torch.tensor([[d(1), d(2), DOT, d(3), d(4), 0, d(5), 0, d(6), DOT, d(7), DOT,
                            d(8), -100, d(9)]])
    logits = torch.zeros(1, labels.shape[1], 20)
    _, first = number_level_rows(logits, labels, table, float_level=False, dot_id=DOT)
    assert first[0].nonzero().flatten().tolist() == [0, 3, 6, 8, 10, 12, 14]
    _, first = number_level_rows(logits, labels, table, float_level=True, dot_id=DOT)
    assert first[0].nonzero().flatten().tolist() == [0, 6, 8, 14]


def test_exact_prediction_scores_zero_and_exponent_clamp():
    table = digit_table(vocab_size=20, first_id=10)
    labels = torch.tensor([[10 + 4, 10 + 0, 10 + 2, 0]])
    logits = torch.full((1, 4, 20), -1e4)
    logits[0, torch.arange(4), labels[0].clamp_max(19)] = 1e4
    loss, _ = number_level_rows(logits, labels, table)
    assert loss.abs().max() == 0
    # with max_number_length=2 the exponents are clamped to 1: 4*10 + 0*10 + 2*1 both sides
    loss, _ = number_level_rows(logits, labels, table, max_number_length=2)
    assert loss.abs().max() == 0


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_public_api_matches_reference(reduction):
    table = digit_table(vocab_size=40, dot_id=DOT)
    generator = torch.Generator().manual_seed(3)
    labels = _digit_heavy_labels(3, 29, table, generator)
    weights = torch.rand(3, 29, generator=generator)
    logits = torch.randn(3, 29, 40, generator=generator, requires_grad=True)
    actual = number_level_loss(logits, labels, table, float_level=True, weights=weights,
                               reduction=reduction, shift_labels=True)
    rows, first = reference.number_level_rows(logits[:, :-1], labels[:, 1:], table, float_level=True,
                                              dot_id=DOT)
    weighted = rows * weights[:, 1:]
    if reduction == "none":
        expected = weighted
    elif reduction == "sum":
        expected = weighted.sum()
    else:
        expected = weighted.sum() / (weights[:, 1:] * first).sum()
    assert_spec_close(actual, expected, torch.float32, what="loss")
    (grad_actual,) = torch.autograd.grad(actual.sum(), logits)
    (grad_expected,) = torch.autograd.grad(expected.sum(), logits)
    assert_spec_close(grad_actual, grad_expected, torch.float32, gradient=True, what="grad")


def test_no_number_gives_zero_with_gradient():
    table = digit_table(vocab_size=40)
    logits = torch.randn(2, 5, 40, requires_grad=True)
    labels = torch.full((2, 5), 30)
    loss = number_level_loss(logits, labels, table)
    assert loss.item() == 0 and loss.grad_fn is not None
    loss.backward()
    assert logits.grad.abs().max() == 0


def _word_level_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<unk>", ".", "the", "sum", "is", "x", "+", "="] + [str(d) for d in range(10)]
    words += [f"w{i}" for i in range(13)]
    vocab = {word: index for index, word in enumerate(words)}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>", unk_token="<unk>")


@pytest.mark.parametrize("float_level", [False, True])
def test_parity_with_ntloss_number_level_loss(float_level):
    ntloss = pytest.importorskip("ntloss")
    tokenizer = _word_level_tokenizer()
    vocab_size = len(tokenizer) + 10  # a padded LM head
    table = NumberTokenTable.from_tokenizer(tokenizer, vocab_size=vocab_size)
    theirs = ntloss.NumberLevelLoss(tokenizer, vocab_size=vocab_size, float_level=float_level,
                                    reweigh=False)
    generator = torch.Generator().manual_seed(11 + float_level)
    digits = table.number_ids[torch.randint(0, 10, (4, 40), generator=generator)]
    text = torch.randint(0, len(tokenizer), (4, 40), generator=generator)
    draw = torch.rand(4, 40, generator=generator)
    labels = torch.where(draw < 0.6, digits, text)
    labels = torch.where(draw > 0.92, torch.full_like(labels, -100), labels)
    logits = torch.randn(4, 40, vocab_size, generator=generator, requires_grad=True)
    ours = number_level_loss(logits, labels, table, float_level=float_level)
    expected = theirs(logits, labels)
    assert_spec_close(ours, expected, torch.float32, what="loss")
    (grad_ours,) = torch.autograd.grad(ours, logits)
    (grad_theirs,) = torch.autograd.grad(expected, logits)
    assert_spec_close(grad_ours, grad_theirs, torch.float32, gradient=True, what="grad")
