"""Layer 3 (data): DICOM CT series -> a HU volume with its voxel spacing (pydicom).

    series = load_series("LIDC-IDRI-0078/.../1.3.6.1...")      # one folder = one series
    series.hu          # (D, H, W) int16 Hounsfield units, slices sorted along the slice normal
    series.spacing     # (dz, dy, dx) mm: slice step from the positions, rows/cols PixelSpacing

Every series passes a CT volume check before any pixel is converted; each failure is a
DataError of one line naming the file (or the folder), the DICOM attribute and its values:

* files: no DICOM files, an unreadable file, a file without SeriesInstanceUID, image size or
  pixels (a truncated slice), several series (different SeriesInstanceUID) in one folder;
* kind: Modality CT (others only when listed in `modalities`, e.g. `--allow-modality MR`),
  single-frame grayscale (SamplesPerPixel 1, PhotometricInterpretation MONOCHROME1/2,
  NumberOfFrames absent or 1), 16-bit pixels as the CT Image IOD requires (BitsAllocated 16,
  BitsStored 12..16, HighBit = BitsStored - 1, stored values that fit BitsStored), pixel
  data of the size Rows x Columns says, a usable RescaleSlope / RescaleIntercept;
* one grid: the same Rows x Columns, PixelSpacing (within `PIXEL_SPACING_TOLERANCE_MM`) and
  ImageOrientationPatient (within `ORIENTATION_TOLERANCE`) on every slice, the one that
  differs from the series' value named;
* axial: the slice normal within `AXIAL_TOLERANCE_DEG` of the patient's z axis;
* no tilt: GantryDetectorTilt within `TILT_TOLERANCE_DEG`, and every ImagePositionPatient on
  one line along the slice normal (in-plane offsets within `IN_PLANE_TOLERANCE_PX` pixels):
  a tilted or sheared series would be cut as if its slices were stacked straight;
* steps: no duplicate slice positions, no missing slices (a gap of about twice the step),
  no non-uniform slice spacing beyond `spacing_tolerance` (relative).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lungbench.core.errors import DataError, message_of

log = logging.getLogger(__name__)

# Files that sit next to DICOM slices in the archives and are not slices.
IGNORED_SUFFIXES = {
    ".xml",
    ".txt",
    ".csv",
    ".xlsx",
    ".xls",
    ".json",
    ".md",
    ".zip",
    ".png",
    ".jpg",
    ".nii",
    ".gz",
    ".h5",
}

# Tolerances of the CT volume check. Headers store decimal strings, so equal values can
# differ in the last digits; anything beyond these is a different grid.
PIXEL_SPACING_TOLERANCE_MM = 1e-3  # PixelSpacing of each slice vs the series'
ORIENTATION_TOLERANCE = 1e-3  # direction cosines: vs the series', unit length, orthogonal
AXIAL_TOLERANCE_DEG = 1.0  # slice normal vs the patient's z (head-feet) axis
TILT_TOLERANCE_DEG = 0.1  # |GantryDetectorTilt|
IN_PLANE_TOLERANCE_PX = 0.5  # a slice position off the line along the normal, in pixels
GRAYSCALE = ("MONOCHROME1", "MONOCHROME2")
CT_BITS_STORED = range(12, 17)  # the CT Image IOD: BitsAllocated 16, BitsStored 12..16


@dataclass(frozen=True)
class Series:
    """One CT series as a volume. Index order (z, y, x) = (slice, row, column)."""

    hu: np.ndarray  # (D, H, W) int16 HU
    spacing: tuple[float, float, float]  # (dz, dy, dx) mm
    positions: np.ndarray  # (D,) mm along the slice normal (ascending)
    instance_numbers: np.ndarray  # (D,) int, -1 where the header lacks InstanceNumber
    series_uid: str
    path: Path
    files: tuple[str, ...]  # file name of each slice, in volume order

    def slice_index(self, z_mm: float) -> float:
        """Fractional slice index of the position `z_mm` along the slice normal."""
        return float(
            np.interp(
                z_mm,
                self.positions,
                np.arange(len(self.positions)),
                left=-1.0,
                right=float(len(self.positions)),
            )
        )


@dataclass(frozen=True)
class _Grid:
    """The pixel grid every slice of a series shares."""

    pixel_spacing: tuple[float, float]  # (dy, dx) mm: between rows, between columns
    row: np.ndarray  # unit vector along a row (increasing column), patient mm
    column: np.ndarray  # unit vector along a column (increasing row)
    normal: np.ndarray  # row x column


# Header elements every CT slice has; a slice cut short (a truncated download) lacks them.
REQUIRED_ELEMENTS = ("SeriesInstanceUID", "Rows", "Columns", "PixelData")


def is_slice_name(name: str) -> bool:
    """Whether a file name can be a DICOM slice: not hidden, not a known non-DICOM type.

    Archives name slices `1-001.dcm`, by UID (`1.3.6.1...`) or without an extension, so
    every other name is a candidate (extensions in any letter case). The one rule for
    `dicom_files` and the folder searches of the LIDC and LUNGx readers.
    """
    return not name.startswith(".") and Path(name).suffix.lower() not in IGNORED_SUFFIXES


def dicom_files(folder: str | os.PathLike) -> list[Path]:
    """Candidate slice files of a folder (`is_slice_name`), sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: DICOM folder not found")
    files = sorted(p for p in folder.iterdir() if p.is_file() and is_slice_name(p.name))
    if not files:
        raise DataError(f"{folder}: no DICOM files (*.dcm or other slice files) in the folder")
    return files


def read_header(path: Path, pixels: bool = True):
    """pydicom dataset of one file; DataError naming the file if it is not readable DICOM."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(path, stop_before_pixels=not pixels)
    except InvalidDicomError:
        # pydicom's message ends in "use force=True", advice for programmers, not users.
        raise DataError(
            f"{path}: not a readable DICOM file (no 'DICM' marker after the 128-byte "
            f"preamble: not DICOM, or damaged)"
        ) from None
    except (OSError, ValueError, EOFError, TypeError, KeyError) as exc:
        raise DataError(f"{path}: not a readable DICOM file ({_our_words(exc)})") from None


def _our_words(exc: BaseException) -> str:
    """A third-party error message without advice the user cannot act on (pydicom's
    "use force=True", "pass 'allow_excess_frames=False'": options of a Python call)."""
    text = message_of(exc)
    kept = [s for s in text.split(". ") if "force=True" not in s and "pass '" not in s]
    return ". ".join(kept).strip() or type(exc).__name__


def series_uid_of(folder: str | os.PathLike) -> str | None:
    """SeriesInstanceUID of the first readable slice in `folder` (None if there is none)."""
    try:
        files = dicom_files(folder)
    except DataError:
        return None
    for path in files[:3]:
        try:
            uid = str(read_header(path, pixels=False).get("SeriesInstanceUID", ""))
        except DataError:
            continue
        if uid:  # a truncated slice has none: ask the next one
            return uid
    return None


def load_series(
    folder: str | os.PathLike,
    series_uid: str | None = None,
    spacing_tolerance: float = 0.1,
    modalities: Collection[str] = ("CT",),
) -> Series:
    """Read every slice of one series in `folder` into a HU volume (see module docstring).

    Args:
        folder: a directory holding the slices of one series.
        series_uid: keep only this series when the folder holds several (else DataError).
        spacing_tolerance: largest relative deviation of a slice step from the median step.
        modalities: the DICOM Modality values accepted; only CT values are Hounsfield units.
    """
    folder = Path(folder)
    datasets = [(p, read_header(p)) for p in dicom_files(folder)]
    for path, ds in datasets:
        _check_complete(path, ds)
    datasets = _one_series(folder, datasets, series_uid)
    check_ct_slices(datasets, modalities)
    grid = series_grid(datasets)
    ipp = np.stack([_floats(p, ds, "ImagePositionPatient", 3) for p, ds in datasets])
    positions = ipp @ grid.normal
    order = np.argsort(positions, kind="stable")
    datasets = [datasets[i] for i in order]
    positions, ipp = positions[order], ipp[order]
    names = [p.name for p, _ in datasets]
    dz = _check_steps(folder, positions, names, spacing_tolerance)
    _check_one_line(datasets, ipp, positions, grid)
    hu = np.stack([_slice_hu(p, ds) for p, ds in datasets])
    instance = np.array([_instance_number(ds) for _, ds in datasets])
    return Series(
        hu=hu,
        spacing=(dz, *grid.pixel_spacing),
        positions=positions,
        instance_numbers=instance,
        series_uid=str(datasets[0][1].get("SeriesInstanceUID", "")),
        path=folder,
        files=tuple(names),
    )


def _check_complete(path: Path, ds) -> None:
    """DataError naming the file when it lacks what every CT slice has (a truncated file)."""
    missing = [name for name in REQUIRED_ELEMENTS if not _present(ds, name)]
    if missing:
        raise DataError(
            f"{path}: not a readable DICOM image (missing {', '.join(missing)}; "
            f"a truncated or non-image file)"
        )


def _present(ds, name: str) -> bool:
    try:
        value = ds.get(name)
    except Exception:  # a value cut short can fail to decode
        return False
    if value is None:
        return False
    return bool(value) if isinstance(value, bytes) else str(value) != ""


def _one_series(folder: Path, datasets: list, series_uid: str | None) -> list:
    uids = sorted({str(ds.get("SeriesInstanceUID", "")) for _, ds in datasets})
    if series_uid is not None:
        kept = [(p, ds) for p, ds in datasets if str(ds.get("SeriesInstanceUID", "")) == series_uid]
        if not kept:
            raise DataError(f"{folder}: no slice of series {series_uid}; found {', '.join(uids)}")
        return kept
    if len(uids) > 1:
        raise DataError(
            f"{folder}: mixed series in one folder ({len(uids)} SeriesInstanceUIDs: "
            f"{', '.join(u[-12:] for u in uids)}); keep one series per folder"
        )
    return datasets


# --- the CT volume check: what each slice is ---------------------------------------------


def check_ct_slices(datasets: Sequence[tuple[Path, object]], modalities: Collection[str]) -> None:
    """DataError naming the first slice that is not a single-frame 16-bit grayscale image of
    an allowed modality, whose pixel data do not match its header, or whose slice size
    differs from the series'."""
    allowed = {m.strip().upper() for m in modalities}
    for path, ds in datasets:
        _check_modality(path, ds, allowed)
        _check_grayscale_single_frame(path, ds)
        _check_bits(path, ds)
        _check_pixel_bytes(path, ds)
    sizes = [(_integer(p, ds, "Rows"), _integer(p, ds, "Columns")) for p, ds in datasets]
    usual = max(set(sizes), key=sizes.count)
    for (path, _), size in zip(datasets, sizes, strict=True):
        if size != usual:
            raise DataError(
                f"{path}: Rows x Columns {size[0]}x{size[1]} differs from the series' "
                f"{usual[0]}x{usual[1]} ({sizes.count(usual)} of {len(sizes)} slices)"
            )
    others = allowed - {"CT"}
    if others:
        found = {str(ds.get("Modality", "")).strip().upper() for _, ds in datasets} - {"CT"}
        if found:
            log.warning(
                f"{datasets[0][0].parent}: Modality {', '.join(sorted(found))} allowed; "
                f"its values are not Hounsfield units"
            )


def _check_modality(path: Path, ds, allowed: set[str]) -> None:
    modality = str(ds.get("Modality", "")).strip().upper()
    if modality in allowed:
        return
    expected = " or ".join(sorted(allowed))
    if not modality:
        raise DataError(f"{path}: Modality missing (expected {expected}); not a CT slice")
    raise DataError(
        f"{path}: Modality {modality!r} is not {expected}: only CT pixel values are "
        f"Hounsfield units; allow it with --allow-modality {modality}"
    )


def _check_grayscale_single_frame(path: Path, ds) -> None:
    samples = _integer(path, ds, "SamplesPerPixel", default=1)
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    if samples != 1 or photometric not in GRAYSCALE:
        raise DataError(
            f"{path}: SamplesPerPixel {samples}, PhotometricInterpretation "
            f"{photometric or 'missing'}: not a grayscale CT slice (expected 1 sample, "
            f"{' or '.join(GRAYSCALE)}; colour images such as screenshots are not CT data)"
        )
    frames = _integer(path, ds, "NumberOfFrames", default=1)
    if frames != 1:
        raise DataError(
            f"{path}: NumberOfFrames {frames}: a multi-frame image (an enhanced CT, a dose "
            f"grid or a cine loop); lungbench reads series of single-frame slices"
        )


def _check_bits(path: Path, ds) -> None:
    allocated = _integer(path, ds, "BitsAllocated", default=0)
    stored = _integer(path, ds, "BitsStored", default=0)
    high = _integer(path, ds, "HighBit", default=-1)
    sign = _integer(path, ds, "PixelRepresentation", default=0)
    if allocated != 16 or stored not in CT_BITS_STORED or high != stored - 1 or sign not in (0, 1):
        raise DataError(
            f"{path}: BitsAllocated {allocated}, BitsStored {stored}, HighBit {high}, "
            f"PixelRepresentation {sign}: not the pixel format of a CT slice (BitsAllocated "
            f"16, BitsStored 12..16, HighBit = BitsStored - 1, PixelRepresentation 0 or 1)"
        )


def _check_pixel_bytes(path: Path, ds) -> None:
    """Uncompressed pixel data must be exactly Rows x Columns 16-bit values: more would be
    read as the first rows of a wrong image, and stored values that do not fit BitsStored
    mean that the header does not describe the data."""
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if syntax is None or syntax.is_encapsulated or not syntax.is_little_endian:
        return  # compressed: the decoder checks the size
    rows, columns = _integer(path, ds, "Rows"), _integer(path, ds, "Columns")
    expected = rows * columns * 2
    data = ds.PixelData
    if len(data) not in (expected, expected + 1):  # one pad byte keeps the length even
        raise DataError(
            f"{path}: PixelData has {len(data)} bytes, Rows x Columns {rows}x{columns} at "
            f"16 bits needs {expected}: the header does not describe the pixels"
        )
    stored = _integer(path, ds, "BitsStored")
    if stored == 16:
        return
    signed = _integer(path, ds, "PixelRepresentation", default=0) == 1
    raw = np.frombuffer(data, dtype="<i2" if signed else "<u2", count=rows * columns)
    lo, hi = (-(2 ** (stored - 1)), 2 ** (stored - 1) - 1) if signed else (0, 2**stored - 1)
    if raw.min() < lo or raw.max() > hi:
        raise DataError(
            f"{path}: stored pixel values {int(raw.min())}..{int(raw.max())} do not fit "
            f"BitsStored {stored} ({'signed' if signed else 'unsigned'}: {lo}..{hi}); "
            f"the header does not describe the pixels"
        )


# --- the CT volume check: one grid, axial, untilted --------------------------------------


def series_grid(datasets: Sequence[tuple[Path, object]]) -> _Grid:
    """The PixelSpacing and orientation every slice shares; DataError naming a slice that
    differs from the series, a non-axial series or a tilted gantry."""
    spacings = np.stack([_pixel_spacing(p, ds) for p, ds in datasets])
    orientations = np.stack([_orientation(p, ds) for p, ds in datasets])
    spacing = _shared(datasets, spacings, "PixelSpacing", PIXEL_SPACING_TOLERANCE_MM, " mm")
    iop = _shared(datasets, orientations, "ImageOrientationPatient", ORIENTATION_TOLERANCE, "")
    row, column = iop[:3], iop[3:]
    normal = np.cross(row, column)
    angle = math.degrees(math.acos(min(1.0, abs(float(normal[2])))))
    if angle > AXIAL_TOLERANCE_DEG:
        raise DataError(
            f"{datasets[0][0]}: ImageOrientationPatient {_show(iop)} is not axial (slice "
            f"normal {angle:.1f} degrees from the patient's head-feet axis, tolerance "
            f"{AXIAL_TOLERANCE_DEG:g}); lungbench reads axial CT series"
        )
    for path, ds in datasets:
        tilt = _float(path, ds, "GantryDetectorTilt", default=0.0)
        if abs(tilt) > TILT_TOLERANCE_DEG:
            raise DataError(
                f"{path}: GantryDetectorTilt {tilt:g} degrees: a tilted acquisition, whose "
                f"slices are sheared (tolerance {TILT_TOLERANCE_DEG:g}); resample it to an "
                f"untilted grid first"
            )
    return _Grid((float(spacing[0]), float(spacing[1])), row, column, normal)


def _shared(datasets, values: np.ndarray, tag: str, tolerance: float, unit: str) -> np.ndarray:
    """The value of `tag` that the series shares: the slice's value nearest the median of
    all (so that one odd slice is named, even when it sorts first); DataError naming the
    first slice farther than `tolerance` from it."""
    median = np.median(values, axis=0)
    reference = values[np.argmin(np.abs(values - median).max(axis=1))]
    off = np.abs(values - reference).max(axis=1)
    bad = np.flatnonzero(off > tolerance)
    if bad.size:
        i = int(bad[0])
        raise DataError(
            f"{datasets[i][0]}: {tag} {_show(values[i])} differs from the series' "
            f"{_show(reference)} ({len(values) - bad.size} of {len(values)} slices; "
            f"tolerance {tolerance:g}{unit}); one series must have one pixel grid"
        )
    return reference


def _check_one_line(datasets, ipp: np.ndarray, positions: np.ndarray, grid: _Grid) -> None:
    """DataError when the slice positions leave the line along the slice normal: their
    in-plane drift is a gantry tilt (or a sheared series), a single offset a shifted slice."""
    inplane = np.stack([ipp @ grid.row, ipp @ grid.column], axis=1)  # (D, 2) mm
    offsets = inplane - np.median(inplane, axis=0)
    distance = np.hypot(offsets[:, 0], offsets[:, 1])
    tolerance = IN_PLANE_TOLERANCE_PX * min(grid.pixel_spacing)
    if distance.max() <= tolerance:
        return
    i = int(np.argmax(distance))
    slope = np.polyfit(positions - positions.mean(), inplane, 1)[0]  # (2,) mm per mm
    fitted = (positions - positions.mean())[:, None] * slope + inplane.mean(axis=0)
    drifting = np.hypot(*(inplane - fitted).T).max() <= tolerance
    what = (
        f"the positions drift in-plane by {np.hypot(*slope):.3f} mm per mm along the slice "
        f"normal, a gantry tilt of about {math.degrees(math.atan(np.hypot(*slope))):.1f} "
        f"degrees or a sheared series"
        if drifting
        else "a slice shifted in-plane"
    )
    raise DataError(
        f"{datasets[i][0]}: ImagePositionPatient {_show(ipp[i])} lies {distance[i]:.2f} mm "
        f"off the line of the series' slices along their normal (tolerance {tolerance:.2f} "
        f"mm, {IN_PLANE_TOLERANCE_PX:g} pixel): {what}; lungbench reads slices stacked "
        f"straight along their normal"
    )


def _check_steps(
    folder: Path, positions: np.ndarray, names: Sequence[str], tolerance: float
) -> float:
    """The slice step in mm; DataError for duplicate, missing or unevenly spaced slices."""
    if len(positions) < 2:
        raise DataError(f"{folder}: a single slice, not a volume")
    steps = np.diff(positions)
    dup = np.flatnonzero(steps < 1e-3)
    if dup.size:
        i = int(dup[0])
        raise DataError(
            f"{folder}: duplicate slice position {positions[i]:.2f} mm "
            f"({names[i]} and {names[i + 1]})"
        )
    step = float(np.median(steps))
    bad = np.flatnonzero(np.abs(steps - step) > tolerance * step)
    if bad.size:
        i = int(bad[0])
        what = (
            "missing slice(s)"
            if abs(steps[i] / step - round(steps[i] / step)) <= tolerance and steps[i] > step
            else "non-uniform slice spacing"
        )
        raise DataError(
            f"{folder}: {what}: step {steps[i]:.2f} mm between {names[i]} and "
            f"{names[i + 1]}, median step {step:.2f} mm (tolerance "
            f"{tolerance:.0%})"
        )
    return step


# --- pixels -------------------------------------------------------------------------------


def _slice_hu(path: Path, ds) -> np.ndarray:
    """Pixels of one slice in HU (RescaleSlope / RescaleIntercept applied), int16."""
    try:
        pixels = ds.pixel_array.astype(np.float32)
    except Exception as exc:  # pydicom raises many types for broken or compressed pixels
        raise DataError(f"{path}: cannot decode pixel data ({_our_words(exc)})") from None
    shape = (_integer(path, ds, "Rows"), _integer(path, ds, "Columns"))
    if pixels.shape != shape:
        raise DataError(
            f"{path}: decoded pixels have shape {pixels.shape}, Rows x Columns says {shape}"
        )
    slope = _float(path, ds, "RescaleSlope", default=1.0)
    intercept = _float(path, ds, "RescaleIntercept", default=0.0)
    if slope == 0:
        raise DataError(f"{path}: RescaleSlope 0 maps every pixel to one value")
    hu = np.rint(pixels * slope + intercept)
    if hu.min() < -32768 or hu.max() > 32767:
        raise DataError(
            f"{path}: RescaleSlope {slope:g}, RescaleIntercept {intercept:g} give values "
            f"{hu.min():g}..{hu.max():g}, outside the int16 range of Hounsfield units"
        )
    return hu.astype(np.int16)


# --- header values as numbers, in one line when they are not -------------------------------


def _raw(ds, name: str):
    try:
        return ds.get(name)
    except Exception:  # a malformed value can fail to decode
        return "<unreadable>"


def _floats(path: Path, ds, name: str, count: int) -> np.ndarray:
    value = _raw(ds, name)
    if value is None or value == "":
        raise DataError(f"{path}: DICOM slice without {name}")
    try:
        numbers = np.array([float(v) for v in value], dtype=float)
    except (TypeError, ValueError):
        numbers = np.array([])
    if numbers.shape != (count,) or not np.isfinite(numbers).all():
        raise DataError(f"{path}: {name} {value!s} is not {count} finite numbers")
    return numbers


def _float(path: Path, ds, name: str, default: float) -> float:
    value = _raw(ds, name)
    if value is None or value == "":
        return default
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    if not math.isfinite(number):
        raise DataError(f"{path}: {name} {value!s} is not a finite number")
    return number


def _integer(path: Path, ds, name: str, default: int | None = None) -> int:
    value = _raw(ds, name)
    if value is None or value == "":
        if default is None:
            raise DataError(f"{path}: DICOM slice without {name}")
        return default
    try:
        return int(value)
    except (TypeError, ValueError):
        raise DataError(f"{path}: {name} {value!s} is not an integer") from None


def _instance_number(ds) -> int:
    try:
        return int(ds.get("InstanceNumber", -1) or -1)
    except (TypeError, ValueError):
        return -1  # only used to find a slice by number; positions order the volume


def _pixel_spacing(path: Path, ds) -> np.ndarray:
    spacing = _floats(path, ds, "PixelSpacing", 2)
    if (spacing <= 0).any():
        raise DataError(f"{path}: PixelSpacing {_show(spacing)} is not two positive numbers")
    return spacing


def _orientation(path: Path, ds) -> np.ndarray:
    iop = _floats(path, ds, "ImageOrientationPatient", 6)
    row, column = iop[:3], iop[3:]
    lengths = np.array([np.linalg.norm(row), np.linalg.norm(column)])
    if np.abs(lengths - 1).max() > ORIENTATION_TOLERANCE or abs(row @ column) > (
        ORIENTATION_TOLERANCE
    ):
        raise DataError(
            f"{path}: ImageOrientationPatient {_show(iop)} is not two orthogonal unit "
            f"vectors (tolerance {ORIENTATION_TOLERANCE:g})"
        )
    return iop


def _show(values: np.ndarray) -> str:
    return "[" + ", ".join(f"{float(v):.6g}" for v in values) + "]"
