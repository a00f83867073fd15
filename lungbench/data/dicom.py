"""Layer 3 (data): DICOM CT series -> a HU volume with its voxel spacing (pydicom).

    series = load_series("LIDC-IDRI-0078/.../1.3.6.1...")      # one folder = one series
    series.hu          # (D, H, W) int16 Hounsfield units, slices sorted along the slice normal
    series.spacing     # (dz, dy, dx) mm: slice step from the positions, rows/cols PixelSpacing

Checks, each a DataError naming the folder or file: no DICOM files, an unreadable file, a
file without SeriesInstanceUID, image size or pixels (a truncated slice), several series
(different SeriesInstanceUID) in one folder, slices of different size, duplicate slice
positions, missing slices (a gap of about twice the step), and non-uniform slice spacing
beyond `spacing_tolerance` (relative).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lungbench.core.errors import DataError, message_of

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


# Header elements every CT slice has; a slice cut short (a truncated download) lacks them.
REQUIRED_ELEMENTS = ("SeriesInstanceUID", "Rows", "Columns", "PixelData")


def is_slice_name(name: str) -> bool:
    """Whether a file name can be a DICOM slice: not hidden, not a known non-DICOM type.

    Archives name slices `1-001.dcm`, by UID (`1.3.6.1...`) or without an extension, so
    every other name is a candidate. The one rule for `dicom_files` and the folder searches
    of the LIDC and LUNGx readers.
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
    except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
        raise DataError(f"{path}: not a readable DICOM file ({message_of(exc)})") from None


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
) -> Series:
    """Read every slice of one series in `folder` into a HU volume (see module docstring).

    Args:
        folder: a directory holding the slices of one series.
        series_uid: keep only this series when the folder holds several (else DataError).
        spacing_tolerance: largest relative deviation of a slice step from the median step.
    """
    folder = Path(folder)
    datasets = [(p, read_header(p)) for p in dicom_files(folder)]
    for path, ds in datasets:
        _check_complete(path, ds)
    datasets = _one_series(folder, datasets, series_uid)
    positions = np.array([_position(p, ds) for p, ds in datasets])
    order = np.argsort(positions, kind="stable")
    datasets = [datasets[i] for i in order]
    positions = positions[order]
    dz = _check_steps(folder, positions, [p.name for p, _ in datasets], spacing_tolerance)
    hu = np.stack([_slice_hu(p, ds, datasets[0][1]) for p, ds in datasets])
    dy, dx = _pixel_spacing(datasets[0][0], datasets[0][1])
    instance = np.array([int(ds.get("InstanceNumber", -1) or -1) for _, ds in datasets])
    return Series(
        hu=hu,
        spacing=(dz, dy, dx),
        positions=positions,
        instance_numbers=instance,
        series_uid=str(datasets[0][1].get("SeriesInstanceUID", "")),
        path=folder,
        files=tuple(p.name for p, _ in datasets),
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


def _position(path: Path, ds) -> float:
    """Slice position in mm along the normal of the image plane."""
    ipp = ds.get("ImagePositionPatient")
    if ipp is None:
        raise DataError(f"{path}: DICOM slice without ImagePositionPatient")
    iop = ds.get("ImageOrientationPatient", [1, 0, 0, 0, 1, 0])
    normal = np.cross(np.asarray(iop[:3], float), np.asarray(iop[3:], float))
    return float(np.dot(np.asarray(ipp, float), normal))


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


def _slice_hu(path: Path, ds, first) -> np.ndarray:
    """Pixels of one slice in HU (RescaleSlope / RescaleIntercept applied), int16."""
    if "PixelData" not in ds:
        raise DataError(f"{path}: DICOM file without pixel data")
    if (ds.Rows, ds.Columns) != (first.Rows, first.Columns):
        raise DataError(
            f"{path}: slice size {ds.Rows}x{ds.Columns} differs from the series "
            f"({first.Rows}x{first.Columns})"
        )
    try:
        pixels = ds.pixel_array.astype(np.float32)
    except Exception as exc:  # pydicom raises many types for broken or compressed pixels
        raise DataError(f"{path}: cannot decode pixel data ({message_of(exc)})") from None
    hu = pixels * float(ds.get("RescaleSlope", 1) or 1) + float(ds.get("RescaleIntercept", 0) or 0)
    return np.clip(np.rint(hu), -32768, 32767).astype(np.int16)


def _pixel_spacing(path: Path, ds) -> tuple[float, float]:
    spacing = ds.get("PixelSpacing")
    if spacing is None or len(spacing) != 2:
        raise DataError(f"{path}: DICOM slice without PixelSpacing")
    return float(spacing[0]), float(spacing[1])
