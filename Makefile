# pacsai — the README's two commands: `make demo` (the main job) and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.pacsai-installed
# The CPU wheel lies on disk here; elsewhere fall back to whatever torch the platform offers.
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup demo test bench ui lab check-viewer clean
setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)" || $(PIP) install -q "torch>=2.2"
	$(PIP) install -q "nnunetv2>=2.8" "$$($(PY) -c 'import torch; print("torch==" + torch.__version__)')"
	$(PIP) install -q -e ".[learning,viewer,test,dask]"
	$(PY) -m ipykernel install --sys-prefix --name pacsai --display-name "pacsai (Python 3)" >/dev/null
	@touch $(STAMP)

# The start time goes to the demo so its summary (reports/demo_summary.json → README) counts the set-up too.
demo:
	@start=$$(date +%s); $(MAKE) --no-print-directory setup && $(VENV)/bin/pacsai demo --started-at $$start

# Lint (ruff: style, import order, complexity, bugbear) and types (mypy) first: they take seconds, the suite minutes.
test: setup
	$(PY) -m ruff check pacsai && $(PY) -m mypy pacsai && $(PY) -m pytest -q

bench: setup
	$(PY) benchmarks/run_all.py

ui: setup
	$(VENV)/bin/pacsai ui

lab: setup
	$(VENV)/bin/jupyter lab notebooks/

check-viewer: setup
	$(PY) scripts/check_viewer.py

clean:
	rm -rf $(VENV) .pytest_cache
