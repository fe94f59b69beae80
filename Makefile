# Two commands for a fresh machine (see README):
#   make run    install into .venv, build the extension, run the main job (fasthg train)
#   make test   install into .venv, build the extension, run the test suite
# and two for numbers: make report (fasthg bench: the table, JSON and chart), make bench
# (the pytest-benchmark suite).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
JOBS   ?= 2
# Without a GPU the tests only need the CUDA sources to compile: one architecture (H100)
# keeps CI short. `make run` builds for A100 and H100 (setup.py's default) or the visible GPU.
TEST_CUDA_ARCHS := $(if $(shell command -v nvidia-smi 2>/dev/null),,9.0)

.PHONY: install run test test-quick report bench

$(PY):
	$(PYTHON) -m venv $(VENV)

install: $(PY)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	MAX_JOBS=$(JOBS) $(PY) -m pip install -q --no-build-isolation -e .

run: install
	$(PY) -m fasthg info
	$(PY) -m fasthg train --out runs/train

report: install
	$(PY) -m fasthg bench --model hg2,hg8 --out runs/bench

test: export TORCH_CUDA_ARCH_LIST ?= $(TEST_CUDA_ARCHS)
test: install
	$(PY) -m fasthg info
	$(PY) -m pytest tests

test-quick: export TORCH_CUDA_ARCH_LIST ?= $(TEST_CUDA_ARCHS)
test-quick: install
	$(PY) -m pytest tests -m "not slow"

bench: install
	$(PY) -m pytest benchmarks --benchmark-only --benchmark-json runs/pytest-benchmark.json
