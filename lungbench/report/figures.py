"""Layer 10 (report): Figures the report draws from a run's records and telemetry (the run's own plots/*.png
are embedded as they are): the step's own peak memory and step time vs filters, telemetry
timelines. Axes carry units and plain numbers (no 2^k ticks, no '+1.26e9' offsets); a plot of
a configuration measured on a busy machine carries the busy line (lungbench.report.busy)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless clusters and CI: never need a display

import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.ticker import ScalarFormatter  # noqa: E402

from lungbench.report.busy import busy_records, mark_figure  # noqa: E402
from lungbench.report.plots import plain_ticks  # noqa: E402

# Columns of a telemetry CSV that are clocks, not readings.
TIME_COLUMNS = ("t_s", "unix_s", "time", "timestamp", "elapsed_s")
MAX_TELEMETRY_PANELS = 6
MIB = 2**20
# Telemetry columns: what each reading is, in words with its unit, and its scale to that unit.
TELEMETRY_LABELS = {
    "cpu_percent": ("all cores busy (%)", 1.0),
    "process_cpu_percent": ("this process (% of one core)", 1.0),
    "rss_bytes": ("process memory, RSS (MiB)", 1 / MIB),
    "gpu_util_percent": ("GPU busy (%)", 1.0),
    "gpu_memory_bytes": ("GPU memory (MiB)", 1 / MIB),
    "gpu_power_w": ("GPU power (W)", 1.0),
    "gpu_temperature_c": ("GPU temperature (°C)", 1.0),
}


def ok_frame(records: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """Successful records as a frame, without the raw samples."""
    rows = [
        {k: v for k, v in r.items() if k != "samples_s"} for r in records if r.get("status") == "ok"
    ]
    return pd.DataFrame(rows)


def memory_plot(records: Sequence[dict[str, Any]]):
    """The training step's own peak memory (MiB, from zero) vs batch size, one line per
    platform and filters; a run recorded before that field shows the process's peak RSS
    instead, said in the title. None when neither is known."""
    frame = ok_frame(records)
    column, scale, title = "step_peak_memory_mib", 1.0, "Training step's own peak memory"
    if "step_peak_memory_mib" not in frame or frame["step_peak_memory_mib"].isna().all():
        column, scale, title = "peak_memory_bytes", 1 / MIB, "Process peak memory (RSS)"
    if frame.empty or column not in frame or "batch_size" not in frame:
        return None
    frame = frame.dropna(subset=[column])
    if frame.empty:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for label, group in _groups(frame, ["platform", "filters"]):
        group = group.sort_values("batch_size")
        ax.plot(group["batch_size"], group[column] * scale, marker="o", label=label)
    plain_ticks(ax, frame["batch_size"])
    ax.set_ylim(bottom=0)  # from zero: a 0.5% change must not look like a trend
    ax.set_xlabel("batch size")
    ax.set_ylabel("peak memory (MiB)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    if busy_records(frame.to_dict("records")):
        mark_figure(fig)
    return fig


def filters_plot(records: Sequence[dict[str, Any]]):
    """Median step time vs filters, one line per platform and batch size; None if < 2 filters."""
    frame = ok_frame(records)
    if frame.empty or "filters" not in frame or frame["filters"].nunique() < 2:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for label, group in _groups(frame, ["platform", "batch_size"]):
        group = group.sort_values("filters")
        ax.plot(group["filters"], group["step_s_median"] * 1e3, marker="o", label=label)
    plain_ticks(ax, frame["filters"])
    ax.set_xlabel("filters (base width)")
    ax.set_ylabel("training step, median (ms)")
    ax.set_title("Training step time vs filters")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    if busy_records(frame.to_dict("records")):
        mark_figure(fig)
    return fig


def telemetry_plot(frame: pd.DataFrame, title: str):
    """One panel per reading (up to MAX_TELEMETRY_PANELS) against time; None if no readings."""
    clock = next((c for c in TIME_COLUMNS if c in frame), None)
    numeric = [
        c
        for c in frame.select_dtypes("number").columns
        if c not in TIME_COLUMNS and frame[c].notna().any()
    ]
    if not numeric:
        return None
    numeric = numeric[:MAX_TELEMETRY_PANELS]
    x = frame[clock] if clock else pd.Series(range(len(frame)))
    fig, axes = plt.subplots(
        len(numeric), 1, figsize=(6.4, 1.3 * len(numeric) + 0.6), sharex=True, squeeze=False
    )
    for ax, column in zip(axes[:, 0], numeric, strict=True):
        label, scale = telemetry_label(column)
        ax.plot(x, frame[column] * scale, linewidth=1)
        ax.set_title(label, fontsize=8, loc="left")
        plain = ScalarFormatter(useOffset=False)  # no '+1.26e9' above the axis
        plain.set_scientific(False)
        ax.yaxis.set_major_formatter(plain)
        ax.tick_params(labelsize=7)
        ax.grid(True, alpha=0.3)
    axes[-1, 0].set_xlabel("time since the start (s)" if clock == "t_s" else clock or "sample")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def telemetry_label(column: str) -> tuple[str, float]:
    """(what the reading is, with its unit; the factor to that unit) for a telemetry column:
    a known one in words, a per-core one ('cpu3_percent') as such, others by their suffix."""
    if column in TELEMETRY_LABELS:
        return TELEMETRY_LABELS[column]
    core = column.removeprefix("cpu").removesuffix("_percent")
    if column.startswith("cpu") and column.endswith("_percent") and core.isdigit():
        return f"core {core} busy (%)", 1.0
    if column.endswith("_bytes"):
        return f"{column.removesuffix('_bytes').replace('_', ' ')} (MiB)", 1 / MIB
    if column.endswith("_percent"):
        return f"{column.removesuffix('_percent').replace('_', ' ')} (%)", 1.0
    return column.replace("_", " "), 1.0


def _groups(frame: pd.DataFrame, columns: list[str]):
    present = [c for c in columns if c in frame]
    if not present:
        yield "all", frame
        return
    for values, group in frame.groupby(present, sort=False):
        values = values if isinstance(values, tuple) else (values,)
        yield (
            ", ".join(
                f"{c} {v}" if c != "platform" else str(v)
                for c, v in zip(present, values, strict=True)
            ),
            group,
        )
