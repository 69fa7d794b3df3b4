#!/usr/bin/env bash
# Build ntl_fast._C with its CUDA kernels, in place, on a machine whose torch has CUDA (no network
# needed). Prints how long the build took. Usage: scripts/build_cuda_extension.sh
# BUILD_LIB=DIR builds into DIR instead of in place (benchmarks/gpu_check.sh builds in the
# background while other checks import ntl_fast, then moves the library in).
# Defaults: MAX_JOBS=16; TORCH_CUDA_ARCH_LIST from setup.py: 7.5;8.0;8.6;8.9;9.0 (T4 to H100/H200)
# plus 10.0 and 12.0 where nvcc supports them, PTX for the newest. For a quick build for one card,
# set it, e.g. TORCH_CUDA_ARCH_LIST=9.0; NTL_FAST_AVX2=0 also skips the second (AVX2) CPU build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
export MAX_JOBS="${MAX_JOBS:-16}"
"$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.version.cuda else "torch has no CUDA: this builds the CPU extension only (pip install --no-build-isolation -e .)")'
start=$(date +%s)
if [ -n "${BUILD_LIB:-}" ]; then
  # build elsewhere (the caller moves the library into ntl_fast/ when nothing imports it)
  "$PYTHON" setup.py build_ext --build-lib "$BUILD_LIB"
else
  "$PYTHON" setup.py build_ext --inplace
  "$PYTHON" -c 'import ntl_fast.cpp as c; r = c.unsupported_reason("cuda"); print("ntl_fast._C CUDA kernels:", r or "registered")'
fi
elapsed=$(( $(date +%s) - start ))
echo "build_cuda_extension: built in ${elapsed} s (MAX_JOBS=$MAX_JOBS, TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-the setup.py default})"
