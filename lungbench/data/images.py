"""Layer 3 (data): 2D image sets -> an `image` store: ChestX-ray8/14 folders and 64x64 nodule crops.

    write_images_store("images/", "Data_Entry_2017.csv", "cxr.h5")             # multi-label
    write_images_store("crops/", "labels.csv", "crops.h5", size=(64, 64))       # binary

Label CSV layouts (found by column name, ignoring case and spaces):

    ChestX-ray8   "Image Index", "Finding Labels" with findings joined by "|"
                  ("Atelectasis|Effusion"); "No Finding" is all zeros. Labels become a
                  multi-label one-hot over `labels` (default: the 14 NIH findings); a finding
                  outside that list is a DataError naming the CSV row.
    binary        a file column ("filename", "file", "image", "path") and "label":
                  0 / 1 or a name in `labels` (default: benign, malignant).

Images are PNG/JPEG (read with Pillow, converted to grayscale) or DICOM (windowed to 8 bits,
see `dicom_to_uint8`), resized to `size` (H, W) (default 512 x 512 for X-rays) with bilinear
filtering. The store input is `image`, (N, C, H, W) uint8, units "uint8".
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

import numpy as np

from lungbench.core.errors import DataError, UsageError
from lungbench.core.options import option, positive_int
from lungbench.data.store import StoreWriter

CHESTXRAY14 = (
    "Atelectasis",
    "Cardiomegaly",
    "Effusion",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pneumonia",
    "Pneumothorax",
    "Consolidation",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Pleural_Thickening",
    "Hernia",
)
NO_FINDING = "No Finding"
BINARY_LABELS = ("benign", "malignant")
FILE_COLUMNS = ("image index", "filename", "file", "image", "path")


def read_label_csv(
    path: str | os.PathLike, labels: Sequence[str] | None = None
) -> tuple[list[str], np.ndarray, tuple[str, ...], str]:
    """(file names, targets, label names, task) from a label CSV (see module docstring).

    targets: (N, K) uint8 one-hot for the ChestX-ray8 layout ("multilabel"), else (N,) int
    ("binary" for two labels, "multiclass" for more).
    """
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: label CSV not found")
    try:
        table = pd.read_csv(path, dtype=str, skipinitialspace=True).fillna("")
    except Exception as exc:  # pandas raises many types for broken files
        raise DataError(f"{path}: cannot read the label CSV ({exc})") from None
    columns = {re.sub(r"\s+", " ", c).strip().lower(): c for c in table.columns}
    file_col = next((columns[c] for c in FILE_COLUMNS if c in columns), None)
    if file_col is None:
        raise DataError(
            f"{path}: no image file column (one of {', '.join(FILE_COLUMNS)}); "
            f"found {', '.join(table.columns)}"
        )
    files = [_relative_name(path, i + 2, str(f).strip()) for i, f in enumerate(table[file_col])]
    _check_unique(path, files)
    if "finding labels" in columns:
        names = tuple(labels or CHESTXRAY14)
        targets = _multilabel(path, table[columns["finding labels"]], names)
        return files, targets, names, "multilabel"
    if "label" not in columns:
        raise DataError(
            f"{path}: no 'Finding Labels' (ChestX-ray8) or 'label' column; "
            f"found {', '.join(table.columns)}"
        )
    names = tuple(labels or BINARY_LABELS)
    targets = _single_label(path, table[columns["label"]], names)
    return files, targets, names, "binary" if len(names) == 2 else "multiclass"


def _relative_name(path: Path, row: int, name: str) -> str:
    """`name` if it stays inside the image folder: relative, without '..' (DataError otherwise).

    Checked on the name itself, not on the resolved path, so image folders of symbolic links
    (a common way to share a data set) keep working.
    """
    pure = PurePosixPath(name.replace("\\", "/"))
    if not name or pure.is_absolute() or PureWindowsPath(name).drive or ".." in pure.parts:
        raise DataError(
            f"{path}: row {row}: file name {name!r} must be a path inside the image folder "
            "(relative, no '..')"
        )
    return name


def _check_unique(path: Path, files: Sequence[str]) -> None:
    """DataError naming both rows when the CSV lists one image twice (the file name is the id).

    Names are compared as paths, so `a.png`, `./a.png` and `sub\\a.png` / `sub/a.png` match.
    """
    seen: dict[str, int] = {}
    for i, name in enumerate(files):
        key = str(PurePosixPath(name.replace("\\", "/")))
        if key in seen:
            raise DataError(
                f"{path}: row {i + 2}: image {name!r} is listed again (first at row "
                f"{seen[key]}); each image must appear once"
            )
        seen[key] = i + 2


def _multilabel(path: Path, cells, names: Sequence[str]) -> np.ndarray:
    index = {n.lower(): k for k, n in enumerate(names)}
    out = np.zeros((len(cells), len(names)), np.uint8)
    for i, cell in enumerate(cells):
        for finding in (f.strip() for f in str(cell).split("|")):
            if not finding or finding.lower() == NO_FINDING.lower():
                continue
            if finding.lower() not in index:
                raise DataError(
                    f"{path}: row {i + 2}: finding {finding!r} is not in the label "
                    f"list ({', '.join(names)})"
                )
            out[i, index[finding.lower()]] = 1
    return out


def _single_label(path: Path, cells, names: Sequence[str]) -> np.ndarray:
    index = {n.lower(): k for k, n in enumerate(names)}
    out = np.zeros(len(cells), np.int64)
    for i, cell in enumerate(cells):
        text = str(cell).strip().lower()
        if text.isascii() and text.isdigit() and int(text) < len(names):  # not '²'
            out[i] = int(text)
        elif text in index:
            out[i] = index[text]
        else:
            raise DataError(
                f"{path}: row {i + 2}: label {cell!r} is outside the allowed set "
                f"(0..{len(names) - 1} or {', '.join(names)})"
            )
    return out


def dicom_to_uint8(
    path: str | os.PathLike, window: tuple[float, float] | None = None
) -> np.ndarray:
    """A 2D DICOM image windowed to 8 bits: (H, W) uint8.

    window: (low, high) in stored units after rescale; default the file's WindowCenter /
    WindowWidth, else the image's min..max. MONOCHROME1 images are inverted so that dense
    structures are bright, as in MONOCHROME2.
    """
    from lungbench.data.dicom import read_header

    ds = read_header(Path(path))
    try:
        pixels = ds.pixel_array.astype(np.float32)
    except Exception as exc:  # pydicom raises many types for broken or compressed pixels
        raise DataError(f"{path}: cannot decode pixel data ({exc})") from None
    if pixels.ndim != 2:
        raise DataError(f"{path}: expected a 2D image, got shape {pixels.shape}")
    pixels = pixels * float(ds.get("RescaleSlope", 1) or 1) + float(
        ds.get("RescaleIntercept", 0) or 0
    )
    if window is None:
        window = _header_window(ds) or (float(pixels.min()), float(pixels.max()))
    lo, hi = window
    scaled = (np.clip(pixels, lo, hi) - lo) / max(hi - lo, 1e-6)
    if str(ds.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        scaled = 1.0 - scaled
    return np.rint(scaled * 255).astype(np.uint8)


def _header_window(ds) -> tuple[float, float] | None:
    centre, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if centre is None or width is None:
        return None
    # Multi-valued windows: the first is the default presentation.
    centre = float(centre[0] if hasattr(centre, "__len__") else centre)
    width = float(width[0] if hasattr(width, "__len__") else width)
    return centre - width / 2, centre + width / 2


def dicom_to_png(
    src: str | os.PathLike, dst: str | os.PathLike, window: tuple[float, float] | None = None
) -> Path:
    """Write the windowed 8-bit version of a 2D DICOM image as PNG; returns `dst`."""
    from PIL import Image

    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(dicom_to_uint8(src, window)).save(dst)
    return dst


def load_image(
    path: Path, size: Sequence[int], channels: int = 1, window: tuple[float, float] | None = None
) -> np.ndarray:
    """One image as (C, H, W) uint8 resized to `size` (H, W)."""
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise DataError(f"{path}: image file not found")
    if path.suffix.lower() == ".dcm":
        image = Image.fromarray(dicom_to_uint8(path, window))
    else:
        try:
            image = Image.open(path)
            image.load()
        except (UnidentifiedImageError, OSError) as exc:
            raise DataError(f"{path}: not a readable image ({exc})") from None
        image = to_gray8(image, path)
    image = image.resize((int(size[1]), int(size[0])), Image.BILINEAR)
    gray = np.asarray(image, np.uint8)
    return np.repeat(gray[None], channels, axis=0)


# Modes of more than 8 bits per pixel: Pillow's convert("L") would clip them at 255.
WIDE_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")


def to_gray8(image, path: Path):
    """An 8-bit grey image: 8-bit modes as Pillow converts them; 16-bit, 32-bit and float
    images scaled linearly from their own minimum-maximum range to 0-255 (a flat image:
    0), since clipping at 255 would saturate almost every pixel of a 16-bit scan."""
    from PIL import Image

    if image.mode not in WIDE_MODES:
        return image.convert("L")
    values = np.asarray(image, dtype=np.float64)
    if not np.all(np.isfinite(values)):
        raise DataError(f"{path}: image has NaN or Inf pixels")
    low, high = float(values.min()), float(values.max())
    scaled = (values - low) * (255.0 / (high - low)) if high > low else np.zeros_like(values)
    return Image.fromarray(np.rint(scaled).astype(np.uint8), mode="L")


@dataclass(frozen=True)
class ImageStoreOptions:
    """How `lungbench data images` converts the images: the keyword arguments of
    write_images_store, declared with their command-line options."""

    labels: tuple[str, ...] | None = option(
        None,
        nargs="+",
        default_text="the 14 ChestX-ray14 findings, or benign malignant for a binary CSV",
        help="allowed label names, in output order",
    )
    size: tuple[int, int] = option(
        (512, 512),
        type=positive_int,
        nargs=2,
        metavar=("H", "W"),
        default_note="64 64 for nodule crops",
        help="output size",
    )
    channels: int = option(
        1, type=int, choices=(1, 3), help="1 grayscale or 3 repeated channels for ImageNet models"
    )
    window: tuple[float, float] | None = option(
        None,
        type=float,
        nargs=2,
        metavar=("LO", "HI"),
        default_text="the file's WindowCenter/Width",
        help="window for DICOM images",
    )


def write_images_store(
    folder: str | os.PathLike,
    csv: str | os.PathLike,
    out: str | os.PathLike,
    size: Sequence[int] = ImageStoreOptions.size,  # the defaults: as the options declare them
    labels: Sequence[str] | None = ImageStoreOptions.labels,
    channels: int = ImageStoreOptions.channels,
    window: tuple[float, float] | None = ImageStoreOptions.window,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Convert the images listed in `csv` (files under `folder`) into a store at `out`."""
    if channels not in (1, 3):
        raise UsageError(f"--channels must be 1 or 3, got {channels}")
    if len(size) != 2 or min(size) < 1:
        raise UsageError(f"--size needs two positive integers H W, got {tuple(size)}")
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: image folder not found")
    files, targets, names, task = read_label_csv(csv, labels)
    provenance = {
        "source": "image folder",
        "folder": str(folder),
        "csv": str(csv),
        "size": list(size),
        "channels": channels,
        "window": window,
    }
    with StoreWriter(
        out,
        kind="images",
        inputs={"image": (channels, *size)},
        label_names=names,
        task=task,
        units="uint8",
        provenance=provenance,
    ) as writer:
        for name, target in zip(files, targets, strict=True):
            path = folder / name
            writer.append(
                {"image": load_image(path, size, channels, window)},
                label=target,
                id=name,
                source=str(path),
                spacing=(1.0, 1.0, 1.0),
            )
            if progress is not None:
                progress(1)
        return writer.n
