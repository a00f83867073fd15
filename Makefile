# Two commands do the whole set-up on a fresh machine (CPU, pinned torch):
#   make bench       install lungbench (runtime only) into .venv and run `lungbench bench`
#   make test        install lungbench with what the tests need and run the test suite
#   make test-fast   the same install; the fast tier only (no slow, distributed, exhaustive)
# Each installs only what its job needs: `bench` the runtime, `test` the `test` extra (every
# optional reader and launcher the tests exercise, pytest and its plug-ins), `install-dev`
# also ruff and HolisticTraceAnalysis (the `hta` extra, JupyterLab and ~85 packages, used by
# tests/test_trace_hta.py alone, which is skipped without it).
# Cluster (CUDA) installs: see README.md, "Install on a GPU cluster".
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The constraints file pins torch to the CPU build on every install path here: an unpinned
# torch pulls GBs of CUDA wheels.
PIP_INSTALL := $(BIN)/python -m pip install --constraint constraints-cpu.txt
FAST := -m "not slow and not distributed and not exhaustive"
# Two test processes (pytest-xdist), whatever the core count, each with 1 intra-op thread
# (tests/conftest.py): much of the suite waits on process starts, imports and subprocesses.
# On a quiet 2-core Zen 3: make test 9 min 32 s (14 min 52 s in one process, an earlier
# session), make test-fast 2 min 11 s against 3 min 32 s in one process, run one after the
# other. worksteal: an idle worker takes queued tests from the other, so the few
# one-to-two-minute tests do not end up in one tail. TEST_JOBS=0: one process (a debugger).
TEST_JOBS ?= 2
PARALLEL := $(if $(filter 0,$(TEST_JOBS)),,-n $(TEST_JOBS) --dist worksteal)

.PHONY: install install-test install-dev bench test test-fast lint bench-suite clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# One stamp per install: a later, larger install also satisfies the smaller ones.
$(VENV)/.installed-runtime: pyproject.toml constraints-cpu.txt | $(BIN)/python
	$(PIP_INSTALL) -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml constraints-cpu.txt | $(BIN)/python
	$(PIP_INSTALL) -e ".[test]"
	touch $@ $(VENV)/.installed-runtime

$(VENV)/.installed-dev: pyproject.toml constraints-cpu.txt | $(BIN)/python
	$(PIP_INSTALL) -e ".[dev]"
	touch $@ $(VENV)/.installed-test $(VENV)/.installed-runtime

install: $(VENV)/.installed-runtime
install-test: $(VENV)/.installed-test
install-dev: $(VENV)/.installed-dev

bench: install
	$(BIN)/lungbench bench

test: install-test
	$(BIN)/python -m pytest $(PARALLEL)

# The fast tier fuzzes the input readers with 40 examples a property; make test with the full
# budget (150-200).
test-fast: install-test
	LUNGBENCH_FUZZ_EXAMPLES=40 $(BIN)/python -m pytest $(PARALLEL) $(FAST)

lint: install-dev
	$(BIN)/ruff check lungbench tests bench
	$(BIN)/ruff format --check lungbench tests bench

bench-suite: install-test
	$(BIN)/python -m pytest bench/ --benchmark-only

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
