"""The generated MosMed studies: labels follow the involvement, and the mean lung density
alone does not give the label away (every class varies in breath-hold, gradient, noise)."""

from __future__ import annotations

import numpy as np

from lungbench.data.store import read_info
from lungbench.data.synth_mosmed import (
    GENERATOR_VERSION,
    INVOLVEMENT,
    draw_study,
    generate_study,
    lung_masks,
    write_mosmed_store,
)
from lungbench.harness.sweep import default_store_path

GRID = (16, 32, 32)


def _lung_mean(index: int) -> tuple[int, float, float]:
    """(label, mean HU inside the study's lungs, involvement) of study `index`."""
    volume, params = generate_study(index, seed=0, shape=GRID)
    rng = np.random.default_rng([0, index, 2])  # generate_study's generator, replayed:
    draw_study(rng)  # the parameters first,
    _, lungs = lung_masks(GRID, rng)  # then the masks, as render_study draws them
    return params.label, float(volume[0][lungs].mean()), params.involvement


def test_labels_follow_the_severity_and_the_density_overlaps():
    rows = [_lung_mean(i) for i in range(30)]
    labels = np.array([r[0] for r in rows])
    means = np.array([r[1] for r in rows])
    involvement = np.array([r[2] for r in rows])
    assert set(labels) == {0, 1}
    assert np.all(involvement[labels == 0] == 0.0)
    assert np.all(involvement[labels == 1] >= INVOLVEMENT["CT-2"][0])
    # CT-2/3 lungs are denser on average, but not every one: the ranges overlap, so a
    # classifier must look at the opacity pattern, not a single threshold on the mean.
    assert means[labels == 1].mean() > means[labels == 0].mean()
    assert means[labels == 0].max() > means[labels == 1].min()


def test_studies_are_reproducible_and_the_cache_names_the_generator(tmp_path):
    a, pa = generate_study(3, seed=5, shape=GRID)
    b, pb = generate_study(3, seed=5, shape=GRID)
    assert pa == pb and np.array_equal(a, b)
    store = tmp_path / "m.h5"
    write_mosmed_store(store, 4, grid=GRID, seed=5)
    assert read_info(store).provenance["generator_version"] == GENERATOR_VERSION
    path = default_store_path(tmp_path, "lidc", 754, "default", 0)
    assert "-v" in path.stem and path.stem.startswith("synth-lidc-v")
