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
    args = ["data", "lungx", str(archive), str(sheet), "--out", str(out)]
    assert main([*args, "--allow-missing-classes"]) == 0  # one benign row: asked for
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
        write_lungx_store(
            archive,
            read_spreadsheet(sheet),
            tmp_path / "o.h5",
            geometry("default"),
            allow_missing_classes=True,
        )


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


# --- issue #17: series that are not CT volumes, sets that cannot train ---------------------


def _sheet(tmp_path, rows=None):
    sheet = tmp_path / "nodules.csv"
    pd.DataFrame(rows or _rows(), columns=HEADER).to_csv(sheet, index=False)
    return sheet


def _edit_scan(archive, scan, edit):
    from test_data_dicom import edit_slices

    edit_slices(archive / scan / "study" / "series", edit)


def _multi_frame(ds):
    ds.NumberOfFrames = 2
    ds.PixelData = ds.PixelData * 2


def _colour(ds):
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelData = bytes(ds.Rows * ds.Columns * 3)


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (_colour, "SamplesPerPixel 3, PhotometricInterpretation RGB: not a grayscale CT slice"),
        (_multi_frame, "NumberOfFrames 2: a multi-frame image"),
    ],
)
def test_colour_or_multi_frame_scan_is_one_line_and_no_store(
    archive, tmp_path, capsys, edit, expected
):
    # Both came back as 4-D / 5-D "volumes" and crashed in cut_cubes with a traceback.
    _edit_scan(archive, "LUNGx-CT002", edit)
    out = tmp_path / "l.h5"
    assert _convert(archive, _sheet(tmp_path), out) == 2
    error = cli_error(capsys)
    assert str(archive / "LUNGx-CT002") in error and expected in error
    assert list(tmp_path.glob("l.h5*")) == []


def test_other_modality_only_when_allowed(archive, tmp_path, capsys):
    _edit_scan(archive, "LUNGx-CT001", lambda ds: setattr(ds, "Modality", "MR"))
    sheet, out = _sheet(tmp_path), tmp_path / "l.h5"
    assert _convert(archive, sheet, out) == 2
    assert "Modality 'MR' is not CT" in cli_error(capsys)
    assert not out.exists()
    args = ["data", "lungx", str(archive), str(sheet), "--out", str(out)]
    assert main([*args, "--allow-modality", "MR"]) == 0
    assert read_info(out).n == 2
    assert "values are not Hounsfield units" in capsys.readouterr().err  # said, not hidden


def test_one_class_spreadsheet_is_refused_unless_asked(archive, tmp_path, capsys):
    rows = _rows()
    rows[1][-1] = "benign"
    sheet, out = _sheet(tmp_path, rows), tmp_path / "l.h5"
    assert _convert(archive, sheet, out) == 2
    error = cli_error(capsys)
    assert (
        f"{sheet}: no sample of class malignant (samples per class: benign 2, malignant 0)" in error
    )
    assert "--allow-missing-classes" in error and not list(tmp_path.glob("l.h5*"))
    args = ["data", "lungx", str(archive), str(sheet), "--out", str(out)]
    assert main([*args, "--allow-missing-classes"]) == 0
    assert list(read_meta(out)["label"]) == [0, 0]


def test_cv_on_a_one_class_store_is_refused_before_any_run_folder(tmp_path, capsys):
    # An all-benign store ran every fold and ended "complete" with a NaN AUC table.
    from lungbench.data.synth import write_synthetic_store

    store = tmp_path / "benign.h5"
    write_synthetic_store(store, "lungx", 9, geometry("dey2018"), seed=0, workers=1)
    with h5py.File(store, "r+") as f:
        f["label"][:] = 0
    runs = tmp_path / "runs"
    code = main(["train", "lungx-cv", "--quick", "--store", str(store), "--out", str(runs)])
    assert code == 2
    error = cli_error(capsys)
    assert f"{store}: the labels lack a class (samples per class: benign 9, malignant 0)" in error
    assert not runs.exists() or not any(runs.iterdir())


def test_fold_without_a_class_is_named():
    from lungbench.data.splits import check_fold_classes

    folds = np.array([0, 0, 1, 1, 2, 2])
    check_fold_classes(np.array([0, 1, 0, 1, 0, 1]), folds)
    with pytest.raises(DataError) as error:
        check_fold_classes(np.array([0, 1, 0, 1, 0, 0]), folds, ["benign", "malignant"], "s.h5")
    assert str(error.value).startswith(
        "s.h5: fold 3 of 3: its test set has no sample of class malignant (benign 2, malignant 0)"
    )
