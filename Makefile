# Two commands do the whole set-up on a fresh machine (CPU, pinned torch):
#   make bench   install into .venv and run the default benchmark (lungbench bench)
#   make test    install into .venv (with dev tools) and run the test suite
# Cluster (CUDA) installs: see README.md, "Install on a GPU cluster".
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The constraints file pins torch to the CPU build: an unpinned torch pulls GBs of CUDA wheels.
PIP_INSTALL := $(BIN)/python -m pip install --constraint constraints-cpu.txt

.PHONY: install bench test test-fast lint bench-suite clean

$(VENV)/.installed: pyproject.toml constraints-cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(PIP_INSTALL) -e ".[dev]"
	touch $@

install: $(VENV)/.installed

bench: install
	$(BIN)/lungbench bench

test: install
	$(BIN)/python -m pytest

test-fast: install
	$(BIN)/python -m pytest -m "not slow and not distributed and not exhaustive"

lint: install
	$(BIN)/ruff check lungbench tests bench
	$(BIN)/ruff format --check lungbench tests bench

bench-suite: install
	$(BIN)/python -m pytest bench/ --benchmark-only

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
