"""Fuzzing the readers (issue #17): hypothesis mutates a valid generated CT series' headers
and a valid store's contents. Each reader must return the right data or refuse in one line
(DataError / UsageError naming the file); never another exception, never a wrong volume.

Each mutation says what the reader must do: "fail" (refuse), "pass" (load the right data),
or "either" (near a tolerance, or outside what the reader promises: refusing is fine, but
data it returns must still be right). A fixed, derandomized budget keeps the file in the
fast suite (about 10 s on 2 cores).
"""

from __future__ import annotations

import atexit
import math
import os
import shutil
import tempfile
from pathlib import Path

import h5py
import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from test_data_dicom import write_series

from lungbench.core.errors import DataError, UsageError
from lungbench.data.dicom import IN_PLANE_TOLERANCE_PX, load_series
from lungbench.data.store import StoreDataset, StoreWriter, read_info

# LUNGBENCH_FUZZ_EXAMPLES: fewer examples for the fast tier (the Makefile's test-fast).
FUZZ = settings(
    max_examples=int(os.environ.get("LUNGBENCH_FUZZ_EXAMPLES", "200")),
    deadline=None,
    derandomize=True,  # the same examples on every run: a fixed budget, no flaky CI
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
FAIL, PASS, EITHER = "fail", "pass", "either"
MARGIN = 0.02  # relative distance from a tolerance inside which either verdict is fine


def _worst(verdicts) -> str:
    verdicts = set(verdicts)
    return FAIL if FAIL in verdicts else EITHER if EITHER in verdicts else PASS


def _refused_in_one_line(exc: BaseException, folder: Path) -> None:
    assert isinstance(exc, (DataError, UsageError)), f"{type(exc).__name__}: {exc}"
    message = str(exc)
    assert "\n" not in message and message.startswith(str(folder)), message
    assert "force=True" not in message, message


# --- DICOM series ---------------------------------------------------------------------------

DEPTH, STEP, SPACING = 5, 2.0, (0.7, 0.8)
HU = np.random.default_rng(0).integers(-1000, 400, (DEPTH, 12, 10)).astype(np.int16)
NAMES = [f"s{k}.dcm" for k in range(DEPTH)]
_BASE: list[Path] = []


def _base_series() -> Path:
    """The valid series, written once; each example edits a copy."""
    if not _BASE:
        folder = Path(tempfile.mkdtemp(prefix="fuzz-series-"))
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        write_series(folder / "s", HU, spacing=(STEP, *SPACING), z0=-100.0, names=NAMES)
        _BASE.append(folder / "s")
    return _BASE[0]


def _rotation(axis: str, degrees: float) -> np.ndarray:
    a = math.radians(degrees)
    c, s = math.cos(a), math.sin(a)
    i, j = {"x": (1, 2), "y": (2, 0), "z": (0, 1)}[axis]
    r = np.eye(3)
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


targets = st.one_of(st.none(), st.integers(0, DEPTH - 1))  # every slice, or one
angles = st.one_of(st.sampled_from([0.0, 0.03, 0.5, 2.0, 45.0, 90.0]), st.floats(-90, 90))

spacing_mutation = st.tuples(
    st.just("PixelSpacing"),
    targets,
    st.one_of(
        st.tuples(st.floats(-0.003, 0.003), st.floats(-0.003, 0.003)).map(
            lambda d: (SPACING[0] + d[0], SPACING[1] + d[1])
        ),
        st.tuples(st.floats(0.05, 3.0), st.floats(0.05, 3.0)),
        st.sampled_from([(0.0, 0.8), (-0.7, 0.8), (0.8, 0.7)]),
    ),
)
orientation_mutation = st.tuples(
    st.just("ImageOrientationPatient"), targets, st.tuples(st.sampled_from("xyz"), angles)
)
position_mutation = st.one_of(
    st.tuples(
        st.just("ImagePositionPatient"),
        targets,
        st.tuples(st.floats(-2, 2), st.floats(-2, 2), st.floats(-1, 1)),
    ),
    st.tuples(st.just("drift"), st.none(), st.floats(-30, 30)),  # a tilt seen in the positions
)
modality_mutation = st.tuples(
    st.just("Modality"), targets, st.sampled_from(["CT", "MR", "RTDOSE", "PT", "OT", ""])
)
photometric_mutation = st.tuples(
    st.just("PhotometricInterpretation"),
    targets,
    st.sampled_from(["MONOCHROME1", "MONOCHROME2", "RGB", "PALETTE COLOR", "YBR_FULL"]),
)
samples_mutation = st.tuples(st.just("SamplesPerPixel"), targets, st.sampled_from([1, 3]))
frames_mutation = st.tuples(st.just("NumberOfFrames"), targets, st.sampled_from([1, 2, 5]))
bits_mutation = st.tuples(
    st.just("bits"),
    targets,
    st.tuples(
        st.sampled_from([8, 16, 32]),
        st.sampled_from([8, 11, 12, 14, 16, 17]),
        st.one_of(st.none(), st.integers(0, 31)),  # None: HighBit = BitsStored - 1
        st.sampled_from([0, 1]),
    ),
)
tilt_mutation = st.tuples(
    st.just("GantryDetectorTilt"),
    targets,
    st.one_of(st.sampled_from([0.0, 0.05, -0.05, 0.2]), st.floats(-30, 30)),
)
size_mutation = st.tuples(
    st.just("size"), targets, st.sampled_from([(12, 10), (10, 12), (6, 10), (12, 5), (24, 10)])
)
series_mutations = st.lists(
    st.one_of(
        spacing_mutation,
        orientation_mutation,
        position_mutation,
        modality_mutation,
        photometric_mutation,
        samples_mutation,
        frames_mutation,
        bits_mutation,
        tilt_mutation,
        size_mutation,
    ),
    min_size=1,
    max_size=3,
    unique_by=lambda m: "ImagePositionPatient" if m[0] == "drift" else m[0],  # one edit a tag
)


def _apply(ds, k: int, kind: str, value) -> None:
    """Mutate slice k's header (DS values rounded: headers hold at most 16 characters)."""
    if kind == "PixelSpacing":
        ds.PixelSpacing = [round(v, 6) for v in value]
    elif kind == "ImageOrientationPatient":
        r = _rotation(*value)
        ds.ImageOrientationPatient = [round(float(v), 10) for v in (*r[:, 0], *r[:, 1])]
    elif kind == "ImagePositionPatient":
        ds.ImagePositionPatient = [
            round(p + d, 6) for p, d in zip(ds.ImagePositionPatient, value, strict=True)
        ]
    elif kind == "drift":
        x, y, z = ds.ImagePositionPatient
        ds.ImagePositionPatient = [x, round(y + k * STEP * math.tan(math.radians(value)), 6), z]
    elif kind == "bits":
        allocated, stored, high, sign = value
        ds.BitsAllocated, ds.BitsStored, ds.PixelRepresentation = allocated, stored, sign
        ds.HighBit = stored - 1 if high is None else high
    elif kind == "size":
        ds.Rows, ds.Columns = value
    else:
        setattr(ds, kind, round(value, 6) if isinstance(value, float) else value)


def _verdict(kind: str, target, value, pixel: tuple[float, float]) -> str:
    """What the reader must do with this one mutation (`pixel`: the spacing in force)."""
    one = target is not None
    if kind == "PixelSpacing":
        if min(value) <= 0:
            return FAIL
        off = max(abs(a - b) for a, b in zip(value, SPACING, strict=True))
        return PASS if not one else _near(off, 1e-3)
    if kind == "ImageOrientationPatient":
        axis, degrees = value
        if one:  # one slice turned: its direction cosines change by about sin(angle)
            r = _rotation(axis, degrees)
            off = np.abs(np.concatenate([r[:, 0] - [1, 0, 0], r[:, 1] - [0, 1, 0]])).max()
            return EITHER if off < 1e-3 * (1 + MARGIN) else FAIL
        tilt = abs(degrees) % 180
        tilt = min(tilt, 180 - tilt)
        return PASS if axis == "z" else _near(tilt, 1.0)
    tolerance = IN_PLANE_TOLERANCE_PX * min(pixel)
    if kind == "ImagePositionPatient":
        dx, dy, dz = value
        if not one:
            return PASS  # the whole series moved: the same volume
        return _worst([_near(math.hypot(dx, dy), tolerance), _near(abs(dz), 0.1 * STEP)])
    if kind == "drift":  # the median slice is the reference: the ends lie 2 steps away
        return _near(2 * STEP * abs(math.tan(math.radians(value))), tolerance)
    if kind == "Modality":
        return PASS if value.strip().upper() == "CT" else FAIL
    if kind == "PhotometricInterpretation":
        return PASS if value in ("MONOCHROME1", "MONOCHROME2") else FAIL
    if kind in ("SamplesPerPixel", "NumberOfFrames"):
        return PASS if value == 1 else FAIL
    if kind == "bits":
        allocated, stored, high, sign = value
        ok = allocated == 16 and 12 <= stored <= 16 and high in (None, stored - 1)
        return PASS if ok else FAIL  # stored values 24..1423 fit 12 bits, signed or not
    if kind == "GantryDetectorTilt":
        return _near(abs(value), 0.1)
    if kind == "size":
        if value == HU.shape[1:]:
            return PASS
        # Rows and Columns swapped on every slice: the same number of pixels, a header that
        # no reader can fault; the pixels are then the header's shape (see _expected_hu).
        same_count = math.prod(value) == math.prod(HU.shape[1:])
        return PASS if same_count and not one else FAIL
    raise AssertionError(kind)


def _expected_hu(mutations) -> np.ndarray:
    for kind, target, value in mutations:
        if kind == "size" and target is None and math.prod(value) == HU[0].size:
            return HU.reshape(DEPTH, *value)
    return HU


def _near(value: float, tolerance: float) -> str:
    """PASS below the tolerance, FAIL above, EITHER within MARGIN of it."""
    if value > tolerance * (1 + MARGIN):
        return FAIL
    return PASS if value < tolerance * (1 - MARGIN) else EITHER


@FUZZ
@given(mutations=series_mutations)
def test_mutated_series_loads_right_or_refuses_in_one_line(mutations):
    pixel = SPACING
    for kind, target, value in mutations:
        if kind == "PixelSpacing" and target is None and min(value) > 0:
            pixel = tuple(round(v, 6) for v in value)
    verdict = _worst(_verdict(kind, target, value, pixel) for kind, target, value in mutations)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "s"
        shutil.copytree(_base_series(), folder)
        for k, name in enumerate(NAMES):
            edits = [(kind, value) for kind, target, value in mutations if target in (None, k)]
            if edits:
                ds = pydicom.dcmread(folder / name)
                for kind, value in edits:
                    _apply(ds, k, kind, value)
                ds.save_as(folder / name)
        try:
            series = load_series(folder)
        except Exception as exc:  # noqa: BLE001 - the property: only our one-line errors
            _refused_in_one_line(exc, folder)
            assert verdict != PASS, f"refused a valid series: {exc}"
            event(f"{verdict}: refused")  # --hypothesis-show-statistics counts them
            return
    assert verdict != FAIL, f"accepted {mutations}"
    event(f"{verdict}: loaded")
    # The right voxels, in the right order.
    np.testing.assert_array_equal(series.hu, _expected_hu(mutations))
    assert series.spacing[1:] == pytest.approx(pixel, abs=1.5e-3)
    assert series.spacing[0] == pytest.approx(STEP, rel=0.1 if verdict == EITHER else 1e-4)


def test_series_fuzzer_covers_every_verdict():
    # A guard on the strategies: each verdict is reachable (else the property is vacuous).
    seen = {
        _verdict(kind, target, value, SPACING)
        for kind, target, value in [
            ("Modality", None, "MR"),
            ("PixelSpacing", 2, (0.7, 0.8005)),
            ("GantryDetectorTilt", 1, 0.1),
        ]
    }
    assert seen == {FAIL, PASS, EITHER}


# --- stores ---------------------------------------------------------------------------------

N, SHAPE = 6, (1, 3, 4, 5)
LABELS = np.array([0, 1, 0, 1, 1, 0])


def _write_store(path: Path) -> None:
    with StoreWriter(
        path, kind="t", inputs={"volume": SHAPE}, label_names=["a", "b"], units="normalized"
    ) as w:
        for i in range(N):
            w.append({"volume": np.full(SHAPE, i / N, np.float32)}, label=int(LABELS[i]), id=f"{i}")


label_mutation = st.one_of(
    st.tuples(
        st.just("label"),
        st.integers(0, N - 1),
        st.sampled_from([np.float64, np.float32]),
        st.one_of(
            st.sampled_from([0.0, 1.0, 2.0, -1.0, 0.5, math.nan, math.inf, 1e9]), st.floats(-2, 3)
        ),
    ),
    st.tuples(
        st.just("label"),
        st.integers(0, N - 1),
        st.sampled_from([np.int64, np.int8, np.uint8, np.bool_]),
        st.integers(0, 3),
    ),
)
volume_mutation = st.one_of(
    st.tuples(
        st.just("value"),
        st.tuples(st.integers(0, N - 1), st.integers(0, 2), st.integers(0, 3), st.integers(0, 4)),
        st.sampled_from([math.nan, math.inf, -math.inf, 1e38, -5.0]),
    ),
    st.tuples(
        st.just("dtype"),
        st.none(),
        st.sampled_from([np.float16, np.float64, np.int16, np.uint8, np.bool_, np.complex64]),
    ),
    st.tuples(
        st.just("shape"),
        st.none(),
        st.sampled_from([(N, 1, 0, 4, 5), (N, 3), (N,), (N, 2, 3, 4, 5), (N - 1, *SHAPE)]),
    ),
)
other_mutation = st.one_of(
    st.tuples(st.just("fold"), st.none(), st.sampled_from([0.0, 0.5, math.nan, 1.0, -1.0, 7.0])),
    st.tuples(
        st.just("task"), st.none(), st.sampled_from(["binary", "multiclass", "multilabel", "x"])
    ),
    st.tuples(st.just("truncate"), st.none(), st.sampled_from(["label", "meta/id", "meta/fold"])),
)
store_mutations = st.lists(
    st.one_of(label_mutation, volume_mutation, other_mutation),
    min_size=1,
    max_size=3,
    unique_by=lambda m: {"value": "volume", "dtype": "volume", "shape": "volume"}.get(m[0], m[0]),
)


def _mutate_store(path: Path, kind: str, where, arg, extra=None) -> str:
    """Apply one mutation to the store at `path`; return what read_info must do."""
    with h5py.File(path, "r+") as f:
        if kind == "label":
            labels = LABELS.astype(arg)
            labels[where] = extra
            del f["label"]
            f["label"] = labels
            valid = np.isfinite(labels).all() and np.isin(labels, (0, 1)).all()
            return PASS if valid else FAIL
        if kind == "value":
            f["volume"][where[0], 0, where[1], where[2], where[3]] = arg
            return PASS if math.isfinite(arg) else FAIL
        if kind in ("dtype", "shape"):
            old = f["volume"][:]
            del f["volume"]
            if kind == "dtype":
                f["volume"] = old.astype(arg)
                return FAIL if np.dtype(arg).kind == "c" else PASS
            f["volume"] = np.zeros(arg, np.float32)
            return PASS if arg == (N, 2, 3, 4, 5) else FAIL
        if kind == "fold":
            folds = np.full(N, -1.0)
            folds[0] = arg
            del f["meta/fold"]
            f["meta/fold"] = folds
            return PASS if math.isfinite(arg) and arg == round(arg) else FAIL
        if kind == "task":
            f.attrs["task"] = arg
            return PASS if arg in ("binary", "multiclass") else FAIL
        if kind == "truncate":
            values = f[arg][:-1]
            del f[arg]
            f[arg] = values
            return FAIL
    raise AssertionError(kind)


@FUZZ
@given(mutations=store_mutations)
def test_mutated_store_opens_right_or_refuses_in_one_line(mutations):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "s.h5"
        _write_store(path)
        # Truncation last: a later rewrite of the same dataset would undo it.
        ordered = sorted(mutations, key=lambda m: m[0] == "truncate")
        verdict = _worst([_mutate_store(path, *m) for m in ordered])
        try:
            dataset = StoreDataset(path)
            items = [dataset[i] for i in range(len(dataset))]
            info = read_info(path)
        except Exception as exc:  # noqa: BLE001 - the property: only our one-line errors
            _refused_in_one_line(exc, path)
            assert verdict != PASS, f"refused a valid store: {exc}"
            event(f"{verdict}: refused")
            return
        with h5py.File(path) as f:
            expected = f["label"][:].astype(np.int64)
    assert verdict != FAIL, f"accepted {mutations}"
    event(f"{verdict}: loaded")
    assert info.n == N
    for (inputs, target), label in zip(items, expected, strict=True):
        assert inputs[0].dtype.is_floating_point and bool(inputs[0].isfinite().all())
        assert int(target) == label
