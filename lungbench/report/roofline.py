"""Layer 10 (report): the gap per operator as a plot: bars of time in the step against its bound.

`lungbench profile --roofline` writes tables/roofline.csv (lungbench.predict.roofline): per
operator its time in the step, its bound at the measured peaks and bandwidth, and its time
alone. The report draws the operators with the most time as horizontal bars, the step's
time and the bound (and the time alone, where measured) side by side on a log axis (bounds
are often 100x below the times: a linear axis would show no bound at all), and shows the
table under it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from lungbench.core.runs import save_figure

TABLE = "roofline"
TOP = 12  # operators drawn (by time in the step); the table has them all


def roofline_figure(table: pd.DataFrame, top: int = TOP):
    """Horizontal bars per operator: in step, bound, alone (ms, log axis); None when the
    table has no operator rows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    ops = table[~table.index.astype(str).str.startswith("(")].head(top)
    if ops.empty:
        return None
    y = np.arange(len(ops))
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(ops) + 1.5))
    h = 0.27
    series = (("step_ms", "in the step", "tab:red"), ("bound_ms", "bound", "tab:blue"))
    for k, (column, label, color) in enumerate((*series, ("alone_ms", "alone", "tab:gray"))):
        values = pd.to_numeric(ops[column], errors="coerce")
        values = values.where(values > 0)  # no bar where not measured (alone: not made)
        ax.barh(y + (k - 1) * h, values, height=h, label=label, color=color)
    ax.set_yticks(y, [str(n).removeprefix("aten.") for n in ops.index])
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("ms per step (log)")
    ax.set_title("time in the step against its bound, per operator")
    ax.legend(loc="lower right")
    fig.tight_layout()
    return fig


def roofline_blocks(view: Any, figure_dir: Path) -> list[dict[str, Any]]:
    """The report's blocks for a run with tables/roofline.csv, the plot and the table, as the
    fields of lungbench.report.html.Block (html builds them: importing it here would be a
    cycle)."""
    path = view.tables.get(TABLE)
    if path is None:
        return []
    table = pd.read_csv(path, index_col=0)
    blocks = []
    fig = roofline_figure(table)
    if fig is not None:
        caption = (
            "per operator: time in the step, its bound at the measured peaks and bandwidth, "
            "and its time alone (the convolutions); the gap between the bars is what fusion "
            "and a leaner step could win"
        )
        image = save_figure(figure_dir, TABLE, fig)
        blocks.append({"kind": "image", "caption": caption, "image": image})
    blocks.append(
        {"kind": "table", "caption": "the gap per operator (ms)", "table": table.round(3)}
    )
    return blocks
