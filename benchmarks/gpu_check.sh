#!/usr/bin/env bash
# The GPU check of everything that has landed, in one command that fits a short GPU time budget: each timed
# step below has a timeout, and in the worst case they add up to at most BUDGET_S = 270 s.
#   - installs the baselines' wheels carried in .whl/ (make wheels: benchmarks/baseline_wheels.txt),
#   - builds the CUDA extension in the background (csrc/, torch-free .cu files + ninja),
#   - runs the Triton CUDA tests and the benchmark subset (bf16, M=16384, V in {32128, 128256}):
#     the bandwidth floor measured in the same run (a copy of the logits: one read, one write),
#     fused CE + NTL forward + backward against it, against ntloss + torch CE and against Liger's CE
#     alone (when its wheel is in .whl/), standalone NTL forward against ntloss; each with its DRAM
#     bytes by design (the traffic columns of benchmarks/bench.py),
#   - once the build is done, the CUDA-extension tests and the same benchmarks of its kernels,
#   - the one-pass kernels' launch plans against the plain ones: fused CE + NTL (bf16) again with
#     one program per row (NTL_FAST_ONE_PASS_PROGRAMS=0, NTL_FAST_CUDA_ROWS_IN_FLIGHT=0) instead of
#     the L2-bounded persistent grids, and with no shared-memory staging (NTL_FAST_CUDA_ROW_IN_SMEM=0),
#     each into bench_plan_<name>.csv, summarised next to bench.csv,
#   - the LM-head-fused path against the materialised one (M=16384, H=4096, V=128256, bf16),
#   - compute-sanitizer's memcheck, racecheck and synccheck on one small case of each backend,
# then prints a summary: each step's outcome, the test counts, each benchmark as a multiple of
# the bandwidth floor and of the baselines, and the performance targets met or missed (bench.py
# --targets: CE + NTL <= 1.25x the copy, >= 3x ntloss + torch CE, <= 1.05x Liger's CE alone; NTL
# forward >= 10x ntloss; LM head: extra peak <= 1/4 of the materialised path at <= 1.3x its time).
# A step that fails says why, and the next one runs.
# Writes a log, junit XML, the benchmark CSV, summary.txt and targets.txt under $OUT
# (benchmarks/results/local-gpu if unset).
#
# --dry-run (no GPU needed; run by the test suite): collects the GPU test selection, runs every
# benchmark call's argument parsing and set-up once on tiny CPU tensors, prints the extension
# build command, checks the worst-case sum of the timeouts against the budget and that .whl/ holds
# the pinned baseline wheels (or, when it is empty, that pip resolves the pins). It proves the
# script's logic on the Python/torch/triton it runs with (CI: 3.11/2.13/3.8), not on the GPU
# machines' (3.12/2.11/3.6).
# Usage: bash benchmarks/gpu_check.sh [--full] [--dry-run]     (PYTHON=python3 unless set)
set -u
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
dry_run=0
preset=gpu-check
for arg in "$@"; do
  case "$arg" in
    --dry-run) dry_run=1 ;;
    --full) preset=full ;;
    *) echo "usage: bash benchmarks/gpu_check.sh [--full] [--dry-run]" >&2; exit 2 ;;
  esac
done

# Timeouts (s). The build runs in the background during the Triton tests and the first benchmarks,
# so it adds only what outlasts them.
BUDGET_S=285
T_WHEELS=10 T_TRITON_TESTS=55 T_BENCH=50 T_BUILD=105 T_CPP_TESTS=25 T_CPP_BENCH=20 T_LINEAR=15
T_PLAN=10       # each launch plan compared (PLANS below)
T_SANITIZER=15  # each of memcheck, racecheck, synccheck
T_EXTRA=45      # the T5 paper-preset smoke run (its training stops after 25 s)
[ "$preset" = full ] && T_BENCH=1800 T_CPP_BENCH=600  # the full sweep does not fit the budget

# What runs: one definition, used by the GPU run and by the dry run.
# the Triton tests' cuda parametrisations marked gpu (the rest runs on CPU, in the interpreter)
TRITON_TESTS=(tests/test_triton.py tests/test_table.py::test_to_cuda -k "gpu or test_to_cuda")
CPP_TESTS=(tests/test_cpp.py -k cuda)  # the CUDA parametrisations of the extension tests
BENCH_MAIN=(benchmarks/bench.py --preset "$preset" --repeats 10)
BENCH_CPP=(benchmarks/bench.py --preset "$preset" --providers torch cpp --ops copy ce_ntl ntl --repeats 10)
BENCH_LINEAR=(benchmarks/bench.py --preset gpu-linear --repeats 10)
BENCH_PLANS=(benchmarks/bench.py --preset "$preset" --providers triton cpp --ops ce_ntl --modes full --dtypes bf16
             --repeats 5)
# plan name, then the environment that selects it (the defaults are in bench.csv)
PLANS=("one-program-per-row NTL_FAST_ONE_PASS_PROGRAMS=0 NTL_FAST_CUDA_ROWS_IN_FLIGHT=0"
       "no-smem-staging NTL_FAST_CUDA_ROW_IN_SMEM=0")
worst_case=$(( T_WHEELS + (T_BUILD > T_TRITON_TESTS + T_BENCH ? T_BUILD : T_TRITON_TESTS + T_BENCH)
               + T_CPP_TESTS + T_CPP_BENCH + ${#PLANS[@]} * T_PLAN + T_LINEAR + 3 * T_SANITIZER + T_EXTRA ))
BUILD_LIB=/tmp/ntl_build_lib
# sm_90 only (H100/H200) and one CPU build: the default architecture list would not fit T_BUILD.
BUILD=(env PYTHON="$PYTHON" MAX_JOBS=10 BUILD_LIB="$BUILD_LIB" TORCH_CUDA_ARCH_LIST=9.0 NTL_FAST_AVX2=0
       bash scripts/build_cuda_extension.sh)
SANITIZER_TOOLS=(memcheck racecheck synccheck)
T5_SMOKE=(examples/t5_arithmetic/train.py --preset paper --smoke --bf16 --task add_sub_3by1)
WHEEL_PINS=benchmarks/baseline_wheels.txt

OUT=${OUT:-benchmarks/results/local-gpu}
mkdir -p "$OUT"
started=$(date +%s)
elapsed() { echo "[$(( $(date +%s) - started ))s] $*"; }

# junit XML files -> one line of counts each
test_counts() {
  "$PYTHON" - "$@" <<'EOF'
import sys
import xml.etree.ElementTree as ET
for path in sys.argv[1:]:
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError) as error:
        print(f"  {path}: no results ({error.__class__.__name__})")
        continue
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    total = {key: sum(int(s.get(key, 0)) for s in suites) for key in ("tests", "failures", "errors", "skipped")}
    passed = total["tests"] - total["failures"] - total["errors"] - total["skipped"]
    print(f"  {path}: {passed} passed, {total['failures']} failed, {total['errors']} errors, "
          f"{total['skipped']} skipped")
EOF
}

# The steps: each records its outcome (and why it failed) for the summary; none stops the script.
status=0
summary=()
record() {  # record NAME EXIT_CODE SECONDS TIMEOUT
  local why
  case "$2" in
    0) why="ok" ;;
    124) why="timed out after ${4}s" ;;
    127) why="command not found" ;;
    5) why="no tests collected" ;;
    not-run*) why=${2#not-run: } ;;
    *) why="failed, exit code $2 (see its output above)" ;;
  esac
  if [ "$2" != 0 ]; then status=1; echo "STEP FAILED: $1: $why"; fi
  summary+=("$(printf '%-58s %5ss  %s' "$1" "$3" "$why")")
}
step() {  # step NAME TIMEOUT COMMAND...: runs it under its timeout, records the outcome, never stops
  local name=$1 limit=$2 begin rc
  shift 2
  begin=$(date +%s)
  elapsed "$name (timeout ${limit}s)"
  timeout "$limit" "$@"
  rc=$?
  record "$name" "$rc" "$(( $(date +%s) - begin ))" "$limit"
}
# ------------------------------------------------------------------------------------ dry run
if [ "$dry_run" = 1 ]; then
  problems=0
  check() {  # check WHAT COMMAND...: runs it, reports, counts a failure
    local what=$1; shift
    if "$@"; then echo "dry-run ok: $what"; else echo "DRY-RUN FAILED: $what"; problems=$((problems + 1)); fi
  }
  collect() {
    local log="$OUT/collect.log"
    "$PYTHON" -m pytest --collect-only -q -p no:cacheprovider "${TRITON_TESTS[@]}" "${CPP_TESTS[@]}" \
      --junitxml="$OUT/junit_collect.xml" > "$log" 2>&1
    local rc=$?
    tail -n 4 "$log"
    # the Triton tests collect on any machine; the CUDA-extension file skips at import without a GPU
    [ "$rc" = 0 ] && grep -q "^tests/test_triton.py::.*cuda" "$log" && grep -q "test_table.py::test_to_cuda" "$log"
  }
  bench_setup() {  # every benchmark call of the GPU run, once, tiny, on CPU (Triton interpreted)
    rm -f "$OUT/bench.csv"
    local call
    for call in "${BENCH_MAIN[*]}" "${BENCH_CPP[*]}" "${BENCH_LINEAR[*]}" "${BENCH_PLANS[*]}"; do
      echo "  $PYTHON $call --dry-run"
      # shellcheck disable=SC2086  # the call's words, as the GPU run passes them
      TRITON_INTERPRET=1 "$PYTHON" $call --dry-run --out "$OUT/bench.csv" > "$OUT/bench_dry_run.log" 2>&1 \
        || { tail -n 20 "$OUT/bench_dry_run.log"; return 1; }
    done
    "$PYTHON" benchmarks/bench.py --summarize "$OUT/bench.csv" | sed -n 1,4p
  }
  targets() {  # the targets' report reads the dry run's rows (their figures mean nothing)
    "$PYTHON" benchmarks/bench.py --targets "$OUT/bench.csv" > "$OUT/targets.txt" || return 1
    sed -n 1,3p "$OUT/targets.txt"
    grep -q "CE + NTL fwd+bwd <= 1.25x the copy of the logits" "$OUT/targets.txt" \
      && grep -q "NTL forward >= 10x faster than ntloss" "$OUT/targets.txt"
  }
  traffic() {  # every ntl_fast row of the dry run has its bytes by design, and a copy row the floor
    "$PYTHON" - "$OUT/bench.csv" <<'EOF'
import csv, sys
rows = list(csv.DictReader(open(sys.argv[1])))
ours = [r for r in rows if r["provider"] in ("triton", "cpp") and r["op"] in ("ce_ntl", "ntl")]
missing = [f"{r['op']}/{r['provider']}/{r['mode']}" for r in ours if not r.get("traffic_x_floor")]
print(f"  {len(ours)} ntl_fast rows, traffic missing in: {missing or 'none'}")
sys.exit(1 if missing or not ours or not any(r["op"] == "copy" for r in rows) else 0)
EOF
  }
  wheels() {
    local pins missing=0 pin name version
    pins=$(grep -v '^\s*#' "$WHEEL_PINS" | grep -v '^\s*$')
    make -n wheels | grep -q "pip download .*-d .whl -r $WHEEL_PINS" || { echo "  make wheels does not download the pins"; return 1; }
    for pin in $pins; do
      name=${pin%%==*}; version=${pin##*==}
      compgen -G ".whl/${name//-/_}-${version}-py3-none-any.whl" > /dev/null || missing=1
    done
    if [ "$missing" = 0 ]; then
      echo "  .whl/ holds every pin of $WHEEL_PINS"
      return 0
    fi
    echo "  .whl/ lacks pinned wheels (make wheels fills it); asking pip whether the pins resolve"
    # shellcheck disable=SC2086
    "$PYTHON" -m pip install --dry-run --quiet --no-deps --only-binary=:all: --ignore-installed \
      --target "$OUT/wheel_check" $pins
  }
  budget() {
    echo "  worst case: wheels $T_WHEELS + max(build $T_BUILD, Triton tests $T_TRITON_TESTS + benchmarks $T_BENCH)" \
         "+ CUDA tests $T_CPP_TESTS + CUDA benchmarks $T_CPP_BENCH + launch plans ${#PLANS[@]} x $T_PLAN + LM head $T_LINEAR" \
         "+ sanitizers 3 x $T_SANITIZER + reserved $T_EXTRA = ${worst_case}s"
    [ "$worst_case" -le "$BUDGET_S" ]
  }
  echo "gpu_check --dry-run: $("$PYTHON" -c 'import platform, torch, triton; print(f"python {platform.python_version()} torch {torch.__version__} triton {triton.__version__}")')"
  check "step timeouts within the ${BUDGET_S}s budget" budget
  check "GPU test selection collects" collect
  check "benchmark calls set up on tiny CPU tensors" bench_setup
  check "traffic by design in every ntl_fast row, a copy row for the floor" traffic
  check "performance targets read the benchmark CSV" targets
  check "summary of test counts reads junit XML" test_counts "$OUT/junit_collect.xml"
  check "extension build script parses" bash -n scripts/build_cuda_extension.sh
  echo "  build command: ${BUILD[*]}"
  check "baseline wheels (make wheels)" wheels
  t5_smoke_parses() {  # the smoke run's command line, parsed by the example's own parser
    "$PYTHON" -c 'import sys; sys.path.insert(0, "examples/t5_arithmetic"); import train
args = train.parse_args(sys.argv[1:]); assert args.smoke and args.preset == "paper", args' \
      "${T5_SMOKE[@]:1}" --out "$OUT/t5_smoke"
  }
  check "T5 paper preset smoke command parses" t5_smoke_parses
  for tool in "${SANITIZER_TOOLS[@]}"; do echo "  would run: compute-sanitizer --tool $tool --error-exitcode 9 $PYTHON benchmarks/sanitizer_case.py"; done
  steps_report() {  # the step machinery on commands with known outcomes
    step "a step that passes" 5 true > /dev/null
    step "a step that fails" 5 false > /dev/null
    step "a step that runs too long" 1 sleep 5 > /dev/null
    printf '%s\n' "${summary[@]}"
    [[ "${summary[0]}" == *" ok" && "${summary[1]}" == *"failed, exit code 1"* \
       && "${summary[2]}" == *"timed out after 1s"* && "$status" = 1 ]]
  }
  check "steps report their outcome and go on" steps_report
  if [ "$problems" = 0 ]; then echo "gpu_check --dry-run: ok"; exit 0; fi
  echo "gpu_check --dry-run: $problems checks failed"
  exit 1
fi

# ------------------------------------------------------------------------------------ GPU run
exec > >(tee "$OUT/gpu_check.log") 2>&1
export PYTHONUNBUFFERED=1
if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: no CUDA device here; the CPU parts of these checks run in 'make test' (and --dry-run)."
  exit 2
fi
[ "$worst_case" -le "$BUDGET_S" ] || echo "gpu_check: worst case ${worst_case}s exceeds the ${BUDGET_S}s budget"
xdist=()
"$PYTHON" -c "import xdist" 2>/dev/null && xdist=(-n 4)  # the tests' Triton compiles in parallel
rm -f "$OUT/bench.csv"

if compgen -G ".whl/*.whl" > /dev/null; then
  step "baseline wheels from .whl/" "$T_WHEELS" "$PYTHON" -m pip install -q --no-index --no-deps --no-compile \
    --no-cache-dir --upgrade --target /tmp/ntl_site .whl/*.whl
  export PYTHONPATH=/tmp/ntl_site${PYTHONPATH:+:$PYTHONPATH}
else
  record "baseline wheels from .whl/" "not-run: .whl/ is empty (make wheels)" 0 "$T_WHEELS"
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
"$PYTHON" - <<'EOF'
import torch, triton, platform
print(f"python {platform.python_version()} torch {torch.__version__} triton {triton.__version__} "
      f"device {torch.cuda.get_device_name()} SMs {torch.cuda.get_device_properties(0).multi_processor_count}")
EOF
git rev-parse HEAD 2>/dev/null || echo "commit: see benchmarks/results (no .git on the device)"

elapsed "building the CUDA extension in the background: ${BUILD[*]}"
build_begin=$(date +%s)
rm -f "$OUT/build.rc"
( timeout "$T_BUILD" "${BUILD[@]}" > "$OUT/build.log" 2>&1; echo $? > "$OUT/build.rc" ) &
build_pid=$!

step "Triton tests on CUDA" "$T_TRITON_TESTS" "$PYTHON" -m pytest -q -p no:cacheprovider "${xdist[@]}" \
  "${TRITON_TESTS[@]}" --junitxml="$OUT/junit_triton.xml"
step "benchmarks ($preset): Triton, reference, baselines" "$T_BENCH" "$PYTHON" "${BENCH_MAIN[@]}" --out "$OUT/bench.csv"

wait "$build_pid"
record "CUDA extension build (background)" "$(cat "$OUT/build.rc" 2>/dev/null || echo "not-run: no exit code")" \
  "$(( $(date +%s) - build_begin ))" "$T_BUILD"
tail -n 5 "$OUT/build.log"
if [ "$(cat "$OUT/build.rc" 2>/dev/null)" = 0 ] && cp "$BUILD_LIB"/ntl_fast/_C*.so ntl_fast/; then
  "$PYTHON" -c 'import ntl_fast.cpp as c; print("ntl_fast._C CUDA kernels:", c.unsupported_reason("cuda") or "registered")'
  step "CUDA extension tests" "$T_CPP_TESTS" "$PYTHON" -m pytest -q -p no:cacheprovider "${CPP_TESTS[@]}" \
    --junitxml="$OUT/junit_cpp.xml"
  step "CUDA extension benchmarks ($preset)" "$T_CPP_BENCH" "$PYTHON" "${BENCH_CPP[@]}" --out "$OUT/bench.csv"
else
  record "CUDA extension tests" "not-run: no extension (build failed: $OUT/build.log)" 0 "$T_CPP_TESTS"
  record "CUDA extension benchmarks" "not-run: no extension" 0 "$T_CPP_BENCH"
fi
for plan in "${PLANS[@]}"; do  # the same rows under each alternative launch plan
  # shellcheck disable=SC2086  # the plan's VAR=value words
  step "launch plan ${plan%% *}: fused CE + NTL, bf16" "$T_PLAN" env ${plan#* } "$PYTHON" "${BENCH_PLANS[@]}" \
    --out "$OUT/bench_plan_${plan%% *}.csv"
done

step "LM-head-fused CE + NTL vs materialised" "$T_LINEAR" "$PYTHON" "${BENCH_LINEAR[@]}" --out "$OUT/bench.csv"

for tool in "${SANITIZER_TOOLS[@]}"; do
  if command -v compute-sanitizer > /dev/null; then
    step "compute-sanitizer $tool (benchmarks/sanitizer_case.py)" "$T_SANITIZER" compute-sanitizer --tool "$tool" \
      --error-exitcode 9 --log-file "$OUT/sanitizer_$tool.log" "$PYTHON" benchmarks/sanitizer_case.py
    tail -n 3 "$OUT/sanitizer_$tool.log"
  else
    record "compute-sanitizer $tool" "not-run: compute-sanitizer is not on the PATH" 0 "$T_SANITIZER"
  fi
done

# The paper's T5-small-sized preset at scale: steps/s, peak memory, first and last loss (smoke.json).
# Its own integer task, so no data generator has to travel to the device.
step "T5 paper preset smoke run" "$T_EXTRA" "$PYTHON" "${T5_SMOKE[@]}" --out "$OUT/t5_smoke"

echo
echo "==================== summary ($(( $(date +%s) - started ))s; worst case ${worst_case}s of ${BUDGET_S}s)"
printf '%s\n' "${summary[@]}"
echo "tests:"
test_counts "$OUT"/junit_triton.xml "$OUT"/junit_cpp.xml
if [ -s "$OUT/bench.csv" ]; then
  echo "benchmarks (multiples: time / floor, bytes / floor's bytes, time / baseline; < 1 is faster):"
  "$PYTHON" benchmarks/bench.py --summarize "$OUT/bench.csv" | tee "$OUT/summary.txt"
  "$PYTHON" benchmarks/bench.py --targets "$OUT/bench.csv" | tee "$OUT/targets.txt"
fi
for plan in "${PLANS[@]}"; do
  if [ -s "$OUT/bench_plan_${plan%% *}.csv" ]; then
    echo "launch plan ${plan%% *} (${plan#* }):"
    "$PYTHON" benchmarks/bench.py --summarize "$OUT/bench_plan_${plan%% *}.csv" | tee -a "$OUT/summary.txt"
  fi
done
elapsed "done, status $status"
exit $status
