"""Layer 8 (predict): how much slower one rank's step runs when N ranks share this machine,
and what its DDP step adds beyond that, measured with N processes side by side.

Ranks on one machine are separate processes, each with its own thread pool. One process's
intra-op scaling says nothing about them: the dev box ran 2 threads of one process at
1.1-2.0x one thread's speed, yet two 1-thread processes side by side each ran at full
speed (30.7 ms a step against 33.6 ms alone), and a contention taken from the 1- and
2-thread convolution rates predicted +58% for that 2-rank run. So the contention is
measured as it happens: N worker processes (multiprocessing, spawn: no `lungbench`
command) join one Gloo group and each builds the target's step at its own thread count.
In every round
  * worker 0 runs a few plain steps alone while the others wait (alone);
  * all N run the step's compute together, each step started at once on every rank and
    its time the slowest rank's, since a DDP step ends when the slowest rank does
    (together: forward and backward under no_sync, then the optimizer);
  * all N run the DDP step itself (ddp: the gradient all-reduce, DDP's hooks, and the
    Gloo threads waiting for cores the ranks hold).
A DDP step's loss beyond its compute is model-dependent (the dev box: 7.7 ms for f8 b2
against 4.5 ms for the tiny model the per-host probe used), so it is measured here on the
target's own model. Each ratio is the median over rounds of that round's ratio: a machine
whose speed drifts moves both sides of it together.

How many rounds: at least ROUNDS, then on until the median of the rounds' DDP-step-over-alone
ratios (what a rank prediction scales its source by) is known within +-RULE.ci_target at 95%,
or RULE.max_repeats rounds or RULE.budget_s seconds have passed. A fixed 12 rounds left that
ratio about +-10% (95%) on the noisy dev VM: six measurements of one workload within ten
minutes read 1.14-1.31, and the cache keeps one of them for every later prediction. The
workers share each round's times (a Gloo all-gather, off the clock), so all decide alike.

    share = RankContention().entry(workload, switches, ranks=2)   # cached per host
    share["factor"]          # together / alone
    share["communication"]   # (ddp - together) / alone

Cached per host, torch version, workload, switches and ranks (rank_contention.json);
`fresh` measures again. A failed measurement is not cached.
"""

from __future__ import annotations

import json
import logging
import math
import multiprocessing as mp
import queue
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from datetime import timedelta
from typing import Any

import torch

from lungbench.core.cache import (
    measured_number,
    read_cache,
    register_schema,
    where_key,
    write_cache,
)
from lungbench.core.errors import message_of
from lungbench.measure.contention import ContentionWatch
from lungbench.measure.stats import median_ci_relative
from lungbench.measure.timing import StopRule, stop_reason
from lungbench.measure.workload import Workload
from lungbench.switches import Switches

log = logging.getLogger(__name__)

CACHE_FILE = "rank_contention.json"


def _contention_entry(entry: dict) -> bool:
    """Times alone, together and under DDP and the contention factor (above 0), and the
    communication share (of either sign: 0 or less is a measurement problem forecast says
    in words); where it says how well its ratio is known ("ratio_ci"), over how many rounds.
    An entry from before the DDP step was measured lacks "ddp_s": measured again."""
    times = (entry["alone_s"], entry["together_s"], entry["ddp_s"], entry["factor"])
    share = entry["communication"]
    busy = entry.get("busy_reason")
    ci = entry.get("ratio_ci")
    return (
        all(measured_number(t) for t in times)
        and measured_number(abs(share), zero=True)
        and (busy is None or isinstance(busy, str))
        and (
            ci is None or (measured_number(ci, zero=True) and measured_number(entry.get("rounds")))
        )
        and isinstance(entry.get("stop", ""), str)
    )


register_schema(CACHE_FILE, _contention_entry)
ROUNDS = 12  # alternated alone/together/ddp rounds, at least
# ... and on until the ratio's median is known within +-5% (module doc). On the dev VM two
# validation runs' 14 measurements took 12-48 rounds (16-64 s with start-up); 10 reached
# +-5%, 4 stopped at 48 rounds with +-6-7%. The budget caps a large workload's.
RULE = StopRule(ci_target=0.05, max_repeats=48, budget_s=60.0)
# A ratio known less well than this gets a warning in words: 12 rounds, what the shipped
# validation's measurements had, left it about +-10% on the dev VM.
NOISY_RATIO_CI = 0.10
STEPS = 3  # steps per worker per phase and round
WARM_STEPS = 2  # untimed: the optimizer state is built, the caches fill
# Bump when the measurement changes, so entries measured before are measured again
# (2: the workers keep freed memory as lungbench processes do, 12 rounds; 3: the DDP model
# laid out in its memory format before DDP builds its buckets, as bench's ranks do; 4: rounds
# until the ratio is known within RULE.ci_target).
MEASURE_VERSION = 4
TIMEOUT_S = 600.0  # the whole measurement; a lost worker breaks the others' barrier
POLL_S = 1.0  # how often the parent looks for a worker that ended without answering


@dataclass(frozen=True)
class RankTimes:
    """Median seconds of one step: one process alone, N processes' compute together (the
    slowest rank's), and N processes' DDP step; and the ratios the model uses, each the
    median over rounds of that round's ratio (paired within a round, so a machine whose
    speed drifts from round to round moves both sides of each ratio together)."""

    alone_s: float
    together_s: float
    ddp_s: float
    factor: float  # together / alone
    communication: float  # (ddp - together) / alone
    allocator: str = ""  # how the workers' C allocator treated freed memory, in words
    rounds: int = 0  # rounds measured
    # The DDP-step-over-alone median's 95% half-width, relative (None: too few rounds).
    ratio_ci: float | None = None
    stop: str = ""  # why the rounds ended: a key of lungbench.measure.timing.STOPS


# (workload, switches, ranks, rounds) -> RankTimes: what a measurement returns; tests plant
# their own.
Measure = Callable[[Workload, Switches, int, int], RankTimes]


class _Rank:
    """One worker's steps: a plain one (timed alone) and a DDP-wrapped one."""

    def __init__(self, workload: Workload, switches: Switches, index: int, ranks: int) -> None:
        from lungbench.distributed.group import DistContext
        from lungbench.step import TrainStep, bce_loss, distributed_model

        cpu = torch.device("cpu")
        self.inputs, self.target = workload.random_batch(cpu, workload.seed + 1000 * index)
        self.plain = TrainStep(workload.build_model(cpu), bce_loss, switches, cpu)
        dist = DistContext(rank=index, world_size=ranks, backend="gloo")
        # built as bench's ranks build theirs
        ddp = distributed_model(workload.build_model(cpu), dist, switches)
        self.ddp = TrainStep(ddp, bce_loss, switches, cpu)
        self.inputs = self.plain.prepare_inputs(self.inputs)

    def plain_step(self) -> None:
        from lungbench.step import NO_TIMER

        self.plain(NO_TIMER, self.inputs, self.target)

    def compute_step(self) -> None:
        """The DDP step's compute: forward and backward with no gradient all-reduce, then the
        optimizer."""
        from lungbench.step import NO_TIMER

        self.ddp.forward_backward(NO_TIMER, self.inputs, self.target, sync=False)
        self.ddp.optimizer_step(NO_TIMER)

    def ddp_step(self) -> None:
        from lungbench.step import NO_TIMER

        self.ddp(NO_TIMER, self.inputs, self.target)


def _timed(run: Callable[[], None], steps: int, barrier) -> list[float]:
    """Seconds of `steps` calls of `run`, each started when every worker reached the
    barrier (None: this worker runs alone, the others wait at the next barrier)."""
    times = []
    for _ in range(steps):
        if barrier is not None:
            barrier.wait()
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return times


def _round_ratio(alone: list[float], ddp: list[list[float]]) -> float:
    """One round's DDP step (the slowest rank's, step by step) over worker 0's step alone."""
    return _slowest(ddp) / statistics.median(alone)


def _shared_round(alone: list[float], ddp: list[float], spent: float):
    """What the stop rule needs of this round, the same on every worker: worker 0's steps
    alone, every worker's DDP steps, and worker 0's seconds of rounds so far."""
    import torch.distributed as tdist

    mine = torch.tensor([*(alone or [0.0] * STEPS), *ddp, spent], dtype=torch.float64)
    everyone = [torch.empty_like(mine) for _ in range(tdist.get_world_size())]
    tdist.all_gather(everyone, mine)
    rows = [t.tolist() for t in everyone]
    return rows[0][:STEPS], [r[STEPS : 2 * STEPS] for r in rows], rows[0][-1]


def _measure_rank(workload, switches, index, ranks, port, rounds, rule, barrier) -> dict:
    """This worker's step times, per phase a list of rounds, each a list of steps; at least
    `rounds` rounds, then on by `rule` (the module doc). "stop" says why they ended."""
    from lungbench.core.allocator import keep_freed_memory
    from lungbench.measure.timing import set_threads
    from lungbench.switches import backend_flags

    # As every lungbench process does (lungbench.cli): without it each step page-faults its
    # freed activations in again, and a worker's step alone ran 5-20% slower than the
    # bench's.
    allocator = keep_freed_memory()
    set_threads(workload.threads or 1)
    torch.distributed.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=index,
        world_size=ranks,
        timeout=timedelta(seconds=TIMEOUT_S),
    )
    try:
        rank = _Rank(workload, switches, index, ranks)
        times: dict[str, Any] = {"alone": [], "together": [], "ddp": [], "allocator": allocator}
        with backend_flags(switches):
            if index == 0:
                _timed(rank.plain_step, WARM_STEPS, None)
            _timed(rank.compute_step, WARM_STEPS, barrier)
            _timed(rank.ddp_step, WARM_STEPS, barrier)
            started, ratios = time.perf_counter(), []
            while True:
                barrier.wait()
                alone = _timed(rank.plain_step, STEPS, None) if index == 0 else []
                together = _timed(rank.compute_step, STEPS, barrier)
                ddp = _timed(rank.ddp_step, STEPS, barrier)
                for phase, steps in (("alone", alone), ("together", together), ("ddp", ddp)):
                    if steps:
                        times[phase].append(steps)
                alone, every_ddp, spent = _shared_round(alone, ddp, time.perf_counter() - started)
                ratios.append(_round_ratio(alone, every_ddp))
                times["stop"] = stop_reason(ratios, rounds, rule, spent)
                if times["stop"] is not None:
                    return times
    finally:
        torch.distributed.destroy_process_group()


def _worker(workload, switches, index, ranks, port, rounds, rule, barrier, results) -> None:
    """One rank's process: its times, or the one line that says why it failed (the barrier
    broken, so the other workers stop waiting)."""
    try:
        times = _measure_rank(workload, switches, index, ranks, port, rounds, rule, barrier)
        results.put((index, times))
    except Exception as exc:  # noqa: BLE001 - any failure is reported, not raised, in a worker
        barrier.abort()
        results.put((index, message_of(exc)))


def _slowest(per_worker: list[list[float]]) -> float:
    """Median over steps of the slowest worker's time at each step."""
    return statistics.median(max(step) for step in zip(*per_worker, strict=True))


def rank_times(alone: list[list[float]], together: list[list[list[float]]], ddp) -> RankTimes:
    """RankTimes from worker 0's plain steps per round (`alone`) and every worker's steps
    per round (`together`, `ddp`: [worker][round][step])."""

    def per_round(phase):
        return [_slowest([worker[r] for worker in phase]) for r in range(len(alone))]

    alone_r = [statistics.median(steps) for steps in alone]
    together_r = per_round(together)
    ddp_r = per_round(ddp)
    ratios = [_round_ratio(alone[r], [worker[r] for worker in ddp]) for r in range(len(alone))]
    return RankTimes(
        alone_s=statistics.median(alone_r),
        together_s=statistics.median(together_r),
        ddp_s=statistics.median(ddp_r),
        factor=statistics.median(t / a for t, a in zip(together_r, alone_r, strict=True)),
        communication=statistics.median(
            (d - t) / a for d, t, a in zip(ddp_r, together_r, alone_r, strict=True)
        ),
        rounds=len(alone),
        ratio_ci=None if math.isnan(ci := median_ci_relative(ratios)) else ci,
    )


def side_by_side(
    workload: Workload, switches: Switches, ranks: int, rounds: int = ROUNDS
) -> RankTimes:
    """Steps of `ranks` processes side by side, each at the workload's threads, at least
    `rounds` rounds and on by RULE, as it is when called (module doc). Raises RuntimeError
    with the first worker's reason when a worker failed."""
    from lungbench.distributed.launch import free_port

    context = mp.get_context("spawn")  # a forked OpenMP pool can hang in the child
    barrier = context.Barrier(ranks, timeout=TIMEOUT_S)
    results = context.Queue()
    port = free_port()
    workers = [
        context.Process(
            target=_worker,
            args=(workload, switches, i, ranks, port, rounds, RULE, barrier, results),
        )
        for i in range(ranks)
    ]
    for w in workers:
        w.start()
    try:
        done = _answers(workers, results, TIMEOUT_S)
    finally:
        _stop(workers)
    failed = [why for why in done.values() if isinstance(why, str)]
    if failed:
        raise RuntimeError(failed[0])
    times = rank_times(
        done[0]["alone"],
        [done[i]["together"] for i in range(ranks)],
        [done[i]["ddp"] for i in range(ranks)],
    )
    return replace(times, allocator=done[0]["allocator"], stop=done[0]["stop"])


def _answers(workers: list, results, timeout_s: float) -> dict[int, Any]:
    """{worker index: its times or why it failed}, waiting up to `timeout_s` in all.
    A worker that ended without answering (it could not start: a spawned process re-imports
    the caller's __main__, which a `python -` script does not have; or it was killed) is
    said at once, not waited out: the others would wait at their barrier until the timeout."""
    deadline = time.monotonic() + timeout_s
    done: dict[int, Any] = {}
    while len(done) < len(workers):
        try:
            index, answer = results.get(timeout=POLL_S)
            done[index] = answer
            continue
        except queue.Empty:
            pass
        ended = [i for i, w in enumerate(workers) if i not in done and w.exitcode is not None]
        if ended:
            done.update(_drained(results))  # an answer sent just before its worker ended
            lost = [i for i in ended if i not in done]
            if lost:
                code = workers[lost[0]].exitcode
                raise RuntimeError(
                    f"process {lost[0] + 1} of {len(workers)} ended (exit code {code}) "
                    "without an answer (if it could not start: a spawned process imports "
                    "its caller's main module, so call this from a file, not from stdin)"
                )
        if time.monotonic() > deadline:
            raise RuntimeError(f"no answer from the {len(workers)} processes in {timeout_s:.0f} s")
    return done


def _drained(results) -> dict[int, Any]:
    """The answers already in the queue."""
    answers = {}
    while True:
        try:
            index, answer = results.get(timeout=0.5)
        except queue.Empty:
            return answers
        answers[index] = answer


def _stop(workers: list) -> None:
    """Every worker ended: joined, or terminated after a grace period."""
    deadline = time.monotonic() + 10.0
    for w in workers:
        w.join(timeout=max(0.1, deadline - time.monotonic()))
        if w.is_alive():
            w.terminate()
            w.join(timeout=5)


def precision_words(entry: dict) -> str:
    """ ", over N rounds, +-x% at 95%" of a cache entry: how well its ratio is known."""
    rounds, ci = entry.get("rounds"), entry.get("ratio_ci")
    if not rounds:
        return ""
    return f", over {rounds} rounds" + ("" if ci is None else f", +-{100 * ci:.1f}% at 95%")


def _key(workload: Workload, switches: Switches, ranks: int) -> str:
    where = where_key(torch.device("cpu")).rsplit("|", 2)  # host | cpu model | torch
    items = sorted(asdict(workload).items()), sorted(asdict(switches).items())
    return json.dumps([where[0], where[-1], ranks, str(items), f"v{MEASURE_VERSION}"])


class RankContention:
    """Per (workload, switches, ranks): the step's slow-down with `ranks` processes side by
    side and what their DDP step adds, measured once per host (the cache), or once per
    instance with `fresh`."""

    def __init__(self, measure: Measure | None = None, fresh: bool = False) -> None:
        self.measure = measure or side_by_side  # looked up now: a test may plant its own
        self.fresh = fresh
        self.measured = 0  # measurements made (a warm cache makes none)
        self._seen: set[str] = set()

    def entry(self, workload: Workload, switches: Switches, ranks: int) -> dict | None:
        """{"alone_s", "together_s", "ddp_s", "factor", "communication"} of `ranks`
        processes of `workload`; None when they could not be timed (said in the log)."""
        key = _key(workload, switches, ranks)
        cache = read_cache(CACHE_FILE)
        if key in cache and not (self.fresh and key not in self._seen):
            return cache[key]
        log.info(
            f"measuring {ranks} processes of f{workload.filters} b{workload.batch_size} "
            f"t{workload.threads} side by side, alone, together and under DDP (rank "
            f"contention: each process starts torch, then {ROUNDS}-{RULE.max_repeats} rounds "
            f"until the ratio is known within +-{100 * RULE.ci_target:.0f}%, at most "
            f"{RULE.budget_s:.0f} s of them; once per host and workload)"
        )
        started = time.perf_counter()
        try:
            times, busy = self._measure_quiet(workload, switches, ranks)
        except (RuntimeError, OSError, ValueError) as exc:
            log.warning(f"note: {ranks} processes side by side could not be timed: {exc}")
            return None
        entry = {**asdict(times), "took_s": time.perf_counter() - started, "busy_reason": busy}
        cache = read_cache(CACHE_FILE)  # another process may have written meanwhile
        cache[key] = entry
        write_cache(CACHE_FILE, cache)
        self._seen.add(key)
        return entry

    def _measure_quiet(
        self, workload: Workload, switches: Switches, ranks: int
    ) -> tuple[RankTimes, str | None]:
        """The times, and why they count as measured while busy (None: quiet). Other work on
        the cores moves these ratios most of all (a 10 s test run beside one measurement
        made its ranks 1.89x slower together than alone, where quiet ones read 1.03-1.06x),
        so a busy measurement is taken once more, and the second kept either way."""
        times, busy = self._watched(workload, switches, ranks)
        if busy is not None:
            log.warning(f"note: {ranks} processes side by side ran while busy ({busy}); again")
            times, busy = self._watched(workload, switches, ranks)
        return times, busy

    def _watched(
        self, workload: Workload, switches: Switches, ranks: int
    ) -> tuple[RankTimes, str | None]:
        with ContentionWatch() as watch:  # the workers are our children: not "others"
            times = self.measure(workload, switches, ranks, ROUNDS)
        self.measured += 1
        return times, watch.result.get("busy_reason") if watch.result.get("busy") else None
