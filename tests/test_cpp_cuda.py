"""The CUDA kernels of ntl_fast._C (backend "cpp" on CUDA tensors) against the PyTorch reference,
the C++ CPU kernels and, where it imports, the Triton backend. Skipped without a GPU or without an
extension built with CUDA (scripts/build_cuda_extension.sh)."""

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)
cpp = pytest.importorskip(
    "ntl_fast.cpp", reason="ntl_fast._C is not built (scripts/build_cuda_extension.sh)"
)
if cpp.unsupported_reason("cuda") is not None:
    pytest.skip(cpp.unsupported_reason("cuda"), allow_module_level=True)

import ntl_fast  # noqa: E402
from ntl_fast import NumberTokenTable, reference  # noqa: E402
from ntl_fast.config import LossConfig  # noqa: E402

from helpers import assert_spec_close, digit_table, irregular_table, random_labels  # noqa: E402

pytestmark = pytest.mark.gpu

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
    "mse-reweigh": LossConfig("mse", reweigh=True),
    "was_cdf-reweigh": LossConfig("was_cdf", reweigh=True),
    "ignore-in-range": LossConfig("was", ignore_index=3),
}

TABLES = {
    "digits-V40": lambda: digit_table(40),
    "digits-V32128": lambda: digit_table(32128, first_id=16000),
    "digits-V1037": lambda: digit_table(1037, first_id=1027),  # digits at the very end
    "irregular-K7": lambda: irregular_table(),
}

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def make_inputs(table, rows, dtype, config=LossConfig(), scale=3.0, seed=0):
    generator = torch.Generator().manual_seed(seed)
    logits = (torch.randn(rows, table.vocab_size, generator=generator) * scale).to(dtype)
    labels = random_labels((rows,), table, ignore_index=config.ignore_index, generator=generator)
    labels[0] = 0
    labels[-1] = table.vocab_size - 1
    return logits.cuda(), labels.cuda()


def cuda_rows(logits, labels, table, config, upstream):
    x = logits.clone().requires_grad_()
    ce, ntl = cpp.ce_ntl_rows(x, labels, table.to("cuda"), config)
    (ce * upstream[0].to(ce.dtype) + ntl * upstream[1].to(ntl.dtype)).sum().backward()
    torch.cuda.synchronize()
    return ce, ntl, x.grad


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("table_name", TABLES)
@pytest.mark.parametrize("config_name", CONFIGS)
def test_cuda_matches_reference(config_name, table_name, dtype):
    table, config = TABLES[table_name](), CONFIGS[config_name]
    logits, labels = make_inputs(table, 33, dtype, config)
    upstream = torch.randn(2, 33, dtype=torch.float64, device="cuda")
    ce, ntl, grad = cuda_rows(logits, labels, table, config, upstream)
    x = logits.detach().double().requires_grad_()
    ce_ref, ntl_ref = reference.ce_ntl_rows(x, labels, table.to("cuda"), config)
    (ce_ref * upstream[0] + ntl_ref * upstream[1]).sum().backward()
    assert_spec_close(ce, ce_ref, dtype, what="ce")
    assert_spec_close(ntl, ntl_ref, dtype, what="ntl")
    assert grad.dtype == dtype
    assert_spec_close(grad, x.grad, dtype, gradient=True, what="d logits")


@pytest.mark.parametrize("config_name", ["was", "was_cdf-gauss", "mse-reweigh"])
def test_ntl_only_matches_reference(config_name):
    table, config = irregular_table(), CONFIGS[config_name]
    logits, labels = make_inputs(table, 40, torch.float32, config)
    x = logits.clone().requires_grad_()
    ntl = cpp.ntl_rows(x, labels, table.to("cuda"), config)
    ntl.sum().backward()
    y = logits.double().requires_grad_()
    ntl_ref = reference.ntl_rows(y, labels, table.to("cuda"), config)
    ntl_ref.sum().backward()
    assert_spec_close(ntl, ntl_ref, torch.float32, what="ntl")
    assert_spec_close(x.grad, y.grad, torch.float32, gradient=True, what="d logits")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_matches_cpu_kernels(dtype):
    table, config = digit_table(5003, first_id=17), LossConfig("was", reweigh=True, gaussian_sigma=1.0)
    logits, labels = make_inputs(table, 64, dtype, config)
    upstream = torch.randn(2, 64, dtype=torch.float64, device="cuda")
    ce, ntl, grad = cuda_rows(logits, labels, table, config, upstream)
    x = logits.cpu().requires_grad_()
    ce_cpu, ntl_cpu = cpp.ce_ntl_rows(x, labels.cpu(), table, config)
    (ce_cpu * upstream[0].cpu().float() + ntl_cpu * upstream[1].cpu().float()).sum().backward()
    assert_spec_close(ce, ce_cpu, dtype, what="ce")
    assert_spec_close(ntl, ntl_cpu, dtype, what="ntl")
    assert_spec_close(grad, x.grad, dtype, gradient=True, what="d logits")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_matches_triton(dtype):
    pytest.importorskip("ntl_fast.triton", reason="the Triton backend does not import")
    table = digit_table(32128, first_id=100).to("cuda")
    logits, labels = make_inputs(table, 256, dtype)
    logits, labels = logits.view(4, 64, -1), labels.view(4, 64)
    results = {}
    for backend in ("cpp", "triton"):
        x = logits.clone().requires_grad_()
        out = ntl_fast.cross_entropy_with_ntl(x, labels, table, backend=backend, loss="was")
        out.loss.backward()
        results[backend] = (out.loss, x.grad)
    assert_spec_close(results["cpp"][0], results["triton"][0], dtype, what="loss")
    assert_spec_close(results["cpp"][1], results["triton"][1], dtype, gradient=True, what="d logits")


def test_public_api_on_cuda():
    table = irregular_table().to("cuda")
    logits, labels = make_inputs(table, 48, torch.bfloat16)
    logits, labels = logits.view(6, 8, -1), labels.view(6, 8)
    results = {}
    for backend in ("cpp", "reference"):
        x = logits.clone().requires_grad_()
        out = ntl_fast.cross_entropy_with_ntl(x, labels, table, backend=backend, shift_labels=True, reweigh=True)
        out.loss.backward()
        results[backend] = (out.loss, x.grad)
    assert_spec_close(results["cpp"][0], results["reference"][0], torch.bfloat16, what="loss")
    assert_spec_close(results["cpp"][1], results["reference"][1], torch.bfloat16, gradient=True, what="grad")


def test_inplace_backward_on_cuda():
    table = digit_table(32128, first_id=100)
    logits, labels = make_inputs(table, 64, torch.bfloat16)
    grads = []
    for inplace in (False, True):
        x = logits.clone().requires_grad_()
        z = x * 1
        out = ntl_fast.cross_entropy_with_ntl(z, labels, table.to("cuda"), backend="cpp", inplace=inplace)
        out.loss.backward()
        grads.append(x.grad)
    assert torch.equal(grads[0], grads[1])


def test_many_number_tokens():
    """A multi-digit vocabulary (K = 1000) keeps every fix in shared memory."""
    values = {10 + i: float(i) for i in range(1000)}
    table = NumberTokenTable.from_values(values, vocab_size=4096)
    config = LossConfig("was", squash_factor=10.0)
    logits, labels = make_inputs(table, 16, torch.float32, config, scale=1.0)
    upstream = torch.ones(2, 16, dtype=torch.float64, device="cuda")
    ce, ntl, grad = cuda_rows(logits, labels, table, config, upstream)
    x = logits.double().requires_grad_()
    ce_ref, ntl_ref = reference.ce_ntl_rows(x, labels, table.to("cuda"), config)
    (ce_ref + ntl_ref).sum().backward()
    assert_spec_close(ntl, ntl_ref, torch.float32, what="ntl")
    assert_spec_close(grad, x.grad, torch.float32, gradient=True, what="d logits")


def test_too_many_number_tokens_is_a_clear_error():
    values = {i: float(i) for i in range(7000)}
    table = NumberTokenTable.from_values(values, vocab_size=7001).to("cuda")
    logits = torch.randn(2, 7001, device="cuda")
    with pytest.raises(RuntimeError, match="at most"):
        cpp.ce_ntl_rows(logits, torch.tensor([1, 2], device="cuda"), table, LossConfig())


def test_bad_labels_give_nan_on_cuda():
    table = digit_table(40).to("cuda")
    logits = torch.randn(4, 40, device="cuda", requires_grad=True)
    labels = torch.tensor([40, -5, 10**12, 9], device="cuda")
    ce, ntl = cpp.ce_ntl_rows(logits, labels, table, LossConfig())
    assert torch.isnan(ce[:3]).all() and torch.isnan(ntl[:3]).all()
    (ce[3] + ntl[3]).backward()
    torch.cuda.synchronize()
    assert torch.isfinite(logits.grad).all() and logits.grad[:3].abs().max() == 0


def test_opcheck_on_cuda():
    table = irregular_table().to("cuda")
    config = LossConfig("was_cdf", gaussian_sigma=1.0, reweigh=True)
    logits, labels = make_inputs(table, 7, torch.bfloat16, config)
    args = (*cpp._table_args(table), *cpp._option_args(table, config))
    torch.library.opcheck(torch.ops.ntl_fast.ce_ntl_forward, (logits.requires_grad_(), labels, *args, False))
    torch.library.opcheck(torch.ops.ntl_fast.ntl_forward, (logits, labels, *args))


# --------------------------------------------------------------------------------- hard inputs
@pytest.mark.parametrize("config_name", ["was", "mse-reweigh", "was_cdf-gauss", "was_cdf-reweigh"])
@pytest.mark.parametrize("case", ["shift+1e4", "shift-1e4", "text at -inf", "text at -1e6", "leading -inf"])
def test_cuda_shifted_and_masked_rows(config_name, case):
    """Shift invariance and masks (docs/math.md §4) through the block log-sum-exp of the kernels,
    including the text-only sum of reweighed rows, at V = 32128 (512 threads per row)."""
    table, config = digit_table(32128, first_id=16000), CONFIGS[config_name]
    rows = 16
    generator = torch.Generator().manual_seed(30)
    logits = torch.round(torch.randn(rows, table.vocab_size, generator=generator, dtype=torch.float64) * 3072) / 1024
    labels = table.number_ids[torch.randint(0, 10, (rows,), generator=generator)]
    labels[::4] = 16100  # text labels, never masked below
    text = torch.ones(table.vocab_size, dtype=torch.bool)
    text[table.number_ids] = False
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
    upstream = torch.rand(2, rows, dtype=torch.float64, generator=generator).cuda()
    ce, ntl, grad = cuda_rows(shifted.float().cuda(), labels.cuda(), table, config, upstream)
    x = logits.cuda().requires_grad_()
    ce_ref, ntl_ref = reference.ce_ntl_rows(x, labels.cuda(), table.to("cuda"), config)
    (ce_ref * upstream[0] + ntl_ref * upstream[1]).sum().backward()
    assert_spec_close(ce, ce_ref, torch.float32, what="ce")
    assert_spec_close(ntl, ntl_ref, torch.float32, what="ntl")
    assert_spec_close(grad, x.grad, torch.float32, gradient=True, what="d logits")


def _corrupt_table_args(table, case):
    ids, values, index, order, gaps = (t.clone() for t in cpp._table_args(table))
    if case == "duplicate ids":
        index[int(ids[1])] = -1
        ids[1] = ids[0]
    else:  # a value_order that is not a permutation
        order[3] = 99
        order[5] = order[4]
    return [t.cuda() for t in (ids, values, index, order, gaps)]


@pytest.mark.parametrize("case", ["duplicate ids", "order not a permutation"])
def test_cuda_corrupt_tables_stay_deterministic(case):
    """The CUDA operators read no table on the host: whatever it holds, the kernels stay in bounds,
    write zero-initialised fixes and give bitwise the same gradient on every call."""
    table = digit_table(40)
    config = LossConfig("was_cdf" if case.startswith("order") else "mse")
    table_args = _corrupt_table_args(table, case)
    option_args = cpp._option_args(table, config)
    generator = torch.Generator().manual_seed(31)
    logits = torch.randn(64, 40, generator=generator).cuda()
    labels = table.number_ids[torch.randint(0, 10, (64,), generator=generator)].cuda()
    grad = torch.ones(64, device="cuda")
    results = []
    for _ in range(3):
        ce, ntl, row_stats = torch.ops.ntl_fast.ce_ntl_forward(logits, labels, *table_args, *option_args)
        d = torch.ops.ntl_fast.ce_ntl_backward(grad, grad, logits, labels, row_stats, *table_args, *option_args)
        torch.cuda.synchronize()
        results.append((ce, ntl, d))
    for a, b in zip(results[0], results[1]):
        assert torch.equal(a.nan_to_num(), b.nan_to_num()) and torch.equal(a.isnan(), b.isnan())
    for a, b in zip(results[0], results[2]):
        assert torch.equal(a.nan_to_num(), b.nan_to_num()) and torch.equal(a.isnan(), b.isnan())
    assert not torch.isnan(results[0][2]).any()
