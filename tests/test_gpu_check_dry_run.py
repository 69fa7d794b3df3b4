"""benchmarks/gpu_check.sh --dry-run: the GPU check's logic on this machine, so it cannot rot unseen.

The dry run collects the GPU test selection, sets up every benchmark call on tiny CPU tensors,
checks the step timeouts against the time budget and the baseline wheels (see the script).
"""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_check_dry_run(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, OUT=str(tmp_path))
    env.pop("TRITON_INTERPRET", None)  # the script sets it where it needs it
    result = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--dry-run"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=900)
    print(result.stdout[-6000:], result.stderr[-3000:])
    assert result.returncode == 0, "gpu_check.sh --dry-run failed (output above)"
    assert "gpu_check --dry-run: ok" in result.stdout
    assert "DRY-RUN FAILED" not in result.stdout
    for check in ("step timeouts within", "GPU test selection collects", "benchmark calls set up",
                  "baseline wheels", "steps report their outcome"):
        assert f"dry-run ok: {check}" in result.stdout
    # every benchmark call of the GPU run wrote rows, the Triton provider among them
    with open(tmp_path / "bench.csv") as handle:
        rows = handle.read().splitlines()
    assert len(rows) > 10 and any(",triton," in row for row in rows)


def test_gpu_check_rejects_unknown_arguments():
    result = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--no-such-flag"], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "usage:" in result.stderr
