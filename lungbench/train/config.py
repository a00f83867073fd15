"""Layer 7 (train): What a training run is asked to do (TrainConfig) and what it returns (FitResult).

Layer 7 (train): imported by the engine, the checkpoints and the experiments.
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
from lungbench.step import OPTIMIZERS

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

    epochs: int = 10
    batch_size: int = 16
    lr: float = 1e-3
    optimizer: str = "adam"
    momentum: float = 0.9
    schedule: str = "constant"
    step_size: int = 10
    gamma: float = 0.1
    weight_decay: float = 0.0
    amp: bool = False
    patience: int | None = None
    seed: int = 0
    num_workers: int = 0
    device: str = "cpu"
    grad_clip: float | None = None
    restore_best: bool = True
    progress: bool = True  # progress bars
    log_epochs: bool = True  # one summary line per epoch (also without bars: batch-job logs)
    tensorboard: bool = True
    telemetry_interval: float = 0.0  # seconds between telemetry samples, 0 = off (rank 0)

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
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def best_row(self) -> pd.Series:
        """The history row of the best epoch (metrics 'at the best epoch')."""
        return self.history.set_index("epoch").loc[self.best_epoch]


# Options that may change when resuming: how long to train and where/how to show it. Every
# other TrainConfig field changes what the resumed steps compute (lr, batch size, seed, ...).
RESUME_MAY_CHANGE = (
    "epochs",
    "progress",
    "log_epochs",
    "device",
    "num_workers",
    "tensorboard",
    "telemetry_interval",
)


# Schedules whose shape depends on the planned number of epochs: their epochs may not change.
LENGTH_BOUND_SCHEDULES = ("cosine", "onecycle")
