"""Quick benchmark entries (pytest-benchmark): small sizes of the runner's operations.

They run once as tests in the suite (``--benchmark-disable`` is the default in pyproject); time
them with ``pytest tests/test_benchmarks.py --benchmark-enable``. The numbers that matter come
from ``benchmarks/bench.py`` at realistic sizes.
"""

import pytest
import torch

from benchmarks.bench import LINEAR_OPS, PRESETS, build_provider, make_case, mode_runner

QUICK = PRESETS["quick"]
# ntloss has no LM-head form
CASES = [(op, provider) for op in QUICK["ops"] for provider in QUICK["providers"]
         if not (provider == "ntloss" and op in LINEAR_OPS)]


@pytest.mark.parametrize("op,provider", CASES)
def test_quick_benchmark(benchmark, op, provider):
    function = build_provider(provider, op, QUICK["V"][0], "cpu")
    if function is None:
        pytest.skip(f"{provider} does not provide {op} here (see the runner's message)")
    inputs, labels = make_case(op, QUICK["M"][0], QUICK["V"][0], QUICK["H"], torch.float32, "cpu")
    benchmark(mode_runner(function, inputs, labels, "full"))
    for tensor in inputs:
        assert tensor.grad is not None and torch.isfinite(tensor.grad).all()


def test_lm_head_fused_equals_materialised():
    inputs, labels = make_case("linear_ce_ntl", 64, 300, 16, torch.float64, "cpu")
    fused = build_provider("reference", "linear_ce_ntl", 300, "cpu")(*inputs, labels)
    materialised = build_provider("reference", "matmul_ce_ntl", 300, "cpu")(*inputs, labels)
    torch.testing.assert_close(fused, materialised, rtol=1e-10, atol=1e-12)
