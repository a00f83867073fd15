"""Layer 10 (report): Write a benchmark run's tables and plots from its records (rebuildable at any time)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from lungbench.core.runs import save_figure, write_table
from lungbench.report import plots
from lungbench.report.bench_tables import BUSY as BUSY_COLUMN
from lungbench.report.bench_tables import (
    flatten_columns,
    format_speedup_markdown,
    measurements_long,
    records_frame,
    speedup_table,
    summary_table,
)
from lungbench.report.busy import busy_line, mark_figure
from lungbench.report.labels import config_label


def write_bench_outputs(run_dir: Path, records: Sequence[dict[str, Any]]) -> str:
    """Write measurements.csv, summary.csv, speedup_b*.csv/.md and plots; return the text
    to print (the speed-up tables in Markdown)."""
    if not records:
        return "no configuration was measured"
    write_table(run_dir, "measurements", measurements_long(records), index=False)
    write_table(run_dir, "configurations", records_frame(records), index=False)
    summary = summary_table(records)
    write_table(run_dir, "summary", summary, index=False)
    if not (summary["status"] == "ok").any():
        errors = sorted({str(r.get("error")) for r in records})
        return "every configuration failed: " + "; ".join(errors)
    printed = []
    epoch_measured = "epoch_s" in summary and summary["epoch_s"].notna().any()
    time_column = "epoch_s" if epoch_measured else "step_s_median"
    tables = {
        int(batch): speedup_table(records, int(batch), time_column=time_column)
        for batch in sorted(summary["batch_size"].unique())
    }
    ymax = _longest_time(tables.values())  # one time axis for the plots side by side
    for batch, table in tables.items():
        name = f"speedup_b{batch}"
        write_table(run_dir, name, flatten_columns(table))
        text = format_speedup_markdown(table)
        (run_dir / "tables" / f"{name}.md").write_text(text + "\n")
        printed.append(text)
        # A batch size where every configuration failed (out of memory, skipped) has a
        # table of n/a but nothing to plot.
        if (summary.loc[summary["batch_size"] == batch, "status"] == "ok").any():
            fig = plots.speedup_plot(table, ymax=ymax)
            if table[BUSY_COLUMN].any():  # on the plot too: a picture travels alone
                mark_figure(fig)
            save_figure(run_dir, name, fig)
    banner = busy_banner(records)
    for name, fig in (
        ("step_time", plots.step_time_plot(summary)),
        ("throughput", plots.throughput_plot(summary)),
    ):
        if banner:
            mark_figure(fig)
        save_figure(run_dir, name, fig)
    what = _timed(records) if epoch_measured else "one training step (compute only)"
    text = f"Exec. time = wall time of {what}.\n\n" + "\n\n".join(printed)
    for note in (imprecise(records), failures(records)):
        if note:
            text += "\n\n" + note
    return f"{banner}\n\n{text}" if banner else text


def imprecise(records: Sequence[dict[str, Any]]) -> str | None:
    """The configurations whose adaptive repeats stopped before the median's confidence
    interval reached its target (the time budget or the repeat limit came first)."""
    short = [r for r in records if r.get("repeats_stop") in ("max", "budget")]
    if not short:
        return None
    lines = [
        f"- {config_label(r)}: +-{100 * r['step_s_ci_rel']:.1f}% after {r.get('repeats_used')} "
        f"repeats (target +-{100 * r['ci_target']:.0f}%; stopped by "
        f"{'the repeat limit' if r['repeats_stop'] == 'max' else 'the time budget'})"
        for r in short
    ]
    return (
        "note: the median step time of these configurations is less certain than asked "
        "(95% confidence interval of the median):\n" + "\n".join(lines)
    )


def failures(records: Sequence[dict[str, Any]]) -> str | None:
    """What the n/a cells of the tables are: each configuration that did not run, and why."""
    lines = [
        f"- {config_label(r)}: {r.get('status')}: {r.get('error')}"
        for r in records
        if r.get("status") not in ("ok", None)
    ]
    return "not measured (n/a above):\n" + "\n".join(lines) if lines else None


def _longest_time(tables) -> float | None:
    """The longest time in the speed-up tables (None when none was measured)."""
    longest = max(
        (t.xs("Exec. time (s)", axis=1, level=1).max().max() for t in tables), default=None
    )
    return None if longest is None or pd.isna(longest) else float(longest)


def _timed(records: Sequence[dict[str, Any]]) -> str:
    """What the Exec. time column is: a full epoch, or (said plainly) a partial one."""
    partial = [r for r in records if r.get("epoch_partial")]
    if not partial:
        return "one training epoch"
    r = partial[0]
    return (
        f"a PARTIAL training epoch ({r.get('epoch_samples')} of "
        f"{r.get('epoch_split_samples')} training samples, --epoch-samples); the thesis's "
        "times are of full epochs"
    )


def busy_banner(records: Sequence[dict[str, Any]]) -> str | None:
    """One sentence when some configurations were measured on a busy machine, else None
    (lungbench.report.busy.busy_line; the name stays for its callers)."""
    return busy_line(records)
