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
# torch for machines without a CUDA GPU: a CPU build. On the course's CI machines this pinned
# version is a local CPU wheel; elsewhere point TORCH_INDEX at https://download.pytorch.org/whl/cpu.
TORCH_CPU_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
PYTEST_WORKERS ?= 2

.PHONY: help setup lab test lint pytest exercises render grade bench test-widgets77 test-browser clean

help:
	@echo "make lab        set up (venv, torch, package, kernel) and open JupyterLab on notebooks/"
	@echo "make test       set up, then ruff + the whole pytest suite (notebooks with TITANS_FAST=1)"
	@echo "make exercises  regenerate exercises/ from solutions/"
	@echo "make render     run every lesson at full size and store it with its outputs (slow)"
	@echo "make grade      grade your exercises/ notebooks with the checks"
	@echo "make bench      run the benchmark scripts in bench/"

$(PY):
	$(PYTHON) -m venv $(VENV)

# Idempotent: re-runs only when pyproject.toml changes (or the stamp is missing).
$(STAMP): pyproject.toml | $(PY)
	@if $(PY) -c "import torch" 2>/dev/null; then \
		echo "torch $$($(PY) -c 'import torch; print(torch.__version__)') already installed"; \
	elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		echo "CUDA GPU found: installing torch with CUDA"; $(PY) -m pip install "torch>=2.4"; \
	else \
		echo "no CUDA GPU: installing the CPU build ($(TORCH_CPU_SPEC))"; \
		$(PY) -m pip install "$(TORCH_CPU_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)); \
	fi
	$(PY) -m pip install -q -e ".[course,dev]"
	$(PY) -m ipykernel install --sys-prefix --name titans-mini --display-name "Python (titans-mini)" >/dev/null
	@touch $(STAMP)
	@echo "environment ready in $(VENV)"

setup: $(STAMP)

lab: setup
	$(VENV)/bin/jupyter lab --ServerApp.root_dir=. --LabApp.default_url=/lab/tree/notebooks $(LAB_ARGS)

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
