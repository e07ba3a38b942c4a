# Two commands on a fresh machine with python3.11: `make demo` and `make test`.
# Each creates .venv at the repo root if missing and installs the project (editable, pinned).
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint install clean fixtures

$(BIN)/python:
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "error: $(PYTHON) not found; install Python 3.11 or run 'make PYTHON=/path/to/python3.11 ...'" >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --disable-pip-version-check -q -e '.[test]'
	@touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .

test: $(STAMP)
	$(BIN)/ruff check .
	RAY_AUTH_MODE=disabled $(BIN)/python -m pytest -q

demo: $(STAMP)
	$(BIN)/mnv3-pipeline demo

# Regenerate parity fixtures (needs a separate venv with torchvision, see README).
TV_PYTHON ?= ../tvenv/bin/python
fixtures:
	$(TV_PYTHON) scripts/make_fixtures.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
