"""The Triton kernels compiled for a CUDA device: parity, large shapes, torch.compile, in-place memory.

Skipped without CUDA (the interpreter half lives in test_triton.py).
"""

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA device (Triton kernels compiled for GPU)")

import ntl_fast  # noqa: E402
from ntl_fast import LossConfig, reference  # noqa: E402

from helpers import assert_spec_close, digit_table, irregular_table, random_labels  # noqa: E402

CONFIGS = [
    LossConfig("was"),
    LossConfig("was", squash_factor=3.0, reweigh=True),
    LossConfig("mse"),
    LossConfig("huber", reweigh=True),
    LossConfig("was_cdf", gaussian_sigma=1.0),
    LossConfig("was", gaussian_sigma=0.5, reweigh=True),
]


def _config_id(config):
    return "-".join([config.loss] + [name for name, on in (("squash", config.squash_factor is not None),
                                                            ("reweigh", config.reweigh),
                                                            ("sigma", config.gaussian_sigma is not None)) if on])


def _backend():
    import ntl_fast.triton as backend

    return backend


def _rows_and_grad(fn, logits, upstream):
    z = logits.detach().clone().requires_grad_()
    outputs = fn(z)
    outputs = (outputs,) if isinstance(outputs, torch.Tensor) else outputs
    total = sum((out * w.to(out.dtype)).sum() for out, w in zip(outputs, upstream))
    (grad,) = torch.autograd.grad(total, z)
    return outputs, grad


# two pairings instead of the full product: each distinct (config, dtype, K) costs kernel
# compilations on the GPU; the interpreter suite covers the full product on CPU
@pytest.mark.parametrize("table_name,vocab_size,dtype", [
    ("digits", 5000, torch.bfloat16), ("irregular", 301, torch.float32),
], ids=["digits-bf16", "irregular-fp32"])
@pytest.mark.parametrize("config", CONFIGS, ids=_config_id)
def test_parity_on_cuda(config, table_name, vocab_size, dtype):
    torch.manual_seed(0)
    table = (digit_table(vocab_size, first_id=4000) if table_name == "digits"
             else irregular_table(vocab_size)).to("cuda")
    rows = 257
    logits = (torch.randn(rows, vocab_size, device="cuda") * 3).to(dtype)
    labels = random_labels((rows,), table.to("cpu")).cuda()
    labels[0], labels[-1] = 0, vocab_size - 1
    upstream = [torch.randn(rows, device="cuda"), torch.randn(rows, device="cuda")]
    backend = _backend()
    oracle = logits.double() if dtype == torch.float32 else logits.float()
    for fn, ref, weights in [(backend.ce_ntl_rows, reference.ce_ntl_rows, upstream),
                             (backend.ntl_rows, reference.ntl_rows, upstream[1:])]:
        got, grad = _rows_and_grad(lambda z: fn(z, labels, table, config), logits, weights)
        want, grad_ref = _rows_and_grad(lambda z: ref(z, labels, table, config), oracle, weights)
        for a, b in zip(got, want):
            assert_spec_close(a, b, dtype, what=fn.__name__)
        assert grad.dtype == dtype
        assert_spec_close(grad, grad_ref, dtype, gradient=True, what=fn.__name__ + " grad")


def test_public_api_on_cuda():
    torch.manual_seed(1)
    table = digit_table(1000, first_id=500).to("cuda")
    logits = torch.randn(4, 33, 1000, device="cuda")
    labels = random_labels((4, 33), table.to("cpu")).cuda()
    weights = torch.rand(4, 33, device="cuda")
    results = {}
    for backend in ("triton", "reference"):
        z = logits.clone().requires_grad_()
        out = ntl_fast.cross_entropy_with_ntl(z, labels, table, backend=backend, weights=weights,
                                             loss="was_cdf", gaussian_sigma=1.0, shift_labels=True)
        out.loss.backward()
        results[backend] = (out.loss.detach(), out.ce, out.ntl, z.grad)
    for got, want in zip(results["triton"], results["reference"]):
        assert_spec_close(got, want, torch.float32)


def test_no_host_synchronisation():
    table = digit_table(4096, first_id=100).to("cuda")
    logits = torch.randn(64, 4096, device="cuda", requires_grad=True)
    labels = random_labels((64,), table.to("cpu")).cuda()
    upstream = torch.randn(64, device="cuda")
    backend = _backend()
    backend.ce_ntl_rows(logits, labels, table, LossConfig(reweigh=True))  # compile outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        ce, ntl = backend.ce_ntl_rows(logits, labels, table, LossConfig(reweigh=True))
        ((ce + ntl) * upstream).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("vocab_size", [32128, 128256])
def test_large_bf16_fused_forward_backward(vocab_size):
    """M = 16384 rows; ~64 sampled rows checked against a float32 reference on those rows."""
    torch.manual_seed(2)
    rows = 16384
    table = digit_table(vocab_size, first_id=vocab_size // 2).to("cuda")
    logits = (torch.randn(rows, vocab_size, device="cuda", dtype=torch.bfloat16) * 4).requires_grad_()
    labels = random_labels((rows,), table.to("cpu")).cuda()
    grad_ce = torch.randn(rows, device="cuda")
    grad_ntl = torch.randn(rows, device="cuda")
    config = LossConfig("was", reweigh=True)
    ce, ntl = _backend().ce_ntl_rows(logits, labels, table, config)
    ((ce * grad_ce).sum() + (ntl * grad_ntl).sum()).backward()
    sample = torch.randperm(rows, device="cuda")[:64]
    z = logits.detach()[sample].float().requires_grad_()
    ce_ref, ntl_ref = reference.ce_ntl_rows(z, labels[sample], table, config)
    ((ce_ref * grad_ce[sample]).sum() + (ntl_ref * grad_ntl[sample]).sum()).backward()
    assert_spec_close(ce[sample], ce_ref, torch.bfloat16, what="ce")
    assert_spec_close(ntl[sample], ntl_ref, torch.bfloat16, what="ntl")
    assert_spec_close(logits.grad[sample], z.grad, torch.bfloat16, gradient=True, what="grad")


def test_compile_fullgraph_no_graph_break():
    torch.manual_seed(3)
    table = digit_table(512, first_id=64).to("cuda")
    model = torch.nn.Linear(32, 512).cuda()
    inputs = torch.randn(4, 16, 32, device="cuda")
    labels = random_labels((4, 16), table.to("cpu")).cuda()

    def step(x):
        return ntl_fast.cross_entropy_with_ntl(model(x), labels, table, backend="triton", reweigh=True,
                                              squash_factor=2.0).loss

    explanation = torch._dynamo.explain(step)(inputs)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    compiled = torch.compile(step, fullgraph=True)
    loss = compiled(inputs)
    loss.backward()
    compiled_grad = model.weight.grad.clone()
    model.weight.grad = None
    eager = step(inputs)
    eager.backward()
    assert_spec_close(loss, eager, torch.float32)
    assert_spec_close(compiled_grad, model.weight.grad, torch.float32, gradient=True)


def test_inplace_saves_one_logits_sized_buffer():
    torch.manual_seed(4)
    rows, hidden, vocab_size = 4096, 256, 32128
    table = digit_table(vocab_size, first_id=1000).to("cuda")
    labels = random_labels((rows,), table.to("cpu")).cuda()
    h0 = torch.randn(rows, hidden, device="cuda", dtype=torch.bfloat16)
    weight = torch.randn(hidden, vocab_size, device="cuda", dtype=torch.bfloat16) / hidden**0.5
    logits_bytes = rows * vocab_size * 2
    peaks, grads = {}, {}
    for inplace in (False, True, False):  # the first run warms up the kernels
        h = h0.clone().requires_grad_()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        out = ntl_fast.cross_entropy_with_ntl(h @ weight, labels, table, backend="triton", inplace=inplace)
        out.loss.backward()
        torch.cuda.synchronize()
        peaks[inplace] = torch.cuda.max_memory_allocated()
        grads[inplace] = h.grad
        del out, h
    assert torch.equal(grads[False], grads[True])
    assert peaks[True] + 0.9 * logits_bytes <= peaks[False], (peaks, logits_bytes)
