"""linear_cross_entropy_with_ntl against cross_entropy_with_ntl on the materialised logits."""

from types import SimpleNamespace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ntl_fast import cross_entropy_with_ntl
from ntl_fast.chunked import ChunkPlan, chunk_plan, chunk_rows, device_chunk_plan
from ntl_fast.linear import default_chunk_size, linear_cross_entropy_with_ntl
from helpers import assert_spec_close, digit_table, irregular_table, random_labels

CASES = [
    dict(),
    dict(reduction="sum"),
    dict(reduction="none"),
    dict(loss="mse", reweigh=True),
    dict(loss="was", squash_factor=3.0, shift_labels=True),
    dict(loss="was_cdf", gaussian_sigma=1.0),
    dict(loss="huber", ce_normalizer=37.0, ntl_normalizer=torch.tensor(11.0)),
    dict(weights=True, ignore_index=-1),
    dict(weights=True, reduction="none", shift_labels=True, ntl_weight=2.0),
]


def _inputs(dtype, table, batch=3, length=21, hidden_size=24, bias=True, ignore_index=-100, seed=0,
            number_fraction=0.5):
    generator = torch.Generator().manual_seed(seed)
    vocab_size = table.vocab_size + 5  # a padded head: more rows than the tokenizer has ids
    hidden = torch.randn(batch, length, hidden_size, generator=generator).to(dtype).requires_grad_()
    weight = (torch.randn(vocab_size, hidden_size, generator=generator) / 2).to(dtype).requires_grad_()
    bias_tensor = torch.randn(vocab_size, generator=generator).to(dtype).requires_grad_() if bias else None
    labels = random_labels((batch, length), table, number_fraction=number_fraction, ignore_index=ignore_index,
                           generator=generator)
    weights = torch.rand(batch, length, generator=generator)
    return hidden, weight, bias_tensor, labels, weights


def _compare(case, dtype, table, chunk_size, bias=True, inputs=None):
    options = dict(case)
    ignore_index = options.get("ignore_index", -100)
    if inputs is None:
        inputs = _inputs(dtype, table, bias=bias, ignore_index=ignore_index)
    hidden, weight, bias_tensor, labels, weights = inputs
    if options.pop("weights", False):
        options["weights"] = weights
    params = [hidden, weight] + ([bias_tensor] if bias else [])

    fused = linear_cross_entropy_with_ntl(hidden, weight, labels, table, bias=bias_tensor,
                                          chunk_size=chunk_size, backend="reference", **options)
    logits = torch.nn.functional.linear(hidden, weight, bias_tensor)
    expected = cross_entropy_with_ntl(logits, labels, table, backend="reference", **options)
    for name in ("loss", "ce", "ntl"):
        assert_spec_close(getattr(fused, name), getattr(expected, name), torch.float32, what=name)
    assert fused.ce.grad_fn is None and fused.ntl.grad_fn is None
    upstream = torch.rand(fused.loss.shape, generator=torch.Generator().manual_seed(5))
    grads = torch.autograd.grad((fused.loss * upstream).sum(), params)
    expected_grads = torch.autograd.grad((expected.loss * upstream).sum(), params)
    for name, actual, wanted in zip(("hidden", "weight", "bias"), grads, expected_grads):
        assert actual.dtype == wanted.dtype
        assert_spec_close(actual, wanted, dtype, gradient=True, what=f"grad {name}")


@pytest.mark.parametrize("case", CASES, ids=lambda case: ",".join(f"{k}" for k in case) or "default")
@pytest.mark.parametrize("chunk_size", [7, 10, 64])  # M = 63 rows: 9 chunks, 7 with a short last one, 1
def test_matches_materialised_logits_fp32(case, chunk_size):
    _compare(case, torch.float32, digit_table(vocab_size=40), chunk_size)


@pytest.mark.parametrize("case", [dict(), dict(reduction="none", loss="mse", reweigh=True)])
def test_irregular_table_no_bias(case):
    _compare(case, torch.float32, irregular_table(), chunk_size=10, bias=False)


@pytest.mark.parametrize("case", [dict(), dict(reduction="none"), dict(loss="was_cdf", shift_labels=True)])
def test_matches_materialised_logits_bf16(case):
    _compare(case, torch.bfloat16, digit_table(vocab_size=40), chunk_size=16)


def test_frozen_head_and_no_grad():
    table = digit_table(vocab_size=40)
    hidden, weight, _, labels, _ = _inputs(torch.float32, table, bias=False)
    weight.requires_grad_(False)
    out = linear_cross_entropy_with_ntl(hidden, weight, labels, table, chunk_size=8, backend="reference")
    (grad,) = torch.autograd.grad(out.loss, hidden)
    expected = cross_entropy_with_ntl(hidden @ weight.T, labels, table, backend="reference")
    (wanted,) = torch.autograd.grad(expected.loss, hidden)
    assert_spec_close(grad, wanted, torch.float32, gradient=True)
    with torch.no_grad():
        out = linear_cross_entropy_with_ntl(hidden, weight, labels, table, backend="reference")
    assert out.loss.grad_fn is None
    assert_spec_close(out.loss, expected.loss, torch.float32)


def test_autocast_bf16_casts_like_linear():
    table = digit_table(vocab_size=40)
    hidden, weight, bias, labels, _ = _inputs(torch.float32, table)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = linear_cross_entropy_with_ntl(hidden, weight, labels, table, bias=bias, backend="reference")
        expected = cross_entropy_with_ntl(torch.nn.functional.linear(hidden, weight, bias), labels, table,
                                          backend="reference")
    assert_spec_close(out.loss, expected.loss, torch.bfloat16)
    grads = torch.autograd.grad(out.loss, [hidden, weight, bias])
    wanted = torch.autograd.grad(expected.loss, [hidden, weight, bias])
    for actual, reference_grad in zip(grads, wanted):
        assert actual.dtype == torch.float32
        assert_spec_close(actual, reference_grad, torch.bfloat16, gradient=True)


def test_empty_mean_is_zero_with_gradient():
    table = digit_table(vocab_size=40)
    hidden, weight, _, labels, _ = _inputs(torch.float32, table, bias=False)
    labels = torch.full_like(labels, -100)
    out = linear_cross_entropy_with_ntl(hidden, weight, labels, table, backend="reference")
    assert out.loss.item() == 0 and out.loss.grad_fn is not None
    out.loss.backward()
    assert hidden.grad.abs().max() == 0 and weight.grad.abs().max() == 0


def test_bad_inputs_are_named():
    table = digit_table(vocab_size=40)
    hidden, weight, _, labels, _ = _inputs(torch.float32, table, bias=False)
    with pytest.raises(ValueError, match="weight must be"):
        linear_cross_entropy_with_ntl(hidden, weight[:, :5], labels, table)
    with pytest.raises(TypeError, match="weight is"):
        linear_cross_entropy_with_ntl(hidden, weight.double(), labels, table)
    with pytest.raises(ValueError, match="labels must"):
        linear_cross_entropy_with_ntl(hidden, weight, labels[:, :3], table)
    with pytest.raises(ValueError, match="found 999"):
        linear_cross_entropy_with_ntl(hidden, weight, torch.full_like(labels, 999), table)
    with pytest.raises(ValueError, match="chunk_size"):
        linear_cross_entropy_with_ntl(hidden, weight, labels, table, chunk_size=0)


def test_minus_inf_bias_column():
    """A head column masked with a -inf bias: no probability, zero gradient in its weight row and bias."""
    table = digit_table(vocab_size=40)
    hidden, weight, bias, labels, weights = _inputs(torch.float32, table)
    masked = 30  # a text id that no label uses
    labels = torch.where(labels == masked, torch.full_like(labels, 31), labels)
    with torch.no_grad():
        bias[masked] = -float("inf")
    _compare(dict(), torch.float32, table, chunk_size=8, inputs=(hidden, weight, bias, labels, weights))
    out = linear_cross_entropy_with_ntl(hidden, weight, labels, table, bias=bias, chunk_size=8, backend="reference")
    grad_weight, grad_bias = torch.autograd.grad(out.loss, [weight, bias])
    assert grad_weight[masked].abs().max() == 0 and grad_bias[masked] == 0


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_batch_without_number_labels(reduction):
    table = digit_table(vocab_size=40)
    inputs = _inputs(torch.float32, table, number_fraction=0.0)
    labels = inputs[3]
    labels[table.is_number[labels.clamp_min(0)] & (labels >= 0)] = 3  # no number token left
    _compare(dict(reduction=reduction), torch.float32, table, chunk_size=9, inputs=inputs)
    out = linear_cross_entropy_with_ntl(inputs[0], inputs[1], labels, table, bias=inputs[2], chunk_size=9,
                                        reduction=reduction, backend="reference")
    assert (out.ntl == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("leading", [(1,), ()], ids=["M=1", "unbatched"])
def test_single_row(dtype, leading):
    table = digit_table(vocab_size=40)
    hidden, weight, bias, labels, weights = _inputs(dtype, table, batch=1, length=1)
    labels = torch.full((1, 1), 12)  # a number token
    inputs = (hidden.detach().reshape(*leading, -1).requires_grad_(), weight, bias, labels.reshape(leading),
              weights.reshape(leading))
    _compare(dict(), dtype, table, chunk_size=None, inputs=inputs)
    _compare(dict(weights=True, reduction="none"), dtype, table, chunk_size=1, inputs=inputs)


class _Allocations(TorchDispatchMode):
    """Records the shape and dtype of every tensor an op creates (not the in-place or out= ones)."""

    def __init__(self):
        super().__init__()
        self.created = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        given = {t.untyped_storage().data_ptr() for t in torch.utils._pytree.tree_leaves((args, kwargs))
                 if isinstance(t, torch.Tensor)}
        for out in torch.utils._pytree.tree_leaves(result):
            if isinstance(out, torch.Tensor) and out.untyped_storage().data_ptr() not in given:
                self.created.append((str(func), tuple(out.shape), out.dtype))
        return result


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grad_weight_accumulates_without_vocabulary_temporaries(dtype):
    """The only (V, H) tensor a call creates is grad_weight itself, in the weight's dtype: each
    chunk's product is added inside the matmul, and a bfloat16 weight gets no float32 accumulator."""
    table = digit_table(vocab_size=40)
    hidden, weight, bias, labels, _ = _inputs(dtype, table, hidden_size=64)  # V x H > chunk x V
    with _Allocations() as allocations:
        out = linear_cross_entropy_with_ntl(hidden, weight, labels, table, bias=bias, chunk_size=8,
                                            backend="reference")
        out.loss.backward()
    vocab_sized = [entry for entry in allocations.created if entry[1] == tuple(weight.shape)]
    assert len(vocab_sized) == 1 and vocab_sized[0][2] == dtype, vocab_sized
    assert weight.grad.dtype == dtype


def test_grad_weight_rounds_once_per_chunk_bf16():
    """bfloat16 grad_weight is a running sum rounded once per chunk: against the float64 products
    of the same bfloat16 logits gradient, its error stays within half an ulp (2^-9 relative) of
    each chunk's running sum, summed over the chunks; a single chunk is F.linear's one rounding."""
    table = digit_table(vocab_size=40)
    hidden, weight, bias, labels, _ = _inputs(torch.bfloat16, table, batch=4, length=32)
    logits = torch.nn.functional.linear(hidden, weight, bias)
    # "sum": every row's upstream gradient is exactly 1 and 0.3 on both paths, so both round the
    # same logits gradient to bfloat16
    expected = cross_entropy_with_ntl(logits, labels, table, reduction="sum", backend="reference")
    (grad_logits,) = torch.autograd.grad(expected.loss, logits)
    grad_rows = grad_logits.double().reshape(-1, weight.shape[0])
    hidden_rows = hidden.detach().double().reshape(-1, hidden.shape[-1])
    for chunk_size in (128, 16):
        out = linear_cross_entropy_with_ntl(hidden, weight, labels, table, bias=bias, chunk_size=chunk_size,
                                            reduction="sum", backend="reference")
        (grad_weight,) = torch.autograd.grad(out.loss, weight)
        running = torch.zeros_like(weight, dtype=torch.float64)
        bound = 0.0
        for start in range(0, hidden_rows.shape[0], chunk_size):
            running += grad_rows[start:start + chunk_size].t() @ hidden_rows[start:start + chunk_size]
            bound += 2**-9 * running.abs().max().item()
        error = (grad_weight.double() - running).abs().max().item()
        assert 0 < error <= 1.01 * bound, (chunk_size, error, bound)


def test_chunk_plan_from_device_properties():
    assert chunk_plan("cpu") == ChunkPlan(32 << 20, 64)
    # an 80 GB GPU with 132 SMs: 512 MiB of logits, at least 4 waves (528 rows, rounded up to 576)
    h100 = chunk_plan("cuda", multi_processor_count=132, total_memory=80 * 10**9)
    assert h100 == ChunkPlan(512 << 20, 576)
    # an 8 GiB GPU with 28 SMs: 1/64 of its memory
    assert chunk_plan("cuda", multi_processor_count=28, total_memory=8 << 30) == ChunkPlan(128 << 20, 128)


def test_chunk_rows_fill_the_device_within_the_budget():
    h100 = chunk_plan("cuda", multi_processor_count=132, total_memory=80 * 10**9)
    rows = chunk_rows(16384, 128256, 2, h100)  # bf16 logits at V = 128,256: 128 rows before
    assert rows == 2048 and rows >= 4 * 132 and rows * 128256 * 2 <= h100.budget_bytes
    assert chunk_rows(16384, 32128, 2, h100) == 8320  # the budget, rounded down to a multiple of 64
    # the device minimum beats the budget when the budget holds fewer rows, within 4x the budget
    small = ChunkPlan(budget_bytes=64 << 20, min_rows=576)
    assert chunk_rows(16384, 128256, 2, small) == 576
    assert chunk_rows(16384, 10**7, 2, small) == 13  # 4 x 64 MiB / 20 MB per row
    cpu = chunk_plan("cpu")
    assert chunk_rows(4096, 32128, 4, cpu) == 256 and chunk_rows(4096, 32128, 2, cpu) == 512
    assert chunk_rows(10, 32128, 4, cpu) == 10  # never more than the rows there are
    assert chunk_rows(10**6, 10**9, 4, cpu) == 1  # at least one row


def test_default_chunk_size_reads_the_device(monkeypatch):
    assert default_chunk_size(4096, 32128) == 256
    assert default_chunk_size(4096, 32128, torch.bfloat16, "cpu") == 512
    properties = SimpleNamespace(multi_processor_count=132, total_memory=80 * 10**9)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: properties)
    assert device_chunk_plan("cuda:0") == ChunkPlan(512 << 20, 576)
    assert default_chunk_size(16384, 128256, torch.bfloat16, "cuda") == 2048


def _kernel_backend(name):
    from ntl_fast import explain_backend

    try:
        explain_backend("cpu", name)
    except RuntimeError as error:
        pytest.skip(str(error))
    return name


@pytest.mark.parametrize("name", ["cpp", "triton"])
@pytest.mark.parametrize("case", [dict(), dict(reduction="none", loss="mse", reweigh=True),
                                  dict(loss="was_cdf", gaussian_sigma=1.0, shift_labels=True)])
def test_kernel_backends_serve_the_chunks(name, case):
    backend = _kernel_backend(name)
    table = digit_table(vocab_size=40)
    hidden, weight, bias, labels, _ = _inputs(torch.float32, table)
    fused = linear_cross_entropy_with_ntl(hidden, weight, labels, table, bias=bias, chunk_size=16,
                                          backend=backend, **case)
    expected = cross_entropy_with_ntl(torch.nn.functional.linear(hidden, weight, bias), labels, table,
                                      backend="reference", **case)
    assert_spec_close(fused.loss, expected.loss, torch.float32)
    grads = torch.autograd.grad(fused.loss.sum(), [hidden, weight, bias])
    wanted = torch.autograd.grad(expected.loss.sum(), [hidden, weight, bias])
    for actual, reference_grad in zip(grads, wanted):
        assert_spec_close(actual, reference_grad, torch.float32, gradient=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fusing_backend_reads_each_chunk_once(monkeypatch, dtype):
    """Where the backend fuses the loss and its gradient, each chunk is one ce_ntl_loss_and_grad
    call over the freshly computed logits, written in place, and never a ce_ntl_rows + autograd pass."""
    from ntl_fast import cpp

    backend = _kernel_backend("cpp")
    calls = {"fused": 0, "rows": 0}
    fused_op, rows_op = cpp.ce_ntl_loss_and_grad, cpp.ce_ntl_rows

    def fused_spy(logits, *args, inplace=False, **kwargs):
        calls["fused"] += 1
        assert inplace and not logits.requires_grad
        ce, ntl, grad = fused_op(logits, *args, inplace=inplace, **kwargs)
        assert grad.data_ptr() == logits.data_ptr()
        return ce, ntl, grad

    def rows_spy(*args, **kwargs):
        calls["rows"] += 1
        return rows_op(*args, **kwargs)

    monkeypatch.setattr(cpp, "ce_ntl_loss_and_grad", fused_spy)
    monkeypatch.setattr(cpp, "ce_ntl_rows", rows_spy)
    table = digit_table(vocab_size=40)
    hidden, weight, bias, labels, weights = _inputs(dtype, table)  # 63 rows: 4 chunks of 16
    fused = linear_cross_entropy_with_ntl(hidden, weight, labels, table, bias=bias, weights=weights,
                                          chunk_size=16, backend=backend, shift_labels=True)
    grads = torch.autograd.grad(fused.loss, [hidden, weight, bias])
    assert calls == {"fused": 4, "rows": 0}
    expected = cross_entropy_with_ntl(torch.nn.functional.linear(hidden, weight, bias), labels, table,
                                      weights=weights, backend="reference", shift_labels=True)
    assert_spec_close(fused.loss, expected.loss, torch.float32)
    wanted = torch.autograd.grad(expected.loss, [hidden, weight, bias])
    for actual, reference_grad in zip(grads, wanted):
        assert_spec_close(actual, reference_grad, dtype, gradient=True)


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_shift_moves_the_labels_not_the_hidden_states(backend):
    """Under shift_labels every row goes through the head; the last position of each sequence is an
    ignored one (zero gradient), and reduction 'none' is a view of shape (..., T - 1)."""
    backend = _kernel_backend(backend)
    table = digit_table(vocab_size=40)
    hidden, weight, bias, labels, _ = _inputs(torch.float32, table)
    out = linear_cross_entropy_with_ntl(hidden, weight, labels, table, bias=bias, chunk_size=10,
                                        backend=backend, shift_labels=True, reduction="none")
    assert out.loss.shape == out.ce.shape == out.ntl.shape == labels[..., 1:].shape
    assert out.loss._base is not None and out.loss._base.numel() == labels.numel()  # a view, no copy
    (grad_hidden,) = torch.autograd.grad(out.loss.sum(), hidden)
    assert torch.equal(grad_hidden[:, -1], torch.zeros_like(grad_hidden[:, -1]))
    assert grad_hidden[:, :-1].abs().sum() > 0


def test_second_backward_is_refused_not_wrong():
    table = digit_table(vocab_size=40)
    hidden, weight, _, labels, _ = _inputs(torch.float32, table, bias=False)
    out = linear_cross_entropy_with_ntl(hidden, weight, labels, table, backend="reference")
    out.loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="twice"):
        out.loss.backward()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_extra_memory_a_quarter_of_the_materialised_path(dtype):
    """Allocator accounting (benchmarks/lm_head_memory.py) on a small head in 8 chunks: beyond the
    inputs and their gradients, the chunked path keeps at most 1/4 of what the materialised path does."""
    from benchmarks.lm_head_memory import extra_peak_bytes, make_inputs, make_runner

    hidden, weight, labels, table = make_inputs(512, 64, 3000, dtype, "cpu")
    extra = {}
    for path in ("chunked", "materialised"):
        run = make_runner(path, hidden, weight, labels, table, "auto", chunk_size=64)
        extra[path] = extra_peak_bytes(run, (hidden, weight), "cpu")
    logits_bytes = 512 * 3000 * hidden.element_size()
    assert extra["materialised"] >= 2 * logits_bytes  # the logits and their gradient
    assert extra["chunked"] <= extra["materialised"] / 4, extra
