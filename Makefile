# kubemoe — the two commands a newcomer needs are `make demo` and `make test`.
SHELL := /bin/bash
.DEFAULT_GOAL := help
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
STAMP := $(VENV)/.installed

.PHONY: help setup demo test lint typecheck unit e2e cluster-build cluster-up cluster-down crds bench clean

help:
	@echo "make demo   - run the demo (sets up .venv first if needed)"
	@echo "make test   - lint, type-check and run every test (unit + e2e on a real control plane)"
	@echo "make setup  - create .venv with both projects (editable) and the dev tools"
	@echo "make cluster-build / cluster-up / cluster-down - the local Kubernetes control plane"

$(STAMP): operator/pyproject.toml runtime/pyproject.toml dev-requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r dev-requirements.txt -e operator -e runtime
	touch $@

setup: $(STAMP)

demo: setup
	$(BIN)/kubemoe plan examples/tiny-moe.yaml

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/hadolint operator/Dockerfile runtime/Dockerfile runtime/Dockerfile.cpu

typecheck: setup
	$(BIN)/mypy operator/kubemoe_operator runtime/kubemoe_runtime e2e tests $(wildcard bench/*.py)

unit: setup
	$(BIN)/pytest tests || [ $$? -eq 5 ]  # 5: no tests collected

cluster-build: setup
	$(PY) -m e2e.cluster build

e2e: setup cluster-build
	$(BIN)/pytest e2e || [ $$? -eq 5 ]

test: lint typecheck unit e2e

cluster-up: cluster-build
	$(PY) -m e2e.cluster up

cluster-down: setup
	$(PY) -m e2e.cluster down

crds: setup
	$(BIN)/kubemoe crd > crds/kubemoe.io_modeldeployments.yaml
	mkdir -p charts/kubemoe/crds
	cp crds/kubemoe.io_modeldeployments.yaml charts/kubemoe/crds/
	$(PY) -m kubemoe_operator.chart_values charts/kubemoe
	$(PY) -m kubemoe_operator.spec_reference docs/spec-reference.md

bench: setup
	@for b in bench/bench_*.py; do [ -e "$$b" ] || continue; echo "== $$b"; $(PY) "$$b" || exit 1; done

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
