#!/usr/bin/env bash
# The GPU check of everything that has landed, in one command that fits a short device lease
# (under 5 minutes on an H100/H200 with nothing installed beyond torch, triton and pytest):
#   1. builds the CUDA extension in the background (csrc/, torch-free .cu files + ninja),
#   2. runs the Triton CUDA tests (parity, M=16384 sampled-row checks, torch.compile fullgraph),
#   3. runs the CUDA-extension tests once the build is done, and compute-sanitizer on one case,
#   4. runs the named benchmark subset (bf16, M=16384, V in {32128, 128256}) against ntloss,
#      torch CE and Liger CE when their wheels are carried in .whl/, and the LM-head-fused path
#      against the materialised one (M=16384, H=4096, V=128256, bf16),
# and writes a log, junit XML and the benchmark CSV under $OUT (benchmarks/results/local-gpu
# when $OUT is unset). Usage: bash benchmarks/gpu_check.sh [--full]  (--full: the full sweep)
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/local-gpu}
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.log") 2>&1
export PYTHONUNBUFFERED=1
started=$(date +%s)
elapsed() { echo "[$(( $(date +%s) - started ))s] $*"; }

if ! python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: no CUDA device here; the CPU parts of these checks run in 'make test'."
  exit 2
fi
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/ntl_site .whl/*.whl && export PYTHONPATH=/tmp/ntl_site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
python3 - <<'EOF'
import torch, triton, platform
print(f"python {platform.python_version()} torch {torch.__version__} triton {triton.__version__} "
      f"device {torch.cuda.get_device_name()} SMs {torch.cuda.get_device_properties(0).multi_processor_count}")
EOF
git rev-parse HEAD 2>/dev/null || echo "commit: see benchmarks/results (no .git on the device)"

status=0
elapsed "building the CUDA extension in the background"
( PYTHON=python3 MAX_JOBS=10 BUILD_LIB=/tmp/ntl_build_lib timeout 240 bash scripts/build_cuda_extension.sh > "$OUT/build.log" 2>&1; echo $? > /tmp/ntl_build.rc ) &
build_pid=$!

elapsed "Triton tests on CUDA"
timeout 180 python3 -m pytest -q --maxfail=5 -p no:cacheprovider tests/test_triton_cuda.py tests/test_table.py \
  --junitxml="$OUT/junit_triton.xml" || status=1

elapsed "benchmarks"
if [ "${1:-}" = "--full" ]; then preset=full; else preset=gpu-check; fi
timeout 150 python3 benchmarks/bench.py --preset "$preset" --out "$OUT/bench.csv" || status=1

wait $build_pid
build_rc=$(cat /tmp/ntl_build.rc)
elapsed "CUDA extension build exit code $build_rc"
tail -n 5 "$OUT/build.log"
if [ "$build_rc" = "0" ]; then
  cp /tmp/ntl_build_lib/ntl_fast/_C*.so ntl_fast/
  python3 -c 'import ntl_fast.cpp as c; print("ntl_fast._C CUDA kernels:", c.unsupported_reason("cuda") or "registered")'
  elapsed "CUDA extension tests"
  timeout 90 python3 -m pytest -q --maxfail=5 -p no:cacheprovider tests/test_cpp_cuda.py \
    --junitxml="$OUT/junit_cpp.xml" || status=1
  elapsed "CUDA extension benchmarks (same subset)"
  timeout 60 python3 benchmarks/bench.py --preset "$preset" --providers cpp --ops ce_ntl ntl \
    --out "$OUT/bench.csv" || status=1
else
  status=1
fi

elapsed "LM-head-fused CE + NTL vs materialised (M=16384, H=4096, V=128256, bf16)"
timeout 60 python3 benchmarks/bench.py --preset gpu-linear --out "$OUT/bench.csv" || status=1

if command -v compute-sanitizer >/dev/null; then
  elapsed "compute-sanitizer (memcheck) on one small case of each backend"
  timeout 90 compute-sanitizer --tool memcheck --error-exitcode 9 python3 benchmarks/sanitizer_case.py \
    > "$OUT/sanitizer.log" 2>&1; echo "compute-sanitizer exit code $?"; tail -n 4 "$OUT/sanitizer.log"
fi
elapsed "done, status $status"
exit $status
