#!/usr/bin/env bash
# The README's Install section, proved from the source distribution:
#   1. build the sdist from the tracked files (as a clean clone has them) and check that it holds
#      every file the build and the documentation need;
#   2. in a fresh virtual environment, install torch (step 1 of the README), then ntl_fast from
#      the sdist (step 2: pip install --no-build-isolation), which compiles the C++ extension
#      against that torch;
#   3. outside the source tree: import, explain_backend, one loss on the C++ backend against the
#      reference, a compat class, and torch left as step 1 installed it.
# Usage: scripts/check_sdist_install.sh   (PYTHON=python3, TORCH_SPEC=torch==2.13.0, TORCH_INDEX=URL)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
TORCH_INDEX="${TORCH_INDEX:-}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
start=$(date +%s)
step() { echo "check_sdist_install: $* ($(( $(date +%s) - start )) s)"; }

mkdir -p "$work/src" "$work/dist"
git ls-files -z | xargs -0 cp --parents -t "$work/src"
"$PYTHON" -m venv "$work/venv"
pip=("$work/venv/bin/python" -m pip -q --disable-pip-version-check)

step "step 1: $TORCH_SPEC${TORCH_INDEX:+ from $TORCH_INDEX}"
"${pip[@]}" install ${TORCH_INDEX:+--index-url "$TORCH_INDEX"} "$TORCH_SPEC"
torch_before="$("$work/venv/bin/python" -c 'import torch; print(torch.__version__)')"

step "step 2: the build tools"
"${pip[@]}" install setuptools wheel ninja
step "the sdist"
(cd "$work/src" && "$work/venv/bin/python" setup.py -q sdist -d "$work/dist" > "$work/sdist.log" 2>&1) \
  || { cat "$work/sdist.log"; exit 1; }
sdist="$(ls "$work"/dist/ntl_fast-*.tar.gz)"
tar -tzf "$sdist" | sed 's|^[^/]*/||' | sort > "$work/sdist.files"
missing="$(git ls-files csrc docs scripts LICENSE README.md CHANGELOG.md pyproject.toml setup.py MANIFEST.in \
           | sort | comm -23 - "$work/sdist.files")"
[ -z "$missing" ] || { echo "check_sdist_install: the sdist lacks:"; echo "$missing"; exit 1; }

step "step 2: pip install --no-build-isolation $(basename "$sdist")"
(cd "$work" && "${pip[@]}" install --no-build-isolation "$sdist")

step "smoke test"
cd "$work"
"$work/venv/bin/python" - "$torch_before" <<'PY'
import sys

import torch

import ntl_fast
from ntl_fast import compat

assert torch.__version__ == sys.argv[1], f"torch changed from {sys.argv[1]} to {torch.__version__}"
assert "site-packages" in ntl_fast.__file__, ntl_fast.__file__
choice = ntl_fast.explain_backend("cpu")
print("explain_backend('cpu'):", choice)
assert choice.name == "cpp", choice
print("compiled operators:", ntl_fast.cpp._C.__file__)
table = ntl_fast.NumberTokenTable.from_values({3 + d: float(d) for d in range(10)}, vocab_size=50)
torch.manual_seed(0)
logits = torch.randn(4, 7, 50, requires_grad=True)
labels = torch.randint(0, 50, (4, 7))
out = ntl_fast.cross_entropy_with_ntl(logits, labels, table, backend="cpp")
out.loss.backward()
expected = ntl_fast.cross_entropy_with_ntl(logits, labels, table, backend="reference")
torch.testing.assert_close(out.loss, expected.loss, rtol=1e-5, atol=1e-6)
print(f"cross_entropy_with_ntl on the C++ backend: {out.loss.item():.6f} (reference {expected.loss.item():.6f})")
assert callable(compat.NTLoss) and callable(ntl_fast.predict_numbers)
PY
step "passed"
