"""Reading a training batch from an HDF5 store (one chunk per sample, lzf-compressed).

The store holds random int16 HU cubes at each preset's grid; the timed call reads `batch`
random rows through StoreDataset (decompression + HU normalisation) and collates them.
"""

from __future__ import annotations

import numpy as np
import pytest
from torch.utils.data import default_collate

from lungbench.data.geometry import geometry
from lungbench.data.store import StoreDataset, StoreWriter

PRESETS = ["dey2018", "default", "iso64"]
N = 32


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """`stores(preset)`: a store of N random samples on the preset's grid, written once."""
    folder = tmp_path_factory.mktemp("bench-io")
    made: dict[str, object] = {}

    def get(preset: str):
        if preset not in made:
            made[preset] = write_random_store(folder / f"{preset}.h5", preset)
        return made[preset]

    return get


def write_random_store(path, preset: str):
    rng = np.random.default_rng(0)
    geo = geometry(preset)
    inputs = {"context": (1, *geo.context_grid), "zoom": (1, *geo.zoom_grid)}
    with StoreWriter(path, kind="bench", inputs=inputs, label_names=["b", "m"]) as w:
        for i in range(N):
            cubes = {k: rng.integers(-1000, 400, s).astype(np.int16) for k, s in inputs.items()}
            w.append(cubes, label=i % 2, id=f"s{i}", spacing=geo.context_spacing)
    return path


@pytest.mark.parametrize("batch", [2, 8])
@pytest.mark.parametrize("preset", PRESETS)
def test_hdf5_batch_read(benchmark, quick, stores, preset, batch):
    if quick and (preset != "dey2018" or batch != 2):
        pytest.skip("trimmed in quick mode")
    benchmark.group = f"hdf5-batch-read-{preset}"
    dataset = StoreDataset(stores(preset))
    rng = np.random.default_rng(1)

    def read_batch():
        rows = rng.choice(len(dataset), size=batch, replace=False)
        return default_collate([dataset[int(i)] for i in rows])

    inputs, target = benchmark.pedantic(
        read_batch, rounds=1 if quick else 20, warmup_rounds=1 if quick else 2, iterations=1
    )
    assert inputs[0].shape[0] == batch and target.shape == (batch,)
    benchmark.extra_info.update(
        preset=preset, batch=batch, bytes_per_batch=sum(x.numel() * 4 for x in inputs)
    )
