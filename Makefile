# Flywheel developer entry points. Every target installs what it needs and is idempotent.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PY_VERSION := 3.11
UV_VERSION := 0.13.8
VENV := .venv
PY := $(VENV)/bin/python
UV := .cache/uv/bin/uv
KUBECONFIG := $(CURDIR)/.cache/cluster/kubeconfig
KUBECTL := .cache/bin/kubectl --kubeconfig $(KUBECONFIG)
export KUBECONFIG

.PHONY: help setup tools cluster-up cluster-down test test-unit lint crds lock operator run \
	run-tools run-schedule clean

help:
	@echo "make run           bring up the local cluster and run the sample fine-tune end to end"
	@echo "make run-schedule  the same through the weekly FineTuneSchedule (trigger annotation)"
	@echo "make test          the whole test suite (brings up the local cluster itself)"
	@echo "make setup         create .venv with every dependency (fast when nothing changed)"
	@echo "make cluster-up    start the local control plane (.cache/cluster/kubeconfig)"
	@echo "make cluster-down  stop it and remove its state"
	@echo "make operator      run the operator against the local cluster"
	@echo "make crds          regenerate crds/ and charts/flywheel/crds/ from the API models"
	@echo "make lint          ruff"

# --- Python environment: uv from PyPI, then the locked set into .venv --------------------
$(UV):
	python$(PY_VERSION) -m venv .cache/uv
	.cache/uv/bin/pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)

# Bytecode at install: every rank, preflight and operator process would otherwise compile
# torch and transformers again on import (about 6 s of CPU each where bytecode is not written
# back, e.g. under PYTHONDONTWRITEBYTECODE).
$(VENV)/.installed: requirements.lock pyproject.toml | $(UV)
	$(UV) venv --quiet --allow-existing --python python$(PY_VERSION) $(VENV)
	VIRTUAL_ENV=$(VENV) $(UV) pip sync --quiet --compile-bytecode requirements.lock
	VIRTUAL_ENV=$(VENV) $(UV) pip install --quiet --no-deps -e .
	touch $@

.cache/bin/kubectl: $(VENV)/.installed
	mkdir -p .cache/bin
	ln -sf ../../$(VENV)/bin/kubectl $@

setup: $(VENV)/.installed .cache/bin/kubectl

# Pin the whole dependency set after changing pyproject.toml.
lock: | $(UV)
	$(UV) pip compile pyproject.toml --extra trainer --extra dev --python-version $(PY_VERSION) \
	  --python-platform x86_64-unknown-linux-gnu --quiet -o requirements.lock

# --- local control plane ------------------------------------------------------------------
tools:
	hack/build-tools.sh

cluster-up:
	@$(MAKE) --no-print-directory -j2 setup tools
	$(PY) hack/cluster.py up

cluster-down:
	@if [ -x $(PY) ]; then $(PY) hack/cluster.py down; else python3 hack/cluster.py down; fi

# --- development --------------------------------------------------------------------------
crds: setup
	$(PY) -m flywheel_operator.crdgen

lint: setup
	$(VENV)/bin/ruff check .

# The venv installs while the tools build (-j2): on a cold machine the two overlap.
test:
	@$(MAKE) --no-print-directory -j2 setup tools
	$(PY) -m pytest

test-unit: setup
	$(PY) -m pytest tests/unit

# The Kueue integration is on when the cluster serves Kueue's API (cluster-up starts Kueue):
# hack/operator-local-kueue.yaml appended to hack/operator-local.yaml (its keys win).
OPERATOR_CONFIG := .cache/cluster/operator.yaml
operator: cluster-up
	$(KUBECTL) apply --server-side -f crds/
	@if $(KUBECTL) get crd workloads.kueue.x-k8s.io >/dev/null 2>&1; then \
	  echo "Kueue is up: runs may name a LocalQueue (spec.queueName)"; \
	  cat hack/operator-local.yaml hack/operator-local-kueue.yaml > $(OPERATOR_CONFIG); \
	else cp hack/operator-local.yaml $(OPERATOR_CONFIG); fi
	$(PY) -m flywheel_operator --standalone --all-namespaces --config $(OPERATOR_CONFIG)

# The sample queues nothing: its first run does not wait for Kueue's build (cluster-up and
# the tests add Kueue to the running cluster). The venv installs while the tools build.
run:
	@$(MAKE) --no-print-directory -j2 setup run-tools
	$(PY) hack/cluster.py up --without-kueue
	$(PY) hack/run.py

run-tools:
	python$(PY_VERSION) hack/cluster.py tools --without-kueue

run-schedule: cluster-up
	$(PY) hack/run.py --schedule

clean: cluster-down
	rm -rf .cache $(VENV)
