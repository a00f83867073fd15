"""Layer 3 (data): The lungbench HDF5 store: one file per data set.

Format (version 1), documented in docs/store-format.md:

    /<input>        one array per model input, (N, C, *spatial): `context` and `zoom` for the
                    two-path nodule model, `volume` for whole-CT studies, `image` for 2D sets.
                    int16 Hounsfield units (attrs units="HU") or float32 (units="normalized",
                    or "uint8" for 8-bit images); chunked one sample per chunk, lzf-compressed.
    /label          (N,) int64 class index, or (N, K) uint8 multi-label one-hot.
    /meta/id        (N,) str     sample id (unique)
    /meta/source    (N,) str     where the sample came from (generator, scan UID, file)
    /meta/spacing   (N, 3) f4    voxel spacing in mm of the first input (z, y, x)
    /meta/diameter  (N,) f4      nodule diameter in mm (NaN where it does not apply)
    /meta/fold      (N,) i2      cross-validation fold, -1 where unassigned
    file attrs      format="lungbench-store", format_version, kind, task, inputs (JSON list),
                    label_names (JSON list), created_utc, lungbench_version, provenance (JSON)

Files are written to a temporary name and renamed when complete, so a failed or
interrupted conversion never leaves a store that looks finished.

`read_info` validates a store before anything uses it (every StoreDataset, every benchmark
and training run opens it through `read_info`): the attributes, each dataset's rows, shape
and dtype, labels that are integers of the task's classes (0.5 is not a class), integer
folds, and a chunked scan of every float input for NaN/Inf (once per file version and
process), so that a bad value is found before any timing or training starts, not when
its row is read.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from torch.utils.data import Dataset

from lungbench.core.errors import DataError, message_of

FORMAT_NAME = "lungbench-store"
FORMAT_VERSION = 1
TASKS = ("binary", "multiclass", "multilabel")
META_FIELDS = ("id", "source", "spacing", "diameter", "fold")
HU_WINDOW = (-1000.0, 400.0)
SCAN_BYTES = 64 << 20  # rows read at once by the NaN/Inf scan (decompressed size)
NUMERIC_KINDS = "biuf"  # numpy dtype kinds a model input or a label can be

_STR = h5py.string_dtype("utf-8")
_SCANNED: set[tuple] = set()  # (file, size, mtime) of the stores found free of NaN/Inf


@dataclass(frozen=True)
class StoreInfo:
    """What a store holds, read from its attributes and dataset shapes."""

    path: Path
    kind: str
    task: str
    n: int
    inputs: dict[str, tuple[int, ...]]  # name -> per-sample shape (C, *spatial)
    units: dict[str, str]
    label_names: list[str]
    provenance: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    @property
    def grid(self) -> tuple[int, ...]:
        """Spatial shape of the first input."""
        return self.inputs[next(iter(self.inputs))][1:]


# Every dataset is chunked one sample a chunk and compressed with LZF: fast to decode (a
# loader reads random samples) and shipped with h5py itself, so any reader can open it.
COMPRESSION = "lzf"


class StoreWriter:
    """Append samples to a new store; atomically published on successful close.

    with StoreWriter(path, kind="lidc", inputs={"context": (1, 32, 32, 32), ...},
                     label_names=["benign", "malignant"]) as w:
        w.append({"context": ctx, "zoom": zoom}, label=1, id="n1", spacing=(1, 1, 1))
    """

    def __init__(
        self,
        path: str | os.PathLike,
        kind: str,
        inputs: Mapping[str, Sequence[int]],
        label_names: Sequence[str],
        task: str = "binary",
        units: str | Mapping[str, str] = "HU",
        provenance: Mapping[str, Any] | None = None,
        require_all_classes: bool = False,
    ) -> None:
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        self.path = Path(path)
        if self.path.is_dir():
            raise DataError(f"{self.path}: is a directory, expected a store file path")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # a file where a folder should be, no permission, ...
            raise DataError(f"{self.path}: cannot create its folder ({exc.strerror})") from None
        self.tmp_path = self.path.with_name(self.path.name + f".tmp{os.getpid()}")
        self.task = task
        self.label_names = list(label_names)
        self.units = {k: (units if isinstance(units, str) else units[k]) for k in inputs}
        self.n = 0
        # A conversion of a data set to train on: a class without samples is an error at
        # close (a one-class store trains nothing and its AUC is NaN).
        self.require_all_classes = require_all_classes
        self._ids: set[str] = set()
        self._file = h5py.File(self.tmp_path, "w")
        f = self._file
        f.attrs.update(
            format=FORMAT_NAME,
            format_version=FORMAT_VERSION,
            kind=kind,
            task=task,
            inputs=json.dumps(list(inputs)),
            label_names=json.dumps(self.label_names),
            created_utc=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            lungbench_version=_version(),
            provenance=json.dumps(dict(provenance or {}), default=str),
        )
        for name, shape in inputs.items():
            dtype = {"HU": np.int16, "uint8": np.uint8}.get(self.units[name], np.float32)
            ds = f.create_dataset(
                name,
                shape=(0, *shape),
                maxshape=(None, *shape),
                dtype=dtype,
                chunks=(1, *shape),
                compression=COMPRESSION,
            )
            ds.attrs["units"] = self.units[name]
        label_shape = (len(self.label_names),) if task == "multilabel" else ()
        label_dtype = np.uint8 if task == "multilabel" else np.int64
        f.create_dataset(
            "label",
            shape=(0, *label_shape),
            maxshape=(None, *label_shape),
            dtype=label_dtype,
            chunks=(1024, *label_shape),
        )
        meta = f.create_group("meta")
        meta.create_dataset("id", shape=(0,), maxshape=(None,), dtype=_STR, chunks=(1024,))
        meta.create_dataset("source", shape=(0,), maxshape=(None,), dtype=_STR, chunks=(1024,))
        meta.create_dataset(
            "spacing", shape=(0, 3), maxshape=(None, 3), dtype=np.float32, chunks=(1024, 3)
        )
        meta.create_dataset(
            "diameter", shape=(0,), maxshape=(None,), dtype=np.float32, chunks=(1024,)
        )
        meta.create_dataset("fold", shape=(0,), maxshape=(None,), dtype=np.int16, chunks=(1024,))
        self._inputs = list(inputs)

    def append(
        self,
        arrays: Mapping[str, np.ndarray],
        label: int | Sequence[int],
        id: str,
        source: str = "",
        spacing: Sequence[float] = (1.0, 1.0, 1.0),
        diameter: float = float("nan"),
        fold: int = -1,
    ) -> None:
        """Add one sample. Arrays must match the declared per-sample shapes."""
        if id in self._ids:
            # Two inputs that map to one id (a row listed twice, study.nii next to
            # study.nii.gz): the user's data, so one line, and no store is published.
            raise DataError(
                f"{self.path}: duplicate sample id {id!r} (from {source or 'the input'}); "
                f"sample ids must be unique"
            )
        self._check_label(label, id)
        i = self.n
        for name in self._inputs:
            arr = np.asarray(arrays[name])
            if not np.all(np.isfinite(arr)):
                raise DataError(f"{self.path}: sample {id!r} input {name!r} has NaN or Inf values")
            ds = self._file[name]
            if arr.shape != ds.shape[1:]:
                raise ValueError(f"{name}: sample shape {arr.shape} != store shape {ds.shape[1:]}")
            ds.resize(i + 1, axis=0)
            ds[i] = _cast(arr, ds.dtype)
        for key, value in (
            ("label", label),
            ("meta/id", id),
            ("meta/source", source),
            ("meta/spacing", spacing),
            ("meta/diameter", diameter),
            ("meta/fold", fold),
        ):
            ds = self._file[key]
            ds.resize(i + 1, axis=0)
            ds[i] = value
        self._ids.add(id)
        self.n += 1

    def _check_label(self, label, id: str) -> None:
        k = len(self.label_names)
        values = np.atleast_1d(np.asarray(label))
        if values.dtype.kind not in NUMERIC_KINDS:
            ok = False
        elif self.task == "multilabel":
            ok = values.shape == (k,) and bool(np.isin(values, (0, 1)).all())
        else:  # int(0.5) is 0: the value itself must be one of the class indices
            ok = values.shape == (1,) and bool(np.isin(values, np.arange(k)).all())
        if not ok:
            raise DataError(
                f"{self.path}: sample {id!r} has label {label!r} outside the allowed set "
                f"({self.task}, labels {self.label_names})"
            )

    def close(self, ok: bool = True) -> None:
        """Finish: publish the file on success, delete the temporary file otherwise."""
        if self._file.id.valid:
            self._file.attrs["n"] = self.n
            labels = self._file["label"][:]
            self._file.close()
            if ok and self.n > 0 and self.require_all_classes:
                try:
                    require_classes(self.path, labels, self.task, self.label_names)
                except DataError:
                    self.tmp_path.unlink(missing_ok=True)
                    raise
        if ok and self.n > 0:
            os.replace(self.tmp_path, self.path)
        else:
            self.tmp_path.unlink(missing_ok=True)
            if ok:
                raise DataError(f"{self.path}: no samples were written; store not created")

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(ok=exc_type is None)


def read_info(path: str | os.PathLike) -> StoreInfo:
    """Open and validate a store; DataError naming the file and dataset if malformed."""
    try:
        return _read_info(path)
    except (OSError, KeyError, ValueError, TypeError, RuntimeError) as exc:
        # A corrupted file can fail deep inside HDF5 (a bad heap index, an unreadable
        # attribute): one line naming the file, never a traceback.
        raise DataError(f"{path}: malformed lungbench store ({message_of(exc)})") from None


def _read_info(path: str | os.PathLike) -> StoreInfo:
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: store not found")
    if path.is_dir():
        raise DataError(f"{path}: is a directory, expected a lungbench HDF5 store")
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise DataError(f"{path}: not a readable HDF5 file ({message_of(exc)})") from None
    with f:
        if f.attrs.get("format") != FORMAT_NAME:
            raise DataError(f"{path}: not a lungbench store (attribute 'format' missing)")
        version = int(f.attrs.get("format_version", -1))
        if version > FORMAT_VERSION:
            raise DataError(
                f"{path}: store format version {version} is newer than this "
                f"lungbench reads ({FORMAT_VERSION}); upgrade lungbench"
            )
        try:
            input_names = json.loads(f.attrs["inputs"])
            label_names = json.loads(f.attrs["label_names"])
            provenance = json.loads(f.attrs.get("provenance", "{}"))
        except (KeyError, json.JSONDecodeError) as exc:
            raise DataError(f"{path}: malformed store attributes ({exc})") from None
        task = str(f.attrs.get("task", "binary"))
        _check_attributes(path, input_names, label_names, task)
        required = [*input_names, "label", *(f"meta/{m}" for m in META_FIELDS)]
        missing = [name for name in required if name not in f]
        if missing:
            raise DataError(f"{path}: dataset '{missing[0]}' missing from the store")
        n = _rows(f["label"])
        if n == 0:
            raise DataError(f"{path}: the store is empty (0 samples)")
        for name in required:
            if _rows(f[name]) != n:
                raise DataError(
                    f"{path}: dataset '{name}' has {_rows(f[name])} rows, 'label' has {n}"
                )
        for name in input_names:
            _check_input(path, name, f[name])
        _check_labels(path, f["label"][:], task, label_names)
        _check_meta(path, f, n)
        _scan_finite(path, f, input_names)
        return StoreInfo(
            path=path,
            kind=str(f.attrs.get("kind", "unknown")),
            task=task,
            n=n,
            inputs={name: tuple(f[name].shape[1:]) for name in input_names},
            units={name: str(f[name].attrs.get("units", "normalized")) for name in input_names},
            label_names=label_names,
            provenance=provenance,
            format_version=version,
        )


def _rows(ds: h5py.Dataset) -> int:
    return ds.shape[0] if ds.ndim else 0  # a scalar dataset has no rows


def _check_attributes(path: Path, input_names, label_names, task: str) -> None:
    """DataError unless the attributes name inputs and classes as lists of strings."""
    if task not in TASKS:
        raise DataError(f"{path}: attribute 'task' is {task!r}, expected one of {', '.join(TASKS)}")
    for attr, names in (("inputs", input_names), ("label_names", label_names)):
        if not isinstance(names, list) or not names or not all(isinstance(x, str) for x in names):
            raise DataError(
                f"{path}: attribute '{attr}' is {names!r}, expected a non-empty list of names"
            )


def _check_input(path: Path, name: str, ds: h5py.Dataset) -> None:
    """An input is (N, C, *spatial) numbers, every axis at least one long."""
    if ds.ndim < 3 or min(ds.shape[1:]) < 1:
        raise DataError(
            f"{path}: dataset '{name}' has shape {ds.shape}, expected (N, C, *spatial) "
            f"with every axis at least 1"
        )
    if ds.dtype.kind not in NUMERIC_KINDS:
        raise DataError(
            f"{path}: dataset '{name}' has dtype {ds.dtype}, expected integer or float values"
        )


def _check_meta(path: Path, f: h5py.File, n: int) -> None:
    """Spacing (N, 3) numbers; folds integers (-1 = unassigned)."""
    spacing, fold = f["meta/spacing"], f["meta/fold"]
    if spacing.shape != (n, 3) or spacing.dtype.kind not in NUMERIC_KINDS:
        raise DataError(
            f"{path}: dataset 'meta/spacing' has shape {spacing.shape} and dtype "
            f"{spacing.dtype}, expected ({n}, 3) numbers"
        )
    folds = fold[:]
    if folds.shape != (n,) or not _integral(folds):
        raise DataError(
            f"{path}: dataset 'meta/fold' has shape {folds.shape} and dtype {folds.dtype}, "
            f"expected {n} integers (-1 = unassigned)"
        )


def _scan_finite(path: Path, f: h5py.File, input_names: Sequence[str]) -> None:
    """DataError naming the dataset and first row with NaN or Inf, read in chunks of about
    SCAN_BYTES. Integer inputs cannot hold either; a file already scanned (same size and
    modification time) is not scanned again by this process."""
    key = _file_key(path)
    if key in _SCANNED:
        return
    for name in input_names:
        ds = f[name]
        if ds.dtype.kind != "f":
            continue
        step = max(1, SCAN_BYTES // max(1, int(np.prod(ds.shape[1:])) * ds.dtype.itemsize))
        for start in range(0, ds.shape[0], step):
            try:
                block = ds[start : start + step]
            except OSError as exc:  # a damaged chunk: HDF5's filter or checksum fails
                raise DataError(
                    f"{path}: dataset '{name}' rows {start}..{start + step - 1} cannot be read "
                    f"({message_of(exc)[:120]}); the file is damaged: rebuild it"
                ) from None
            finite = np.isfinite(block).reshape(len(block), -1).all(axis=1)
            if not finite.all():
                row = start + int(np.argmin(finite))
                raise DataError(
                    f"{path}: dataset '{name}' row {row} has NaN or Inf values; "
                    f"rebuild the store from its source"
                )
    _SCANNED.add(key)


def _file_key(path: Path) -> tuple:
    stat = path.stat()
    return (str(path.resolve()), stat.st_size, stat.st_mtime_ns)


def read_meta(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Labels and per-sample metadata as numpy arrays (small; read eagerly)."""
    with h5py.File(path, "r") as f:
        out = {"label": f["label"][:]}
        for name in META_FIELDS:
            values = f[f"meta/{name}"][:]
            out[name] = values.astype(str) if values.dtype.kind in "OS" else values
        return out


def write_folds(path: str | os.PathLike, folds: np.ndarray, how: str) -> None:
    """Store a fold assignment (one int per sample) and how it was made."""
    with h5py.File(path, "r+") as f:
        if len(folds) != f["meta/fold"].shape[0]:
            raise ValueError("one fold per sample expected")
        f["meta/fold"][:] = folds
        f["meta/fold"].attrs["how"] = how


def normalize(array: np.ndarray, units: str) -> np.ndarray:
    """Model-ready float32: HU windowed to [-1000, 400] and scaled to [0, 1]; uint8 / 255."""
    if units == "HU":
        lo, hi = HU_WINDOW
        return ((np.clip(array, lo, hi) - lo) / (hi - lo)).astype(np.float32)
    if units == "uint8":
        return (array / 255.0).astype(np.float32)
    return array.astype(np.float32, copy=False)


class StoreDataset(Dataset):
    """Lazily reads a store; each DataLoader worker opens its own file handle.

    Items are `(inputs, label)` with `inputs` a tuple of float32 tensors, one per store
    input in file order (for the two-path model: `(context, zoom)`, each (1, D, H, W)),
    so that a batch calls `model(*inputs)`.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        indices: Sequence[int] | None = None,
        transform=None,
        cache: bool = False,
    ) -> None:
        self.info = read_info(path)
        self.path = self.info.path
        self.indices = np.arange(self.info.n) if indices is None else np.asarray(indices)
        self.transform = transform
        self._file: h5py.File | None = None
        self._pid: int | None = None
        self._cache: dict[int, tuple] | None = {} if cache else None
        with h5py.File(self.path, "r") as f:
            labels = f["label"][:]
        # read_info has checked that they are class indices (or 0/1 rows) whatever their
        # dtype: one dtype per task, so float, int8 or bool labels read as the writer's.
        self.labels = labels.astype(np.uint8 if self.info.task == "multilabel" else np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def _handle(self) -> h5py.File:
        # h5py handles must not cross fork(): reopen in every worker process.
        if self._file is None or self._pid != os.getpid():
            self._file = h5py.File(self.path, "r")
            self._pid = os.getpid()
        return self._file

    def read(self, i: int) -> tuple[tuple[np.ndarray, ...], Any]:
        """Raw normalized arrays and label of store row `i` (no transform)."""
        if self._cache is not None and i in self._cache:
            return self._cache[i]
        f = self._handle()
        arrays = tuple(self._read_row(f, name, i) for name in self.info.inputs)
        for name, array in zip(self.info.inputs, arrays, strict=True):
            if not np.all(np.isfinite(array)):  # float stores written by other tools
                raise DataError(f"{self.path}: dataset '{name}' row {i} has NaN or Inf values")
        item = (arrays, self.labels[i])
        if self._cache is not None:
            self._cache[i] = item
        return item

    def _read_row(self, f: h5py.File, name: str, i: int) -> np.ndarray:
        try:
            raw = f[name][i]
        except OSError as exc:  # a damaged chunk: HDF5's filter or checksum fails
            raise DataError(
                f"{self.path}: dataset '{name}' row {i} cannot be read ({str(exc)[:120]}); "
                "the file is damaged: rebuild it"
            ) from None
        return normalize(raw, self.info.units[name])

    def __getitem__(self, k: int):
        arrays, label = self.read(int(self.indices[k]))
        if self.transform is not None:
            arrays = self.transform(arrays)
        inputs = tuple(torch.from_numpy(np.ascontiguousarray(a)) for a in arrays)
        target = torch.as_tensor(
            label, dtype=torch.float32 if self.info.task != "multiclass" else torch.int64
        )
        return inputs, target

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_file"] = None  # never pickle an open HDF5 handle into a worker
        return state


def _check_labels(path: Path, labels: np.ndarray, task: str, label_names: list) -> None:
    """DataError unless every label is in the allowed set of the store's task: integers
    (any numeric dtype, but integral values) 0..K-1, or for multilabel (N, K) rows of 0/1."""
    k = len(label_names)
    if task == "multilabel":
        shape_ok = labels.ndim == 2 and labels.shape[1] == k
        allowed = f"rows of {k} values in {{0, 1}}"
        valid = np.isin(labels, (0, 1)) if labels.dtype.kind in NUMERIC_KINDS else None
    else:
        shape_ok = labels.ndim == 1
        allowed = f"integers 0..{k - 1} ({', '.join(map(str, label_names))})"
        valid = np.isin(labels, np.arange(k)) if labels.dtype.kind in NUMERIC_KINDS else None
    if not shape_ok or valid is None:
        raise DataError(
            f"{path}: dataset 'label' has shape {labels.shape} and dtype {labels.dtype}, "
            f"expected {task} labels ({allowed})"
        )
    if not valid.all():
        row = int(np.argmin(valid.reshape(len(labels), -1).all(axis=1)))
        raise DataError(
            f"{path}: dataset 'label' has values outside the allowed set ({task}: {allowed}): "
            f"{_show(labels[row])} at row {row}"
        )


def class_counts(labels: np.ndarray, task: str, label_names: Sequence[str]) -> dict[str, int]:
    """Samples per class (multilabel: positives per label), every class listed; `labels`
    already validated, so float-typed ones hold integers."""
    labels = np.asarray(labels)
    if task == "multilabel":
        totals = labels.astype(np.int64).sum(axis=0)
    else:
        totals = np.bincount(labels.astype(np.int64), minlength=len(label_names))
    return {name: int(t) for name, t in zip(label_names, totals, strict=True)}


def require_classes(
    where: str | os.PathLike, labels: np.ndarray, task: str, label_names: Sequence[str]
) -> None:
    """DataError naming the classes without a sample (a data set that cannot train): a model
    that never sees a class learns nothing about it, and its AUC is NaN."""
    counts = class_counts(labels, task, label_names)
    empty = [name for name, c in counts.items() if c == 0]
    if empty:
        shown = ", ".join(f"{name} {c}" for name, c in counts.items())
        raise DataError(
            f"{where}: no sample of class {', '.join(empty)} (samples per class: {shown}); "
            f"a data set needs every class to train; add samples of it, or pass "
            f"--allow-missing-classes to write it anyway"
        )


def _integral(values: np.ndarray) -> bool:
    """Whether every value is an integer (integer dtype, or floats without a fraction)."""
    if values.dtype.kind in "biu":
        return True
    if values.dtype.kind != "f":
        return False
    return bool(np.isfinite(values).all() and (values == np.round(values)).all())


def _show(value) -> str:
    value = np.asarray(value)
    return str(value.tolist()) if value.ndim else f"{value.item()!r}"


def _cast(arr: np.ndarray, dtype: np.dtype) -> np.ndarray:
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return np.clip(np.rint(arr), info.min, info.max).astype(dtype)
    return arr.astype(dtype)


def _version() -> str:
    from lungbench import __version__

    return __version__
