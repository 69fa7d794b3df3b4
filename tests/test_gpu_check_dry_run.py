"""benchmarks/gpu_check.sh --dry-run: the GPU check's logic on this machine, so it cannot rot unseen.

The dry run collects the GPU test selection, sets up every benchmark call on tiny CPU tensors,
checks the step timeouts against the time budget and the baseline wheels (see the script).
"""

import csv
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
                  "traffic by design in every ntl_fast row", "performance targets read the benchmark CSV",
                  "baseline wheels", "steps report their outcome"):
        assert f"dry-run ok: {check}" in result.stdout
    # every benchmark call of the GPU run wrote rows, the Triton provider among them, with the
    # floor's copy and the traffic columns
    with open(tmp_path / "bench.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) > 10 and any(row["provider"] == "triton" for row in rows)
    assert any(row["op"] == "copy" and row["traffic_x_floor"] == "1.0" for row in rows)
    fused = [row for row in rows if row["op"] == "ce_ntl" and row["provider"] == "triton" and row["mode"] == "full"]
    assert fused and all(float(row["traffic_x_floor"]) >= 1.0 for row in fused)
    # the targets' report lists the GPU targets (the dry run's figures mean nothing)
    targets = (tmp_path / "targets.txt").read_text()
    for target in ("<= 1.25x the copy of the logits", "faster than ntloss + torch CE", "NTL forward >= 10x"):
        assert target in targets


def test_gpu_check_rejects_unknown_arguments():
    result = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--no-such-flag"], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "usage:" in result.stderr
