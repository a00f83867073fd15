"""The busy-machine detector: what else ran on the CPU while a configuration was measured.

The verdict is tested with planted readings (a fake stream of the system's CPU times, our
process tree's CPU time and a clock), so each test holds on a quiet laptop, on a busy CI
machine and on a 64-core node alike. The one test that plants real load scales it to the
cores this process may use."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from lungbench.measure.contention import (
    BUSY_CORE_SHARE,
    BUSY_OTHERS_CORES,
    ContentionWatch,
    _allowed_cpus,
    _tree_cpu_seconds,
    judge,
)


class PlantedMachine:
    """Readings of a machine over one watch: `wall` seconds pass, the cores it has are busy
    for `busy` CPU seconds in all, of which `ours` were this process tree's, and the
    hypervisor stole `steal` of `total` CPU seconds."""

    def __init__(self, wall, busy, ours, steal=0.0, cores=2):
        self.cores = cores
        self.readings = {"clock": iter([100.0, 100.0 + wall])}
        total = wall * cores
        self.readings["system"] = iter(
            [(1000.0, 10.0, 5000.0), (1000.0 + busy, 10.0 + steal, 5000.0 + total)]
        )
        self.readings["ours"] = iter([50.0, 50.0 + ours])

    def watch(self) -> ContentionWatch:
        return ContentionWatch(
            cores=self.cores,
            system=lambda: next(self.readings["system"]),
            ours=lambda: next(self.readings["ours"]),
            clock=lambda: next(self.readings["clock"]),
            load=lambda: 0.5,
        )


def _watched(machine: PlantedMachine) -> dict:
    with machine.watch() as watch:
        pass
    return watch.result


def test_quiet_machine_is_not_busy():
    # Two seconds on 2 cores; all the busy time (1.9 CPU s) was our own process tree's.
    result = _watched(PlantedMachine(wall=2.0, busy=1.9, ours=1.9))
    assert result["busy"] is False and result["busy_reason"] is None
    assert result["others_cpu_cores"] == 0.0


def test_planted_others_are_named():
    # Another job kept one core busy (2 CPU s over 2 s) beside our 1.5 CPU s.
    result = _watched(PlantedMachine(wall=2.0, busy=3.5, ours=1.5))
    assert result["busy"] is True
    assert result["others_cpu_cores"] == pytest.approx(1.0)
    assert "other processes kept 1.0 of 2 cores busy" in result["busy_reason"]


def test_planted_steal_is_named():
    result = _watched(PlantedMachine(wall=1.0, busy=1.0, ours=1.0, steal=0.4))
    assert result["busy"] is True and "stole 20%" in result["busy_reason"]


@pytest.mark.parametrize("cores", [1, 2, 14, 64])
def test_a_whole_machine_of_others_is_busy_at_any_size(cores):
    # Every core kept busy by others: busy on a laptop and on a 64-core node.
    result = _watched(PlantedMachine(wall=1.0, busy=float(cores), ours=0.0, cores=cores))
    assert result["busy"] is True, result


@pytest.mark.parametrize("cores", [2, 14, 64])
def test_daemons_below_the_limit_are_not_busy(cores):
    limit = max(BUSY_OTHERS_CORES, BUSY_CORE_SHARE * cores)
    result = _watched(PlantedMachine(wall=1.0, busy=0.9 * limit, ours=0.0, cores=cores))
    assert result["busy"] is False, result


def test_judge_rules():
    assert judge(0.1, 0.0, 2, 0.5)["busy"] is False
    assert judge(0.5, 0.0, 2, 0.5)["busy"] is True  # half a core of 2 is someone else's
    assert judge(0.5, 0.0, 64, 0.5)["busy"] is False  # daemons on a big node
    stolen = judge(0.0, 0.2, 2, 0.5)
    assert stolen["busy"] is True and "stole 20%" in stolen["busy_reason"]


# A CPU-bound loop that stops after a fixed amount of its own CPU time, not wall time: it
# burns the same CPU seconds on a quiet machine and on a busy one.
BURN = "import time\nwhile time.process_time() < {seconds}: pass"


def test_our_reaped_children_are_ours():
    """A worker that did its work and exited before the watch stopped (a DataLoader's) is
    ours: its CPU time is counted in our tree's, so it is not taken for contention."""
    me = psutil.Process()
    before = _tree_cpu_seconds(me)
    subprocess.run([sys.executable, "-c", BURN.format(seconds=0.3)], check=True)
    # the kernel counts a reaped child's time in clock ticks (10 ms): 0.3 s can read 0.29
    tick = 1 / os.sysconf("SC_CLK_TCK")
    assert _tree_cpu_seconds(me) - before >= 0.3 - 2 * tick


def _spinner(seconds: float) -> int:
    """A CPU-bound process that is not ours (a shell starts it and exits: init adopts it), as
    another user's job would be; its pid."""
    code = f"import time\nend = time.time() + {seconds}\nwhile time.time() < end: pass"
    script = f"{sys.executable} -c '{code}' >/dev/null 2>&1 & echo $!"
    return int(subprocess.run(["sh", "-c", script], capture_output=True, text=True).stdout)


def test_real_load_on_every_core_is_named():
    """Real processes, one per core this process may use: whatever else the machine runs,
    others then keep more than the limit busy."""
    cores = len(_allowed_cpus()) or os.cpu_count() or 1
    spinners = [_spinner(20) for _ in range(cores)]
    try:
        time.sleep(0.3)  # let them start spinning
        with ContentionWatch() as watch:
            time.sleep(1.0)  # our own process idles: the busy time is someone else's
    finally:
        for pid in spinners:
            os.kill(pid, signal.SIGKILL)
    result = watch.result
    assert result["busy"] is True, result
    assert "other processes kept" in result["busy_reason"]
