"""The PyTorch reference against hand-computed cases and the closed forms of docs/math.md §2."""

import itertools

import pytest
import torch

import ntl_fast
from ntl_fast import LossConfig, NumberTokenTable, reference
from helpers import assert_spec_close, digit_table, irregular_table, random_labels

VARIANTS = [
    dict(loss="was"),
    dict(loss="was", squash_factor=3.0),
    dict(loss="mse"),
    dict(loss="mae"),
    dict(loss="huber"),
    dict(loss="was_cdf"),
]


def peaked_logits(table: NumberTokenTable, mass: dict, vocab_size=None) -> torch.Tensor:
    """One row whose number-token softmax is exactly ``mass`` ({value: probability})."""
    vocab_size = vocab_size or table.vocab_size
    row = torch.full((vocab_size,), -1e4, dtype=torch.float64)
    for value, probability in mass.items():
        token = table.number_ids[table.number_values == value][0]
        row[token] = torch.log(torch.tensor(probability, dtype=torch.float64))
    return row[None]


def label_of(table, value):
    return torch.tensor([int(table.number_ids[table.number_values == value][0])])


# ----------------------------------------------------------------------------- hand cases
def test_half_on_zero_half_on_eight_for_label_four():
    table = digit_table()
    logits = peaked_logits(table, {0.0: 0.5, 8.0: 0.5})
    labels = label_of(table, 4.0)
    assert ntl_fast.number_token_loss(logits, labels, table, loss="mse").item() == pytest.approx(0.0, abs=1e-12)
    assert ntl_fast.number_token_loss(logits, labels, table, loss="was").item() == pytest.approx(4.0)
    assert ntl_fast.number_token_loss(logits, labels, table, loss="was_cdf").item() == pytest.approx(4.0)
    assert ntl_fast.number_token_loss(logits, labels, table, loss="mae").item() == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("options", VARIANTS + [dict(loss="was", reweigh=True)], ids=str)
def test_correct_one_hot_prediction_scores_zero(options):
    table = irregular_table()
    for value in table.number_values.unique().tolist():
        logits = peaked_logits(table, {value: 1.0})
        logits[0, :] = torch.where(logits[0] > -1e4, torch.tensor(1e4, dtype=torch.float64), logits[0])
        loss = ntl_fast.number_token_loss(logits, label_of(table, value), table, **options)
        assert loss.item() == pytest.approx(0.0, abs=1e-9), value


def test_known_values_on_irregular_spacing():
    table = NumberTokenTable.from_values({0: 0.0, 1: 1.0, 2: 10.0}, vocab_size=4)
    logits = peaked_logits(table, {0.0: 0.25, 1.0: 0.25, 10.0: 0.5})
    labels = label_of(table, 1.0)
    y_hat = 0.25 * 0 + 0.25 * 1 + 0.5 * 10
    assert ntl_fast.number_token_loss(logits, labels, table, loss="mse").item() == pytest.approx((y_hat - 1) ** 2)
    assert ntl_fast.number_token_loss(logits, labels, table, loss="mae").item() == pytest.approx(y_hat - 1)
    assert ntl_fast.number_token_loss(logits, labels, table, loss="huber").item() == pytest.approx(y_hat - 1 - 0.5)
    was = 0.25 * 1 + 0.25 * 0 + 0.5 * 9
    assert ntl_fast.number_token_loss(logits, labels, table, loss="was").item() == pytest.approx(was)
    assert ntl_fast.number_token_loss(logits, labels, table, loss="was_cdf").item() == pytest.approx(was)
    # squash s = 5: d_min = 1, d_max = 10, D' = 1 + (D - 1) * 4 / 9
    squashed = 0.25 * 1 + 0.5 * (1 + 8 * 4 / 9)
    assert ntl_fast.number_token_loss(logits, labels, table, loss="was", squash_factor=5.0).item() == (
        pytest.approx(squashed)
    )


@pytest.mark.parametrize("table_name", ["digits", "irregular", "wide"])
def test_cdf_form_equals_abs_diff_form_for_one_hot_targets(table_name, seed):
    table = {
        "digits": digit_table(),
        "irregular": irregular_table(),
        "wide": NumberTokenTable.from_values({3: 0.0, 5: 10.0, 6: 20.0, 9: 90.0, 10: 1000.0}, vocab_size=12),
    }[table_name]
    logits = (3 * torch.randn(32, table.vocab_size, dtype=torch.float64)).requires_grad_()
    labels = random_labels((32,), table, number_fraction=0.9, ignore_fraction=0.0)
    was = ntl_fast.number_token_loss(logits, labels, table, loss="was", reduction="none")
    (grad_was,) = torch.autograd.grad(was.sum(), logits)
    cdf = ntl_fast.number_token_loss(logits, labels, table, loss="was_cdf", reduction="none")
    (grad_cdf,) = torch.autograd.grad(cdf.sum(), logits)
    torch.testing.assert_close(cdf, was, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(grad_cdf, grad_was, rtol=1e-9, atol=1e-10)


def test_reweigh_bounds(seed):
    table = digit_table()
    logits = 4 * torch.randn(64, table.vocab_size, dtype=torch.float64)
    labels = random_labels((64,), table, number_fraction=1.0, ignore_fraction=0.0)
    for loss in ("was", "mse", "mae", "huber", "was_cdf"):
        plain = ntl_fast.number_token_loss(logits, labels, table, loss=loss, reduction="none")
        weighted = ntl_fast.number_token_loss(logits, labels, table, loss=loss, reweigh=True, reduction="none")
        constant = table.reweigh_constant(loss)
        # L <= m L + c (1 - m) <= c, because L <= max_dist < c
        assert torch.all(weighted >= plain - 1e-12), loss
        assert torch.all(weighted <= constant + 1e-12), loss
    # all mass on text: the loss is c; all mass on numbers: the loss is L
    text_heavy = logits.clone()
    text_heavy[:, table.number_ids] -= 100
    weighted = ntl_fast.number_token_loss(text_heavy, labels, table, loss="was", reweigh=True, reduction="none")
    torch.testing.assert_close(weighted, torch.full_like(weighted, table.reweigh_constant("was")))
    number_heavy = logits.clone()
    number_heavy[:, table.number_ids] += 100
    torch.testing.assert_close(
        ntl_fast.number_token_loss(number_heavy, labels, table, loss="was", reweigh=True, reduction="none"),
        ntl_fast.number_token_loss(number_heavy, labels, table, loss="was", reduction="none"),
    )


def test_gaussian_targets_normalised_and_peaked():
    table = irregular_table()
    y = table.number_values.double()
    targets = reference.gaussian_targets(y, table.number_values.double(), 1.5)
    torch.testing.assert_close(targets.sum(-1), torch.ones(len(y), dtype=torch.float64))
    for row, value in enumerate(y.tolist()):
        best = targets[row].max()
        assert torch.all(targets[row][table.number_values.double() == value] == best)


# ----------------------------------------------------------------------------- closed forms
def small_irregular_table():
    """K = 6 over V = 13: ids 0 and V-1 included, a duplicated value, unsorted values."""
    return NumberTokenTable.from_values({0: 9.0, 4: 0.0, 5: 2.5, 7: 100.0, 8: -3.0, 12: 2.5}, vocab_size=13)


def closed_form(logits, labels, table, config):
    """Per-row losses and gradients of ce + ntl written from docs/math.md §2, float64, row by row."""
    ce_grad = torch.zeros_like(logits)
    ntl_grad = torch.zeros_like(logits)
    ids = table.number_ids
    values = table.number_values.double()
    order, gaps = table.value_order, table.sorted_gaps.double()
    for row in range(logits.shape[0]):
        z, label = logits[row], int(labels[row])
        if label == config.ignore_index:
            continue
        p = torch.softmax(z, 0)
        q = torch.softmax(z[ids], 0)
        index = int(table.number_index[label])
        ce_target = torch.zeros_like(z)
        if index >= 0 and config.gaussian_sigma is not None:
            ce_target[ids] = reference.gaussian_targets(values[index:index + 1], values, config.gaussian_sigma)[0]
        else:
            ce_target[label] = 1.0
        ce_grad[row] = p - ce_target  # §2.5 / §2.6
        if index < 0:
            continue
        y = values[index]
        if config.loss == "was":
            distance = table.distance_matrix(config.squash_factor).double()[index]
            loss = (q * distance).sum()
            d_loss = q * (distance - loss)  # §2.2
        elif config.loss == "was_cdf":
            target = torch.zeros_like(q)
            if config.gaussian_sigma is None:
                target[index] = 1.0
            else:
                target = reference.gaussian_targets(values[index:index + 1], values, config.gaussian_sigma)[0]
            difference = torch.cumsum(q[order], 0)[:-1] - torch.cumsum(target[order], 0)[:-1]
            loss = (difference.abs() * gaps).sum()
            sign_gap = torch.sign(difference) * gaps
            a_sorted = torch.flip(torch.cumsum(torch.flip(sign_gap, [0]), 0), [0])  # Σ_{k >= rank}
            a = torch.zeros_like(q)
            a[order[:-1]] = a_sorted
            d_loss = q * (a - (q * a).sum())  # §2.3
        else:
            y_hat = (q * values).sum()
            diff = y_hat - y
            loss = {"mse": diff**2, "mae": diff.abs(), "huber": 0.5 * diff**2 if diff.abs() < 1 else diff.abs() - 0.5}[
                config.loss
            ]
            slope = {"mse": 2 * diff, "mae": torch.sign(diff), "huber": diff if diff.abs() < 1 else torch.sign(diff)}[
                config.loss
            ]
            d_loss = slope * q * (values - y_hat)  # §2.1
        if config.reweigh:
            mass = p[ids].sum()
            constant = table.reweigh_constant(config.loss, config.squash_factor)
            in_numbers = torch.zeros_like(z)
            in_numbers[ids] = 1.0
            ntl_grad[row] = (loss - constant) * p * (in_numbers - mass)  # §2.4
            ntl_grad[row, ids] += mass * d_loss
        else:
            ntl_grad[row, ids] = d_loss
    return ce_grad, ntl_grad


OPTIONS = [
    LossConfig(**variant, reweigh=reweigh)
    for variant, reweigh in itertools.product(VARIANTS, [False, True])
] + [
    LossConfig("was", gaussian_sigma=1.0),
    LossConfig("was_cdf", gaussian_sigma=1.0),
    LossConfig("was_cdf", gaussian_sigma=2.0, reweigh=True),
    LossConfig("mse", ignore_index=3),
]


@pytest.mark.parametrize("config", OPTIONS, ids=repr)
@pytest.mark.parametrize("table_name", ["digits", "irregular"])
def test_autograd_matches_the_closed_form_gradients(config, table_name, seed):
    table = digit_table() if table_name == "digits" else irregular_table()
    logits = (2 * torch.randn(24, table.vocab_size, dtype=torch.float64)).requires_grad_()
    labels = random_labels((24,), table, ignore_index=config.ignore_index)
    ce, ntl = reference.ce_ntl_rows(logits, labels, table, config)
    ce_grad, = torch.autograd.grad(ce.sum(), logits, retain_graph=True)
    ntl_grad, = torch.autograd.grad(ntl.sum(), logits)
    expected_ce, expected_ntl = closed_form(logits.detach(), labels, table, config)
    torch.testing.assert_close(ce_grad, expected_ce, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(ntl_grad, expected_ntl, rtol=1e-9, atol=1e-11)


# ----------------------------------------------------------------------------- gradcheck
GRADCHECK_CASES = [
    dict(loss="was"), dict(loss="was", squash_factor=2.0), dict(loss="mse"), dict(loss="mae"),
    dict(loss="huber"), dict(loss="was_cdf"), dict(loss="was", reweigh=True), dict(loss="mse", reweigh=True),
    dict(loss="was_cdf", reweigh=True),
]


@pytest.mark.parametrize("options", GRADCHECK_CASES, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_gradcheck_number_token_loss(options, reduction):
    torch.manual_seed(0)
    table = small_irregular_table()
    logits = torch.randn(2, 3, 13, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([[0, 4, -100], [11, 12, 5]])
    weights = torch.rand(2, 3, dtype=torch.float64)

    def function(z):
        return ntl_fast.number_token_loss(z, labels, table, reduction=reduction, weights=weights, **options)

    assert torch.autograd.gradcheck(function, (logits,))


@pytest.mark.parametrize("options", [
    dict(), dict(gaussian_sigma=1.0), dict(loss="was_cdf", gaussian_sigma=1.5), dict(loss="huber", reweigh=True),
    dict(ce_normalizer=7.0, ntl_normalizer=torch.tensor(3.0, dtype=torch.float64)),
], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gradcheck_cross_entropy_with_ntl(options, reduction):
    torch.manual_seed(1)
    table = small_irregular_table()
    logits = torch.randn(5, 13, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 4, -100, 12, 7])

    def function(z):
        return ntl_fast.cross_entropy_with_ntl(z, labels, table, reduction=reduction, **options).loss

    assert torch.autograd.gradcheck(function, (logits,))


def test_gradcheck_number_level_loss():
    torch.manual_seed(2)
    table = digit_table(vocab_size=20, first_id=2, dot_id=15)
    logits = torch.randn(2, 6, 20, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([[2, 5, 15, 3, 0, 11], [-100, 9, 10, 4, 15, 6]])

    for float_level in (False, True):
        assert torch.autograd.gradcheck(
            lambda z: ntl_fast.number_level_loss(z, labels, table, float_level=float_level), (logits,)
        )


# ----------------------------------------------------------------------------- low precision
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("options", VARIANTS + [dict(loss="was", reweigh=True)], ids=str)
def test_low_precision_logits_give_float32_losses_close_to_float64(dtype, options, seed):
    table = digit_table()
    logits = (3 * torch.randn(4, 8, table.vocab_size)).to(dtype)
    labels = random_labels((4, 8), table)
    loss = ntl_fast.number_token_loss(logits, labels, table, **options)
    assert loss.dtype == torch.float32
    expected = ntl_fast.number_token_loss(logits.double(), labels, table, **options)
    assert_spec_close(loss, expected, dtype, what="loss")
    out = ntl_fast.cross_entropy_with_ntl(logits, labels, table, **options)
    expected_out = ntl_fast.cross_entropy_with_ntl(logits.double(), labels, table, **options)
    assert out.loss.dtype == torch.float32
    assert_spec_close(out.loss, expected_out.loss, dtype, what="ce+ntl")


def test_large_logits_do_not_overflow():
    table = digit_table()
    logits = torch.randn(6, table.vocab_size) * 1e4
    labels = random_labels((6,), table, ignore_fraction=0.0)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        z = logits.clamp(-6e4, 6e4).to(dtype).requires_grad_()
        out = ntl_fast.cross_entropy_with_ntl(z, labels, table, reweigh=True)
        out.loss.backward()
        assert torch.isfinite(out.loss) and torch.isfinite(z.grad.float()).all()


# ----------------------------------------------------------------------------- number level
def number_logits(table, digits_per_position, vocab_size=None):
    """Logits whose expected digit at each position is exactly the given digit."""
    rows = [peaked_logits(table, {float(d): 1.0}, vocab_size)[0] if d is not None
            else torch.zeros(vocab_size or table.vocab_size, dtype=torch.float64)
            for d in digits_per_position]
    return torch.stack(rows)[None]


def test_number_level_hand_cases():
    table = digit_table(vocab_size=20, first_id=2, dot_id=15)
    digit = lambda d: 2 + d  # noqa: E731
    labels = torch.tensor([[digit(1), digit(2), 17, digit(3), 15, digit(5)]])
    exact = number_logits(table, [1, 2, None, 3, None, 5])
    loss = ntl_fast.number_level_loss(exact, labels, table, reduction="none")
    assert loss[0].tolist() == pytest.approx([0.0] * 6, abs=1e-12)
    swapped = number_logits(table, [2, 1, None, 3, None, 5])
    loss = ntl_fast.number_level_loss(swapped, labels, table, reduction="none")
    assert loss[0, 0].item() == pytest.approx(9 / 33)
    assert loss[0, 1:].abs().sum().item() == pytest.approx(0.0, abs=1e-12)
    mean = ntl_fast.number_level_loss(swapped, labels, table)  # three numbers: 12, 3, 5
    assert mean.item() == pytest.approx(9 / 33 / 3)
    # float level: "3 . 5" is one number 35 (the dot is no digit)
    wrong = number_logits(table, [1, 2, None, 3, None, 4])
    loss = ntl_fast.number_level_loss(wrong, labels, table, float_level=True, reduction="none")
    assert loss[0, 3].item() == pytest.approx(1 / 69)
    assert loss[0, 5].item() == 0.0
    # max_number_length clamps the exponent: 1 2 with length 1 -> both digits weigh 10^0
    clamped = ntl_fast.number_level_loss(swapped, labels, table, reduction="none", max_number_length=1)
    assert clamped[0, 0].item() == pytest.approx(0.0, abs=1e-12)


def test_number_level_requires_digit_table_and_dot():
    table = irregular_table()
    logits = torch.randn(1, 4, table.vocab_size)
    with pytest.raises(ValueError, match="digit-level"):
        ntl_fast.number_level_loss(logits, torch.tensor([[0, 4, 11, 5]]), table)
    digits = digit_table()
    with pytest.raises(ValueError, match="dot_token_id"):
        ntl_fast.number_level_loss(torch.randn(1, 4, 40), torch.tensor([[7, 8, 9, 1]]), digits, float_level=True)


# ----------------------------------------------------------------------------- numerics of the reference itself
def _rows_and_gradient(fn, logits):
    z = logits.detach().clone().requires_grad_()
    rows = fn(z)
    rows = (rows,) if isinstance(rows, torch.Tensor) else rows
    upstream = torch.linspace(0.5, 1.5, logits.shape[0], dtype=rows[0].dtype)
    sum((r * upstream).sum() * (i + 1) for i, r in enumerate(rows)).backward()
    return rows, z.grad


def _assert_float32_rows_match_float64(logits, labels, table, config):
    """Both row functions, values and gradients, on ``logits`` rounded to float32 against float64."""
    for fn in (reference.ce_ntl_rows, reference.ntl_rows):
        got, grad = _rows_and_gradient(lambda z: fn(z, labels, table, config), logits.float())
        want, grad_ref = _rows_and_gradient(lambda z: fn(z, labels, table, config), logits)
        for a, b in zip(got, want):
            assert_spec_close(a, b, torch.float32, what=fn.__name__)
        assert_spec_close(grad, grad_ref, torch.float32, gradient=True, what=f"{fn.__name__} gradient")


@pytest.mark.parametrize("shift", [1e4, -1e4])
def test_reference_is_shift_invariant_in_float32(shift):
    """Logits on a 2^-10 grid plus ±1e4 are exact in float32; the float32 reference must then
    match the float64 one within the tolerances (it once formed z - LSE_V with LSE_V rounded)."""
    torch.manual_seed(41)
    table = irregular_table(300)
    logits = torch.round(torch.randn(10, 300, dtype=torch.float64) * 3 * 1024) / 1024
    labels = random_labels((10,), table)
    for options in [dict(loss="was"), dict(loss="mse", reweigh=True), dict(loss="was_cdf", gaussian_sigma=1.0)]:
        config = LossConfig(**options)
        for fn in (reference.ce_ntl_rows, reference.ntl_rows):
            got, grad = _rows_and_gradient(lambda z: fn(z, labels, table, config), (logits + shift).float())
            want, grad_ref = _rows_and_gradient(lambda z: fn(z, labels, table, config), logits)
            for a, b in zip(got, want):
                assert_spec_close(a, b, torch.float32, what=f"{options} {fn.__name__}")
            assert_spec_close(grad, grad_ref, torch.float32, gradient=True, what=f"{options} gradient")


@pytest.mark.parametrize("loss", ["mse", "was", "huber"])
def test_reweigh_text_mass_has_no_cancellation(loss):
    """Every text logit -inf: m = 1 to the last bit, and ``1 - m`` once was rounding noise times
    the reweigh constant (a gradient error of 2.5e-6 against a 2e-6 tolerance)."""
    torch.manual_seed(42)
    table = digit_table(300)
    logits = torch.randn(8, 300, dtype=torch.float64)
    logits[:, ~table.is_number] = float("-inf")
    labels = table.number_ids[torch.randint(0, 10, (8,))]
    # a confident, right prediction: L is ~0, so any noise in c (1 - m) dominates the result
    logits[torch.arange(8), labels] += 17.5
    logits[1, 0] = -25.0  # a tiny but non-zero text mass
    config = LossConfig(loss, reweigh=True)
    _assert_float32_rows_match_float64(logits, labels, table, config)


def _exact_reweighed_gradient(row, label, table, constant):
    """``∂/∂z`` of ``m L + c (1 - m)`` (NTL-MSE) for one float64 row, with 60-digit mpmath
    arithmetic and central differences of step 1e-25 (the exact derivative to ~1e-40)."""
    import mpmath

    mpmath.mp.dps = 60
    numbers = {int(i): mpmath.mpf(float(v)) for i, v in zip(table.number_ids, table.number_values)}
    target = numbers[label]

    def loss(z):
        top = max(z)
        exps = [mpmath.exp(x - top) for x in z]
        total = sum(exps)
        number_total = sum(exps[i] for i in numbers)
        mass = number_total / total
        expected = sum(exps[i] * v for i, v in numbers.items()) / number_total
        return mass * (expected - target) ** 2 + constant * (total - number_total) / total

    z = [mpmath.mpf(float(x)) for x in row]
    step = mpmath.mpf("1e-25")
    gradient = []
    for j in range(len(z)):
        up, down = list(z), list(z)
        up[j] += step
        down[j] -= step
        gradient.append(float((loss(up) - loss(down)) / (2 * step)))
    return torch.tensor(gradient, dtype=torch.float64)


@pytest.mark.parametrize("text_logit", [-20.0, -33.0, -40.0])
def test_reweigh_gradient_keeps_precision_at_a_tiny_number_mass(text_logit):
    """Number mass m far below float64's eps: the text columns' gradient is (c - L) m p_j, ~1e-16
    and less. Autograd of Σ_{k∉N} p_k once formed it as p_j - p_j (1 - m), float64 noise of the
    size of the gradient itself, so the oracle failed kernels that were right; every element now
    keeps its relative precision."""
    table = NumberTokenTable.from_values({3: 0.0, 5: 7.0}, vocab_size=12)
    row = torch.linspace(-1.0, 1.5, 12, dtype=torch.float64)
    row[[3, 5]] = torch.tensor([text_logit, text_logit + 0.75], dtype=torch.float64)
    config = LossConfig("mse", reweigh=True)
    constant = table.reweigh_constant("mse")
    for fn in (reference.ntl_rows, lambda z, y, t, c: reference.ce_ntl_rows(z, y, t, c)[1]):
        logits = row[None].clone().requires_grad_()
        fn(logits, torch.tensor([5]), table, config).sum().backward()
        exact = _exact_reweighed_gradient(row, 5, table, constant)
        error = ((logits.grad[0] - exact).abs() / exact.abs()).max().item()
        assert error < 1e-9, (text_logit, logits.grad[0].tolist(), exact.tolist())


@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
@pytest.mark.parametrize("column", ["text", "number"])
def test_reweighed_row_with_a_poisoned_logit_is_nan(poison, column):
    """A NaN or +inf logit anywhere in a reweighed row makes that row's NTL non-finite and leaves
    the other rows alone; a row whose text logits are all -inf has m = 1."""
    table = digit_table(28)
    torch.manual_seed(44)
    logits = torch.randn(3, 28, dtype=torch.float64)
    labels = table.number_ids[torch.tensor([2, 5, 7])]
    text = torch.nonzero(~table.is_number).flatten()
    logits[0, text[3] if column == "text" else table.number_ids[4]] = poison
    logits[1, text] = float("-inf")
    config = LossConfig("mse", reweigh=True)
    for fn in (reference.ntl_rows, lambda z, y, t, c: reference.ce_ntl_rows(z, y, t, c)[1]):
        rows = fn(logits, labels, table, config)
        assert not torch.isfinite(rows[0])
        assert torch.isfinite(rows[1:]).all()
        # m = 1 exactly: the reweighed loss is the plain one
        plain = fn(logits[1:2], labels[1:2], table, LossConfig("mse"))
        assert rows[1].item() == pytest.approx(plain.item(), rel=1e-12, abs=1e-300)


@pytest.mark.parametrize("loss", ["mse", "mae", "huber"])
def test_regression_losses_keep_precision_near_the_label(loss):
    """A good prediction of a large value: ŷ - y once came from a rounded ŷ (an absolute error
    of ~eps·|v|, far above the tolerance of a small gradient); Σ q_j (v_j - y) keeps it."""
    table = NumberTokenTable.from_values({3: -17.5, 9: 20.0, 12: 19.5}, vocab_size=16)
    torch.manual_seed(43)
    logits = torch.randn(6, 16, dtype=torch.float64)
    labels = torch.tensor([3, 9, 12, 3, 9, 12])
    logits[torch.arange(6), labels] += torch.tensor([9.0, 8.0, 7.5, 10.0, 6.0, 9.5], dtype=torch.float64)
    config = LossConfig(loss)
    _assert_float32_rows_match_float64(logits, labels, table, config)
