"""Layer 3 (data): Resampling in millimetres: isotropic volumes and cubes around a point, HU preserved.

    iso, new_spacing = resample_isotropic(series.hu, series.spacing, 1.0)
    cubes = cut_cubes(series.hu, series.spacing, centre_vox, geometry("default"))
    cubes["context"].shape == (1, 32, 32, 32)

Values stay in Hounsfield units (linear interpolation, no normalisation); a cube that reaches
outside the scan is padded with air (-1000 HU). When a cube is coarser than the scan along an
axis, the scan is Gaussian-smoothed first so the cube holds local averages instead of aliased
single voxels.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from lungbench.data.geometry import Geometry

AIR_HU = -1000.0


def resample_isotropic(
    volume: np.ndarray, spacing: Sequence[float], new_spacing: float = 1.0, order: int = 1
) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Resample a (D, H, W) volume to `new_spacing` mm on every axis; float32 out.

    The output keeps the physical extent: n_out = round(n * spacing / new_spacing).
    """
    spacing = np.asarray(spacing, float)
    shape = np.maximum(1, np.round(np.array(volume.shape) * spacing / new_spacing)).astype(int)
    factors = shape / np.array(volume.shape)
    src = _antialias(volume.astype(np.float32), spacing, np.full(3, new_spacing))
    out = ndimage.zoom(src, factors, order=order, mode="nearest", grid_mode=True)
    return out.astype(np.float32), (new_spacing,) * 3


def cut_cube(
    volume: np.ndarray,
    spacing: Sequence[float],
    centre: Sequence[float],
    grid: Sequence[int],
    fov_mm: Sequence[float],
    pad: float = AIR_HU,
) -> np.ndarray:
    """A (D, H, W) float32 cube of `grid` voxels covering `fov_mm`, centred at `centre`.

    Args:
        volume: (D, H, W) scan in HU.
        spacing: (dz, dy, dx) of the scan in mm.
        centre: centre in (fractional) voxel indices of the scan (z, y, x).
        grid: output voxels per axis; fov_mm: output field of view per axis in mm.
        pad: value outside the scan (air).
    """
    spacing = np.asarray(spacing, float)
    grid = np.asarray(grid, int)
    step = np.asarray(fov_mm, float) / grid  # output spacing in mm
    # Voxel-centre offsets of the output grid, in scan voxels.
    axes = [
        float(c) + (np.arange(n) - (n - 1) / 2.0) * s / sp
        for c, n, s, sp in zip(centre, grid, step, spacing, strict=True)
    ]
    lo = [int(np.floor(a[0])) - 4 for a in axes]
    hi = [int(np.ceil(a[-1])) + 5 for a in axes]
    local = _crop_padded(volume, lo, hi, pad)
    local = _antialias(local, spacing, step)
    coords = np.meshgrid(*[a - lo_i for a, lo_i in zip(axes, lo, strict=True)], indexing="ij")
    cube = ndimage.map_coordinates(local, coords, order=1, mode="constant", cval=pad)
    return cube.astype(np.float32)


def cut_cubes(
    volume: np.ndarray, spacing: Sequence[float], centre: Sequence[float], geo: Geometry
) -> dict[str, np.ndarray]:
    """The context and zoom cubes of a geometry preset around `centre` (voxel indices).

    Returns {"context": (1, *geo.context_grid), "zoom": (1, *geo.zoom_grid)} in HU.
    """
    context = cut_cube(volume, spacing, centre, geo.context_grid, geo.context_mm)
    zoom = cut_cube(volume, spacing, centre, geo.zoom_grid, geo.zoom_mm)
    return {"context": context[None], "zoom": zoom[None]}


def _crop_padded(
    volume: np.ndarray, lo: Sequence[int], hi: Sequence[int], pad: float
) -> np.ndarray:
    """volume[lo:hi] as float32, filled with `pad` where the box leaves the volume."""
    out = np.full([h - low for low, h in zip(lo, hi, strict=True)], pad, np.float32)
    src, dst = [], []
    for low, h, n in zip(lo, hi, volume.shape, strict=True):
        a, b = max(low, 0), min(h, n)
        if a >= b:
            return out  # the box lies entirely outside the scan
        src.append(slice(a, b))
        dst.append(slice(a - low, b - low))
    out[tuple(dst)] = volume[tuple(src)]
    return out


def _antialias(volume: np.ndarray, spacing: np.ndarray, new_spacing: np.ndarray) -> np.ndarray:
    """Gaussian pre-filter along axes that get coarser (sigma ~ 0.4 x the ratio of spacings)."""
    ratio = np.asarray(new_spacing, float) / np.asarray(spacing, float)
    sigma = np.where(ratio > 1.0, 0.4 * ratio, 0.0)
    if not np.any(sigma):
        return volume.astype(np.float32, copy=False)
    return ndimage.gaussian_filter(volume.astype(np.float32), sigma=sigma, mode="nearest")
