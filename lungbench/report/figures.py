"""Layer 10 (report): Figures the report draws from a run's records and telemetry (the run's own plots/*.png
are embedded as they are): peak memory and step time vs filters, telemetry timelines."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless clusters and CI: never need a display

import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

# Columns of a telemetry CSV that are clocks, not readings.
TIME_COLUMNS = ("t_s", "unix_s", "time", "timestamp", "elapsed_s")
MAX_TELEMETRY_PANELS = 6


def ok_frame(records: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """Successful records as a frame, without the raw samples."""
    rows = [
        {k: v for k, v in r.items() if k != "samples_s"} for r in records if r.get("status") == "ok"
    ]
    return pd.DataFrame(rows)


def memory_plot(records: Sequence[dict[str, Any]]):
    """Peak memory (MiB) vs batch size, one line per platform and filters; None if unknown."""
    frame = ok_frame(records)
    if frame.empty or "peak_memory_bytes" not in frame or "batch_size" not in frame:
        return None
    frame = frame.dropna(subset=["peak_memory_bytes"])
    if frame.empty:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for label, group in _groups(frame, ["platform", "filters"]):
        group = group.sort_values("batch_size")
        ax.plot(group["batch_size"], group["peak_memory_bytes"] / 2**20, marker="o", label=label)
    kinds = ", ".join(sorted(set(frame.get("peak_memory_kind", pd.Series(["?"])).astype(str))))
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size")
    ax.set_ylabel("peak memory (MiB)")
    ax.set_title(f"Peak memory ({kinds})")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
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
    ax.set_xscale("log", base=2)
    ax.set_xlabel("filters (base width)")
    ax.set_ylabel("training step, median (ms)")
    ax.set_title("Training step time vs filters")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
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
        len(numeric), 1, figsize=(6.4, 1.5 * len(numeric) + 0.6), sharex=True, squeeze=False
    )
    for ax, column in zip(axes[:, 0], numeric, strict=True):
        ax.plot(x, frame[column], linewidth=1)
        ax.set_ylabel(column, fontsize=7, rotation=0, ha="right", va="center")
        ax.grid(True, alpha=0.3)
    axes[-1, 0].set_xlabel(clock or "sample")
    axes[0, 0].set_title(title, fontsize=9)
    return fig


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
