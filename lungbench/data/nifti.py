"""Layer 3 (data): NIfTI volumes (nibabel) -> (D, H, W) arrays in lungbench's (z, y, x) order.

    volume, spacing = load_nifti("CT-0/study_0001.nii.gz")   # (D, H, W) float32, (dz, dy, dx)

NIfTI stores data as (x, y, z) with an affine; the data are transposed to (z, y, x) and the
spacing read from the header zooms. Scaling (scl_slope / scl_inter) is applied by nibabel, so
CT studies come out in HU.

A file name's extension is matched in any letter case (`.NII.GZ`). The volume must be 3D
(or 4D with one time point), of real numbers without NaN/Inf (not RGB or complex), with
positive finite voxel sizes.

A `.gz` file is first decompressed to its end, which checks the gzip CRC and length: nibabel
reads only as far as the data go, so a damaged stream would otherwise pass unnoticed and
yield garbage values.
"""

from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path

import numpy as np

from lungbench.core.errors import DataError, message_of


def load_nifti(path: str | os.PathLike) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Read a 3D NIfTI file: (D, H, W) float32 and (dz, dy, dx) mm; DataError naming the file."""
    import nibabel as nib
    from nibabel.filebasedimages import ImageFileError

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: NIfTI file not found")
    if path.name.lower().endswith(".gz"):
        check_gzip(path)
    try:
        image = nib.load(path)
        stored = np.dtype(image.get_data_dtype())
        if stored.kind == "c" or stored.names is not None:  # complex, or RGB fields
            raise DataError(
                f"{path}: voxels are {stored} (complex or RGB), not one real number each; "
                "store the magnitude (or one channel) as a real-valued NIfTI"
            )
        data = np.asarray(image.dataobj, dtype=np.float32)
    except (ImageFileError, OSError, ValueError, TypeError, EOFError, zlib.error) as exc:
        # TypeError: an RGB or complex volume that has no float value per voxel.
        raise DataError(f"{path}: not a readable NIfTI file ({message_of(exc)})") from None
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]  # a 4D file with one time point is a volume
    if data.ndim != 3:
        raise DataError(f"{path}: expected a 3D volume, got shape {data.shape}")
    zooms = _stored_zooms(path, image)
    if not all(np.isfinite(z) and z > 0 for z in zooms):
        raise DataError(f"{path}: voxel sizes (pixdim) {zooms} mm are not three positive numbers")
    if not np.all(np.isfinite(data)):
        raise DataError(f"{path}: volume has NaN or Inf values")
    return np.ascontiguousarray(data.transpose(2, 1, 0)), (zooms[2], zooms[1], zooms[0])


def _stored_zooms(path: Path, image) -> list[float]:
    """The voxel sizes as the file stores them. nibabel's loader replaces a zero pixdim by 1
    (and says so on stderr): a spacing the file never had, so read the header unfixed."""
    from nibabel.openers import ImageOpener

    try:
        with ImageOpener(path) as stream:
            header = type(image.header).from_fileobj(stream, check=False)
        return [float(z) for z in header.get_zooms()[:3]]
    except (AttributeError, TypeError, ValueError):  # a header type nibabel cannot re-read
        return [float(z) for z in image.header.get_zooms()[:3]]


def check_gzip(path: Path, chunk: int = 1 << 22) -> None:
    """Decompress the whole gzip stream (CRC and length checked); DataError naming the file."""
    try:
        with gzip.open(path, "rb") as stream:
            while stream.read(chunk):
                pass
    except (OSError, EOFError, zlib.error) as exc:  # gzip.BadGzipFile is an OSError
        raise DataError(
            f"{path}: not a readable NIfTI file (corrupted gzip data: {message_of(exc)}; "
            f"the file is damaged or truncated)"
        ) from None
