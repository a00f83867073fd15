"""Layer 7 (harness): The data path: a DataLoader that keeps the device fed, and a benchmark of its throughput.

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

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from lungbench.core.device import synchronize
from lungbench.data.loader import (
    DeviceAugment,
    LoaderOptions,
    make_dataset,
    make_loader,
    to_device,
)
from lungbench.data.store import read_info
from lungbench.measure.workload import Protocol, Workload

log = logging.getLogger(__name__)  # progress: the CLI shows it on stderr


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
        synchronize(device)
        start = time.perf_counter()
        for batch in loader:
            inputs, _target = to_device(batch, device)
            if on_device is not None:
                inputs = on_device(inputs, generator)
        synchronize(device)
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
    path: str | Path, workload: Workload, device: torch.device, repeats: int = 5
) -> float:
    """The training step's samples/s (compute only, fast default switches) for comparison."""
    from lungbench.harness.sweep import BenchConfig, measure_compute

    cfg = BenchConfig(workload, protocol=Protocol(warmup=2, repeats=repeats, epoch=False))
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
) -> tuple[list[dict[str, Any]], pd.DataFrame]:
    """Measure every loader variant; records and the table (vs. `step_rate` samples/s)."""
    records = []
    for variant in variants:
        log.info(f"loader: {variant.name}")
        record = measure_loader(path, variant, device, samples)
        record["step_samples_per_s"] = step_rate
        record["x_step_rate"] = record["samples_per_s"] / step_rate if step_rate else None
        records.append(record)
    return records, loader_table(records, step_rate)


def run_loader_run(
    path: str | Path,
    workload: Workload,
    workers: int,
    samples: int,
    out: Path,
    run_id: str | None = None,
) -> tuple[Path, str]:
    """`lungbench bench --loader`: the loader table next to the step's rate, in a run folder."""
    from lungbench.core.device import parse_device
    from lungbench.core.environment import environment_record
    from lungbench.core.runs import (
        append_record,
        markdown,
        run_folder,
        write_json,
        write_table,
    )

    w = workload
    dev = parse_device(w.device)
    # a failure marks the run "failed", Ctrl-C "interrupted"
    with run_folder(out, "loader", run_id, environment=environment_record()) as run:
        run_dir = run.path
        log.info(
            f"training step: {w.model} {w.preset} filters {w.filters} batch {w.batch_size} on {w.device}"
        )
        rate = step_samples_per_s(path, w, dev)
        variants = default_variants(w.batch_size, workers)
        records, table = run_loader_bench(path, dev, variants, samples, rate)
        write_json(
            run_dir / "config.json",
            {
                "store": str(path),
                **asdict(w),
                "workers": workers,
                "samples": samples,
            },
        )
        for record in records:
            append_record(run_dir, record)
        write_table(run_dir, "loader", table)
    text = (
        f"training step (compute only, fast defaults): {rate:.1f} samples/s; loader "
        f"goal: >= {5 * rate:.1f} samples/s (5x)\n" + markdown(table)
    )
    return run_dir, text
