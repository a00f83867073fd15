"""Layer 3 (data): the production loader, the one `bench`'s epoch and training read through.

A DataLoader over a store (or a decoded copy of it in shared memory when it fits), seeded
workers, pinned memory on CUDA, non-blocking copies to the device, and augmentation on the
CPU (lungbench.data.transforms) or on the device (DeviceAugment).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset

from lungbench.data.store import StoreDataset, normalize, read_info

# The decoded store is cached only when it takes at most this share of the available RAM.
CACHE_RAM_FRACTION = 0.25


@dataclass(frozen=True)
class LoaderOptions:
    """How batches reach the device."""

    batch_size: int = 2
    num_workers: int = 0
    pin_memory: bool | None = None  # None = on for CUDA devices
    persistent_workers: bool = True  # only meaningful with workers
    prefetch_factor: int | None = None  # batches per worker in flight; None = torch's (2)
    cache: bool = False  # decode the store once into shared memory
    augment: str = "none"  # augmentation preset (lungbench.data.transforms), "none" = off
    augment_on: str = "cpu"  # cpu: per sample in the workers; device: per batch on the device
    shuffle: bool = True  # ignored with an explicit sampler (its order is the sampler's)
    drop_last: bool = False
    seed: int = (
        0  # the loader's own generator: creating an iterator never draws from the global RNG
    )


class SharedStoreDataset(Dataset):
    """A store decoded once into shared-memory tensors; items as StoreDataset's.

    The tensors live in shared memory (`share_memory_()`), so DataLoader workers read them
    in place whatever the start method (fork inherits them; spawn receives a file handle).
    `__getitems__` serves a whole batch with one gather instead of per-sample Python calls.
    """

    def __init__(
        self,
        path: str | Path,
        indices: Sequence[int] | None = None,
        transform: Callable | None = None,
    ) -> None:
        import h5py

        self.info = read_info(path)
        self.path = self.info.path
        rows = np.arange(self.info.n) if indices is None else np.asarray(indices)
        self.transform = transform
        with h5py.File(self.path, "r") as f:
            # Read the whole dataset once (chunked per sample), then keep the rows asked for.
            self.arrays = tuple(
                torch.from_numpy(normalize(f[name][:][rows], self.info.units[name])).share_memory_()
                for name in self.info.inputs
            )
            labels = f["label"][:][rows]
        dtype = torch.int64 if self.info.task == "multiclass" else torch.float32
        self.targets = torch.as_tensor(labels, dtype=dtype).share_memory_()
        self.labels = labels

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, k: int):
        arrays = tuple(a[k] for a in self.arrays)
        if self.transform is not None:
            arrays = tuple(
                torch.from_numpy(np.ascontiguousarray(a))
                for a in self.transform(tuple(a.numpy() for a in arrays))
            )
        return arrays, self.targets[k]

    def __getitems__(self, ks: list[int]) -> list:
        if self.transform is not None:
            return [self[k] for k in ks]
        # Views into the shared tensors: default_collate's stack is the only copy.
        return [(tuple(a[k] for a in self.arrays), self.targets[k]) for k in ks]


def decoded_bytes(path: str | Path) -> int:
    """Bytes of the whole store decoded to float32."""
    info = read_info(path)
    return sum(4 * info.n * math.prod(shape) for shape in info.inputs.values())


def cache_fits(path: str | Path) -> bool:
    """True when the decoded store fits in CACHE_RAM_FRACTION of the available RAM."""
    return decoded_bytes(path) <= CACHE_RAM_FRACTION * psutil.virtual_memory().available


def shared_dataset(path: str | Path) -> SharedStoreDataset:
    """The whole store decoded once per process and reused (a sweep has many configs)."""
    key = Path(path).resolve()
    if key not in _SHARED:
        _SHARED.clear()  # keep one store at most
        _SHARED[key] = SharedStoreDataset(key)
    return _SHARED[key]


def make_dataset(
    path: str | Path,
    indices: Sequence[int] | None,
    cache: bool,
    transform: Callable | None = None,
    warn: Callable[[str], None] | None = None,
) -> Dataset:
    """The cached dataset when asked for and it fits (else a warning), or the lazy one."""
    if cache and cache_fits(path):
        return SharedStoreDataset(path, indices, transform)
    if cache:
        (warn or print)(
            f"warning: --cache: the decoded store ({decoded_bytes(path) / 2**30:.1f}"
            f" GiB) does not fit in {CACHE_RAM_FRACTION:.0%} of the available RAM; "
            "reading it lazily"
        )
    return StoreDataset(path, indices, transform=transform)


def make_loader(
    dataset: Dataset,
    opts: LoaderOptions,
    device: torch.device,
    indices: Sequence[int] | None = None,
    sampler: Any = None,
) -> DataLoader:
    """The DataLoader for `dataset` (optionally a subset) with the data-path options: the one
    every lungbench path reads through (bench's epoch, DDP shards, training, validation,
    profiling, the LR finder, test-time augmentation). `sampler` (e.g. a rank's
    DistributedSampler, or a list of indices in order) gives the sample order."""
    if indices is not None:
        dataset = Subset(dataset, list(indices))
    workers = opts.num_workers
    pin = device.type == "cuda" if opts.pin_memory is None else bool(opts.pin_memory)
    extra: dict[str, Any] = {}
    if workers > 0:
        extra["persistent_workers"] = opts.persistent_workers
        if opts.prefetch_factor is not None:
            extra["prefetch_factor"] = opts.prefetch_factor
    return DataLoader(
        dataset,
        batch_size=opts.batch_size,
        shuffle=opts.shuffle if sampler is None else False,
        sampler=sampler,
        drop_last=opts.drop_last,
        num_workers=workers,
        pin_memory=pin and device.type == "cuda",
        generator=torch.Generator().manual_seed(opts.seed),
        **extra,
    )


def to_device(batch: tuple, device: torch.device) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Non-blocking copies of a loader batch; from pinned memory they overlap with compute."""
    inputs, target = batch
    return ([x.to(device, non_blocking=True) for x in inputs], target.to(device, non_blocking=True))


@dataclass(frozen=True)
class DeviceAugment:
    """Random rotation in the last two axes (and flips) of a whole batch, on its device.

    The same draw is applied to every input of a sample (context and zoom stay aligned),
    as lungbench.data.transforms does per sample on the CPU. Edges are filled with the
    border value; interpolation is linear.
    """

    max_degrees: float = 180.0
    flip: bool = False
    seed: int = 0

    def __call__(
        self, inputs: Sequence[torch.Tensor], generator: torch.Generator | None = None
    ) -> list[torch.Tensor]:
        batch = inputs[0].shape[0]
        g = generator or torch.Generator().manual_seed(self.seed)
        angle = (torch.rand(batch, generator=g) * 2 - 1) * math.radians(self.max_degrees)
        flips = torch.rand(batch, inputs[0].dim() - 2, generator=g) < 0.5 if self.flip else None
        return [self._one(x, angle, flips) for x in inputs]

    def _one(
        self, x: torch.Tensor, angle: torch.Tensor, flips: torch.Tensor | None
    ) -> torch.Tensor:
        if self.max_degrees:
            x = rotate_last_two(x, angle.to(x.device))
        if flips is not None:
            for axis in range(flips.shape[1]):
                mask = flips[:, axis].to(x.device).view(-1, *([1] * (x.dim() - 1)))
                x = torch.where(mask, x.flip(2 + axis), x)
        return x


def rotate_last_two(x: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    """Rotate each sample of (B, C, *spatial) by `angle[b]` radians in the last two axes.

    The leading spatial axes are folded into channels, so a 3D volume is resampled by the
    2D grid_sample (much faster than the 3D one on CPU; the rotation never mixes slices).
    """
    shape = x.shape
    h, w = shape[-2], shape[-1]
    flat = x.reshape(shape[0], -1, h, w)
    cos, sin = torch.cos(angle), torch.sin(angle)
    # Normalized coordinates scale each axis by its size: correct the rotation for H != W.
    theta = torch.zeros(shape[0], 2, 3, dtype=x.dtype, device=x.device)
    theta[:, 0, 0], theta[:, 0, 1] = cos, -sin * h / w
    theta[:, 1, 0], theta[:, 1, 1] = sin * w / h, cos
    grid = F.affine_grid(theta, list(flat.shape), align_corners=False)
    out = F.grid_sample(flat, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out.reshape(shape)


_SHARED: dict[Path, SharedStoreDataset] = {}
