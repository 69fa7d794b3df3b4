"""The compiled operators (ntl_fast._C, backend "cpp") against the PyTorch reference.

Each test is written once and runs on every device it takes: CPU, and CUDA where there is a device
and the extension has its CUDA kernels (skipped with the reason otherwise). Parity runs the
reference in float64 on the very same (for bf16/fp16: already rounded) inputs and applies the
tolerances of docs/math.md §6 through helpers.assert_spec_close.
"""

import pytest
import torch

cpp = pytest.importorskip(
    "ntl_fast.cpp", reason="ntl_fast._C is not built (pip install --no-build-isolation -e .)"
)

import ntl_fast  # noqa: E402
from ntl_fast import NumberTokenTable, reference  # noqa: E402
from ntl_fast.config import LossConfig, accumulation_dtype  # noqa: E402

from helpers import (  # noqa: E402
    assert_spec_close, check_one_pass_under_cuda_graph, digit_table, irregular_table, random_labels,
)

ops = torch.ops.ntl_fast


def _cuda_skip_reason():
    if not torch.cuda.is_available():
        return "needs a CUDA device"
    return cpp.unsupported_reason("cuda")


_CUDA_SKIP = _cuda_skip_reason()
CUDA = pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(_CUDA_SKIP is not None, reason=str(_CUDA_SKIP))])
DEVICES = ["cpu", CUDA]


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


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
    "ignore-in-range": LossConfig("was", ignore_index=3),
}

TABLES = {
    "digits-V40": lambda: digit_table(40),
    "digits-V67": lambda: digit_table(67, first_id=50),  # V not a multiple of the vector width
    "digits-V1037": lambda: digit_table(1037, first_id=1027),  # digits at the very end
    "digits-V32128": lambda: digit_table(32128, first_id=16000),  # 512 threads per row on CUDA
    "irregular-K7": lambda: irregular_table(),  # number ids at 0 and V-1, duplicated value
}

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def make_inputs(table, rows, dtype, config=LossConfig(), scale=3.0, seed=0, device="cpu"):
    generator = torch.Generator().manual_seed(seed)
    logits = (torch.randn(rows, table.vocab_size, generator=generator) * scale).to(dtype)
    labels = random_labels((rows,), table, ignore_index=config.ignore_index, generator=generator)
    labels[0] = 0
    labels[-1] = table.vocab_size - 1
    return logits.to(device), labels.to(device)


def cpp_rows(logits, labels, table, config, upstream):
    """CE and NTL rows of the C++ backend and d(Σ upstream·rows)/d logits."""
    acc = accumulation_dtype(logits.dtype)
    x = logits.clone().requires_grad_()
    ce, ntl = cpp.ce_ntl_rows(x, labels, table, config)
    (ce * upstream[0].to(acc) + ntl * upstream[1].to(acc)).sum().backward()
    return ce.detach(), ntl.detach(), x.grad


def reference_rows(logits, labels, table, config, upstream):
    """Reference CE and NTL in float64 on the same values, and d(Σ upstream·rows)/d logits."""
    x = logits.detach().double().clone().requires_grad_()
    ce, ntl = reference.ce_ntl_rows(x, labels, table, config)
    (ce * upstream[0].double() + ntl * upstream[1].double()).sum().backward()
    return ce.detach(), ntl.detach(), x.grad


def assert_matches(got, expected, dtype, what):
    for name, a, b, gradient in zip(("ce", "ntl", "grad"), got, expected, (False, False, True)):
        assert_spec_close(a, b, dtype, gradient=gradient, what=f"{what} {name}")


def text_columns(table):
    """(V,) bool: the columns that are not number tokens."""
    text = torch.ones(table.vocab_size, dtype=torch.bool)
    text[table.number_ids.cpu()] = False
    return text


# --------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("table_name", TABLES)
@pytest.mark.parametrize("config_name", CONFIGS)
def test_ce_ntl_rows_parity(device, config_name, table_name, dtype):
    table, config = TABLES[table_name]().to(device), CONFIGS[config_name]
    logits, labels = make_inputs(table, 29, dtype, config, device=device)
    upstream = torch.randn(2, 29, dtype=torch.float64).to(device)
    ce, ntl, grad = cpp_rows(logits, labels, table, config, upstream)
    assert ce.dtype == accumulation_dtype(dtype) and ntl.dtype == accumulation_dtype(dtype)
    assert grad.dtype == dtype
    assert_matches((ce, ntl, grad), reference_rows(logits, labels, table, config, upstream), dtype, config_name)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("table_name", TABLES)
@pytest.mark.parametrize("config_name", CONFIGS)
def test_ntl_rows_parity(device, config_name, table_name, dtype):
    table, config = TABLES[table_name]().to(device), CONFIGS[config_name]
    logits, labels = make_inputs(table, 23, dtype, config, seed=1, device=device)
    upstream = torch.randn(23, dtype=torch.float64).to(device)
    x = logits.clone().requires_grad_()
    ntl = cpp.ntl_rows(x, labels, table, config)
    (ntl * upstream.to(ntl.dtype)).sum().backward()
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
    dict(loss="was", reweigh=True, shift_labels=True),
], ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_public_api_parity(device, options, dtype):
    """cross_entropy_with_ntl / number_token_loss with backend="cpp" vs backend="reference"."""
    table = irregular_table().to(device)
    logits, labels = make_inputs(table, 24, dtype, device=device)
    logits, labels = logits.view(4, 6, -1), labels.view(4, 6)
    weights = torch.rand(4, 6).to(device)
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
    upstream = torch.randn(2, labels.numel(), dtype=torch.float64).to(logits.device)
    got = cpp_rows(logits, labels, table, config, upstream)
    assert_matches(got, reference_rows(logits, labels, table, config, upstream), logits.dtype, "cpp")
    return got


@pytest.mark.parametrize("vocab_size", [11, 16, 31, 32, 33, 64, 65, 1000, 1037])
def test_vocabulary_tails(device, vocab_size):
    """Every remainder of the vectorised loops (V mod 16, V mod 32), digits at the end."""
    table = digit_table(vocab_size, first_id=vocab_size - 10).to(device)
    for dtype in (torch.float32, torch.bfloat16):
        logits, labels = make_inputs(table, 9, dtype, scale=4.0, device=device)
        _check_against_reference(logits, labels, table, LossConfig("was", reweigh=True))


def test_single_row(device):
    table = digit_table(40).to(device)
    logits, _ = make_inputs(table, 1, torch.float32, device=device)
    _check_against_reference(logits, torch.tensor([9], device=device), table)


def test_every_row_ignored(device):
    table = digit_table(40).to(device)
    logits, _ = make_inputs(table, 5, torch.float32, device=device)
    labels = torch.full((5,), -100, device=device)
    ce, ntl, grad = _check_against_reference(logits, labels, table)
    assert ce.abs().max() == 0 and ntl.abs().max() == 0 and grad.abs().max() == 0
    out = ntl_fast.cross_entropy_with_ntl(logits.requires_grad_(), labels, table, backend="cpp")
    out.loss.backward()
    assert out.loss.item() == 0 and logits.grad.abs().max() == 0


def test_no_number_label(device):
    table = digit_table(40, first_id=7).to(device)
    logits, _ = make_inputs(table, 6, torch.float32, device=device)
    labels = torch.tensor([0, 1, 30, 39, 6, 17], device=device)
    _, ntl, _ = _check_against_reference(logits, labels, table, LossConfig("was_cdf", reweigh=True))
    assert ntl.abs().max() == 0


def test_int32_labels(device):
    table = irregular_table().to(device)
    logits, labels = make_inputs(table, 12, torch.float32, device=device)
    ce64, ntl64 = cpp.ce_ntl_rows(logits, labels, table, LossConfig())
    ce32, ntl32 = cpp.ce_ntl_rows(logits, labels.int(), table, LossConfig())
    assert torch.equal(ce64, ce32) and torch.equal(ntl64, ntl32)


def test_large_logits_do_not_overflow(device):
    table = digit_table(300, first_id=100).to(device)
    logits, labels = make_inputs(table, 8, torch.float32, scale=1.0, device=device)
    logits = logits * 1e4
    ce, ntl, grad = _check_against_reference(logits, labels, table, LossConfig("was", reweigh=True))
    assert torch.isfinite(ce).all() and torch.isfinite(ntl).all() and torch.isfinite(grad).all()


def test_many_rows_across_threads(device):
    table = digit_table(3001, first_id=1234).to(device)
    logits, labels = make_inputs(table, 257, torch.bfloat16, device=device)
    _check_against_reference(logits, labels, table, LossConfig("mse", reweigh=True, gaussian_sigma=1.0))


def test_many_number_tokens(device):
    """A multi-digit vocabulary (K = 1000; on CUDA every fix stays in shared memory)."""
    table = NumberTokenTable.from_values({10 + i: float(i) for i in range(1000)}, vocab_size=4096).to(device)
    config = LossConfig("was", squash_factor=10.0)
    logits, labels = make_inputs(table, 16, torch.float32, config, scale=1.0, device=device)
    upstream = torch.ones(2, 16, dtype=torch.float64, device=device)
    got = cpp_rows(logits, labels, table, config, upstream)
    assert_matches(got, reference_rows(logits, labels, table, config, upstream), torch.float32, "K=1000")


@pytest.mark.parametrize("config_name", ["was", "mse-reweigh", "was_cdf-gauss", "was_cdf-reweigh"])
@pytest.mark.parametrize("case", ["shift+1e4", "shift-1e4", "text at -inf", "text at -1e6", "leading -inf"])
def test_shifted_and_masked_rows_at_a_large_vocabulary(device, config_name, case):
    """Shift invariance and masks (docs/math.md §4) through the row log-sum-exp, including the
    text-only sum of reweighed rows, at V = 32128 (512 threads per row on CUDA)."""
    table, config = digit_table(32128, first_id=16000).to(device), CONFIGS[config_name]
    rows = 16
    generator = torch.Generator().manual_seed(30)
    logits = torch.round(torch.randn(rows, table.vocab_size, generator=generator, dtype=torch.float64) * 3072) / 1024
    labels = table.number_ids.cpu()[torch.randint(0, 10, (rows,), generator=generator)]
    labels[::4] = 16100  # text labels, never masked below
    text = text_columns(table)
    text[16100] = False
    if case.startswith("shift"):
        shifted = logits + float(case[5:])
    else:
        shifted = logits.clone()
        if case == "leading -inf":
            shifted[:, :9000] = float("-inf")
        else:
            shifted[:, text] = float("-inf") if "inf" in case else -1e6
        logits = shifted.clamp(min=-1e6)  # the reference on finite masks (exp(-1e6) is 0 in float64)
    upstream = torch.rand(2, rows, dtype=torch.float64, generator=generator).to(device)
    labels = labels.to(device)
    got = cpp_rows(shifted.float().to(device), labels, table, config, upstream)
    assert_matches(got, reference_rows(logits.to(device), labels, table, config, upstream), torch.float32, case)


# --------------------------------------------------------------------------------- gradcheck
@pytest.mark.parametrize("config_name", ["was", "was-squash", "mse", "huber", "was_cdf", "was_cdf-gauss",
                                         "was-gce", "was-reweigh", "mae-reweigh", "was_cdf-reweigh"])
def test_gradcheck_float64(device, config_name):
    config = CONFIGS[config_name]
    table = irregular_table(vocab_size=13 + 40).to(device)
    logits, labels = make_inputs(table, 6, torch.float64, scale=1.0, seed=3, device=device)
    labels[1] = table.number_ids[2]
    x = logits.clone().requires_grad_()

    def both(z):
        return cpp.ce_ntl_rows(z, labels, table, config)

    assert torch.autograd.gradcheck(both, (x,), eps=1e-6, atol=1e-6)
    assert torch.autograd.gradcheck(lambda z: cpp.ntl_rows(z, labels, table, config), (x,), eps=1e-6, atol=1e-6)


# --------------------------------------------------------------------------------- opcheck
def _op_samples(device):
    table = irregular_table().to(device)
    for dtype, config in [(torch.float32, LossConfig("was")),
                          (torch.bfloat16, LossConfig("was_cdf", gaussian_sigma=1.0, reweigh=True)),
                          (torch.float64, LossConfig("mse", reweigh=True))]:
        logits, labels = make_inputs(table, 7, dtype, config, device=device)
        yield logits, labels, table.kernel_tensors(), cpp._option_args(table, config)


def _one_pass_samples(device):
    """The samples the one-pass operators serve on this device (fuses_loss_and_grad)."""
    for logits, labels, table_arg, option_args in _op_samples(device):
        if cpp.fuses_loss_and_grad(logits):
            scales = torch.rand(2, logits.shape[0], dtype=accumulation_dtype(logits.dtype), device=device)
            yield logits, labels, scales, table_arg, option_args


def test_opcheck_forward_ops(device):
    for logits, labels, table_arg, option_args in _op_samples(device):
        x = logits.clone().requires_grad_()
        torch.library.opcheck(ops.ntl_forward, (x, labels, table_arg, *option_args))
        torch.library.opcheck(ops.ce_ntl_forward, (x, labels, table_arg, *option_args, False))


def test_opcheck_backward_ops(device):
    for logits, labels, table_arg, option_args in _op_samples(device):
        _, _, row_stats = ops.ce_ntl_forward(logits, labels, table_arg, *option_args)
        grad_ce, grad_ntl = torch.randn(2, logits.shape[0], dtype=row_stats.dtype, device=device)
        torch.library.opcheck(ops.ntl_backward, (grad_ntl, logits, labels, row_stats, table_arg, *option_args))
        torch.library.opcheck(ops.ce_ntl_backward, (grad_ce, grad_ntl, logits, labels, row_stats, table_arg,
                                                    *option_args))
        torch.library.opcheck(ops.ce_ntl_backward_, (logits.clone(), grad_ce, grad_ntl, labels, row_stats,
                                                     table_arg, *option_args))


def test_opcheck_loss_and_grad_ops(device):
    samples = list(_one_pass_samples(device))
    assert samples, "no dtype is served by the one-pass operators"
    for logits, labels, (ce_scale, ntl_scale), table_arg, option_args in samples:
        args = (labels, ce_scale, ntl_scale, table_arg, *option_args)
        torch.library.opcheck(ops.ce_ntl_loss_and_grad, (logits, *args))
        torch.library.opcheck(ops.ce_ntl_loss_and_grad_, (logits.clone(), *args))


@pytest.mark.parametrize("scale", [1.0, 2.5])
def test_opcheck_scale_gradient(device, scale):
    for dtype in DTYPES:
        grad = torch.randn(5, 7, device=device).to(dtype)
        torch.library.opcheck(ops.scale_gradient_, (grad, torch.tensor(scale, dtype=accumulation_dtype(dtype),
                                                                        device=device)))


# --------------------------------------------------------------------------------- in place
@pytest.mark.parametrize("dtype, vocab_size", [(torch.float32, 40), (torch.bfloat16, 32128)], ids=str)
def test_inplace_backward_writes_the_gradient_over_the_logits(device, dtype, vocab_size):
    table = digit_table(vocab_size, first_id=100 if vocab_size > 1000 else 7).to(device)
    logits, labels = make_inputs(table, 10, dtype, device=device)
    w = torch.randn(10, vocab_size, device=device)
    grads = []
    for inplace in (False, True):
        x = logits.clone().requires_grad_()
        z = x * 1  # a non-leaf, as an LM head's output is
        out = ntl_fast.cross_entropy_with_ntl(z, labels, table, backend="cpp", inplace=inplace)
        out.loss.backward()
        grads.append(x.grad)
        if inplace:
            assert torch.equal(z.detach(), x.grad)  # the buffer now holds the gradient
    assert torch.equal(grads[1], grads[0])
    # another user of the same logits fails loudly instead of reading the gradient
    x = logits.clone().requires_grad_()
    z = x * 1
    other = (z.square() * w).sum()  # square saves z for its backward
    out = ntl_fast.cross_entropy_with_ntl(z, labels, table, backend="cpp", inplace=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (out.loss + other).backward()


# --------------------------------------------------------------------------------- loss and gradient in one pass
@pytest.fixture
def one_pass_calls(monkeypatch):
    """Counts the calls of cpp.ce_ntl_loss_and_grad: whether the API took the one-pass path."""
    calls = []
    original = cpp.ce_ntl_loss_and_grad

    def counted(*args, **kwargs):
        calls.append(args[0].dtype)
        return original(*args, **kwargs)

    monkeypatch.setattr(cpp, "ce_ntl_loss_and_grad", counted)
    return calls


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
def test_loss_and_grad_in_one_pass_matches_reference(device, one_pass_calls, case, reduction):
    """backend="cpp" with reduction mean/sum writes the gradient in the forward; the loss, the
    logged terms and the gradient (for grad_output != 1 too) equal the reference's."""
    table, logits, labels, options = _fused_case(case, reduction)
    table = table.to(device)
    options = {k: v.to(device).view(4, 6) if k == "weights" else v.to(device) if torch.is_tensor(v) else v
               for k, v in options.items()}
    results = {}
    for backend in ("cpp", "reference"):
        x = logits.clone().to(device).view(4, 6, -1).requires_grad_()
        out = ntl_fast.cross_entropy_with_ntl(x, labels.to(device).view(4, 6), table, backend=backend, **options)
        assert out.ce.grad_fn is None and out.ntl.grad_fn is None
        (2.5 * out.loss).backward()
        results[backend] = (out.loss, out.ce, out.ntl, x.grad)
    assert one_pass_calls == [logits.dtype]
    for name, got, want in zip(("loss", "ce", "ntl", "d logits"), results["cpp"], results["reference"]):
        assert_spec_close(got, want, logits.dtype, gradient=name == "d logits", what=name)
    if case in ("all-ignored", "zero-weights"):
        assert results["cpp"][0].item() == 0 and results["cpp"][3].abs().max() == 0


def test_loss_and_grad_in_one_pass_gradient_is_not_copied(device):
    """With grad_output == 1 the kernel's gradient becomes logits.grad as it is."""
    table = digit_table(40).to(device)
    logits, labels = make_inputs(table, 8, torch.float32, device=device)
    x = logits.clone().requires_grad_()
    out = ntl_fast.cross_entropy_with_ntl(x, labels, table, backend="cpp")
    saved = out.loss.grad_fn.saved_tensors[0]
    out.loss.backward()
    assert x.grad.data_ptr() == saved.data_ptr()


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_loss_and_grad_in_one_pass_gradcheck_float64(one_pass_calls, reduction):
    """On CPU, which serves float64 in one pass (CUDA serves float32 and bfloat16 only)."""
    table = irregular_table(vocab_size=13 + 40)
    logits, labels = make_inputs(table, 6, torch.float64, scale=1.0, seed=3)
    labels[1] = table.number_ids[2]
    weights = torch.rand(6, dtype=torch.float64)
    x = logits.clone().requires_grad_()

    def loss(z):
        return ntl_fast.cross_entropy_with_ntl(z, labels, table, backend="cpp", reduction=reduction,
                                               weights=weights, reweigh=True).loss

    assert torch.autograd.gradcheck(loss, (x,), eps=1e-6, atol=1e-6)
    assert one_pass_calls and set(one_pass_calls) == {torch.float64}


def test_two_pass_path_where_one_pass_does_not_apply(device, one_pass_calls):
    """reduction "none", no_grad and weights that need a gradient keep the two-pass path; inplace=True
    takes the one-pass path (its gradient is written over the logits in the forward)."""
    table = digit_table(40).to(device)
    logits, labels = make_inputs(table, 10, torch.float32, device=device)
    x = logits.clone().requires_grad_()
    ntl_fast.cross_entropy_with_ntl(x, labels, table, backend="cpp", reduction="none")
    with torch.no_grad():
        assert ntl_fast.cross_entropy_with_ntl(x, labels, table, backend="cpp").loss.grad_fn is None
    weights = torch.rand(10, requires_grad=True, device=device)
    out = ntl_fast.cross_entropy_with_ntl(x, labels, table, backend="cpp", weights=weights)
    assert one_pass_calls == []
    out.loss.backward()
    assert weights.grad is not None and x.grad is not None
    ntl_fast.cross_entropy_with_ntl(x * 1.0, labels, table, backend="cpp", inplace=True)
    assert len(one_pass_calls) == 1


def test_fuses_loss_and_grad(device):
    """CPU serves every dtype in one pass; CUDA float32 and bfloat16 (float16 keeps two passes: its
    gradient would underflow before the loss scale is applied)."""
    served = {dtype: cpp.fuses_loss_and_grad(torch.empty(2, 3, dtype=dtype, device=device)) for dtype in DTYPES}
    if device == "cpu":
        assert all(served.values())
    else:
        assert served == {torch.float32: True, torch.bfloat16: True, torch.float16: False, torch.float64: False}
    assert not cpp.fuses_loss_and_grad(torch.empty(2, 3, device="meta"))


@pytest.mark.parametrize("layout", ["contiguous", "strided"])
def test_loss_and_grad_in_place_equals_out_of_place(device, layout):
    """inplace=True gives bitwise the out-of-place losses and gradient, written over the logits'
    buffer (which it returns), and bumps their version so that saved users fail loudly."""
    table = irregular_table().to(device)
    config = LossConfig("was_cdf", reweigh=True, gaussian_sigma=1.0)
    for logits, labels, (ce_scale, ntl_scale), _, _ in _one_pass_samples(device):
        want = cpp.ce_ntl_loss_and_grad(logits, labels, table, config, ce_scale, ntl_scale)
        buffer = logits.clone() if layout == "contiguous" else torch.stack([logits, logits], dim=-1)[..., 0]
        version = buffer._version
        got = cpp.ce_ntl_loss_and_grad(buffer, labels, table, config, ce_scale, ntl_scale, inplace=True)
        assert got[2] is buffer and buffer._version > version
        for a, b in zip(got, want):
            assert torch.equal(a, b)


def test_loss_and_grad_in_place_refuses_a_leaf_that_requires_grad(device):
    table = digit_table(40).to(device)
    logits, labels = make_inputs(table, 4, torch.float32, device=device)
    scale = torch.ones(4, device=device)
    with pytest.raises(RuntimeError, match="leaf that requires grad"):
        cpp.ce_ntl_loss_and_grad(logits.requires_grad_(), labels, table, LossConfig(), scale, scale, inplace=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_scale_gradient(device, dtype):
    """grad *= grad_output in place, as torch's mul_ does; at 1 nothing is written."""
    grad = (torch.randn(6, 33) * 3).to(dtype).to(device)
    scale = torch.tensor(-2.5, dtype=accumulation_dtype(dtype), device=device)
    want = grad.clone().mul_(scale)
    assert cpp.scale_gradient_(grad, scale) is grad
    assert torch.equal(grad, want)
    if device == "cpu":
        version = grad._version
        cpp.scale_gradient_(grad, torch.ones((), dtype=accumulation_dtype(dtype)))
        assert grad._version == version  # skipped, not multiplied by 1
    kept = grad.clone()
    cpp.scale_gradient_(grad, torch.ones((), dtype=torch.float32, device=device))
    assert torch.equal(grad, kept)


def test_scale_gradient_rejects_bad_arguments(device):
    grad = torch.randn(4, 5, device=device)
    with pytest.raises(RuntimeError, match="grad_output must be a 0-d tensor"):
        cpp.scale_gradient_(grad, torch.ones(1, device=device))
    with pytest.raises(RuntimeError, match="grad must be contiguous"):
        cpp.scale_gradient_(grad.t(), torch.tensor(2.0, device=device))
    with pytest.raises(RuntimeError, match="grad must be float32"):
        cpp.scale_gradient_(grad.long(), torch.tensor(2.0, device=device))


def test_scale_gradient_under_torch_compile():
    def step(grad, grad_output):
        return cpp.scale_gradient_(grad * 1, grad_output)

    compiled = torch.compile(step, fullgraph=True)
    grad = torch.randn(3, 7)
    for value in (1.0, 0.5):
        grad_output = torch.tensor(value)
        assert torch.equal(compiled(grad, grad_output), step(grad, grad_output))


def test_raw_loss_and_grad_rejects_mismatched_scales(device):
    table = digit_table(40).to(device)
    logits, labels = make_inputs(table, 4, torch.float32, device=device)
    with pytest.raises(RuntimeError, match="ce_scale must have shape"):
        ops.ce_ntl_loss_and_grad(logits, labels, torch.ones(3, device=device), torch.ones(4, device=device),
                                 table.kernel_tensors(), *cpp._option_args(table, LossConfig()))


# --------------------------------------------------------------------------------- torch.compile
@pytest.mark.parametrize("reduction, scale", [("mean", 1.0), ("sum", 2.5)])
def test_torch_compile_fullgraph(device, reduction, scale):
    """Through the one-pass path (reduction mean/sum, logits that need a gradient)."""
    table = digit_table(40).to(device)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 40)).to(device)
    hidden = torch.randn(3, 5, 16).to(device)
    labels = random_labels((3, 5), table).to(device)
    weights = torch.rand(3, 5).to(device)

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


@pytest.mark.gpu
@pytest.mark.skipif(_CUDA_SKIP is not None, reason=str(_CUDA_SKIP))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_one_pass_replays_under_cuda_graph_capture(dtype):
    check_one_pass_under_cuda_graph("cpp", dtype)


# --------------------------------------------------------------------------------- bad input
def test_out_of_range_labels_give_nan_not_a_crash(device):
    table = digit_table(40).to(device)
    logits, _ = make_inputs(table, 5, torch.float32, device=device)
    labels = torch.tensor([40, -1, 10**12, -(10**12), 9], device=device)
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
    return list(table.kernel_tensors()), list(cpp._option_args(table, config))


@pytest.mark.parametrize("case, match", [
    ("int logits", "logits must be float32"),
    ("1-D logits", "logits must be 2-D"),
    ("non-contiguous logits", "logits must be contiguous"),
    ("labels shape", "labels must have shape"),
    ("float labels", "labels must be int64 or int32"),
    ("table dtype", "number_values must be Float"),
    ("table size", "number_index must have shape"),
    ("table count", "table must be the 7 tensors of NumberTokenTable.kernel_tensors"),
    ("unknown loss", "loss must be an ntl_fast.config.LossKind code"),
])
def test_raw_op_rejects_bad_arguments(device, case, match):
    table = digit_table(40).to(device)
    logits, labels = make_inputs(table, 4, torch.float32, device=device)
    table_arg, option_args = _raw_args(table)
    if case == "int logits":
        logits = logits.long()
    elif case == "1-D logits":
        logits = logits[0]
    elif case == "non-contiguous logits":
        logits = torch.randn(40, 4, device=device).t()
    elif case == "labels shape":
        labels = labels[:3]
    elif case == "float labels":
        labels = labels.float()
    elif case == "table dtype":
        table_arg[1] = table_arg[1].double()
    elif case == "table size":
        table_arg[2] = table_arg[2][:-1]
    elif case == "table count":
        table_arg = table_arg[:-1]
    elif case == "unknown loss":
        option_args[0] = 7
    with pytest.raises(RuntimeError, match=match):
        ops.ce_ntl_forward(logits, labels, table_arg, *option_args)


def test_table_tensors_are_read_in_kernel_tensors_order(device):
    """The operators name each entry of the table list as NumberTokenTable.KERNEL_TENSORS does."""
    table = digit_table(40).to(device)
    logits, labels = make_inputs(table, 4, torch.float32, device=device)
    _, option_args = _raw_args(table)
    for position, name in enumerate(NumberTokenTable.KERNEL_TENSORS):
        table_arg = list(table.kernel_tensors())
        table_arg[position] = table_arg[position].to(torch.int8)
        with pytest.raises(RuntimeError, match=rf"ntl_fast: {name} must be \w+, got Char"):
            ops.ce_ntl_forward(logits, labels, table_arg, *option_args)


def test_raw_backward_rejects_mismatched_statistics(device):
    table = digit_table(40).to(device)
    logits, labels = make_inputs(table, 4, torch.float32, device=device)
    table_arg, option_args = _raw_args(table)
    _, _, row_stats = ops.ce_ntl_forward(logits, labels, table_arg, *option_args)
    grad = torch.ones(4, device=device)
    with pytest.raises(RuntimeError, match="row_stats must have shape"):
        ops.ce_ntl_backward(grad, grad, logits, labels, row_stats[:3], table_arg, *option_args)
    with pytest.raises(RuntimeError, match="row_stats must be Float"):
        ops.ntl_backward(grad, logits, labels, row_stats.double(), table_arg, *option_args)


def test_unsupported_reason():
    assert cpp.unsupported_reason("cpu") is None
    assert cpp.unsupported_reason("meta") is not None
    if not torch.cuda.is_available():
        reason = cpp.unsupported_reason("cuda")
        built_with_cuda = torch._C._dispatch_has_kernel_for_dispatch_key("ntl_fast::ce_ntl_forward", "CUDA")
        assert (reason is None) == built_with_cuda


# --------------------------------------------------------------------------------- CUDA beside CPU
@pytest.mark.parametrize("device", [CUDA])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_cuda_matches_cpu_kernels(device, dtype):
    table, config = digit_table(5003, first_id=17), LossConfig("was", reweigh=True, gaussian_sigma=1.0)
    logits, labels = make_inputs(table, 64, dtype, config)
    upstream = torch.randn(2, 64, dtype=torch.float64)
    got = cpp_rows(logits.to(device), labels.to(device), table.to(device), config, upstream.to(device))
    assert_matches(got, cpp_rows(logits, labels, table, config, upstream), dtype, "CUDA vs CPU")


@pytest.mark.parametrize("device", [CUDA])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_matches_triton(device, dtype):
    pytest.importorskip("ntl_fast.triton", reason="the Triton backend does not import")
    table = digit_table(32128, first_id=100).to(device)
    logits, labels = make_inputs(table, 256, dtype, device=device)
    logits, labels = logits.view(4, 64, -1), labels.view(4, 64)
    results = {}
    for backend in ("cpp", "triton"):
        x = logits.clone().requires_grad_()
        out = ntl_fast.cross_entropy_with_ntl(x, labels, table, backend=backend, loss="was")
        out.loss.backward()
        results[backend] = (out.loss, x.grad)
    assert_spec_close(results["cpp"][0], results["triton"][0], dtype, what="loss")
    assert_spec_close(results["cpp"][1], results["triton"][1], dtype, gradient=True, what="d logits")


@pytest.mark.parametrize("device", [CUDA])
def test_too_many_number_tokens_is_a_clear_error(device):
    table = NumberTokenTable.from_values({i: float(i) for i in range(7000)}, vocab_size=7001).to(device)
    logits = torch.randn(2, 7001, device=device)
    with pytest.raises(RuntimeError, match="at most"):
        cpp.ce_ntl_rows(logits, torch.tensor([1, 2], device=device), table, LossConfig())


@pytest.mark.parametrize("device", [CUDA])
@pytest.mark.parametrize("case", ["duplicate ids", "order not a permutation"])
def test_cuda_corrupt_tables_stay_deterministic(device, case):
    """The CUDA operators read no table on the host (the CPU ones refuse a corrupt table:
    tests/test_cpp_numerics.py): whatever it holds, the kernels stay in bounds, write
    zero-initialised fixes and give bitwise the same gradient on every call."""
    table = digit_table(40)
    config = LossConfig("was_cdf" if case.startswith("order") else "mse")
    table_arg = [t.clone() for t in table.kernel_tensors()]
    ids, index, order = table_arg[0], table_arg[2], table_arg[3]
    if case == "duplicate ids":
        index[int(ids[1])] = -1
        ids[1] = ids[0]
    else:  # a value_order that is not a permutation
        order[3] = 99
        order[5] = order[4]
    table_arg = [t.to(device) for t in table_arg]
    option_args = cpp._option_args(table, config)
    generator = torch.Generator().manual_seed(31)
    logits = torch.randn(64, 40, generator=generator).to(device)
    labels = table.number_ids[torch.randint(0, 10, (64,), generator=generator)].to(device)
    grad = torch.ones(64, device=device)
    results = []
    for _ in range(3):
        ce, ntl, row_stats = ops.ce_ntl_forward(logits, labels, table_arg, *option_args)
        d = ops.ce_ntl_backward(grad, grad, logits, labels, row_stats, table_arg, *option_args)
        torch.cuda.synchronize()
        results.append((ce, ntl, d))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a.nan_to_num(), b.nan_to_num()) and torch.equal(a.isnan(), b.isnan())
    assert not torch.isnan(results[0][2]).any()
