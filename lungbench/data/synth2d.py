"""Layer 3 (data): Generated 2D data for offline transfer-learning runs: seeded and deterministic.

nodule slices (seed 001): the central axial slice through a generated nodule of
    lungbench.data.synth (benign: small, round, smooth, sometimes calcified; malignant:
    larger, lobulated, spiculated), 64x64 pixels at 0.8 mm, HU windowed to 8 bits.
    Default class balance 62% malignant, as the seed's 4165 / 6691 crops.

chest X-rays (seed 004): a frontal chest radiograph caricature (body, two lungs, heart, ribs,
    diaphragm) with up to 13 findings drawn independently, each with its own prevalence
    (ChestX-ray14's, doubled by default so that a few hundred images still hold positives of
    the rarest finding); rare findings are what the weighted BCE is for. Each finding has its
    own look (a small bright round nodule, a large mass, fluid at the lung base, a dark
    pneumothorax rim, an enlarged heart, reticular fibrosis, ...).

Both are written as lungbench stores: one input `image` (N, 1, H, W), units "uint8";
task "binary" (labels benign, malignant) or "multilabel" (label_names = the findings).

    write_nodule2d_store("nod.h5", n=400)
    write_chestxray_store("cxr.h5", n=300, size=64)
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import numpy as np
from scipy import ndimage

from lungbench.core.errors import UsageError
from lungbench.data.store import HU_WINDOW, StoreWriter
from lungbench.data.synth import draw_nodule, render_nodule

NODULE_LABELS = ("benign", "malignant")
NODULE_SPACING_MM = 0.8
NODULE_DEPTH = 9  # slices rendered around the centre (the 3D texture needs some depth)

# ChestX-ray14's findings without Hernia (the 13 outputs of seed 004) and their prevalence
# in its 112,120 images (Wang et al. 2017).
FINDING_PREVALENCE: dict[str, float] = {
    "Atelectasis": 0.103,
    "Cardiomegaly": 0.025,
    "Effusion": 0.119,
    "Infiltration": 0.177,
    "Mass": 0.052,
    "Nodule": 0.056,
    "Pneumonia": 0.013,
    "Pneumothorax": 0.047,
    "Consolidation": 0.042,
    "Edema": 0.021,
    "Emphysema": 0.022,
    "Fibrosis": 0.015,
    "Pleural_Thickening": 0.030,
}
FINDINGS = tuple(FINDING_PREVALENCE)


def hu_to_uint8(hu: np.ndarray) -> np.ndarray:
    """HU windowed to [-1000, 400] -> 0..255 (the store's "uint8" units)."""
    lo, hi = HU_WINDOW
    return np.clip(np.rint((np.clip(hu, lo, hi) - lo) / (hi - lo) * 255.0), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------- nodule slices


def nodule_slice(
    index: int, seed: int, label: int, size: int = 64, kind: str = "lidc"
) -> tuple[np.ndarray, float]:
    """(1, size, size) uint8 slice through generated nodule `index`, and its diameter (mm)."""
    rng = np.random.default_rng([seed, index, 2])
    params = draw_nodule(rng, label, kind)
    volume = render_nodule(params, (NODULE_DEPTH, size, size), NODULE_SPACING_MM, rng)
    return hu_to_uint8(volume[NODULE_DEPTH // 2])[None], params.diameter_mm


def write_nodule2d_store(
    out: str | os.PathLike,
    n: int,
    seed: int = 0,
    size: int = 64,
    malignant_fraction: float = 0.62,
    kind: str = "lidc",
    progress: Callable[[int], None] | None = None,
) -> None:
    """Write `n` generated nodule slices (binary task) to the store `out`."""
    _check_n_size(n, size)
    if not 0.0 < malignant_fraction < 1.0:
        raise UsageError(f"malignant_fraction must be in (0, 1), got {malignant_fraction}")
    labels = (np.random.default_rng([seed, 1]).random(n) < malignant_fraction).astype(int)
    provenance = {
        "generator": "lungbench.data.synth2d.nodule_slice",
        "seed": seed,
        "n": n,
        "size": size,
        "spacing_mm": NODULE_SPACING_MM,
        "kind": kind,
        "malignant_fraction": malignant_fraction,
    }
    with _generated_images(
        out, "synth-nodule2d", size, NODULE_LABELS, "binary", provenance
    ) as writer:
        for i, label in enumerate(labels):
            image, diameter = nodule_slice(i, seed, int(label), size, kind)
            writer.append(
                {"image": image},
                label=int(label),
                id=f"nodule2d-{seed}-{i:05d}",
                source="lungbench.data.synth2d",
                spacing=(1.0, NODULE_SPACING_MM, NODULE_SPACING_MM),
                diameter=diameter,
            )
            if progress is not None:
                progress(1)


# ----------------------------------------------------------------------------- chest X-rays


def draw_findings(
    rng: np.random.Generator, names: Sequence[str], prevalence_scale: float = 2.0
) -> np.ndarray:
    """Independent 0/1 draws, one per finding, with P = min(0.5, prevalence * scale)."""
    p = np.array([min(0.5, FINDING_PREVALENCE[n] * prevalence_scale) for n in names])
    return (rng.random(len(names)) < p).astype(np.uint8)


class _Canvas:
    """Pixel coordinates in [-1, 1] (x right, y down) and the anatomy of one radiograph."""

    def __init__(
        self, size: int, rng: np.random.Generator, emphysema: bool, cardiomegaly: bool
    ) -> None:
        self.size, self.rng = size, rng
        axis = np.linspace(-1.0, 1.0, size)
        self.y, self.x = np.meshgrid(axis, axis, indexing="ij")
        scale = 1.1 if emphysema else 1.0  # hyperinflated lungs
        self.lung_centres = [
            (-0.38 + rng.normal(0, 0.02), -0.05),
            (0.38 + rng.normal(0, 0.02), -0.05),
        ]
        self.lung_axes = (0.27 * scale, 0.55 * scale)
        self.lungs = [self.ellipse(c, self.lung_axes) for c in self.lung_centres]
        heart_w = 0.30 * (1.5 if cardiomegaly else 1.0) + rng.normal(0, 0.01)
        self.heart = self.ellipse((0.08, 0.28), (heart_w, 0.2))

    def ellipse(self, centre, axes) -> np.ndarray:
        return ((self.x - centre[0]) / axes[0]) ** 2 + ((self.y - centre[1]) / axes[1]) ** 2 <= 1

    def blob(self, centre, sigma) -> np.ndarray:
        return np.exp(-(((self.x - centre[0]) ** 2 + (self.y - centre[1]) ** 2) / (2 * sigma**2)))

    def point_in_lung(self, side: int, y_range=(-0.4, 0.35)) -> tuple[float, float]:
        cx, _ = self.lung_centres[side]
        return cx + self.rng.uniform(-0.12, 0.12), self.rng.uniform(*y_range)


def render_chestxray(
    flags: Sequence[int], names: Sequence[str], size: int, rng: np.random.Generator
) -> np.ndarray:
    """(1, size, size) uint8 radiograph with the findings whose flag is 1."""
    on = {n for n, f in zip(names, flags, strict=True) if f}
    c = _Canvas(size, rng, "Emphysema" in on, "Cardiomegaly" in on)
    image = np.full((size, size), 0.05)
    image[c.ellipse((0.0, 0.1), (0.92, 1.05))] = 0.55  # soft tissue of the body
    lung_level = 0.12 if "Emphysema" in on else 0.22
    texture = ndimage.gaussian_filter(rng.standard_normal((size, size)), size / 40) * 0.04
    lungs = c.lungs[0] | c.lungs[1]
    image[lungs] = lung_level
    image += np.where(lungs, texture, 0.0)
    for k in range(6):  # ribs: gentle arcs across both lungs
        y0 = -0.5 + 0.18 * k + rng.normal(0, 0.01)
        arc = np.abs(c.y - (y0 + 0.25 * c.x**2)) < 0.025
        image += np.where(arc & lungs, 0.07, 0.0)
    image = np.where(c.heart, 0.6, image)
    for finding in sorted(on):
        image = _FINDING_PAINTERS[finding](image, c, lungs)
    image = ndimage.gaussian_filter(image, sigma=max(0.5, size / 128))
    image += rng.normal(0.0, 0.015, image.shape)
    return np.clip(np.rint(image * 255), 0, 255).astype(np.uint8)[None]


def _paint_atelectasis(image, c: _Canvas, lungs):
    side = int(c.rng.integers(2))
    x0, y0 = c.point_in_lung(side, (0.15, 0.35))
    band = np.abs(c.y - y0 - 0.15 * (c.x - x0)) < 0.035
    return image + np.where(band & c.lungs[side], 0.25, 0.0)


def _paint_effusion(image, c: _Canvas, lungs):
    side = int(c.rng.integers(2))
    cx, _ = c.lung_centres[side]
    level = c.rng.uniform(0.2, 0.35)
    fluid = c.y > level - 0.4 * np.abs(c.x - cx)  # a meniscus rising towards the chest wall
    return np.where(fluid & c.lungs[side], 0.5, image)


def _paint_infiltration(image, c: _Canvas, lungs):
    for _ in range(int(c.rng.integers(4, 8))):
        side = int(c.rng.integers(2))
        image = image + 0.12 * c.blob(c.point_in_lung(side), 0.06) * c.lungs[side]
    return image


def _paint_round(image, c: _Canvas, radius: tuple[float, float], amplitude: float):
    side = int(c.rng.integers(2))
    centre = c.point_in_lung(side, (-0.3, 0.2))
    r = c.rng.uniform(*radius)
    return image + np.where(c.ellipse(centre, (r, r)), amplitude, 0.0)


def _paint_pneumonia(image, c: _Canvas, lungs):
    side = int(c.rng.integers(2))
    return image + 0.25 * c.blob(c.point_in_lung(side, (0.0, 0.3)), 0.12) * c.lungs[side]


def _paint_pneumothorax(image, c: _Canvas, lungs):
    side = int(c.rng.integers(2))
    cx, cy = c.lung_centres[side]
    ax, ay = c.lung_axes
    collapsed = c.ellipse((cx + (0.06 if side == 0 else -0.06), cy + 0.08), (ax * 0.7, ay * 0.8))
    air = c.lungs[side] & ~collapsed
    edge = (
        c.lungs[side]
        & collapsed
        & ~c.ellipse((cx + (0.06 if side == 0 else -0.06), cy + 0.08), (ax * 0.65, ay * 0.76))
    )
    image = np.where(air, 0.02, image)  # no lung markings beyond the pleural line
    return np.where(edge, image + 0.2, image)


def _paint_consolidation(image, c: _Canvas, lungs):
    side = int(c.rng.integers(2))
    centre = c.point_in_lung(side, (0.0, 0.3))
    return np.where(c.ellipse(centre, (0.13, 0.09)) & c.lungs[side], 0.5, image)


def _paint_edema(image, c: _Canvas, lungs):
    haze = c.blob((-0.22, 0.0), 0.14) + c.blob((0.22, 0.0), 0.14)  # bilateral, perihilar
    return image + 0.2 * haze * lungs


def _paint_emphysema(image, c: _Canvas, lungs):
    return image  # drawn by the canvas: larger, darker lungs


def _paint_cardiomegaly(image, c: _Canvas, lungs):
    return image  # drawn by the canvas: a wider heart


def _paint_fibrosis(image, c: _Canvas, lungs):
    net = ndimage.gaussian_filter(c.rng.standard_normal(image.shape), max(0.6, c.size / 80))
    lines = (np.abs(net) < 0.08 * net.std() * 3) & (c.y > 0.0) & lungs
    return image + np.where(lines, 0.15, 0.0)


def _paint_pleural_thickening(image, c: _Canvas, lungs):
    side = int(c.rng.integers(2))
    cx, cy = c.lung_centres[side]
    ax, ay = c.lung_axes
    inner = c.ellipse((cx, cy), (ax * 0.88, ay * 0.95))
    lateral = (c.x < cx) if side == 0 else (c.x > cx)
    return np.where(c.lungs[side] & ~inner & lateral, 0.55, image)


_FINDING_PAINTERS = {
    "Atelectasis": _paint_atelectasis,
    "Cardiomegaly": _paint_cardiomegaly,
    "Effusion": _paint_effusion,
    "Infiltration": _paint_infiltration,
    "Mass": lambda im, c, lungs: _paint_round(im, c, (0.09, 0.14), 0.35),
    "Nodule": lambda im, c, lungs: _paint_round(im, c, (0.03, 0.05), 0.4),
    "Pneumonia": _paint_pneumonia,
    "Pneumothorax": _paint_pneumothorax,
    "Consolidation": _paint_consolidation,
    "Edema": _paint_edema,
    "Emphysema": _paint_emphysema,
    "Fibrosis": _paint_fibrosis,
    "Pleural_Thickening": _paint_pleural_thickening,
}


def check_findings(names: Sequence[str]) -> list[str]:
    """The finding names, UsageError naming any that the generator does not know."""
    unknown = [n for n in names if n not in FINDING_PREVALENCE]
    if unknown:
        raise UsageError(
            f"unknown finding(s) {', '.join(map(repr, unknown))}; choose from: "
            f"{', '.join(FINDINGS)}"
        )
    if len(set(names)) != len(names) or not names:
        raise UsageError("findings must be a non-empty list without repeats")
    return list(names)


def write_chestxray_store(
    out: str | os.PathLike,
    n: int,
    seed: int = 0,
    size: int = 64,
    findings: Sequence[str] = FINDINGS,
    prevalence_scale: float = 2.0,
    progress: Callable[[int], None] | None = None,
) -> None:
    """Write `n` generated chest radiographs (multi-label task) to the store `out`."""
    _check_n_size(n, size)
    names = check_findings(findings)
    provenance = {
        "generator": "lungbench.data.synth2d.render_chestxray",
        "seed": seed,
        "n": n,
        "size": size,
        "prevalence_scale": prevalence_scale,
    }
    with _generated_images(out, "synth-chestxray", size, names, "multilabel", provenance) as writer:
        for i in range(n):
            rng = np.random.default_rng([seed, i, 4])
            flags = draw_findings(rng, names, prevalence_scale)
            writer.append(
                {"image": render_chestxray(flags, names, size, rng)},
                label=flags,
                id=f"chestxray-{seed}-{i:05d}",
                source="lungbench.data.synth2d",
                spacing=(1.0, 1.0, 1.0),
            )
            if progress is not None:
                progress(1)


def _generated_images(
    out: str | os.PathLike,
    kind: str,
    size: int,
    label_names: Sequence[str],
    task: str,
    provenance: dict,
) -> StoreWriter:
    """A store of generated 8-bit (1, size, size) images, its provenance marked generated."""
    return StoreWriter(
        out,
        kind=kind,
        inputs={"image": (1, size, size)},
        label_names=label_names,
        task=task,
        units="uint8",
        provenance={**provenance, "generated": True},
    )


def _check_n_size(n: int, size: int) -> None:
    if n < 1:
        raise UsageError(f"n must be >= 1, got {n}")
    if size < 32:
        raise UsageError(
            f"image size must be >= 32 pixels (the networks downsample 32x), got {size}"
        )
