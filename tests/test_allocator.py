"""The C allocator keeps the memory a step frees (lungbench.core.allocator): a step's large
tensors are not page-faulted in again every step; LUNGBENCH_MALLOC=system opts out. (Page
faults are counted by the kernel, not timed: the test does not depend on the machine's
speed.)"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from lungbench.core import allocator

# In a fresh interpreter, as a lungbench command starts: keep_freed_memory() (unless opted
# out), then training steps of the default model and width 16 at batch 24 on one thread; how many pages
# does a step fault in (its activations and gradients are tens of MiB)?
SCRIPT = """
import json, torch
from lungbench.core.allocator import keep_freed_memory, minor_page_faults
from lungbench.predict.operators import step_timer
from lungbench.measure.workload import Workload
from lungbench.step import Switches
state = keep_freed_memory()
torch.set_num_threads(1)
steps = step_timer(Workload(batch_size=24, filters=16, threads=1), Switches(), torch.device("cpu"))
steps(2)
before = minor_page_faults()
steps(2)
print(json.dumps({"state": state, "faults": (minor_page_faults() - before) / 2}))
"""


def run_script(env_value: str | None, monkeypatch) -> dict:
    if env_value is None:
        monkeypatch.delenv(allocator.ENV, raising=False)
    else:
        monkeypatch.setenv(allocator.ENV, env_value)
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, check=True
    ).stdout
    return json.loads(out)


@pytest.mark.slow
@pytest.mark.skipif(allocator._glibc() is None, reason="needs glibc")
def test_freed_memory_is_reused_without_page_faults(monkeypatch):
    kept = run_script(None, monkeypatch)
    assert kept["state"] == (
        "glibc: freed memory kept for reuse (trim threshold 1 GiB, mmap threshold 1 GiB)"
    )
    system = run_script("system", monkeypatch)
    assert system["state"] == "system default (LUNGBENCH_MALLOC=system)"
    # the dev VM: 163,000-189,000 pages a step as it comes (its 48 MiB activations are
    # above glibc's largest automatic mmap threshold), 0-11,500 kept
    assert kept["faults"] * 5 < system["faults"]


def test_the_state_is_recorded_in_the_environment():
    from lungbench.core.environment import environment_record

    assert environment_record()["malloc"] == allocator.allocator_state()


class FakeLibc:
    """mallopt as an older glibc answers it: no mmap threshold above 32 MiB."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []

    def mallopt(self, option: int, value: int) -> int:
        self.calls.append((option, value))
        return int(option != allocator.M_MMAP_THRESHOLD or value <= allocator.MMAP_CAP)


def test_an_older_glibc_gets_the_largest_mmap_threshold_it_takes(monkeypatch):
    fake = FakeLibc()
    monkeypatch.setattr(allocator, "_state", allocator._state)  # restored after the test
    monkeypatch.delenv(allocator.ENV, raising=False)
    monkeypatch.setattr(allocator, "_glibc", lambda: fake)
    state = allocator.keep_freed_memory()
    assert fake.calls[-1] == (allocator.M_MMAP_THRESHOLD, allocator.MMAP_CAP)
    assert state == (
        "glibc: freed memory kept for reuse (trim threshold 1 GiB, mmap threshold 32 MiB)"
    )
    assert allocator.allocator_state() == state
    monkeypatch.setattr(allocator, "_glibc", lambda: None)
    assert allocator.keep_freed_memory() == "system default (not glibc)"
