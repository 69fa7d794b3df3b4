#!/usr/bin/env bash
# Compile every torch-free CUDA source (csrc/**/*.cu) to an object for sm_80 and sm_90 with nvcc
# alone (no GPU and no CUDA torch needed), with the half/bfloat16 restrictions that torch's own
# extension builds add. Fails on the first error.
#
# With --plumbing it also syntax-checks the CUDA tensor plumbing (csrc/**/*_cuda.cpp) against the
# installed torch's headers; a CPU torch lacks one generated c10/cuda header, stubbed here.
# Usage: scripts/check_cuda_compile.sh [--plumbing]    (NVCC=/path/to/nvcc, PYTHON=python3)
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC="${NVCC:-nvcc}"
PYTHON="${PYTHON:-python3}"
command -v "$NVCC" >/dev/null || { echo "check_cuda_compile: nvcc not found (set NVCC)" >&2; exit 2; }
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
mapfile -t sources < <(find csrc -name '*.cu' | sort)
[ "${#sources[@]}" -gt 0 ] || { echo "check_cuda_compile: no .cu files under csrc/" >&2; exit 2; }
torch_defines=(-D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__
               -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__)
for arch in sm_80 sm_90; do
  for src in "${sources[@]}"; do
    start=$(date +%s)
    "$NVCC" -std=c++17 -O3 -arch="$arch" "${torch_defines[@]}" -Xcompiler -Wall \
      -c "$src" -o "$out/$(basename "$src" .cu).$arch.o"
    echo "ok  $src  $arch  $(( $(date +%s) - start ))s"
  done
done

if [ "${1:-}" = "--plumbing" ]; then
  # nvcc names its own include directory (it may be a wrapper script outside the toolkit).
  cuda_include="$("$NVCC" --dryrun -x cu -c /dev/null -o "$out/probe.o" 2>&1 \
                  | grep -o '"-I[^"]*"' | head -1 | tr -d '"' | sed 's/^-I//')"
  torch_include="$("$PYTHON" -c 'from torch.utils.cpp_extension import include_paths; print(" ".join(include_paths()))')"
  py_include="$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')"
  mkdir -p "$out/stub/c10/cuda/impl"
  printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' > "$out/stub/c10/cuda/impl/cuda_cmake_macros.h"
  includes=(-isystem "$cuda_include" -isystem "$py_include")
  for dir in $torch_include; do includes+=(-isystem "$dir"); done
  mapfile -t plumbing < <(find csrc -name '*_cuda.cpp' | sort)
  [ "${#plumbing[@]}" -gt 0 ] || { echo "check_cuda_compile: no *_cuda.cpp files under csrc/" >&2; exit 2; }
  for src in "${plumbing[@]}"; do
    start=$(date +%s)
    ${CXX:-g++} -std=c++20 -fsyntax-only -Wall "${includes[@]}" -I"$out/stub" "$src"
    echo "ok  $src  (syntax, host compiler)  $(( $(date +%s) - start ))s"
  done
fi
