"""Layer 3 (data): Generated lung nodules: seeded, deterministic, HU-realistic.

Each sample is rendered once in millimetre space around the nodule (at the zoom spacing, over
the context field of view) and then resampled into the two cubes of a geometry preset:

    parenchyma   about -850 HU with smooth low-frequency texture and noise
    vessels      a few tubes of soft tissue (about +40 HU), 1-4 mm across
    nodule       benign: round and smooth, smaller on average, sometimes calcified;
                 malignant: larger on average, lobulated and spiculated, sometimes part-solid.

kind="lidc"  sizes differ by class as in LIDC-IDRI (benign median ~6 mm, malignant ~14 mm).
kind="lungx" both classes draw from one size distribution (median ~14 mm), as in LUNGx, so
             size alone does not separate them and only shape and density do.

    python -m lungbench.data.synth   (no CLI here: use `lungbench data synth`)
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from lungbench.core.errors import look_up_option
from lungbench.data.geometry import Geometry
from lungbench.data.store import StoreWriter

KINDS = ("lidc", "lungx")
# Part of every sample's seed, so that stores of different kinds made with the same --seed
# share no nodule (a LUNGx-like test set must not contain LIDC-like training nodules).
KIND_SEED_IDS = {"lidc": 1, "lungx": 2}
# Bumped whenever the generated nodules change, so a cached store of an older generator
# (OUT/data/synth-<kind>-v<N>-...) is never silently reused.
GENERATOR_VERSION = 2
LABEL_NAMES = ("benign", "malignant")
PARENCHYMA_HU = -850.0
SOFT_TISSUE_HU = 40.0


@dataclass(frozen=True)
class NoduleParams:
    """Everything that defines one generated nodule (drawn from the seed)."""

    label: int
    diameter_mm: float
    lobulation: float  # relative radius modulation, 0 = sphere
    spiculation: int  # number of spikes
    calcified: bool
    ground_glass_rim: bool
    solid_hu: float


def draw_nodule(rng: np.random.Generator, label: int, kind: str) -> NoduleParams:
    """Draw the parameters of one nodule of class `label` (0 benign, 1 malignant)."""
    if kind == "lungx" or label == 1:  # LUNGx: benign nodules as large as malignant ones
        diameter = rng.lognormal(np.log(14.0), 0.35)
    else:
        diameter = rng.lognormal(np.log(6.5), 0.35)
    diameter = float(np.clip(diameter, 3.0, 30.0))
    if label == 1:
        return NoduleParams(
            1,
            diameter,
            lobulation=rng.uniform(0.12, 0.3),
            spiculation=int(rng.integers(3, 10)),
            calcified=False,
            ground_glass_rim=bool(rng.random() < 0.35),
            solid_hu=float(rng.normal(30, 15)),
        )
    return NoduleParams(
        0,
        diameter,
        lobulation=rng.uniform(0.0, 0.06),
        spiculation=0,
        calcified=bool(rng.random() < 0.3),
        ground_glass_rim=False,
        solid_hu=float(rng.normal(45, 15)),
    )


def _coords(shape: tuple[int, ...], spacing: float) -> list[np.ndarray]:
    """Millimetre coordinates of voxel centres, origin at the volume centre."""
    axes = [(np.arange(n) - (n - 1) / 2.0) * spacing for n in shape]
    return np.meshgrid(*axes, indexing="ij", sparse=True)


def parenchyma(shape: tuple[int, ...], spacing: float, rng: np.random.Generator) -> np.ndarray:
    """Lung background in HU: -850 with smooth texture, noise and a few vessels."""
    texture = ndimage.gaussian_filter(rng.standard_normal(shape), sigma=4.0 / spacing)
    texture *= 40.0 / (texture.std() + 1e-6)
    volume = PARENCHYMA_HU + texture + rng.normal(0.0, 15.0, shape)
    z, y, x = _coords(shape, spacing)
    half = np.array(shape) * spacing / 2.0
    for _ in range(int(rng.integers(2, 6))):
        # A straight tube through a random point in a random direction.
        p = rng.uniform(-half, half)
        d = rng.standard_normal(3)
        d /= np.linalg.norm(d)
        radius = rng.uniform(0.5, 2.0)
        rel = [z - p[0], y - p[1], x - p[2]]
        along = rel[0] * d[0] + rel[1] * d[1] + rel[2] * d[2]
        dist2 = rel[0] ** 2 + rel[1] ** 2 + rel[2] ** 2 - along**2
        volume = np.where(dist2 < radius**2, SOFT_TISSUE_HU + rng.normal(0, 10), volume)
    return volume


def nodule_mask(
    params: NoduleParams, shape: tuple[int, ...], spacing: float, rng: np.random.Generator
) -> np.ndarray:
    """Boolean mask of the nodule centred in the volume (lobulated and spiculated by params)."""
    z, y, x = _coords(shape, spacing)
    r = np.sqrt(z**2 + y**2 + x**2) + 1e-6
    radius = np.full(np.broadcast_shapes(z.shape, y.shape, x.shape), params.diameter_mm / 2.0)
    if params.lobulation > 0:
        # Lobulation: low-order angular harmonics modulate the radius.
        for _ in range(3):
            k = rng.standard_normal(3)
            k /= np.linalg.norm(k)
            cos = (z * k[0] + y * k[1] + x * k[2]) / r
            order = int(rng.integers(2, 5))
            radius = radius * (1.0 + params.lobulation / 3 * np.cos(order * np.arccos(cos)))
    mask = r <= radius
    for _ in range(params.spiculation):
        # Spicules: thin tubes from the surface outwards, up to about one radius long.
        d = rng.standard_normal(3)
        d /= np.linalg.norm(d)
        along = z * d[0] + y * d[1] + x * d[2]
        dist2 = r**2 - along**2
        length = params.diameter_mm / 2.0 * rng.uniform(1.4, 2.2)
        mask |= (along > 0) & (along < length) & (dist2 < rng.uniform(0.4, 0.9) ** 2)
    return mask


def calcified_core(mask: np.ndarray, iterations: int) -> np.ndarray:
    """The calcified core: the mask eroded `iterations` times or, for a nodule too thin for
    that (a 2-voxel-thick one erodes to nothing), its innermost voxels, so that a nodule
    rated calcified never loses its calcium."""
    core = ndimage.binary_erosion(mask, iterations=iterations)
    if core.any() or not mask.any():
        return core
    depth = ndimage.distance_transform_edt(mask)
    return depth >= depth.max()


def render_nodule(
    params: NoduleParams,
    shape: tuple[int, ...],
    spacing: float,
    rng: np.random.Generator,
    mask: np.ndarray | None = None,
) -> np.ndarray:
    """A HU volume of `shape` at `spacing` mm with the nodule (or the given `mask`) centred."""
    volume = parenchyma(shape, spacing, rng)
    if mask is None:
        mask = nodule_mask(params, shape, spacing, rng)
    solid = params.solid_hu + rng.normal(0.0, 20.0, shape)
    if params.ground_glass_rim:
        # Part-solid: the outer shell of the nodule is ground glass (about -550 HU).
        core = ndimage.binary_erosion(mask, iterations=max(1, int(1.5 / spacing)))
        volume = np.where(mask & ~core, rng.normal(-550, 40, shape), volume)
        volume = np.where(core, solid, volume)
    else:
        volume = np.where(mask, solid, volume)
    if params.calcified:
        core = calcified_core(mask, max(1, int(params.diameter_mm / 4 / spacing)))
        volume = np.where(core, rng.normal(600, 100, shape), volume)
    # Partial-volume blur of a CT reconstruction kernel.
    return ndimage.gaussian_filter(volume, sigma=0.6 / spacing)


def cut_cubes(volume: np.ndarray, spacing: float, geo: Geometry) -> dict[str, np.ndarray]:
    """Resample a centred HU volume (rendered over the context FOV) into the two cubes."""
    t = torch.from_numpy(volume.astype(np.float32))[None, None]
    context = F.interpolate(t, size=geo.context_grid, mode="area")
    centre = np.array(volume.shape) // 2
    half = (np.array(geo.zoom_mm) / spacing / 2).astype(int)
    lo, hi = centre - half, centre + half
    crop = t[..., lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
    zoom = F.interpolate(crop, size=geo.zoom_grid, mode="area")
    return {"context": context[0].numpy(), "zoom": zoom[0].numpy()}


def render_shape(geo: Geometry) -> tuple[tuple[int, int, int], float]:
    """Render grid and spacing: the zoom's finest spacing over the context field of view."""
    spacing = float(min(geo.zoom_spacing))
    shape = tuple(int(round(m / spacing)) for m in geo.context_mm)
    return shape, spacing  # type: ignore[return-value]


def generate_sample(
    index: int, seed: int, kind: str, geo: Geometry, label: int | None = None
) -> tuple[dict[str, np.ndarray], NoduleParams]:
    """Sample `index` of a data set with `seed`; independent of every other index."""
    rng = np.random.default_rng([seed, KIND_SEED_IDS[kind], index])
    if label is None:
        label = index % 2  # balanced classes, as LIDC (50.3% / 49.7%) and LUNGx (37 / 36)
    params = draw_nodule(rng, label, kind)
    shape, spacing = render_shape(geo)
    volume = render_nodule(params, shape, spacing, rng)
    return cut_cubes(volume, spacing, geo), params


def write_synthetic_store(
    out: str | os.PathLike,
    kind: str,
    n: int,
    geo: Geometry,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
    workers: int | None = None,
) -> None:
    """Generate `n` nodules of `kind` and write them to a store at `out` (atomically).

    Samples are independent, so they are rendered in `workers` processes (default: one per
    core); the result does not depend on the number of workers.
    """
    look_up_option(kind, KINDS, what="kind")
    inputs = {"context": (1, *geo.context_grid), "zoom": (1, *geo.zoom_grid)}
    provenance = {
        "generator": "lungbench.data.synth",
        "generator_version": GENERATOR_VERSION,
        "kind": kind,
        "seed": seed,
        "n": n,
        "geometry": asdict(geo),
    }
    with StoreWriter(
        out, kind=f"synth-{kind}", inputs=inputs, label_names=LABEL_NAMES, provenance=provenance
    ) as writer:
        for i, (cubes, params) in enumerate(_generate_all(n, seed, kind, geo, workers)):
            writer.append(
                cubes,
                label=params.label,
                id=f"synth-{kind}-{seed}-{i:05d}",
                source="lungbench.data.synth",
                spacing=geo.context_spacing,
                diameter=params.diameter_mm,
            )
            if progress is not None:
                progress(1)


def _generate_one(args: tuple[int, int, str, Geometry]):
    torch.set_num_threads(1)  # one process per core already
    return generate_sample(*args)


def _generate_all(n: int, seed: int, kind: str, geo: Geometry, workers: int | None):
    """Samples 0..n-1 in order, rendered in a process pool when that pays off."""
    workers = workers or os.cpu_count() or 1
    jobs = [(i, seed, kind, geo) for i in range(n)]
    if workers <= 1 or n < 32:
        yield from (generate_sample(*job) for job in jobs)
        return
    # spawn, not fork: a forked child of a process that already ran torch's OpenMP pool can hang.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=context) as pool:
        yield from pool.map(_generate_one, jobs, chunksize=8)
