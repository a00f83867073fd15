"""Layer 10 (report): The busy mark, wherever a measurement is read.

A configuration measured while other processes used the cores (lungbench.measure.contention:
records carry `busy` and `busy_reason`) is marked on everything that shows it: a `busy`
column in the CSVs, a '*' after its cells in the Markdown and console tables with a footnote,
a red line on the plots, and one line in the HTML report linking to the details.

    busy_line(records)     # one sentence, or None when nothing was busy
    busy_details(records)  # configuration, key, reason: one row per busy configuration
    mark_figure(fig)       # the red line on a plot (a picture travels without its table)
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import pandas as pd

from lungbench.report.labels import config_label

MARK = "*"
FOOTNOTE = f"{MARK} measured while the machine was busy: not trustworthy, measure again."
FIGURE_TEXT = "machine busy while measured: times not trustworthy"


def busy_records(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in records if r.get("busy")]


def busy_line(records: Sequence[dict[str, Any]], short: bool = False) -> str | None:
    """'WARNING: the machine was busy during 2 of 4 configurations (other processes used up
    to 1.6 of 2 cores): their times are not trustworthy; measure again on a quiet machine.'
    `short`: the HTML banner's line, which links to the details instead."""
    busy = busy_records(records)
    if not busy:
        return None
    if short:
        return (
            f"Machine busy during {len(busy)} of {len(records)} configurations "
            f"({_worst(busy).replace('other processes', 'others')}): their times are not trustworthy."
        )
    return (
        f"WARNING: the machine was busy during {len(busy)} of {len(records)} configurations "
        f"({_worst(busy)}): their times are not trustworthy; measure again on a quiet machine."
    )


def _worst(busy: Sequence[dict[str, Any]]) -> str:
    """The largest contention among `busy`, in one phrase (not one fragment per record)."""
    words = []
    others = [r.get("others_cpu_cores") for r in busy]
    others = [float(v) for v in others if isinstance(v, (int, float))]
    if others:
        cores = max((int(r["cores"]) for r in busy if isinstance(r.get("cores"), int)), default=0)
        of = f" of {cores}" if cores else ""
        words.append(f"other processes used up to {max(others):.1f}{of} cores")
    steal = [float(r["steal_share"]) for r in busy if isinstance(r.get("steal_share"), float)]
    if steal and max(steal) > 0.1:
        words.append(f"the hypervisor stole up to {100 * max(steal):.0f}% of the CPU time")
    if words:
        return "; ".join(words)
    # records without the figures: their reasons, with the numbers folded together
    reasons = {re.sub(r"[0-9.]+", "N", str(r.get("busy_reason"))) for r in busy}
    return "; ".join(sorted(reasons))


def busy_details(records: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """One row per busy configuration: its label, its key and why it counts as busy."""
    rows = [
        {"configuration": config_label(r), "key": r.get("key"), "why busy": r.get("busy_reason")}
        for r in busy_records(records)
    ]
    return pd.DataFrame(rows, columns=["configuration", "key", "why busy"])


def mark_figure(fig: Any) -> None:
    """The red line at the top of a plot of busy measurements."""
    fig.text(0.01, 0.995, FIGURE_TEXT, color="red", va="top", fontsize=8)
