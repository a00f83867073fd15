"""Layer 9 (train): What a training run is asked to do (TrainConfig) and what it returns (FitResult).

Imported by the engine, the checkpoints and the experiments.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from lungbench.core.errors import UsageError, look_up_option
from lungbench.core.options import (
    non_negative_float,
    non_negative_int,
    option,
    option_like,
    positive_float,
    positive_int,
)
from lungbench.measure.workload import Workload
from lungbench.step import OPTIMIZERS
from lungbench.train.quality import parse_target, target_option

SCHEDULES = ("constant", "step", "cosine", "onecycle")


LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


MetricsFn = Callable[[np.ndarray, np.ndarray], Mapping[str, float]]


@dataclass(frozen=True)
class TrainConfig:
    """How to train (saved in every checkpoint and in config.json).

    optimizer: adam | sgd (with `momentum`) | adadelta. schedule: constant | step (x`gamma`
    every `step_size` epochs) | cosine (to 0 over `epochs`) | onecycle (per step, peak `lr`).
    amp: bf16 autocast on CPU, fp16 autocast + GradScaler on CUDA. patience: stop after that
    many epochs without a lower validation loss (None: never). restore_best: load the best
    epoch's weights into the model when fit returns.
    """

    # The options every `lungbench train` recipe may offer (lungbench.core.options; a recipe
    # picks which, with its own flag or help where it differs).
    epochs: int = option(10, type=positive_int, help="epochs")
    batch_size: int = option_like(Workload, "batch_size", 16, group=None)
    lr: float = option(1e-3, type=positive_float, help="learning rate")
    optimizer: str = option("adam", choices=OPTIMIZERS, help="optimizer")
    momentum: float = 0.9
    schedule: str = option("constant", choices=SCHEDULES, help="learning-rate schedule")
    step_size: int = 10
    gamma: float = 0.1
    weight_decay: float = 0.0
    amp: bool = option(False, help="mixed precision (bf16 on CPU, fp16 + GradScaler on CUDA)")
    patience: int | None = option(
        None,
        type=positive_int,
        help="early stopping: epochs without a lower validation loss",
    )
    seed: int = option(
        0, type=non_negative_int, help="seed of splits, initialisation and shuffling"
    )
    num_workers: int = option(
        0,
        flag="--workers",
        type=non_negative_int,
        metavar="WORKERS",
        help="DataLoader worker processes",
    )
    device: str = option("cpu", help="cpu, cuda or cuda:N")
    grad_clip: float | None = None
    restore_best: bool = True
    target: str | None = option(  # time to quality (lungbench.train.quality)
        None,
        type=target_option,
        metavar="METRIC=VALUE",
        default_text="none: run every epoch",
        help="stop when the validation METRIC (auc, accuracy: at least VALUE; loss: at most) "
        "is reached and record the time to it (wall time, epochs, samples seen), e.g. auc=0.85",
    )
    progress: bool = option(  # progress bars
        True,
        flag="--no-progress",
        group="output",
        default_text="bars shown",
        help="no progress bars; the one-line summary per epoch stays",
    )
    log_epochs: bool = True  # one summary line per epoch (also without bars: batch-job logs)
    tensorboard: bool = True
    telemetry_interval: float = option(  # seconds between telemetry samples, 0 = off (rank 0)
        0.0,
        type=non_negative_float,
        metavar="SECONDS",
        help="sample GPU (NVML) / CPU (psutil, RAPL) telemetry every SECONDS into each "
        "training folder's telemetry.csv, with utilisation, peak memory and energy per "
        "sample per epoch in metrics.csv; 0 = off",
    )

    def __post_init__(self) -> None:
        look_up_option(self.optimizer, OPTIMIZERS, what="optimizer")
        look_up_option(self.schedule, SCHEDULES, what="schedule")
        for name in ("epochs", "batch_size", "step_size"):
            if int(getattr(self, name)) < 1:
                raise UsageError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise UsageError(f"lr must be > 0, got {self.lr}")
        if self.patience is not None and self.patience < 1:
            raise UsageError(f"patience must be >= 1 or None, got {self.patience}")
        if self.num_workers < 0:
            raise UsageError(f"num_workers must be >= 0, got {self.num_workers}")
        if self.target is not None:
            parse_target(self.target)  # UsageError naming the valid metrics


@dataclass
class FitResult:
    """What a fit produced. `history` has one row per epoch (the rows of metrics.csv)."""

    history: pd.DataFrame
    best_epoch: int
    best_val_loss: float
    best_checkpoint: Path | None
    last_checkpoint: Path | None = None
    total_s: float = 0.0
    mean_epoch_s: float = float("nan")
    samples_per_s: float = float("nan")
    peak_memory_bytes: int = 0
    peak_memory_kind: str = "cpu_rss_above_start"
    stopped_early: bool = False
    # with a target: lungbench.train.quality.QualityRecord.as_dict() (None without one)
    time_to_quality: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    # the learning rate every optimizer step ran with: columns step (1-based), epoch, lr
    lr_steps: pd.DataFrame = field(
        default_factory=lambda: pd.DataFrame(columns=["step", "epoch", "lr"])
    )

    @property
    def best_row(self) -> pd.Series:
        """The history row of the best epoch (metrics 'at the best epoch')."""
        return self.history.set_index("epoch").loc[self.best_epoch]


# Options that may change when resuming: how long to train and where/how to show it. Every
# other TrainConfig field changes what the resumed steps compute (lr, batch size, seed, ...).
RESUME_MAY_CHANGE = (
    "epochs",
    "target",  # like epochs: when to stop, not what a step computes
    "progress",
    "log_epochs",
    "device",
    "num_workers",
    "tensorboard",
    "telemetry_interval",
)


# Schedules whose shape depends on the planned number of epochs: their epochs may not change.
LENGTH_BOUND_SCHEDULES = ("cosine", "onecycle")
