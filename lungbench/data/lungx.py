"""Layer 3 (data): LUNGx challenge (SPIE-AAPM Lung CT Challenge): DICOM series + the nodule spreadsheet.

    rows = read_spreadsheet("TestSet_NoduleData_PublicRelease_wTruth.xlsx")
    write_lungx_store("LUNGx/", rows, "lungx.h5", geometry("default"))

Layout: ROOT holds one folder per scan named as in the spreadsheet's scan column (e.g.
`LUNGx-CT002/`, any depth of study/series folders below it, one CT series). The spreadsheet
(.xlsx or .csv) has one row per nodule; columns are found by name, ignoring case, spaces
and `*`:

    scan        "Scan Number"                         e.g. LUNGx-CT002
    nodule      "Nodule Number"                       optional (default: row order)
    x, y        "Nodule Center x,y Position" ("x, y" in one cell) or separate x / y columns;
                pixel column and row, 0-based
    slice       "Nodule Center Image" (or a "slice" column): the DICOM InstanceNumber; the
                1-based position in the sorted series when the headers have no numbers
    diagnosis   "Final Diagnosis" / "Diagnosis": text with "benign" -> 0,
                "malignant" or "cancer" -> 1

Known cell quirks are tolerated: stray spaces, any letter case ("Benign ", "malignant"),
numbers stored as text, "12.0" for 12. A position outside the scan is a DataError naming
the spreadsheet and its row. Each series passes the CT volume check of `dicom.load_series`
(other modalities only when listed in `modalities`). A spreadsheet whose rows are all of
one class is refused before any scan is read, unless `allow_missing_classes`.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Collection, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from lungbench.core.errors import DataError
from lungbench.data.dicom import Series, is_slice_name, load_series
from lungbench.data.geometry import Geometry
from lungbench.data.resample import cut_cubes
from lungbench.data.store import StoreWriter, require_classes

LABEL_NAMES = ("benign", "malignant")


@dataclass(frozen=True)
class NoduleRow:
    """One spreadsheet row: where the nodule is and its diagnosis."""

    scan: str
    nodule: int
    x: float  # pixel column
    y: float  # pixel row
    slice: int  # InstanceNumber (1-based)
    label: int
    row: int  # spreadsheet row number (header = 1), for messages
    file: str


def read_spreadsheet(path: str | os.PathLike) -> list[NoduleRow]:
    """Parse the nodule spreadsheet (.xlsx/.xls or .csv); DataError naming file and row."""
    path = Path(path)
    table = _read_table(path)
    columns = _find_columns(path, list(table.columns))
    rows = []
    for i, record in enumerate(table.to_dict("records")):
        line = i + 2  # header is row 1
        values = {k: _clean(record[c]) if c else "" for k, c in columns.items()}
        if not values["scan"]:
            continue  # blank trailing rows are common in spreadsheets
        if columns["xy"]:
            parts = re.split(r"[,;\s]+", values["xy"].strip("()[] "))
            if len(parts) != 2:
                raise DataError(f"{path}: row {line}: position {values['xy']!r} is not 'x, y'")
            x_text, y_text = parts
        else:
            x_text, y_text = values["x"], values["y"]
        rows.append(
            NoduleRow(
                scan=values["scan"],
                nodule=int(_number(path, line, "nodule", values["nodule"]))
                if values["nodule"]
                else sum(r.scan == values["scan"] for r in rows) + 1,
                x=_number(path, line, "x", x_text),
                y=_number(path, line, "y", y_text),
                slice=int(round(_number(path, line, "slice", values["slice"]))),
                label=_diagnosis(path, line, values["diagnosis"]),
                row=line,
                file=str(path),
            )
        )
    if not rows:
        raise DataError(f"{path}: no nodule rows")
    _check_unique(path, rows)
    return rows


def _check_unique(path: Path, rows: Sequence[NoduleRow]) -> None:
    """DataError naming both rows when a scan + nodule number appears twice (one sample id).

    Scan names are compared ignoring case, as the scan folders are found.
    """
    seen: dict[tuple[str, int], int] = {}
    for r in rows:
        key = (r.scan.lower(), r.nodule)
        if key in seen:
            raise DataError(
                f"{path}: row {r.row}: scan {r.scan} nodule {r.nodule} repeats row "
                f"{seen[key]}; each scan + nodule number must appear once"
            )
        seen[key] = r.row


def _read_table(path: Path):
    import pandas as pd

    if not path.is_file():
        raise DataError(f"{path}: spreadsheet not found")
    try:
        if path.suffix.lower() in (".xlsx", ".xlsm", ".xls"):
            return pd.read_excel(path, dtype=str)
        return pd.read_csv(path, dtype=str, skipinitialspace=True)
    except Exception as exc:  # pandas/openpyxl raise many types for broken files
        raise DataError(f"{path}: cannot read the spreadsheet ({exc})") from None


def _norm(name: object) -> str:
    return re.sub(r"\s+", " ", str(name).replace("*", "")).strip().lower()


def _find_columns(path: Path, names: list) -> dict[str, object]:
    """Map each needed field to its column (None for optional ones not present)."""
    norm = {_norm(n): n for n in names}

    def pick(*tests) -> object:
        for key, original in norm.items():
            if any(t(key) for t in tests):
                return original
        return None

    found = {
        "scan": pick(lambda k: "scan" in k),
        "nodule": pick(lambda k: "nodule number" in k or k in ("nodule", "nodule id")),
        "xy": pick(lambda k: "x,y" in k.replace(" ", "") or "x/y" in k.replace(" ", "")),
        "x": pick(lambda k: k == "x" or k.endswith(" x") or k.endswith("x position")),
        "y": pick(lambda k: k == "y" or k.endswith(" y") or k.endswith("y position")),
        "slice": pick(lambda k: "image" in k, lambda k: "slice" in k),
        "diagnosis": pick(lambda k: "diagnosis" in k, lambda k: k in ("label", "class")),
    }
    missing = [k for k in ("scan", "slice", "diagnosis") if found[k] is None]
    if found["xy"] is None and (found["x"] is None or found["y"] is None):
        missing.append("x,y position")
    if missing:
        raise DataError(
            f"{path}: spreadsheet lacks the column(s) {', '.join(missing)}; needs "
            f"Scan Number, Nodule Center x,y Position (or x and y), Nodule Center "
            f"Image, Diagnosis; found {', '.join(map(str, names))}"
        )
    return found


def _clean(value: object) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return ""
    return re.sub(r"\s+", " ", str(value)).strip()


def _number(path: Path, line: int, what: str, text: str) -> float:
    try:
        value = float(text.replace(" ", ""))
    except ValueError:
        raise DataError(f"{path}: row {line}: {what} {text!r} is not a number") from None
    if not math.isfinite(value):  # float() takes 'inf' and 'nan'; no position is either
        raise DataError(f"{path}: row {line}: {what} {text!r} is not a finite number")
    return value


def _diagnosis(path: Path, line: int, text: str) -> int:
    low = text.lower()
    if "benign" in low:
        return 0
    if "malignant" in low or "cancer" in low:
        return 1
    raise DataError(
        f"{path}: row {line}: diagnosis {text!r} is neither benign nor malignant "
        f"(allowed: text containing 'benign', 'malignant' or 'cancer')"
    )


def find_scan_folder(root: Path, scan: str) -> Path:
    """The folder holding the DICOM series of `scan` (named as the scan, at any depth)."""
    matches = [
        Path(d) / n
        for d, dirs, _ in os.walk(root)
        for n in dirs
        if n.strip().lower() == scan.lower()
    ]
    if not matches:
        raise DataError(f"{root}: no folder named {scan!r} for the spreadsheet's scan")
    # Slice files as `dicom_files` counts them: *.dcm, UID names, no extension.
    counts = {
        Path(d): n for d, _, files in os.walk(matches[0]) if (n := sum(map(is_slice_name, files)))
    }
    if not counts:
        raise DataError(
            f"{matches[0]}: no DICOM files (*.dcm or other slice files) for scan {scan!r}"
        )
    # Several folders: the CT is the series with the most slices (others are localisers).
    return max(counts, key=counts.__getitem__)


def nodule_centre(series: Series, row: NoduleRow) -> tuple[float, float, float]:
    """(slice index, row, column) of the nodule; DataError naming file and row if outside."""
    numbers = series.instance_numbers
    if np.all(numbers >= 0) and len(set(numbers.tolist())) == len(numbers):
        hits = np.flatnonzero(numbers == row.slice)
        k = int(hits[0]) if hits.size else -1
    else:
        k = row.slice - 1
    depth, height, width = series.hu.shape
    if not (0 <= k < depth and 0 <= row.y < height and 0 <= row.x < width):
        raise DataError(
            f"{row.file}: row {row.row}: position x={row.x:g} y={row.y:g} "
            f"slice={row.slice} is outside scan {row.scan} ({width} x {height} "
            f"pixels, {depth} slices, {series.path})"
        )
    return float(k), float(row.y), float(row.x)


def write_lungx_store(
    root: str | os.PathLike,
    rows: Sequence[NoduleRow],
    out: str | os.PathLike,
    geo: Geometry,
    progress: Callable[[int], None] | None = None,
    modalities: Collection[str] = ("CT",),
    allow_missing_classes: bool = False,
) -> int:
    """Cut the context and zoom cubes of every spreadsheet row into a store at `out`.

    `modalities`: the DICOM Modality values accepted (CT; e.g. add MR explicitly).
    `allow_missing_classes`: write a store although a class has no row (else DataError).
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: LUNGx folder not found")
    if not allow_missing_classes:
        require_classes(rows[0].file, np.array([r.label for r in rows]), "binary", LABEL_NAMES)
    inputs = {"context": (1, *geo.context_grid), "zoom": (1, *geo.zoom_grid)}
    provenance = {
        "source": "LUNGx",
        "root": str(root),
        "spreadsheet": rows[0].file,
        "geometry": asdict(geo),
        "position": "x, y 0-based pixels; slice = InstanceNumber",
    }
    with StoreWriter(
        out,
        kind="lungx",
        inputs=inputs,
        label_names=LABEL_NAMES,
        provenance=provenance,
        require_all_classes=not allow_missing_classes,
    ) as writer:
        for scan in dict.fromkeys(r.scan for r in rows):  # spreadsheet order, each scan once
            series = load_series(find_scan_folder(root, scan), modalities=modalities)
            for row in (r for r in rows if r.scan == scan):
                centre = nodule_centre(series, row)
                writer.append(
                    cut_cubes(series.hu, series.spacing, centre, geo),
                    label=row.label,
                    id=f"{scan}-n{row.nodule}",
                    source=str(series.path),
                    spacing=geo.context_spacing,
                )
                if progress is not None:
                    progress(1)
        return writer.n
