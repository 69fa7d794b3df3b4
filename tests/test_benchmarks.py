"""Quick benchmark entries (pytest-benchmark): small sizes of the runner's operations.

They run once as tests in the suite (``--benchmark-disable`` is the default in pyproject); time
them with ``pytest tests/test_benchmarks.py --benchmark-enable``. The numbers that matter come
from ``benchmarks/bench.py`` at realistic sizes.
"""

import pytest
import torch

from benchmarks.bench import build_provider, make_inputs, mode_runner

CPU_PROVIDERS = ["reference", "cpp", "ntloss"]


@pytest.mark.parametrize("op", ["ce_ntl", "ntl"])
@pytest.mark.parametrize("provider", CPU_PROVIDERS)
def test_quick_benchmark(benchmark, op, provider):
    function = build_provider(provider, op, 1000, "cpu")
    if function is None:
        pytest.skip(f"provider {provider} is not available here (see the runner's message)")
    logits, labels = make_inputs(256, 1000, torch.float32, "cpu")
    logits.requires_grad_(True)
    run = mode_runner(function, logits, labels, "full")
    benchmark(run)
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
