"""The public API: reductions, weights, normalisers, shapes, modules, dispatch, bad input (§3, §4)."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import ntl_fast
from ntl_fast import backends, reference
from helpers import digit_table, irregular_table, random_labels


@pytest.fixture
def table():
    return digit_table()


def make_batch(table, shape=(3, 7), dtype=torch.float32):
    logits = torch.randn(*shape, table.vocab_size, dtype=dtype, requires_grad=True)
    labels = random_labels(shape, table)
    return logits, labels


# ----------------------------------------------------------------------------- reductions
def test_mean_is_over_number_positions_and_ce_over_non_ignored(table):
    logits, labels = make_batch(table)
    rows = ntl_fast.number_token_loss(logits, labels, table, reduction="none")
    is_number = table.is_number[labels.clamp_min(0)] & (labels != -100)
    assert torch.all(rows[~is_number] == 0)
    mean = ntl_fast.number_token_loss(logits, labels, table)
    torch.testing.assert_close(mean, rows.sum() / is_number.sum())
    torch.testing.assert_close(ntl_fast.number_token_loss(logits, labels, table, reduction="sum"), rows.sum())
    out = ntl_fast.cross_entropy_with_ntl(logits, labels, table, ntl_weight=0.3)
    expected_ce = F.cross_entropy(logits.reshape(-1, table.vocab_size), labels.reshape(-1))
    torch.testing.assert_close(out.ce, expected_ce)
    torch.testing.assert_close(out.ntl, mean.detach())
    torch.testing.assert_close(out.loss, expected_ce + 0.3 * mean)
    assert out.loss.requires_grad and not out.ce.requires_grad and not out.ntl.requires_grad


def test_weights_and_normalizers(table):
    logits, labels = make_batch(table)
    weights = torch.rand(labels.shape)
    rows = ntl_fast.number_token_loss(logits, labels, table, reduction="none")
    weighted_rows = ntl_fast.number_token_loss(logits, labels, table, reduction="none", weights=weights)
    torch.testing.assert_close(weighted_rows, rows * weights)
    is_number = table.is_number[labels.clamp_min(0)] & (labels != -100)
    mean = ntl_fast.number_token_loss(logits, labels, table, weights=weights)
    torch.testing.assert_close(mean, (rows * weights).sum() / weights[is_number].sum())
    explicit = ntl_fast.number_token_loss(logits, labels, table, weights=weights, normalizer=10)
    torch.testing.assert_close(explicit, (rows * weights).sum() / 10)
    tensor_norm = ntl_fast.number_token_loss(logits, labels, table, normalizer=torch.tensor(4.0))
    torch.testing.assert_close(tensor_norm, rows.sum() / 4)
    out = ntl_fast.cross_entropy_with_ntl(
        logits, labels, table, weights=weights, ce_normalizer=20, ntl_normalizer=torch.tensor(5.0)
    )
    ce_rows = F.cross_entropy(logits.reshape(-1, table.vocab_size), labels.reshape(-1), reduction="none")
    torch.testing.assert_close(out.ce, (ce_rows * weights.reshape(-1)).sum() / 20)
    torch.testing.assert_close(out.ntl, (rows * weights).sum().detach() / 5)
    weighted_ce = ntl_fast.cross_entropy_with_ntl(logits, labels, table, weights=weights).ce
    ce_valid = labels.reshape(-1) != -100
    torch.testing.assert_close(weighted_ce, (ce_rows * weights.reshape(-1)).sum() / weights.reshape(-1)[ce_valid].sum())
    with pytest.raises(ValueError, match="0-d"):
        ntl_fast.number_token_loss(logits, labels, table, normalizer=torch.ones(2))


def test_global_normalizers_make_micro_batches_exact(table):
    logits, labels = make_batch(table, shape=(8, 5), dtype=torch.float64)
    full = ntl_fast.cross_entropy_with_ntl(logits, labels, table)
    (full_grad,) = torch.autograd.grad(full.loss, logits)
    ce_count = (labels != -100).sum()
    ntl_count = (table.is_number[labels.clamp_min(0)] & (labels != -100)).sum()
    total_grad = torch.zeros_like(logits)
    total = 0
    for part in range(4):
        rows = slice(2 * part, 2 * part + 2)
        out = ntl_fast.cross_entropy_with_ntl(
            logits[rows], labels[rows], table, ce_normalizer=ce_count, ntl_normalizer=ntl_count
        )
        (grad,) = torch.autograd.grad(out.loss, logits)
        total_grad += grad
        total += out.loss.detach()
    torch.testing.assert_close(total, full.loss.detach())
    torch.testing.assert_close(total_grad, full_grad)


@pytest.mark.parametrize("case", ["no_numbers", "all_ignored", "zero_weights"])
def test_empty_means_are_zero_with_a_zero_gradient(table, case):
    logits = torch.randn(4, 5, table.vocab_size, requires_grad=True)
    text = torch.tensor([i for i in range(table.vocab_size) if not table.is_number[i]])
    labels = text[torch.randint(0, len(text), (4, 5))]
    weights = None
    if case == "all_ignored":
        labels = torch.full((4, 5), -100)
    if case == "zero_weights":
        labels = random_labels((4, 5), table, number_fraction=1.0, ignore_fraction=0.0)
        weights = torch.zeros(4, 5)
    ntl = ntl_fast.number_token_loss(logits, labels, table, weights=weights)
    assert ntl.item() == 0.0 and ntl.grad_fn is not None
    (grad,) = torch.autograd.grad(ntl, logits)
    assert torch.all(grad == 0)
    out = ntl_fast.cross_entropy_with_ntl(logits, labels, table, weights=weights)
    assert not torch.isnan(out.loss)
    (grad,) = torch.autograd.grad(out.loss, logits)
    assert not torch.isnan(grad).any()
    if case != "no_numbers":
        assert out.loss.item() == 0.0 and torch.all(grad == 0)
    level = ntl_fast.number_level_loss(logits, labels, table, weights=weights)
    assert level.item() == 0.0 and level.grad_fn is not None


def test_any_leading_shape(table):
    logits = torch.randn(2, 3, 4, table.vocab_size)
    labels = random_labels((2, 3, 4), table)
    flat = ntl_fast.cross_entropy_with_ntl(logits.reshape(-1, table.vocab_size), labels.reshape(-1), table)
    nested = ntl_fast.cross_entropy_with_ntl(logits, labels, table)
    torch.testing.assert_close(nested.loss, flat.loss)
    assert ntl_fast.number_token_loss(logits, labels, table, reduction="none").shape == (2, 3, 4)
    single = ntl_fast.number_token_loss(logits[0, 0, 0], labels[0, 0, 0], table, reduction="none")
    assert single.shape == ()


def test_shift_labels_equals_manual_shift(table):
    logits, labels = make_batch(table, shape=(2, 9))
    weights = torch.rand(2, 9)
    shifted = ntl_fast.cross_entropy_with_ntl(logits, labels, table, shift_labels=True, weights=weights)
    manual = ntl_fast.cross_entropy_with_ntl(logits[:, :-1], labels[:, 1:], table, weights=weights[:, 1:])
    torch.testing.assert_close(shifted.loss, manual.loss)
    rows = ntl_fast.number_token_loss(logits, labels, table, shift_labels=True, reduction="none")
    assert rows.shape == (2, 8)
    with pytest.raises(ValueError, match="shift_labels"):
        ntl_fast.number_token_loss(logits[:, :1], labels[:, :1], table, shift_labels=True)


@pytest.mark.parametrize("function", ["ntl", "ce", "number_level"])
def test_shift_labels_gives_the_manual_shift_and_its_gradient_as_views(table, function):
    logits, labels = make_batch(table, shape=(2, 9))
    weights = torch.rand(2, 9)
    call = {"ntl": ntl_fast.number_token_loss, "number_level": ntl_fast.number_level_loss,
            "ce": lambda *args, **kwargs: ntl_fast.cross_entropy_with_ntl(*args, **kwargs).loss}[function]
    for reduction in ("none", "mean"):
        shifted = call(logits, labels, table, shift_labels=True, weights=weights, reduction=reduction)
        (shifted_grad,) = torch.autograd.grad(shifted.sum(), logits)
        manual = call(logits[:, :-1], labels[:, 1:], table, weights=weights[:, 1:], reduction=reduction)
        (manual_grad,) = torch.autograd.grad(manual.sum(), logits)
        torch.testing.assert_close(shifted, manual)
        torch.testing.assert_close(shifted_grad, manual_grad)
        assert (shifted_grad[:, -1] == 0).all()
    assert shifted.shape == () and manual.shape == ()
    rows = call(logits, labels, table, shift_labels=True, reduction="none")
    assert rows.shape == (2, 8) and rows._base is not None  # a view of the (2, 9) result


class _Allocations(TorchDispatchMode):
    """Sums the bytes of every new storage an op returns (views and in-place results are no new memory)."""

    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        seen = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor) and tensor.untyped_storage().data_ptr() not in seen:
                seen.add(tensor.untyped_storage().data_ptr())
                self.bytes += tensor.untyped_storage().nbytes()
        return out


def _allocated_bytes(step) -> int:
    with _Allocations() as allocations:
        step()
    return allocations.bytes


def test_shift_labels_makes_no_copy_of_the_logits():
    """Causal shift in a training step (forward and backward): the labels move, the logits do not.
    Everything the step allocates, gradient included, stays within 1.1x the logits on a kernel backend
    (one-pass: the gradient is the only logits-sized buffer), and costs nothing over labels shifted by
    hand on any backend; slicing the logits instead costs a copy and a zero-filled gradient."""
    table = digit_table(1000)
    logits = torch.randn(2, 64, 1000, requires_grad=True)
    labels = random_labels((2, 64), table)
    pre_shifted = torch.cat([labels[:, 1:], torch.full((2, 1), -100)], dim=1)
    backend = ntl_fast.explain_backend(logits).name

    def step(logits, labels, **options):
        logits.grad = None
        return lambda: ntl_fast.cross_entropy_with_ntl(logits, labels, table, **options).loss.backward()

    logits_bytes = logits.numel() * logits.element_size()
    shifted = _allocated_bytes(step(logits, labels, shift_labels=True))
    by_hand = _allocated_bytes(step(logits, pre_shifted))
    sliced = _allocated_bytes(step(logits[:, :-1], labels[:, 1:]))
    assert shifted <= by_hand + 0.02 * logits_bytes
    assert sliced >= shifted + 1.5 * logits_bytes  # the recorder sees a copy where there is one
    if backend == "cpp":
        assert shifted <= 1.1 * logits_bytes, shifted / logits_bytes


def test_custom_ignore_index_and_padded_logits(table):
    logits = torch.randn(10, table.vocab_size + 24)
    labels = random_labels((10,), table, ignore_index=-1)
    labels[0] = table.vocab_size + 5  # a padding column of the LM head: a text token
    out = ntl_fast.cross_entropy_with_ntl(logits, labels, table, ignore_index=-1)
    torch.testing.assert_close(out.ce, F.cross_entropy(logits, labels, ignore_index=-1))
    narrow = torch.randn(10, table.vocab_size - 1)
    with pytest.raises(ValueError, match="columns"):
        ntl_fast.number_token_loss(narrow, labels.clamp_max(5), table)


def test_non_contiguous_logits(table):
    base = torch.randn(table.vocab_size, 6).t()  # stride(-1) != 1
    labels = random_labels((6,), table)
    torch.testing.assert_close(
        ntl_fast.cross_entropy_with_ntl(base, labels, table).loss,
        ntl_fast.cross_entropy_with_ntl(base.contiguous(), labels, table).loss,
    )


def test_int32_labels(table):
    logits, labels = make_batch(table)
    torch.testing.assert_close(
        ntl_fast.number_token_loss(logits, labels.int(), table), ntl_fast.number_token_loss(logits, labels, table)
    )


# ----------------------------------------------------------------------------- bad input
def _boom(*args, **kwargs):
    raise AssertionError("a backend ran before the input was rejected")


@pytest.fixture
def no_backend(monkeypatch):
    monkeypatch.setattr(reference, "ntl_rows", _boom)
    monkeypatch.setattr(reference, "ce_ntl_rows", _boom)


BAD_CALLS = [
    ("label above V", dict(labels=lambda t: torch.tensor([[3, 40, 1]])), ValueError, "found 40"),
    ("negative label", dict(labels=lambda t: torch.tensor([[3, -5, 1]])), ValueError, "found -5"),
    ("float labels", dict(labels=lambda t: torch.zeros(1, 3)), TypeError, "labels must be int64"),
    ("int logits", dict(logits=lambda t: torch.zeros(1, 3, 40, dtype=torch.int64)), TypeError, "logits must be"),
    ("shape mismatch", dict(labels=lambda t: torch.zeros(1, 4, dtype=torch.long)), ValueError, "labels must have"),
    ("empty", dict(logits=lambda t: torch.zeros(0, 3, 40), labels=lambda t: torch.zeros(0, 3, dtype=torch.long)),
     ValueError, "non-empty"),
    ("negative weights", dict(weights=lambda t: torch.tensor([[1.0, -1.0, 1.0]])), ValueError, "weights must be >= 0"),
    ("nan weights", dict(weights=lambda t: torch.tensor([[1.0, float("nan"), 1.0]])), ValueError, "weights"),
    ("complex weights", dict(weights=lambda t: torch.ones(1, 3, dtype=torch.complex64)), TypeError,
     "weights must be a real"),
    ("negative int weights", dict(weights=lambda t: torch.tensor([[1, -1, 1]])), ValueError, "weights must be >= 0"),
    ("weights shape", dict(weights=lambda t: torch.ones(3)), ValueError, "weights must have"),
    ("labels device", dict(labels=lambda t: torch.zeros(1, 3, dtype=torch.long, device="meta")), ValueError,
     "labels are on"),
    ("table type", dict(table=lambda t: {"0": 0}), TypeError, "table must be"),
    ("loss name", dict(loss="l2"), ValueError, "loss must be one of"),
    ("reduction", dict(reduction="avg"), ValueError, "reduction must be one of"),
    ("squash <= 1", dict(squash_factor=1.0), ValueError, "squash_factor must be > 1"),
    ("squash on mse", dict(loss="mse", squash_factor=3.0), ValueError, "applies to loss='was' only"),
    ("backend", dict(backend="cuda"), ValueError, "backend must be one of"),
]


@pytest.mark.parametrize("name,change,error,message", BAD_CALLS, ids=[c[0] for c in BAD_CALLS])
def test_bad_input_is_rejected_before_any_kernel(table, no_backend, name, change, error, message):
    arguments = dict(logits=torch.randn(1, 3, 40), labels=torch.tensor([[3, 8, 1]]), table=table)
    options = {}
    for key, value in change.items():
        if key in arguments:
            arguments[key] = value(table)
        elif key == "weights":
            options[key] = value(table)
        else:
            options[key] = value
    with pytest.raises(error, match=message):
        ntl_fast.number_token_loss(arguments["logits"], arguments["labels"], arguments["table"], **options)
    with pytest.raises(error, match=message):
        ntl_fast.cross_entropy_with_ntl(arguments["logits"], arguments["labels"], arguments["table"], **options)


def test_bad_cross_entropy_options(table, no_backend):
    logits, labels = torch.randn(2, 40), torch.tensor([3, 8])
    with pytest.raises(ValueError, match="gaussian_sigma must be > 0"):
        ntl_fast.cross_entropy_with_ntl(logits, labels, table, gaussian_sigma=0.0)
    with pytest.raises(TypeError, match="ntl_weight"):
        ntl_fast.cross_entropy_with_ntl(logits, labels, table, ntl_weight="0.3")


def test_table_on_another_device_is_rejected(table, no_backend):
    logits = torch.randn(2, 40, device="meta")
    labels = torch.zeros(2, dtype=torch.long, device="meta")
    with pytest.raises(ValueError, match="table is on cpu"):
        ntl_fast.number_token_loss(logits, labels, table)


def test_bad_labels_without_validation_give_nan_not_a_crash(table):
    logits = torch.randn(3, 40)
    labels = torch.tensor([3, 4000, -7])
    rows = ntl_fast.number_token_loss(logits, labels, table, validate=False, reduction="none")
    assert torch.isnan(rows[1]) and torch.isnan(rows[2]) and not torch.isnan(rows[0])
    out = ntl_fast.cross_entropy_with_ntl(logits, labels, table, validate=False, reduction="none")
    assert torch.isnan(out.ce[1:]).all() and not torch.isnan(out.ce[0])


# ----------------------------------------------------------------------------- modules, dispatch
def test_modules_equal_the_functions(table):
    logits, labels = make_batch(table)
    module = ntl_fast.NumberTokenLoss(table=table, loss="mse", reweigh=True)
    torch.testing.assert_close(module(logits, labels),
                               ntl_fast.number_token_loss(logits, labels, table, loss="mse", reweigh=True))
    combined = ntl_fast.CrossEntropyWithNTL(table=table, ntl_weight=0.8, gaussian_sigma=1.0, loss="was_cdf")
    expected = ntl_fast.cross_entropy_with_ntl(logits, labels, table, ntl_weight=0.8, gaussian_sigma=1.0,
                                               loss="was_cdf")
    got = combined(logits, labels)
    assert isinstance(got, ntl_fast.NTLOutput)
    torch.testing.assert_close(got.loss, expected.loss)
    causal = ntl_fast.NumberTokenLoss(table=table, shift_labels=True)
    torch.testing.assert_close(causal(logits, labels), ntl_fast.number_token_loss(logits[:, :-1], labels[:, 1:], table))
    assert "num_numbers=10" in repr(module)
    with pytest.raises(ValueError, match="exactly one"):
        ntl_fast.NumberTokenLoss()
    with pytest.raises(ValueError, match="loss must be one of"):
        ntl_fast.NumberTokenLoss(table=table, loss="l3")


def test_explain_backend_names_the_choice_and_why():
    choice = ntl_fast.explain_backend(torch.device("cpu"))
    assert isinstance(choice, ntl_fast.BackendChoice)
    assert choice.name in ("cpp", "reference") and choice.reason
    assert ntl_fast.explain_backend("cpu", "reference") == ("reference", "requested explicitly")
    assert ntl_fast.explain_backend(torch.zeros(1)).name == choice.name
    with pytest.raises(ValueError, match="backend must be one of"):
        ntl_fast.explain_backend("cpu", "jax")


def test_unusable_explicit_backend_says_why(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="interpreter"):
        ntl_fast.explain_backend("cpu", "triton")
    monkeypatch.setitem(backends._IMPORT_ERRORS, "ntl_fast.cpp", "ntl_fast.cpp is unavailable: not built")
    with pytest.raises(RuntimeError, match="not built"):
        ntl_fast.explain_backend("cpu", "cpp")
    assert ntl_fast.explain_backend("cpu").name == "reference"
    assert "not built" in ntl_fast.explain_backend("cpu").reason


def test_irregular_vocabulary_end_to_end():
    table = irregular_table()
    logits = torch.randn(16, table.vocab_size, requires_grad=True)
    labels = random_labels((16,), table)
    labels[0], labels[1] = 0, table.vocab_size - 1
    for loss in ntl_fast.LOSSES:
        out = ntl_fast.cross_entropy_with_ntl(logits, labels, table, loss=loss)
        (grad,) = torch.autograd.grad(out.loss, logits)
        assert torch.isfinite(out.loss) and torch.isfinite(grad).all()


# ------------------------------------------------------------------------- weights of any dtype, rows that do not count
@pytest.mark.parametrize("backend", ["reference", "auto"])
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.uint8])
def test_integer_and_bool_weights_are_accepted_as_float(table, backend, dtype):
    """The authors' tests pass ``torch.ones_like(labels)`` as weights; once a TypeError."""
    torch.manual_seed(51)
    logits, labels = make_batch(table)
    weights = (torch.rand(labels.shape) < 0.7).to(dtype)
    for fn in (ntl_fast.cross_entropy_with_ntl, ntl_fast.number_token_loss):
        got = fn(logits, labels, table, weights=weights, backend=backend)
        want = fn(logits, labels, table, weights=weights.float(), backend=backend)
        got, want = (got.loss, want.loss) if isinstance(got, tuple) else (got, want)
        assert torch.equal(got, want)
    ones = ntl_fast.number_level_loss(logits, labels, table, weights=torch.ones_like(labels))
    assert torch.equal(ones, ntl_fast.number_level_loss(logits, labels, table, weights=torch.ones(labels.shape)))


@pytest.mark.parametrize("poison", [float("nan"), float("inf"), float("-inf")])
def test_zero_weight_and_ignored_rows_are_exact_zeros_whatever_their_logits(table, poison):
    torch.manual_seed(52)
    logits, labels = make_batch(table, shape=(2, 6))
    labels[:, :3] = table.number_ids[:3]
    labels[0, 4] = -100
    weights = torch.ones(labels.shape)
    weights[:, 1] = 0
    poisoned = logits.detach().clone()
    poisoned[0, 4] = poison  # ignored
    level_poisoned = poisoned.clone()  # a number-level loss reads every digit of a number
    poisoned[:, 1] = poison  # zero weight (a digit inside the number starting at 0)
    for reduction in ("mean", "sum", "none"):
        for call, dirty_logits in (
            (lambda z: ntl_fast.cross_entropy_with_ntl(z, labels, table, weights=weights, reduction=reduction,
                                                       reweigh=True, backend="reference").loss, poisoned),
            (lambda z: ntl_fast.number_token_loss(z, labels, table, weights=weights, reduction=reduction,
                                                  backend="reference"), poisoned),
            (lambda z: ntl_fast.number_level_loss(z, labels, table, weights=weights, reduction=reduction),
             level_poisoned),
        ):
            results = []
            for source in (logits.detach(), dirty_logits):
                z = source.clone().requires_grad_()
                out = call(z)
                out.sum().backward()
                results.append((out.detach(), z.grad))
            (clean, clean_grad), (dirty, dirty_grad) = results
            assert torch.equal(clean, dirty), reduction
            assert (dirty_grad[0, 4] == 0).all() and torch.equal(clean_grad, dirty_grad), reduction


@pytest.mark.parametrize("backend", ["reference", "auto", "triton"])
def test_gaussian_targets_on_a_masked_number_token_give_inf(table, backend):
    """Decided behaviour: a Gaussian target puts mass on a masked (-inf) number token, so that
    position's CE is +inf (the other positions stay finite); without Gaussian targets it is finite."""
    logits = torch.randn(3, table.vocab_size)
    labels = table.number_ids[torch.tensor([2, 5, 7])]
    logits[0, table.number_ids[8]] = float("-inf")
    out = ntl_fast.cross_entropy_with_ntl(logits, labels, table, gaussian_sigma=1.0, reduction="none", backend=backend)
    assert out.ce[0] == float("inf") and torch.isfinite(out.ce[1:]).all() and torch.isfinite(out.ntl).all()
    plain = ntl_fast.cross_entropy_with_ntl(logits, labels, table, reduction="none", backend=backend)
    assert torch.isfinite(plain.ce).all()


# ----------------------------------------------------------------------------- loss and gradient in one pass
@pytest.fixture
def one_pass_reference(monkeypatch):
    """The reference as a one-pass backend: its ce_ntl_loss_and_grad behind ntl_fast.fused."""
    monkeypatch.setattr(reference, "fuses_loss_and_grad", lambda logits: True)


@pytest.mark.parametrize("shift_labels", [False, True])
def test_one_pass_equals_two_passes_under_any_grad_output(table, monkeypatch, shift_labels):
    logits, labels = make_batch(table, shape=(2, 9))
    weights = torch.rand(2, 9)
    grads = []
    for fused in (True, False):
        monkeypatch.setattr(reference, "fuses_loss_and_grad", lambda logits, fused=fused: fused)
        z = logits.detach().clone().requires_grad_()
        out = ntl_fast.cross_entropy_with_ntl(z, labels, table, weights=weights, shift_labels=shift_labels,
                                              backend="reference")
        assert (type(out.loss.grad_fn).__name__ == "_CrossEntropyWithNTLAndGradientBackward") == fused
        (3.0 * out.loss).backward()
        grads.append((out.loss.detach(), z.grad))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    torch.testing.assert_close(grads[0][1], grads[1][1])


def test_inplace_one_pass_writes_the_gradient_over_the_logits_in_the_forward(table, one_pass_reference):
    logits, labels = make_batch(table)
    x = logits.detach().clone().requires_grad_()
    z = x * 1.0  # a non-leaf, as an LM head's output is
    out = ntl_fast.cross_entropy_with_ntl(z, labels, table, backend="reference", inplace=True)
    written = z.detach().clone()  # the logits hold the gradient from the forward on
    out.loss.backward()
    reference_logits = logits.detach().clone().requires_grad_()
    ntl_fast.cross_entropy_with_ntl(reference_logits, labels, table, backend="reference").loss.backward()
    torch.testing.assert_close(written, reference_logits.grad)
    torch.testing.assert_close(x.grad, reference_logits.grad)
    # another user of the same logits fails loudly instead of reading the gradient
    x = logits.detach().clone().requires_grad_()
    z = x * 1.0
    other = z.square().sum()  # square saves z for its backward
    out = ntl_fast.cross_entropy_with_ntl(z, labels, table, backend="reference", inplace=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (out.loss + other).backward()


def test_inplace_refuses_a_leaf_that_requires_grad(table, no_backend):
    logits, labels = make_batch(table)
    with pytest.raises(ValueError, match="inplace=True.*logits is a leaf tensor that requires grad"):
        ntl_fast.cross_entropy_with_ntl(logits, labels, table, inplace=True)
