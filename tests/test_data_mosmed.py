"""MosMedData: NIfTI studies written with nibabel -> reader -> `volume` store."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from test_data_dicom import cli_error

from lungbench.cli import main
from lungbench.core.errors import DataError
from lungbench.data.mosmed import list_studies, preprocess, write_mosmed_store
from lungbench.data.nifti import load_nifti
from lungbench.data.store import read_info, read_meta


def write_study(path, hu_xyz, zooms=(0.8, 0.8, 8.0)):
    path.parent.mkdir(parents=True, exist_ok=True)
    image = nib.Nifti1Image(hu_xyz.astype(np.int16), np.diag([*zooms, 1.0]))
    image.header.set_zooms(zooms)
    nib.save(image, path)


@pytest.fixture
def studies(tmp_path):
    rng = np.random.default_rng(0)
    for folder, n in (("CT-0", 2), ("CT-1", 1), ("CT-2", 1), ("CT-3", 1), ("CT-4", 1)):
        for i in range(n):
            write_study(
                tmp_path / folder / f"study_{folder[-1]}{i:03d}.nii.gz",
                rng.integers(-1200, 600, (20, 18, 6)),
            )
    return tmp_path


def test_nifti_transposed_to_zyx_with_spacing(tmp_path):
    data = np.arange(4 * 5 * 6).reshape(4, 5, 6)  # (x, y, z)
    write_study(tmp_path / "a.nii.gz", data, zooms=(0.5, 0.6, 2.0))
    volume, spacing = load_nifti(tmp_path / "a.nii.gz")
    assert volume.shape == (6, 5, 4) and spacing == pytest.approx((2.0, 0.6, 0.5))
    assert volume[2, 3, 1] == data[1, 3, 2]


def test_binary_task_round_trip(studies, tmp_path):
    out = tmp_path / "m.h5"
    assert write_mosmed_store(studies, out, "binary", size=(8, 12, 12)) == 4
    info = read_info(out)
    assert info.inputs == {"volume": (1, 8, 12, 12)} and info.units["volume"] == "normalized"
    meta = read_meta(out)
    assert sorted(meta["id"]) == [
        "CT-0/study_0000",
        "CT-0/study_0001",
        "CT-2/study_2000",
        "CT-3/study_3000",
    ]
    assert list(meta["label"]) == [0, 0, 1, 1]
    assert info.label_names == ["CT-0", "CT-2/3"]


def test_multiclass_has_five_classes(studies, tmp_path):
    out = tmp_path / "m.h5"
    main(
        [
            "data",
            "mosmed",
            str(studies),
            "--task",
            "multiclass",
            "--size",
            "4",
            "8",
            "8",
            "--out",
            str(out),
        ]
    )
    meta = read_meta(out)
    assert sorted(set(meta["label"])) == [0, 1, 2, 3, 4] and len(meta["label"]) == 6


def test_preprocess_window_and_range():
    volume = np.full((4, 6, 6), -2000.0)
    volume[2] = 3000.0
    out = preprocess(volume, (4, 6, 6))
    assert out.min() == 0.0 and out.max() == 1.0 and out.dtype == np.float32


def test_unexpected_shape_named_and_no_store(tmp_path):
    write_study(tmp_path / "CT-0" / "good.nii.gz", np.zeros((10, 10, 6)))
    write_study(tmp_path / "CT-0" / "thin.nii.gz", np.zeros((10, 10, 1)))
    out = tmp_path / "m.h5"
    with pytest.raises(DataError, match="thin.nii.gz: unexpected shape"):
        write_mosmed_store(tmp_path, out, "binary", size=(4, 8, 8), allow_missing_classes=True)
    assert list(tmp_path.glob("m.h5*")) == []


def test_4d_nifti_rejected(tmp_path):
    image = nib.Nifti1Image(np.zeros((4, 4, 4, 3), np.int16), np.eye(4))
    nib.save(image, tmp_path / "t.nii.gz")
    with pytest.raises(DataError, match="t.nii.gz: expected a 3D volume"):
        load_nifti(tmp_path / "t.nii.gz")


def test_unreadable_and_missing_layout(tmp_path):
    (tmp_path / "CT-0").mkdir()
    (tmp_path / "CT-0" / "bad.nii.gz").write_bytes(b"garbage")
    with pytest.raises(DataError, match="bad.nii.gz"):
        write_mosmed_store(tmp_path, tmp_path / "m.h5", allow_missing_classes=True)
    with pytest.raises(DataError, match="no CT-0"):
        list_studies(tmp_path / "CT-0", "binary")


def _convert(root, out, *options) -> int:
    return main(["data", "mosmed", str(root), "--size", "4", "8", "8", "--out", str(out), *options])


def test_corrupted_gzip_is_named_and_leaves_no_store(tmp_path, capsys):
    # Bytes zeroed in the middle of the stream: nibabel stops reading before the gzip CRC,
    # so the study was read as garbage values without a word.
    rng = np.random.default_rng(1)
    write_study(tmp_path / "CT-0" / "good.nii.gz", rng.integers(-1000, 400, (20, 18, 6)))
    path = tmp_path / "CT-2" / "bad.nii.gz"
    write_study(path, rng.integers(-1000, 400, (20, 18, 6)))
    raw = bytearray(path.read_bytes())
    middle = len(raw) // 2
    raw[middle : middle + 64] = bytes(64)
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="bad.nii.gz: not a readable NIfTI file"):
        load_nifti(path)
    out = tmp_path / "m.h5"
    assert _convert(tmp_path, out) == 2
    error = cli_error(capsys)
    assert f"{path}: not a readable NIfTI file (corrupted gzip data" in error
    assert list(tmp_path.glob("m.h5*")) == []


def test_truncated_gzip_is_named(tmp_path):
    path = tmp_path / "t.nii.gz"
    write_study(path, np.zeros((20, 18, 6)))
    path.write_bytes(path.read_bytes()[:-12])  # the end of the stream and the trailer
    with pytest.raises(DataError, match="t.nii.gz: not a readable NIfTI file"):
        load_nifti(path)


def test_duplicate_study_id_names_the_store_and_leaves_none(tmp_path, capsys):
    # study.nii next to study.nii.gz: both are sample id CT-0/study. The store raised a bare
    # ValueError (a traceback, exit 1).
    for name in ("study.nii", "study.nii.gz"):
        write_study(tmp_path / "CT-0" / name, np.zeros((10, 10, 6)))
    out = tmp_path / "m.h5"
    assert _convert(tmp_path, out, "--allow-missing-classes") == 2
    error = cli_error(capsys)
    assert f"{out}: duplicate sample id 'CT-0/study'" in error
    assert str(tmp_path / "CT-0" / "study.nii.gz") in error  # the second file is named too
    assert list(tmp_path.glob("m.h5*")) == []


# --- issue #17: layouts that cannot train, upper-case names, header fixes -----------------


def test_one_class_layout_is_refused_before_reading_unless_asked(tmp_path, capsys):
    # Studies in CT-0 only wrote a one-class store (exit 0) that no model can learn from.
    rng = np.random.default_rng(2)
    for i in range(2):
        write_study(tmp_path / "CT-0" / f"s{i}.nii.gz", rng.integers(-1000, 400, (10, 10, 6)))
    (tmp_path / "CT-2").mkdir()
    out = tmp_path / "m.h5"
    assert _convert(tmp_path, out) == 2
    error = cli_error(capsys)
    assert f"{tmp_path}: no sample of class CT-2/3 (samples per class: CT-0 2, CT-2/3 0)" in error
    assert list(tmp_path.glob("m.h5*")) == []
    assert _convert(tmp_path, out, "--allow-missing-classes") == 0
    assert list(read_meta(out)["label"]) == [0, 0]


def test_upper_case_extensions_are_studies(studies, tmp_path):
    # STUDY.NII.GZ was skipped without a word.
    (studies / "CT-2" / "study_2000.nii.gz").rename(studies / "CT-2" / "STUDY_2000.NII.GZ")
    write_study(studies / "CT-3" / "PLAIN.NII", np.zeros((10, 10, 6)))
    found = [(p.name, label) for p, _, label in list_studies(studies, "binary")]
    assert ("STUDY_2000.NII.GZ", 1) in found and ("PLAIN.NII", 1) in found and len(found) == 5
    out = tmp_path / "m.h5"
    assert write_mosmed_store(studies, out, "binary", size=(4, 8, 8)) == 5
    assert "CT-2/STUDY_2000" in list(read_meta(out)["id"])


def test_zero_voxel_size_is_refused_not_set_to_one(tmp_path):
    # nibabel replaces a zero pixdim by 1 (and says so on stderr): a spacing never stored.
    image = nib.Nifti1Image(np.zeros((6, 6, 6), np.int16), np.eye(4))
    image.header.set_zooms((0.0, 0.8, 2.0))
    nib.save(image, tmp_path / "z.nii.gz")
    with pytest.raises(DataError, match=r"z.nii.gz: voxel sizes \(pixdim\) \[0.0, 0.8"):
        load_nifti(tmp_path / "z.nii.gz")


def test_rgb_nifti_is_one_line(tmp_path):
    rgb = np.zeros((4, 4, 4), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    nib.save(nib.Nifti1Image(rgb, np.eye(4)), tmp_path / "rgb.nii")
    with pytest.raises(DataError, match=r"rgb.nii: voxels are .* \(complex or RGB\)"):
        load_nifti(tmp_path / "rgb.nii")


@pytest.mark.parametrize("dtype", [np.complex64, np.complex128])
def test_complex_nifti_is_refused_not_stored_without_its_imaginary_part(tmp_path, dtype):
    volume = (np.ones((4, 4, 3)) + 2j * np.ones((4, 4, 3))).astype(dtype)
    path = tmp_path / "complex.nii.gz"
    nib.save(nib.Nifti1Image(volume, np.eye(4)), path)
    with pytest.raises(DataError, match=r"complex\.nii\.gz: voxels are complex"):
        load_nifti(path)
