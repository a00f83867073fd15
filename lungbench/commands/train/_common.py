"""Layer 10 (commands): the training options every `lungbench train` recipe shares.

Each option has a full and a `--quick` default; `resolve` picks the user's value, else the
one of the mode. The recipes themselves (lungbench.experiments) take configs, not options.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any

from lungbench.commands._args import non_negative_float, non_negative_int, positive_int
from lungbench.core.errors import UsageError
from lungbench.train.config import OPTIMIZERS, SCHEDULES, TrainConfig

TRAIN_OPTIONS = ("epochs", "batch_size", "lr", "optimizer", "schedule", "patience")


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
