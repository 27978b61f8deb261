VENV ?= .venv
PY := $(VENV)/bin/python
CONFIG ?= config.example.yaml

.PHONY: run test lint typecheck pytest install dev bench clean

$(VENV)/bin/python:
	python3 -m venv $(VENV)
	$(PY) -m pip install --upgrade pip

install: $(VENV)/bin/python
	$(PY) -m pip install -e .

dev: $(VENV)/bin/python
	$(PY) -m pip install -e '.[dev]'

run: install
	$(VENV)/bin/capproxy serve --config $(CONFIG)

lint: dev
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

typecheck: dev
	$(VENV)/bin/mypy

pytest: dev
	$(VENV)/bin/pytest

test: dev
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(VENV)/bin/pytest

bench: dev
	$(PY) bench/overhead.py

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache build *.egg-info
