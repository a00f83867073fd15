"""Layer 3 (data): MosMedData (COVID-19 chest CT): NIfTI studies in CT-0 .. CT-4 folders -> a `volume` store.

    write_mosmed_store("MosMedData/studies", "mosmed.h5", task="binary")

Layout: ROOT/CT-0/*.nii.gz ... ROOT/CT-4/*.nii.gz (severity 0 = no pneumonia ... 4 = critical).
Each study is windowed to -1000..400 HU, scaled to [0, 1] and resized to `size` (D, H, W),
default 64 x 128 x 128 (the Keras "3D image classification from CT scans" input, 128x128x64
as W x H x D), linear interpolation. The store input is `volume`, (N, 1, D, H, W) float32,
units "normalized".

Tasks:
    binary      CT-0 (label 0) vs CT-2 and CT-3 (label 1); CT-1 and CT-4 are left out (seed 002)
    multiclass  all five classes, label k for CT-k

Studies are `*.nii` / `*.nii.gz` in any letter case. Every class of the task needs a study
(checked before any is read): a store without one cannot train, unless
`allow_missing_classes` (`--allow-missing-classes`) asks for it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from scipy import ndimage

from lungbench.core.errors import DataError, UsageError, look_up_option
from lungbench.data.nifti import load_nifti
from lungbench.data.store import HU_WINDOW, StoreWriter, require_classes

CLASSES = ("CT-0", "CT-1", "CT-2", "CT-3", "CT-4")
TASKS = {
    # task -> (folder -> label, label names)
    "binary": ({"CT-0": 0, "CT-2": 1, "CT-3": 1}, ("CT-0", "CT-2/3")),
    "multiclass": ({c: k for k, c in enumerate(CLASSES)}, CLASSES),
}
DEFAULT_SIZE = (64, 128, 128)
MIN_AXIS = 4  # a study thinner than this on any axis is not a chest CT volume
NIFTI_SUFFIXES = (".nii", ".nii.gz")


def is_nifti_name(name: str) -> bool:
    """Whether a file name is a NIfTI study, in any letter case (`STUDY_0001.NII.GZ`)."""
    return not name.startswith(".") and name.lower().endswith(NIFTI_SUFFIXES)


def list_studies(root: str | os.PathLike, task: str) -> list[tuple[Path, str, int]]:
    """(file, class folder, label) of every study the task uses, sorted by folder and name."""
    look_up_option(task, TASKS, what="mosmed task")
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: MosMedData folder not found")
    present = [c for c in CLASSES if (root / c).is_dir()]
    if not present:
        raise DataError(f"{root}: no CT-0 .. CT-4 class folders (expected {root}/CT-0/*.nii.gz)")
    labels, _ = TASKS[task]
    studies = []
    for folder in sorted(set(present) & set(labels)):
        files = sorted(
            p for p in (root / folder).iterdir() if p.is_file() and is_nifti_name(p.name)
        )
        studies += [(p, folder, labels[folder]) for p in files]
    if not studies:
        raise DataError(
            f"{root}: no NIfTI studies (*.nii, *.nii.gz) in the folders "
            f"{', '.join(sorted(labels))} that task {task!r} uses"
        )
    return studies


def preprocess(volume: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """HU (D, H, W) -> window -1000..400, scale to [0, 1], resize to `size`; float32."""
    lo, hi = HU_WINDOW
    scaled = (np.clip(volume, lo, hi) - lo) / (hi - lo)
    factors = np.array(size) / np.array(volume.shape)
    out = ndimage.zoom(scaled.astype(np.float32), factors, order=1, grid_mode=True, mode="nearest")
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def write_mosmed_store(
    root: str | os.PathLike,
    out: str | os.PathLike,
    task: str = "binary",
    size: Sequence[int] = DEFAULT_SIZE,
    progress: Callable[[int], None] | None = None,
    allow_missing_classes: bool = False,
) -> int:
    """Convert the studies of `task` under `root` into a store at `out`; returns the count.

    DataError before any study is read when a class of the task has no study, unless
    `allow_missing_classes`.
    """
    size = tuple(int(s) for s in size)
    if len(size) != 3 or min(size) < 1:
        raise UsageError(f"--size needs three positive integers D H W, got {size}")
    studies = list_studies(root, task)
    labels, names = TASKS[task]
    store_task = "binary" if task == "binary" else "multiclass"
    if not allow_missing_classes:
        require_classes(root, np.array([s[2] for s in studies]), store_task, names)
    provenance = {
        "source": "MosMedData",
        "root": str(root),
        "task": task,
        "size": size,
        "window_hu": HU_WINDOW,
        "classes": {k: v for k, v in labels.items()},
    }
    with StoreWriter(
        out,
        kind="mosmed",
        inputs={"volume": (1, *size)},
        label_names=names,
        task=store_task,
        units="normalized",
        provenance=provenance,
        require_all_classes=not allow_missing_classes,
    ) as writer:
        for path, folder, label in studies:
            volume, spacing = load_nifti(path)
            if min(volume.shape) < MIN_AXIS:
                raise DataError(
                    f"{path}: unexpected shape {volume.shape} (z, y, x); a study "
                    f"needs at least {MIN_AXIS} voxels on every axis"
                )
            new_spacing = tuple(
                float(s * n / m) for s, n, m in zip(spacing, volume.shape, size, strict=True)
            )
            writer.append(
                {"volume": preprocess(volume, size)[None]},
                label=label,
                id=f"{folder}/{path.name.split('.')[0]}",
                source=str(path),
                spacing=new_spacing,
            )
            if progress is not None:
                progress(1)
        return writer.n
