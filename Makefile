# Everything a new machine needs goes through these targets: they create the
# virtualenv, install the project, and start the local services when needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install demo test test-fast lint format bench stack-up stack-down clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

# The main job on real input: the whole chat corpus end to end.
demo: install
	$(BIN)/convstats demo

# All tests, slow ones included; the fixtures start PostgreSQL and Kafka.
test: install
	$(BIN)/pytest

test-fast: install
	$(BIN)/pytest -m 'not slow'

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: install
	$(BIN)/python ops/bench_worker.py

stack-up: install
	$(BIN)/convstats stack up

stack-down: install
	$(BIN)/convstats stack down

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
