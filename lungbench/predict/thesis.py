"""Layer 8 (predict): seed 000's Marconi100 rows projected from a run on this machine.

The thesis timed one training epoch ("Exec. time") of its two-path 3D CNN at batch 2,
filters 8 and 16, on Marconi100 with 1 and 4 V100 SXM2 GPUs (NVLink 2.0). Here each row is
a projection: the run's measured CPU step (batch 2, or the nearest batch and width it has)
taken operator by operator to the `v100-sxm2` profile in FP32 (a V100 has no bf16), 1 rank
and 4 ranks in weak scaling (batch 2 per GPU: the thesis's split is not published), an epoch
of the run's training split (603 samples of 754), and the run's data time per sample.

Unknown, and not modelled: the thesis's exact network and input grid (the presets are
lungbench's), its framework and precision, its data pipeline and the POWER9 host's speed
(this machine's Python cost per operator stands in for it), and how its 4-GPU epoch was
split; CPU -> GPU projections are not validated on this machine.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import pandas as pd

from lungbench.predict.forecast import Prediction, Predictor, Source, Target

THESIS_BATCH = 2
THESIS_FILTERS = (8, 16)
ROWS = (("M100 (1 GPU)", 1), ("M100 (4 GPUs)", 4))
DEVICE = "v100-sxm2"
TABLE = "speedup_b2_projected"  # beside seed 000's published table (results/reference)
PROJECTED = " (projected)"


def project_m100(
    sources: Sequence[Source],
    predictor: Predictor,
    nearest: Callable[[Sequence[Source], int, int], Source],
) -> list[dict[str, Any]]:
    """One row per (platform, filters): the projected epoch, step and what limits it."""
    rows = []
    for label, ranks in ROWS:
        for filters in THESIS_FILTERS:
            source = nearest(sources, THESIS_BATCH, filters)
            target = Target(
                batch=THESIS_BATCH, filters=filters, ranks=ranks, device=DEVICE, dtype="fp32"
            )
            pred: Prediction = predictor.predict(source, target)
            rows.append(
                {"platform": label, "filters": filters, "source": source.key, **_cells(pred)}
            )
    return rows


def _cells(pred: Prediction) -> dict[str, Any]:
    return {
        "epoch_s": pred.epoch_s,
        "step_s": pred.step_s,
        "bound": pred.bound,
        "status": pred.status,
        "notes": pred.notes,
    }


def projected_table(rows: Sequence[dict[str, Any]], measured: pd.DataFrame | None) -> pd.DataFrame:
    """The projected rows in the layout of the bench's speed-up table (tables/speedup_b2):
    Exec. time is the projected epoch; Speed-up is over the run's own first row (its
    measured CPU epoch at the same width), as in the bench's table, when the run has one."""
    first = "Batch size = 2"
    table = []
    for label, _ranks in ROWS:
        line: dict[str, Any] = {first: label + PROJECTED}
        for filters in THESIS_FILTERS:
            row = next(r for r in rows if r["platform"] == label and r["filters"] == filters)
            epoch = row["epoch_s"] if row["status"] == "ok" else None
            base = _measured_epoch(measured, filters)
            line[f"Filters = {filters} | Exec. time (s)"] = epoch
            line[f"Filters = {filters} | Speed-up"] = base / epoch if base and epoch else None
        table.append(line)
    return pd.DataFrame(table)


def _measured_epoch(measured: pd.DataFrame | None, filters: int) -> float | None:
    column = f"Filters = {filters} | Exec. time (s)"
    if measured is None or column not in measured.columns or measured.empty:
        return None
    value = measured[column].iloc[0]
    return float(value) if pd.notna(value) else None
