VENV ?= .venv
PY := $(VENV)/bin/python
CONFIG ?= config.example.yaml
# The dashboard's browser tests drive Debian's chromium (Playwright never downloads one).
CHROMIUM ?= /usr/bin/chromium
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: run test lint typecheck pytest install dev bench clean dashboard-screenshot

$(VENV)/bin/python:
	python3 -m venv $(VENV)
	$(PY) -m pip install --upgrade pip

install: $(VENV)/bin/python
	$(PY) -m pip install -e .

dev: $(VENV)/bin/python $(CHROMIUM)
	$(PY) -m pip install -e '.[dev]'

$(CHROMIUM):
	$(SUDO) apt-get update
	$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y chromium

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

dashboard-screenshot: dev
	$(PY) -m tests.dashboard_demo docs/dashboard.png

bench: dev
	$(PY) bench/overhead.py

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache build *.egg-info
