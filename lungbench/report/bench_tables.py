"""Layer 10 (report): Benchmark tables: the long-form summary and the thesis's speed-up table.

The speed-up table of seed 000 (one per batch size):

                      Filters = 8                 Filters = 16
                      Exec. time (s)  Speed-up    Exec. time (s)  Speed-up    busy
    cpu (2 threads)   12.3            1.00        15.1            1.00        False
    cuda:0 H100       0.41            30.00       0.52            29.04       False

Rows are platforms (device and threads, or world size for DDP), the first row is the
baseline, and "Exec. time" is the wall time of one training epoch through the DataLoader.
Speed-up has one convention everywhere (CSV, Markdown, console, HTML, plots): the baseline's
time over the row's, two decimals, the baseline itself 1.00. `busy` says whether any of the
row's times was measured on a busy machine (lungbench.report.busy); the Markdown marks the
very cells with '*'.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pandas as pd

from lungbench.report.busy import FOOTNOTE, MARK
from lungbench.report.labels import config_label

TIME = "Exec. time (s)"
SPEEDUP = "Speed-up"
BUSY = ("busy", "")  # the speed-up table's last column

SUMMARY_COLUMNS = [
    "configuration",
    "model",
    "preset",
    "filters",
    "batch_size",
    "device",
    "platform",
    "threads_used",
    "dtype",
    "dtype_used",
    "memory_format_used",
    "compile_used",
    "status",
    "step_s_median",
    "step_s_ci_rel",
    "repeats_used",
    "repeats_stop",
    "step_s_iqr",
    "step_s_p95",
    "forward_s_median",
    "backward_s_median",
    "optimizer_s_median",
    "samples_per_s",
    "epoch_s",
    "epoch_samples",
    "epoch_data_wait_s",
    "data_bound",
    "flops_per_step",
    "achieved_flops",
    "peak_fraction",
    "step_peak_memory_mib",
    "peak_memory_bytes",
    "parameters",
    "noisy",
    "busy",
    "busy_reason",
    "error",
    "key",
]


def records_frame(records: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """Long-form table of records without the raw samples (one row per configuration)."""
    rows = [{k: v for k, v in r.items() if k != "samples_s"} for r in records]
    return pd.DataFrame(rows)


# What each long-form row repeats of its configuration.
MEASUREMENT_COLUMNS = (
    "key",
    "model",
    "preset",
    "filters",
    "batch_size",
    "device",
    "platform",
    "threads_used",
    "dtype_used",
    "memory_format_used",
    "world_size",
    "scaling",
    "status",
    "busy",
)
LONG_COLUMNS = (
    *MEASUREMENT_COLUMNS,
    "phase",
    "repeat",
    "value",
    "unit",
    "epoch_samples",
    "epoch_partial",
)


def measurements_long(records: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """The tidy form: one row per configuration x phase x repeat (seconds), and one row per
    measured epoch (with its size and whether it was a partial epoch), so pandas, R or a
    plotting tool read every timing without reshaping."""
    rows = []
    for r in records:
        base = {c: r.get(c) for c in MEASUREMENT_COLUMNS}
        samples = r.get("samples_s") or {}
        for phase, values in samples.items():
            for i, value in enumerate(values):
                rows.append({**base, "phase": phase, "repeat": i, "value": value, "unit": "s"})
        if r.get("epoch_s") is not None:
            rows.append(
                {
                    **base,
                    "phase": "epoch",
                    "repeat": 0,
                    "value": r["epoch_s"],
                    "unit": "s",
                    "epoch_samples": r.get("epoch_samples"),
                    "epoch_partial": r.get("epoch_partial"),
                }
            )
    return pd.DataFrame(rows, columns=list(LONG_COLUMNS))


def summary_table(records: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """The columns most people want, in a stable order (missing ones are left out): first
    the configuration in words (lungbench.report.labels), last its key."""
    frame = records_frame(records)
    frame.insert(0, "configuration", [config_label(r) for r in records])
    return frame[[c for c in SUMMARY_COLUMNS if c in frame.columns]]


def speedup_table(
    records: Sequence[dict[str, Any]], batch_size: int, time_column: str = "epoch_s"
) -> pd.DataFrame:
    """The thesis layout for one batch size: platforms x (filters x [time, speed-up]).

    Speed-up is the baseline row's time divided by each row's (so the baseline is 1.0);
    the baseline is the first platform measured. Failed configurations are NaN. The last
    column, busy, is True for a row with a time measured on a busy machine; which cells,
    is in table.attrs["busy_cells"] ({(platform, group)}).
    """
    frame = records_frame(records)
    frame = frame[(frame["batch_size"] == batch_size)]
    if frame.empty:
        raise ValueError(f"no records for batch size {batch_size}")
    ok = frame[frame["status"] == "ok"]
    platforms = list(dict.fromkeys(frame["platform"]))
    filters = sorted(frame["filters"].unique())
    times = ok.pivot_table(
        index="platform", columns="filters", values=time_column, aggfunc="median"
    ).reindex(index=platforms, columns=filters)
    baseline = times.iloc[0]
    columns = {}
    for f in filters:
        columns[(f"Filters = {f}", TIME)] = times[f]
        columns[(f"Filters = {f}", SPEEDUP)] = baseline[f] / times[f]
    busy = ok[ok["busy"].fillna(False).astype(bool)] if "busy" in ok else ok.iloc[:0]
    cells = {(p, f"Filters = {f}") for p, f in zip(busy["platform"], busy["filters"], strict=True)}
    columns[BUSY] = pd.Series([any(p == c[0] for c in cells) for p in platforms], index=platforms)
    table = pd.DataFrame(columns)
    table.columns = pd.MultiIndex.from_tuples(table.columns)
    table.index.name = f"Batch size = {batch_size}"
    table.attrs["busy_cells"] = cells
    return table


def filter_groups(table: pd.DataFrame) -> list[str]:
    """The 'Filters = N' column groups of a speed-up table, in order."""
    return list(dict.fromkeys(c[0] for c in table.columns if c[1] == TIME))


def speedup_text(value: float) -> str:
    """The one way a speed-up is written: two decimals ('' when not measured)."""
    return "" if pd.isna(value) else f"{value:.2f}"


def flatten_columns(table: pd.DataFrame) -> pd.DataFrame:
    """'Filters = 8 | Exec. time (s)' style single-level columns (for CSV), the speed-ups
    written with two decimals (the one convention) and the busy column last."""
    flat = table.copy()
    for column in flat.columns:
        if isinstance(column, tuple) and column[-1] == SPEEDUP:
            flat[column] = flat[column].map(speedup_text)
    if isinstance(flat.columns, pd.MultiIndex):
        flat.columns = [" | ".join(str(p) for p in c if str(p)) for c in flat.columns]
    return flat


def format_speedup_markdown(table: pd.DataFrame) -> str:
    """The speed-up table as Markdown: times in seconds, speed-ups with two decimals (the
    baseline 1.00), a busy cell marked '*' with a footnote below the table."""
    header_groups = filter_groups(table)
    busy_cells = table.attrs.get("busy_cells", set())
    lines = [
        "| "
        + table.index.name
        + " | "
        + " | ".join(f"{g}: Exec. time | {g}: Speed-up" for g in header_groups)
        + " |",
        "|---|" + "---|---|" * len(header_groups),
    ]
    for platform, row in table.iterrows():
        cells = []
        for g in header_groups:
            t, s = row[(g, TIME)], row[(g, SPEEDUP)]
            mark = MARK if (platform, g) in busy_cells else ""
            cells.append("n/a" if pd.isna(t) else f"{t:.2f}s{mark}")
            cells.append("n/a" if pd.isna(s) else f"{speedup_text(s)}{mark}")
        lines.append(f"| {platform} | " + " | ".join(cells) + " |")
    if busy_cells:
        lines += ["", FOOTNOTE]
    return "\n".join(lines)
