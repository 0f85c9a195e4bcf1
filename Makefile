# Set-up is part of every target: a fresh machine needs nothing but python3 and make.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
REQUIREMENTS := requirements-test.txt $(wildcard */requirements.txt)
STAMP := $(VENV)/.stamp-requirements

.PHONY: test venv services migrate

test: venv services
	$(BIN)/python -m pytest $(PYTEST_ARGS)

venv: $(STAMP)

$(STAMP): $(REQUIREMENTS)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -r requirements-test.txt
	touch $(STAMP)

services:
	bash tools/dev/ensure_services.sh

migrate: venv
	$(BIN)/python -m common.migrate
