#!/usr/bin/env bash
# Lint the package, the tests, the benchmarks and the examples with ruff (rules in pyproject.toml).
# Usage: scripts/lint.sh   (PYTHON=.venv/bin/python; installs the pinned ruff there if missing)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
RUFF_SPEC="ruff==0.17.5"
"$PYTHON" -m ruff --version >/dev/null 2>&1 || "$PYTHON" -m pip install -q "$RUFF_SPEC"
"$PYTHON" -m ruff check ntl_fast tests benchmarks examples
