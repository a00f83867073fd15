"""Layer 8 (predict): how much slower one rank's step runs when N ranks share this machine,
measured with N independent processes side by side.

Ranks on one machine are separate processes, each with its own thread pool. One process's
intra-op scaling says nothing about them: the dev box ran 2 threads of one process at
1.1-2.0x one thread's speed, yet two 1-thread processes side by side each ran at full
speed (30.7 ms a step against 33.6 ms alone), and a contention taken from the 1- and
2-thread convolution rates predicted +58% for that 2-rank run. So the contention is
measured as it happens: N worker processes (multiprocessing, spawn: no `lungbench`
command) each build the target's step at its own thread count, and in every round
worker 0 first runs a few steps alone while the others wait, then all N run together.
The factor is the median step together over the median step alone; alternating rounds
keep a drifting machine's speed on both sides of the ratio.

    factor = RankContention().factor(workload, switches, ranks=2)   # cached per host

Cached per host, torch version, workload, switches and ranks (rank_contention.json);
`fresh` measures again.
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict

import torch

from lungbench.core.cache import (
    measured_number,
    read_cache,
    register_schema,
    where_key,
    write_cache,
)
from lungbench.measure.workload import Workload
from lungbench.switches import Switches

log = logging.getLogger(__name__)

CACHE_FILE = "rank_contention.json"


def _contention_entry(entry: dict) -> bool:
    """Times alone and together (above 0), and their ratio (None when alone was 0)."""
    factor = entry["factor"]
    return (
        measured_number(entry["alone_s"], zero=True)
        and measured_number(entry["together_s"], zero=True)
        and (factor is None or measured_number(factor))
    )


register_schema(CACHE_FILE, _contention_entry)
ROUNDS = 5  # alternated alone/together rounds
STEPS = 3  # steps per worker per round (their median)
TIMEOUT_S = 600.0

# (workload, switches, ranks, rounds) -> (seconds alone, seconds together): what a
# measurement returns; tests plant their own.
Measure = Callable[[Workload, Switches, int, int], tuple[float, float]]


def _worker(workload, switches, index, rounds, barrier, results) -> None:
    """One rank's process: its own threads, its own step; timed alone (worker 0) and
    together with the others, round by round."""
    from lungbench.measure.timing import set_threads
    from lungbench.predict.operators import step_timer

    set_threads(workload.threads or 1)
    time_steps = step_timer(workload, switches, torch.device("cpu"))
    time_steps(2)  # the optimizer state is built, the caches fill
    alone, together = [], []
    for _ in range(rounds):
        barrier.wait()
        if index == 0:
            alone.append(statistics.median(time_steps(STEPS)))
        barrier.wait()
        together.append(statistics.median(time_steps(STEPS)))
    results.put((index, alone, together))


def side_by_side(
    workload: Workload, switches: Switches, ranks: int, rounds: int = ROUNDS
) -> tuple[float, float]:
    """(median step alone, median step of `ranks` processes running at once), each process
    at the workload's threads."""
    context = mp.get_context("spawn")  # a forked OpenMP pool can hang in the child
    barrier = context.Barrier(ranks)
    results = context.Queue()
    workers = [
        context.Process(target=_worker, args=(workload, switches, i, rounds, barrier, results))
        for i in range(ranks)
    ]
    for w in workers:
        w.start()
    try:
        done = [results.get(timeout=TIMEOUT_S) for _ in workers]
    finally:
        for w in workers:
            w.join(timeout=10)
            if w.is_alive():
                w.terminate()
    alone = next(a for i, a, _ in done if i == 0)
    together = [t for _, _, times in done for t in times]
    return statistics.median(alone), statistics.median(together)


def _key(workload: Workload, switches: Switches, ranks: int) -> str:
    where = where_key(torch.device("cpu")).rsplit("|", 2)  # host | cpu model | torch
    items = sorted(asdict(workload).items()), sorted(asdict(switches).items())
    return json.dumps([where[0], where[-1], ranks, str(items)])


class RankContention:
    """Per (workload, switches, ranks): the step's slow-down with `ranks` processes side by
    side, measured once per host (the cache), or once per instance with `fresh`."""

    def __init__(self, measure: Measure | None = None, fresh: bool = False) -> None:
        self.measure = measure or side_by_side  # looked up now: a test may plant its own
        self.fresh = fresh
        self.measured = 0  # measurements made (a warm cache makes none)
        self._seen: set[str] = set()

    def entry(self, workload: Workload, switches: Switches, ranks: int) -> dict[str, float]:
        """{"alone_s", "together_s", "factor"} of `ranks` processes of `workload`."""
        key = _key(workload, switches, ranks)
        cache = read_cache(CACHE_FILE)
        if key in cache and not (self.fresh and key not in self._seen):
            return cache[key]
        log.info(
            f"measuring {ranks} processes of f{workload.filters} b{workload.batch_size} "
            f"t{workload.threads} side by side (rank contention: each process starts torch, "
            "about 15-60 s, once per host and workload)"
        )
        started = time.perf_counter()
        alone, together = self.measure(workload, switches, ranks, ROUNDS)
        self.measured += 1
        cache = read_cache(CACHE_FILE)  # another process may have written meanwhile
        cache[key] = {
            "alone_s": alone,
            "together_s": together,
            "factor": together / alone if alone > 0 else None,
            "took_s": time.perf_counter() - started,
        }
        write_cache(CACHE_FILE, cache)
        self._seen.add(key)
        return cache[key]

    def factor(self, workload: Workload, switches: Switches, ranks: int) -> float | None:
        """together / alone; None when the measurement failed (no positive time)."""
        if ranks <= 1:
            return 1.0
        value = self.entry(workload, switches, ranks).get("factor")
        return float(value) if value and value > 0 else None
