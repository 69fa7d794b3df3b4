"""benchmarks/bench.py's traffic column (DRAM bytes by design) and its targets' report.

The byte counter is checked against operations whose traffic is known by hand, so that the column
the benchmarks print next to each time means what its docstring says.
"""

import pytest
import torch
import torch.nn.functional as F

from benchmarks.bench import (
    Row,
    build_provider,
    check_targets,
    floor_bytes,
    make_case,
    measure_traffic,
    shift_labels_by_hand,
)

M, V = 128, 8000  # rows long enough that the per-row bookkeeping (labels, scales) is < 1% of a row


def _traffic(provider, op, mode, dtype=torch.float32, m=M):
    function = build_provider(provider, op, V, "cpu")
    assert function is not None, f"{provider} does not provide {op} on CPU"
    inputs, labels = make_case(op, m, V, 16, dtype, "cpu")
    traffic = measure_traffic(provider, op, mode, function, inputs, labels, V)
    logits_bytes = inputs[0].numel() * inputs[0].element_size()
    return traffic, logits_bytes, floor_bytes(inputs, mode)


def test_copy_is_the_floor():
    traffic, logits, floor = _traffic("torch", "copy", "full")
    assert traffic.read == logits and traffic.write == logits
    assert (traffic.read + traffic.write) / floor == 1.0


def test_torch_cross_entropy_counted_by_hand():
    # forward: log_softmax reads z, writes its output; nll_loss gathers M values.
    # backward: nll_loss_backward writes a dense zero-filled gradient (reads nothing of size M x V);
    # log_softmax's backward reads that and the saved output, writes the gradient: 3 reads, 3 writes.
    from benchmarks.bench import _ByteCounter

    z = torch.randn(M, V, requires_grad=True)
    y = torch.randint(0, V, (M,))
    counter = _ByteCounter()
    with counter:
        F.cross_entropy(z, y).backward()
    logits = z.numel() * z.element_size()
    assert counter.read / logits == pytest.approx(3.0, abs=0.02)
    assert counter.write / logits == pytest.approx(3.0, abs=0.02)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpp_one_pass_moves_one_read_and_one_write(dtype):
    traffic, logits, floor = _traffic("cpp", "ce_ntl", "full", dtype)
    assert traffic.read / logits == pytest.approx(1.0, abs=0.02)
    assert traffic.write / logits == pytest.approx(1.0, abs=0.02)
    assert (traffic.read + traffic.write) / floor == pytest.approx(1.0, abs=0.02)
    assert "design" in traffic.basis
    # the backward of the one-pass path moves nothing for grad_output = 1
    backward, _, _ = _traffic("cpp", "ce_ntl", "bwd", dtype)
    assert backward.read + backward.write < 0.01 * logits


def test_ntl_alone_reads_only_number_columns():
    traffic, logits, _ = _traffic("cpp", "ntl", "full")
    assert traffic.write / logits == pytest.approx(1.0, abs=0.02)  # the dense gradient
    assert traffic.read < 0.2 * logits


def test_eager_baseline_moves_more_than_the_floor():
    traffic, _, floor = _traffic("ntloss", "ce_ntl", "full")
    assert traffic.basis == "aten ops"
    assert (traffic.read + traffic.write) / floor > 2.5


def test_labels_shifted_by_hand_cost_no_copy():
    traffic, logits, floor = _traffic("cpp", "ce_ntl_shifted", "full", m=4 * 16)
    assert (traffic.read + traffic.write) / floor == pytest.approx(1.0, abs=0.05)
    shifted = shift_labels_by_hand(torch.arange(6).view(2, 3))
    assert shifted.tolist() == [[1, 2, -100], [4, 5, -100]]


def test_shift_labels_case_is_measured():
    traffic, _, floor = _traffic("cpp", "ce_ntl_shift", "full", m=4 * 16)
    assert traffic is not None and (traffic.read + traffic.write) / floor >= 1.0


def test_compiled_reference_is_not_modelled():
    function = build_provider("reference", "ce_ntl", V, "cpu")
    inputs, labels = make_case("ce_ntl", M, V, 16, torch.float32, "cpu")
    assert measure_traffic("reference-compiled", "ce_ntl", "full", function, inputs, labels, V) is None


def _row(op, provider, mode, median, dtype="bf16", peak=float("nan"), grad=0.0, traffic=None):
    return Row(op, provider, mode, 16384, 32128, dtype, median, median, median, peak, grad, None, None, None,
               None, None, traffic, None, "NVIDIA H200", "t", "t", "c", "d")


def test_targets_report_met_and_missed():
    rows = [
        _row("copy", "torch", "full", 1.0),
        _row("ce_ntl", "triton", "full", 1.2, traffic=1.0),
        _row("ce_ntl", "ntloss", "full", 3.0),
        _row("ce", "liger-ce", "full", 1.0),
        _row("ntl", "triton", "fwd", 1.0),
        _row("ntl", "ntloss", "fwd", 5.0),
    ]
    lines = "\n".join(check_targets(rows))
    assert "MET    CE + NTL fwd+bwd <= 1.25x the copy of the logits: 1.20x" in lines  # a GPU row
    assert "MISSED CE + NTL fwd+bwd >= 3x faster than ntloss + torch CE: 2.50x" in lines
    assert "MISSED CE + NTL fwd+bwd <= 1.05x Liger's CE alone: 1.20x" in lines
    assert "MISSED NTL forward >= 10x faster than ntloss: 5.00x" in lines
    assert "MET    one read + one write of the logits by design: 1.00x" in lines


def test_targets_on_a_cpu_use_its_bar():
    rows = [_row("copy", "torch", "full", 1.0, dtype="fp32"), _row("ce_ntl", "cpp", "full", 2.0, dtype="fp32"),
            _row("ce_ntl", "ntloss", "full", 9.0, dtype="fp32"), _row("ce_ntl", "cpp", "full", 1.5)]
    for row in rows:
        row.device = "x86_64 x2 cores"
    lines = "\n".join(check_targets(rows))
    assert "info   CE + NTL fwd+bwd <= 1.25x the copy of the logits (a GPU target): 2.00x" in lines
    assert "MET    CE + NTL fwd+bwd >= 4x faster than ntloss + torch CE: 4.50x" in lines
    assert "MET    bfloat16 logits at least as fast as float32: 0.75x the float32 time" in lines
