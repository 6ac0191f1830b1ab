# The two commands of README.md: `make run` and `make test`. Each sets up .venv first.
VENV := .venv
BIN := $(VENV)/bin
ARGS ?=

.PHONY: setup setup-test run test test-fast test-slow lint

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt infra/setup.sh
	bash infra/setup.sh

run: setup
	$(BIN)/ssl-pipeline run $(ARGS)

test: setup lint test-fast test-slow

lint: setup
	$(BIN)/ruff check .
	$(BIN)/mypy

test-fast: setup
	$(BIN)/python -m pytest -m "not slow"

# The slow tests' browser (Debian's chromium) for the MLflow UI test.
setup-test:
	bash infra/setup-test.sh

test-slow: setup setup-test
	$(BIN)/python -m pytest -m slow
