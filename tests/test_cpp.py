"""The compiled C++ operators (ntl_fast._C, backend "cpp") on CPU against the PyTorch reference.

Parity runs the reference in float64 on the very same (for bf16/fp16: already rounded) inputs and
applies the tolerances of docs/math.md §6 through helpers.assert_spec_close.
"""

import pytest
import torch

cpp = pytest.importorskip(
    "ntl_fast.cpp", reason="ntl_fast._C is not built (pip install --no-build-isolation -e .)"
)

import ntl_fast  # noqa: E402
from ntl_fast import reference  # noqa: E402
from ntl_fast.config import LossConfig  # noqa: E402

from helpers import assert_spec_close, digit_table, irregular_table, random_labels  # noqa: E402

ops = torch.ops.ntl_fast

CONFIGS = {
    "was": LossConfig("was"),
    "was-squash": LossConfig("was", squash_factor=4.0),
    "mse": LossConfig("mse"),
    "mae": LossConfig("mae"),
    "huber": LossConfig("huber"),
    "was_cdf": LossConfig("was_cdf"),
    "was_cdf-gauss": LossConfig("was_cdf", gaussian_sigma=0.8),
    "was-gce": LossConfig("was", gaussian_sigma=1.0),
    "was-reweigh": LossConfig("was", reweigh=True),
    "was-squash-reweigh": LossConfig("was", squash_factor=2.5, reweigh=True),
    "mse-reweigh": LossConfig("mse", reweigh=True),
    "mae-reweigh": LossConfig("mae", reweigh=True),
    "huber-reweigh-gce": LossConfig("huber", reweigh=True, gaussian_sigma=1.5),
    "was_cdf-reweigh": LossConfig("was_cdf", reweigh=True),
    "ignore-7": LossConfig("was", ignore_index=7),
}

TABLES = {
    "digits-V40": lambda: digit_table(40),
    "digits-V67": lambda: digit_table(67, first_id=50),  # V not a multiple of the vector width
    "irregular-K7": lambda: irregular_table(),  # number ids at 0 and V-1, duplicated value
}

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def make_inputs(table, rows, dtype, config=LossConfig(), scale=3.0, seed=0):
    generator = torch.Generator().manual_seed(seed)
    logits = (torch.randn(rows, table.vocab_size, generator=generator) * scale).to(dtype)
    labels = random_labels((rows,), table, ignore_index=config.ignore_index, generator=generator)
    labels[0] = 0
    labels[-1] = table.vocab_size - 1
    return logits, labels


def reference_rows(logits, labels, table, config, upstream):
    """Reference CE and NTL in float64 on the same values, and d(Σ w·rows)/d logits."""
    x = logits.detach().double().requires_grad_()
    ce, ntl = reference.ce_ntl_rows(x, labels, table, config)
    (ce * upstream[0].double() + ntl * upstream[1].double()).sum().backward()
    return ce, ntl, x.grad


# --------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("table_name", TABLES)
@pytest.mark.parametrize("config_name", CONFIGS)
def test_ce_ntl_rows_parity(config_name, table_name, dtype):
    table, config = TABLES[table_name](), CONFIGS[config_name]
    logits, labels = make_inputs(table, 29, dtype, config)
    upstream = torch.randn(2, 29, dtype=torch.float64)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    x = logits.clone().requires_grad_()
    ce, ntl = cpp.ce_ntl_rows(x, labels, table, config)
    assert ce.dtype == acc and ntl.dtype == acc
    (ce * upstream[0].to(acc) + ntl * upstream[1].to(acc)).sum().backward()
    ce_ref, ntl_ref, grad_ref = reference_rows(logits, labels, table, config, upstream)
    assert_spec_close(ce, ce_ref, dtype, what="ce")
    assert_spec_close(ntl, ntl_ref, dtype, what="ntl")
    assert x.grad.dtype == dtype
    assert_spec_close(x.grad, grad_ref, dtype, gradient=True, what="d logits")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("table_name", TABLES)
@pytest.mark.parametrize("config_name", CONFIGS)
def test_ntl_rows_parity(config_name, table_name, dtype):
    table, config = TABLES[table_name](), CONFIGS[config_name]
    logits, labels = make_inputs(table, 23, dtype, config, seed=1)
    upstream = torch.randn(23, dtype=torch.float64)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    x = logits.clone().requires_grad_()
    ntl = cpp.ntl_rows(x, labels, table, config)
    (ntl * upstream.to(acc)).sum().backward()
    y = logits.detach().double().requires_grad_()
    ntl_ref = reference.ntl_rows(y, labels, table, config)
    (ntl_ref * upstream).sum().backward()
    assert_spec_close(ntl, ntl_ref, dtype, what="ntl")
    assert_spec_close(x.grad, y.grad, dtype, gradient=True, what="d logits")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("options", [
    dict(loss="was"),
    dict(loss="mse", reweigh=True),
    dict(loss="was_cdf", gaussian_sigma=1.0),
    dict(loss="was", squash_factor=3.0, reduction="sum"),
    dict(loss="huber", reduction="none"),
], ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_public_api_parity(options, dtype):
    """cross_entropy_with_ntl / number_token_loss with backend="cpp" vs backend="reference"."""
    table = irregular_table()
    logits, labels = make_inputs(table, 24, dtype)
    logits, labels = logits.view(4, 6, -1), labels.view(4, 6)
    weights = torch.rand(4, 6)
    results = {}
    for backend in ("cpp", "reference"):
        x = logits.clone().requires_grad_()
        out = ntl_fast.cross_entropy_with_ntl(x, labels, table, weights=weights, backend=backend, **options)
        out.loss.sum().backward()
        ntl_options = {k: v for k, v in options.items() if k != "gaussian_sigma"}
        y = logits.clone().requires_grad_()
        ntl = ntl_fast.number_token_loss(y, labels, table, backend=backend, **ntl_options)
        ntl.sum().backward()
        results[backend] = (out.loss, out.ce, out.ntl, x.grad, ntl, y.grad)
    names = ("loss", "ce", "ntl", "d logits (CE+NTL)", "number_token_loss", "d logits (NTL)")
    for name, got, want in zip(names, results["cpp"], results["reference"]):
        # the reference ran on the same dtype here, so it carries its own rounding: compare as §6
        assert_spec_close(got, want, dtype, gradient=name.startswith("d "), what=name)


# --------------------------------------------------------------------------------- edge shapes
def _check_against_reference(logits, labels, table, config=LossConfig()):
    upstream = torch.randn(2, labels.numel(), dtype=torch.float64)
    x = logits.clone().requires_grad_()
    ce, ntl = cpp.ce_ntl_rows(x, labels, table, config)
    (ce * upstream[0].float() + ntl * upstream[1].float()).sum().backward()
    ce_ref, ntl_ref, grad_ref = reference_rows(logits, labels, table, config, upstream)
    assert_spec_close(ce, ce_ref, logits.dtype, what="ce")
    assert_spec_close(ntl, ntl_ref, logits.dtype, what="ntl")
    assert_spec_close(x.grad, grad_ref, logits.dtype, gradient=True, what="d logits")
    return ce, ntl, x.grad


@pytest.mark.parametrize("vocab_size", [11, 16, 31, 32, 33, 64, 65, 1000, 1037])
def test_vocabulary_tails(vocab_size):
    """Every remainder of the vectorised loops (V mod 16, V mod 32), digits at the end."""
    table = digit_table(vocab_size, first_id=vocab_size - 10)
    for dtype in (torch.float32, torch.bfloat16):
        logits, labels = make_inputs(table, 9, dtype, scale=4.0)
        _check_against_reference(logits, labels, table, LossConfig("was", reweigh=True))


def test_single_row():
    table = digit_table(40)
    logits, _ = make_inputs(table, 1, torch.float32)
    _check_against_reference(logits, torch.tensor([9]), table)


def test_every_row_ignored():
    table = digit_table(40)
    logits, _ = make_inputs(table, 5, torch.float32)
    ce, ntl, grad = _check_against_reference(logits, torch.full((5,), -100), table)
    assert ce.abs().max() == 0 and ntl.abs().max() == 0 and grad.abs().max() == 0
    out = ntl_fast.cross_entropy_with_ntl(logits.requires_grad_(), torch.full((5,), -100), table, backend="cpp")
    out.loss.backward()
    assert out.loss.item() == 0 and logits.grad.abs().max() == 0


def test_no_number_label():
    table = digit_table(40, first_id=7)
    logits, _ = make_inputs(table, 6, torch.float32)
    labels = torch.tensor([0, 1, 30, 39, 6, 17])
    _, ntl, _ = _check_against_reference(logits, labels, table, LossConfig("was_cdf", reweigh=True))
    assert ntl.abs().max() == 0


def test_int32_labels():
    table = irregular_table()
    logits, labels = make_inputs(table, 12, torch.float32)
    ce64, ntl64 = cpp.ce_ntl_rows(logits, labels, table, LossConfig())
    ce32, ntl32 = cpp.ce_ntl_rows(logits, labels.int(), table, LossConfig())
    assert torch.equal(ce64, ce32) and torch.equal(ntl64, ntl32)


def test_large_logits_do_not_overflow():
    table = digit_table(300, first_id=100)
    logits, labels = make_inputs(table, 8, torch.float32, scale=1.0)
    logits = logits * 1e4
    ce, ntl, grad = _check_against_reference(logits, labels, table, LossConfig("was", reweigh=True))
    assert torch.isfinite(ce).all() and torch.isfinite(ntl).all() and torch.isfinite(grad).all()


def test_many_rows_across_threads():
    table = digit_table(3001, first_id=1234)
    logits, labels = make_inputs(table, 257, torch.bfloat16)
    _check_against_reference(logits, labels, table, LossConfig("mse", reweigh=True, gaussian_sigma=1.0))


# --------------------------------------------------------------------------------- gradcheck
@pytest.mark.parametrize("config_name", ["was", "was-squash", "mse", "huber", "was_cdf", "was_cdf-gauss",
                                         "was-gce", "was-reweigh", "mae-reweigh", "was_cdf-reweigh"])
def test_gradcheck_float64(config_name):
    config = CONFIGS[config_name]
    table = irregular_table(vocab_size=13 + 40)
    logits, labels = make_inputs(table, 6, torch.float64, scale=1.0, seed=3)
    labels[1] = table.number_ids[2]
    x = logits.clone().requires_grad_()

    def both(z):
        return cpp.ce_ntl_rows(z, labels, table, config)

    assert torch.autograd.gradcheck(both, (x,), eps=1e-6, atol=1e-6)
    assert torch.autograd.gradcheck(lambda z: cpp.ntl_rows(z, labels, table, config), (x,), eps=1e-6, atol=1e-6)


# --------------------------------------------------------------------------------- opcheck
def _op_samples():
    table = irregular_table()
    for dtype, config in [(torch.float32, LossConfig("was")),
                          (torch.bfloat16, LossConfig("was_cdf", gaussian_sigma=1.0)),
                          (torch.float64, LossConfig("mse", reweigh=True))]:
        logits, labels = make_inputs(table, 7, dtype, config)
        table_args = cpp._table_args(table)
        option_args = cpp._option_args(table, config)
        yield logits, labels, table_args, option_args


def test_opcheck_forward_ops():
    for logits, labels, table_args, option_args in _op_samples():
        x = logits.clone().requires_grad_()
        torch.library.opcheck(ops.ntl_forward, (x, labels, *table_args, *option_args))
        torch.library.opcheck(ops.ce_ntl_forward, (x, labels, *table_args, *option_args, False))


def test_opcheck_backward_ops():
    for logits, labels, table_args, option_args in _op_samples():
        _, _, row_stats = ops.ce_ntl_forward(logits, labels, *table_args, *option_args)
        grad_ce, grad_ntl = torch.randn(2, logits.shape[0], dtype=row_stats.dtype)
        torch.library.opcheck(ops.ntl_backward, (grad_ntl, logits, labels, row_stats, *table_args, *option_args))
        torch.library.opcheck(ops.ce_ntl_backward, (grad_ce, grad_ntl, logits, labels, row_stats,
                                                    *table_args, *option_args))
        torch.library.opcheck(ops.ce_ntl_backward_, (logits.clone(), grad_ce, grad_ntl, labels, row_stats,
                                                     *table_args, *option_args))


# --------------------------------------------------------------------------------- in place
def test_inplace_backward_writes_the_gradient_over_the_logits():
    table = digit_table(40)
    logits, labels = make_inputs(table, 10, torch.float32)
    w = torch.randn(10, 40)
    grads = []
    for inplace in (False, True):
        x = logits.clone().requires_grad_()
        z = x * 1.0  # a non-leaf, as an LM head's output is
        out = ntl_fast.cross_entropy_with_ntl(z, labels, table, backend="cpp", inplace=inplace)
        out.loss.backward()
        grads.append(x.grad)
        if inplace:
            assert torch.equal(z.detach(), x.grad)  # the buffer now holds the gradient
    assert_spec_close(grads[1], grads[0], torch.float32, gradient=True, what="in-place gradient")
    # another user of the same logits fails loudly instead of reading the gradient
    x = logits.clone().requires_grad_()
    z = x * 1.0
    other = (z.square() * w).sum()  # square saves z for its backward
    out = ntl_fast.cross_entropy_with_ntl(z, labels, table, backend="cpp", inplace=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (out.loss + other).backward()


# --------------------------------------------------------------------------------- loss and gradient in one pass
_FUSED = "_CrossEntropyWithNTLAndGradientBackward"


def _fused_case(case, reduction):
    """Inputs and keyword arguments of one case of the one-pass path (reduction "mean"/"sum")."""
    table = irregular_table()
    dtype = torch.bfloat16 if case == "bf16" else torch.float32
    logits, labels = make_inputs(table, 24, dtype, seed=5)
    options = dict(reduction=reduction, loss="was")
    if case == "weights":
        options["weights"] = torch.rand(24, generator=torch.Generator().manual_seed(6))
    elif case == "tensor-normalizers":
        options.update(ce_normalizer=torch.tensor(40.0), ntl_normalizer=torch.tensor(13.0), ntl_weight=0.8)
    elif case == "no-number-label":
        labels = torch.where(table.number_index[labels.clamp(min=0)] >= 0, torch.full_like(labels, 3), labels)
    elif case == "all-ignored":
        labels = torch.full_like(labels, -100)
    elif case == "zero-weights":
        options["weights"] = torch.zeros(24)
    elif case == "reweigh-gce":
        options.update(loss="was_cdf", reweigh=True, gaussian_sigma=1.0)
    return table, logits, labels, options


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("case", ["plain", "weights", "tensor-normalizers", "bf16", "no-number-label",
                                  "all-ignored", "zero-weights", "reweigh-gce"])
def test_loss_and_grad_in_one_pass_matches_reference(case, reduction):
    """backend="cpp" with reduction mean/sum writes the gradient in the forward; the loss, the
    logged terms and the gradient (for grad_output != 1 too) equal the reference's."""
    table, logits, labels, options = _fused_case(case, reduction)
    results = {}
    for backend in ("cpp", "reference"):
        x = logits.clone().view(4, 6, -1).requires_grad_()
        out = ntl_fast.cross_entropy_with_ntl(x, labels.view(4, 6), table, backend=backend,
                                              **{k: v.view(4, 6) if k == "weights" else v
                                                 for k, v in options.items()})
        if backend == "cpp":
            assert type(out.loss.grad_fn).__name__ == _FUSED
        assert out.ce.grad_fn is None and out.ntl.grad_fn is None
        (2.5 * out.loss).backward()
        results[backend] = (out.loss, out.ce, out.ntl, x.grad)
    for name, got, want in zip(("loss", "ce", "ntl", "d logits"), results["cpp"], results["reference"]):
        assert_spec_close(got, want, logits.dtype, gradient=name == "d logits", what=name)
    if case in ("all-ignored", "zero-weights"):
        assert results["cpp"][0].item() == 0 and results["cpp"][3].abs().max() == 0


def test_loss_and_grad_in_one_pass_gradient_is_not_copied():
    """With grad_output == 1 the kernel's gradient becomes logits.grad as it is."""
    table = digit_table(40)
    logits, labels = make_inputs(table, 8, torch.float32)
    x = logits.clone().requires_grad_()
    out = ntl_fast.cross_entropy_with_ntl(x, labels, table, backend="cpp")
    saved = out.loss.grad_fn.saved_tensors[0]
    out.loss.backward()
    assert x.grad.data_ptr() == saved.data_ptr()


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_loss_and_grad_in_one_pass_gradcheck_float64(reduction):
    table = irregular_table(vocab_size=13 + 40)
    logits, labels = make_inputs(table, 6, torch.float64, scale=1.0, seed=3)
    labels[1] = table.number_ids[2]
    weights = torch.rand(6, dtype=torch.float64)
    x = logits.clone().requires_grad_()

    def loss(z):
        out = ntl_fast.cross_entropy_with_ntl(z, labels, table, backend="cpp", reduction=reduction,
                                              weights=weights, reweigh=True)
        assert type(out.loss.grad_fn).__name__ == _FUSED
        return out.loss

    assert torch.autograd.gradcheck(loss, (x,), eps=1e-6, atol=1e-6)


def test_two_pass_path_where_one_pass_does_not_apply():
    """reduction "none", no_grad and weights that need a gradient keep the two-pass path (inplace=True
    takes the one-pass path: its gradient is written over the logits in the forward)."""
    table = digit_table(40)
    logits, labels = make_inputs(table, 10, torch.float32)
    x = logits.clone().requires_grad_()
    assert type(ntl_fast.cross_entropy_with_ntl(x, labels, table, backend="cpp", reduction="none")
                .loss.grad_fn).__name__ != _FUSED
    assert type(ntl_fast.cross_entropy_with_ntl(x * 1.0, labels, table, backend="cpp", inplace=True)
                .loss.grad_fn).__name__ == _FUSED
    with torch.no_grad():
        assert ntl_fast.cross_entropy_with_ntl(x, labels, table, backend="cpp").loss.grad_fn is None
    weights = torch.rand(10, requires_grad=True)
    out = ntl_fast.cross_entropy_with_ntl(x, labels, table, backend="cpp", weights=weights)
    assert type(out.loss.grad_fn).__name__ != _FUSED
    out.loss.backward()
    assert weights.grad is not None and x.grad is not None


def test_opcheck_loss_and_grad_op():
    for logits, labels, table_args, option_args in _op_samples():
        acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
        ce_scale, ntl_scale = torch.rand(2, logits.shape[0], dtype=acc)
        torch.library.opcheck(ops.ce_ntl_loss_and_grad, (logits, labels, ce_scale, ntl_scale, *table_args,
                                                         *option_args))


def test_raw_loss_and_grad_rejects_mismatched_scales():
    table = digit_table(40)
    logits, labels = make_inputs(table, 4, torch.float32)
    table_args, option_args = _raw_args(table)
    with pytest.raises(RuntimeError, match="ce_scale must have shape"):
        ops.ce_ntl_loss_and_grad(logits, labels, torch.ones(3), torch.ones(4), *table_args, *option_args)


# --------------------------------------------------------------------------------- torch.compile
@pytest.mark.parametrize("reduction, scale", [("mean", 1.0), ("sum", 2.5)])
def test_torch_compile_fullgraph(reduction, scale):
    """Through the one-pass path (reduction mean/sum, logits that need a gradient)."""
    table = digit_table(40)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 40))
    hidden = torch.randn(3, 5, 16)
    labels = random_labels((3, 5), table)
    weights = torch.rand(3, 5)

    def step(hidden, labels):
        out = ntl_fast.cross_entropy_with_ntl(model(hidden), labels, table, backend="cpp", loss="was",
                                              reweigh=True, shift_labels=True, reduction=reduction,
                                              weights=weights)
        return scale * out.loss

    compiled = torch.compile(step, fullgraph=True)
    loss = compiled(hidden, labels)
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    eager = step(hidden, labels)
    eager.backward()
    assert_spec_close(loss, eager, torch.float32, what="compiled loss")
    for got, param in zip(grads, model.parameters()):
        assert_spec_close(got, param.grad, torch.float32, gradient=True, what="compiled gradient")


# --------------------------------------------------------------------------------- bad input
def test_out_of_range_labels_give_nan_not_a_crash():
    table = digit_table(40)
    logits, _ = make_inputs(table, 5, torch.float32)
    labels = torch.tensor([40, -1, 10**12, -(10**12), 9])
    x = logits.clone().requires_grad_()
    out = ntl_fast.cross_entropy_with_ntl(x, labels, table, backend="cpp", validate=False, reduction="none")
    assert torch.isnan(out.ce[:4]).all() and torch.isnan(out.ntl[:4]).all()
    assert torch.isfinite(out.ce[4]) and torch.isfinite(out.ntl[4])
    ntl = ntl_fast.number_token_loss(logits, labels, table, backend="cpp", validate=False, reduction="none")
    assert torch.isnan(ntl[:4]).all()
    ce, ntl = cpp.ce_ntl_rows(x, labels, table, LossConfig())
    (ce[4] + ntl[4]).backward()
    assert torch.isfinite(x.grad).all() and x.grad[:4].abs().max() == 0


def _raw_args(table, config=LossConfig()):
    return cpp._table_args(table), cpp._option_args(table, config)


@pytest.mark.parametrize("case, match", [
    ("int logits", "logits must be float32"),
    ("1-D logits", "logits must be 2-D"),
    ("non-contiguous logits", "logits must be contiguous"),
    ("labels shape", "labels must have shape"),
    ("float labels", "labels must be int64 or int32"),
    ("table dtype", "number_values must be Float"),
    ("table size", "number_index must have shape"),
    ("unknown loss", "loss must be one of"),
])
def test_raw_op_rejects_bad_arguments(case, match):
    table = digit_table(40)
    logits, labels = make_inputs(table, 4, torch.float32)
    table_args, option_args = _raw_args(table)
    table_args, option_args = list(table_args), list(option_args)
    if case == "int logits":
        logits = logits.long()
    elif case == "1-D logits":
        logits = logits[0]
    elif case == "non-contiguous logits":
        logits = torch.randn(40, 4).t()
    elif case == "labels shape":
        labels = labels[:3]
    elif case == "float labels":
        labels = labels.float()
    elif case == "table dtype":
        table_args[1] = table_args[1].double()
    elif case == "table size":
        table_args[2] = table_args[2][:-1]
    elif case == "unknown loss":
        option_args[0] = "l2"
    with pytest.raises(RuntimeError, match=match):
        ops.ce_ntl_forward(logits, labels, *table_args, *option_args)


def test_raw_backward_rejects_mismatched_statistics():
    table = digit_table(40)
    logits, labels = make_inputs(table, 4, torch.float32)
    table_args, option_args = _raw_args(table)
    _, _, row_stats = ops.ce_ntl_forward(logits, labels, *table_args, *option_args)
    grad = torch.ones(4)
    with pytest.raises(RuntimeError, match="row_stats must have shape"):
        ops.ce_ntl_backward(grad, grad, logits, labels, row_stats[:3], *table_args, *option_args)
    with pytest.raises(RuntimeError, match="row_stats must be Float"):
        ops.ntl_backward(grad, logits, labels, row_stats.double(), *table_args, *option_args)


def test_unsupported_reason():
    assert cpp.unsupported_reason("cpu") is None
    assert cpp.unsupported_reason("meta") is not None
    if not torch.cuda.is_available():
        reason = cpp.unsupported_reason("cuda")
        built_with_cuda = torch._C._dispatch_has_kernel_for_dispatch_key("ntl_fast::ce_ntl_forward", "CUDA")
        assert (reason is None) == built_with_cuda
