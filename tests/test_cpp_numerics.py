"""The compiled C++ operators on the inputs that break naive kernels (docs/math.md §4): shifted and
masked logits, a number mass of 1, non-finite rows, zero upstream gradients, corrupt tables and
raw-operator arguments, memory layouts, repeated calls.

Expected values come from the float64 reference on the same inputs, with the tolerances of
docs/math.md §6 (helpers.assert_spec_close); layout and repeatability checks are bitwise.
"""

import pytest
import torch

cpp = pytest.importorskip(
    "ntl_fast.cpp", reason="ntl_fast._C is not built (pip install --no-build-isolation -e .)"
)

from helpers import assert_spec_close, digit_table, irregular_table, random_labels  # noqa: E402
from ntl_fast.config import LossConfig  # noqa: E402
from test_cpp import CONFIGS, assert_matches, cpp_rows, reference_rows, text_columns  # noqa: E402

ops = torch.ops.ntl_fast

GRID = 2.0 ** -10  # logits on this grid with |z + c| < 2**14 stay exact in float32 when shifted by c


def grid_logits(rows, vocab_size, seed=0, scale=3.0):
    generator = torch.Generator().manual_seed(seed)
    return torch.round(torch.randn(rows, vocab_size, generator=generator, dtype=torch.float64) * scale / GRID) * GRID


# --------------------------------------------------------------------------------- shift invariance
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("config_name", [name for name, config in CONFIGS.items() if config.ignore_index == -100])
def test_shifted_rows_give_the_reference_losses_and_gradients(config_name, dtype):
    """Adding c to a row changes nothing: z - LSE is never formed with a rounded LSE of size |c|."""
    table, config = digit_table(40), CONFIGS[config_name]
    rows = 24
    base = grid_logits(rows, table.vocab_size)
    labels = random_labels((rows,), table, ignore_fraction=0.1, generator=torch.Generator().manual_seed(1))
    upstream = torch.rand(2, rows, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    expected = reference_rows(base, labels, table, config, upstream)
    shifts = torch.tensor([0.0, 1e4, -1e4, 16000.0, -16000.0, 4096.0 + 0.5, -1234.0, 8191.0],
                          dtype=torch.float64).repeat(rows // 8)
    shifted = base + shifts[:, None]
    assert (shifted.to(dtype).double() == shifted).all(), "the shifted logits must be exact"
    assert_matches(cpp_rows(shifted.to(dtype), labels, table, config, upstream), expected, dtype, config_name)


@pytest.mark.parametrize("shift", [1e4, -1e4])
def test_shifted_rows_in_the_one_pass_path(shift):
    """The fused loss-and-gradient operator (reductions mean/sum on CPU) is shift-invariant too."""
    table, config = irregular_table(), LossConfig("mse", reweigh=True, gaussian_sigma=1.0)
    rows = 16
    base = grid_logits(rows, table.vocab_size, seed=3)
    labels = random_labels((rows,), table, generator=torch.Generator().manual_seed(4))
    scales = torch.rand(2, rows, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    ce, ntl, grad = cpp.ce_ntl_loss_and_grad((base + shift).float(), labels, table, config,
                                             scales[0].float(), scales[1].float())
    assert_matches((ce, ntl, grad), reference_rows(base, labels, table, config, scales), torch.float32, "fused")


# --------------------------------------------------------------------------------- masks
def _masked(base, labels, table, pattern, value):
    z = base.clone()
    ids = table.number_ids
    text = text_columns(table)
    if pattern.startswith("leading-"):
        z[:, : int(pattern.split("-")[1])] = value
    elif pattern == "every-text-token":
        z[:, text] = value
    elif pattern == "all-but-the-label":
        keep = z.gather(1, labels[:, None])
        z[:] = value
        z.scatter_(1, labels[:, None], keep)
    elif pattern == "every-number-token":
        z[:, ids] = value
    return z


# Leading blocks of every length relative to the CPU vector blocks (32 elements) and the number
# ids (70..79; leading-75 masks half of them, never the labels, which are 75..79 or text >= 85).
MASK_PATTERNS = ["leading-1", "leading-9", "leading-31", "leading-32", "leading-33", "leading-64",
                 "leading-70", "leading-75", "every-text-token", "all-but-the-label", "every-number-token"]


# Gaussian targets put mass on every number token, so masking one makes Gaussian-CE +inf at a
# -inf mask (and about 1e6 at -1e6): those pairs are not the same input and are left out.
MASK_CASES = [(config, pattern) for config in ["was", "mse-reweigh", "was_cdf", "was-gce", "huber-reweigh-gce"]
              for pattern in MASK_PATTERNS
              if CONFIGS[config].gaussian_sigma is None or pattern not in ("all-but-the-label", "leading-75")]


@pytest.mark.parametrize("mask", ["-inf", "-1e6", "-finfo.max"])
@pytest.mark.parametrize("config_name, pattern", MASK_CASES)
def test_masked_logits_give_the_reference_result(config_name, pattern, mask):
    """-inf logits are ordinary input, and masks written as big negatives behave like them: the
    result is the float64 reference's for the same mask at -1e6 (exp(-1e6) is 0 in float64)."""
    table, config = digit_table(100, first_id=70), CONFIGS[config_name]
    rows = 12
    base = grid_logits(rows, table.vocab_size, seed=6)
    generator = torch.Generator().manual_seed(7)
    if pattern == "every-number-token":  # the number columns are masked, so the labels are text
        labels = torch.randint(0, 70, (rows,), generator=generator)
    else:
        labels = table.number_ids[torch.randint(5, 10, (rows,), generator=generator)]
        if pattern != "every-text-token":
            labels[::3] = torch.randint(85, 100, (4,), generator=generator)
    value = {"-inf": float("-inf"), "-1e6": -1e6, "-finfo.max": torch.finfo(torch.float32).max * -1}[mask]
    upstream = torch.rand(2, rows, dtype=torch.float64, generator=generator)
    expected = reference_rows(_masked(base, labels, table, pattern, -1e6), labels, table, config, upstream)
    assert all(torch.isfinite(t).all() for t in expected)
    got = cpp_rows(_masked(base, labels, table, pattern, value).float(), labels, table, config, upstream)
    assert_matches(got, expected, torch.float32, f"{pattern} at {mask}")


# --------------------------------------------------------------------------------- number mass 1
def _number_rows_with_text_at(table, rows, seed, text_logit):
    """Labels drawn from the digits and float64 logits whose every text column is ``text_logit``."""
    generator = torch.Generator().manual_seed(seed)
    labels = table.number_ids[torch.randint(0, 10, (rows,), generator=generator)]
    logits = torch.randn(rows, table.vocab_size, generator=generator, dtype=torch.float64)
    logits[:, text_columns(table)] = text_logit
    return labels, logits


@pytest.mark.parametrize("mask", [float("-inf"), -1e6], ids=["-inf", "-1e6"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("loss", ["mse", "was", "mae", "huber", "was_cdf"])
def test_reweigh_when_every_text_logit_is_masked(loss, dtype, mask):
    """m = 1 to the last bit: c (1 - m) must be 0, not rounding noise times c (about 82 for MSE),
    which dwarfs a confident prediction's small loss (the tolerance scales with the largest loss)."""
    table, config = digit_table(40), LossConfig(loss, reweigh=True)
    rows = 64
    labels, logits = _number_rows_with_text_at(table, rows, 8, mask)
    logits.scatter_(1, labels[:, None], 9.0)  # confident and right: small losses
    upstream = torch.full((2, rows), 1.0 / rows, dtype=torch.float64)
    expected = reference_rows(logits, labels, table, config, upstream)
    assert_matches(cpp_rows(logits.to(dtype), labels, table, config, upstream), expected, dtype, loss)


@pytest.mark.parametrize("config_name", ["was", "mse", "mae", "huber", "was_cdf", "was_cdf-gauss"])
def test_confident_predictions_keep_their_small_losses_precise(config_name):
    """Most number mass on the label: the losses are small, and so is the tolerance (it scales with
    the largest loss). ŷ - y is summed as Σ q (v - y) and each CDF difference from its shorter side,
    so neither is rounding noise of |y| or of 1."""
    table, config = irregular_table(), CONFIGS[config_name]
    rows = 32
    generator = torch.Generator().manual_seed(22)
    labels = table.number_ids[torch.randint(0, table.number_ids.numel(), (rows,), generator=generator)]
    logits = torch.randn(rows, table.vocab_size, generator=generator, dtype=torch.float64)
    logits.scatter_(1, labels[:, None], 11.0)
    upstream = torch.full((2, rows), 1.0 / rows, dtype=torch.float64)
    _, ntl, grad = cpp_rows(logits.float(), labels, table, config, upstream)
    _, ntl_ref, grad_ref = reference_rows(logits, labels, table, config, upstream)
    assert_spec_close(ntl, ntl_ref, torch.float32, what="ntl")
    assert_spec_close(grad, grad_ref, torch.float32, gradient=True, what="grad")


@pytest.mark.parametrize("config_name", ["was", "was-squash", "mse", "mae", "huber", "was_cdf", "was_cdf-gauss"])
def test_confident_wrong_predictions_keep_their_gradient_precise(config_name):
    """Most number mass on one wrong token: the gradient q_k (x_k - E_q[x]) at that token is a
    small difference of two values near x_mode; summed relative to the mode it keeps its precision
    (MSE: 2.6e-5 error against a 1.5e-5 tolerance before)."""
    table, config = irregular_table(), CONFIGS[config_name]
    rows = 16
    generator = torch.Generator().manual_seed(24)
    ids = table.number_ids
    labels = ids[torch.randint(0, ids.numel(), (rows,), generator=generator)]
    wrong = ids[(torch.searchsorted(ids, labels) + torch.randint(1, ids.numel(), (rows,), generator=generator))
                % ids.numel()]
    logits = torch.randn(rows, table.vocab_size, generator=generator, dtype=torch.float64) * 3
    logits.scatter_(1, wrong[:, None], 12.0)
    upstream = torch.ones(2, rows, dtype=torch.float64)
    _, ntl, grad = cpp_rows(logits.float(), labels, table, config, upstream)
    _, ntl_ref, grad_ref = reference_rows(logits, labels, table, config, upstream)
    assert_spec_close(ntl, ntl_ref, torch.float32, what="ntl")
    assert_spec_close(grad, grad_ref, torch.float32, gradient=True, what="grad")


@pytest.mark.parametrize("config_name", ["was", "mse", "huber", "was_cdf", "was_cdf-gauss", "mse-reweigh"])
def test_multi_digit_table_with_the_expectation_near_the_label(config_name):
    """K = 1000 values 0-999 and spread predictions: ŷ is about 500, and so are the labels, so
    ŷ - y (and each v_k - ŷ) is small against |v|. The common rounding of the normaliser of q
    must not scale a sum of that size (MSE gradient error 5.5e-5 against 1.5e-5 before)."""
    from ntl_fast import NumberTokenTable

    table = NumberTokenTable.from_values({10 + i: float(i) for i in range(1000)}, vocab_size=1100)
    config = CONFIGS[config_name]
    rows = 16
    generator = torch.Generator().manual_seed(25)
    logits = torch.randn(rows, table.vocab_size, generator=generator, dtype=torch.float64) * 0.5
    labels = 10 + torch.randint(490, 510, (rows,), generator=generator)
    upstream = torch.full((2, rows), 1.0 / rows, dtype=torch.float64)
    _, ntl, grad = cpp_rows(logits.float(), labels, table, config, upstream)
    _, ntl_ref, grad_ref = reference_rows(logits, labels, table, config, upstream)
    assert_spec_close(ntl, ntl_ref, torch.float32, what="ntl")
    assert_spec_close(grad, grad_ref, torch.float32, gradient=True, what="grad")


@pytest.mark.parametrize("text_logit", [-30.0, -60.0])
def test_reweigh_when_the_text_mass_is_tiny(text_logit):
    """1 - m of 1e-13..1e-26 is formed from the text tokens' own sum, with full relative precision."""
    table, config = digit_table(40), LossConfig("mse", reweigh=True)
    rows = 8
    labels, logits = _number_rows_with_text_at(table, rows, 9, text_logit)
    text = text_columns(table)
    upstream = torch.full((2, rows), 1.0 / rows, dtype=torch.float64)
    _, ntl, grad = cpp_rows(logits.float(), labels, table, config, upstream)
    _, ntl_ref, grad_ref = reference_rows(logits, labels, table, config, upstream)
    assert_spec_close(ntl, ntl_ref, torch.float32, what="ntl")
    assert_spec_close(grad, grad_ref, torch.float32, gradient=True, what="grad")
    # The text columns' gradient (L - c) p_k (-m) is tiny; it must have the right relative size.
    text_grad, text_grad_ref = grad[:, text].double(), grad_ref[:, text]
    assert ((text_grad - text_grad_ref).abs() <= 1e-4 * text_grad_ref.abs()).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_reweigh_with_scattered_number_ids(dtype):
    """The text-only sum of reweighed rows skips every number column, wherever the ids fall
    relative to the vector blocks: runs of adjacent ids, ids on block edges, at 0 and at V - 1."""
    from ntl_fast import NumberTokenTable

    vocab_size = 2003
    generator = torch.Generator().manual_seed(23)
    ids = set(torch.randperm(vocab_size, generator=generator)[:250].tolist())
    ids |= {0, 1, 2, 31, 32, 63, 64, 95, 96, 97, vocab_size - 2, vocab_size - 1}
    values = {i: float(k % 37) - 4.5 for k, i in enumerate(sorted(ids))}
    table = NumberTokenTable.from_values(values, vocab_size=vocab_size)
    rows = 12
    logits = torch.randn(rows, vocab_size, generator=generator, dtype=torch.float64) * 2
    labels = table.number_ids[torch.randint(0, len(ids), (rows,), generator=generator)]
    labels[::4] = 5 if 5 not in ids else 6
    logits = logits.to(dtype)
    upstream = torch.rand(2, rows, dtype=torch.float64, generator=generator)
    for config in (LossConfig("mse", reweigh=True), LossConfig("was_cdf", reweigh=True, gaussian_sigma=2.0)):
        got = cpp_rows(logits, labels, table, config, upstream)
        assert_matches(got, reference_rows(logits, labels, table, config, upstream), dtype, config.loss)


# --------------------------------------------------------------------------------- non-finite rows
@pytest.mark.parametrize("config_name", ["was", "mse-reweigh", "was_cdf-gauss", "huber-reweigh-gce"])
def test_non_finite_logits_stay_in_their_row(config_name):
    """+inf/NaN in a text, number or label column: that row's CE is non-finite, its NTL too
    wherever the reference's is (a +inf text logit leaves the reweighed reference NTL finite, at
    c), and every other row is bitwise what it is without the bad rows."""
    table, config = digit_table(40), CONFIGS[config_name]
    rows = 12
    logits = grid_logits(rows, table.vocab_size, seed=10).float()
    labels = table.number_ids[torch.arange(rows) % 10].clone()
    labels[1::4] = 30  # text labels
    bad = {0: (3, float("nan")), 1: (30, float("inf")), 4: (int(labels[4]), float("inf")),
           5: (int(table.number_ids[2]), float("nan")), 8: (0, float("inf"))}
    dirty = logits.clone()
    for row, (column, value) in bad.items():
        dirty[row, column] = value
    upstream = torch.ones(2, rows, dtype=torch.float64)
    ce, ntl, grad = cpp_rows(dirty, labels, table, config, upstream)
    ce_ref, ntl_ref, _ = reference_rows(dirty, labels, table, config, upstream)
    clean = [r for r in range(rows) if r not in bad]
    ce_clean, ntl_clean, grad_clean = cpp_rows(logits[clean], labels[clean], table, config, upstream[:, clean])
    assert torch.equal(ce[clean], ce_clean) and torch.equal(ntl[clean], ntl_clean)
    assert torch.equal(grad[clean], grad_clean)
    for row in bad:
        assert not torch.isfinite(ce[row]) and not torch.isfinite(ce_ref[row])
        assert torch.isfinite(ntl_ref[row]) or not torch.isfinite(ntl[row]), f"row {row}: NTL {ntl[row]}"


@pytest.mark.parametrize("config_name", ["was", "mse-reweigh", "was_cdf-gauss", "huber-reweigh-gce"])
def test_zero_upstream_rows_get_an_exactly_zero_gradient(config_name):
    """Zero-weight rows (upstream gradient 0) and ignored rows: gradient exactly 0 whatever their
    logits, through the backward operators and the one-pass operator."""
    table, config = digit_table(40), CONFIGS[config_name]
    rows = 8
    logits = grid_logits(rows, table.vocab_size, seed=11).float()
    labels = table.number_ids[torch.arange(rows) % 10].clone()
    labels[6] = 30
    labels[7] = config.ignore_index
    logits[0, 3], logits[1, 30], logits[2, int(labels[2])] = float("nan"), float("inf"), float("-inf")
    logits[3] = float("nan")
    logits[6, 30], logits[7, 5] = float("nan"), float("inf")
    upstream = torch.ones(2, rows, dtype=torch.float64)
    upstream[:, :4] = 0
    upstream[:, 6] = 0
    _, _, grad = cpp_rows(logits, labels, table, config, upstream)
    scales = upstream.float()
    ce, ntl, fused_grad = cpp.ce_ntl_loss_and_grad(logits, labels, table, config, scales[0], scales[1])
    for g in (grad, fused_grad):
        assert torch.equal(g[[0, 1, 2, 3, 6, 7]], torch.zeros(6, table.vocab_size))
        assert torch.isfinite(g[4:6]).all()
    assert ce[7] == 0 and ntl[7] == 0


def test_out_of_range_labels_give_nan_rows_int32():
    table = digit_table(40)
    logits = grid_logits(5, table.vocab_size, seed=12).float()
    labels = torch.tensor([40, -1, 2**31 - 1, -(2**31), 9], dtype=torch.int32)
    ce, ntl, grad = cpp_rows(logits, labels, table, LossConfig("was", reweigh=True), torch.ones(2, 5))
    assert torch.isnan(ce[:4]).all() and torch.isnan(ntl[:4]).all()
    assert torch.isfinite(ce[4]) and torch.isfinite(ntl[4]) and torch.isfinite(grad).all()
    assert torch.equal(grad[:4], torch.zeros(4, table.vocab_size))


# --------------------------------------------------------------------------------- raw operators
def _raw_args(table, config=LossConfig("was_cdf", reweigh=True)):
    return list(table.kernel_tensors()), list(cpp._option_args(table, config))


def _strided(t):
    """The same values in a non-contiguous view."""
    return torch.stack([t, torch.zeros_like(t)], dim=-1)[..., 0]


def test_raw_backward_rejects_non_contiguous_saved_statistics():
    table = digit_table(40)
    logits = grid_logits(6, table.vocab_size, seed=13).float()
    labels = table.number_ids[:6]
    table_args, option_args = _raw_args(table)
    saved = ops.ce_ntl_forward(logits, labels, table_args, *option_args)[2:]
    grad = torch.ones(6)
    strided = [_strided(t) for t in saved]
    with pytest.raises(RuntimeError, match="must be contiguous"):
        ops.ce_ntl_backward(grad, grad, logits, labels, *strided, table_args, *option_args)
    with pytest.raises(RuntimeError, match="must be contiguous"):
        ops.ntl_backward(grad, logits, labels, *strided, table_args, *option_args)


def test_raw_operators_accept_strided_row_gradients_and_labels():
    """Arguments the operators copy to contiguous (labels, upstream gradients) give the same result."""
    table = digit_table(40)
    logits = grid_logits(6, table.vocab_size, seed=14).float()
    labels = table.number_ids[:6].clone()
    table_args, option_args = _raw_args(table)
    saved = ops.ce_ntl_forward(logits, labels, table_args, *option_args)[2:]
    grad = torch.linspace(0.5, 1.5, 6)
    want = ops.ce_ntl_backward(grad, grad, logits, labels, *saved, table_args, *option_args)
    got = ops.ce_ntl_backward(_strided(grad), _strided(grad), logits, _strided(labels), *saved,
                              table_args, *option_args)
    assert torch.equal(got, want)


def _corrupt(table, case):
    ids, values, index, order, rank, gaps, is_number = (t.clone() for t in table.kernel_tensors())
    if case == "duplicate id":
        ids[1] = ids[0]
    elif case == "id out of range":
        ids[-1] = table.vocab_size
    elif case == "negative id":
        ids[0] = -1
    elif case == "index not the inverse":
        index[int(ids[0])], index[int(ids[1])] = 1, 0
    elif case == "index extra entry":
        index[0] = 3
    elif case == "order not a permutation":
        order[1] = order[0]
    elif case == "order out of range":
        order[0] = table.num_numbers if hasattr(table, "num_numbers") else len(ids)
    elif case == "order does not sort":
        order = order.flip(0).contiguous()
    elif case == "NaN value":
        values[2] = float("nan")
    elif case == "infinite value":
        values[2] = float("inf")
    elif case == "NaN gap":
        gaps[0] = float("nan")
    return [ids, values, index, order, rank, gaps, is_number]


@pytest.mark.parametrize("case, match", [
    ("duplicate id", "number_ids holds .* more than once"),
    ("id out of range", "number_ids holds 40, outside the vocabulary"),
    ("negative id", "number_ids holds -1, outside the vocabulary"),
    ("index not the inverse", "number_index"),
    ("index extra entry", r"number_index\[0\] = 3"),
    ("order not a permutation", "value_order must be a permutation"),
    ("order out of range", "value_order must be a permutation"),
    ("order does not sort", "value_order must sort number_values"),
    ("NaN value", r"number_values\[2\] is nan"),
    ("infinite value", r"number_values\[2\] is inf"),
    ("NaN gap", r"sorted_gaps\[0\] is nan"),
])
def test_cpu_operators_reject_corrupt_tables(case, match):
    table = digit_table(40)
    logits = grid_logits(4, table.vocab_size, seed=15).float()
    labels = table.number_ids[:4]
    table_args, option_args = _raw_args(table)
    corrupt = _corrupt(table, case)
    grad = torch.ones(4)
    saved = ops.ce_ntl_forward(logits, labels, table_args, *option_args)[2:]
    calls = [
        lambda: ops.ce_ntl_forward(logits, labels, corrupt, *option_args),
        lambda: ops.ntl_forward(logits, labels, corrupt, *option_args),
        lambda: ops.ce_ntl_backward(grad, grad, logits, labels, *saved, corrupt, *option_args),
        lambda: ops.ntl_backward(grad, logits, labels, *saved, corrupt, *option_args),
        lambda: ops.ce_ntl_backward_(logits.clone(), grad, grad, labels, *saved, corrupt, *option_args),
        lambda: ops.ce_ntl_loss_and_grad(logits, labels, grad, grad, corrupt, *option_args),
    ]
    for call in calls:
        with pytest.raises(RuntimeError, match=match):
            call()


# --------------------------------------------------------------------------------- layouts, repeats
LAYOUTS = ["strided rows", "transposed", "column slice", "row slice", "expanded row"]


def _layout(logits, layout):
    rows, vocab = logits.shape
    if layout == "strided rows":
        return torch.cat([logits, torch.zeros(rows, 5)], dim=1)[:, :vocab]
    if layout == "transposed":
        return logits.t().contiguous().t()
    if layout == "column slice":
        return torch.stack([torch.zeros_like(logits), logits], dim=-1)[..., 1]
    if layout == "row slice":
        return torch.stack([logits, torch.zeros_like(logits)], dim=1).reshape(2 * rows, vocab)[::2]
    if layout == "expanded row":
        return logits[:1].expand(rows, vocab)
    raise AssertionError(layout)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("config_name", ["was", "mse-reweigh", "was_cdf-gauss"])
def test_any_logits_layout_gives_bitwise_the_contiguous_result(config_name, layout):
    table, config = digit_table(40), CONFIGS[config_name]
    rows = 9
    logits = grid_logits(rows, table.vocab_size, seed=16).float()
    labels = random_labels((2 * rows,), table, generator=torch.Generator().manual_seed(17))[::2]
    view = _layout(logits, layout)
    assert not view.is_contiguous()
    upstream = torch.rand(2, rows, dtype=torch.float64, generator=torch.Generator().manual_seed(18))
    want = cpp_rows(view.contiguous(), labels.contiguous(), table, config, upstream)
    got = cpp_rows(view, labels, table, config, upstream)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    fused = cpp.ce_ntl_loss_and_grad(view, labels, table, config, upstream[0].float(), upstream[1].float())
    fused_want = cpp.ce_ntl_loss_and_grad(view.contiguous(), labels.contiguous(), table, config,
                                          upstream[0].float(), upstream[1].float())
    for a, b in zip(fused, fused_want):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_identical_calls_are_bitwise_identical(dtype):
    """Rows are split across threads; each row is computed on its own, so the split never matters."""
    table, config = digit_table(1000, first_id=500), LossConfig("was_cdf", reweigh=True, gaussian_sigma=1.0)
    rows = 300
    logits = grid_logits(rows, table.vocab_size, seed=19).to(dtype)
    labels = random_labels((rows,), table, generator=torch.Generator().manual_seed(20))
    upstream = torch.rand(2, rows, dtype=torch.float64, generator=torch.Generator().manual_seed(21))
    first = cpp_rows(logits, labels, table, config, upstream)
    for _ in range(2):
        for a, b in zip(cpp_rows(logits, labels, table, config, upstream), first):
            assert torch.equal(a, b)
    # The same rows in another batch (another split across threads) give the same numbers.
    for a, b in zip(cpp_rows(logits[7:50], labels[7:50], table, config, upstream[:, 7:50]), first):
        assert torch.equal(a, b[7:50])
