"""Layer 10 (report): Compare two runs configuration by configuration: did B get faster or slower than A?

For every configuration key measured (status ok) in both runs:

- step time: the ratio of medians median(B) / median(A) of the raw timed repeats
  (`samples_s["step"]` of each record), with a percentile bootstrap confidence interval
  (both runs resampled with replacement); flagged "slower" / "faster" only when the interval
  excludes 1 AND the change is larger than the threshold, else "same";
- epoch time: one end-to-end epoch per record, so the ratio has no interval and is flagged
  by the threshold alone (informational: a single epoch on a shared machine is noisy).

Environments are compared too: library versions, Python, CPU model, cores, torch threads,
GPU, driver and host. A difference is a warning, since it may explain a change.

    lungbench compare results/run-a results/run-b --fail-above 10    # CI: exit 1 on >10% slower
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from lungbench.core.errors import UsageError
from lungbench.report.labels import config_label
from lungbench.report.runview import RunView

DEFAULT_THRESHOLD = 0.05  # changes within 5% are "same" whatever the interval says
DEFAULT_BOOTSTRAP = 2000
DEFAULT_CONFIDENCE = 0.95


@dataclass(frozen=True)
class Change:
    """B against A for one configuration and one timed quantity."""

    key: str
    metric: str  # "step" or "epoch"
    a_s: float  # median seconds in A
    b_s: float
    ratio: float  # b_s / a_s: > 1 means B is slower
    ci_low: float | None
    ci_high: float | None
    n_a: int
    n_b: int
    verdict: str  # "faster" | "slower" | "same" | "unreliable" | "not comparable"
    why: str = ""  # why no verdict: "busy machine", "one epoch each", ...
    label: str = ""  # the configuration in words (lungbench.report.labels); the key stays

    @property
    def change_pct(self) -> float:
        return (self.ratio - 1.0) * 100.0


@dataclass
class Comparison:
    """The result of comparing run B with run A."""

    a: str
    b: str
    changes: list[Change] = field(default_factory=list)
    only_a: list[str] = field(default_factory=list)
    only_b: list[str] = field(default_factory=list)
    # Configurations measured (ok) in A that B lost: key -> B's status (oom / error / missing).
    lost_in_b: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def counts(self, metric: str = "step") -> dict[str, int]:
        out = {"faster": 0, "slower": 0, "same": 0, "unreliable": 0, "not comparable": 0}
        for c in self.changes:
            if c.metric == metric:
                out[c.verdict] += 1
        return {k: v for k, v in out.items() if v or k in ("faster", "slower", "same")}

    def regressions(self, above_pct: float) -> list[Change]:
        """Step-time changes slower by more than `above_pct` percent whose interval excludes
        1 (the CI gate: its own bound, independent of the "same" threshold of the verdict)."""
        return [
            c
            for c in self.changes
            if c.metric == "step"
            and not c.why  # no verdict (busy machine, one sample): not a gate either
            and c.change_pct > above_pct
            and (c.ci_low is None or c.ci_low > 1.0)
        ]

    def table(self) -> pd.DataFrame:
        rows = []
        for c in self.changes:
            row = asdict(c)
            row["change_pct"] = c.change_pct
            row["configuration"] = c.label or c.key
            rows.append(row)
        columns = [
            "configuration",
            "key",
            "metric",
            "a_s",
            "b_s",
            "ratio",
            "ci_low",
            "ci_high",
            "change_pct",
            "n_a",
            "n_b",
            "verdict",
            "why",
        ]
        return pd.DataFrame(rows, columns=columns)


def bootstrap_ratio_ci(
    a: Sequence[float],
    b: Sequence[float],
    n_boot: int = DEFAULT_BOOTSTRAP,
    confidence: float = DEFAULT_CONFIDENCE,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of median(b) / median(a), resampling both samples
    independently (scipy.stats.bootstrap). A one-sample side has nothing to resample: the
    interval is then the point ratio (a caller must not read it as a verdict)."""
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if x.size == 0 or y.size == 0:
        raise ValueError("bootstrap needs at least one sample on each side")
    if x.size < 2 or y.size < 2:
        ratio = float(np.median(y) / np.median(x))
        return ratio, ratio
    result = stats.bootstrap(
        (x, y),
        _median_ratio,
        vectorized=True,
        paired=False,
        n_resamples=n_boot,
        confidence_level=confidence,
        method="percentile",
        rng=np.random.default_rng(seed),
    )
    low, high = float(result.confidence_interval.low), float(result.confidence_interval.high)
    return min(low, high), max(low, high)  # a constant sample: equal up to rounding


def _median_ratio(x: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.median(y, axis=axis) / np.median(x, axis=axis)


def verdict(ratio: float, low: float | None, high: float | None, threshold: float) -> str:
    """'same' when the interval contains 1 or the change is within the threshold."""
    if abs(ratio - 1.0) <= threshold:
        return "same"
    if low is not None and high is not None and low <= 1.0 <= high:
        return "same"
    return "slower" if ratio > 1.0 else "faster"


def compare_records(
    a: Sequence[Mapping[str, Any]],
    b: Sequence[Mapping[str, Any]],
    threshold: float = DEFAULT_THRESHOLD,
    n_boot: int = DEFAULT_BOOTSTRAP,
    confidence: float = DEFAULT_CONFIDENCE,
    seed: int = 0,
    names: tuple[str, str] = ("A", "B"),
) -> Comparison:
    """Per configuration key, B against A (records with status ok only)."""
    by_a, by_b = _ok_by_key(a), _ok_by_key(b)
    status_b = {str(r["key"]): str(r.get("status")) for r in b if r.get("key") is not None}
    result = Comparison(
        *names,
        only_a=[k for k in by_a if k not in by_b],
        only_b=[k for k in by_b if k not in by_a],
        lost_in_b={k: status_b.get(k, "missing") for k in by_a if k not in by_b},
    )
    for key in (k for k in by_a if k in by_b):
        ra, rb = by_a[key], by_b[key]
        busy = "busy machine" if ra.get("busy") or rb.get("busy") else ""
        recipe = _recipe_difference(ra, rb)
        sa, sb = _step_samples(ra), _step_samples(rb)
        if sa and sb:
            low, high = bootstrap_ratio_ci(sa, sb, n_boot, confidence, seed)
            ratio = float(np.median(sb) / np.median(sa))
            why = recipe or busy or ("one sample" if min(len(sa), len(sb)) < 2 else "")
            said = (
                "not comparable"
                if recipe
                else ("unreliable" if why else verdict(ratio, low, high, threshold))
            )
            result.changes.append(
                Change(
                    key,
                    "step",
                    float(np.median(sa)),
                    float(np.median(sb)),
                    ratio,
                    low,
                    high,
                    len(sa),
                    len(sb),
                    said,
                    why,
                    config_label(ra),
                )
            )
        ea, eb = ra.get("epoch_s"), rb.get("epoch_s")
        if _positive(ea) and _positive(eb):
            ratio = float(eb) / float(ea)
            na, nb = ra.get("epoch_samples"), rb.get("epoch_samples")
            if recipe:
                said, why = "not comparable", recipe
            elif na is not None and nb is not None and na != nb:
                said, why = "not comparable", f"epochs of {na} and {nb} samples"
            else:  # one epoch each: no spread to judge a change by
                said, why = "unreliable", busy or "one epoch each"
            label = config_label(ra)
            change = Change(key, "epoch", float(ea), float(eb), ratio, None, None, 1, 1, said, why)
            change = replace(change, label=label)
            result.changes.append(change)
    return result


def compare_runs(a: RunView, b: RunView, **kw: Any) -> Comparison:
    """compare_records on two run folders, with environment warnings. Runs of different
    kinds (a training run against a bench run) are refused: they share no measurement, and
    a comparison of nothing would pass any --fail-above."""
    if "unknown" not in (a.kind, b.kind) and a.kind != b.kind:
        raise UsageError(
            f"{a.path} is a {a.kind} run and {b.path} a {b.kind} run: compare two runs of "
            "the same kind (two bench runs, say)"
        )
    result = compare_records(a.records, b.records, names=(a.name, b.name), **kw)
    result.warnings = environment_differences(a.environment, b.environment)
    for view in (a, b):
        if view.status != "complete":
            result.warnings.append(
                f"run {view.name} is {view.status!r}, not complete: it may lack configurations"
            )
    busy = [c.key for c in result.changes if c.metric == "step" and c.why == "busy machine"]
    if busy:
        result.warnings.append(
            f"{len(busy)} configuration(s) were measured on a busy machine: no verdict on them"
        )
    if not a.records or not b.records:
        empty = a.name if not a.records else b.name
        result.warnings.append(f"run {empty} has no measurement records")
    return result


# What is compared between two environment records: label -> path of keys.
ENV_FIELDS: dict[str, tuple[str, ...]] = {
    "python": ("python",),
    "torch": ("torch", "version"),
    "CUDA": ("torch", "cuda_version"),
    "cuDNN": ("torch", "cudnn_version"),
    "CPU model": ("cpu", "model"),
    "logical cores": ("cpu", "logical_cores"),
    "usable cores": ("cpu", "affinity_cores"),
    "torch threads": ("cpu", "torch_threads"),
    "OMP_NUM_THREADS": ("cpu", "omp_num_threads"),
    "host": ("host",),
    "platform": ("platform",),
}


def environment_differences(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[str]:
    """Human-readable differences that can change timings (empty when none or unknown)."""
    if not a or not b:
        return ["environment.json missing in one run: cannot check that the machines match"]
    out = []
    for label, path in ENV_FIELDS.items():
        va, vb = _get(a, path), _get(b, path)
        if va != vb:
            out.append(f"{label} differs: {va} vs {vb}")
    libs_a, libs_b = a.get("libraries") or {}, b.get("libraries") or {}
    for name in sorted(set(libs_a) | set(libs_b)):
        if libs_a.get(name) != libs_b.get(name):
            out.append(f"{name} differs: {libs_a.get(name)} vs {libs_b.get(name)}")
    gpus_a = [(g.get("name"), g.get("driver")) for g in a.get("gpus") or []]
    gpus_b = [(g.get("name"), g.get("driver")) for g in b.get("gpus") or []]
    if gpus_a != gpus_b:
        out.append(f"GPUs differ: {gpus_a or 'none'} vs {gpus_b or 'none'}")
    return out


def format_comparison(result: Comparison) -> str:
    """A Markdown table of the changes, then the keys found in one run only."""
    lines = [
        f"B = {result.b} against A = {result.a} (ratio = B / A; > 1 is slower)",
        "",
        "| configuration | time | A | B | B/A | CI | verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in result.changes:
        ci = f"[{c.ci_low:.3f}, {c.ci_high:.3f}]" if c.ci_low is not None else "n=1"
        said = f"{c.verdict} ({c.why})" if c.why else c.verdict
        lines.append(
            f"| {_cell(c.label or c.key)} | {c.metric} | {_ms(c.a_s)} | {_ms(c.b_s)} | {c.ratio:.3f} "
            f"| {ci} | {said} |"
        )
    if not result.changes:
        lines.append("| (no configuration measured in both runs) | | | | | | |")
    failed = {k: s for k, s in result.lost_in_b.items() if s != "missing"}
    if failed:
        lines += ["", "failed in B: " + ", ".join(f"{_named(k)} ({s})" for k, s in failed.items())]
    only_a = [k for k in result.only_a if k not in failed]
    for label, keys in (("only in A", only_a), ("only in B", result.only_b)):
        if keys:
            lines += ["", f"{label}: " + "; ".join(_named(k) for k in keys)]
    return "\n".join(lines)


def _named(key: str) -> str:
    """A configuration known only by its key, in words (lungbench.report.labels)."""
    return config_label({"key": key})


# What ran, beyond the key (which says "auto" for a switch left to the device).
RAN_FIELDS = (
    "dtype_used",
    "memory_format_used",
    "compile_used",
    "optimizer_used",
    "tf32_used",
    "cudnn_benchmark_used",
    "cuda_graphs_used",
)


def _recipe_difference(a: Mapping[str, Any], b: Mapping[str, Any]) -> str:
    """'' when both ran the same switches, else which differ: times of two recipes measure
    the recipes, not the change between the runs."""
    differ = [f for f in RAN_FIELDS if f in a and f in b and a[f] != b[f]]
    if not differ:
        return ""
    name = differ[0].removesuffix("_used")
    return f"other switches ran ({name} {a[differ[0]]} vs {b[differ[0]]})"


def _ok_by_key(records: Sequence[Mapping[str, Any]]) -> dict[str, Mapping[str, Any]]:
    out: dict[str, Mapping[str, Any]] = {}
    for r in records:
        if r.get("status") == "ok" and r.get("key") is not None:
            out[str(r["key"])] = r  # a key recorded twice: the last one wins
    return out


def _step_samples(record: Mapping[str, Any]) -> list[float]:
    samples = record.get("samples_s")
    values = samples.get("step") if isinstance(samples, Mapping) else None
    if not isinstance(values, list):
        median = record.get("step_s_median")
        return [float(median)] if _positive(median) else []
    return [float(v) for v in values if _positive(v)]


def _positive(value: Any) -> bool:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return False
    return bool(np.isfinite(v) and v > 0)


def _get(data: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(data, Mapping):
            return None
        data = data.get(key)
    return data


def _cell(text: str) -> str:
    """A Markdown table cell: configuration keys are '|'-separated."""
    return text.replace("|", "\\|")


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f} ms" if seconds < 1 else f"{seconds:.3f} s"
