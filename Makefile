# alignx: two commands on a fresh machine, `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# Pin torch before anything that depends on it: an unpinned torch pulls several GB of CUDA wheels.
TORCH  := torch==2.13.0

.PHONY: install install-demo install-extras test test-slow lint demo bench bench-gpu gpu-check clean

$(VENV)/.stamp-install: requirements.txt constraints.txt setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools
	$(PIP) install -q $(TORCH)
	$(PIP) install -q -c constraints.txt -r requirements.txt
	$(PIP) install -q --no-deps --no-build-isolation -e .
	touch $@

$(VENV)/.stamp-demo: $(VENV)/.stamp-install requirements-demo.txt
	$(PIP) install -q -c constraints.txt -r requirements-demo.txt
	touch $@

install: $(VENV)/.stamp-install

install-demo: $(VENV)/.stamp-demo

$(VENV)/.stamp-extras: $(VENV)/.stamp-demo requirements-extras-nodeps.txt
	$(PIP) install -q --no-deps -r requirements-extras-nodeps.txt
	touch $@

install-extras: $(VENV)/.stamp-extras

test: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pytest -q -m "not slow"

test-slow: install-extras
	$(VENV)/bin/pytest -q -m slow

lint: install
	$(VENV)/bin/ruff check .

demo: install-demo
	$(PY) -m alignx.cli demo $(DEMO_ARGS)

bench: install
	$(PY) -m benchmarks.run --device cpu

bench-gpu: install
	$(PY) -m benchmarks.run --device cuda

# The one command for a fresh GPU machine: its own environment (CUDA torch 2.13.0) in $(GPU_VENV), kernel tests,
# extras, 20 training steps and the short benchmark sweep in <= 8 minutes (benchmarks/gpu_check.py).
# DRY_RUN=1 on a CPU machine: the plan and every check that needs no CUDA, with the CPU environment.
GPU_VENV ?= .venv-gpu
GPU_CHECK_ARGS ?=
DRY := $(filter-out 0 no false,$(DRY_RUN))
gpu-check: $(if $(DRY),$(VENV)/.stamp-install)
	$(PYTHON) benchmarks/gpu_check.py --venv $(GPU_VENV) $(if $(DRY),--dry-run --check-python $(PY)) $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV) $(GPU_VENV) build *.egg-info .pytest_cache .ruff_cache
