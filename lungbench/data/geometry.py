"""Layer 3 (data): the cube geometry of the two-path model's inputs.

Where the context and zoom cubes come from (grid in voxels, field of view in mm) for each
preset; the data readers and generators cut cubes on these grids and the model
(lungbench.models.dualpath3d) is built for them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from lungbench.core.errors import look_up_option


@dataclass(frozen=True)
class Geometry:
    """Where the two cubes come from: grid in voxels (D, H, W) and field of view in mm."""

    context_grid: tuple[int, int, int]
    zoom_grid: tuple[int, int, int]
    context_mm: tuple[float, float, float]
    zoom_mm: tuple[float, float, float]
    note: str

    @property
    def context_spacing(self) -> tuple[float, ...]:
        return tuple(m / g for m, g in zip(self.context_mm, self.context_grid, strict=True))

    @property
    def zoom_spacing(self) -> tuple[float, ...]:
        return tuple(m / g for m, g in zip(self.zoom_mm, self.zoom_grid, strict=True))


GEOMETRY_PRESETS: dict[str, Geometry] = {
    # Isotropic default: a 64 mm context cube at 2 mm and a 32 mm zoom cube at 1 mm, both on
    # a 32^3 grid. Covers nodules up to 30 mm (LIDC's upper bound) with context around them,
    # and keeps a CPU epoch of the thesis's 603 samples to seconds rather than minutes.
    "default": Geometry(
        (32, 32, 32),
        (32, 32, 32),
        (64.0, 64.0, 64.0),
        (32.0, 32.0, 32.0),
        "isotropic; context 64 mm at 2 mm, zoom 32 mm at 1 mm",
    ),
    # Higher resolution variant of the default (8x the voxels).
    "iso64": Geometry(
        (64, 64, 64),
        (64, 64, 64),
        (128.0, 128.0, 128.0),
        (64.0, 64.0, 64.0),
        "isotropic; context 128 mm at 2 mm, zoom 64 mm at 1 mm",
    ),
    # Dey et al. 2018: context 100x100x10 pooled to 50x50x5, zoom 50x50x5 (D, H, W = 5, 50, 50).
    "dey2018": Geometry(
        (5, 50, 50),
        (5, 50, 50),
        (25.0, 50.0, 50.0),
        (12.5, 25.0, 25.0),
        "Dey 2018: context 100x100x10 pooled to 50x50x5, zoom 50x50x5",
    ),
}


def geometry(preset: str) -> Geometry:
    """The geometry preset `preset` (UsageError listing the presets otherwise)."""
    return GEOMETRY_PRESETS[look_up_option(preset, GEOMETRY_PRESETS, what="geometry preset")]


def preset_mismatch(found: Sequence[Sequence[int]], preset: str) -> str | None:
    """None when `found` (per-sample input shapes (C, D, H, W), context then zoom) are the
    grids of `preset`; else why not, naming the preset whose grids they are, if any."""
    geo = GEOMETRY_PRESETS[preset]
    wanted = [(1, *geo.context_grid), (1, *geo.zoom_grid)]
    found = [tuple(int(v) for v in shape) for shape in found]
    if found == wanted:
        return None
    matching = [
        name
        for name, g in GEOMETRY_PRESETS.items()
        if found == [(1, *g.context_grid), (1, *g.zoom_grid)]
    ]
    hint = (
        f"use --preset {matching[0]}"
        if matching
        else f"no preset has these shapes ({', '.join(GEOMETRY_PRESETS)})"
    )
    return (
        f"inputs {', '.join(map(str, found))} do not fit --preset {preset} "
        f"({', '.join(map(str, wanted))}); {hint}"
    )
