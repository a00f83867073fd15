"""Layer 10 (report): Benchmark plots (PNG): step time vs batch size, throughput, and speed-up bars."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # headless clusters and CI: never need a display

import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.ticker import NullFormatter, ScalarFormatter  # noqa: E402

from lungbench.report.bench_tables import SPEEDUP, TIME, filter_groups, speedup_text  # noqa: E402


def plain_ticks(ax, values) -> None:
    """A log-2 x axis whose ticks are the measured values written plainly (2, 4, 8; not
    2^1, 2^2, 2^3), without minor ticks between them."""
    ax.set_xscale("log", base=2)
    ticks = sorted({float(v) for v in values if pd.notna(v)})
    if ticks:
        ax.set_xticks(ticks)
    formatter = ScalarFormatter()
    formatter.set_scientific(False)
    ax.xaxis.set_major_formatter(formatter)
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.xaxis.set_minor_locator(plt.NullLocator())


def step_time_plot(summary: pd.DataFrame):
    """Median step time (with IQR bars) vs batch size, one line per platform and filters."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ok = summary[summary["status"] == "ok"]
    for (platform, filters), group in ok.groupby(["platform", "filters"], sort=False):
        group = group.sort_values("batch_size")
        ax.errorbar(
            group["batch_size"],
            group["step_s_median"] * 1e3,
            yerr=group["step_s_iqr"] * 1e3 / 2,
            marker="o",
            capsize=3,
            label=f"{platform}, filters {filters}",
        )
    plain_ticks(ax, ok["batch_size"])
    ax.set_xlabel("batch size")
    ax.set_ylabel("training step, median (ms)")
    ax.set_title("Training step time (compute only, resident tensors)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def throughput_plot(summary: pd.DataFrame):
    """Samples/s vs batch size (compute-only and end-to-end epoch)."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ok = summary[summary["status"] == "ok"]
    for (platform, filters), group in ok.groupby(["platform", "filters"], sort=False):
        group = group.sort_values("batch_size")
        line = ax.plot(
            group["batch_size"],
            group["samples_per_s"],
            marker="o",
            label=f"{platform}, f{filters} compute",
        )[0]
        if "epoch_s" in group and group["epoch_s"].notna().any():
            ax.plot(
                group["batch_size"],
                group["epoch_samples"] / group["epoch_s"],
                marker="s",
                linestyle="--",
                color=line.get_color(),
                label=f"{platform}, f{filters} epoch",
            )
    plain_ticks(ax, ok["batch_size"])
    ax.set_xlabel("batch size")
    ax.set_ylabel("samples / s")
    ax.set_title("Throughput")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    return fig


def speedup_plot(table: pd.DataFrame, ymax: float | None = None):
    """Grouped bars of the time per platform and filter count on a linear scale, each bar
    labelled with its time and speed-up (a log scale shrinks the differences it shows).
    `ymax`: the top of the time axis, the same for plots shown side by side (one per batch
    size) so that equal heights mean equal times."""
    groups = filter_groups(table)
    busy_cells = table.attrs.get("busy_cells", set())
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    width = 0.8 / max(1, len(table.index))
    for i, platform in enumerate(table.index):
        times = [table.loc[platform, (g, TIME)] for g in groups]
        ups = [table.loc[platform, (g, SPEEDUP)] for g in groups]
        xs = [j + i * width for j in range(len(groups))]
        bars = ax.bar(xs, times, width, label=platform)
        for bar, seconds, up, group in zip(bars, times, ups, groups, strict=True):
            busy = (platform, group) in busy_cells
            if busy:  # hatched and starred: measured on a busy machine
                bar.set_hatch("//")
            if pd.notna(seconds):
                ax.annotate(
                    f"{seconds:.3g} s{'*' if busy else ''}"
                    + (f"\nspeed-up {speedup_text(up)}" if pd.notna(up) else ""),
                    (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center",
                    va="bottom",
                    fontsize=7,
                )
    ax.set_xticks([j + width * (len(table.index) - 1) / 2 for j in range(len(groups))], groups)
    ax.set_ylim(0, (ymax or ax.get_ylim()[1]) * 1.15)  # room for the labels
    ax.set_ylabel("Exec. time (s), linear scale")
    ax.set_title(f"Exec. time, {table.index.name.lower()}")
    ax.legend(fontsize=8)
    return fig
