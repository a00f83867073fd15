"""Pieces shared by the 3D experiments (lidc-pretrain, lungx-cv, mosmed).

Training options with a full and a `--quick` default each, generated default stores cached
under OUT/data/, store checks (kind, inputs, grid), and the run-folder preamble.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from lungbench.commands._args import non_negative_float, non_negative_int, positive_int
from lungbench.core import runs as results
from lungbench.core.errors import UsageError
from lungbench.core.runs import create_run_dir, write_json
from lungbench.data.store import StoreDataset, StoreInfo
from lungbench.train.config import OPTIMIZERS, SCHEDULES, TrainConfig
from lungbench.train.engine import TrainingInterrupted

log = logging.getLogger(__name__)  # progress: the CLI shows it on stderr

TRAIN_OPTIONS = ("epochs", "batch_size", "lr", "optimizer", "schedule", "patience")
CACHE_LIMIT_BYTES = 1 << 30  # keep a split in memory when it is smaller than this


def add_train_arguments(
    p: argparse.ArgumentParser, full: Mapping[str, Any], quick: Mapping[str, Any]
) -> None:
    """The engine's options; each default is `full[name]`, or `quick[name]` with --quick."""

    def shown(value: Any) -> str:
        return "off" if value is None else str(value)

    def default(name: str) -> str:
        return f"(default: {shown(full[name])}; --quick: {shown(quick[name])})"

    g = p.add_argument_group("training")
    g.add_argument(
        "--quick",
        action="store_true",
        help="tiny smoke run (small data, grid and model, few epochs; about a "
        "minute on 2 CPU cores)",
    )
    g.add_argument("--epochs", type=positive_int, default=None, help=f"epochs {default('epochs')}")
    g.add_argument(
        "--batch",
        dest="batch_size",
        type=positive_int,
        default=None,
        help=f"batch size {default('batch_size')}",
    )
    g.add_argument("--lr", type=float, default=None, help=f"learning rate {default('lr')}")
    g.add_argument(
        "--optimizer", choices=OPTIMIZERS, default=None, help=f"optimizer {default('optimizer')}"
    )
    g.add_argument(
        "--schedule",
        choices=SCHEDULES,
        default=None,
        help=f"learning-rate schedule {default('schedule')}",
    )
    g.add_argument(
        "--patience",
        type=positive_int,
        default=None,
        help=f"early stopping: epochs without a lower validation loss {default('patience')}",
    )
    g.add_argument(
        "--amp",
        action="store_true",
        help="mixed precision (bf16 on CPU, fp16 + GradScaler on CUDA) (default: off)",
    )
    g.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    g.add_argument(
        "--workers",
        type=non_negative_int,
        default=0,
        help="DataLoader worker processes (default: 0)",
    )
    g.add_argument(
        "--seed",
        type=non_negative_int,
        default=0,
        help="seed of splits, initialisation and shuffling (default: 0)",
    )
    add_telemetry_argument(g)
    o = p.add_argument_group("output")
    o.add_argument("--out", default="results", help="output root (default: results)")
    o.add_argument(
        "--run-id", default=None, help="run folder name (default: train-<UTC time>-<host>)"
    )
    o.add_argument(
        "--no-progress",
        dest="progress",
        action="store_false",
        help="no progress bars; the one-line summary per epoch stays (default: bars shown)",
    )


def add_telemetry_argument(group) -> None:
    """--telemetry-interval: GPU/CPU telemetry beside every fit that has a run folder."""
    group.add_argument(
        "--telemetry-interval",
        type=non_negative_float,
        default=1.0,
        metavar="SECONDS",
        help="sample GPU (NVML) / CPU (psutil, RAPL) telemetry every SECONDS into each "
        "training folder's telemetry.csv, with utilisation, peak memory and energy per "
        "sample per epoch in metrics.csv; 0 = off (default: 1)",
    )


def resolve(
    args: argparse.Namespace, name: str, full: Mapping[str, Any], quick: Mapping[str, Any]
) -> Any:
    """The user's value of option `name`, else the --quick or the full default."""
    value = getattr(args, name, None)
    if value is not None:
        return value
    return quick[name] if args.quick else full[name]


def train_config(
    args: argparse.Namespace, full: Mapping[str, Any], quick: Mapping[str, Any], **overrides: Any
) -> TrainConfig:
    """A TrainConfig from the parsed options (UsageError for impossible values)."""
    from lungbench.core.device import parse_device

    parse_device(args.device)
    values = {name: resolve(args, name, full, quick) for name in TRAIN_OPTIONS}
    if values["lr"] <= 0:
        raise UsageError(f"--lr must be > 0, got {values['lr']}")
    return TrainConfig(
        **values,
        amp=args.amp,
        seed=args.seed,
        num_workers=args.workers,
        device=args.device,
        progress=args.progress,
        telemetry_interval=args.telemetry_interval,
        **overrides,
    )


def cached_store(out: Path, name: str, n: int, make: Callable[[Path, Callable], None]) -> Path:
    """OUT/data/NAME.h5, generated once with `make(path, progress)` and reused later."""
    path = Path(out) / "data" / f"{name}.h5"
    if not path.exists():
        log.info(f"generating {n} samples into {path} (generated data; reused by later runs)")
        with tqdm(total=n, desc="generate data", unit="sample", file=sys.stderr) as bar:
            make(path, bar.update)
    return path


def require_inputs(info: StoreInfo, inputs: Sequence[str], experiment: str, hint: str) -> None:
    """UsageError unless the store is a binary store with exactly these inputs."""
    if list(info.inputs) != list(inputs):
        raise UsageError(
            f"--store {info.path}: a {info.kind!r} store with inputs "
            f"{list(info.inputs)}; {experiment} needs inputs {list(inputs)} "
            f"({hint})"
        )
    if info.task != "binary" or len(info.label_names) != 2:
        raise UsageError(
            f"--store {info.path}: task {info.task!r} with labels "
            f"{info.label_names}; {experiment} needs two classes ({hint})"
        )


def nodule_preset(info: StoreInfo) -> str:
    """The dualpath3d geometry preset whose grids match a nodule store's cubes."""
    from lungbench.data.geometry import GEOMETRY_PRESETS

    grids = (info.inputs["context"][1:], info.inputs["zoom"][1:])
    for name, geo in GEOMETRY_PRESETS.items():
        if (tuple(geo.context_grid), tuple(geo.zoom_grid)) == grids:
            return name
    known = ", ".join(f"{n} {g.context_grid}" for n, g in GEOMETRY_PRESETS.items())
    raise UsageError(
        f"--store {info.path}: grid {grids[0]} / {grids[1]} matches no geometry "
        f"preset; choose a store made on one of: {known}"
    )


def split_dataset(info: StoreInfo, indices: np.ndarray) -> StoreDataset:
    """A StoreDataset over `indices`, kept in memory when small (epochs re-read it)."""
    sample_bytes = sum(4 * int(np.prod(s)) for s in info.inputs.values())
    return StoreDataset(
        info.path, indices=indices, cache=sample_bytes * len(indices) < CACHE_LIMIT_BYTES
    )


def start_run(out: str | Path, run_id: str | None, config: Mapping[str, Any]) -> Path:
    """results/<run-id>/ with config.json and environment.json; the config is logged."""
    from lungbench.core.environment import environment_record

    run_dir = create_run_dir(out, "train", run_id)
    write_json(run_dir / "config.json", config)
    write_json(run_dir / "environment.json", environment_record())
    log.info(f"run folder {run_dir}")
    return run_dir


def marking_run(run_dir: Path, note: str) -> AbstractContextManager[None]:
    """Mark run_dir "interrupted" (signal, Ctrl-C) or "failed" (any other exception, with
    its first line) when the block raises, so that no run folder is left "running"."""
    return results.marking_run(
        run_dir, interrupted_by=(TrainingInterrupted, KeyboardInterrupt), data=note
    )


def data_word(info: StoreInfo) -> str:
    """For plot titles: 'generated data' or the store's file name."""
    return "generated data" if info.provenance.get("generator") else info.path.name


def data_note(info: StoreInfo) -> str:
    """'generated (...)' for the generators' stores, the file otherwise."""
    generator = info.provenance.get("generator")
    if generator:
        return f"GENERATED data ({generator}), not the real archive"
    return f"store {info.path} (kind {info.kind})"
