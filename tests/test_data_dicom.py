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


# --- the CT volume check: one test per case of issue #17 ----------------------------------

NAMES = [f"s{k}.dcm" for k in range(6)]  # slice k at position z0 + k * step


def edit_slices(folder, edit, names=None):
    """Apply `edit(ds)` to the slices called `names` (every slice by default); save them."""
    for path in sorted(folder.iterdir()):
        if names is None or path.name in names:
            ds = pydicom.dcmread(path)
            edit(ds)
            ds.save_as(path)


def _series(tmp_path, **kw):
    folder = tmp_path / "s"
    write_series(folder, _volume(), names=NAMES, **kw)
    return folder


def _refused(folder, pattern, **kw) -> str:
    with pytest.raises(DataError, match=pattern) as error:
        load_series(folder, **kw)
    message = str(error.value)
    assert "\n" not in message and "force=True" not in message
    return message


def test_pixel_spacing_of_one_slice_is_named_even_when_it_sorts_first(tmp_path):
    # The first slice's PixelSpacing used to be the volume's: a store at the wrong mm scale.
    folder = _series(tmp_path)
    edit_slices(folder, lambda ds: setattr(ds, "PixelSpacing", [0.9, 0.9]), ["s0.dcm"])
    message = _refused(folder, "PixelSpacing")
    assert message.startswith(f"{folder / 's0.dcm'}: PixelSpacing [0.9, 0.9] differs from")
    assert "the series' [0.7, 0.8] (5 of 6 slices" in message


def test_pixel_spacing_within_tolerance_is_one_grid(tmp_path):
    folder = _series(tmp_path)
    edit_slices(folder, lambda ds: setattr(ds, "PixelSpacing", [0.7004, 0.8]), ["s0.dcm"])
    assert load_series(folder).spacing == pytest.approx((2.5, 0.7, 0.8), abs=1e-3)


def _rgb(ds):
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    ds.PlanarConfiguration = 0
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelData = bytes(ds.Rows * ds.Columns * 3)


def test_colour_slice_is_refused(tmp_path):
    # RGB came back as a 4-D "volume" and crashed later with a traceback.
    folder = _series(tmp_path)
    edit_slices(folder, _rgb)
    _refused(folder, r"SamplesPerPixel 3, PhotometricInterpretation RGB: not a grayscale")


def test_multi_frame_file_is_refused(tmp_path):
    folder = tmp_path / "mf"
    write_series(folder, _volume((1, 16, 20)), names=["all.dcm"])

    def frames(ds):
        ds.NumberOfFrames = 6
        ds.PixelData = ds.PixelData * 6

    edit_slices(folder, frames)
    _refused(folder, r"all.dcm: NumberOfFrames 6: a multi-frame image")


def test_dose_grid_is_not_converted_to_hu(tmp_path):
    # An RTDOSE grid was written as "HU", clipped to a constant.
    folder = _series(tmp_path)

    def dose(ds):
        ds.Modality = "RTDOSE"
        ds.BitsAllocated = ds.BitsStored = 32
        ds.HighBit = 31
        ds.PixelData = bytes(ds.Rows * ds.Columns * 4)

    edit_slices(folder, dose)
    _refused(folder, r"s0.dcm: Modality 'RTDOSE' is not CT: only CT pixel values are Hounsfield")


def test_mr_is_refused_unless_allowed(tmp_path):
    folder = _series(tmp_path)
    edit_slices(folder, lambda ds: setattr(ds, "Modality", "MR"))
    _refused(folder, r"Modality 'MR' is not CT.*allow it with --allow-modality MR")
    assert load_series(folder, modalities=("CT", "MR")).hu.shape == (6, 16, 20)


def test_non_axial_slice_is_named_not_a_missing_slice(tmp_path):
    # A sagittal slice in an axial series was reported as a "missing slice".
    folder = _series(tmp_path)
    edit_slices(folder, lambda ds: setattr(ds, "ImageOrientationPatient", [0, 1, 0, 0, 0, -1]))
    _refused(
        folder, r"ImageOrientationPatient \[0, 1, 0, 0, 0, -1\] is not axial \(slice normal 90"
    )
    edit_slices(
        folder, lambda ds: setattr(ds, "ImageOrientationPatient", [1, 0, 0, 0, 1, 0]), NAMES[1:]
    )
    message = _refused(folder, "s0.dcm: ImageOrientationPatient")
    assert "differs from the series' [1, 0, 0, 0, 1, 0]" in message
    assert "missing" not in message


def test_in_plane_shift_is_refused(tmp_path):
    folder = _series(tmp_path)
    edit_slices(
        folder, lambda ds: setattr(ds, "ImagePositionPatient", [-47.0, -60.0, -92.5]), ["s3.dcm"]
    )
    message = _refused(folder, r"s3.dcm: ImagePositionPatient \[-47, -60, -92.5\] lies 3.00 mm off")
    assert "a slice shifted in-plane" in message


def test_gantry_tilt_is_refused(tmp_path):
    # Tilt in the header ...
    folder = _series(tmp_path)
    edit_slices(folder, lambda ds: setattr(ds, "GantryDetectorTilt", 15.0))
    _refused(folder, r"GantryDetectorTilt 15 degrees: a tilted acquisition")
    # ... or only in the positions: they drift along y as the table moves (tan 15 deg).
    folder = tmp_path / "drift"
    write_series(folder, _volume(), names=NAMES)
    for k, name in enumerate(NAMES):
        y = -60.0 + k * 2.5 * np.tan(np.radians(15))
        edit_slices(
            folder,
            lambda ds, y=y: setattr(ds, "ImagePositionPatient", [-50, y, ds[0x200032].value[2]]),
            [name],
        )
    _refused(folder, r"drift in-plane by 0.268 mm per mm .* gantry tilt of about 15.0 degrees")


def test_stored_values_beyond_bits_stored_are_refused(tmp_path):
    # pydicom returns unsigned values unmasked and signed ones sign-extended from HighBit:
    # when the values need more bits than BitsStored, the header does not describe them.
    folder = tmp_path / "s"
    write_series(folder, np.full((3, 4, 5), 3000, np.int16))  # stored 4024 < 2**12

    def bits(ds):
        ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 12, 11, 1

    edit_slices(folder, bits)
    _refused(folder, r"stored pixel values 4024..4024 do not fit BitsStored 12 \(signed")


def test_pixel_data_longer_than_rows_say_is_refused(tmp_path):
    # pydicom read the first rows of the data as the image, with only a warning.
    folder = _series(tmp_path)
    edit_slices(folder, lambda ds: setattr(ds, "Rows", 8))
    _refused(folder, r"PixelData has 640 bytes, Rows x Columns 8x20 at 16 bits needs 320")


def test_unreadable_file_message_has_no_force_advice(tmp_path):
    folder = _series(tmp_path)
    (folder / "notes").write_bytes(b"plain text, not DICOM")
    message = _refused(folder, r"notes: not a readable DICOM file \(no 'DICM' marker")
    assert "force" not in message


def test_foreign_warnings_go_to_our_log_not_the_terminal(capsys):
    # pydicom's "use force=True" and matplotlib's warnings reached the terminal.
    import logging
    import sys
    import warnings

    from lungbench.core.console import FOREIGN, capture_foreign_messages

    def to_stderr(message, category, filename, lineno, file=None, line=None):
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))

    seen = []
    relay = logging.Handler(logging.DEBUG)
    relay.emit = lambda record: seen.append(record.getMessage())
    foreign = logging.getLogger(FOREIGN)
    foreign.addHandler(relay)
    # The relay needs DEBUG; a CLI test earlier in this process may have given the parent
    # "lungbench" logger its stderr handler, which would then print them: not what a user sees
    # (the CLI leaves the foreign logger at the parent's INFO).
    level, foreign.level = foreign.level, logging.DEBUG
    propagate, foreign.propagate = foreign.propagate, False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = to_stderr  # what a terminal gets outside pytest
            logging.captureWarnings(False)  # forget the state an earlier CLI call saved
            capture_foreign_messages()
            try:
                warnings.warn_explicit("Use force=True", UserWarning, "pydicom/filereader.py", 1)
                logging.getLogger("matplotlib.font_manager").warning("building the font cache")
                logging.getLogger("nibabel.global").warning("setting 0 dims to 1")
            finally:
                logging.captureWarnings(False)
    finally:
        foreign.removeHandler(relay)
        foreign.level, foreign.propagate = level, propagate
    assert capsys.readouterr().err == ""
    assert any("py.warnings:" in m and "Use force=True" in m for m in seen), seen
    assert "matplotlib.font_manager: building the font cache" in seen
    assert "nibabel.global: setting 0 dims to 1" in seen
