"""Layer 8 (predict): the measured errors of each kind of prediction, and the intervals made
from them.

`lungbench predict --validate` predicts, then measures, each target on this machine and
stores every case here: {"kind": "batch", "predicted_s": .., "measured_s": .., "error": ..}
(error = predicted / measured - 1). A prediction's interval comes from the signed errors of
its kind: with r = log(measured / predicted) of each case, the interval is

    [predicted * exp(r5), predicted * exp(r95)]      r5, r95: its 5th and 95th percentiles,
                                                     read as order statistics, no narrower
                                                     than a t prediction interval (error_bounds)

so a kind the model predicts low on this machine gets an interval reaching up, not one
centred on a value the validation says is low. A prediction that changes several things
at once combines its kinds' ends by root-sum-square; an epoch prediction adds the epoch
kind's (its data path). A kind never validated gets no interval, and says so.

Where the cases live: $LUNGBENCH_CACHE_DIR/predict_validation.json after a --validate on
this host (the last KEEP_RUNS runs' cases, pooled); else the file shipped with lungbench
(validation.json: the dev box's runs, with its host named), so a fresh install has
intervals and says whose they are. Each run is stamped with MODEL_VERSION: the errors of an
earlier model say nothing about this one's, so a case is pooled only when its run's model is
at least FIRST_MODEL of its kind (see MODEL_VERSION).

Where an interval comes from is part of it (`for_this_host`): on a host with no validation of
its own, the shipped cases are another machine's, and each end is widened by the spread of the
shipped hosts' median errors (one host shipped: by its median |log error|), and it says so.
"""

from __future__ import annotations

import json
import math
import socket
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

from lungbench.core.cache import measured_number, read_cache, register_schema, write_cache

CACHE_FILE = "predict_validation.json"


def _validation_entry(entry: dict) -> bool:
    """A host's validation runs: each a list of cases, each of a kind (text) with measured
    and predicted seconds that are measured numbers where present."""
    runs = entry["runs"]
    return isinstance(runs, list) and all(
        isinstance(run["cases"], list) and all(_case(c) for c in run["cases"]) for run in runs
    )


def _case(case: dict) -> bool:
    numbers = [case.get(k) for k in ("measured_s", "predicted_s") if case.get(k) is not None]
    return isinstance(case["kind"], str) and all(measured_number(n) for n in numbers)


register_schema(CACHE_FILE, _validation_entry)
KINDS = ("batch", "filters", "threads", "ranks", "device")
LOW, HIGH = 0.05, 0.95  # of log(measured / predicted): a 90% interval
MIN_CASES = 1
KEEP_RUNS = 5  # validation runs whose cases the intervals pool
# Bump when the model's predictions change (2: convolution rates per channel count; 3: ranks
# side by side as processes; 4: ranks in one Gloo group with their DDP step, the probe's
# overhead paired per round, an epoch's outside time bounded by its data wait; 5: the ranks
# side by side with the allocator every lungbench process has, over more rounds; 6: pooling
# and BatchNorm calls scaled by their ratio measured alone, as the convolutions are).
MODEL_VERSION = 6
# The first model version whose cases of a kind still describe this model ("*": any kind).
# 6 changes every kind on the CPU (a batch, width or thread change rescales the poolings and
# BatchNorms), so no earlier case is pooled.
FIRST_MODEL = {"*": 6}


def shipped_cases() -> dict[str, Any]:
    text = (resources.files("lungbench.predict") / "validation.json").read_text()
    return json.loads(text)


def pooled(cases: Iterable[dict[str, Any]], model: int | None) -> list[dict[str, Any]]:
    """The cases of a run of `model` that still describe this model (FIRST_MODEL)."""
    if model is None or model > MODEL_VERSION:
        return []
    return [c for c in cases if model >= FIRST_MODEL.get(c.get("kind"), FIRST_MODEL["*"])]


@dataclass(frozen=True)
class Calibration:
    """The cases intervals come from, where from, and how far to widen them."""

    cases: list[dict[str, Any]]
    source: str  # in words
    own_host: bool  # this host's own validation runs
    widen: float = 0.0  # added to each end of log(measured / predicted)


def for_this_host() -> Calibration:
    """This host's validation cases, else the shipped ones widened by the host spread."""
    runs = current_runs(read_cache(CACHE_FILE).get(socket.gethostname()) or {})
    own = [case for run in runs for case in pooled(run["cases"], run.get("model"))]
    if own:
        plural = "s" if len(runs) > 1 else ""
        return Calibration(
            own,
            f"this host's last {len(runs)} predict --validate run{plural} "
            f"(latest {runs[-1].get('when', '?')})",
            True,
        )
    try:
        shipped = shipped_cases()
    except (OSError, ValueError):
        return Calibration([], "no validation run", False)
    cases = pooled(shipped.get("cases", []), shipped.get("model"))
    if not cases:
        return Calibration([], "no validation run of this model version", False)
    spread, how = host_spread(cases, str(shipped.get("host", "?")))
    return Calibration(
        cases,
        f"NOT this host: no `predict --validate` here; shipped validation "
        f"({shipped.get('host', '?')}), each end widened by {100 * math.expm1(spread):.0f}% "
        f"({how}); run `lungbench predict --validate` for this host's own",
        False,
        spread,
    )


def host_spread(cases: Sequence[dict[str, Any]], default_host: str) -> tuple[float, str]:
    """(log widening, how it was found): the range of the shipped hosts' median log(measured
    / predicted), the widest over kinds; one host shipped: its median |log error|."""
    by_host: dict[tuple[str, str], list[float]] = {}
    for case in cases:
        if case.get("measured_s") and case.get("predicted_s"):
            key = (str(case.get("host", default_host)), case["kind"])
            by_host.setdefault(key, []).append(math.log(case["measured_s"] / case["predicted_s"]))
    if not by_host:
        return 0.0, "no measured cases"
    hosts = {h for h, _ in by_host}
    if len(hosts) < 2:
        logs = [abs(v) for values in by_host.values() for v in values]
        return statistics.median(logs), "one host shipped: its median |error|"
    spread = 0.0
    for kind in {k for _, k in by_host}:
        medians = [statistics.median(v) for (_, k), v in by_host.items() if k == kind]
        if len(medians) > 1:
            spread = max(spread, max(medians) - min(medians))
    return spread, f"the spread of {len(hosts)} shipped hosts' median errors"


def load_cases() -> tuple[list[dict[str, Any]], str]:
    """(cases, where they come from): this host's last --validate runs (up to KEEP_RUNS),
    else the shipped ones."""
    found = for_this_host()
    return found.cases, found.source


def current_runs(entry: dict[str, Any]) -> list[dict[str, Any]]:
    """The runs of a host's entry with cases this MODEL_VERSION still pools."""
    return [run for run in entry.get("runs", []) if pooled(run.get("cases", []), run.get("model"))]


def save_cases(cases: Sequence[dict[str, Any]], when: str) -> None:
    """Add this validation run's cases to this host's, keeping the last KEEP_RUNS runs (5
    runs: 20 cases of batch and of filters, 10 of ranks, 5 of threads)."""
    cache = read_cache(CACHE_FILE)
    runs = current_runs(cache.get(socket.gethostname()) or {})
    runs = [*runs, {"when": when, "model": MODEL_VERSION, "cases": list(cases)}][-KEEP_RUNS:]
    cache[socket.gethostname()] = {"when": when, "runs": runs}
    write_cache(CACHE_FILE, cache)


def error_bounds(cases: Iterable[dict[str, Any]]) -> dict[str, tuple[float, float]]:
    """Per kind, the ends of a 90% prediction interval of log(measured / predicted) from its
    cases (kinds with at least MIN_CASES): the order statistics of rank floor((n + 1) LOW)
    and ceil((n + 1) HIGH), clamped to the smallest and largest (below 19 cases their whole
    range), widened where it is narrower to the normal-theory prediction interval
    mean +- t(0.95, n - 1) s sqrt(1 + 1/n) (from 3 cases). The range of n cases covers a
    new one with probability (n - 1) / (n + 1) only, 67% for the 5 cases a kind gets from
    a 5-source validation; the t interval widens by what few cases cannot say. Held out:
    the dev box's previous validation run (48 cases, 5 sources, each left out in turn)
    covered 75% with the range alone and 90% with the t interval, which was chosen on the
    next run's cases (71% -> 88%)."""
    by_kind: dict[str, list[float]] = {}
    for case in cases:
        if case.get("measured_s") and case.get("predicted_s"):
            ratio = case["measured_s"] / case["predicted_s"]
            by_kind.setdefault(case["kind"], []).append(math.log(ratio))
    bounds = {}
    for kind, logs in by_kind.items():
        if len(logs) < MIN_CASES:
            continue
        logs.sort()
        n = len(logs)
        low = logs[max(math.floor((n + 1) * LOW), 1) - 1]
        high = logs[min(math.ceil((n + 1) * HIGH), n) - 1]
        if n >= 3:
            centre, spread = statistics.mean(logs), statistics.stdev(logs)
            half = _t_quantile(HIGH, n - 1) * spread * math.sqrt(1 + 1 / n)
            low, high = min(low, centre - half), max(high, centre + half)
        bounds[kind] = (low, high)
    return bounds


def _t_quantile(q: float, dof: int) -> float:
    """Student's t quantile. scipy.stats is imported here, not at the top: it costs about a
    second of start-up, which every `predict` and `bench` would pay for a few intervals."""
    from scipy.stats import t

    return float(t.ppf(q, dof))


def log_bounds(
    kinds: Sequence[str], bounds: dict[str, tuple[float, float]]
) -> tuple[float, float] | None:
    """(low, high) of log(measured / predicted) for a prediction that changes `kinds`: each
    end the root-sum-square of the kinds' ends on its side (none: the source itself, (0,
    0)); None when a kind was never validated."""
    if any(k not in bounds for k in kinds):
        return None
    low = math.sqrt(sum(min(bounds[k][0], 0.0) ** 2 for k in kinds))
    high = math.sqrt(sum(max(bounds[k][1], 0.0) ** 2 for k in kinds))
    return -low, high


def widened(ends: tuple[float, float] | None, by: float) -> tuple[float, float] | None:
    """`ends` of log(measured / predicted), each moved `by` outwards."""
    return None if ends is None else (ends[0] - by, ends[1] + by)


def interval(value: float, ends: tuple[float, float] | None) -> tuple[float, float] | None:
    if ends is None:
        return None
    return value * math.exp(ends[0]), value * math.exp(ends[1])
