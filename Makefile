# Two commands for a fresh machine (see README):
#   make run    install into .venv, build the extension, run the main job (fasthg train)
#   make test   install into .venv, build the extension, run the test suite
# and two for numbers: make report (fasthg bench: the table, JSON and chart), make bench
# (the pytest-benchmark suite). make test-quick: the tests not marked slow.
# make install (or make rebuild) reinstalls everything and rebuilds the extension whatever changed.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
JOBS   ?= 2
# Without a GPU the tests only need the CUDA sources to compile: one architecture (H100)
# keeps CI short. `make run` builds for A100 and H100 (setup.py's default) or the visible GPU.
TEST_CUDA_ARCHS := $(if $(shell command -v nvidia-smi 2>/dev/null),,9.0)

.PHONY: install rebuild run test test-quick report bench FORCE

$(PY):
	$(PYTHON) -m venv $(VENV)

# Installing rebuilds the extension from scratch: 3-4 minutes on 2 cores. So run, test, report
# and bench install only when something it depends on changed, which $(STAMP) records: it is
# written after a successful install, holding the python and torch versions built against, and
# is out of date when
#   - a source, setup.py, pyproject.toml or requirements.txt is newer than it,
#   - the venv's python or torch is no longer the one it names (torch upgraded or swapped),
#   - the built extension fasthg/_C*.so or fasthg/_build_info.py is gone (e.g. git clean),
#   - the venv is new (the stamp lives in it).
# Build settings read from the environment (FASTHG_CUDA, TORCH_CUDA_ARCH_LIST, FASTHG_CPU_SIMD)
# are not tracked: after changing them, run make install.
STAMP    := $(VENV)/.fasthg-installed
SOURCES  := $(shell find csrc -type f) setup.py pyproject.toml requirements.txt
# The python and torch a build is for, e.g. python3.11.9-torch2.14.1+cu130 (importlib.metadata
# rather than importing torch: a fraction of a second on every make).
VERSIONS := import sys; from importlib.metadata import version; print("python%d.%d.%d-torch%s" % (*sys.version_info[:3], version("torch")))
RUNTIME   = $(shell $(PY) -c '$(VERSIONS)' 2>/dev/null)
BUILT     = $(and $(RUNTIME),$(filter $(RUNTIME),$(shell cat $(STAMP) 2>/dev/null)),$(wildcard fasthg/_C*.so),$(wildcard fasthg/_build_info.py))

define INSTALL
rm -f $(STAMP)
$(PY) -m pip install -q --upgrade pip
$(PY) -m pip install -q -r requirements.txt
MAX_JOBS=$(JOBS) $(PY) -m pip install -q --no-build-isolation -e .
$(PY) -c '$(VERSIONS)' > $(STAMP)
endef

$(STAMP): $(SOURCES) $(if $(BUILT),,FORCE) | $(PY)
	$(INSTALL)

install rebuild: | $(PY)
	$(INSTALL)

FORCE:

run: $(STAMP)
	$(PY) -m fasthg info
	$(PY) -m fasthg train --out runs/train

report: $(STAMP)
	$(PY) -m fasthg bench --model hg2,hg8 --out runs/bench

test: export TORCH_CUDA_ARCH_LIST ?= $(TEST_CUDA_ARCHS)
test: $(STAMP)
	$(PY) -m fasthg info
	$(PY) -m pytest tests

test-quick: export TORCH_CUDA_ARCH_LIST ?= $(TEST_CUDA_ARCHS)
test-quick: $(STAMP)
	$(PY) -m pytest tests -m "not slow"

bench: $(STAMP)
	$(PY) -m pytest benchmarks --benchmark-only --benchmark-json runs/pytest-benchmark.json
