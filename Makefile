# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-fast bench style check clean

# torch is installed first and pinned: an unpinned torch pulls several GB of CUDA packages.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch==$(TORCH_VERSION)"
	$(PY) -m pip install -q -e ".[dev,demo]" "torch==$(TORCH_VERSION)"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/qbert-hessian demo

test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

bench: $(STAMP)
	$(PY) -m pip install -q "pyhessian==0.1"
	$(PY) benchmarks/bench_sensitivity.py

style: $(STAMP)
	$(VENV)/bin/ruff format qbert_hessian tests benchmarks experiments notebooks
	$(VENV)/bin/ruff check --fix qbert_hessian tests benchmarks experiments notebooks

check: $(STAMP)
	$(VENV)/bin/ruff check qbert_hessian tests benchmarks experiments notebooks

clean:
	rm -rf $(VENV) runs .pytest_cache
