"""Layer 10 (report): The seeds' published tables (results/reference/), read, checked and matched to a run's tables.

The folder holds one CSV per published table, `seedNNN_NAME.csv`, in the layout lungbench
writes (same first column, same column names), and `index.csv`, one row per file:

    file     the reference CSV (seedNNN_NAME.csv)
    table    the run table it stands beside: a name or a pattern (`cost_*`)
    model    the network it was published for (a lungbench model name), empty for any
    source   where it comes from: seed, slide or section, table
    note     what to know when reading it beside ours (transcription, units, data)

A CSV that index.csv does not list stands beside the run table NAME (the file-name rule).
Nothing here raises on a bad folder: a missing, unreadable or malformed file becomes a
problem that names the file and says what is wrong, and the report shows it instead.

    refs = load_references(default_reference_dir())
    for ref in refs.beside("methods_auc", run_models(view.config)).references: ...
"""

from __future__ import annotations

import fnmatch
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pandas as pd

from lungbench.core.errors import DataError
from lungbench.report.runview import read_table

REFERENCE_PATTERN = re.compile(r"^(seed\d{3})_(.+)$")
INDEX_FILE = "index.csv"
INDEX_COLUMNS = ("file", "table", "model", "source", "note")
INDEX_REQUIRED = ("file", "table")


@dataclass(frozen=True)
class Reference:
    """One published table: its file, what it stands beside and, once read, its rows."""

    path: Path
    seed: str  # "seed004"
    table: str  # the run table's name, or a pattern of names
    model: str = ""  # the network it was published for; "" for any
    source: str = ""
    note: str = ""
    frame: pd.DataFrame | None = field(default=None, compare=False, repr=False)
    problem: str = ""  # why it cannot be shown; "" when it can

    @property
    def seed_label(self) -> str:
        """'seed 004'"""
        return self.seed.replace("seed", "seed ")

    def describe(self) -> str:
        """Source and note, for the line under the table."""
        return "; ".join(p for p in (self.source, self.note) if p)


@dataclass(frozen=True)
class Beside:
    """The references that stand beside one run table, and a note when they were published
    for another network than the run's."""

    references: list[Reference]
    note: str = ""


@dataclass
class ReferenceSet:
    """Every reference of a folder, and every problem found reading it (each names a file)."""

    folder: Path | None
    references: list[Reference] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def beside(self, table: str, models: Iterable[str] = ()) -> Beside:
        """The references for the run table `table` of a run that trained `models`.

        A reference published for a network stands beside a table of that network: the
        model the table is named for (cost_resnet50), else the run's. When none of the
        table's references is for that network, all of them are shown, with a note saying
        they were published for other networks.
        """
        candidates = [r for r in self.references if fnmatch.fnmatchcase(table, r.table)]
        published = sorted({r.model for r in candidates if r.model})
        if not published:
            return Beside(candidates)
        models = {m.lower() for m in models}
        named = {m for m in {*published, *models} if table.lower().endswith(f"_{m}")}
        wanted = named or models
        chosen = [r for r in candidates if not r.model or r.model in wanted]
        if any(r.model for r in chosen):
            return Beside(chosen)
        ran = ", ".join(sorted(wanted)) or "a network the run does not record"
        note = (
            f"published for {', '.join(published)}, not for this run's {ran}: shown for "
            "orientation, the numbers are not of the same network"
        )
        return Beside(candidates, note)


def default_reference_dir() -> Path | None:
    """results/reference/ of the checkout lungbench runs from (None when installed elsewhere)."""
    folder = Path(__file__).resolve().parents[2] / "results" / "reference"
    return folder if folder.is_dir() else None


def load_references(folder: str | os.PathLike | None) -> ReferenceSet:
    """Every reference in `folder`, each read and checked; problems collected, never raised."""
    if folder is None:
        return ReferenceSet(
            None,
            problems=[
                "no results/reference/ folder beside this lungbench (installed outside a "
                "checkout?): give `lungbench report --reference DIR` to show published tables"
            ],
        )
    folder = Path(folder)
    if not folder.is_dir():
        return ReferenceSet(folder, problems=[f"{folder}: reference folder not found"])
    found = ReferenceSet(folder)
    listed = _index_rows(folder, found.problems)
    for row in listed:
        found.references.append(_checked(_listed_reference(folder, row)))
    in_index = {r.path.name for r in found.references}
    for path in sorted(folder.glob("seed*_*.csv")):
        match = REFERENCE_PATTERN.match(path.stem)
        if match and path.name not in in_index:
            found.references.append(
                _checked(Reference(path, match.group(1), match.group(2), source="file name"))
            )
    found.problems += [f"{r.path}: {r.problem}" for r in found.references if r.problem]
    return found


def read_reference(path: Path) -> pd.DataFrame:
    """A reference CSV as a DataFrame of text cells (empty ones NaN); DataError naming the file
    and what is wrong with it."""
    if not path.is_file():
        raise DataError(f"{path}: reference table missing")
    frame = read_table(path, dtype=str)  # shown exactly as published, digits and all
    frame = frame.rename(columns=lambda c: "" if str(c).startswith("Unnamed: ") else str(c))
    if frame.shape[1] < 2:
        raise DataError(
            f"{path}: malformed reference table ({frame.shape[1]} column; expected a column "
            "of row labels and at least one column of values)"
        )
    if frame.empty:
        raise DataError(f"{path}: malformed reference table (a header but no rows)")
    if frame.iloc[:, 1:].isna().all().all():
        raise DataError(f"{path}: malformed reference table (every value cell is empty)")
    return frame


def layout_problem(reference: pd.DataFrame, ours: pd.DataFrame) -> str:
    """'' when `reference` has our layout (the same first column: what the rows are), else
    what differs."""
    theirs, mine = str(reference.columns[0]), str(ours.columns[0]) if len(ours.columns) else ""
    if theirs != mine:
        return (
            f"not the layout of this run's table: its rows are {theirs!r}, ours {mine!r}; "
            "shown without it"
        )
    return ""


def run_models(config: Mapping[str, Any]) -> set[str]:
    """The networks a run trained: every string under a key 'model' of its config.json."""
    found: set[str] = set()
    stack: list[Any] = [config]
    while stack:
        item = stack.pop()
        if isinstance(item, Mapping):
            for key, value in item.items():
                if key == "model" and isinstance(value, str):
                    found.add(value.lower())
                else:
                    stack.append(value)
        elif isinstance(item, list):
            stack.extend(item)
    return found


def _index_rows(folder: Path, problems: list[str]) -> list[dict[str, str]]:
    """index.csv's rows as dicts ([] with a problem when it is missing or malformed)."""
    path = folder / INDEX_FILE
    if not path.is_file():
        problems.append(
            f"{path}: missing; the reference tables are matched by file name, without sources"
        )
        return []
    try:
        index = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, OSError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        problems.append(f"{path}: malformed ({reason}); reference tables matched by file name")
        return []
    absent = [c for c in INDEX_REQUIRED if c not in index.columns]
    if absent:
        problems.append(
            f"{path}: malformed (no column {', '.join(absent)}; expected "
            f"{', '.join(INDEX_COLUMNS)}); reference tables matched by file name"
        )
        return []
    rows, seen = [], set()
    for number, row in enumerate(index.to_dict(orient="records"), start=2):
        name = str(row["file"]).strip()
        if not REFERENCE_PATTERN.match(Path(name).stem) or not name.endswith(".csv"):
            problems.append(f"{path}, line {number}: file {name!r} is not seedNNN_NAME.csv")
            continue
        if not str(row["table"]).strip():
            problems.append(f"{path}, line {number}: {name} has no table to stand beside")
            continue
        if name in seen:
            problems.append(f"{path}, line {number}: {name} listed twice (the first kept)")
            continue
        seen.add(name)
        rows.append({c: str(row.get(c, "")).strip() for c in INDEX_COLUMNS})
    return rows


def _listed_reference(folder: Path, row: dict[str, str]) -> Reference:
    path = folder / row["file"]
    match = REFERENCE_PATTERN.match(path.stem)
    assert match is not None  # _index_rows kept only such names
    return Reference(
        path,
        match.group(1),
        row["table"],
        row["model"].lower(),
        row["source"],
        row["note"],
    )


def _checked(ref: Reference) -> Reference:
    """The reference with its rows read, or with the problem that prevents it."""
    if not ref.path.is_file():
        return replace(ref, problem=f"listed in {INDEX_FILE} but missing")
    try:
        return replace(ref, frame=read_reference(ref.path))
    except DataError as exc:
        return replace(ref, problem=str(exc).removeprefix(f"{ref.path}: "))
