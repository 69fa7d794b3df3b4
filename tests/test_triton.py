"""The Triton backend against the PyTorch reference: each test written once, run per device.

``cpu``: Triton's interpreter on CPU tensors (conftest.py sets TRITON_INTERPRET=1 on machines
without CUDA, before ntl_fast.triton is imported); ``cuda``: the kernels compiled for the GPU.
A parametrisation whose device does not run here skips with the reason; the few tests bound to
one device (the interpreter's tiling knobs; CUDA memory and synchronisation) are marked so.
Tolerances are those of docs/math.md §6 (tests/helpers.assert_spec_close). Cases stay small: the
interpreter's cost is per op per program.
"""

import contextlib
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ntl_fast
from ntl_fast import LossConfig, NumberTokenTable, reference
from ntl_fast.config import LossKind

from helpers import assert_spec_close, check_one_pass_under_cuda_graph, digit_table, irregular_table, random_labels

triton_backend = pytest.importorskip("ntl_fast.triton")
from ntl_fast.triton import _common  # noqa: E402
from ntl_fast.triton._common import loss_options  # noqa: E402

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
_NO_INTERPRETER = "Triton's interpreter serves CPU tensors only where TRITON_INTERPRET=1 (machines without CUDA)"
_NO_CUDA = "needs a CUDA device (Triton kernels compiled for the GPU)"
CPU_ONLY = pytest.mark.skipif(not INTERPRETED, reason=_NO_INTERPRETER)
CUDA_ONLY = pytest.mark.skipif(not torch.cuda.is_available(), reason=_NO_CUDA)


@pytest.fixture(params=[pytest.param("cpu", marks=CPU_ONLY), pytest.param("cuda", marks=CUDA_ONLY)])
def device(request):
    return torch.device(request.param)


@pytest.fixture(params=[pytest.param("cpu", marks=CPU_ONLY), pytest.param("cuda", marks=[CUDA_ONLY, pytest.mark.gpu])])
def checked_device(request):
    """``device``, whose cuda parametrisation is also part of the GPU check's short run (marked
    ``gpu``: benchmarks/gpu_check.sh selects ``-k gpu``)."""
    return torch.device(request.param)


def _to(device, *objects):
    """Each tensor or table (or list of them) moved to ``device``."""
    def move(x):
        return [move(y) for y in x] if isinstance(x, list) else x.to(device)
    return tuple(move(x) for x in objects)

CONFIGS = [
    LossConfig("was"),
    LossConfig("was", squash_factor=3.0),
    LossConfig("mse"),
    LossConfig("mae"),
    LossConfig("huber"),
    LossConfig("was_cdf"),
    LossConfig("was_cdf", gaussian_sigma=1.0),
    LossConfig("was", gaussian_sigma=0.5),
    LossConfig("was", reweigh=True),
    LossConfig("was", squash_factor=2.0, reweigh=True),
    LossConfig("mse", reweigh=True),
    LossConfig("mae", reweigh=True),
    LossConfig("huber", reweigh=True),
    LossConfig("was_cdf", gaussian_sigma=2.0, reweigh=True),
    LossConfig("was", ignore_index=-1),
]


def _config_id(config):
    parts = [config.loss]
    if config.squash_factor is not None:
        parts.append(f"squash{config.squash_factor:g}")
    if config.reweigh:
        parts.append("reweigh")
    if config.gaussian_sigma is not None:
        parts.append(f"sigma{config.gaussian_sigma:g}")
    if config.ignore_index != -100:
        parts.append(f"ignore{config.ignore_index}")
    return "-".join(parts)


# the plainest variant and one with every switch on: for tests about something else than the math
PLAIN_AND_FULL = [LossConfig("was"), LossConfig("was_cdf", gaussian_sigma=1.0, reweigh=True)]

TABLES = {"digits": lambda: digit_table(40), "irregular": lambda: irregular_table(53)}


def _logits(rows, vocab_size, scale=3.0, dtype=torch.float32):
    return (torch.randn(rows, vocab_size, dtype=torch.float64) * scale).to(dtype)


def _rows_and_grad(fn, logits, upstream):
    """Per-row outputs of ``fn(logits)`` and the gradient of ``Σ_i upstream_i · out_i``."""
    z = logits.detach().clone().requires_grad_()
    outputs = fn(z)
    if isinstance(outputs, torch.Tensor):
        outputs = (outputs,)
    total = sum((out * w.to(out.dtype)).sum() for out, w in zip(outputs, upstream))
    (grad,) = torch.autograd.grad(total, z)
    return outputs, grad


def _labels_with_edges(rows, table, ignore_index=-100):
    labels = random_labels((rows,), table, ignore_index=ignore_index)
    labels[0] = 0
    if rows > 1:
        labels[-1] = table.vocab_size - 1
    return labels


# --------------------------------------------------------------------------------- per-row parity
ENTRY_POINTS = {"ntl_rows": (triton_backend.ntl_rows, reference.ntl_rows, ("ntl",)),
                "ce_ntl_rows": (triton_backend.ce_ntl_rows, reference.ce_ntl_rows, ("ce", "ntl"))}


@pytest.mark.parametrize("table_name", list(TABLES))
@pytest.mark.parametrize("config", CONFIGS, ids=_config_id)
@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_rows_match_reference(entry, config, table_name, seed, device):
    fn, ref, names = ENTRY_POINTS[entry]
    table = TABLES[table_name]()
    logits = _logits(37, table.vocab_size)
    labels = _labels_with_edges(37, table, config.ignore_index)
    upstream = [torch.randn(37) for _ in names]
    table, logits, labels, upstream = _to(device, table, logits, labels, upstream)
    got, got_grad = _rows_and_grad(lambda z: fn(z, labels, table, config), logits, upstream)
    want, want_grad = _rows_and_grad(lambda z: ref(z, labels, table, config), logits.double(), upstream)
    for name, a, b in zip(names, got, want):
        assert a.dtype == torch.float32
        assert_spec_close(a, b, torch.float32, what=name)
    assert_spec_close(got_grad, want_grad, torch.float32, gradient=True, what=f"d ({', '.join(names)}) / d logits")


# --------------------------------------------------------------------------------- shapes
SHAPES = [
    (1, 40, "digits"),       # one row, V < BLOCK_V
    (37, 300, "digits"),     # V not a multiple of BLOCK_V
    (64, 256, "digits"),     # V a multiple of BLOCK_V, a full row block
    (20, 53, "irregular"),   # K = 7, number ids 0 and V - 1
    (9, 12, "irregular12"),  # K = 7 in a tiny vocabulary
]


def _shape_table(name, vocab_size):
    if name == "digits":
        return digit_table(vocab_size, first_id=vocab_size // 3)
    if name == "irregular":
        return irregular_table(vocab_size)
    return NumberTokenTable.from_values({0: 3.0, 2: 1.0, 5: 4.0, 6: 1.0, 8: 5.0, 9: -2.0, 11: 6.0}, vocab_size=12)


@pytest.mark.parametrize("rows,vocab_size,table_name", SHAPES)
@pytest.mark.parametrize("config", PLAIN_AND_FULL, ids=_config_id)
def test_shapes(rows, vocab_size, table_name, config, device):
    torch.manual_seed(rows * 1000 + vocab_size)
    table = _shape_table(table_name, vocab_size)
    logits = _logits(rows, vocab_size)
    labels = _labels_with_edges(rows, table)
    upstream = [torch.randn(rows), torch.randn(rows)]
    table, logits, labels, upstream = _to(device, table, logits, labels, upstream)
    (ce, ntl), got_grad = _rows_and_grad(
        lambda z: triton_backend.ce_ntl_rows(z, labels, table, config), logits, upstream
    )
    (ce_ref, ntl_ref), want_grad = _rows_and_grad(
        lambda z: reference.ce_ntl_rows(z, labels, table, config), logits.double(), upstream
    )
    assert_spec_close(ce, ce_ref, torch.float32, what="ce")
    assert_spec_close(ntl, ntl_ref, torch.float32, what="ntl")
    assert_spec_close(got_grad, want_grad, torch.float32, gradient=True, what="grad")


@CPU_ONLY
def test_several_programs_with_a_row_tail(monkeypatch):
    """M = 37 over programs of 16 rows: the last program's rows past M are masked."""
    monkeypatch.setattr(_common, "INTERPRET_BLOCK_M", 16)
    monkeypatch.setattr(_common, "INTERPRET_BLOCK_V", 32)
    torch.manual_seed(5)
    table = irregular_table(53)
    config = LossConfig("was", squash_factor=4.0, reweigh=True)
    logits = _logits(37, 53)
    labels = _labels_with_edges(37, table)
    upstream = [torch.randn(37), torch.randn(37)]
    for fn, ref in [(triton_backend.ce_ntl_rows, reference.ce_ntl_rows),
                    (triton_backend.ntl_rows, reference.ntl_rows)]:
        got, got_grad = _rows_and_grad(lambda z: fn(z, labels, table, config), logits, upstream)
        want, want_grad = _rows_and_grad(lambda z: ref(z, labels, table, config), logits.double(), upstream)
        for a, b in zip(got, want):
            assert_spec_close(a, b, torch.float32, what=fn.__name__)
        assert_spec_close(got_grad, want_grad, torch.float32, gradient=True, what=fn.__name__ + " grad")


def test_huge_logits_do_not_overflow(device):
    torch.manual_seed(3)
    table = digit_table(40)
    logits = _logits(16, 40, scale=1e4)
    labels = _labels_with_edges(16, table)
    config = LossConfig("was", reweigh=True)
    upstream = [torch.ones(16), torch.ones(16)]
    table, logits, labels, upstream = _to(device, table, logits, labels, upstream)
    got, got_grad = _rows_and_grad(lambda z: triton_backend.ce_ntl_rows(z, labels, table, config), logits, upstream)
    want, want_grad = _rows_and_grad(
        lambda z: reference.ce_ntl_rows(z, labels, table, config), logits.double(), upstream
    )
    for a, b in zip(got, want):
        assert torch.isfinite(a).all()
        assert_spec_close(a, b, torch.float32)
    assert_spec_close(got_grad, want_grad, torch.float32, gradient=True)


def test_standalone_gradient_touches_only_number_columns(device):
    """Without reweigh the NTL gradient is zero outside the K number-token columns."""
    torch.manual_seed(4)
    table = irregular_table(53)
    logits = _logits(20, 53)
    labels = _labels_with_edges(20, table)
    table, logits, labels, upstream = _to(device, table, logits, labels, [torch.randn(20)])
    _, grad = _rows_and_grad(
        lambda z: triton_backend.ntl_rows(z, labels, table, LossConfig("mse")), logits, upstream
    )
    assert (grad[:, ~table.is_number] == 0).all()
    assert (grad[:, table.is_number] != 0).any()


# --------------------------------------------------------------------------------- public API
API_TABLE = lambda: digit_table(300, first_id=120)  # noqa: E731


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize(
    "options",
    [dict(loss="was"), dict(loss="was_cdf", gaussian_sigma=1.0), dict(loss="huber", reweigh=True),
     dict(loss="was", squash_factor=2.5, ignore_index=-1)],
    ids=["was", "gce-was_cdf", "huber-reweigh", "was-squash-ignore-1"],
)
def test_cross_entropy_with_ntl_api(options, weighted, reduction, device):
    torch.manual_seed(11)
    table = API_TABLE()
    logits = _logits(2 * 13, 300).view(2, 13, 300)
    labels = random_labels((2, 13), table, ignore_index=options.get("ignore_index", -100))
    weights = torch.rand(2, 13) if weighted else None
    upstream = torch.randn(2, 13, generator=torch.Generator().manual_seed(1))
    table, logits, labels, upstream = _to(device, table, logits, labels, upstream)
    weights = weights.to(device) if weighted else None
    results = {}
    for backend in ("triton", "reference"):
        z = logits.clone().requires_grad_()
        out = ntl_fast.cross_entropy_with_ntl(
            z, labels, table, ntl_weight=0.3, reduction=reduction, weights=weights, backend=backend, **options
        )
        loss = out.loss if reduction != "none" else (out.loss * upstream).sum()
        loss.backward()
        results[backend] = (out.loss.detach(), out.ce, out.ntl, z.grad)
    for name, got, want in zip(("loss", "ce", "ntl", "grad"), results["triton"], results["reference"]):
        assert_spec_close(got, want, torch.float32, gradient=name == "grad", what=name)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("options", [dict(loss="was"), dict(loss="mae", reweigh=True)], ids=["was", "mae-reweigh"])
def test_number_token_loss_api(options, reduction, device):
    torch.manual_seed(12)
    table = irregular_table(53)
    logits = _logits(30, 53)
    labels = random_labels((30,), table)
    weights = torch.rand(30)
    table, logits, labels, weights = _to(device, table, logits, labels, weights)
    results = {}
    for backend in ("triton", "reference"):
        z = logits.clone().requires_grad_()
        loss = ntl_fast.number_token_loss(z, labels, table, reduction=reduction, weights=weights,
                                          backend=backend, **options)
        (loss if reduction != "none" else loss.square()).sum().backward()
        results[backend] = (loss.detach(), z.grad)
    assert_spec_close(results["triton"][0], results["reference"][0], torch.float32, what="loss")
    assert_spec_close(results["triton"][1], results["reference"][1], torch.float32, gradient=True, what="grad")


def test_normalizers_and_shift(device):
    torch.manual_seed(13)
    table = digit_table(40)
    logits = _logits(3 * 9, 40).view(3, 9, 40)
    labels = random_labels((3, 9), table)
    table, logits, labels = _to(device, table, logits, labels)
    results = {}
    for backend in ("triton", "reference"):
        z = logits.clone().requires_grad_()
        out = ntl_fast.cross_entropy_with_ntl(
            z, labels, table, backend=backend, ce_normalizer=7.0, ntl_normalizer=torch.tensor(3.0, device=device),
            shift_labels=True,
        )
        out.loss.backward()
        z2 = logits.clone().requires_grad_()
        ntl = ntl_fast.number_token_loss(z2, labels, table, backend=backend, normalizer=5, shift_labels=True)
        ntl.backward()
        results[backend] = (out.loss.detach(), out.ce, out.ntl, z.grad, ntl.detach(), z2.grad)
    for got, want in zip(results["triton"], results["reference"]):
        assert_spec_close(got, want, torch.float32)


@pytest.mark.parametrize("case", ["all_ignored", "no_number_label"])
def test_empty_means_are_zero_with_zero_gradient(case, device):
    table = digit_table(40)
    logits = _logits(8, 40)
    if case == "all_ignored":
        labels = torch.full((8,), -100)
    else:
        labels = torch.tensor([0, 1, 2, 3, 30, 31, -100, 39])  # no id in 7..16
    table, logits, labels = _to(device, table, logits, labels)
    for backend in ("triton", "reference"):
        z = logits.clone().requires_grad_()
        out = ntl_fast.cross_entropy_with_ntl(z, labels, table, backend=backend)
        out.loss.backward()
        assert out.ntl.item() == 0.0
        if case == "all_ignored":
            assert out.loss.item() == 0.0
            assert (z.grad == 0).all()
        else:
            assert (z.grad[:, table.is_number] != 0).any()  # CE still pushes the number columns down
        z2 = logits.clone().requires_grad_()
        ntl = ntl_fast.number_token_loss(z2, labels, table, backend=backend)
        ntl.backward()
        assert ntl.item() == 0.0 and ntl.grad_fn is not None
        assert (z2.grad == 0).all()


def test_int32_labels(device):
    torch.manual_seed(14)
    table = irregular_table(53)
    logits = _logits(12, 53)
    labels = random_labels((12,), table)
    table, logits, labels = _to(device, table, logits, labels)
    got = ntl_fast.cross_entropy_with_ntl(logits, labels.int(), table, backend="triton")
    want = ntl_fast.cross_entropy_with_ntl(logits, labels, table, backend="reference")
    assert_spec_close(got.loss, want.loss, torch.float32)


# --------------------------------------------------------------------------------- dtypes
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("config", [LossConfig("was"), LossConfig("mse", reweigh=True),
                                    LossConfig("was_cdf", gaussian_sigma=1.0)], ids=_config_id)
def test_half_precision_logits(dtype, config, device):
    torch.manual_seed(15)
    table = digit_table(300, first_id=200)
    logits = _logits(24, 300, dtype=dtype)
    labels = _labels_with_edges(24, table)
    upstream = [torch.randn(24), torch.randn(24)]
    table, logits, labels, upstream = _to(device, table, logits, labels, upstream)
    (ce, ntl), grad = _rows_and_grad(lambda z: triton_backend.ce_ntl_rows(z, labels, table, config), logits, upstream)
    (ce_ref, ntl_ref), grad_ref = _rows_and_grad(
        lambda z: reference.ce_ntl_rows(z, labels, table, config), logits.float(), upstream
    )
    assert ce.dtype == torch.float32 and grad.dtype == dtype
    assert_spec_close(ce, ce_ref, dtype, what="ce")
    assert_spec_close(ntl, ntl_ref, dtype, what="ntl")
    assert_spec_close(grad, grad_ref, dtype, gradient=True, what="grad")
    (ntl_only,), grad_only = _rows_and_grad(
        lambda z: triton_backend.ntl_rows(z, labels, table, config), logits, upstream[1:]
    )
    (ntl_only_ref,), grad_only_ref = _rows_and_grad(
        lambda z: reference.ntl_rows(z, labels, table, config), logits.float(), upstream[1:]
    )
    assert_spec_close(ntl_only, ntl_only_ref, dtype, what="standalone ntl")
    assert_spec_close(grad_only, grad_only_ref, dtype, gradient=True, what="standalone grad")


def test_float64_logits_give_float64_losses(device):
    table = digit_table(40)
    logits = _logits(6, 40, dtype=torch.float64)
    labels = _labels_with_edges(6, table)
    table, logits, labels = _to(device, table, logits, labels)
    ce, ntl = triton_backend.ce_ntl_rows(logits, labels, table, LossConfig())
    assert ce.dtype == ntl.dtype == torch.float64
    assert triton_backend.ntl_rows(logits, labels, table, LossConfig()).dtype == torch.float64


# --------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("config", PLAIN_AND_FULL, ids=_config_id)
def test_bad_labels_give_nan_and_never_touch_memory(config, device):
    torch.manual_seed(16)
    table = irregular_table(53)
    logits = _logits(10, 53)
    labels = _labels_with_edges(10, table)
    bad = torch.tensor([1, 4, 7])
    labels[bad] = torch.tensor([-7, 53, 10**12])
    good = torch.ones(10, dtype=torch.bool)
    good[bad] = False
    upstream = [torch.randn(10), torch.randn(10)]
    table, logits, labels, upstream, bad, good = _to(device, table, logits, labels, upstream, bad, good)

    def finite_rows(fn):
        def rows(z):
            outputs = fn(z)
            outputs = (outputs,) if isinstance(outputs, torch.Tensor) else outputs
            for out in outputs:
                assert torch.isnan(out[bad]).all() and not torch.isnan(out[good]).any()
            return tuple(torch.where(good, out, torch.zeros_like(out)) for out in outputs)
        return rows

    for fn, ref in [(triton_backend.ce_ntl_rows, reference.ce_ntl_rows), (triton_backend.ntl_rows, reference.ntl_rows)]:
        got, grad = _rows_and_grad(finite_rows(lambda z: fn(z, labels, table, config)), logits, upstream)
        want, grad_ref = _rows_and_grad(finite_rows(lambda z: ref(z, labels, table, config)), logits.double(), upstream)
        for a, b in zip(got, want):
            assert_spec_close(a, b, torch.float32)
        assert_spec_close(grad, grad_ref, torch.float32, gradient=True)
        assert (grad[bad] == 0).all()
    out = ntl_fast.cross_entropy_with_ntl(logits, labels, table, backend="triton", validate=False, reduction="none")
    assert torch.isnan(out.loss[bad]).all() and torch.isfinite(out.loss[good]).all()
    with pytest.raises(ValueError, match="labels must be in"):
        ntl_fast.cross_entropy_with_ntl(logits, labels, table, backend="triton")


# --------------------------------------------------------------------------------- in place
@pytest.mark.parametrize("config", [LossConfig("was"), LossConfig("mse", reweigh=True, gaussian_sigma=1.0)],
                         ids=_config_id)
def test_inplace_gives_the_same_gradient(config, device):
    torch.manual_seed(17)
    table = irregular_table(53)
    source = _logits(40, 53)
    labels = _labels_with_edges(40, table)
    upstream = [torch.randn(40), torch.randn(40)]
    table, source, labels, upstream = _to(device, table, source, labels, upstream)
    grads = []
    for inplace in (False, True):
        leaf = source.clone().requires_grad_()
        logits = leaf * 1.0  # the buffer the in-place backward overwrites
        ce, ntl = triton_backend.ce_ntl_rows(logits, labels, table, config, inplace=inplace)
        ((ce * upstream[0]).sum() + (ntl * upstream[1]).sum()).backward()
        grads.append(leaf.grad)
        if inplace:
            assert torch.equal(logits.detach(), leaf.grad)  # the hazard: the logits now hold gradients
        else:
            assert torch.equal(logits.detach(), source)
    assert torch.equal(grads[0], grads[1])
    leaf = source.clone().requires_grad_()
    out = ntl_fast.cross_entropy_with_ntl(leaf * 1.0, labels, table, backend="triton", inplace=True)
    out.loss.backward()
    want = source.clone().requires_grad_()
    ntl_fast.cross_entropy_with_ntl(want, labels, table, backend="reference").loss.backward()
    assert_spec_close(leaf.grad, want.grad, torch.float32, gradient=True)


# --------------------------------------------------------------------------------- gradcheck
GRADCHECK_TABLE = lambda: NumberTokenTable.from_values({1: 0.0, 3: 1.5, 6: 4.0, 10: 2.0}, vocab_size=12)  # noqa: E731


@pytest.mark.parametrize("config", CONFIGS, ids=_config_id)
def test_gradcheck_float64(config, device):
    torch.manual_seed(18)
    table, logits, labels = _to(device, GRADCHECK_TABLE(), _logits(5, 12, scale=1.0, dtype=torch.float64),
                                torch.tensor([3, 10, 0, config.ignore_index, 1]))
    logits.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda z: triton_backend.ce_ntl_rows(z, labels, table, config), (logits,), fast_mode=True
    )
    assert torch.autograd.gradcheck(
        lambda z: triton_backend.ntl_rows(z, labels, table, config), (logits,), fast_mode=True
    )


def test_gradcheck_float64_full_jacobian(device):
    """One case with the full Jacobian (every other gradcheck is fast_mode)."""
    torch.manual_seed(21)
    table, logits, labels = _to(device, GRADCHECK_TABLE(), _logits(3, 12, scale=1.0, dtype=torch.float64),
                                torch.tensor([6, 0, 10]))
    logits.requires_grad_()
    config = LossConfig("was_cdf", gaussian_sigma=1.5, reweigh=True)
    assert torch.autograd.gradcheck(lambda z: triton_backend.ce_ntl_rows(z, labels, table, config), (logits,))


# --------------------------------------------------------------------------------- torch.library
def _op_args(config, table, device, rows=6):
    torch.manual_seed(19)
    logits, labels, table = _to(device, _logits(rows, table.vocab_size), _labels_with_edges(rows, table), table)
    return (logits.requires_grad_(), labels, list(table.kernel_tensors()), *loss_options(config, table))


@pytest.mark.parametrize("config", PLAIN_AND_FULL, ids=_config_id)
def test_opcheck(config, device):
    table = digit_table(40)
    args = _op_args(config, table, device)
    torch.library.opcheck(torch.ops.ntl_fast.triton_ntl_forward.default, args)
    torch.library.opcheck(torch.ops.ntl_fast.triton_ce_ntl_forward.default, args + (False,))
    logits, labels, tables, *options = args
    lse = triton_backend.ce_ntl_forward(logits, labels, tables, *options, False)[2].detach()
    grads = _to(device, torch.randn(6), torch.randn(6))
    backward_args = (*grads, logits.detach(), labels, lse, tables, *options)
    torch.library.opcheck(torch.ops.ntl_fast.triton_ce_ntl_backward.default, backward_args)
    torch.library.opcheck(torch.ops.ntl_fast.triton_ntl_backward.default, backward_args[1:])


def test_compiles_without_graph_break(checked_device):
    """torch.compile(fullgraph=True) traces the public API through the registered ops (Inductor
    on CUDA; AOT-eager on the interpreter, whose kernels Inductor cannot fuse around)."""
    torch.manual_seed(20)
    table = digit_table(40)
    labels = random_labels((2, 5), table)
    table, labels, model, inputs = _to(checked_device, table, labels, torch.nn.Linear(8, 40), torch.randn(2, 5, 8))

    def step(x):
        out = ntl_fast.cross_entropy_with_ntl(model(x), labels, table, backend="triton",
                                             squash_factor=2.0, reweigh=True)
        ntl = ntl_fast.number_token_loss(model(x), labels, table, backend="triton", loss="was_cdf")
        return out.loss + ntl

    explanation = torch._dynamo.explain(step)(inputs)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    compiled = torch.compile(step, backend="inductor" if checked_device.type == "cuda" else "aot_eager", fullgraph=True)
    loss = compiled(inputs)
    loss.backward()
    compiled_grad = model.weight.grad.clone()
    model.weight.grad = None
    eager = step(inputs)
    eager.backward()
    assert_spec_close(loss, eager, torch.float32)
    assert_spec_close(compiled_grad, model.weight.grad, torch.float32, gradient=True)


@CUDA_ONLY
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_one_pass_replays_under_cuda_graph_capture_gpu(dtype):
    check_one_pass_under_cuda_graph("triton", dtype)


# --------------------------------------------------------------------------------- properties
@st.composite
def _problems(draw):
    vocab_size = draw(st.integers(2, 200))
    num_numbers = draw(st.integers(1, min(12, vocab_size - 1)))
    ids = draw(st.lists(st.integers(0, vocab_size - 1), min_size=num_numbers, max_size=num_numbers, unique=True))
    values = draw(st.lists(st.integers(-5, 20), min_size=num_numbers, max_size=num_numbers))
    table = NumberTokenTable.from_values({i: float(v) for i, v in zip(ids, values)}, vocab_size=vocab_size)
    loss = draw(st.sampled_from(["was", "mse", "mae", "huber", "was_cdf"]))
    squash = draw(st.sampled_from([None, 1.5, 4.0])) if loss == "was" else None
    sigma = draw(st.sampled_from([None, 0.5, 2.0]))
    config = LossConfig(loss, squash, draw(st.booleans()), sigma)
    rows = draw(st.integers(1, 40))
    reduction = draw(st.sampled_from(["mean", "sum", "none"]))
    seed = draw(st.integers(0, 2**16))
    return table, config, rows, reduction, seed


@CPU_ONLY
@settings(max_examples=15, deadline=None)
@given(_problems())
def test_property_matches_reference(problem):
    table, config, rows, reduction, seed = problem
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, table.vocab_size, generator=generator, dtype=torch.float64).float() * 2
    labels = random_labels((rows,), table, generator=generator)
    options = dict(loss=config.loss, squash_factor=config.squash_factor, reweigh=config.reweigh,
                   gaussian_sigma=config.gaussian_sigma, reduction=reduction)
    results = {}
    for backend in ("triton", "reference"):
        z = logits.clone().requires_grad_()
        out = ntl_fast.cross_entropy_with_ntl(z, labels, table, backend=backend, **options)
        z2 = logits.clone().requires_grad_()
        ntl = ntl_fast.number_token_loss(z2, labels, table, backend=backend, loss=config.loss,
                                         squash_factor=config.squash_factor, reweigh=config.reweigh,
                                         reduction=reduction)
        (out.loss.sum() + ntl.sum()).backward()
        results[backend] = (out.ce, out.ntl, ntl.detach(), z.grad, z2.grad)
    names = ("ce", "ntl", "standalone ntl", "grad", "standalone grad")
    for name, got, want in zip(names, results["triton"], results["reference"]):
        assert_spec_close(got, want, torch.float32, gradient="grad" in name, what=name)
    assert not math.isnan(float(results["triton"][0].sum()))


# --------------------------------------------------------------------------------- GPU compilation
_COMPILE_FOR_SM90 = r'''
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from ntl_fast.triton.cross_entropy_with_ntl import _ce_ntl_backward_kernel, _ce_ntl_forward_kernel
from ntl_fast.triton.number_token_loss import _ntl_backward_kernel, _ntl_forward_kernel

INT64 = {"labels_ptr", "number_ids_ptr", "number_index_ptr", "value_order_ptr", "value_rank_ptr"}
seen = set()
for fn, block_m in [(_ntl_forward_kernel, 16), (_ntl_backward_kernel, 1),
                    (_ce_ntl_forward_kernel, 1), (_ce_ntl_backward_kernel, 1),
                    (_ntl_backward_kernel, 2), (_ce_ntl_forward_kernel, 1)]:
    tiled = fn in seen  # each kernel once with one number tile (K <= 16) and once tiled (BLOCK_K = 256)
    seen.add(fn)
    # the one-pass forward holds its row (RESIDENT) untiled, streams it tiled, as a GPU launch of WAS_CDF
    constants = dict(LOSS=4, SQUASH=False, REWEIGH=not tiled, GAUSSIAN=True, GRAD=True, INPLACE=True,
                     BLOCK_M=block_m, BLOCK_V=2048, BLOCK_K=256 if tiled else 16, TILED=tiled, RESIDENT=not tiled)
    constants = {name: value for name, value in constants.items() if name in fn.arg_names}
    signature = {}
    for name in fn.arg_names:
        if name in constants:
            signature[name] = "constexpr"
        elif name in ("logits_ptr", "grad_ptr"):
            signature[name] = "*bf16"
        elif name in INT64:
            signature[name] = "*i64"
        elif name == "is_number_ptr":
            signature[name] = "*i1"
        elif name.endswith("_ptr"):
            signature[name] = "*fp32"
        elif name in ("sorted_gaps_ptr", "number_values_ptr"):
            signature[name] = "*fp32"
        elif name in ("stride_m", "stride_gm", "stride_label", "M", "V", "K", "ignore_index"):
            signature[name] = "i32"
        else:
            signature[name] = "fp32"
    constexprs = {(fn.arg_names.index(name),): value for name, value in constants.items()}
    triton.compile(ASTSource(fn, signature, constexprs=constexprs), target=GPUTarget("cuda", 90, 32),
                   options={"num_warps": 8})
print("compiled")
'''


@pytest.mark.slow
def test_kernels_compile_for_sm90(tmp_path):
    """The interpreter accepts code the compiler rejects: compile each kernel for sm_90 (no GPU
    needed; Triton ships ptxas). Runs in a subprocess, where TRITON_INTERPRET is unset."""
    pytest.importorskip("triton.backends.nvidia.compiler")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parents[1]), env.get("PYTHONPATH", "")])
    result = subprocess.run([sys.executable, "-c", _COMPILE_FOR_SM90], env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0 and "compiled" in result.stdout, result.stderr[-3000:]


# --------------------------------------------------------------------------------- masks, layouts, shifts
def _assert_rows_match_reference(logits, labels, table, config, what, device):
    """Triton's CE, NTL and gradients on ``device`` against the float64 reference, every entry
    point: the two differentiable ones and, for the dtypes it serves, the one-pass loss and gradient."""
    logits, labels, table = _to(device, logits, labels, table)
    rows = logits.shape[0]
    upstream = [torch.linspace(0.5, 1.5, rows, device=logits.device),
                torch.linspace(1.5, 0.5, rows, device=logits.device)]
    pairs = [(triton_backend.ce_ntl_rows, reference.ce_ntl_rows), (triton_backend.ntl_rows, reference.ntl_rows)]
    for fn, ref in pairs:
        got, grad = _rows_and_grad(lambda z: fn(z, labels, table, config), logits, upstream)
        want, grad_ref = _rows_and_grad(lambda z: ref(z, labels, table, config), logits.double(), upstream)
        if fn is triton_backend.ce_ntl_rows and triton_backend.fuses_loss_and_grad(logits):
            *rows_one_pass, grad_one_pass = triton_backend.ce_ntl_loss_and_grad(logits, labels, table, config,
                                                                                *upstream)
            got, grad = got + tuple(rows_one_pass), torch.stack([grad, grad_one_pass])
            want, grad_ref = want + want, torch.stack([grad_ref, grad_ref])
        for index, (a, b) in enumerate(zip(got, want)):
            assert torch.isfinite(b).all(), f"{what}: the reference is not finite"
            assert_spec_close(a, b, logits.dtype, what=f"{what}: {fn.__name__} output {index}")
        assert_spec_close(grad, grad_ref, logits.dtype, gradient=True, what=f"{what}: {fn.__name__} gradient")


MASK_CONFIGS = [LossConfig("was"), LossConfig("mse", reweigh=True), LossConfig("was_cdf", reweigh=True),
                LossConfig("huber", gaussian_sigma=1.0, reweigh=True)]


@pytest.mark.parametrize("profile", ["interpret", "cuda"])
@pytest.mark.parametrize("config", MASK_CONFIGS, ids=_config_id)
def test_minus_inf_masks_give_the_reference_result(config, profile, device):
    """-inf logits are ordinary input: leading blocks of any length (the online log-sum-exp once
    computed exp(-inf - (-inf)) = NaN there), every text token, all but the label, every number
    token under a text label. The "cuda" profile runs a GPU launch's tiling (CUDA_BLOCK_V-wide blocks)."""
    torch.manual_seed(31)
    vocab_size = 5000 if profile == "cuda" else 300
    block = _common.CUDA_BLOCK_V if profile == "cuda" else _common.INTERPRET_BLOCK_V
    table = NumberTokenTable.from_values({vocab_size - 20 + d: float(d) for d in range(10)}, vocab_size=vocab_size)
    logits = _logits(6, vocab_size)
    labels = torch.tensor([vocab_size - 17, 5, vocab_size - 11, 3, vocab_size - 20, 200])
    logits[0, :block] = float("-inf")          # the first block, a number label
    logits[1, 7:2 * block] = float("-inf")     # two blocks but not the text label
    logits[2, :vocab_size - 20] = float("-inf")  # every text token
    logits[3, :] = float("-inf")               # all but the (text) label
    logits[3, 3] = 0.5
    logits[4, torch.arange(vocab_size) != vocab_size - 20] = float("-inf")  # all but the number label
    logits[5, vocab_size - 20:vocab_size - 10] = float("-inf")  # every number token, a text label
    if config.gaussian_sigma is not None:
        # Gaussian targets put mass on every number token: masking one makes the true loss inf
        logits, labels = logits[[0, 1, 2, 3, 5]], labels[[0, 1, 2, 3, 5]]
    settings = _common.use_launch_settings("cuda") if profile == "cuda" else contextlib.nullcontext()
    with settings:
        _assert_rows_match_reference(logits, labels, table, config, f"masks ({profile})", device)


# --------------------------------------------------------------------------------- tables wider than a tile
def test_number_tokens_are_tiled_above_the_cap():
    """``BLOCK_K = next_pow2(K)`` up to MAX_BLOCK_K (one tile: the untiled code, so small tables keep
    their numbers bitwise); above it, MAX_BLOCK_K-wide tiles, in both launch profiles."""
    cap = _common.MAX_BLOCK_K
    for profile in ("interpret", "cuda"):
        with _common.use_launch_settings(profile):
            for num_numbers, block_k, tiled in [(1, 1, False), (10, 16, False), (cap, cap, False),
                                                (cap + 1, cap, True), (1110, cap, True), (4096, cap, True)]:
                for full_row in (True, False):
                    settings = _common.launch_settings(64, 32128, num_numbers, full_row)
                    assert (settings["BLOCK_K"], settings["TILED"]) == (block_k, tiled), (profile, num_numbers)
                    if profile == "cuda" and not full_row:
                        assert settings["BLOCK_M"] * block_k <= (_common.CUDA_TILED_NUMBER_TILE if tiled
                                                                 else _common.CUDA_NUMBER_TILE)


@pytest.mark.parametrize("table_name", list(TABLES))
@pytest.mark.parametrize("config", CONFIGS, ids=_config_id)
def test_tiled_number_tokens_match_reference(config, table_name, monkeypatch, device):
    """K in tiles of 4 (K = 7 and 10: a tile tail; WAS_CDF's prefix and suffix sides meet inside a
    tile or at its edge): every entry point, forward and backward, and the one-pass loss and
    gradient in float32 and bfloat16, in place too, against the float64 reference."""
    monkeypatch.setattr(_common, "MAX_BLOCK_K", 4)
    torch.manual_seed(41)
    table = TABLES[table_name]()
    logits = _logits(37, table.vocab_size)
    labels = _labels_with_edges(37, table, config.ignore_index)
    _assert_rows_match_reference(logits, labels, table, config, f"tiled ({table_name})", device)
    for dtype in (torch.float32, torch.bfloat16):
        case_table, case_logits, case_labels, ce_scale, ntl_scale = _one_pass_case(37, table, dtype, 42, device)
        case_labels[case_labels == -100] = config.ignore_index
        _assert_one_pass_matches_reference(case_logits, case_labels, case_table, config, ce_scale, ntl_scale,
                                           what=f"tiled {dtype}")


@pytest.mark.parametrize("config", MASK_CONFIGS, ids=_config_id)
def test_tiled_number_tokens_with_minus_inf_masks(config, monkeypatch, device):
    """-inf number logits in whole tiles, in part of a tile, and everywhere but the label."""
    monkeypatch.setattr(_common, "MAX_BLOCK_K", 4)
    torch.manual_seed(43)
    table = NumberTokenTable.from_values({280 + d: float(d) for d in range(10)}, vocab_size=300)
    logits = _logits(6, 300)
    labels = torch.tensor([283, 5, 289, 3, 280, 200])
    logits[0, 280:284] = float("-inf")                 # the first tile but the label
    logits[0, 283] = 0.25
    logits[1, 284:290] = float("-inf")                 # the last tile and part of the second
    logits[2, :280] = float("-inf")                    # every text token
    logits[3, :] = float("-inf")                       # all but the (text) label
    logits[3, 3] = 0.5
    logits[4, torch.arange(300) != 280] = float("-inf")  # all but the number label
    logits[5, 280:290] = float("-inf")                 # every number token, a text label
    if config.gaussian_sigma is not None:
        # Gaussian targets put mass on every number token: masking one makes the true loss inf
        logits, labels = logits[[2, 3, 5]], labels[[2, 3, 5]]
    _assert_rows_match_reference(logits, labels, table, config, "tiled masks", device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("config", CONFIGS, ids=_config_id)
def test_k_4096_matches_reference(config, dtype, checked_device):
    """A 4096-token table (16 tiles of MAX_BLOCK_K) in a vocabulary with a BLOCK_V tail: every
    entry point (standalone NTL and CE + NTL, forward and backward; the one-pass loss and gradient
    in place too) against the reference."""
    torch.manual_seed(44)
    vocab_size, num_numbers = 4500, 4096
    values = (torch.randperm(num_numbers).double() * 0.25 - 100.0).tolist()  # unsorted, spread, negative too
    table = NumberTokenTable.from_values({300 + k: values[k] for k in range(num_numbers)}, vocab_size=vocab_size)
    assert _common.launch_settings(8, vocab_size, num_numbers, True)["TILED"]
    logits = _logits(8, vocab_size)
    labels = _labels_with_edges(8, table, config.ignore_index)
    labels[1:3] = torch.tensor([300, 300 + num_numbers - 1])
    if dtype == torch.float32:
        _assert_rows_match_reference(logits, labels, table, config, "K = 4096", checked_device)
    case_table, case_logits, case_labels, ce_scale, ntl_scale = _one_pass_case(8, table, dtype, 45, checked_device)
    case_labels[case_labels == -100] = config.ignore_index
    _assert_one_pass_matches_reference(case_logits, case_labels, case_table, config, ce_scale, ntl_scale,
                                       what="K = 4096")


def test_big_negative_masks_behave_like_minus_inf(device):
    torch.manual_seed(32)
    table = irregular_table(300)
    labels = _labels_with_edges(8, table)
    for mask in (-1e6, -torch.finfo(torch.float32).max):
        logits = _logits(8, 300)
        logits[:, :150] = mask
        logits[torch.arange(8), labels.clamp_min(0)] = 1.0
        for config in MASK_CONFIGS:
            _assert_rows_match_reference(logits, labels, table, config, f"mask {mask:g}", device)


def test_strided_labels_and_logits_give_the_contiguous_numbers_bitwise(device):
    """``x[:, -1]`` with ``y[:, -1]`` of a (B, T) batch: the kernels once read labels with stride 1."""
    torch.manual_seed(33)
    table = irregular_table(53)
    x = _logits(5 * 4, 53).view(5, 4, 53)
    y = _labels_with_edges(20, table).view(5, 4)
    table, x, y = _to(device, table, x, y)
    views = [lambda t: t[:, -1], lambda t: t.transpose(0, 1)[1], lambda t: t[::2, 1]]
    for config in (LossConfig("was"), LossConfig("mse", reweigh=True, gaussian_sigma=1.0)):
        for view in views:
            labels = view(y)
            assert not labels.is_contiguous()
            for fn in (triton_backend.ce_ntl_rows, triton_backend.ntl_rows):
                results = []
                for contiguous in (False, True):
                    leaf = x.clone().requires_grad_()
                    logits = view(leaf).contiguous() if contiguous else view(leaf)
                    rows = fn(logits, labels.contiguous() if contiguous else labels, table, config)
                    rows = (rows,) if isinstance(rows, torch.Tensor) else rows
                    sum(r.sum() * (i + 1) for i, r in enumerate(rows)).backward()
                    results.append((*rows, leaf.grad))
                for a, b in zip(*results):
                    assert torch.equal(a, b), f"{fn.__name__} {_config_id(config)}"


@pytest.mark.parametrize("shift", [1e4, -1e4])
def test_shift_invariance_with_large_logits(shift, device):
    """Logits on a 2^-10 grid shifted by ±1e4 stay exact; losses and gradients must not move by
    more than the tolerances (``z - LSE_V`` with LSE_V rounded near 1e4 lost ~5e-4)."""
    torch.manual_seed(34)
    table = irregular_table(300)
    logits = torch.round(_logits(12, 300) * 1024) / 1024
    logits, shifted = _to(device, logits, logits + shift)
    for config in CONFIGS:
        labels = _labels_with_edges(12, table, config.ignore_index).to(device)
        upstream = [torch.linspace(0.5, 1.5, 12, device=device), torch.linspace(1.5, 0.5, 12, device=device)]
        for fn in (triton_backend.ce_ntl_rows, triton_backend.ntl_rows):
            base, grad = _rows_and_grad(lambda z: fn(z, labels, table, config), logits, upstream)
            moved, grad_moved = _rows_and_grad(lambda z: fn(z, labels, table, config), shifted, upstream)
            for a, b in zip(moved, base):
                assert_spec_close(a, b, torch.float32, what=f"{_config_id(config)} {fn.__name__}")
            assert_spec_close(grad_moved, grad, torch.float32, gradient=True, what=f"{_config_id(config)} gradient")


def test_reweigh_with_all_mass_on_numbers(device):
    """Every text logit -inf: m is 1 to the last bit and ``1 - m`` must be exactly the text mass
    (0 here, tiny in the second row), not rounding noise times the reweigh constant."""
    torch.manual_seed(35)
    table = digit_table(300)
    logits = _logits(4, 300)
    logits[:, table.is_number.logical_not()] = float("-inf")
    logits[1, 0] = -30.0  # a text mass of ~1e-13
    labels = table.number_ids[torch.tensor([0, 3, 9, 5])]
    for loss in ("mse", "was", "huber", "was_cdf"):
        _assert_rows_match_reference(logits, labels, table, LossConfig(loss, reweigh=True), f"reweigh {loss}", device)


def test_ignore_index_inside_the_vocabulary_is_ignored(device):
    torch.manual_seed(36)
    table = digit_table(40)
    logits = _logits(6, 40)
    labels = torch.tensor([3, 7, 8, 3, 20, 3])  # ignore_index 3 is a valid token id
    table, logits, labels = _to(device, table, logits, labels)
    config = LossConfig("was", ignore_index=3)
    ce, ntl = triton_backend.ce_ntl_rows(logits, labels, table, config)
    assert (ce[labels == 3] == 0).all() and (ntl[labels == 3] == 0).all()
    _assert_rows_match_reference(logits, labels, table, config, "ignore_index 3", device)


@pytest.mark.parametrize("poison", [float("inf"), float("nan"), float("-inf")])
def test_rows_that_do_not_count_give_exact_zeros_whatever_their_logits(poison, device):
    """Ignored and zero-weight rows: 0 loss and exactly 0 gradient even with inf/NaN logits; a
    counted row with inf/NaN logits is non-finite and touches no other row."""
    torch.manual_seed(37)
    table = irregular_table(53)
    logits = _logits(6, 53)
    labels = torch.tensor([4, -100, 11, 30, 0, 44])
    logits[1:4] = poison  # row 1 ignored, rows 2-3 get weight 0
    weights = torch.tensor([1.0, 1.0, 0.0, 0.0, 2.0, 1.0])
    table, logits, labels, weights = _to(device, table, logits, labels, weights)
    for fn in ("cross_entropy_with_ntl", "number_token_loss"):
        for backend in ("triton", "reference"):
            leaf = logits.clone().requires_grad_()
            out = getattr(ntl_fast, fn)(leaf, labels, table, weights=weights, backend=backend,
                                        reweigh=True, reduction="sum")
            out = out.loss if fn == "cross_entropy_with_ntl" else out
            out.backward()
            assert torch.isfinite(out), f"{fn} {backend}"
            assert (leaf.grad[1:4] == 0).all() and torch.isfinite(leaf.grad).all(), f"{fn} {backend}"
    counted = ntl_fast.cross_entropy_with_ntl(logits, labels, table, backend="triton", reduction="none")
    finite = torch.isfinite(counted.loss)
    if poison != float("-inf"):
        assert not finite[2:4].any()
    assert finite[[0, 1, 4, 5]].all() and (counted.loss[1] == 0)


@pytest.mark.parametrize("loss", ["mse", "mae", "huber"])
def test_regression_losses_keep_precision_near_the_label(loss, device):
    """ŷ - y computed as Σ q_j (v_j - y), as the reference does (a rounded ŷ minus y lost ~eps·|v|)."""
    table = NumberTokenTable.from_values({3: -17.5, 9: 20.0, 12: 19.5}, vocab_size=16)
    torch.manual_seed(43)
    logits = _logits(6, 16, scale=1.0)
    labels = torch.tensor([3, 9, 12, 3, 9, 12])
    logits[torch.arange(6), labels] += torch.tensor([9.0, 8.0, 7.5, 10.0, 6.0, 9.5])
    _assert_rows_match_reference(logits, labels, table, LossConfig(loss), f"near the label ({loss})", device)


def test_inplace_is_not_used_on_rows_that_share_memory(device):
    """Expanded logits (stride-0 rows) cannot each receive their own gradient in their buffer:
    ``inplace=True`` then computes out of place (the rows once overwrote each other)."""
    torch.manual_seed(38)
    table = irregular_table(53)
    row = _logits(1, 53)
    labels = torch.tensor([4, 11, 30, -100])
    table, row, labels = _to(device, table, row, labels)
    grads = []
    for inplace in (False, True):
        leaf = row.clone().requires_grad_()
        logits = (leaf * 1).expand(4, 53)
        ntl_fast.cross_entropy_with_ntl(logits, labels, table, backend="triton", inplace=inplace).loss.backward()
        grads.append(leaf.grad)
    assert torch.equal(grads[0], grads[1])


@pytest.mark.parametrize("config", [LossConfig("was_cdf"), LossConfig("was_cdf", gaussian_sigma=0.5), LossConfig("was"),
                                    LossConfig("mse")], ids=_config_id)
def test_confident_predictions_keep_their_precision(config, device):
    """A confident prediction (the label's logit 12 above the rest): CDF differences above the
    label once came as 1 - q_l from a q_l rounded near 1, and a_l - Σ q a cancelled."""
    torch.manual_seed(39)
    table = irregular_table(53)
    logits = _logits(16, 53, scale=1.0)
    labels = table.number_ids[torch.randint(0, table.num_numbers, (16,))]
    logits[torch.arange(16), labels] += 12.0
    _assert_rows_match_reference(logits, labels, table, config, "confident", device)


# --------------------------------------------------------------------------------- loss kinds
def test_loss_kinds_are_the_config_enum():
    """The kernels' named constexpr loss codes are ntl_fast.config.LossKind's, and the ops map a
    variant's name to its code through LossKind (no table of codes of their own)."""
    for kind in LossKind:
        assert getattr(_common, kind.name).value == kind.value, kind
        options = loss_options(LossConfig(kind.name.lower()), digit_table(40))
        assert _common.kernel_options(*options)[1]["LOSS"] == kind.value
    assert not hasattr(_common, "LOSS_CODES")


def test_kernels_take_the_tables_every_backend_takes():
    """Every kernel receives the 7 tensors of NumberTokenTable.kernel_tensors(), in that order."""
    from ntl_fast.triton import cross_entropy_with_ntl, number_token_loss

    names = [name + "_ptr" for name in NumberTokenTable.KERNEL_TENSORS]
    for kernel in (cross_entropy_with_ntl._ce_ntl_forward_kernel, cross_entropy_with_ntl._ce_ntl_backward_kernel,
                   number_token_loss._ntl_forward_kernel, number_token_loss._ntl_backward_kernel):
        start = kernel.arg_names.index(names[0])
        assert kernel.arg_names[start:start + len(names)] == names, kernel.arg_names


# --------------------------------------------------------------------------------- one pass: loss and gradient
def test_fuses_loss_and_grad_serves_float32_and_bfloat16(device):
    for dtype, fused in [(torch.float32, True), (torch.bfloat16, True), (torch.float16, False),
                         (torch.float64, False)]:
        assert triton_backend.fuses_loss_and_grad(torch.zeros(2, 3, dtype=dtype, device=device)) is fused, dtype
    assert triton_backend.unsupported_reason(device) is None
    assert "meta" in triton_backend.unsupported_reason("meta")


def _one_pass_case(rows, table, dtype, seed, device):
    """Table, logits, labels (ignored rows included) and scales with a row whose two scales are 0,
    on ``device``."""
    torch.manual_seed(seed)
    logits = _logits(rows, table.vocab_size, dtype=dtype)
    labels = _labels_with_edges(rows, table)
    ce_scale, ntl_scale = torch.rand(rows) + 0.1, torch.rand(rows) * 2
    if rows > 3:
        ce_scale[2], ntl_scale[2] = 0.0, 0.0  # counts for nothing
        ntl_scale[3] = 0.0  # CE only
    return _to(device, table, logits, labels, ce_scale, ntl_scale)


def _assert_one_pass_matches_reference(logits, labels, table, config, ce_scale, ntl_scale, what=""):
    """Losses and gradient of the one-pass entry point against autograd through the reference
    (float64 for float32 logits, float32 for bf16), out of place and in place."""
    dtype = logits.dtype
    ce, ntl, grad = triton_backend.ce_ntl_loss_and_grad(logits, labels, table, config, ce_scale, ntl_scale)
    z = (logits.double() if dtype == torch.float32 else logits.float()).requires_grad_()
    ce_ref, ntl_ref = reference.ce_ntl_rows(z, labels, table, config)
    (grad_ref,) = torch.autograd.grad((ce_scale.to(z.dtype) * ce_ref).sum() + (ntl_scale.to(z.dtype) * ntl_ref).sum(),
                                      z)
    counted = (ce_scale != 0) | (ntl_scale != 0)
    assert ce.dtype == ntl.dtype == torch.float32 and grad.dtype == dtype
    assert_spec_close(ce[counted], ce_ref.detach()[counted], dtype, what=f"{what} ce")
    assert_spec_close(ntl[counted], ntl_ref.detach()[counted], dtype, what=f"{what} ntl")
    assert_spec_close(grad, grad_ref, dtype, gradient=True, what=f"{what} gradient")
    assert (ce[~counted] == 0).all() and (ntl[~counted] == 0).all() and (grad[~counted] == 0).all()
    buffer = logits.clone()
    ce_in, ntl_in, grad_in = triton_backend.ce_ntl_loss_and_grad(buffer, labels, table, config, ce_scale, ntl_scale,
                                                                 inplace=True)
    assert grad_in.data_ptr() == buffer.data_ptr()  # the logits now hold the gradient
    for a, b in ((ce_in, ce), (ntl_in, ntl), (grad_in, grad)):
        assert torch.equal(a, b), f"{what} in place"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("config", CONFIGS, ids=_config_id)
def test_one_pass_matches_reference(config, dtype, device):
    # K = 7, V = 300: a BLOCK_V tail
    table, logits, labels, ce_scale, ntl_scale = _one_pass_case(37, irregular_table(300), dtype, 40, device)
    labels[labels == -100] = config.ignore_index
    _assert_one_pass_matches_reference(logits, labels, table, config, ce_scale, ntl_scale)


@pytest.mark.parametrize("profile", ["interpret", "cuda"])
@pytest.mark.parametrize("rows,vocab_size,table_name", SHAPES)
def test_one_pass_shapes(rows, vocab_size, table_name, profile, device):
    """M = 1, V below / at / past a chunk, K = 7 and 10; the "cuda" profile runs a GPU launch's
    tiling (one row per program, 2048-column chunks)."""
    for config in PLAIN_AND_FULL:
        table, logits, labels, ce_scale, ntl_scale = _one_pass_case(
            rows, _shape_table(table_name, vocab_size), torch.float32, rows + vocab_size, device)
        with _common.use_launch_settings(profile):
            _assert_one_pass_matches_reference(logits, labels, table, config, ce_scale, ntl_scale, _config_id(config))


def test_one_pass_at_a_large_vocabulary_with_cuda_tiling(checked_device):
    """V = 5000 under the GPU tiling: several 2048-column chunks and a tail, bf16."""
    table, logits, labels, ce_scale, ntl_scale = _one_pass_case(6, digit_table(5000, first_id=4000), torch.bfloat16,
                                                                41, checked_device)
    with _common.use_launch_settings("cuda"):
        _assert_one_pass_matches_reference(logits, labels, table, LossConfig("was", reweigh=True), ce_scale, ntl_scale)


@pytest.mark.parametrize("poison", [float("inf"), float("nan"), float("-inf")])
def test_one_pass_contains_non_finite_rows(poison, device):
    """A counted row of inf/NaN logits is non-finite in its own losses and gradient only; rows
    that count for nothing (ignored, zero scales) read nothing: zero losses, zero gradient."""
    table, logits, labels, ce_scale, ntl_scale = _one_pass_case(8, irregular_table(53), torch.float32, 42, device)
    labels[1] = -100
    logits[1:4] = poison  # row 1 ignored, row 2 zero scales, row 3 counted
    config = LossConfig("was", reweigh=True)
    ce, ntl, grad = triton_backend.ce_ntl_loss_and_grad(logits, labels, table, config, ce_scale, ntl_scale)
    assert (grad[1:3] == 0).all() and (ce[1:3] == 0).all() and (ntl[1:3] == 0).all()
    if poison != float("-inf"):
        assert not torch.isfinite(ce[3])
    clean = [0, 4, 5, 6, 7]
    want = triton_backend.ce_ntl_loss_and_grad(logits[clean], labels[clean], table, config, ce_scale[clean],
                                               ntl_scale[clean])
    for a, b in zip((ce, ntl, grad), want):
        assert torch.equal(a[clean], b)


def test_scale_gradient_is_free_at_one_and_scales_otherwise(checked_device):
    for dtype in (torch.float32, torch.bfloat16):
        grad = torch.randn(5, 300, dtype=torch.float64).to(checked_device, dtype)
        kept = grad.clone()
        assert triton_backend.scale_gradient_(grad, torch.tensor(1.0, device=checked_device)) is grad
        assert torch.equal(grad, kept)
        for factor in (0.5, -3.0, 0.0):
            scaled = kept.clone()
            triton_backend.scale_gradient_(scaled, torch.tensor(factor, device=checked_device))
            # product in float32, rounded once to the gradient's dtype (the interpreter's bf16
            # rounding may break ties differently from torch's)
            assert_spec_close(scaled, kept.float() * factor, dtype, gradient=True, what=f"{dtype} x {factor}")
    empty = torch.empty(0, 7, device=checked_device)
    assert triton_backend.scale_gradient_(empty, torch.tensor(2.0, device=checked_device)) is empty


def test_one_pass_ops_opcheck_and_compile_without_graph_break(device):
    config = LossConfig("was_cdf", gaussian_sigma=1.0, reweigh=True)
    table, logits, labels, ce_scale, ntl_scale = _one_pass_case(6, digit_table(40), torch.float32, 43, device)
    factor = torch.tensor(0.5, device=device)
    tables, options = list(table.kernel_tensors()), loss_options(config, table)
    torch.library.opcheck(torch.ops.ntl_fast.triton_ce_ntl_loss_and_grad.default,
                          (logits, labels, ce_scale, ntl_scale, tables, *options))
    torch.library.opcheck(torch.ops.ntl_fast.triton_ce_ntl_loss_and_grad_.default,
                          (logits.clone(), labels, ce_scale, ntl_scale, tables, *options))
    torch.library.opcheck(torch.ops.ntl_fast.triton_scale_gradient_.default,
                          (torch.randn(6, 40, device=device), factor))

    def step(z, factor):
        ce, ntl, grad = triton_backend.ce_ntl_loss_and_grad(z, labels, table, config, ce_scale, ntl_scale)
        return ce.sum() + ntl.sum(), triton_backend.scale_gradient_(grad, factor)

    explanation = torch._dynamo.explain(step)(logits, factor)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    for got, want in zip(compiled(logits, factor), step(logits, factor)):
        assert torch.equal(got, want)


# --------------------------------------------------------------------------------- larger vocabularies
LARGE_CONFIGS = [
    LossConfig("was"),
    LossConfig("was", squash_factor=3.0, reweigh=True),
    LossConfig("mse"),
    LossConfig("huber", reweigh=True),
    LossConfig("was_cdf", gaussian_sigma=1.0),
    LossConfig("was", gaussian_sigma=0.5, reweigh=True),
]


# two pairings instead of the full product: each distinct (config, dtype, K) costs kernel
# compilations on the GPU; the small-vocabulary tests above cover the full product
@pytest.mark.parametrize("table_name,vocab_size,dtype", [
    ("digits", 5000, torch.bfloat16), ("irregular", 301, torch.float32),
], ids=["digits-bf16", "irregular-fp32"])
@pytest.mark.parametrize("config", LARGE_CONFIGS, ids=_config_id)
def test_parity_at_larger_vocabularies(config, table_name, vocab_size, dtype, checked_device):
    torch.manual_seed(0)
    table = digit_table(vocab_size, first_id=4000) if table_name == "digits" else irregular_table(vocab_size)
    rows = 257
    logits = (torch.randn(rows, vocab_size) * 3).to(dtype)
    labels = random_labels((rows,), table)
    labels[0], labels[-1] = 0, vocab_size - 1
    upstream = [torch.randn(rows), torch.randn(rows)]
    table, logits, labels, upstream = _to(checked_device, table, logits, labels, upstream)
    oracle = logits.double() if dtype == torch.float32 else logits.float()
    for fn, ref, weights in [(triton_backend.ce_ntl_rows, reference.ce_ntl_rows, upstream),
                             (triton_backend.ntl_rows, reference.ntl_rows, upstream[1:])]:
        got, grad = _rows_and_grad(lambda z: fn(z, labels, table, config), logits, weights)
        want, grad_ref = _rows_and_grad(lambda z: ref(z, labels, table, config), oracle, weights)
        for a, b in zip(got, want):
            assert_spec_close(a, b, dtype, what=fn.__name__)
        assert grad.dtype == dtype
        assert_spec_close(grad, grad_ref, dtype, gradient=True, what=fn.__name__ + " grad")


def test_public_api_with_weights_and_shift(checked_device):
    torch.manual_seed(1)
    table = digit_table(1000, first_id=500)
    logits = torch.randn(4, 33, 1000)
    labels = random_labels((4, 33), table)
    table, logits, labels, weights = _to(checked_device, table, logits, labels, torch.rand(4, 33))
    results = {}
    for backend in ("triton", "reference"):
        z = logits.clone().requires_grad_()
        out = ntl_fast.cross_entropy_with_ntl(z, labels, table, backend=backend, weights=weights,
                                             loss="was_cdf", gaussian_sigma=1.0, shift_labels=True)
        out.loss.backward()
        results[backend] = (out.loss.detach(), out.ce, out.ntl, z.grad)
    for got, want in zip(results["triton"], results["reference"]):
        assert_spec_close(got, want, torch.float32)


# --------------------------------------------------------------------------------- CUDA only
@CUDA_ONLY
@pytest.mark.gpu
def test_no_host_synchronisation():
    """Forward, backward, the one-pass loss and gradient and the gradient scale never wait for
    the device (``grad_output`` is read by the kernel)."""
    table = digit_table(4096, first_id=100).to("cuda")
    logits = torch.randn(64, 4096, device="cuda", requires_grad=True)
    labels = random_labels((64,), table.to("cpu")).cuda()
    upstream = torch.randn(64, device="cuda")
    config = LossConfig(reweigh=True)

    def step():
        ce, ntl = triton_backend.ce_ntl_rows(logits, labels, table, config)
        ((ce + ntl) * upstream).sum().backward()
        *_, grad = triton_backend.ce_ntl_loss_and_grad(logits.detach(), labels, table, config, upstream, upstream)
        triton_backend.scale_gradient_(grad, upstream[0])

    step()  # compile outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@CUDA_ONLY
@pytest.mark.gpu
@pytest.mark.parametrize("vocab_size", [32128, 128256])
def test_large_bf16_fused_forward_backward(vocab_size):
    """M = 16384 rows; ~64 sampled rows checked against a float32 reference on those rows, for the
    two-pass path and the one-pass loss and gradient."""
    torch.manual_seed(2)
    rows = 16384
    table = digit_table(vocab_size, first_id=vocab_size // 2).to("cuda")
    logits = (torch.randn(rows, vocab_size, device="cuda", dtype=torch.bfloat16) * 4).requires_grad_()
    labels = random_labels((rows,), table.to("cpu")).cuda()
    grad_ce = torch.randn(rows, device="cuda")
    grad_ntl = torch.randn(rows, device="cuda")
    config = LossConfig("was", reweigh=True)
    ce, ntl = triton_backend.ce_ntl_rows(logits, labels, table, config)
    ((ce * grad_ce).sum() + (ntl * grad_ntl).sum()).backward()
    sample = torch.randperm(rows, device="cuda")[:64]
    z = logits.detach()[sample].float().requires_grad_()
    ce_ref, ntl_ref = reference.ce_ntl_rows(z, labels[sample], table, config)
    ((ce_ref * grad_ce[sample]).sum() + (ntl_ref * grad_ntl[sample]).sum()).backward()
    assert_spec_close(ce[sample], ce_ref, torch.bfloat16, what="ce")
    assert_spec_close(ntl[sample], ntl_ref, torch.bfloat16, what="ntl")
    assert_spec_close(logits.grad[sample], z.grad, torch.bfloat16, gradient=True, what="grad")
    ce1, ntl1, grad1 = triton_backend.ce_ntl_loss_and_grad(logits.detach(), labels, table, config, grad_ce, grad_ntl)
    assert_spec_close(ce1[sample], ce_ref, torch.bfloat16, what="one-pass ce")
    assert_spec_close(ntl1[sample], ntl_ref, torch.bfloat16, what="one-pass ntl")
    assert_spec_close(grad1[sample], z.grad, torch.bfloat16, gradient=True, what="one-pass grad")


@CUDA_ONLY
@pytest.mark.gpu
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


# --------------------------------------------------------------------------------- one pass: resident rows, row loop
def test_one_pass_launch_settings_hold_small_rows_and_stream_the_others():
    """The one-pass forward holds a row whole (RESIDENT) up to CUDA_RESIDENT_BLOCK_V columns with
    CUDA_RESIDENT_WARPS warps, and streams wider rows in cuda_row_blocks chunks; the interpreter's
    profile holds rows of at most INTERPRET_RESIDENT_BLOCK_V."""
    limit = _common.CUDA_RESIDENT_BLOCK_V
    with _common.use_launch_settings("cuda"):
        for vocab_size, block_v, resident in [(40, 64, True), (1500, 2048, True), (limit, limit, True),
                                              (limit + 1, 2048, False), (32128, 2048, False),
                                              (128256, 2048, False)]:
            for num_numbers, cdf in ((10, False), (10, True), (1110, False), (1110, True)):
                settings = _common.launch_settings(64, vocab_size, num_numbers, True, cdf, one_pass=True)
                held = resident and not (cdf and num_numbers > _common.MAX_BLOCK_K)
                assert (settings["RESIDENT"], settings["BLOCK_M"]) == (held, 1), (vocab_size, num_numbers, cdf)
                assert settings["BLOCK_V"] == (block_v if held else min(2048, block_v))
        assert _common.launch_settings(64, limit, 10, True, one_pass=True)["num_warps"] == _common.CUDA_RESIDENT_WARPS
        assert "RESIDENT" not in _common.launch_settings(64, 300, 10, True)  # the other kernels
    with _common.use_launch_settings("interpret"):
        assert _common.launch_settings(64, 128, 10, True, one_pass=True)["RESIDENT"]
        assert not _common.launch_settings(64, 129, 10, True, one_pass=True)["RESIDENT"]


ONE_PASS_RESIDENT_CONFIGS = PLAIN_AND_FULL + [LossConfig("was", ignore_index=-1), LossConfig("mse", reweigh=True)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("rows,table_name", [(1, "digits40"), (6, "irregular300"), (3, "k1110")])
def test_one_pass_resident_rows_match_reference(rows, table_name, dtype, checked_device):
    """The GPU launch's row-resident one pass (the row loaded once, the gradient written from the
    same registers): M = 1, V not a power of two, K = 10, 7 and 1110 (tiled), ignore_index, in
    place too, against the reference."""
    table = {"digits40": lambda: digit_table(40), "irregular300": lambda: irregular_table(300),
             "k1110": lambda: NumberTokenTable.from_values({300 + k: float(k) * 0.5 - 50.0 for k in range(1110)},
                                                           vocab_size=1500)}[table_name]()
    for config in ONE_PASS_RESIDENT_CONFIGS:
        case = _one_pass_case(rows, table, dtype, rows + 7, checked_device)
        case_table, logits, labels, ce_scale, ntl_scale = case
        labels[labels == -100] = config.ignore_index
        with _common.use_launch_settings("cuda"):
            _assert_one_pass_matches_reference(logits, labels, case_table, config, ce_scale, ntl_scale,
                                               f"resident {_config_id(config)}")
        # WAS_CDF with tiled K streams its rows on a GPU (cuda_resident_blocks)
        held = not (config.loss == "was_cdf" and table_name == "k1110")
        assert _common.last_one_pass_grid["resident"] is held, _common.last_one_pass_grid


@pytest.mark.parametrize("profile", ["interpret", "cuda"])
@pytest.mark.parametrize("resident", [False, True], ids=["streamed", "resident"])
def test_one_pass_row_loop_gives_one_program_per_row_bitwise(profile, resident, monkeypatch, device):
    """A grid of P programs looping over the row blocks (program i takes i, i + P, ...) gives
    bitwise the results of one program per row block, out of place and in place."""
    rows, vocab_size = (150, 300) if profile == "interpret" else (7, 300)
    if profile == "interpret":  # V = 300 streams, V = 100 is held
        vocab_size = 100 if resident else 300
    else:
        monkeypatch.setattr(_common, "CUDA_RESIDENT_BLOCK_V", 512 if resident else 256)
    table = irregular_table(vocab_size)
    config = LossConfig("was_cdf", gaussian_sigma=1.0, reweigh=True)
    _, logits, labels, ce_scale, ntl_scale = _one_pass_case(rows, table, torch.bfloat16, 48, device)
    results = {}
    with _common.use_launch_settings(profile):
        for programs in (0, 2):
            monkeypatch.setattr(_common, "ONE_PASS_PROGRAMS", programs)
            results[programs] = triton_backend.ce_ntl_loss_and_grad(logits, labels, table, config, ce_scale,
                                                                    ntl_scale)
            grid = dict(_common.last_one_pass_grid)
            assert grid["resident"] is resident
            assert grid["programs"] == (grid["row_blocks"] if programs == 0 else 2) and grid["row_blocks"] > 2
            buffer = logits.clone()
            ce, ntl, grad = triton_backend.ce_ntl_loss_and_grad(buffer, labels, table, config, ce_scale, ntl_scale,
                                                                inplace=True)
            for a, b in zip((ce, ntl, grad), results[programs]):
                assert torch.equal(a, b), "in place"
        _assert_one_pass_matches_reference(logits, labels, table, config, ce_scale, ntl_scale, "row loop")
    for a, b in zip(results[0], results[2]):
        assert torch.equal(a, b)


def test_one_pass_programs_keep_the_rows_in_flight_within_half_of_l2(monkeypatch):
    """Streamed rows: P x (row + gradient row) bytes <= L2 / 2 (the H100/H200 fallback, 50 MB),
    whole waves of one program per SM when one fits; resident rows: one program per row block;
    ONE_PASS_PROGRAMS overrides (0: unbounded)."""
    l2, sms = _common.FALLBACK_L2_BYTES, _common.FALLBACK_SM_COUNT
    for vocab_size, size, inplace, want in [(128256, 2, False, 51), (128256, 2, True, 102), (128256, 4, False, 25),
                                            (128256, 4, True, 51), (32128, 2, False, sms), (32128, 4, False, 101),
                                            (32128, 2, True, 3 * sms)]:
        row = vocab_size * size
        programs, why = _common.one_pass_programs(16384, 1, row, 0 if inplace else row, False)
        assert programs == want, (vocab_size, size, inplace, why)
        assert programs * (row if inplace else 2 * row) <= l2 // 2
    assert _common.one_pass_programs(10, 1, 10**9, 10**9, False)[0] == 1  # at least one program
    assert _common.one_pass_programs(7, 1, 256 * 1024, 256 * 1024, False)[0] == 7  # never more than the rows
    assert _common.one_pass_programs(16384, 1, 10**6, 10**6, True)[0] == 16384
    monkeypatch.setattr(_common, "ONE_PASS_PROGRAMS", 0)
    assert _common.one_pass_programs(16384, 1, 10**6, 10**6, False)[0] == 16384
    monkeypatch.setattr(_common, "ONE_PASS_PROGRAMS", 5)
    assert _common.one_pass_programs(16384, 1, 10**6, 10**6, True)[0] == 5
