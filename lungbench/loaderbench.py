"""The data path: a DataLoader that keeps the device fed, and a benchmark of its throughput.

`make_loader()` builds the loader every lungbench run uses: workers, pinned memory (on by
default for CUDA), persistent workers and prefetch when there are workers, and optionally
the whole decoded store cached in shared memory (`SharedStoreDataset`): decoded once in the
main process, then read by every worker without copies, so small sets (the thesis's 754
nodules are 2 x 754 x 32^3 float32 = 0.2 GB) cost no HDF5 decompression after the first load.
Copies to the device are non-blocking (from pinned memory they overlap with compute).

`DeviceAugment` is the rotation/flip augmentation done on a whole batch on the device
(affine_grid + grid_sample) instead of per sample in the workers (scipy): use it when the
loader benchmark shows it is faster.

`lungbench bench --loader` measures samples/s from the store through the DataLoader for
several settings (workers, cache, pinned memory, augmentation on CPU or on the device) and
prints them next to the training step's samples/s: the loader should deliver several times
what the step consumes. Any run whose epoch spent more than DATA_BOUND_FRACTION of its time
waiting for data is flagged `data_bound` in its record.

    lungbench bench --loader --filters 16 --batch 2
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import psutil
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset

from lungbench.data.store import StoreDataset, normalize, read_info

# A run whose epoch waited on data for more than this share of its time is "data bound".
DATA_BOUND_FRACTION = 0.2
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
    shuffle: bool = True
    seed: int = 0


# ----------------------------------------------------------------------------------------
# The in-memory cache


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


_SHARED: dict[Path, SharedStoreDataset] = {}


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
) -> DataLoader:
    """The DataLoader for `dataset` (optionally a subset) with the data-path options."""
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
        shuffle=opts.shuffle,
        num_workers=workers,
        pin_memory=pin and device.type == "cuda",
        generator=torch.Generator().manual_seed(opts.seed),
        **extra,
    )


def to_device(batch: tuple, device: torch.device) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Non-blocking copies of a loader batch; from pinned memory they overlap with compute."""
    inputs, target = batch
    return ([x.to(device, non_blocking=True) for x in inputs], target.to(device, non_blocking=True))


class DeviceWaitClock:
    """How long the device sat idle waiting for the next batch during an epoch.

    CPU: the host's wait in the loader (the CPU computes synchronously, so it idles exactly
    then). CUDA: the gaps on the GPU's own timeline between the end of one step's work and
    the start of the next (CUDA events), so loader time that overlaps kernels still running
    from the previous step is not counted as waiting; the copy to the device counts as data.

        clock = DeviceWaitClock(device); clock.start()
        for batch in loader:
            inputs, target = to_device(batch, device); clock.batch_ready()
            step(...); clock.step_done()
        wait_s = clock.seconds()     # after the epoch's final synchronize
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self._host = 0.0
        self._mark = 0.0
        self._last: Any = None
        self._gaps: list[tuple[Any, Any]] = []

    def _event(self) -> Any:
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(self.device))  # this device, not the current
        return event

    def start(self) -> None:
        if self.cuda:
            self._last = self._event()
        self._mark = time.perf_counter()

    def batch_ready(self) -> None:
        if self.cuda:
            self._gaps.append((self._last, self._event()))
        else:
            self._host += time.perf_counter() - self._mark

    def step_done(self) -> None:
        if self.cuda:
            self._last = self._event()
        else:
            self._mark = time.perf_counter()

    def seconds(self) -> float:
        if not self.cuda:
            return self._host
        torch.cuda.synchronize(self.device)
        return sum(a.elapsed_time(b) for a, b in self._gaps) / 1e3


def data_bound(record: dict[str, Any]) -> bool | None:
    """True when the epoch waited on data for more than DATA_BOUND_FRACTION of its time."""
    wait, total = record.get("epoch_data_wait_s"), record.get("epoch_s")
    if wait is None or not total:
        return None
    return wait / total > DATA_BOUND_FRACTION


# ----------------------------------------------------------------------------------------
# Augmentation on the device


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


# ----------------------------------------------------------------------------------------
# The loader benchmark


@dataclass(frozen=True)
class LoaderVariant:
    """One loader setting of the benchmark."""

    name: str
    opts: LoaderOptions


def default_variants(batch_size: int, workers: int, seed: int = 0) -> list[LoaderVariant]:
    """Lazy HDF5 and cached, 0 and `workers` workers, with and without augmentation on CPU,
    and the cached store with augmentation on the device."""
    base = LoaderOptions(batch_size=batch_size, seed=seed)
    out = [
        LoaderVariant("hdf5, 0 workers", base),
        LoaderVariant("cache, 0 workers", _with(base, cache=True)),
        LoaderVariant("hdf5 + aug, 0 workers", _with(base, augment="rotation_only")),
        LoaderVariant(
            "cache + aug on device",
            _with(base, cache=True, augment="rotation_only", augment_on="device"),
        ),
    ]
    if workers > 0:
        out[2:2] = [
            LoaderVariant(f"hdf5, {workers} workers", _with(base, num_workers=workers)),
            LoaderVariant(
                f"cache, {workers} workers", _with(base, cache=True, num_workers=workers)
            ),
        ]
        out.append(
            LoaderVariant(
                f"hdf5 + aug, {workers} workers",
                _with(base, augment="rotation_only", num_workers=workers),
            )
        )
    return out


def _with(opts: LoaderOptions, **change: Any) -> LoaderOptions:
    from dataclasses import replace

    return replace(opts, **change)


def measure_loader(
    path: str | Path, variant: LoaderVariant, device: torch.device, samples: int, epochs: int = 2
) -> dict[str, Any]:
    """Samples/s delivered on `device` (copied, augmented where asked) by one loader setting.

    Start-up (dataset construction, cache decoding, worker start) is timed apart; the
    throughput is the best of `epochs` passes over `samples` samples.
    """
    opts = variant.opts
    transform = None
    if opts.augment != "none" and opts.augment_on == "cpu":
        from lungbench.data.transforms import make_transform

        transform = make_transform(opts.augment, seed=opts.seed)
    on_device = (
        DeviceAugment(seed=opts.seed)
        if (opts.augment != "none" and opts.augment_on == "device")
        else None
    )
    t0 = time.perf_counter()
    info = read_info(path)
    indices = np.arange(min(samples, info.n))
    dataset = make_dataset(path, indices, opts.cache, transform)
    loader = make_loader(dataset, opts, device)
    startup = time.perf_counter() - t0
    best = math.inf
    generator = torch.Generator().manual_seed(opts.seed)
    for _ in range(epochs):
        _sync(device)
        start = time.perf_counter()
        for batch in loader:
            inputs, _target = to_device(batch, device)
            if on_device is not None:
                inputs = on_device(inputs, generator)
        _sync(device)
        best = min(best, time.perf_counter() - start)
    del loader
    return {
        "variant": variant.name,
        **asdict(opts),
        "samples": len(indices),
        "startup_s": startup,
        "epoch_s": best,
        "samples_per_s": len(indices) / best,
    }


def step_samples_per_s(
    path: str | Path,
    model: str,
    preset: str,
    filters: int,
    batch_size: int,
    device: torch.device,
    repeats: int = 5,
) -> float:
    """The training step's samples/s (compute only, fast default switches) for comparison."""
    from lungbench.harness import BenchConfig, measure_compute

    cfg = BenchConfig(
        model=model,
        preset=preset,
        filters=filters,
        batch_size=batch_size,
        device=str(device),
        warmup=2,
        repeats=repeats,
        epoch=False,
    )
    return float(measure_compute(cfg, read_info(path), device)["samples_per_s"])


def loader_table(records: Sequence[dict[str, Any]], step_rate: float | None) -> pd.DataFrame:
    """Loader samples/s per setting, and how many times the step's rate it delivers."""
    rows = []
    for r in records:
        row = {
            "loader": r["variant"],
            "samples/s": r["samples_per_s"],
            "start-up s": r["startup_s"],
        }
        if step_rate:
            row["x step rate"] = r["samples_per_s"] / step_rate
        rows.append(row)
    return pd.DataFrame(rows).set_index("loader")


def run_loader_bench(
    path: str | Path,
    device: torch.device,
    variants: Sequence[LoaderVariant],
    samples: int = 256,
    step_rate: float | None = None,
    log: Callable[[str], None] = print,
) -> tuple[list[dict[str, Any]], pd.DataFrame]:
    """Measure every loader variant; records and the table (vs. `step_rate` samples/s)."""
    records = []
    for variant in variants:
        log(f"loader: {variant.name}")
        record = measure_loader(path, variant, device, samples)
        record["step_samples_per_s"] = step_rate
        record["x_step_rate"] = record["samples_per_s"] / step_rate if step_rate else None
        records.append(record)
    return records, loader_table(records, step_rate)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_loader_run(
    path: str | Path,
    model: str,
    preset: str,
    filters: int,
    batch_size: int,
    device: str,
    workers: int,
    samples: int,
    out: Path,
    run_id: str | None = None,
    log: Callable[[str], None] = print,
) -> tuple[Path, str]:
    """`lungbench bench --loader`: the loader table next to the step's rate, in a run folder."""
    from lungbench.env import environment_record
    from lungbench.harness import parse_device
    from lungbench.results import (
        append_record,
        create_run_dir,
        finish_run,
        markdown,
        marking_run,
        write_json,
        write_table,
    )

    dev = parse_device(device)
    run_dir = create_run_dir(out, "loader", run_id)
    with marking_run(run_dir):  # a failure marks the run "failed", Ctrl-C "interrupted"
        write_json(run_dir / "environment.json", environment_record())
        log(f"training step: {model} {preset} filters {filters} batch {batch_size} on {device}")
        rate = step_samples_per_s(path, model, preset, filters, batch_size, dev)
        variants = default_variants(batch_size, workers)
        records, table = run_loader_bench(path, dev, variants, samples, rate, log)
        write_json(
            run_dir / "config.json",
            {
                "store": str(path),
                "model": model,
                "preset": preset,
                "filters": filters,
                "batch_size": batch_size,
                "device": device,
                "workers": workers,
                "samples": samples,
            },
        )
        for record in records:
            append_record(run_dir, record)
        write_table(run_dir, "loader", table)
    finish_run(run_dir, "complete")
    text = (
        f"training step (compute only, fast defaults): {rate:.1f} samples/s; loader "
        f"goal: >= {5 * rate:.1f} samples/s (5x)\n" + markdown(table)
    )
    return run_dir, text
