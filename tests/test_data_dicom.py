"""DICOM series reader and mm resampling: real pydicom files in tmp_path."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from lungbench.core.errors import DataError
from lungbench.data.dicom import is_slice_name, load_series, series_uid_of
from lungbench.data.geometry import geometry
from lungbench.data.resample import cut_cube, cut_cubes, resample_isotropic


def write_series(
    folder,
    hu,
    spacing=(2.5, 0.7, 0.8),
    z0=-100.0,
    series_uid=None,
    positions=None,
    names=None,
    intercept=-1024.0,
    slope=1.0,
):
    """Write a (D, H, W) HU volume as one CT DICOM file per slice; returns the series UID."""
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = series_uid or generate_uid()
    study_uid = generate_uid()
    depth, height, width = hu.shape
    positions = positions if positions is not None else [z0 + k * spacing[0] for k in range(depth)]
    for k in range(depth):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        name = names[k] if names else f"{(k * 7) % depth:03d}-{k}.dcm"  # not in slice order
        ds = FileDataset(str(folder / name), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.Modality = "CT"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [-50.0, -60.0, float(positions[k])]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [spacing[1], spacing[2]]
        ds.SliceThickness = spacing[0]
        ds.Rows, ds.Columns = height, width
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 0
        ds.RescaleIntercept = intercept
        ds.RescaleSlope = slope
        stored = np.rint((hu[k] - intercept) / slope).astype(np.uint16)
        ds.PixelData = stored.tobytes()
        ds.save_as(folder / name, enforce_file_format=True)
    return series_uid


def cli_error(capsys) -> str:
    """The CLI's one error line: the last on stderr, the only one besides progress bars."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("lungbench ")]
    assert len(errors) == 1 and errors[0] == lines[-1], err
    return errors[0]


def truncate(path, size=400):
    """Cut a file to its first `size` bytes, as an interrupted download does."""
    path.write_bytes(path.read_bytes()[:size])


def _volume(shape=(6, 16, 20), seed=0):
    return np.random.default_rng(seed).integers(-1000, 400, shape).astype(np.int16)


def test_round_trip_sorted_rescaled_with_spacing(tmp_path):
    hu = _volume()
    uid = write_series(tmp_path / "s", hu, slope=1.0, intercept=-1024.0)
    series = load_series(tmp_path / "s")
    np.testing.assert_array_equal(series.hu, hu)
    assert series.spacing == pytest.approx((2.5, 0.7, 0.8))
    assert series.series_uid == uid
    np.testing.assert_array_equal(series.instance_numbers, np.arange(1, 7))
    assert series.slice_index(-100 + 2.5 * 2) == pytest.approx(2.0)


def test_slope_is_applied(tmp_path):
    hu = (_volume() // 2) * 2  # representable with slope 2
    write_series(tmp_path / "s", hu, slope=2.0, intercept=-2048.0)
    np.testing.assert_array_equal(load_series(tmp_path / "s").hu, hu)


def test_missing_folder_and_empty_folder(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_series(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no slices here")
    with pytest.raises(DataError, match="empty: no DICOM files"):
        load_series(tmp_path / "empty")


def test_unreadable_file_is_named(tmp_path):
    write_series(tmp_path / "s", _volume())
    (tmp_path / "s" / "broken.dcm").write_bytes(b"this is not dicom")
    with pytest.raises(DataError, match="broken.dcm: not a readable DICOM"):
        load_series(tmp_path / "s")


def test_truncated_slice_is_named_not_a_mixed_series(tmp_path):
    # Cut to 400 bytes, a slice keeps its file meta but loses SeriesInstanceUID and pixels;
    # it was reported as "mixed series (2 SeriesInstanceUIDs: , ...)".
    uid = write_series(tmp_path / "s", _volume(), names=[f"a{k}.dcm" for k in range(6)])
    truncate(tmp_path / "s" / "a0.dcm")
    with pytest.raises(DataError) as error:
        load_series(tmp_path / "s")
    message = str(error.value)
    assert message.startswith(f"{tmp_path / 's' / 'a0.dcm'}: not a readable DICOM image")
    assert "missing SeriesInstanceUID" in message and "PixelData" in message
    assert "mixed series" not in message
    assert series_uid_of(tmp_path / "s") == uid  # the series is still found by its UID


def test_slice_file_names_without_dcm(tmp_path):
    hu = _volume()
    write_series(
        tmp_path / "s", hu, names=[f"1.3.6.1.{k}" if k % 2 else f"IM{k}" for k in range(6)]
    )
    (tmp_path / "s" / "notes.txt").write_text("not a slice")
    np.testing.assert_array_equal(load_series(tmp_path / "s").hu, hu)
    assert [is_slice_name(n) for n in ("1-001.dcm", "IM0", "1.3.6.1.7", "a.xml", ".DS_Store")] == [
        True,
        True,
        True,
        False,
        False,
    ]


def test_mixed_series(tmp_path):
    write_series(tmp_path / "s", _volume(), names=[f"a{k}.dcm" for k in range(6)])
    write_series(tmp_path / "s", _volume(), z0=300.0, names=[f"b{k}.dcm" for k in range(6)])
    with pytest.raises(DataError, match="mixed series"):
        load_series(tmp_path / "s")


def test_series_uid_selects_one_of_mixed(tmp_path):
    uid = write_series(tmp_path / "s", _volume(), names=[f"a{k}.dcm" for k in range(6)])
    write_series(tmp_path / "s", _volume(), z0=300.0, names=[f"b{k}.dcm" for k in range(6)])
    assert load_series(tmp_path / "s", series_uid=uid).hu.shape == (6, 16, 20)


def test_duplicate_slice(tmp_path):
    write_series(tmp_path / "s", _volume(), positions=[0, 2.5, 5, 5, 7.5, 10])
    with pytest.raises(DataError, match="duplicate slice position"):
        load_series(tmp_path / "s")


def test_missing_slice(tmp_path):
    write_series(tmp_path / "s", _volume(), positions=[0, 2.5, 5, 10, 12.5, 15])
    with pytest.raises(DataError, match=r"s: missing slice\(s\)"):
        load_series(tmp_path / "s")


def test_non_uniform_spacing(tmp_path):
    write_series(tmp_path / "s", _volume(), positions=[0, 2.5, 5, 8.5, 11, 13.5])
    with pytest.raises(DataError, match="non-uniform slice spacing"):
        load_series(tmp_path / "s")


def test_cut_cube_preserves_hu_and_pads_with_air():
    volume = np.full((20, 30, 30), -700, np.int16)
    cube = cut_cube(volume, (2.0, 1.0, 1.0), (10, 15, 15), (8, 8, 8), (16, 16, 16))
    np.testing.assert_allclose(cube, -700, atol=1e-3)
    corner = cut_cube(volume, (2.0, 1.0, 1.0), (0, 0, 0), (8, 8, 8), (32, 32, 32))
    assert corner[0, 0, 0] == pytest.approx(-1000) and corner[-1, -1, -1] == pytest.approx(-700)


def test_cut_cubes_centre_on_a_point():
    volume = np.full((40, 64, 64), -850.0, np.float32)
    volume[18:23, 28:37, 28:37] = 40.0  # a 10 x 9 x 9 mm block at 2 x 1 x 1 mm spacing
    cubes = cut_cubes(volume, (2.0, 1.0, 1.0), (20, 32, 32), geometry("default"))
    zoom = cubes["zoom"][0]
    assert cubes["context"].shape == (1, 32, 32, 32) and zoom.shape == (1, 32, 32, 32)[1:]
    # The bright block sits in the middle of the zoom cube, symmetric about the centre.
    profile = zoom[:, 16, 16]
    assert profile[16] > 0 and profile[2] < -800
    assert np.argmax(profile > -400) in (11, 12)


def test_resample_isotropic_keeps_extent_and_values():
    volume = np.full((10, 20, 20), 30, np.int16)
    iso, spacing = resample_isotropic(volume, (2.5, 0.5, 0.5), 1.0)
    assert iso.shape == (25, 10, 10) and spacing == (1.0, 1.0, 1.0)
    np.testing.assert_allclose(iso, 30, atol=1e-3)


def test_dataset_written_is_valid_dicom(tmp_path):
    write_series(tmp_path / "s", _volume((3, 8, 8)))
    ds = pydicom.dcmread(next((tmp_path / "s").iterdir()))
    assert ds.Modality == "CT" and ds.pixel_array.shape == (8, 8)
