"""setup.py: no silent C++-less build, metadata without torch, the default CUDA architectures."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# runs setup.py with setuptools.setup stubbed out and, optionally, torch made unimportable
RUN_SETUP = """
import sys, setuptools
calls = []
setuptools.setup = lambda **kwargs: calls.append(kwargs)
if {block_torch}:
    sys.modules["torch"] = None
sys.argv = ["setup.py", *{argv}]
namespace = {{"__name__": "__main__", "__file__": "setup.py"}}
exec(compile(open("setup.py").read(), "setup.py", "exec"), namespace)
print("extensions:", [e.name for e in calls[0]["ext_modules"]])
{then}
"""


def run_setup(argv, block_torch=False, then="", env=None):
    code = RUN_SETUP.format(block_torch=block_torch, argv=argv, then=then)
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **(env or {})})


@pytest.mark.parametrize("command", ["bdist_wheel", "build_ext", "editable_wheel"])
def test_compiling_without_torch_stops_with_the_install_advice(command):
    result = run_setup([command], block_torch=True)
    assert result.returncode != 0
    assert "pip install --no-build-isolation" in result.stderr, result.stderr
    assert "NTL_FAST_NO_EXTENSION=1" in result.stderr


@pytest.mark.parametrize("command", ["sdist", "dist_info", "egg_info"])
def test_sdist_and_metadata_need_no_torch(command):
    result = run_setup([command], block_torch=True)
    assert result.returncode == 0, result.stderr
    assert "extensions: []" in result.stdout


def test_no_extension_switch():
    result = run_setup(["bdist_wheel"], block_torch=True, env={"NTL_FAST_NO_EXTENSION": "1"})
    assert result.returncode == 0, result.stderr
    assert "extensions: []" in result.stdout


@pytest.mark.skipif(os.uname().machine not in ("x86_64", "amd64"), reason="the AVX2 build is x86-64 only")
def test_cpu_builds_baseline_and_avx2():
    pytest.importorskip("torch")
    both = run_setup(["build_ext"])
    assert both.returncode == 0, both.stderr
    assert "['ntl_fast._C', 'ntl_fast._avx2._C']" in both.stdout
    baseline = run_setup(["build_ext"], env={"NTL_FAST_AVX2": "0"})
    assert "['ntl_fast._C']" in baseline.stdout
    assert run_setup(["build_ext"], env={"NTL_FAST_AVX2": "yes"}).returncode != 0


@pytest.mark.parametrize("listed,expected", [
    ("compute_75 compute_80 compute_86 compute_89 compute_90 compute_100 compute_120",
     "7.5;8.0;8.6;8.9;9.0;10.0;12.0+PTX"),
    ("compute_75 compute_80 compute_86 compute_89 compute_90", "7.5;8.0;8.6;8.9;9.0+PTX"),
    (None, "7.5;8.0;8.6;8.9;9.0+PTX"),  # an nvcc that cannot list its architectures
])
def test_default_cuda_architectures(tmp_path, listed, expected):
    (tmp_path / "bin").mkdir()
    nvcc = tmp_path / "bin" / "nvcc"
    nvcc.write_text("#!/bin/sh\n" + (f"echo {listed}\n" if listed else "exit 1\n"))
    nvcc.chmod(0o755)
    result = run_setup(["--version"], block_torch=True,
                       then=f"print('archs:', namespace['_default_cuda_arch_list']({str(tmp_path)!r}))")
    assert result.returncode == 0, result.stderr
    assert f"archs: {expected}" in result.stdout
