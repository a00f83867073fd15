"""Layer 3 (data): Seeded 3D and 2D augmentation: rotations, flips, small shifts.

A transform receives the tuple of arrays one StoreDataset item holds (numpy, float32, each
`(C, D, H, W)` for 3D or `(C, H, W)` for 2D) and returns a tuple of the same shapes. One
random draw is applied to *every* array of the item, so the context and zoom cubes of a
nodule (both centred on it) stay consistent: rotations are about the array centre, in the
last two axes (the axial plane for CT, the image plane for 2D); flips and shifts act on the
same axes everywhere.

    from lungbench.data.transforms import make_transform
    aug = make_transform("rotation_only", seed=0)   # seed 001's choice: random rotation only
    ds = StoreDataset("data.h5", transform=aug)

Presets (`PRESETS`):

    none            identity (no transform)
    rotation_only   a random angle in [-180, 180) degrees in the last two axes, nothing else
                    (seed 001 found flips/zooms could hide features such as size; nodules and
                    crops have no canonical in-plane orientation, so any angle is valid)
    flips           random flips along every spatial axis
    standard        rotation up to 15 degrees + random flips + shifts up to 2 voxels

Seeding: inside `sample_key(epoch, index)` (the training engine wraps every training item
in it) a draw is a pure function of (seed, epoch, index), like the sample order of a
DistributedSampler after set_epoch: a resumed run, any number of DataLoader workers and an
uninterrupted run all draw the same augmentation for the same item of the same epoch.
Outside it, each transform owns a numpy Generator seeded from `seed`, re-seeded inside a
DataLoader worker from (seed, the worker's torch seed), so workers draw different
augmentations and runs with the same `torch.manual_seed` repeat exactly.

    with sample_key(epoch=2, index=17):
        arrays = aug(arrays)   # the same draw every time, whatever was drawn before
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from lungbench.core.errors import UsageError, look_up_option

# (epoch, index) of the item being loaded, set by sample_key(); None outside it.
_SAMPLE_KEY: ContextVar[tuple[int, int] | None] = ContextVar("lungbench_sample_key", default=None)


@contextmanager
def sample_key(epoch: int, index: int) -> Iterator[None]:
    """Make the augmentations drawn inside the block a pure function of (seed, epoch, index)."""
    token = _SAMPLE_KEY.set((int(epoch), int(index)))
    try:
        yield
    finally:
        _SAMPLE_KEY.reset(token)


@dataclass(frozen=True)
class AugmentParams:
    """One random draw, applied identically to every array of an item."""

    angle: float = 0.0  # degrees, in the plane of the last two axes
    flips: tuple[int, ...] = ()  # spatial axes counted from the end: -1 = W, -2 = H, -3 = D
    shift: tuple[int, ...] = ()  # voxels per spatial axis, last axis last (may be shorter)


@dataclass
class Augment:
    """Random rotation / flips / shifts, seeded; numpy tuple in, numpy tuple out.

    Args:
        max_degrees: rotations draw an angle uniformly in [-max_degrees, max_degrees]
            (180 = any angle); 0 disables rotation.
        flip: flip each spatial axis with probability 1/2.
        max_shift: shift each spatial axis by an integer in [-max_shift, max_shift] voxels,
            filling with the edge values; 0 disables.
        seed: seed of the transform's random generator.
        order: spline order of the rotation (1 = linear; keeps values in range).
    """

    max_degrees: float = 0.0
    flip: bool = False
    max_shift: int = 0
    seed: int = 0
    order: int = 1
    _rng: np.random.Generator | None = field(default=None, init=False, repr=False)
    _pid: int | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.max_degrees < 0 or self.max_shift < 0:
            raise UsageError("augmentation max_degrees and max_shift must be >= 0")

    def rng(self) -> np.random.Generator:
        """A generator for one item: from (seed, epoch, index) inside sample_key(), else the
        generator of this process (re-seeded once per DataLoader worker)."""
        key = _SAMPLE_KEY.get()
        if key is not None:
            # The leading 1 keeps these streams apart from the per-process [seed, worker].
            return np.random.default_rng([self.seed, 1, *key])
        if self._rng is None or self._pid != os.getpid():
            self._rng = np.random.default_rng([self.seed, _worker_seed()])
            self._pid = os.getpid()
        return self._rng

    def draw(self, rng: np.random.Generator, spatial_dims: int) -> AugmentParams:
        """Draw the parameters for one item whose arrays have `spatial_dims` spatial axes."""
        angle = float(rng.uniform(-self.max_degrees, self.max_degrees)) if self.max_degrees else 0.0
        flips = tuple(-k for k in range(1, spatial_dims + 1) if self.flip and rng.random() < 0.5)
        shift: tuple[int, ...] = ()
        if self.max_shift:
            shift = tuple(
                int(s) for s in rng.integers(-self.max_shift, self.max_shift + 1, spatial_dims)
            )
        return AugmentParams(angle=angle, flips=flips, shift=shift)

    def __call__(self, arrays: Sequence[np.ndarray]) -> tuple[np.ndarray, ...]:
        arrays = tuple(arrays)
        dims = min(a.ndim - 1 for a in arrays)  # arrays are (C, *spatial)
        params = self.draw(self.rng(), dims)
        return tuple(apply(a, params, order=self.order) for a in arrays)


def apply(array: np.ndarray, params: AugmentParams, order: int = 1) -> np.ndarray:
    """Apply one draw to a `(C, *spatial)` array; returns float32 of the same shape."""
    out = np.asarray(array, dtype=np.float32)
    if params.angle:
        # Rotation about the array centre in the last two axes; "nearest" edge fill keeps
        # the background (lung or air) instead of inventing zeros in the corners.
        out = ndimage.rotate(
            out, params.angle, axes=(-2, -1), reshape=False, order=order, mode="nearest"
        )
    for axis in params.flips:
        out = np.flip(out, axis=axis)
    if params.shift:
        out = shift_edge(out, params.shift)
    return np.ascontiguousarray(out, dtype=np.float32)


def shift_edge(array: np.ndarray, shift: Sequence[int]) -> np.ndarray:
    """Shift by integer voxels along the last len(shift) axes, padding with edge values."""
    n = len(shift)
    pad = [(0, 0)] * (array.ndim - n) + [(abs(s), abs(s)) for s in shift]
    padded = np.pad(array, pad, mode="edge")
    index = [slice(None)] * (array.ndim - n)
    for s, size in zip(shift, array.shape[-n:], strict=True):
        # Content moves by +s: the window starts |s| - s voxels into the padded axis.
        start = abs(s) - s
        index.append(slice(start, start + size))
    return padded[tuple(index)]


class Identity:
    """The `none` preset: returns the arrays unchanged (as a tuple)."""

    def __call__(self, arrays: Sequence[np.ndarray]) -> tuple[np.ndarray, ...]:
        return tuple(arrays)


PRESETS: dict[str, dict] = {
    "none": {},
    "rotation_only": {"max_degrees": 180.0},
    "flips": {"flip": True},
    "standard": {"max_degrees": 15.0, "flip": True, "max_shift": 2},
}


def make_transform(name: str = "rotation_only", seed: int = 0) -> Augment | Identity:
    """The augmentation preset `name` (UsageError listing the presets otherwise)."""
    look_up_option(name, PRESETS, what="augmentation preset")
    if name == "none":
        return Identity()
    return Augment(seed=seed, **PRESETS[name])


def _worker_seed() -> int:
    """The DataLoader worker's seed (differs per worker and per epoch), 0 in the main process."""
    try:
        from torch.utils.data import get_worker_info
    except ImportError:  # pragma: no cover - torch is a dependency
        return 0
    info = get_worker_info()
    return 0 if info is None else int(info.seed)
