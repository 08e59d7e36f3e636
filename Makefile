# The two commands a new user runs: `make run` (the main job end to end) and `make test`.
# Both install what they need and are idempotent: a second run reuses the venv, the jars and Redis.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
# Re-install only when pyproject.toml changes; pip's cache keeps a re-install fast.
STAMP := $(VENV)/.installed-$(shell sha256sum pyproject.toml | cut -c1-16)

.PHONY: install bench-install stack run test test-tools lint down status

install: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else "adloop needs Python 3.11: set PYTHON=/path/to/python3.11")'
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[dev]"
	@rm -f $(VENV)/.installed-* && touch $@

# The benchmark's peer (quixstreams) in a venv of its own: its pins conflict with adloop's (pyproject.toml).
BENCH_VENV := .venv-bench
bench-install: install
	@test -x $(BENCH_VENV)/bin/python || $(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/python -m pip install -q --upgrade pip
	$(BENCH_VENV)/bin/python -m pip install -q --group bench

stack: install
	$(BIN)/adloop stack up

run: stack
	$(BIN)/adloop demo

test: stack test-tools
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	$(BIN)/pytest

# Debian tools the tests use: Chromium (the dashboard test) and docker-compose (the compose-file check).
test-tools:
	@if ! command -v chromium >/dev/null || ! command -v docker-compose >/dev/null; then \
		command -v apt-get >/dev/null || { echo "no apt-get: install chromium and docker-compose by hand"; exit 1; }; \
		DEBIAN_FRONTEND=noninteractive apt-get update -q >/dev/null && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium >/dev/null || \
			{ echo "chromium not installable (apt-get install -y chromium): the dashboard test needs it"; exit 1; }; \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q docker-compose >/dev/null 2>&1 || \
			echo "docker-compose not installable: the compose-file check will be skipped"; \
	fi

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

status: install
	$(BIN)/adloop stack status

down: install
	$(BIN)/adloop stack down
