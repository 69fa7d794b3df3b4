"""The backend contract (:class:`ntl_fast.backends.Backend`): every backend module that implements it
meets it against the float64 reference, the one-pass loss and gradient included."""

import pytest
import torch

from ntl_fast import backends, reference
from ntl_fast.backends import Backend, get_backend
from ntl_fast.config import LossConfig
from ntl_fast.fused import cross_entropy_with_ntl_and_gradient
from helpers import assert_spec_close, irregular_table, random_labels

# the backends importable here whose modules implement the whole contract
IMPLEMENTED = [name for name in ("reference", "cpp", "triton")
               if backends._CHECKS[name][1](torch.device("cpu")) is None and isinstance(get_backend(name), Backend)]

CONFIGS = [LossConfig("was"), LossConfig("mse", reweigh=True), LossConfig("was_cdf", gaussian_sigma=0.7),
           LossConfig("huber", ignore_index=11)]
DTYPES = [torch.float32, torch.bfloat16]


def test_the_reference_implements_the_whole_contract():
    assert isinstance(reference, Backend)
    assert "reference" in IMPLEMENTED
    assert reference.unsupported_reason(torch.device("cpu")) is None
    assert reference.fuses_loss_and_grad(torch.zeros(2, 3)) is False


def test_a_module_without_the_one_pass_entry_points_is_no_backend():
    class Partial:
        unsupported_reason = ntl_rows = ce_ntl_rows = fuses_loss_and_grad = staticmethod(lambda *args: None)

    assert not isinstance(Partial(), Backend)


def _inputs(dtype, ignore_index=-100):
    generator = torch.Generator().manual_seed(7)
    table = irregular_table(53)
    logits = (3 * torch.randn(12, 53, generator=generator, dtype=torch.float64)).to(dtype)
    labels = random_labels((12,), table, generator=generator, ignore_index=ignore_index)
    labels[3] = 11 if ignore_index == 11 else labels[3]  # an ignore_index that is a number token
    ce_scale = torch.rand(12, generator=generator)
    ntl_scale = torch.rand(12, generator=generator)
    return table, logits, labels, ce_scale, ntl_scale


def _oracle(logits, labels, table, config, ce_scale, ntl_scale):
    """Rows and ``d(Σ ce_scale·ce + Σ ntl_scale·ntl)/dz`` by autograd of the float64 reference rows."""
    z = logits.detach().double().requires_grad_()
    ce, ntl = reference.ce_ntl_rows(z, labels, table, config)
    total = (ce_scale.double() * ce).sum() + (ntl_scale.double() * ntl).sum()
    (grad,) = torch.autograd.grad(total, z)
    return ce.detach(), ntl.detach(), grad


@pytest.mark.parametrize("name", IMPLEMENTED)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c.loss}-{c.reweigh}-{c.gaussian_sigma}")
def test_loss_and_gradient_in_one_pass_match_autograd_of_the_reference(name, dtype, config):
    backend = get_backend(name)
    table, logits, labels, ce_scale, ntl_scale = _inputs(dtype, config.ignore_index)
    want_ce, want_ntl, want_grad = _oracle(logits, labels, table, config, ce_scale, ntl_scale)
    ce, ntl, grad = backend.ce_ntl_loss_and_grad(logits, labels, table, config, ce_scale, ntl_scale)
    assert grad.dtype == dtype and grad.shape == logits.shape
    assert not (ce.requires_grad or ntl.requires_grad or grad.requires_grad)
    assert_spec_close(ce, want_ce, dtype, what=f"{name} ce")
    assert_spec_close(ntl, want_ntl, dtype, what=f"{name} ntl")
    assert_spec_close(grad, want_grad, dtype, gradient=True, what=f"{name} gradient")
    assert (grad[labels == config.ignore_index] == 0).all()  # ignored rows get exactly zero


@pytest.mark.parametrize("name", IMPLEMENTED)
def test_in_place_the_gradient_lands_in_the_logits_buffer(name):
    backend = get_backend(name)
    config = LossConfig("was")
    table, logits, labels, ce_scale, ntl_scale = _inputs(torch.float32)
    _, _, want = backend.ce_ntl_loss_and_grad(logits, labels, table, config, ce_scale, ntl_scale)
    buffer = logits.clone()
    ce, ntl, grad = backend.ce_ntl_loss_and_grad(buffer, labels, table, config, ce_scale, ntl_scale, inplace=True)
    assert grad.data_ptr() == buffer.data_ptr()
    assert torch.equal(buffer, want)


@pytest.mark.parametrize("name", IMPLEMENTED)
def test_scale_gradient_scales_in_place(name):
    backend = get_backend(name)
    grad = torch.randn(4, 9).to(torch.bfloat16)
    want = grad.float() * 2.5
    out = backend.scale_gradient_(grad, torch.tensor(2.5))
    assert out.data_ptr() == grad.data_ptr() and out.dtype == torch.bfloat16
    assert_spec_close(out, want, torch.bfloat16, gradient=True, what=f"{name} scaled gradient")
    before = grad.clone()
    assert torch.equal(backend.scale_gradient_(grad, torch.tensor(1.0)), before)


@pytest.mark.parametrize("name", IMPLEMENTED)
def test_fuses_loss_and_grad_answers_for_the_logits(name):
    answer = get_backend(name).fuses_loss_and_grad(torch.zeros(3, 5, dtype=torch.bfloat16))
    assert isinstance(answer, bool)


class _RecordingBackend:
    """A one-pass backend that records how the backward scales its gradient."""

    def __init__(self):
        self.scaled_by = []

    def ce_ntl_loss_and_grad(self, logits, labels, table, config, ce_scale, ntl_scale, inplace=False):
        rows = torch.ones(logits.shape[0], device=logits.device)
        return rows, rows.clone(), torch.ones_like(logits)

    def scale_gradient_(self, grad, grad_output):
        self.scaled_by.append(grad_output)
        return grad.mul_(grad_output)


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_the_one_pass_backward_scales_through_the_backend_without_reading_grad_output(device):
    """Off the CPU (here: meta tensors, whose values cannot be read at all) the backward never reads
    grad_output on the host: the backend scales on the device, also when grad_output is 1. On the
    CPU, grad_output == 1 costs nothing."""
    for grad_output, cpu_scales in ((1.0, False), (3.0, True)):
        backend = _RecordingBackend()
        logits = torch.zeros(4, 6, device=device, requires_grad=True)
        scale = torch.ones(4, device=device)
        total, _, _ = cross_entropy_with_ntl_and_gradient(logits, torch.zeros(4, dtype=torch.long, device=device),
                                                          None, LossConfig("was"), scale, scale, backend)
        (total * grad_output).backward()
        assert len(backend.scaled_by) == (1 if device != "cpu" or cpu_scales else 0)
        assert logits.grad.shape == logits.shape
        if device == "cpu":
            assert (logits.grad == grad_output).all()
