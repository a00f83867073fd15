"""LUNGx: a small spreadsheet (xlsx and csv, with the known cell quirks) + DICOM series."""

from __future__ import annotations

import h5py
import numpy as np
import pandas as pd
import pytest
from test_data_dicom import cli_error, truncate, write_series

from lungbench.cli import main
from lungbench.core.errors import DataError
from lungbench.data.geometry import geometry
from lungbench.data.lungx import read_spreadsheet, write_lungx_store
from lungbench.data.store import read_info, read_meta

HEADER = [
    "Scan Number ",
    "Nodule Number",
    "Nodule Center x,y Position*",
    "Nodule Center Image",
    "Final Diagnosis",
]


def _archive(root, names=None):
    for scan, (x, y, k) in (("LUNGx-CT001", (12, 9, 4)), ("LUNGx-CT002", (6, 14, 2))):
        hu = np.full((6, 20, 24), -850, np.int16)
        hu[k - 1, y - 1 : y + 2, x - 1 : x + 2] = 50  # InstanceNumber k is slice k - 1
        write_series(root / scan / "study" / "series", hu, spacing=(2.0, 1.0, 1.0), names=names)
    return root


@pytest.fixture
def archive(tmp_path):
    return _archive(tmp_path / "root")


def _rows(positions=("12, 9", " 6,14 "), slices=("4", "2.0")):
    return [
        [" LUNGx-CT001", "1", positions[0], slices[0], "Benign "],
        ["LUNGx-CT002 ", " 1", positions[1], slices[1], "malignant"],
    ]


def test_xlsx_with_quirks_round_trip(archive, tmp_path):
    sheet = tmp_path / "nodules.xlsx"
    pd.DataFrame(_rows(), columns=HEADER).to_excel(sheet, index=False)
    rows = read_spreadsheet(sheet)
    assert [(r.scan, r.x, r.y, r.slice, r.label) for r in rows] == [
        ("LUNGx-CT001", 12, 9, 4, 0),
        ("LUNGx-CT002", 6, 14, 2, 1),
    ]
    out = tmp_path / "lungx.h5"
    assert write_lungx_store(archive, rows, out, geometry("default")) == 2
    assert read_info(out).kind == "lungx"
    assert list(read_meta(out)["label"]) == [0, 1]
    with h5py.File(out) as f:
        assert (f["zoom"][:, 0, 16, 16, 16] > -400).all()  # the bright block is at the centre


def test_csv_with_separate_xy_columns_via_cli(archive, tmp_path):
    sheet = tmp_path / "nodules.csv"
    sheet.write_text("scan number,x,y,slice,diagnosis\nLUNGx-CT001,12,9,4,BENIGN\n")
    out = tmp_path / "l.h5"
    assert main(["data", "lungx", str(archive), str(sheet), "--out", str(out)]) == 0
    assert read_info(out).n == 1


def test_missing_columns_named(tmp_path):
    sheet = tmp_path / "bad.csv"
    sheet.write_text("Scan Number,Diagnosis\nLUNGx-CT001,benign\n")
    with pytest.raises(DataError, match=r"bad.csv: spreadsheet lacks the column\(s\) slice"):
        read_spreadsheet(sheet)


def test_position_outside_volume_names_file_and_row(archive, tmp_path):
    sheet = tmp_path / "nodules.csv"
    pd.DataFrame(_rows(slices=("4", "9")), columns=HEADER).to_csv(sheet, index=False)
    out = tmp_path / "l.h5"
    with pytest.raises(DataError, match=r"nodules.csv: row 3: .* outside scan LUNGx-CT002"):
        write_lungx_store(archive, read_spreadsheet(sheet), out, geometry("default"))
    assert list(tmp_path.glob("l.h5*")) == []  # the failed conversion left nothing


def test_unknown_diagnosis_and_bad_number(tmp_path):
    sheet = tmp_path / "n.csv"
    pd.DataFrame([["LUNGx-CT001", "1", "3,4", "2", "unsure"]], columns=HEADER).to_csv(
        sheet, index=False
    )
    with pytest.raises(DataError, match="row 2: diagnosis 'unsure'"):
        read_spreadsheet(sheet)
    pd.DataFrame([["LUNGx-CT001", "1", "3,4", "two", "benign"]], columns=HEADER).to_csv(
        sheet, index=False
    )
    with pytest.raises(DataError, match="row 2: slice 'two' is not a number"):
        read_spreadsheet(sheet)


def test_missing_scan_folder(archive, tmp_path):
    sheet = tmp_path / "n.csv"
    pd.DataFrame([["LUNGx-CT099", "1", "3,4", "2", "benign"]], columns=HEADER).to_csv(
        sheet, index=False
    )
    with pytest.raises(DataError, match="LUNGx-CT099"):
        write_lungx_store(archive, read_spreadsheet(sheet), tmp_path / "o.h5", geometry("default"))


def _convert(root, sheet, out) -> int:
    return main(["data", "lungx", str(root), str(sheet), "--out", str(out)])


def test_duplicate_nodule_row_names_the_row_and_leaves_no_store(archive, tmp_path, capsys):
    # The same scan + nodule number twice made one sample id twice: a ValueError traceback.
    sheet = tmp_path / "nodules.csv"
    rows = [*_rows(), ["lungx-ct001", "1.0", "3, 4", "2", "malignant"]]
    pd.DataFrame(rows, columns=HEADER).to_csv(sheet, index=False)
    out = tmp_path / "l.h5"
    assert _convert(archive, sheet, out) == 2
    error = cli_error(capsys)
    assert f"{sheet}: row 4: scan lungx-ct001 nodule 1 repeats row 2" in error
    assert list(tmp_path.glob("l.h5*")) == []


def test_truncated_slice_is_named_via_cli(archive, tmp_path, capsys):
    series = archive / "LUNGx-CT002" / "study" / "series"
    broken = sorted(series.iterdir())[2]
    truncate(broken)
    sheet = tmp_path / "nodules.csv"
    pd.DataFrame(_rows(), columns=HEADER).to_csv(sheet, index=False)
    out = tmp_path / "l.h5"
    assert _convert(archive, sheet, out) == 2
    error = cli_error(capsys)
    assert f"{broken}: not a readable DICOM image (missing SeriesInstanceUID" in error
    assert list(tmp_path.glob("l.h5*")) == []


def test_slices_without_dcm_extension_are_found(tmp_path):
    # find_scan_folder counted only *.dcm while load_series reads any slice file name.
    root = _archive(tmp_path / "root", names=[f"IM{k:04d}" for k in range(6)])
    sheet = tmp_path / "nodules.csv"
    pd.DataFrame(_rows(), columns=HEADER).to_csv(sheet, index=False)
    out = tmp_path / "l.h5"
    assert _convert(root, sheet, out) == 0
    assert read_info(out).n == 2
