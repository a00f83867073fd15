"""Layer 6 (measure): the measured errors of each kind of prediction, and the intervals made
from them.

`lungbench predict --validate` predicts, then measures, each target on this machine and
stores every case here: {"kind": "batch", "predicted_s": .., "measured_s": .., "error": ..}
(error = predicted / measured - 1). A prediction's interval is its value times 1 +- q, with
q the 90th percentile of the absolute errors of its kind (root-sum-square when it changes
several things at once). A kind never validated gets no interval, and says so.

Where the cases live: $LUNGBENCH_CACHE_DIR/predict_validation.json after a --validate on
this host (the last KEEP_RUNS runs' cases, pooled); else the file shipped with lungbench
(validation.json: the dev box's runs, with its host named), so a fresh install has
intervals and says whose they are.
"""

from __future__ import annotations

import json
import math
import socket
from collections.abc import Iterable, Sequence
from importlib import resources
from typing import Any

import numpy as np

from lungbench.core.cache import read_cache, write_cache

CACHE_FILE = "predict_validation.json"
KINDS = ("batch", "filters", "threads", "ranks", "device")
QUANTILE = 0.9
MIN_CASES = 1
KEEP_RUNS = 5  # validation runs whose cases the intervals pool


def shipped_cases() -> dict[str, Any]:
    text = (resources.files("lungbench.measure.predict") / "validation.json").read_text()
    return json.loads(text)


def load_cases() -> tuple[list[dict[str, Any]], str]:
    """(cases, where they come from): this host's last --validate runs (up to KEEP_RUNS),
    else the shipped ones."""
    entry = read_cache(CACHE_FILE).get(socket.gethostname())
    if entry and entry.get("cases"):
        runs = len(entry.get("runs", [])) or 1
        return entry["cases"], (
            f"this host's last {runs} predict --validate run{'s' if runs > 1 else ''} "
            f"(latest {entry.get('when', '?')})"
        )
    try:
        shipped = shipped_cases()
    except (OSError, ValueError):
        return [], "no validation run"
    return shipped.get("cases", []), f"shipped validation ({shipped.get('host', '?')})"


def save_cases(cases: Sequence[dict[str, Any]], when: str) -> None:
    """Add this validation run's cases to this host's, keeping the last KEEP_RUNS runs: a
    90th percentile of two cases of a kind is their larger one, of ten a fair estimate."""
    cache = read_cache(CACHE_FILE)
    entry = cache.get(socket.gethostname()) or {}
    runs = [*entry.get("runs", []), {"when": when, "cases": list(cases)}][-KEEP_RUNS:]
    cases_kept = [case for run in runs for case in run["cases"]]
    cache[socket.gethostname()] = {"when": when, "runs": runs, "cases": cases_kept}
    write_cache(CACHE_FILE, cache)


def error_quantiles(cases: Iterable[dict[str, Any]]) -> dict[str, float]:
    """QUANTILE of |error| per kind, for kinds with at least MIN_CASES cases."""
    by_kind: dict[str, list[float]] = {}
    for case in cases:
        if case.get("measured_s") and case.get("predicted_s"):
            by_kind.setdefault(case["kind"], []).append(abs(case["error"]))
    return {
        kind: float(np.quantile(errors, QUANTILE))
        for kind, errors in by_kind.items()
        if len(errors) >= MIN_CASES
    }


def relative_width(kinds: Sequence[str], quantiles: dict[str, float]) -> float | None:
    """The interval's half-width relative to the prediction for a prediction that changes
    `kinds` (none: the source itself, width 0); None when a kind was never validated."""
    if any(k not in quantiles for k in kinds):
        return None
    return math.sqrt(sum(quantiles[k] ** 2 for k in kinds))


def interval(value: float, width: float | None) -> tuple[float, float] | None:
    if width is None:
        return None
    return max(value * (1 - width), 0.0), value * (1 + width)
