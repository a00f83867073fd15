"""Layer 8 (report): The seeds' published tables (results/reference/), matched to a run's tables by name.

A reference file `seedNNN_NAME.csv` belongs next to a run's `tables/NAME.csv`: e.g.
`seed000_speedup_b2.csv` (the thesis's speed-up table) next to `speedup_b2.csv`, and
`seed000_auc.csv` next to the LUNGx experiment's `auc.csv`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

REFERENCE_PATTERN = re.compile(r"^(seed\d{3})_(.+)$")


def default_reference_dir() -> Path | None:
    """results/reference/ of the checkout lungbench runs from (None when installed elsewhere)."""
    folder = Path(__file__).resolve().parents[2] / "results" / "reference"
    return folder if folder.is_dir() else None


def reference_tables(folder: str | os.PathLike | None) -> dict[str, list[tuple[str, Path]]]:
    """Table name -> [(seed, path)] for every `seedNNN_NAME.csv` in `folder`."""
    if folder is None or not Path(folder).is_dir():
        return {}
    found: dict[str, list[tuple[str, Path]]] = {}
    for path in sorted(Path(folder).glob("seed*_*.csv")):
        match = REFERENCE_PATTERN.match(path.stem)
        if match:
            found.setdefault(match.group(2), []).append((match.group(1), path))
    return found
