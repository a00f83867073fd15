"""Layer 3 (data): Generated whole-lung CT volumes for the MosMed task (seed 002): CT-0 vs CT-2/3.

The real MosMedData archive is not available at run time, so the default data set is drawn
here: a chest cross-section (air outside, soft tissue body, two lung ellipsoids filled with
the parenchyma of lungbench.data.synth) with ground-glass patches whose extent grows with
severity, as in the MosMed classification:

    CT-0   no ground glass (label 0)
    CT-2   ground glass over 25-50% of the lung                      (label 1)
    CT-3   ground glass over 50-75% of the lung, part consolidated  (label 1)

Class shares follow MosMedData (254 CT-0, 125 CT-2, 45 CT-3). One input named `volume`,
(1, D, H, W) in HU, on the Keras example's 64 x 128 x 128 grid by default.

So that the mean lung density alone does not give the label away, every study, whatever its
class, varies as real scans do (StudyParams): breath-hold depth (an expiratory scan has
denser lungs), a gravity-dependent density gradient towards the back, a few small benign
opacities (scars, plate atelectasis), the noise level; and the ground glass of CT-2/3 ranges
from faint to dense. What separates the classes is the patchy opacity pattern and its extent.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from lungbench.data.store import StoreWriter
from lungbench.data.synth import SOFT_TISSUE_HU, parenchyma

# Bumped whenever the generated volumes change, so a cached store of an older generator
# (OUT/data/synth-mosmed-v<N>-...) is never silently reused.
GENERATOR_VERSION = 2
LABEL_NAMES = ("CT-0", "CT-2/3")
DEFAULT_GRID = (64, 128, 128)  # (D, H, W): Keras's 128 x 128 x 64 volumes
FIELD_MM = (300.0, 320.0, 320.0)  # chest extent covered by the grid
SEVERITY_SHARE = {"CT-0": 254, "CT-2": 125, "CT-3": 45}  # MosMedData study counts
INVOLVEMENT = {"CT-0": (0.0, 0.0), "CT-2": (0.25, 0.5), "CT-3": (0.5, 0.75)}
GROUND_GLASS_HU = (-720.0, -520.0)  # per study: faint to dense ground glass
CONSOLIDATION_HU = -100.0
# Per-study variation shared by every class (HU): breath-hold shift of the lung density,
# the largest dependent (posterior) gradient, image noise.
INSPIRATION_SHIFT_HU = (-60.0, 120.0)
DEPENDENT_GRADIENT_HU = (0.0, 150.0)
NOISE_HU = (8.0, 35.0)
BENIGN_OPACITIES = (0, 6)  # small scars / atelectasis per study (inclusive range)


@dataclass(frozen=True)
class StudyParams:
    """What defines one generated study."""

    severity: str  # CT-0, CT-2 or CT-3
    involvement: float  # fraction of the lung volume under ground glass
    ground_glass_hu: float = -600.0
    inspiration_shift_hu: float = 0.0  # > 0: an expiratory scan (denser lungs)
    dependent_gradient_hu: float = 0.0  # extra density at the back of the lungs
    noise_hu: float = 10.0
    benign_opacities: int = 0

    @property
    def label(self) -> int:
        return 0 if self.severity == "CT-0" else 1


def draw_study(rng: np.random.Generator) -> StudyParams:
    """Severity by MosMedData's shares, then an involvement inside the severity's range."""
    names = list(SEVERITY_SHARE)
    share = np.array(list(SEVERITY_SHARE.values()), dtype=float)
    severity = names[int(rng.choice(len(names), p=share / share.sum()))]
    lo, hi = INVOLVEMENT[severity]
    return StudyParams(
        severity,
        float(rng.uniform(lo, hi)),
        ground_glass_hu=float(rng.uniform(*GROUND_GLASS_HU)),
        inspiration_shift_hu=float(rng.uniform(*INSPIRATION_SHIFT_HU)),
        dependent_gradient_hu=float(rng.uniform(*DEPENDENT_GRADIENT_HU)),
        noise_hu=float(rng.uniform(*NOISE_HU)),
        benign_opacities=int(rng.integers(BENIGN_OPACITIES[0], BENIGN_OPACITIES[1] + 1)),
    )


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
    """A HU volume (D, H, W): air, body, lungs (with the study's breath-hold shift, dependent
    gradient and benign opacities), and ground glass over `involvement` of the lungs."""
    spacing = float(np.mean([f / n for f, n in zip(FIELD_MM, shape, strict=True)]))
    body, lungs = lung_masks(shape, rng)
    volume = np.full(shape, -1000.0)
    volume = np.where(body, SOFT_TISSUE_HU + rng.normal(0.0, 15.0, shape), volume)
    volume = np.where(lungs, _lung_background(params, shape, spacing, rng), volume)
    volume = np.where(lungs & _benign_opacities(params, shape, rng), -150.0, volume)
    if params.involvement > 0:
        # Patchy opacities: threshold smooth noise inside the lungs at the quantile that
        # covers exactly `involvement` of the lung volume.
        field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma=max(shape) / 24)
        threshold = np.quantile(field[lungs], 1.0 - params.involvement)
        patches = lungs & (field > threshold)
        ground_glass = params.ground_glass_hu + rng.normal(0.0, 40.0, shape)
        volume = np.where(patches, np.maximum(volume, ground_glass), volume)
        if params.severity == "CT-3":
            core = lungs & (field > np.quantile(field[lungs], 1.0 - params.involvement / 4))
            volume = np.where(core, CONSOLIDATION_HU + rng.normal(0.0, 30.0, shape), volume)
    volume = volume + rng.normal(0.0, params.noise_hu, shape)  # the scanner's noise
    return ndimage.gaussian_filter(volume, sigma=0.7)


def _lung_background(
    params: StudyParams, shape: tuple[int, int, int], spacing: float, rng: np.random.Generator
) -> np.ndarray:
    """Parenchyma shifted by breath-hold depth, denser towards the back (axis 1 grows
    posteriorly) as in a supine patient."""
    posterior = (np.arange(shape[1], dtype=np.float32) / max(1, shape[1] - 1))[None, :, None]
    return (
        parenchyma(shape, spacing, rng)
        + params.inspiration_shift_hu
        + params.dependent_gradient_hu * posterior**2
    )


def _benign_opacities(
    params: StudyParams, shape: tuple[int, int, int], rng: np.random.Generator
) -> np.ndarray:
    """Small dense blobs and flat bands (scars, plate atelectasis) that any study may have."""
    mask = np.zeros(shape, dtype=bool)
    for _ in range(params.benign_opacities):
        centre = [rng.uniform(0.2, 0.8) * n for n in shape]
        radii = [max(1.0, rng.uniform(0.01, 0.04) * n) for n in shape]
        radii[int(rng.integers(0, 3))] *= rng.choice([1.0, 0.3])  # some flattened to a band
        mask |= _ellipsoid(shape, centre, radii)
    return mask


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
        "generator_version": GENERATOR_VERSION,
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
