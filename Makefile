# Two entry points, each doing all of its set-up on a fresh CPU machine:
#   make demo   the main job: the T5 arithmetic experiment on its defaults (CE vs NTL-WAS)
#   make test   the whole test suite (what CI runs)
# and checks: make lint (ruff), make check-install (the README's install, from the sdist).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The torch the tests run on. On Linux, PyPI's torch==2.13.0 is the multi-GB CUDA build; for the
# CPU build pass PyTorch's CPU index: make test TORCH_INDEX=https://download.pytorch.org/whl/cpu
# (empty by default, for machines whose pip configuration already serves the CPU build).
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
TRITON_SPEC ?= triton==3.8.0
SOURCES := pyproject.toml setup.py $(shell find csrc -type f 2>/dev/null)

.PHONY: setup demo test lint check-install bench-cpu gpu-check wheels

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# --no-build-isolation: the extension in csrc/ builds against the torch installed just before.
$(VENV)/.installed: $(BIN)/python $(SOURCES)
	$(BIN)/python -m pip install -q $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)" "$(TRITON_SPEC)"
	$(BIN)/python -m pip install -q setuptools wheel ninja
	$(BIN)/python -m pip install -q --no-build-isolation -e ".[test]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(BIN)/python examples/t5_arithmetic/train.py

# The CUDA sources compile for sm_80/sm_90 and the tensor plumbing against this torch's headers
# (nvcc only, no GPU); the suite includes the Triton ahead-of-time compile and the GPU check's
# dry run.
test: setup
	@if command -v nvcc >/dev/null; then PYTHON=$(BIN)/python bash scripts/check_cuda_compile.sh --plumbing; \
	else echo "make test: SKIPPED the CUDA compile check: nvcc is not on the PATH"; fi
	$(BIN)/python -m pytest -q; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; fi; exit $$rc

lint: setup
	PYTHON=$(BIN)/python bash scripts/lint.sh

# about 4 minutes: a fresh venv, torch, and the C++ extension compiled from the sdist
check-install:
	PYTHON=$(PYTHON) TORCH_SPEC="$(TORCH_SPEC)" TORCH_INDEX="$(TORCH_INDEX)" bash scripts/check_sdist_install.sh

bench-cpu: setup
	$(BIN)/python benchmarks/bench.py --preset cpu --cpu-memory --out benchmarks/results/cpu.csv
	$(BIN)/python benchmarks/bench.py --preset cpu-linear --repeats 3 --cpu-memory --out benchmarks/results/cpu.csv
	$(BIN)/python benchmarks/plot.py benchmarks/results/cpu.csv benchmarks/results/cpu.png

gpu-check:
	bash benchmarks/gpu_check.sh

# The baselines' wheels for benchmarks/gpu_check.sh on a machine without network.
wheels: $(BIN)/python
	$(BIN)/python -m pip download --no-deps --only-binary=:all: -d .whl -r benchmarks/baseline_wheels.txt
