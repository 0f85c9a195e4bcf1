# Set-up is part of every target: a fresh machine needs nothing but python3 and make.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
REQUIREMENTS := requirements-test.txt $(wildcard */requirements.txt)
STAMP := $(VENV)/.stamp-requirements

.PHONY: test venv services migrate dev deploy-tools bench compose-check

test: venv services deploy-tools
	$(BIN)/python tools/test/run.py $(PYTEST_ARGS)
	@if [ -n "$(COMPOSE_CHECK)" ]; then $(MAKE) --no-print-directory compose-check; fi

# Both compose stacks on a real Docker engine (root; installs docker.io, starts dockerd, builds the
# stand-in base images once). Slow: part of `make test` only with COMPOSE_CHECK=1.
compose-check: venv
	$(BIN)/python tools/compose_check/check.py $(COMPOSE_CHECK_ARGS)

# The whole stack on this machine: servers, demo data, five services, node simulator (Ctrl-C stops it).
dev: venv services
	$(BIN)/python tools/dev/stack.py $(DEV_ARGS)

# Every benchmark under tools/bench/, each against a baseline of the same run -> BENCHMARKS.md.
bench: venv services
	$(BIN)/python tools/bench/run_all.py

venv: $(STAMP)

$(STAMP): $(REQUIREMENTS)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -r requirements-test.txt
	touch $(STAMP)

services:
	bash tools/dev/ensure_services.sh

deploy-tools:
	bash tools/dev/ensure_tools.sh

migrate: venv
	$(BIN)/python -m common.migrate
