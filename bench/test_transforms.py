"""The augmentation transforms (lungbench.data.transforms) on one (context, zoom) item.

Runs in the DataLoader workers, on the CPU, once per sample: if it is slower than a
training step divided by the workers, data loading becomes the bottleneck.
"""

from __future__ import annotations

import numpy as np
import pytest

from lungbench.data.geometry import geometry
from lungbench.data.transforms import PRESETS as TRANSFORM_PRESETS
from lungbench.data.transforms import make_transform

GRIDS = ["dey2018", "default", "iso64"]
TRANSFORMS = [name for name in TRANSFORM_PRESETS if name != "none"]


@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("preset", GRIDS)
def test_augment_item(benchmark, quick, preset, transform):
    if quick and (preset != "dey2018" or transform != "standard"):
        pytest.skip("trimmed in quick mode")
    benchmark.group = f"augment-{preset}"
    geo = geometry(preset)
    rng = np.random.default_rng(0)
    item = tuple(
        rng.random((1, *grid), dtype=np.float32) for grid in (geo.context_grid, geo.zoom_grid)
    )
    augment = make_transform(transform, seed=0)
    out = benchmark.pedantic(
        augment,
        args=(item,),
        rounds=1 if quick else 20,
        warmup_rounds=1 if quick else 2,
        iterations=1,
    )
    assert [a.shape for a in out] == [a.shape for a in item]
    benchmark.extra_info.update(preset=preset, transform=transform)
