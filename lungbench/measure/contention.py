"""Layer 6 (measure): is the machine busy while we measure?

With other processes on the cores a step can take 40-100x its quiet time, and the tables
still look tidy. So every configuration is measured inside `ContentionWatch`: it reads the
system's CPU times and our own process tree's (psutil) before and after, and the hypervisor's
steal time, and says how many cores other processes kept busy meanwhile:

    others_cores = (system busy time - our process tree's CPU time) / wall time

A configuration is "busy" when others kept more than BUSY_OTHERS_CORES (or BUSY_CORE_SHARE of
the cores, whichever is more) busy, or steal took more than BUSY_STEAL_SHARE of the CPU time.
The record then says so in words (`busy`, `busy_reason`), the console warns, and `compare`
declines a verdict on it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psutil

BUSY_OTHERS_CORES = 0.3  # cores other processes may use before a machine counts as busy
BUSY_CORE_SHARE = 0.15  # ... or this share of the cores (large nodes run daemons)
BUSY_STEAL_SHARE = 0.10  # share of CPU time the hypervisor may steal


def _tree_cpu_seconds(proc: psutil.Process) -> float:
    """CPU seconds of this process, its live children and the children it already reaped
    (DataLoader workers that exited before the watch stopped are ours too)."""
    total = 0.0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            t = p.cpu_times()
            total += t.user + t.system
            if p is proc:
                total += t.children_user + t.children_system
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return total


def _allowed_cpus() -> list[int]:
    """The cores this process may run on (a SLURM allocation, a container's share)."""
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []


def _system() -> tuple[float, float, float]:
    """(busy, steal, total) CPU seconds since boot over the cores this process may use:
    another job on the other cores of a shared node is not contention for us."""
    per_cpu = psutil.cpu_times(percpu=True)
    allowed = [i for i in _allowed_cpus() if i < len(per_cpu)]
    chosen = [per_cpu[i] for i in allowed] or per_cpu
    busy = steal = total = 0.0
    for t in chosen:
        idle = t.idle + getattr(t, "iowait", 0.0)
        stolen = getattr(t, "steal", 0.0)
        whole = sum(t) - getattr(t, "guest", 0.0) - getattr(t, "guest_nice", 0.0)
        busy += whole - idle - stolen
        steal += stolen
        total += whole
    return busy, steal, total


@dataclass
class ContentionWatch:
    """Measures what else ran on the CPU between `start()` and `stop()` (or as a context).

    The readings are injectable (`system`, `ours`, `clock`) so that the verdict can be tested
    with planted readings, on any machine, whatever else it is running."""

    cores: int = field(default_factory=lambda: len(_allowed_cpus()) or os.cpu_count() or 1)
    system: Callable[[], tuple[float, float, float]] = field(default=_system, repr=False)
    ours: Callable[[], float] | None = field(default=None, repr=False)
    clock: Callable[[], float] = field(default=time.perf_counter, repr=False)
    load: Callable[[], float] = field(default=lambda: os.getloadavg()[0], repr=False)
    _start: tuple[float, float, float, float, float] | None = field(default=None, repr=False)
    result: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.ours is None:
            proc = psutil.Process()
            self.ours = lambda: _tree_cpu_seconds(proc)

    def start(self) -> ContentionWatch:
        busy, steal, total = self.system()
        self._start = (self.clock(), busy, steal, total, self.ours())
        return self

    def stop(self) -> dict[str, Any]:
        assert self._start is not None, "start() first"
        wall0, busy0, steal0, total0, ours0 = self._start
        wall = max(self.clock() - wall0, 1e-9)
        busy, steal, total = self.system()
        ours = self.ours() - ours0
        others = max(0.0, (busy - busy0) - ours) / wall
        steal_share = (steal - steal0) / max(total - total0, 1e-9)
        self.result = judge(others, steal_share, self.cores, self.load())
        return self.result

    def __enter__(self) -> ContentionWatch:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def judge(others_cores: float, steal_share: float, cores: int, load1: float) -> dict[str, Any]:
    """The record fields: what was measured and, in words, whether the machine was busy."""
    limit = max(BUSY_OTHERS_CORES, BUSY_CORE_SHARE * cores)
    reasons = []
    if others_cores > limit:
        reasons.append(
            f"other processes kept {others_cores:.1f} of {cores} cores busy while it was measured"
        )
    if steal_share > BUSY_STEAL_SHARE:
        reasons.append(f"the hypervisor stole {100 * steal_share:.0f}% of the CPU time")
    return {
        "busy": bool(reasons),
        "busy_reason": "; ".join(reasons) or None,
        "others_cpu_cores": round(others_cores, 3),
        "steal_share": round(steal_share, 4),
        "load1": round(load1, 2),
        "cores": cores,
    }
