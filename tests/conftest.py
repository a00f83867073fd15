"""Shared fixtures: tiny generated stores, made once per test session."""

from __future__ import annotations

import os
import signal
import subprocess
import warnings

import pytest
import torch
from planted import RUN_MARK

from lungbench.data.geometry import geometry
from lungbench.data.synth import write_synthetic_store


@pytest.fixture(autouse=True, scope="session")
def _tuning_cache(tmp_path_factory):
    """The tuning pass's cache lives in the session's temporary folder, never in ~/.cache."""
    folder = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LUNGBENCH_CACHE_DIR", str(folder))
        yield folder


# One intra-op thread per test process when `make test` runs two (pytest-xdist), else two:
# the same thread count in every test whatever the host's cores, and no more threads than
# the 2-core CI machine has (two processes of two threads each spun on each other's cores:
# the fast tier burnt 1.5x the CPU time for a 1.1x shorter run).
TEST_THREADS = 1 if os.environ.get("PYTEST_XDIST_WORKER") else 2


@pytest.fixture(autouse=True)
def _test_threads():
    torch.set_num_threads(TEST_THREADS)


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory):
    """24 generated LIDC-like nodules on the dey2018 grid (5x50x50), written once."""
    path = tmp_path_factory.mktemp("stores") / "tiny.h5"
    write_synthetic_store(path, "lidc", 24, geometry("dey2018"), seed=3, workers=1)
    return path


@pytest.fixture
def stderr_log():
    """The CLI's console: lungbench's log lines on stderr, as `lungbench` shows them (the
    handler is process-wide state, so each test that reads it installs it and puts it back)."""
    import logging

    from lungbench.core.console import LOGGER, show_progress

    logger = logging.getLogger(LOGGER)
    saved = (list(logger.handlers), logger.level, logger.propagate)
    show_progress()
    yield
    logger.handlers[:], logger.level, logger.propagate = saved


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` run where CUDA exists and are skipped, saying why, elsewhere."""
    if torch.cuda.is_available():
        return
    no_gpu = pytest.mark.skip(reason="needs a CUDA device; torch sees none on this machine")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(no_gpu)


# What only the slow tier may start: lungbench itself (`-m lungbench` or the console script)
# and the process launchers. (A `python -c` that imports lungbench to time it is allowed.)
LAUNCHERS = {"lungbench", "torchrun", "mpiexec", "mpirun", "srun"}
LAUNCHER_MODULES = {"lungbench", "torch.distributed.run"}


def starts_a_run(args) -> bool:
    """Whether a command line starts lungbench or a process launcher."""
    argv = [str(a) for a in ([args] if isinstance(args, (str, bytes, os.PathLike)) else args)]
    if not argv:
        return False
    if os.path.basename(argv[0]) in LAUNCHERS:
        return True
    modules = {b for a, b in zip(argv, argv[1:], strict=False) if a == "-m"}
    held = any(a.startswith(RUN_MARK) for a in argv)  # `python -c` of tests/planted.py
    return held or bool(modules & LAUNCHER_MODULES)


@pytest.fixture(autouse=True)
def _fast_tier_starts_no_run(request, monkeypatch):
    """The fast tier (neither slow nor distributed) starts no lungbench process and no
    launcher: a test that does fails here, naming the command, until it is marked slow."""
    if request.node.get_closest_marker("slow") or request.node.get_closest_marker("distributed"):
        return
    real = subprocess.Popen.__init__

    def guarded(self, args, *rest, **kwargs):
        if starts_a_run(args):
            shown = " ".join(map(str, args))[:160] if not isinstance(args, str) else args[:160]
            raise AssertionError(f"the fast tier starts no run ({shown}): mark the test slow")
        real(self, args, *rest, **kwargs)

    monkeypatch.setattr(subprocess.Popen, "__init__", guarded)


@pytest.fixture(autouse=True)
def _signal_handlers_put_back(request):
    """Each test starts with the SIGINT/SIGTERM handlers this session started with (those of
    a fresh process): code a test runs in-process may install its own and leave it, and a
    later test's signal would then mean something else. A warning names the test."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield
    for signum, handler in saved.items():
        if signal.getsignal(signum) is not handler:
            name = signal.Signals(signum).name
            warnings.warn(f"{request.node.nodeid} left a {name} handler; put back", stacklevel=1)
            signal.signal(signum, handler)
