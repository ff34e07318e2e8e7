# The PACS, as a newcomer uses it:  make run  |  make test
SHELL := /bin/bash
export PATH := $(HOME)/.local/bin:$(PATH)
UV ?= uv
GATEWAYS ?= 1
WORKERS ?= 1
PYTEST_ARGS ?=
RUN_ARGS ?=
SOAK_ARGS ?=
# helm: from PATH, else the binary deploy/local/bootstrap.sh --test puts under .tools/
HELM ?= $(shell command -v helm 2>/dev/null || echo $(CURDIR)/.tools/helm/helm)
export HELM

.PHONY: help install install-test run test test-unit test-e2e e2e-compose soak fuzz lint format bench clean

help:
	@echo "make run     install everything and start the whole PACS as local processes"
	@echo "make test    run the whole test suite (unit, integration, end-to-end)"
	@echo "make lint    ruff + mypy"
	@echo "make soak    mixed DIMSE/DICOMweb load while dependencies restart, then a consistency check (SOAK_ARGS=--minutes 30)"
	@echo "make fuzz    the fuzz tests with a long budget"
	@echo "make e2e-compose  the e2e tests against deploy/compose.yaml (needs a Docker engine)"
	@echo "make bench   figures: C-STORE, query/retrieve, DICOMweb (vs Orthanc and DCMTK), tier migration, prefetch"

install:
	@deploy/local/bootstrap.sh

install-test:
	@deploy/local/bootstrap.sh --test

run: install
	$(UV) run pacs run --gateways $(GATEWAYS) --workers $(WORKERS) $(RUN_ARGS)

test: install-test
	$(UV) run pytest $(PYTEST_ARGS)

test-unit: install-test
	$(UV) run pytest -m "not e2e" $(PYTEST_ARGS)

test-e2e: install-test
	$(UV) run pytest -m e2e $(PYTEST_ARGS)

e2e-compose: install-test
	$(UV) run pytest -m compose $(PYTEST_ARGS)

soak: install-test
	$(UV) run python -m pacs_e2e.soak $(SOAK_ARGS)

fuzz: install-test
	HYPOTHESIS_PROFILE=long $(UV) run pytest -m fuzz -p no:cacheprovider $(PYTEST_ARGS)

lint:
	$(UV) run ruff check .
	$(UV) run ruff format --check .
	$(UV) run mypy

format:
	$(UV) run ruff check --fix .
	$(UV) run ruff format .

bench:
	@deploy/local/bootstrap.sh --bench
	$(UV) run python -m pacs_e2e.bench

clean:
	rm -rf .pacs data bench-results
