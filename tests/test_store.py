"""The HDF5 store: round trip, generator determinism, lazy Dataset, malformed files."""

from __future__ import annotations

import re

import h5py
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from lungbench.core.errors import DataError
from lungbench.data.geometry import geometry
from lungbench.data.store import (
    FORMAT_VERSION,
    StoreDataset,
    StoreWriter,
    normalize,
    read_info,
    read_meta,
)
from lungbench.data.synth import draw_nodule, generate_sample, write_synthetic_store

SHAPE = (1, 3, 4, 5)


def _write(path, n=3, **kw):
    with StoreWriter(
        path,
        kind="test",
        inputs={"context": SHAPE, "zoom": SHAPE},
        label_names=["benign", "malignant"],
        **kw,
    ) as w:
        for i in range(n):
            w.append(
                {"context": np.full(SHAPE, -1000 + 100 * i), "zoom": np.full(SHAPE, 400.0)},
                label=i % 2,
                id=f"s{i}",
                source="unit",
                spacing=(2, 1, 1),
                diameter=5.0 + i,
            )
    return path


def test_round_trip(tmp_path):
    path = _write(tmp_path / "s.h5")
    info = read_info(path)
    assert info.n == 3 and info.kind == "test" and info.task == "binary"
    assert info.inputs == {"context": SHAPE, "zoom": SHAPE}
    assert info.units == {"context": "HU", "zoom": "HU"}
    assert info.format_version == FORMAT_VERSION
    meta = read_meta(path)
    assert list(meta["id"]) == ["s0", "s1", "s2"]
    assert list(meta["label"]) == [0, 1, 0]
    assert meta["diameter"] == pytest.approx([5, 6, 7])
    assert list(meta["fold"]) == [-1, -1, -1]
    with h5py.File(path) as f:
        assert f["context"].dtype == np.int16
        assert f["context"].chunks == (1, *SHAPE), "one sample per chunk"
        assert f["context"][1].min() == -900
    (ctx, zoom), label = StoreDataset(path)[1]
    assert ctx.dtype == torch.float32 and ctx.shape == SHAPE
    assert ctx[0, 0, 0, 0].item() == pytest.approx(100 / 1400)  # -900 HU in [-1000, 400]
    assert zoom.max().item() == 1.0 and label.item() == 1.0


def test_normalize_window():
    hu = np.array([-2000, -1000, -300, 400, 3000], dtype=np.int16)
    assert normalize(hu, "HU").tolist() == pytest.approx([0, 0, 0.5, 1, 1])


def test_failed_write_leaves_nothing(tmp_path):
    path = tmp_path / "broken.h5"
    with (
        pytest.raises(RuntimeError),
        StoreWriter(path, kind="t", inputs={"x": SHAPE}, label_names=["a", "b"]) as w,
    ):
        w.append({"x": np.zeros(SHAPE)}, label=0, id="a")
        raise RuntimeError("conversion failed half way")
    assert not path.exists()
    assert not list(tmp_path.iterdir()), "no temporary file left behind either"


@pytest.mark.parametrize("label", [2, -1, [0, 1], 0.5, float("nan"), "1"])
def test_label_outside_allowed_set(tmp_path, label):
    with (
        pytest.raises(DataError, match="outside the allowed set"),
        StoreWriter(tmp_path / "l.h5", kind="t", inputs={"x": SHAPE}, label_names=["a", "b"]) as w,
    ):
        w.append({"x": np.zeros(SHAPE)}, label=label, id="a")


def test_nan_volume_rejected(tmp_path):
    with (
        pytest.raises(DataError, match="NaN or Inf"),
        StoreWriter(tmp_path / "n.h5", kind="t", inputs={"x": SHAPE}, label_names=["a", "b"]) as w,
    ):
        w.append({"x": np.full(SHAPE, np.nan)}, label=0, id="a")


def test_missing_truncated_and_wrong_files(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_info(tmp_path / "absent.h5")
    good = _write(tmp_path / "good.h5")
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(good.read_bytes()[:2000])
    with pytest.raises(DataError, match="truncated.h5: not a readable HDF5"):
        read_info(truncated)
    with h5py.File(tmp_path / "plain.h5", "w") as f:
        f["x"] = np.zeros(3)
    with pytest.raises(DataError, match="not a lungbench store"):
        read_info(tmp_path / "plain.h5")
    with h5py.File(good, "r+") as f:
        del f["zoom"]
    with pytest.raises(DataError, match="'zoom' missing"):
        read_info(good)


def test_wrong_shaped_dataset(tmp_path):
    path = _write(tmp_path / "s.h5")
    with h5py.File(path, "r+") as f:
        del f["meta/diameter"]
        f["meta/diameter"] = np.zeros(2, dtype=np.float32)
    with pytest.raises(DataError, match="'meta/diameter' has 2 rows"):
        read_info(path)


def test_generator_is_deterministic_and_order_free():
    geo = geometry("dey2018")
    a, pa = generate_sample(5, seed=1, kind="lidc", geo=geo)
    b, pb = generate_sample(5, seed=1, kind="lidc", geo=geo)
    c, _ = generate_sample(5, seed=2, kind="lidc", geo=geo)
    assert pa == pb and all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["context"], c["context"])
    assert a["context"].shape == (1, *geo.context_grid)
    assert -1100 < a["context"].mean() < -500, "mostly lung parenchyma in HU"


def test_kinds_share_no_sample_for_the_same_seed():
    geo = geometry("dey2018")
    for index in range(4):
        lidc, _ = generate_sample(index, seed=0, kind="lidc", geo=geo)
        lungx, _ = generate_sample(index, seed=0, kind="lungx", geo=geo)
        assert not np.array_equal(lidc["context"], lungx["context"])


@pytest.mark.slow  # the fast tier starts no process and trains nothing
def test_parallel_generation_matches_serial(tmp_path):
    geo = geometry("dey2018")
    write_synthetic_store(tmp_path / "serial.h5", "lidc", 32, geo, seed=4, workers=1)
    write_synthetic_store(tmp_path / "pool.h5", "lidc", 32, geo, seed=4, workers=2)
    with h5py.File(tmp_path / "serial.h5") as s, h5py.File(tmp_path / "pool.h5") as p:
        assert np.array_equal(s["context"][:], p["context"][:])
        assert np.array_equal(s["label"][:], p["label"][:])


def test_size_distributions_by_kind():
    rng = np.random.default_rng(0)
    lidc = {lab: [draw_nodule(rng, lab, "lidc").diameter_mm for _ in range(400)] for lab in (0, 1)}
    lungx = {
        lab: [draw_nodule(rng, lab, "lungx").diameter_mm for _ in range(400)] for lab in (0, 1)
    }
    # LIDC-like: malignant nodules are about twice the size; LUNGx-like: sizes match.
    assert np.median(lidc[1]) > 1.6 * np.median(lidc[0])
    assert np.median(lungx[1]) == pytest.approx(np.median(lungx[0]), rel=0.15)


def test_malignant_nodules_are_less_round():
    # Surface voxels per volume^(2/3) is smallest for a sphere; lobulation and spicules add
    # surface. lungx kind with the same seed gives both classes the same diameter.
    from scipy import ndimage

    from lungbench.data.synth import nodule_mask, render_shape

    shape, spacing = render_shape(geometry("default"))

    def surface_ratio(label, seed):
        params = draw_nodule(np.random.default_rng(seed), label, "lungx")
        mask = nodule_mask(params, shape, spacing, np.random.default_rng(1))
        surface = mask & ~ndimage.binary_erosion(mask)
        return surface.sum() / mask.sum() ** (2 / 3)

    for seed in range(4):
        assert surface_ratio(1, seed) > 1.05 * surface_ratio(0, seed)


def test_dataset_with_worker_processes(tiny_store):
    ds = StoreDataset(tiny_store)
    loader = DataLoader(ds, batch_size=4, num_workers=2, shuffle=False)
    batches = list(loader)
    assert len(batches) == 6
    (ctx, zoom), target = batches[0]
    assert ctx.shape == (4, 1, 5, 50, 50) and zoom.shape == (4, 1, 5, 50, 50)
    assert target.tolist() == [0.0, 1.0, 0.0, 1.0]
    # Workers read the same bytes as the main process.
    assert torch.equal(ctx[2], ds[2][0][0])


# --- issue #17: stores validated when opened ---------------------------------------------


def _float_store(path, n=4, **kw):
    """A store of float32 'normalized' volumes (the kind other tools write), labels 0, 1, ..."""
    with StoreWriter(
        path, kind="t", inputs={"volume": SHAPE}, label_names=["a", "b"], units="normalized", **kw
    ) as w:
        for i in range(n):
            w.append({"volume": np.full(SHAPE, i / n, np.float32)}, label=i % 2, id=f"s{i}")
    return path


def _replace(path, name, values):
    with h5py.File(path, "r+") as f:
        del f[name]
        f[name] = values


def test_fractional_label_fails_validation(tmp_path):
    # The check was 0 <= label < 2: 0.5 passed, and trained as "benign" or as 0.5.
    path = _float_store(tmp_path / "s.h5")
    _replace(path, "label", np.array([0.0, 0.5, 1.0, 0.0]))
    with pytest.raises(DataError) as error:
        read_info(path)
    assert str(error.value) == (
        f"{path}: dataset 'label' has values outside the allowed set "
        f"(binary: integers 0..1 (a, b)): 0.5 at row 1"
    )


def test_float_typed_integer_labels_open_and_data_info_counts_them(tmp_path, capsys):
    # `lungbench data info` crashed on float-typed labels (a float as a list index).
    from lungbench.cli import main

    path = _float_store(tmp_path / "s.h5")
    _replace(path, "label", np.array([0.0, 1.0, 1.0, 1.0], np.float32))
    assert read_info(path).n == 4
    assert main(["data", "info", str(path)]) == 0
    assert "labels     {'a': 1, 'b': 3}" in capsys.readouterr().out


@pytest.mark.parametrize("dtype", [np.uint8, np.int32, np.float16, np.float64, np.bool_])
def test_data_info_on_every_numeric_dtype(tmp_path, capsys, dtype):
    from lungbench.cli import main

    path = _float_store(tmp_path / "s.h5")
    _replace(path, "volume", np.ones((4, *SHAPE), dtype))
    assert main(["data", "info", str(path)]) == 0
    assert "input      volume: (1, 3, 4, 5)" in capsys.readouterr().out
    ctx, _ = StoreDataset(path)[0]
    assert ctx[0].dtype == torch.float32


@pytest.mark.parametrize(
    ("name", "values", "expected"),
    [
        ("volume", np.zeros((4, 1, 0, 4, 5), np.float32), "has shape (4, 1, 0, 4, 5), expected"),
        ("volume", np.zeros((4, *SHAPE), np.complex64), "has dtype complex64, expected"),
        ("label", np.array([b"a", b"b", b"a", b"b"]), "dataset 'label' has shape (4,) and dtype"),
        ("meta/fold", np.array([0, 0.5, 1, 2]), "dataset 'meta/fold' has shape (4,) and dtype"),
        ("meta/spacing", np.ones((4, 2), np.float32), "dataset 'meta/spacing' has shape (4, 2)"),
    ],
)
def test_shapes_and_dtypes_are_checked(tmp_path, name, values, expected):
    path = _float_store(tmp_path / "s.h5")
    _replace(path, name, values)
    with pytest.raises(DataError, match=re.escape(expected)):
        read_info(path)


def test_nan_is_found_when_opened_by_a_chunked_scan(tmp_path, monkeypatch):
    # NaN was found only when its row was read: after the step timing or a whole CV fold.
    import lungbench.data.store as store

    monkeypatch.setattr(store, "SCAN_BYTES", 2 * 60 * 4)  # two rows per read
    path = _float_store(tmp_path / "s.h5", n=7)
    with h5py.File(path, "r+") as f:
        f["volume"][5, 0, 2, 3, 4] = np.inf
    with pytest.raises(DataError) as error:
        StoreDataset(path)
    assert str(error.value) == (
        f"{path}: dataset 'volume' row 5 has NaN or Inf values; rebuild the store from its source"
    )


def test_nan_store_stops_bench_before_any_run_folder(tmp_path, capsys):
    from test_data_dicom import cli_error

    from lungbench.cli import main

    path = _float_store(tmp_path / "s.h5")
    with h5py.File(path, "r+") as f:
        f["volume"][2, 0, 0, 0, 0] = np.nan
    runs = tmp_path / "runs"
    assert main(["bench", "--store", str(path), "--out", str(runs)]) == 2
    assert "dataset 'volume' row 2 has NaN or Inf values" in cli_error(capsys)
    assert not runs.exists() or not any(runs.iterdir())


def test_writer_asked_for_every_class_refuses_one(tmp_path):
    path = tmp_path / "one.h5"
    with (
        pytest.raises(DataError, match="no sample of class b .*samples per class: a 2, b 0"),
        StoreWriter(
            path, kind="t", inputs={"x": SHAPE}, label_names=["a", "b"], require_all_classes=True
        ) as w,
    ):
        for i in range(2):
            w.append({"x": np.zeros(SHAPE)}, label=0, id=f"s{i}")
    assert list(tmp_path.iterdir()) == []
