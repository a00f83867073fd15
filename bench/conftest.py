"""Shared set-up of the pytest-benchmark suite: devices, quick mode, machine info, timing.

    pytest bench/ --benchmark-only                       # the full suite
    LUNGBENCH_BENCH_QUICK=1 pytest bench/ --benchmark-only   # CI: smallest cases, 1 round
    pytest bench/ --benchmark-only --lungbench-quick     # the same, as an option

Every timed function synchronizes the device before it returns (CUDA kernels are
asynchronous: without it the clock would stop at the launch), and warm-up rounds run off the
clock (cuDNN autotuning, the caching allocator, oneDNN primitive creation).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import pytest
import torch

QUICK_ENV = "LUNGBENCH_BENCH_QUICK"
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--lungbench-quick",
        action="store_true",
        help=f"run the lungbench benchmarks in quick mode (as {QUICK_ENV}=1): the smallest "
        "cases only, one warm-up and one timed round",
    )


def pytest_configure(config: pytest.Config) -> None:
    """The allocator as every lungbench command has it: freed memory kept for reuse, so the
    timed steps do not page-fault their tensors in again (lungbench.core.allocator)."""
    from lungbench.core.allocator import keep_freed_memory

    keep_freed_memory()


def is_quick(config: pytest.Config) -> bool:
    return bool(config.getoption("--lungbench-quick")) or os.environ.get(QUICK_ENV, "") not in (
        "",
        "0",
    )


def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict) -> None:
    """Saved runs carry the lungbench environment record (versions, CPU, GPU, git, SLURM)."""
    from lungbench.core.environment import environment_record
    from lungbench.core.runs import to_jsonable

    machine_info["lungbench"] = to_jsonable(environment_record())
    machine_info["lungbench_quick"] = is_quick(config)


@pytest.fixture(scope="session")
def quick(pytestconfig: pytest.Config) -> bool:
    """True in quick mode (CI): cases are trimmed and timed for one round."""
    return is_quick(pytestconfig)


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> torch.device:
    """Every benchmark that takes `device` runs on the CPU, and on CUDA when there is one."""
    torch.manual_seed(0)
    return torch.device(request.param)


@pytest.fixture(autouse=True)
def _threads() -> None:
    # Threads are set explicitly (LUNGBENCH_BENCH_THREADS, else torch's default) and recorded
    # in every benchmark's extra_info: torch.utils.benchmark would silently use one.
    if os.environ.get("LUNGBENCH_BENCH_THREADS"):
        torch.set_num_threads(int(os.environ["LUNGBENCH_BENCH_THREADS"]))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # note: CPU-GPU sync point, inside the timed function


@pytest.fixture
def run_timed(benchmark: Any, quick: bool) -> Callable[..., Any]:
    """`run_timed(fn, device)`: time `fn` with warm-up rounds and a sync before returning."""

    def run(
        fn: Callable[..., Any],
        device: torch.device,
        rounds: int = 10,
        warmup: int = 2,
        setup: Callable[[], tuple[tuple, dict]] | None = None,
    ) -> Any:
        def timed(*args: Any, **kwargs: Any) -> Any:
            out = fn(*args, **kwargs)
            synchronize(device)
            return out

        benchmark.extra_info.update(device=str(device), threads=torch.get_num_threads())
        if device.type == "cuda":
            benchmark.extra_info["gpu"] = torch.cuda.get_device_name(device)
        if setup is not None:
            # A fresh input per round (e.g. a new autograd graph to run backward on), made off
            # the clock and synchronized so its kernels do not leak into the timed call.
            def prepared() -> tuple[tuple, dict]:
                args = setup()
                synchronize(device)
                return args

        return benchmark.pedantic(
            timed,
            setup=prepared if setup is not None else None,
            rounds=1 if quick else rounds,
            warmup_rounds=1 if quick else warmup,
            iterations=1,
        )

    return run
