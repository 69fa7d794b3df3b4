"""The two CPU builds of the compiled operators: the baseline one runs on any x86-64 CPU, the
AVX2 one is loaded where torch reports AVX2 or AVX-512, and both compute the reference's numbers."""

import glob
import json
import os
import subprocess
import sys

import pytest
import torch

import ntl_fast

pytest.importorskip("ntl_fast.cpp", reason="the C++ extension is not built")

PACKAGE = os.path.dirname(ntl_fast.__file__)
PROBE = """
import json, torch, ntl_fast
table = ntl_fast.NumberTokenTable.from_values({3 + d: float(d) for d in range(10)}, vocab_size=300)
torch.manual_seed(0)
logits = (4 * torch.randn(64, 300)).requires_grad_()
labels = torch.randint(0, 300, (64,))
labels[::2] = 3 + torch.randint(0, 10, (32,))
results = {}
for backend in ("cpp", "reference"):
    logits.grad = None
    out = ntl_fast.cross_entropy_with_ntl(logits, labels, table, backend=backend, reweigh=True)
    out.loss.backward()
    results[backend] = [out.loss.item(), logits.grad.abs().max().item(), (logits.grad ** 2).sum().item()]
print(json.dumps({"library": ntl_fast.cpp._C.__file__, "capability": torch.backends.cpu.get_cpu_capability(),
                  **results}))
"""


def probe(capability=None):
    env = dict(os.environ)
    env.pop("ATEN_CPU_CAPABILITY", None)
    if capability is not None:
        env["ATEN_CPU_CAPABILITY"] = capability
    result = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def check_numbers(found):
    for name, ours, reference in zip(("loss", "max |grad|", "sum grad^2"), found["cpp"], found["reference"]):
        assert abs(ours - reference) <= 1e-5 * abs(reference) + 1e-6, (name, ours, reference)


def test_baseline_build_is_loaded_without_vector_units():
    found = probe("default")
    assert found["capability"] == "DEFAULT"
    assert os.path.dirname(found["library"]) == PACKAGE, found["library"]
    check_numbers(found)


def test_avx2_build_is_loaded_where_the_cpu_runs_it():
    if not glob.glob(os.path.join(PACKAGE, "_avx2", "_C.*")):
        pytest.skip("built without the AVX2 variant (NTL_FAST_AVX2=0, or not x86-64)")
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        pytest.skip(f"this CPU reports {torch.backends.cpu.get_cpu_capability()}, not AVX2")
    found = probe()
    assert os.path.dirname(found["library"]) == os.path.join(PACKAGE, "_avx2"), found["library"]
    check_numbers(found)
