"""Generated whole-lung CT volumes for the MosMed task (seed 002): CT-0 vs CT-2/3.

The real MosMedData archive is not available at run time, so the default data set is drawn
here: a chest cross-section (air outside, soft tissue body, two lung ellipsoids filled with
the parenchyma of lungbench.data.synth) with ground-glass patches whose extent grows with
severity, as in the MosMed classification:

    CT-0   no ground glass (label 0)
    CT-2   ground glass over 25-50% of the lung                      (label 1)
    CT-3   ground glass over 50-75% of the lung, part consolidated  (label 1)

Class shares follow MosMedData (254 CT-0, 125 CT-2, 45 CT-3). One input named `volume`,
(1, D, H, W) in HU, on the Keras example's 64 x 128 x 128 grid by default.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from lungbench.data.store import StoreWriter
from lungbench.data.synth import SOFT_TISSUE_HU, parenchyma

LABEL_NAMES = ("CT-0", "CT-2/3")
DEFAULT_GRID = (64, 128, 128)  # (D, H, W): Keras's 128 x 128 x 64 volumes
FIELD_MM = (300.0, 320.0, 320.0)  # chest extent covered by the grid
SEVERITY_SHARE = {"CT-0": 254, "CT-2": 125, "CT-3": 45}  # MosMedData study counts
INVOLVEMENT = {"CT-0": (0.0, 0.0), "CT-2": (0.25, 0.5), "CT-3": (0.5, 0.75)}
GROUND_GLASS_HU = -600.0
CONSOLIDATION_HU = -100.0


@dataclass(frozen=True)
class StudyParams:
    """What defines one generated study."""

    severity: str  # CT-0, CT-2 or CT-3
    involvement: float  # fraction of the lung volume under ground glass

    @property
    def label(self) -> int:
        return 0 if self.severity == "CT-0" else 1


def draw_study(rng: np.random.Generator) -> StudyParams:
    """Severity by MosMedData's shares, then an involvement inside the severity's range."""
    names = list(SEVERITY_SHARE)
    share = np.array(list(SEVERITY_SHARE.values()), dtype=float)
    severity = names[int(rng.choice(len(names), p=share / share.sum()))]
    lo, hi = INVOLVEMENT[severity]
    return StudyParams(severity, float(rng.uniform(lo, hi)))


def _ellipsoid(shape, centre, radii) -> np.ndarray:
    axes = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij", sparse=True)
    return sum(((a - c) / r) ** 2 for a, c, r in zip(axes, centre, radii, strict=True)) <= 1.0


def lung_masks(shape: tuple[int, int, int], rng: np.random.Generator):
    """(body, lungs) boolean masks: an elliptic body with two lung ellipsoids inside."""
    d, h, w = shape
    body = _ellipsoid(
        shape,
        (d / 2, h / 2, w / 2),
        (d * 0.75, h * rng.uniform(0.36, 0.42), w * rng.uniform(0.44, 0.48)),
    )
    lungs = np.zeros(shape, dtype=bool)
    for side in (-1, 1):
        centre = (
            d * rng.uniform(0.45, 0.55),
            h * rng.uniform(0.45, 0.52),
            w / 2 + side * w * rng.uniform(0.19, 0.23),
        )
        radii = (
            d * rng.uniform(0.38, 0.45),
            h * rng.uniform(0.26, 0.32),
            w * rng.uniform(0.14, 0.18),
        )
        lungs |= _ellipsoid(shape, centre, radii)
    return body, lungs & body


def render_study(
    params: StudyParams, shape: tuple[int, int, int], rng: np.random.Generator
) -> np.ndarray:
    """A HU volume (D, H, W): air, body, lungs, and ground glass over `involvement` of them."""
    spacing = float(np.mean([f / n for f, n in zip(FIELD_MM, shape, strict=True)]))
    body, lungs = lung_masks(shape, rng)
    volume = np.full(shape, -1000.0) + rng.normal(0.0, 10.0, shape)
    volume = np.where(body, SOFT_TISSUE_HU + rng.normal(0.0, 15.0, shape), volume)
    volume = np.where(lungs, parenchyma(shape, spacing, rng), volume)
    if params.involvement > 0:
        # Patchy opacities: threshold smooth noise inside the lungs at the quantile that
        # covers exactly `involvement` of the lung volume.
        field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma=max(shape) / 24)
        threshold = np.quantile(field[lungs], 1.0 - params.involvement)
        patches = lungs & (field > threshold)
        volume = np.where(patches, GROUND_GLASS_HU + rng.normal(0.0, 40.0, shape), volume)
        if params.severity == "CT-3":
            core = lungs & (field > np.quantile(field[lungs], 1.0 - params.involvement / 4))
            volume = np.where(core, CONSOLIDATION_HU + rng.normal(0.0, 30.0, shape), volume)
    return ndimage.gaussian_filter(volume, sigma=0.7)


def generate_study(index: int, seed: int, shape: tuple[int, int, int]):
    """Study `index` of a data set with `seed`: (volume (1, D, H, W) HU, StudyParams)."""
    rng = np.random.default_rng([seed, index, 2])
    params = draw_study(rng)
    return render_study(params, shape, rng)[None], params


def write_mosmed_store(
    out: str | os.PathLike,
    n: int,
    grid: tuple[int, int, int] = DEFAULT_GRID,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
) -> None:
    """Generate `n` studies on `grid` (D, H, W) into a store at `out` (atomically)."""
    grid = tuple(int(g) for g in grid)
    spacing = tuple(f / g for f, g in zip(FIELD_MM, grid, strict=True))
    provenance = {
        "generator": "lungbench.data.synth_mosmed",
        "seed": seed,
        "n": n,
        "grid": grid,
        "note": "generated data, not MosMedData",
    }
    with StoreWriter(
        out,
        kind="synth-mosmed",
        inputs={"volume": (1, *grid)},
        label_names=LABEL_NAMES,
        provenance=provenance,
    ) as writer:
        for i in range(n):
            volume, params = generate_study(i, seed, grid)
            writer.append(
                {"volume": volume},
                label=params.label,
                id=f"synth-mosmed-{seed}-{i:05d}",
                source=f"lungbench.data.synth_mosmed:{params.severity}",
                spacing=spacing,
            )
            if progress is not None:
                progress(1)
