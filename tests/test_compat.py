"""ntl_fast.compat: the authors' classes, same call, same numbers as ``ntloss`` 0.3.2."""

import pytest
import torch
import torch.nn.functional as F

import ntl_fast
from helpers import assert_spec_close
from ntl_fast import compat
from test_table import DIGITS, TEXT, make_tokenizer

ntloss = pytest.importorskip(
    "ntloss", reason="the authors' ntloss package is a test dependency (pip install ntloss==0.3.2)"
)

DIGIT_VOCABULARY = TEXT + DIGITS + ["12", "\u25815"]
SHUFFLED = ["7", "[PAD]", "3", "[UNK]", "0", "the", "9", "1", "sum", "4", "8", ".", "2", "6", "5", "=", "+"]


def batch(size, dtype=torch.float64, shape=(3, 11), number_ids=None, seed=7):
    generator = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(*shape, size, generator=generator)).to(dtype).requires_grad_()
    labels = torch.randint(0, size, shape, generator=generator)
    if number_ids is not None:
        numbers = number_ids[torch.randint(0, number_ids.numel(), shape, generator=generator)]
        labels = torch.where(torch.rand(shape, generator=generator) < 0.6, numbers, labels)
    labels[0, :2] = -100
    weights = torch.rand(shape, dtype=dtype, generator=generator)
    return logits, labels, weights


def compare(theirs, ours, logits, dtype=torch.float32):
    """Loss and gradient within docs/math.md §6 (both packages keep float32 value tables)."""
    assert_spec_close(ours, theirs, dtype, what="loss")
    (grad_theirs,) = torch.autograd.grad(theirs.sum(), logits)
    (grad_ours,) = torch.autograd.grad(ours.sum(), logits)
    assert_spec_close(grad_ours, grad_theirs, dtype, gradient=True, what="gradient")


def digit_ids(tokenizer):
    return torch.tensor([tokenizer.convert_tokens_to_ids(d) for d in DIGITS])


# ------------------------------------------------------------------ defaults
@pytest.mark.parametrize("vocabulary", [DIGIT_VOCABULARY, SHUFFLED], ids=["digits", "shuffled"])
def test_ntloss_defaults_match(vocabulary):
    tokenizer = make_tokenizer(vocabulary)
    logits, labels, _ = batch(len(tokenizer), number_ids=digit_ids(tokenizer))
    theirs = ntloss.NTLoss(tokenizer)(logits, labels)
    ours = compat.NTLoss(tokenizer)(logits, labels)
    compare(theirs, ours, logits)


def test_ntloss_defaults_reweigh_unlike_the_native_api():
    """The porting trap this module exists for: ntloss reweighs by default, the paper does not."""
    tokenizer = make_tokenizer(DIGIT_VOCABULARY)
    table = ntl_fast.NumberTokenTable.from_tokenizer(tokenizer)
    logits, labels, _ = batch(len(tokenizer), number_ids=digit_ids(tokenizer))
    ours = compat.NTLoss(tokenizer)(logits, labels)
    native = ntl_fast.number_token_loss(logits, labels, table, reweigh=True)
    paper = ntl_fast.number_token_loss(logits, labels, table)
    assert_spec_close(ours, native, torch.float32, what="compat vs native reweigh=True")
    assert ours.item() > paper.item() + 0.1, "the compat default must reweigh"


def test_dot_product_defaults_match():
    tokenizer = make_tokenizer(SHUFFLED)
    logits, labels, _ = batch(len(tokenizer), number_ids=digit_ids(tokenizer))
    theirs = ntloss.NTLossDotProduct(tokenizer)(logits, labels)
    ours = compat.NTLossDotProduct(tokenizer)(logits, labels)
    assert compat.NTLossDotProduct(tokenizer).kernel_loss == "mse"
    compare(theirs, ours, logits)


def test_number_level_defaults_match():
    """ntloss applies its (unrefined) reweighing to the number-level loss by default: matched."""
    tokenizer = make_tokenizer(DIGIT_VOCABULARY)
    ids = digit_ids(tokenizer)
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 12, len(tokenizer), dtype=torch.float64, generator=generator).requires_grad_()
    labels = ids[torch.randint(0, 10, (4, 12), generator=generator)]
    labels[0, 3] = tokenizer.convert_tokens_to_ids(".")
    labels[2, 6] = -100
    labels[3, 4] = tokenizer.convert_tokens_to_ids("the")
    theirs = ntloss.NumberLevelLoss(tokenizer)(logits, labels)
    ours = compat.NumberLevelLoss(tokenizer)(logits, labels)
    compare(theirs, ours, logits)
    unweighted = ntl_fast.number_level_loss(logits, labels, ntl_fast.NumberTokenTable.from_tokenizer(tokenizer))
    assert abs(ours.item() - unweighted.item()) > 0.1, "the compat default must reweigh"


# ------------------------------------------------------------------ non-defaults
@pytest.mark.parametrize("reweigh", [False, True])
@pytest.mark.parametrize("squash_factor", [None, 3.0])
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_ntloss_options_match(reweigh, squash_factor, reduction):
    tokenizer = make_tokenizer(SHUFFLED)
    logits, labels, weights = batch(len(tokenizer), number_ids=digit_ids(tokenizer))
    call = dict(loss_weights=weights, reduction=reduction)
    theirs = ntloss.NTLoss(tokenizer, reweigh=reweigh, squash_factor=squash_factor)(logits, labels, **call)
    ours = compat.NTLoss(tokenizer, reweigh=reweigh, squash_factor=squash_factor)(logits, labels, **call)
    compare(theirs, ours, logits)


def test_multi_digit_table_follows_ntloss():
    """digit_level=False: ntloss's float() rule (so ' 5'-free '1e2' counts), squash as the remedy."""
    tokenizer = make_tokenizer(TEXT + DIGITS + ["12", "25", "100", "7.5", "1e2"])
    theirs_loss = ntloss.NTLoss(tokenizer, digit_level=False, squash_factor=4.0)
    ours_loss = compat.NTLoss(tokenizer, digit_level=False, squash_factor=4.0)
    torch.testing.assert_close(ours_loss.number_values, theirs_loss.number_values, equal_nan=True)
    assert ours_loss.max_dist == pytest.approx(float(theirs_loss.max_dist))
    logits, labels, _ = batch(len(tokenizer), number_ids=ours_loss.number_token_ids)
    compare(theirs_loss(logits, labels), ours_loss(logits, labels), logits)


@pytest.mark.parametrize("function", [F.mse_loss, F.l1_loss, F.huber_loss, F.smooth_l1_loss],
                         ids=["mse", "l1", "huber", "smooth_l1"])
@pytest.mark.parametrize("reweigh", [False, True])
def test_dot_product_kernel_functions_match(function, reweigh):
    tokenizer = make_tokenizer(SHUFFLED)
    # ntloss's huber backward fails on float64 logits (float32 targets meet float64 predictions)
    dtype = torch.float32 if function in (F.huber_loss, F.smooth_l1_loss) else torch.float64
    logits, labels, weights = batch(len(tokenizer), dtype=dtype, number_ids=digit_ids(tokenizer))
    theirs = ntloss.NTLossDotProduct(tokenizer, reweigh=reweigh, loss_function=function)(
        logits, labels, loss_weights=weights)
    ours_loss = compat.NTLossDotProduct(tokenizer, reweigh=reweigh, loss_function=function)
    assert ours_loss.kernel_loss is not None
    compare(theirs, ours_loss(logits, labels, loss_weights=weights), logits)


def log_cosh(prediction, target, reduction="mean"):
    """A loss no kernel knows: it must run through the reference."""
    loss = torch.log(torch.cosh(prediction - target))
    return loss if reduction == "none" else loss.mean()


@pytest.mark.parametrize("reweigh", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_dot_product_any_callable_runs_through_the_reference(reweigh, reduction):
    tokenizer = make_tokenizer(DIGIT_VOCABULARY)
    logits, labels, weights = batch(len(tokenizer), number_ids=digit_ids(tokenizer))
    ours_loss = compat.NTLossDotProduct(tokenizer, reweigh=reweigh, loss_function=log_cosh)
    assert ours_loss.kernel_loss is None
    call = dict(loss_weights=weights, reduction=reduction)
    theirs = ntloss.NTLossDotProduct(tokenizer, reweigh=reweigh, loss_function=log_cosh)(logits, labels, **call)
    compare(theirs, ours_loss(logits, labels, **call), logits)


def hand_mse(prediction, target, reduction="mean"):
    """MSE written out: ``F.mse_loss`` runs on the kernels, this runs through the reference."""
    loss = (prediction - target) ** 2
    return loss if reduction == "none" else loss.mean()


@pytest.mark.parametrize("number_logit", [-20.0, -38.0])
def test_dot_product_callable_reweighs_a_tiny_number_mass_exactly(number_logit):
    """Number mass far below float64's eps: the reweighed gradient's text columns are p_j m (c - L).
    The eager path of a user's callable once formed them as p_j - p_j (1 - m), rounding noise
    there; it now matches the kernels' MSE element by element."""
    tokenizer = make_tokenizer(DIGIT_VOCABULARY)
    ids = digit_ids(tokenizer)
    logits, labels, _ = batch(len(tokenizer), number_ids=ids)
    logits = logits.detach().clone()
    logits[..., ids] += number_logit
    gradients = []
    for function in (hand_mse, F.mse_loss):
        leaf = logits.clone().requires_grad_()
        loss = compat.NTLossDotProduct(tokenizer, reweigh=True, loss_function=function)(leaf, labels)
        gradients.append(torch.autograd.grad(loss, leaf)[0])
    eager, kernel = gradients
    assert ((eager - kernel).abs() <= 1e-9 * kernel.abs() + 1e-300).all(), (eager - kernel).abs().max()


@pytest.mark.parametrize("float_level", [False, True])
@pytest.mark.parametrize("reweigh", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_number_level_options_match(float_level, reweigh, reduction):
    tokenizer = make_tokenizer(DIGIT_VOCABULARY)
    ids = digit_ids(tokenizer)
    generator = torch.Generator().manual_seed(5)
    logits = torch.randn(3, 10, len(tokenizer), dtype=torch.float64, generator=generator).requires_grad_()
    labels = ids[torch.randint(0, 10, (3, 10), generator=generator)]
    dot = tokenizer.convert_tokens_to_ids(".")
    labels[0, 2] = dot
    labels[1, 4:6] = dot
    labels[2, 7] = tokenizer.convert_tokens_to_ids("sum")
    weights = torch.rand(3, 10, dtype=torch.float64, generator=generator)
    options = dict(float_level=float_level, reweigh=reweigh)
    call = dict(loss_weights=weights, reduction=reduction)
    theirs = ntloss.NumberLevelLoss(tokenizer, **options)(logits, labels, **call)
    ours = compat.NumberLevelLoss(tokenizer, **options)(logits, labels, **call)
    compare(theirs, ours, logits)


def test_predict_numbers_matches_ntloss():
    tokenizer = make_tokenizer(SHUFFLED)
    logits, _, _ = batch(len(tokenizer))
    y_theirs, mass_theirs = ntloss.NTLossDotProduct(tokenizer).predict_numbers(logits)
    y_ours, mass_ours = compat.NTLossDotProduct(tokenizer).predict_numbers(logits)
    assert_spec_close(y_ours, y_theirs, torch.float32, what="expected value")
    assert_spec_close(mass_ours, mass_theirs, torch.float32, what="number mass")


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_backends_serve_the_compat_classes(backend):
    if backend == "cpp":
        pytest.importorskip("ntl_fast.cpp", reason="the C++ extension is not built")
    tokenizer = make_tokenizer(DIGIT_VOCABULARY)
    logits, labels, _ = batch(len(tokenizer), dtype=torch.float32, number_ids=digit_ids(tokenizer))
    theirs = ntloss.NTLoss(tokenizer)(logits, labels)
    compare(theirs, compat.NTLoss(tokenizer, backend=backend)(logits, labels), logits)


# ------------------------------------------------------------------ what compat refuses
def test_missing_digits_raise_instead_of_changing_the_tokenizer():
    tokenizer = make_tokenizer(TEXT + DIGITS[:7])
    size = len(tokenizer)
    with pytest.raises(ValueError, match=r"lacks digit tokens \['7', '8', '9'\]"):
        compat.NTLoss(tokenizer)
    assert len(tokenizer) == size


def test_logits_width_must_match_vocab_size():
    tokenizer = make_tokenizer(DIGIT_VOCABULARY)
    loss = compat.NTLoss(tokenizer)
    logits, labels, _ = batch(len(tokenizer) + 3)
    with pytest.raises(ValueError, match="vocab_size"):
        loss(logits, labels.clamp_max(len(tokenizer) - 1))
    padded = compat.NTLoss(tokenizer, vocab_size=len(tokenizer) + 3)
    assert torch.isfinite(padded(logits, labels)).item()


def test_not_callable_loss_function():
    with pytest.raises(TypeError, match="loss_function"):
        compat.NTLossDotProduct(make_tokenizer(DIGIT_VOCABULARY), loss_function="mse")
