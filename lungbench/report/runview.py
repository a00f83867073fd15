"""Layer 10 (report): Read a run folder (any kind: bench, train, profile) for reports and comparisons.

Read-only and tolerant: a run that was killed has no tables yet, a training run has no
records.jsonl, a table may be unreadable. What is missing is simply absent from the view;
only a folder that is not a run at all is an error (DataError naming it).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from lungbench.core.errors import DataError
from lungbench.core.runs import RUN_FILE, read_records

# Long tables shown in a report only by their first rows (every row stays in the CSV).
MAX_TABLE_ROWS = 40


@dataclass
class RunView:
    """Everything a report shows about one run folder."""

    path: Path
    info: dict[str, Any]
    config: dict[str, Any]
    environment: dict[str, Any]
    records: list[dict[str, Any]]
    tables: dict[str, Path] = field(default_factory=dict)  # name -> tables/NAME.csv
    plots: dict[str, Path] = field(default_factory=dict)  # name -> plots/NAME.png
    telemetry: dict[str, Path] = field(default_factory=dict)  # name -> telemetry/NAME.csv
    metrics: Path | None = None  # metrics.csv of a training run

    @property
    def name(self) -> str:
        return str(self.info.get("run_id") or self.path.name)

    @property
    def kind(self) -> str:
        return str(self.info.get("kind", "unknown"))

    @property
    def status(self) -> str:
        return str(self.info.get("status", "unknown"))


def load_run(path: str | os.PathLike) -> RunView:
    """A RunView of `path` (DataError if it is not a lungbench run folder)."""
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"{path}: not a run folder (no such directory)")
    if not (path / RUN_FILE).is_file():
        raise DataError(f"{path}: not a run folder ({RUN_FILE} missing)")
    info = _read_json_dict(path / RUN_FILE, required=True)
    return RunView(
        path=path,
        info=info,
        config=_read_json_dict(path / "config.json"),
        environment=_read_json_dict(path / "environment.json"),
        records=read_records(path),
        tables=_files(path / "tables", "*.csv"),
        plots=_files(path / "plots", "*.png"),
        telemetry=_files(path / "telemetry", "*.csv"),
        metrics=path / "metrics.csv" if (path / "metrics.csv").is_file() else None,
    )


def read_table(path: Path, dtype: Any = None) -> pd.DataFrame:
    """A results CSV as a DataFrame (DataError naming the file if it cannot be parsed);
    `dtype=str` keeps every cell as written (a published 1194.03 or 0.9 stays that text)."""
    try:
        return pd.read_csv(path, dtype=dtype)
    except (
        pd.errors.ParserError,
        pd.errors.EmptyDataError,
        UnicodeDecodeError,
        OSError,
        ValueError,
    ) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"{path}: not a readable CSV table ({reason})") from None


def _read_json_dict(path: Path, required: bool = False) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        if required:
            raise DataError(f"{path}: not readable JSON ({exc})") from None
        return {}
    if not isinstance(data, dict):
        if required:
            raise DataError(f"{path}: expected a JSON object")
        return {}
    return data


def _files(folder: Path, pattern: str) -> dict[str, Path]:
    if not folder.is_dir():
        return {}
    return {p.stem: p for p in sorted(folder.glob(pattern)) if p.is_file()}
