#!/usr/bin/env bash
# Compile every torch-free CUDA source (csrc/**/*.cu) to an object for sm_80 and sm_90 with nvcc
# alone (no GPU and no CUDA torch needed), with the half/bfloat16 restrictions that torch's own
# extension builds add. Fails on the first error.
#
# ptxas gate: every kernel's registers and spills (nvcc -Xptxas -v) are parsed; the check fails
# when any kernel spills or uses more registers than its budget below. --record writes the table
# to benchmarks/results/cuda_ptxas_registers.csv.
#
# With --plumbing it also syntax-checks the CUDA tensor plumbing (csrc/**/*_cuda.cpp) against the
# installed torch's headers; a CPU torch lacks one generated c10/cuda header, stubbed here.
# Usage: scripts/check_cuda_compile.sh [--plumbing] [--record]    (NVCC=/path/to/nvcc, PYTHON=python3)
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC="${NVCC:-nvcc}"
PYTHON="${PYTHON:-python3}"
plumbing=0
record=0
for arg in "$@"; do
  case "$arg" in
    --plumbing) plumbing=1 ;;
    --record) record=1 ;;
    *) echo "check_cuda_compile: unknown option $arg" >&2; exit 2 ;;
  esac
done
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
    log="$out/ptxas.$arch.$(basename "$src" .cu).log"
    if ! "$NVCC" -std=c++17 -O3 -arch="$arch" "${torch_defines[@]}" -Xcompiler -Wall -Xptxas -v \
        -c "$src" -o "$out/$(basename "$src" .cu).$arch.o" > "$log" 2>&1; then
      grep -v '^ptxas info' "$log" >&2 || true
      exit 1
    fi
    grep -v -e '^ptxas info' -e 'bytes stack frame' "$log" || true  # compiler warnings, if any
    echo "ok  $src  $arch  $(( $(date +%s) - start ))s"
  done
done

# Register budgets (ptxas "Used N registers") per kernel template and logits type. The dense
# float32/bfloat16 kernels run 512-thread blocks for wide vocabularies: 40 registers or fewer keep
# 3 blocks (75% occupancy) on an SM. A kernel without a budget line is only checked for spills.
# K (the number of number tokens) is a run-time value: one compiled kernel serves every table
# from K = 1 to 4,096 (the fixes live in K values of dynamic shared memory), so these figures
# hold for multi-digit tables (K ~ 1,110) as for digits (K = 10). The backward and one-pass
# kernels get the same 40: their heaviest number-token math runs in backward_terms_kernel and
# loss_and_grad_terms_kernel (one warp per row, up to 4 warps per block, checked for spills only) and
# reaches them through a workspace. loss_and_grad_kernel comes in two variants, the row staged in
# shared memory ("[staged]") or read twice from global memory, both under the same budget.
budgets="$out/budgets.txt"
cat > "$budgets" <<'BUDGETS'
forward_kernel float 40
forward_kernel __nv_bfloat16 40
scale_kernel float 40
scale_kernel __nv_bfloat16 40
scale_kernel __half 40
backward_kernel float 40
backward_kernel __nv_bfloat16 40
backward_kernel __half 40
loss_and_grad_kernel float 40
loss_and_grad_kernel __nv_bfloat16 40
loss_and_grad_kernel __half 40
BUDGETS
csv=""
[ "$record" = 1 ] && csv="benchmarks/results/cuda_ptxas_registers.csv"
"$PYTHON" - "$budgets" "$csv" "$out"/ptxas.*.log <<'PARSE'
import re
import subprocess
import sys

budget_file, csv_path, logs = sys.argv[1], sys.argv[2], sys.argv[3:]
budgets = {}
for line in open(budget_file):
    kernel, dtype, registers = line.split()
    budgets[(kernel, dtype)] = int(registers)
rows = []
for log in logs:
    source = log.rsplit("/", 1)[1].split(".", 2)[2][: -len(".log")]
    entry = None
    for line in open(log):
        found = re.search(r"Compiling entry function '(\S+)' for '(sm_\d+)'", line)
        if found:
            entry = {"mangled": found.group(1), "arch": found.group(2), "source": source}
            continue
        found = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if found and entry is not None:
            entry["stack"], entry["spill_stores"], entry["spill_loads"] = map(int, found.groups())
        found = re.search(r"Used (\d+) registers", line)
        if found and entry is not None:
            entry["registers"] = int(found.group(1))
            rows.append(entry)
            entry = None
if not rows:
    sys.exit("check_cuda_compile: no kernel found in the ptxas output")
try:
    names = subprocess.run(["c++filt"], input="\n".join(r["mangled"] for r in rows), capture_output=True,
                           text=True, check=True).stdout.splitlines()
except (OSError, subprocess.CalledProcessError):
    names = [r["mangled"] for r in rows]
failures = []
for row, name in zip(rows, names):
    found = re.search(r"(\w+)<([\w:]+),", name) or re.search(r"(\w+)<([\w:]+)>", name)
    row["kernel"], row["dtype"] = (found.group(1), found.group(2)) if found else (name, "")
    budget = budgets.get((row["kernel"], row["dtype"]), "")
    if re.search(r"<[\w:]+, [\w:]+, true>", name):  # loss_and_grad_kernel's staged-row variant
        row["kernel"] += "[staged]"
    row["budget"] = budget
    row.setdefault("stack", 0), row.setdefault("spill_stores", 0), row.setdefault("spill_loads", 0)
    problems = []
    if row["spill_stores"] or row["spill_loads"]:
        problems.append(f"spills {row['spill_stores']}/{row['spill_loads']} bytes")
    if row["budget"] != "" and row["registers"] > row["budget"]:
        problems.append(f"{row['registers']} registers > budget {row['budget']}")
    status = "; ".join(problems) or "ok"
    print(f"ptxas  {row['arch']}  {row['kernel']}<{row['dtype']}>  {row['registers']} registers "
          f"(budget {row['budget'] or '-'}), spills {row['spill_stores']}/{row['spill_loads']}  {status}")
    if problems:
        failures.append(f"{row['arch']} {row['kernel']}<{row['dtype']}>: {status}")
rows.sort(key=lambda r: (r["source"], r["kernel"], r["dtype"], r["arch"]))
if csv_path:
    with open(csv_path, "w") as f:
        f.write("source,kernel,dtype,arch,registers,budget,spill_stores,spill_loads,stack_bytes\n")
        for r in rows:
            f.write(f"{r['source']},{r['kernel']},{r['dtype']},{r['arch']},{r['registers']},{r['budget']},"
                    f"{r['spill_stores']},{r['spill_loads']},{r['stack']}\n")
    print(f"wrote {csv_path}")
if failures:
    sys.exit("check_cuda_compile: ptxas gate failed:\n  " + "\n  ".join(failures))
PARSE

if [ "$plumbing" = 1 ]; then
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
