"""The busy-machine detector: what else ran on the CPU while a configuration was measured."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from lungbench.measure.contention import ContentionWatch, judge

SPIN = "import time\nend = time.time() + 20\nwhile time.time() < end: pass"


def _watch_for(seconds: float) -> dict:
    with ContentionWatch() as watch:
        time.sleep(seconds)  # our own process idles: all busy time is someone else's
    return watch.result


def test_quiet_machine_is_not_busy():
    result = _watch_for(0.6)
    assert result["busy"] is False and result["busy_reason"] is None
    assert result["others_cpu_cores"] < 0.3


def _spinner() -> int:
    """A CPU-bound process that is not ours (a shell starts it and exits: init adopts it),
    as another user's job would be; its pid."""
    script = f"{sys.executable} -c '{SPIN}' >/dev/null 2>&1 & echo $!"
    return int(subprocess.run(["sh", "-c", script], capture_output=True, text=True).stdout)


def test_planted_load_is_named():
    spinners = [_spinner() for _ in range(2)]
    try:
        time.sleep(0.3)  # let them start spinning
        result = _watch_for(1.0)
    finally:
        for pid in spinners:
            os.kill(pid, signal.SIGKILL)
    assert result["busy"] is True
    assert result["others_cpu_cores"] > 0.5
    assert "other processes kept" in result["busy_reason"]


def test_judge_rules():
    assert judge(0.1, 0.0, 2, 0.5)["busy"] is False
    assert judge(0.5, 0.0, 2, 0.5)["busy"] is True  # half a core of 2 is someone else's
    assert judge(0.5, 0.0, 64, 0.5)["busy"] is False  # daemons on a big node
    stolen = judge(0.0, 0.2, 2, 0.5)
    assert stolen["busy"] is True and "stole 20%" in stolen["busy_reason"]


def test_our_reaped_children_are_not_someone_else():
    """A worker that did its work and exited before the watch stopped (a DataLoader's) is
    ours: its CPU time is not counted as contention."""
    with ContentionWatch() as watch:
        subprocess.run([sys.executable, "-c", SPIN.replace("20", "1")], check=True)
    assert watch.result["busy"] is False, watch.result
