# titans_mini -- the two commands a newcomer needs:
#   make lab    set up the environment and open JupyterLab on the course
#   make test   set up the environment and run lint + the whole test suite (what CI runs)
# Other targets: make exercises | make render | make grade | make bench | make test-widgets77 | make test-browser
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
# Use the active virtual environment (or conda env) if there is one, else ./.venv.
ifneq ($(VIRTUAL_ENV),)
VENV := $(VIRTUAL_ENV)
else ifneq ($(filter-out base,$(CONDA_DEFAULT_ENV)),)
VENV := $(CONDA_PREFIX)
else
VENV := .venv
endif
PY := $(VENV)/bin/python
STAMP := $(VENV)/.titans-mini-setup
# torch for machines without a CUDA GPU: a CPU build. On Linux without a GPU the set-up tries
# PyTorch's CPU wheel index (CPU_INDEX) and falls back to the package index when that is not
# reachable (on the course's CI machines the pinned version is a local CPU wheel). TORCH_INDEX
# forces an index.
TORCH_CPU_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
CPU_INDEX ?= https://download.pytorch.org/whl/cpu
PYTEST_WORKERS ?= 2
# JupyterLab refuses to start as root (containers, some cloud machines) without this flag
ROOT_FLAG := $(if $(filter 0,$(shell id -u 2>/dev/null)),--allow-root)

.PHONY: help setup lab test lint pytest exercises render grade bench test-widgets77 test-browser \
	clean clean-env check-python

help:
	@echo "make lab        set up (venv, torch, package, kernel) and open JupyterLab on notebooks/"
	@echo "make test       set up, then ruff + the whole pytest suite (notebooks with TITANS_FAST=1)"
	@echo "make exercises  regenerate exercises/ from solutions/"
	@echo "make render     run every lesson at full size and store it with its outputs (slow)"
	@echo "make grade      grade your exercises/ notebooks with the checks"
	@echo "make bench      run the benchmark scripts in bench/"
	@echo "make clean-env  delete ./.venv (a broken or half-made environment); make lab rebuilds it"

# Python >= 3.10, checked before anything is created or installed.
check-python:
	@$(PYTHON) -c "import sys; sys.exit(sys.version_info < (3, 10))" 2>/dev/null || { \
		found=$$($(PYTHON) --version 2>&1) || found="not found"; \
		echo "titans_mini needs Python >= 3.10; '$(PYTHON)' is $$found. Install Python" \
			"3.10-3.13 and name it, e.g.: make lab PYTHON=python3.12"; \
		exit 1; }

$(PY): | check-python
	$(PYTHON) -m venv $(VENV)

# Idempotent: re-runs only when pyproject.toml changes (or the stamp is missing).
$(STAMP): pyproject.toml | $(PY)
	@$(PY) -c "import sys; sys.exit(sys.version_info < (3, 10))" 2>/dev/null && \
		$(PY) -m pip --version >/dev/null 2>&1 || { \
		echo "the environment $(VENV) is broken or half-made (its python or pip does not run, or"; \
		echo "it is older than Python 3.10)."; \
		if [ "$(VENV)" = .venv ]; then echo "Run: make clean-env && make lab"; \
		else echo "Repair or leave that environment (deactivate), then run make lab again"; fi; \
		exit 1; }
	@if $(PY) -c "import torch" 2>/dev/null; then \
		echo "torch $$($(PY) -c 'import torch; print(torch.__version__)') already installed"; \
	elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		echo "CUDA GPU found: installing torch with CUDA (a download of several GB)"; \
		$(PY) -m pip install "torch>=2.4"; \
	elif [ -n "$(TORCH_INDEX)" ]; then \
		echo "no CUDA GPU: installing $(TORCH_CPU_SPEC) from $(TORCH_INDEX)"; \
		$(PY) -m pip install "$(TORCH_CPU_SPEC)" --index-url $(TORCH_INDEX); \
	elif [ "$$(uname -s)" = Linux ] && $(PY) -c "import urllib.request as u; \
			u.urlopen('$(CPU_INDEX)/torch/', timeout=10)" >/dev/null 2>&1; then \
		echo "no CUDA GPU: installing the CPU build of torch from $(CPU_INDEX)" \
			"(the Linux CPU wheel of torch 2.13 is 192 MB, instead of several GB of CUDA libraries)"; \
		$(PY) -m pip install "$(TORCH_CPU_SPEC)" --index-url $(CPU_INDEX) \
			--extra-index-url https://pypi.org/simple || { \
		echo "the CPU index failed: installing $(TORCH_CPU_SPEC) from the package index"; \
		$(PY) -m pip install "$(TORCH_CPU_SPEC)"; }; \
	else \
		if [ "$$(uname -s)" = Linux ]; then \
			echo "no CUDA GPU, and $(CPU_INDEX) is not reachable:" \
				"installing $(TORCH_CPU_SPEC) from the package index (on Linux that may be" \
				"the CUDA build, several GB; a local CPU wheel is used when pip has one)"; \
		else \
			echo "no CUDA GPU: installing $(TORCH_CPU_SPEC) from the package index" \
				"(on macOS and Windows that is the CPU build)"; \
		fi; \
		$(PY) -m pip install "$(TORCH_CPU_SPEC)"; \
	fi
	$(PY) -m pip install -q -e ".[course,dev]"
	$(PY) -m ipykernel install --sys-prefix --name titans-mini --display-name "Python (titans-mini)" >/dev/null
	@touch $(STAMP)
	@echo "environment ready in $(VENV)"

setup: $(STAMP)

lab: setup
	$(VENV)/bin/jupyter lab --ServerApp.root_dir=. --LabApp.default_url=/lab/tree/notebooks \
		$(ROOT_FLAG) $(LAB_ARGS)

lint: setup
	$(VENV)/bin/ruff check .

# pytest exit code 5 means "no tests collected": that is an error here, never a silent pass.
pytest: setup
	@set +e; TITANS_FAST=1 OMP_NUM_THREADS=1 MPLBACKEND=Agg $(PY) -m pytest -n $(PYTEST_WORKERS) \
		--dist load --nbmake tests $(wildcard notebooks exercises) $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "ERROR: pytest collected no tests (exit code 5)"; exit 1; fi; exit $$rc

test: lint pytest

exercises: setup
	$(PY) -m tools.notebook_setup
	$(PY) -m tools.exercise_gen

# Full-size runs of the lessons, stored with their outputs (tools/render.py). One lesson:
# $(PY) -m tools.render notebooks/NN_name.ipynb
render: setup
	$(PY) -m tools.render

grade: setup
	TITANS_FAST=1 $(PY) -m pytest tests/test_exercises.py --impl exercises -q

bench: setup
	$(PY) -m pip install -q -e ".[bench]"
	$(PY) bench/memory_bench.py
	$(PY) bench/model_bench.py

# The widget lessons under ipywidgets 7.7.1 (what Colab ships), in a second environment that
# reuses the main one's packages and overrides only the widget stack.
WIDGET_LESSONS = notebooks/03_surprise.ipynb notebooks/04_momentum_forgetting.ipynb
test-widgets77: setup
	@test -x .venv-ipyw77/bin/python || $(PYTHON) -m venv .venv-ipyw77
	@$(PY) -c "import site; print('import site; site.addsitedir(%r)' % site.getsitepackages()[0])" > \
		"$$(.venv-ipyw77/bin/python -c 'import site; print(site.getsitepackages()[0])')/titans_main_env.pth"
	@.venv-ipyw77/bin/python -c "import ipywidgets, sys; sys.exit(ipywidgets.__version__ != '7.7.1')" 2>/dev/null || \
		.venv-ipyw77/bin/python -m pip install -q "ipywidgets==7.7.1"
	.venv-ipyw77/bin/python -c "import ipywidgets; print('ipywidgets', ipywidgets.__version__)"
	TITANS_FAST=1 MPLBACKEND=Agg .venv-ipyw77/bin/python -m pytest -q --nbmake $(WIDGET_LESSONS)

test-browser: setup
	tests/browser/run.sh

clean:
	rm -rf .pytest_cache .ruff_cache build *.egg-info

# only ./.venv: an environment you activated yourself is never deleted
clean-env:
	rm -rf .venv
