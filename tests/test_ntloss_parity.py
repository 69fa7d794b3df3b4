"""The formulas are the authors': where `ntloss` 0.3.x defines a variant, ntl_fast gives its numbers."""

import pytest
import torch
import torch.nn.functional as F

import ntl_fast
from helpers import assert_spec_close
from test_table import DIGITS, TEXT, make_tokenizer

ntloss = pytest.importorskip("ntloss",
                             reason="the authors' ntloss package is a test dependency (pip install ntloss==0.3.2)")

VOCABULARIES = {
    "digits": TEXT + DIGITS + ["12", "\u25815"],
    "shuffled": ["7", "[PAD]", "3", "[UNK]", "0", "the", "9", "1", "sum", "4", "8", ".", "2", "6", "5", "=", "+"],
}


def batch(tokenizer, table, dtype=torch.float64, shape=(3, 11)):
    torch.manual_seed(7)
    logits = (3 * torch.randn(*shape, len(tokenizer))).to(dtype).requires_grad_()
    numbers = table.number_ids[torch.randint(0, table.num_numbers, shape)]
    other = torch.randint(0, len(tokenizer), shape)
    labels = torch.where(torch.rand(shape) < 0.6, numbers, other)
    labels[0, :2] = -100
    weights = torch.rand(shape, dtype=dtype)
    return logits, labels, weights


def compare(theirs, ours, logits):
    """Losses and gradients within docs/math.md §6's float32 rule, per tensor (both packages keep
    their value and distance tables in float32, so float64 logits agree to that precision)."""
    assert_spec_close(ours, theirs, torch.float32, what="loss")
    if theirs.dim() > 0:
        theirs, ours = theirs.sum(), ours.sum()
    (grad_theirs,) = torch.autograd.grad(theirs, logits)
    (grad_ours,) = torch.autograd.grad(ours, logits)
    assert_spec_close(grad_ours, grad_theirs, torch.float32, what="gradient")


@pytest.mark.parametrize("vocabulary", sorted(VOCABULARIES))
@pytest.mark.parametrize("reweigh", [False, True])
@pytest.mark.parametrize("squash_factor", [None, 3.0])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weighted", [False, True])
def test_wasserstein_matches_ntloss(vocabulary, reweigh, squash_factor, reduction, weighted):
    tokenizer = make_tokenizer(VOCABULARIES[vocabulary])
    table = ntl_fast.NumberTokenTable.from_tokenizer(tokenizer)
    theirs_loss = ntloss.NTLoss(tokenizer, reweigh=reweigh, squash_factor=squash_factor)
    logits, labels, weights = batch(tokenizer, table)
    weights = weights if weighted else None
    theirs = theirs_loss(logits, labels, loss_weights=weights, reduction=reduction)
    ours = ntl_fast.number_token_loss(
        logits, labels, table, loss="was", squash_factor=squash_factor, reweigh=reweigh,
        reduction=reduction, weights=weights,
    )
    compare(theirs, ours, logits)


@pytest.mark.parametrize("loss,function", [
    ("mse", F.mse_loss), ("mae", F.l1_loss), ("huber", F.huber_loss),
])
@pytest.mark.parametrize("reweigh", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_dot_product_losses_match_ntloss(loss, function, reweigh, reduction):
    tokenizer = make_tokenizer(VOCABULARIES["shuffled"])
    table = ntl_fast.NumberTokenTable.from_tokenizer(tokenizer)
    theirs_loss = ntloss.NTLossDotProduct(tokenizer, reweigh=reweigh, loss_function=function)
    # ntloss's huber backward fails on float64 logits (its float32 targets meet float64 predictions)
    dtype = torch.float32 if loss == "huber" else torch.float64
    logits, labels, weights = batch(tokenizer, table, dtype=dtype)
    theirs = theirs_loss(logits, labels, loss_weights=weights, reduction=reduction)
    ours = ntl_fast.number_token_loss(
        logits, labels, table, loss=loss, reweigh=reweigh, reduction=reduction, weights=weights
    )
    compare(theirs, ours, logits)


def test_float32_logits_match_ntloss():
    tokenizer = make_tokenizer(VOCABULARIES["digits"])
    table = ntl_fast.NumberTokenTable.from_tokenizer(tokenizer)
    logits, labels, _ = batch(tokenizer, table, dtype=torch.float32)
    theirs = ntloss.NTLoss(tokenizer, reweigh=False)(logits, labels)
    ours = ntl_fast.number_token_loss(logits, labels, table)
    assert_spec_close(ours, theirs, torch.float32, what="float32 loss")


def test_multi_digit_tables_match_ntloss():
    tokenizer = make_tokenizer(TEXT + DIGITS + ["12", "25", "100", "7.5"])
    table = ntl_fast.NumberTokenTable.from_tokenizer(tokenizer, digit_level=False)
    theirs_loss = ntloss.NTLoss(tokenizer, digit_level=False, reweigh=False, squash_factor=4.0)
    torch.testing.assert_close(theirs_loss.number_values, table.values, equal_nan=True)
    logits, labels, _ = batch(tokenizer, table)
    compare(theirs_loss(logits, labels), ntl_fast.number_token_loss(logits, labels, table, squash_factor=4.0), logits)


@pytest.mark.parametrize("float_level", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_number_level_loss_matches_ntloss(float_level, reduction):
    tokenizer = make_tokenizer(VOCABULARIES["digits"])
    table = ntl_fast.NumberTokenTable.from_tokenizer(tokenizer)
    theirs_loss = ntloss.NumberLevelLoss(tokenizer, float_level=float_level, reweigh=False)
    torch.manual_seed(3)
    logits = torch.randn(4, 12, len(tokenizer), dtype=torch.float64, requires_grad=True)
    digit_ids = table.number_ids
    labels = digit_ids[torch.randint(0, 10, (4, 12))]
    dot = tokenizer.convert_tokens_to_ids(".")
    labels[0, 3] = dot          # 3 digits . 8 digits
    labels[1, 5:7] = dot        # two dots: never joins
    labels[2, 0] = dot          # a dot at the start
    labels[2, 6] = -100
    labels[3, 4] = tokenizer.convert_tokens_to_ids("the")
    weights = torch.rand(4, 12, dtype=torch.float64)
    theirs = theirs_loss(logits, labels, loss_weights=weights, reduction=reduction)
    ours = ntl_fast.number_level_loss(logits, labels, table, float_level=float_level, reduction=reduction,
                                      weights=weights)
    compare(theirs, ours, logits)
