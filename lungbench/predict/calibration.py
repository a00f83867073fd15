"""Layer 8 (predict): the measured errors of each kind of prediction, and the intervals made
from them.

`lungbench predict --validate` predicts, then measures, each target on this machine and
stores every case here: {"kind": "batch", "predicted_s": .., "measured_s": .., "error": ..}
(error = predicted / measured - 1). A prediction's interval comes from the signed errors of
its kind: with r = log(measured / predicted) of each case, the interval is

    [predicted * exp(r5), predicted * exp(r95)]      r5, r95: its 5th and 95th percentiles,
                                                     read as order statistics (error_bounds)

so a kind the model predicts low on this machine gets an interval reaching up, not one
centred on a value the validation says is low. A prediction that changes several things
at once combines its kinds' ends by root-sum-square; an epoch prediction adds the epoch
kind's (its data path). A kind never validated gets no interval, and says so.

Where the cases live: $LUNGBENCH_CACHE_DIR/predict_validation.json after a --validate on
this host (the last KEEP_RUNS runs' cases, pooled); else the file shipped with lungbench
(validation.json: the dev box's runs, with its host named), so a fresh install has
intervals and says whose they are. Each run is stamped with MODEL_VERSION: the errors of an
earlier model say nothing about this one's, so its runs are not pooled.
"""

from __future__ import annotations

import json
import math
import socket
from collections.abc import Iterable, Sequence
from importlib import resources
from typing import Any

from lungbench.core.cache import read_cache, write_cache

CACHE_FILE = "predict_validation.json"
KINDS = ("batch", "filters", "threads", "ranks", "device")
LOW, HIGH = 0.05, 0.95  # of log(measured / predicted): a 90% interval
MIN_CASES = 1
KEEP_RUNS = 5  # validation runs whose cases the intervals pool
# Bump when the model's predictions change (2: convolution rates per channel count).
MODEL_VERSION = 2


def shipped_cases() -> dict[str, Any]:
    text = (resources.files("lungbench.predict") / "validation.json").read_text()
    return json.loads(text)


def load_cases() -> tuple[list[dict[str, Any]], str]:
    """(cases, where they come from): this host's last --validate runs (up to KEEP_RUNS),
    else the shipped ones."""
    runs = current_runs(read_cache(CACHE_FILE).get(socket.gethostname()) or {})
    if runs:
        plural = "s" if len(runs) > 1 else ""
        return [case for run in runs for case in run["cases"]], (
            f"this host's last {len(runs)} predict --validate run{plural} "
            f"(latest {runs[-1].get('when', '?')})"
        )
    try:
        shipped = shipped_cases()
    except (OSError, ValueError):
        return [], "no validation run"
    if shipped.get("model") != MODEL_VERSION:
        return [], "no validation run of this model version"
    return shipped.get("cases", []), f"shipped validation ({shipped.get('host', '?')})"


def current_runs(entry: dict[str, Any]) -> list[dict[str, Any]]:
    """The runs of a host's entry that validated this MODEL_VERSION."""
    return [run for run in entry.get("runs", []) if run.get("model") == MODEL_VERSION]


def save_cases(cases: Sequence[dict[str, Any]], when: str) -> None:
    """Add this validation run's cases to this host's, keeping the last KEEP_RUNS runs (5
    runs: 20 cases of batch and of filters, 10 of ranks, 5 of threads)."""
    cache = read_cache(CACHE_FILE)
    runs = current_runs(cache.get(socket.gethostname()) or {})
    runs = [*runs, {"when": when, "model": MODEL_VERSION, "cases": list(cases)}][-KEEP_RUNS:]
    cache[socket.gethostname()] = {"when": when, "runs": runs}
    write_cache(CACHE_FILE, cache)


def error_bounds(cases: Iterable[dict[str, Any]]) -> dict[str, tuple[float, float]]:
    """Per kind, the ends of a distribution-free 90% prediction interval of log(measured /
    predicted) from its cases (kinds with at least MIN_CASES): the order statistics of rank
    floor((n + 1) LOW) and ceil((n + 1) HIGH), clamped to the smallest and largest. Below
    19 cases that is their whole range: interpolated percentiles of a few cases cover a
    new one less often than they claim (the dev box's last 5 validations, each left out in
    turn: 76% for interpolated 5th-95th percentiles, 86% for these)."""
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
        low = max(math.floor((n + 1) * LOW), 1)
        high = min(math.ceil((n + 1) * HIGH), n)
        bounds[kind] = (logs[low - 1], logs[high - 1])
    return bounds


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


def interval(value: float, ends: tuple[float, float] | None) -> tuple[float, float] | None:
    if ends is None:
        return None
    return value * math.exp(ends[0]), value * math.exp(ends[1])
