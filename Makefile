# The two commands the README shows. Both work from a clean clone on a fresh machine.
#   make demo   set up .venv and run the end-to-end demo on CPU
#   make test   set up .venv with the dev extras and run the whole test suite

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check
# torch goes in first and pinned: anything that pulls torch unpinned would fetch a multi-GB
# CUDA build; with 2.13.0 in place, the rest resolves against it.
TORCH  := torch==2.13.0

.PHONY: demo test

$(VENV)/.stamp-base: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q $(TORCH)
	$(PIP) install -q -e .
	touch $@

$(VENV)/.stamp-dev: pyproject.toml $(VENV)/.stamp-base
	$(PIP) install -q -e ".[dev]"
	touch $@

demo: $(VENV)/.stamp-base
	$(VENV)/bin/strop demo

test: $(VENV)/.stamp-dev
	$(VENV)/bin/ruff check src tests benchmarks
	$(PY) -m pytest -q
