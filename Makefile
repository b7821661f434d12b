# Runway: `make repro` runs the whole pipeline, `make test` the test suite.
PYTHON ?= python3
VENV   := .venv
BIN    := $(abspath $(VENV))/bin
STAMP  := $(VENV)/.installed
export PATH := $(BIN):$(PATH)

.PHONY: repro retrain server test test-fast bench ui lint format postgres-missing

# Debian's PostgreSQL (runway server): its initdb, or a target that installs the package
POSTGRES := $(firstword $(wildcard /usr/lib/postgresql/*/bin/initdb) postgres-missing)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

## repro: create .venv if needed, run `dvc repro`, print the results
repro: $(STAMP)
	dvc repro
	runway summary

## retrain: what CI runs: pull, reproduce what changed, write reports/retrain.md, push
retrain: $(STAMP)
	runway retrain

## server: start the team's tracking server (PostgreSQL + MLflow with basic auth), installing
## Debian's postgresql first when missing; `runway server status` / `stop` afterwards
server: $(STAMP) $(POSTGRES)
	runway server start

## test: create .venv if needed, run the test suite (on 2 workers: most of it is `dvc repro`
## subprocesses waiting on imports; on 2 cores a third worker took longer, 22:43 against
## 21:55; TEST_WORKERS=0 runs it in one process). The browser tests
## drive Debian's chromium: it is installed first when missing (needs root or sudo).
TEST_WORKERS ?= 2
CHROMIUM := /usr/bin/chromium
test: $(STAMP) $(CHROMIUM) $(POSTGRES)
	python -m pytest -n $(TEST_WORKERS) --dist loadgroup

$(CHROMIUM):
	scripts/install-chromium

postgres-missing:
	scripts/install-postgresql

## test-fast: the in-process unit tests only (no `dvc repro`, no stage subprocesses)
test-fast: $(STAMP)
	python -m pytest -m "not slow" -q -n $(TEST_WORKERS)

## bench: compare against a hand-written PyTorch loop and friends; writes reports/bench.json
## (options: make bench BENCH="--accelerator cuda --only epoch,scale")
BENCH ?=
bench: $(STAMP) $(POSTGRES)
	python -m benchmarks.run $(BENCH)

## ui: the MLflow UI on http://127.0.0.1:5000 (local only, no authentication)
ui: $(STAMP)
	runway ui

lint: $(STAMP)
	ruff check .
	ruff format --check .

format: $(STAMP)
	ruff check --fix .
	ruff format .
