"""The training engine: one plain, readable loop shared by every experiment.

    config = TrainConfig(epochs=30, batch_size=16, lr=1e-3)
    result = fit(model, train_ds, val_ds, config, run_dir=run_dir,
                 checkpoint_meta={"model_name": "dualpath3d", "model_kwargs": {...}})
    probs, targets = predict(model, test_ds)

Batches are `(inputs_tuple, target)` and the model is called as `model(*inputs)`. The default
loss follows the target: BCE-with-logits for float targets (binary: logits (B, 1) vs target
(B,); multi-label: (B, K) vs (B, K)), cross-entropy for int64 targets (logits (B, K)).

Every epoch the engine validates, appends a row to `run_dir/metrics.csv` (and TensorBoard
scalars under `run_dir/tb`), and writes `checkpoint_last.pt` atomically; the best epoch by
validation loss is also written to `checkpoint_best.pt`. On SIGTERM or SIGUSR1 (what SLURM
sends before a time limit) it finishes the current step, writes the checkpoint (with the
position inside the epoch) and raises TrainingInterrupted; `fit(..., resume=path)` then
continues exactly: model, optimizer, scheduler, grad scaler, RNG states, epoch and step.

Why exact resume works: the sample order of epoch e is a pure function of (seed, e) (a
DistributedSampler with set_epoch, also for one process), so is the augmentation of each
sample (drawn from (seed, e, index) under transforms.sample_key, see EpochView), the
DataLoader has its own generator so it never draws from the global RNG, and the global RNG
states (dropout) are saved at the step where training stopped. Resuming requires the same
TrainConfig except RESUME_MAY_CHANGE (epochs, progress/epoch lines, device, workers,
TensorBoard).
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import signal
import sys
import threading
import time
import zipfile
from collections.abc import Callable, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import psutil
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler
from tqdm import tqdm

from lungbench.data.transforms import sample_key
from lungbench.distributed import DistContext, all_gather, single_process
from lungbench.errors import DataError, LungbenchError, UsageError, look_up_option

OPTIMIZERS = ("adam", "sgd", "adadelta")
SCHEDULES = ("constant", "step", "cosine", "onecycle")
CHECKPOINT_FORMAT = "lungbench-checkpoint"
CHECKPOINT_VERSION = 1
LAST_CHECKPOINT = "checkpoint_last.pt"
BEST_CHECKPOINT = "checkpoint_best.pt"
METRICS_FILE = "metrics.csv"
STOP_SIGNALS = tuple(
    s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGUSR1", None)) if s is not None
)

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
MetricsFn = Callable[[np.ndarray, np.ndarray], Mapping[str, float]]


class TrainingInterrupted(LungbenchError):
    """Training stopped on a signal after writing a resumable checkpoint (exit 128+SIGTERM)."""

    exit_code = 143

    def __init__(self, message: str, checkpoint: Path | None) -> None:
        super().__init__(message)
        self.checkpoint = checkpoint


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


# ----------------------------------------------------------------------------- seeds and RNG


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) from one integer."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """All global RNG states as tensors and lists, so they load with weights_only=True."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, pystate, gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [
            name,
            torch.from_numpy(keys.astype(np.int64)),
            int(pos),
            int(has_gauss),
            float(cached),
        ],
        "python": [version, list(pystate), gauss],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of rng_state()."""
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, pystate, gauss = state["python"]
    random.setstate((version, tuple(pystate), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------- checkpoints


def save_checkpoint(path: str | os.PathLike, payload: Mapping[str, Any]) -> Path:
    """Write a checkpoint dict atomically (temporary file + os.replace)."""
    path = Path(path)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    torch.save({"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **payload}, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a lungbench checkpoint with weights_only=True; DataError naming the file if bad."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: checkpoint not found")
    if not zipfile.is_zipfile(path):  # torch.save writes zip archives since torch 1.6
        raise DataError(f"{path}: not a PyTorch checkpoint (not a zip archive)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, corrupt, or holds objects weights_only refuses
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"{path}: not a readable checkpoint ({first[:160]})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise DataError(f"{path}: not a lungbench checkpoint (no 'format': '{CHECKPOINT_FORMAT}')")
    if int(ckpt.get("version", -1)) > CHECKPOINT_VERSION:
        raise DataError(
            f"{path}: checkpoint version {ckpt['version']} is newer than this "
            f"lungbench reads ({CHECKPOINT_VERSION})"
        )
    if "model" not in ckpt:
        raise DataError(f"{path}: checkpoint has no model weights")
    return ckpt


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


def load_resume_checkpoint(path: str | os.PathLike, config: TrainConfig) -> dict[str, Any]:
    """Load a checkpoint to resume from; UsageError listing every option that differs.

    Only RESUME_MAY_CHANGE may differ from the config the checkpoint was made with: a new lr
    would be silently overridden by the optimizer state, a new batch size would skip the
    wrong samples of an interrupted epoch.
    """
    ckpt = load_checkpoint(path)
    saved = ckpt.get("config")
    if not isinstance(saved, Mapping):
        raise DataError(f"{path}: checkpoint has no training config ('config'); cannot resume")
    diffs = [
        f"{name} {saved[name]!r} -> {value!r}" if name in saved else f"{name} ? -> {value!r}"
        for name, value in asdict(config).items()
        if name not in RESUME_MAY_CHANGE and (name not in saved or saved[name] != value)
    ]
    # cosine and one-cycle are laid out over the planned length: the saved scheduler state
    # carries it, so a new --epochs would crash one-cycle and restart cosine's annealing.
    if config.schedule in LENGTH_BOUND_SCHEDULES and saved.get("epochs", config.epochs) != (
        config.epochs
    ):
        diffs.append(
            f"epochs {saved['epochs']!r} -> {config.epochs!r} "
            f"(the {config.schedule} schedule is laid out over the planned epochs)"
        )
    if diffs:
        raise UsageError(
            f"{path}: resuming needs the training options the checkpoint was made with; "
            f"these differ (checkpoint -> now): {', '.join(diffs)} "
            f"(only {', '.join(RESUME_MAY_CHANGE)} may change; epochs not under "
            f"{' or '.join(LENGTH_BOUND_SCHEDULES)})"
        )
    return ckpt


def load_model_from_checkpoint(
    path: str | os.PathLike, expected_model_name: str | None = None
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the registered model a checkpoint was made from; returns (model, checkpoint).

    UsageError if it was made for another architecture than `expected_model_name`.
    """
    from lungbench.models import create_model

    ckpt = load_checkpoint(path)
    name = ckpt.get("model_name")
    if name is None:
        raise DataError(f"{path}: checkpoint does not say which model it holds ('model_name')")
    if expected_model_name is not None and name != expected_model_name:
        raise UsageError(
            f"{path}: checkpoint is for model {name!r}, this experiment needs "
            f"{expected_model_name!r}"
        )
    model = create_model(name, **dict(ckpt.get("model_kwargs") or {}))
    _load_weights(model, ckpt["model"], path)
    return model, ckpt


def _load_weights(model: nn.Module, state: Mapping[str, torch.Tensor], path: Path) -> None:
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        detail = str(exc).splitlines()[1].strip() if len(str(exc).splitlines()) > 1 else ""
        raise UsageError(
            f"{path}: checkpoint weights do not fit this model "
            f"(another architecture or size? {detail[:160]})"
        ) from None


# ----------------------------------------------------------------------------- losses, metrics


def infer_task(target: torch.Tensor | np.ndarray) -> str:
    """binary (float (B,)), multilabel (float (B, K)) or multiclass (int64 (B,))."""
    is_float = (
        target.dtype.is_floating_point
        if isinstance(target, torch.Tensor)
        else np.issubdtype(target.dtype, np.floating)
    )
    if not is_float:
        return "multiclass"
    return "multilabel" if target.ndim == 2 else "binary"


def default_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BCE-with-logits for float targets, cross-entropy for int64 targets (mean over batch)."""
    if target.dtype.is_floating_point:
        return F.binary_cross_entropy_with_logits(logits.reshape(target.shape).float(), target)
    return F.cross_entropy(logits.float(), target)


def to_probabilities(logits: torch.Tensor, task: str) -> torch.Tensor:
    """Sigmoid for binary (-> (B,)) and multi-label, softmax for multiclass."""
    if task == "multiclass":
        return torch.softmax(logits.float(), dim=1)
    probs = torch.sigmoid(logits.float())
    return probs.reshape(-1) if task == "binary" else probs


def classification_metrics(probs: np.ndarray, targets: np.ndarray) -> dict[str, float]:
    """Accuracy (threshold 0.5 / argmax) and ROC AUC (NaN when only one class is present).

    Multi-label: binary accuracy over all (sample, label) pairs and the mean AUC over the
    labels that have both classes. Multiclass: one-vs-rest macro AUC.
    """
    from sklearn.metrics import roc_auc_score

    # One probability per sample means a binary task, whatever the targets' dtype.
    task = "binary" if probs.ndim == 1 else infer_task(targets)
    if task == "multiclass":
        accuracy = float(np.mean(probs.argmax(axis=1) == targets))
        if len(np.unique(targets)) != probs.shape[1]:
            auc = float("nan")
        elif probs.shape[1] == 2:  # sklearn wants the positive-class score for two classes
            auc = float(roc_auc_score(targets, probs[:, 1]))
        else:
            auc = float(roc_auc_score(targets, probs, multi_class="ovr"))
        return {"accuracy": accuracy, "auc": auc}
    accuracy = float(np.mean((probs >= 0.5) == (targets >= 0.5)))
    if task == "binary":
        auc = float(roc_auc_score(targets, probs)) if len(np.unique(targets)) == 2 else float("nan")
        return {"accuracy": accuracy, "auc": auc}
    aucs = [
        roc_auc_score(targets[:, k], probs[:, k])
        for k in range(targets.shape[1])
        if len(np.unique(targets[:, k])) == 2
    ]
    return {"accuracy": accuracy, "auc": float(np.mean(aucs)) if aucs else float("nan")}


# ----------------------------------------------------------------------------- building blocks


def make_optimizer(params, config: TrainConfig) -> torch.optim.Optimizer:
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
        )
    return torch.optim.Adadelta(params, lr=config.lr, weight_decay=config.weight_decay)


def make_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig, steps_per_epoch: int):
    """The LR schedule; `onecycle` steps every batch, the others every epoch."""
    sched = torch.optim.lr_scheduler
    if config.schedule == "step":
        return sched.StepLR(optimizer, step_size=config.step_size, gamma=config.gamma)
    if config.schedule == "cosine":
        return sched.CosineAnnealingLR(optimizer, T_max=config.epochs)
    if config.schedule == "onecycle":
        return sched.OneCycleLR(
            optimizer, max_lr=config.lr, total_steps=config.epochs * max(1, steps_per_epoch)
        )
    return sched.LambdaLR(optimizer, lambda epoch: 1.0)


def epoch_order(
    n: int, epoch: int, config: TrainConfig, dist: DistContext, shuffle: bool
) -> list[int]:
    """This rank's sample indices for `epoch`: a pure function of (seed, epoch, rank).

    A DistributedSampler even for one process, so one code path serves both and a resumed
    run can skip exactly the samples an interrupted one already used.
    """
    sampler = DistributedSampler(
        range(n),
        num_replicas=dist.world_size,
        rank=dist.rank,
        shuffle=shuffle,
        seed=config.seed,
        drop_last=False,
    )
    sampler.set_epoch(epoch)
    return list(sampler)


def make_loader(
    dataset: Dataset,
    indices: list[int],
    config: TrainConfig,
    epoch: int,
    batch_size: int | None = None,
) -> DataLoader:
    # Its own generator: creating the iterator must not draw from the global RNG, or a
    # resumed run would diverge from an uninterrupted one.
    generator = torch.Generator().manual_seed(config.seed * 100_003 + epoch)
    return DataLoader(
        dataset,
        batch_size=batch_size or config.batch_size,
        sampler=indices,
        num_workers=config.num_workers,
        generator=generator,
        pin_memory=config.device.startswith("cuda"),
        persistent_workers=False,
    )


class EpochView(Dataset):
    """`dataset` as seen in training epoch `epoch`: item k is loaded inside
    `sample_key(epoch, k)`, so its random augmentation is a pure function of (seed, epoch, k)
    (lungbench.data.transforms) and a resumed run draws what an uninterrupted one did."""

    def __init__(self, dataset: Dataset, epoch: int) -> None:
        self.dataset = dataset
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, k: int):
        with sample_key(self.epoch, k):
            return self.dataset[k]


def _to_device(batch, device: torch.device):
    inputs, target = batch
    non_blocking = device.type == "cuda"
    return (
        tuple(x.to(device, non_blocking=non_blocking) for x in inputs),
        target.to(device, non_blocking=non_blocking),
    )


def _autocast(device: torch.device, enabled: bool):
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=enabled)


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


@contextmanager
def stop_on_signals():
    """Yield a dict whose 'signal' is set when SIGTERM/SIGUSR1 arrives (main thread only)."""
    flag: dict[str, int | None] = {"signal": None}
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, frame):  # noqa: ARG001 - signal handler signature
        flag["signal"] = signum  # only note it: the loop stops after the current step

    previous = {s: signal.signal(s, handler) for s in STOP_SIGNALS}
    try:
        yield flag
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


class _Telemetry:
    """GPU/CPU telemetry beside a fit with a run folder (lungbench.telemetry): the time series
    in RUN/telemetry.csv, and per epoch a summary (utilisation, peak memory, energy per
    sample where an energy source exists) in the history row as telemetry_* columns. Under
    DDP it is rank 0's devices (the run folder is rank 0's), without energy per sample."""

    FIELDS = (
        "cpu_util_mean_percent",
        "rss_peak_bytes",
        "gpu_util_mean_percent",
        "gpu_mem_peak_bytes",
        "gpu_power_mean_w",
        "energy_j",
        "energy_per_sample_j",
    )

    def __init__(self, run_dir: Path | None, config: TrainConfig, device: torch.device) -> None:
        self.sampler = None
        self.run_dir = run_dir
        self.first = 0
        if run_dir is not None and config.telemetry_interval > 0:
            from lungbench.telemetry import TelemetrySampler, nvml_indices

            gpus = nvml_indices(str(device))
            self.sampler = TelemetrySampler(config.telemetry_interval, gpus=gpus).start()

    def epoch_row(self, samples: int | None) -> dict[str, Any]:
        """The summary of the telemetry samples taken since the last call (the epoch's
        training and validation), energy per training sample when `samples` is given; the
        series saved so far."""
        if self.sampler is None:
            return {}
        until = len(self.sampler.samples)  # the sampler thread may append meanwhile
        summary = self.sampler.summary(samples, since=self.first, until=until)
        self.first = until
        self.save()
        return {f"telemetry_{k}": summary[k] for k in self.FIELDS}

    def save(self) -> None:
        if self.sampler is not None and self.run_dir is not None:
            self.sampler.write_csv(self.run_dir / "telemetry.csv")

    def close(self) -> None:
        if self.sampler is not None:
            self.sampler.stop()
            self.save()
            self.sampler = None


class _PeakMemory:
    """Peak CUDA allocation, or on CPU the largest process RSS (sampled once per step) above
    the RSS when the fit started: the RSS high-water mark of the process would also hold
    whatever earlier fits in the same process (other variants, folds) left behind."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.kind = "cuda_max_allocated" if device.type == "cuda" else "cpu_rss_above_start"
        self._process = psutil.Process()
        self.start = 0 if device.type == "cuda" else self._process.memory_info().rss
        self.peak = self.start
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

    def sample(self) -> None:
        if self.device.type != "cuda":
            self.peak = max(self.peak, self._process.memory_info().rss)

    def value(self) -> int:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        return int(self.peak - self.start)


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: Dataset,
    config: TrainConfig,
    loss_fn: LossFn | None = None,
    dist: DistContext | None = None,
    epoch: int = 0,
) -> tuple[float, np.ndarray, np.ndarray]:
    """Mean loss, probabilities and targets over `dataset` (gathered across ranks, in order)."""
    dist = dist or single_process(config.device)
    device = torch.device(config.device) if not dist.is_distributed else dist.device
    loss_fn = loss_fn or default_loss
    indices = epoch_order(len(dataset), 0, config, dist, shuffle=False)
    model.eval()
    losses, probs, targets = [], [], []
    for batch in make_loader(dataset, indices, config, epoch):
        inputs, target = _to_device(batch, device)
        with _autocast(device, config.amp):
            logits = model(*inputs)
        task = infer_task(target)
        if dist.is_distributed:
            # Per-sample losses, so the ranks' shards (and padding) can be put back in order.
            losses += [
                loss_fn(logits[i : i + 1].float(), target[i : i + 1]).reshape(())
                for i in range(target.shape[0])
            ]
        else:
            losses.append(loss_fn(logits.float(), target).reshape(()).expand(target.shape[0]))
        probs.append(to_probabilities(logits, task))
        targets.append(target)
    loss_t = torch.stack(losses) if dist.is_distributed else torch.cat(losses)
    prob_t, target_t = torch.cat(probs), torch.cat(targets)
    if dist.is_distributed:
        loss_t, prob_t, target_t = _gather_in_order(
            indices, len(dataset), loss_t, prob_t, target_t, device=device
        )
    return float(loss_t.mean()), prob_t.cpu().numpy(), target_t.cpu().numpy()


def _gather_in_order(
    indices: list[int], n: int, *tensors: torch.Tensor, device: torch.device
) -> list[torch.Tensor]:
    """All ranks' shards, put back in dataset order (DistributedSampler padding dropped)."""
    import torch.distributed as tdist

    world = tdist.get_world_size()
    index = torch.tensor(indices, device=device)
    all_index = [torch.empty_like(index) for _ in range(world)]
    tdist.all_gather(all_index, index)
    order = torch.cat(all_index)
    out = []
    for t in tensors:
        parts = [torch.empty_like(t) for _ in range(world)]
        tdist.all_gather(parts, t.contiguous())
        full = torch.cat(parts)
        placed = torch.empty((n, *t.shape[1:]), dtype=t.dtype, device=device)
        placed[order] = full  # duplicates from padding write the same value twice
        out.append(placed)
    return out


def predict(
    model: nn.Module, dataset: Dataset, batch_size: int = 16, device: str = "cpu", amp: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities (sigmoid for binary (N,) and multi-label (N, K), softmax for multiclass
    (N, K)) and targets for every sample of `dataset`, in order."""
    config = TrainConfig(
        batch_size=batch_size, device=device, amp=amp, progress=False, log_epochs=False
    )
    model = model.to(torch.device(device))
    _, probs, targets = evaluate(model, dataset, config)
    return probs, targets


# ----------------------------------------------------------------------------- the loop


@dataclass
class _State:
    """What changes during training and goes into every checkpoint."""

    epoch: int = 0  # next epoch to run (0-based)
    step: int = 0  # steps already done inside `epoch` (non-zero only after a signal)
    best_val_loss: float = math.inf
    best_epoch: int = 0
    wait: int = 0  # epochs since the last improvement (early stopping)
    history: list[dict[str, float]] = field(default_factory=list)
    partial: dict[str, float] = field(default_factory=dict)  # sums of an interrupted epoch
    best_model: dict[str, torch.Tensor] | None = None
    # Under DDP: every rank's RNG streams and partial-epoch sums, gathered before each save,
    # so that each rank resumes with its own (rank 0's alone would be given to all).
    ranks: list[dict[str, Any]] | None = None


def _gather_rank_states(state: _State, dist: DistContext) -> None:
    """Collect every rank's RNG states and partial sums into `state.ranks` (a collective:
    every rank calls it at the same point, just before rank 0 writes a checkpoint)."""
    if dist.is_distributed:
        mine = {"rng": rng_state(), "partial": dict(state.partial)}
        state.ranks = all_gather(dist, mine, "gathering the ranks' states for the checkpoint")


def fit(
    model: nn.Module,
    train_ds: Dataset,
    val_ds: Dataset,
    config: TrainConfig,
    run_dir: str | os.PathLike | None = None,
    loss_fn: LossFn | None = None,
    dist: DistContext | None = None,
    resume: str | os.PathLike | None = None,
    checkpoint_meta: Mapping[str, Any] | None = None,
    metrics_fn: MetricsFn | None = None,
) -> FitResult:
    """Train `model` on `train_ds`, validating on `val_ds` after every epoch.

    Args:
        run_dir: where metrics.csv, tb/ and the checkpoints go (None: nothing written).
        loss_fn: `loss_fn(logits, target) -> scalar`; default: default_loss.
        dist: the process's DistContext; world_size > 1 wraps the model in DDP.
        resume: a checkpoint_last.pt to continue from exactly.
        checkpoint_meta: stored in checkpoints, e.g. {"model_name": ..., "model_kwargs": ...}
            so that load_model_from_checkpoint can rebuild the model.
        metrics_fn: `metrics_fn(val_probs, val_targets) -> {name: value}`, extra validation
            metrics added to each history row as `val_<name>`.
    """
    dist = dist or single_process(config.device)
    device = dist.device if dist.is_distributed else _device(config.device)
    run_dir = Path(run_dir) if run_dir is not None and dist.is_main else None
    if run_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
    loss_fn = loss_fn or default_loss
    meta = dict(checkpoint_meta or {})
    if len(train_ds) == 0 or len(val_ds) == 0:
        raise UsageError(f"empty training ({len(train_ds)}) or validation ({len(val_ds)}) set")

    seed_everything(config.seed)
    model = model.to(device)
    core = model
    if dist.is_distributed:
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    steps_per_epoch = math.ceil(
        len(epoch_order(len(train_ds), 0, config, dist, True)) / config.batch_size
    )
    optimizer = make_optimizer(core.parameters(), config)
    scheduler = make_scheduler(optimizer, config, steps_per_epoch)
    scaler = torch.amp.GradScaler("cuda", enabled=config.amp and device.type == "cuda")
    state = _State()
    if resume is not None:
        state = _restore(Path(resume), core, optimizer, scheduler, scaler, config, meta, dist)

    writer = _tensorboard(run_dir, config)
    memory = _PeakMemory(device)
    telemetry = _Telemetry(run_dir, config, device)
    start = time.perf_counter()
    last_path = best_path = None
    stopped_early = False
    with stop_on_signals() as stop, contextlib.closing(telemetry):
        while state.epoch < config.epochs:
            row = _train_epoch(
                model,
                train_ds,
                config,
                dist,
                device,
                loss_fn,
                optimizer,
                scheduler,
                scaler,
                state,
                stop,
                memory,
                run_dir,
                meta,
            )
            if row is None:  # a stop signal arrived; the checkpoint is written
                path = run_dir / LAST_CHECKPOINT if run_dir else None
                raise TrainingInterrupted(
                    f"stopped by signal {stop['signal']} in epoch {state.epoch + 1}, step "
                    f"{state.step}; checkpoint {path}; continue with --resume {path}",
                    path,
                )
            val_loss, probs, targets = evaluate(model, val_ds, config, loss_fn, dist, state.epoch)
            row.update(
                {
                    "val_loss": val_loss,
                    **{f"val_{k}": v for k, v in classification_metrics(probs, targets).items()},
                }
            )
            if metrics_fn is not None:
                row.update({f"val_{k}": float(v) for k, v in metrics_fn(probs, targets).items()})
            # Energy per sample only where the sampler sees every sample's device: under DDP
            # rank 0 samples its own GPU and CPU, not the other ranks'.
            samples = int(row.pop("samples"))
            row.update(telemetry.epoch_row(None if dist.is_distributed else samples))
            if config.schedule != "onecycle":
                scheduler.step()
            improved = val_loss < state.best_val_loss
            if improved:
                state.best_val_loss, state.best_epoch, state.wait = val_loss, row["epoch"], 0
                state.best_model = {
                    k: v.detach().cpu().clone() for k, v in core.state_dict().items()
                }
            else:
                state.wait += 1
            state.history.append(row)
            state.epoch, state.step, state.partial = state.epoch + 1, 0, {}
            _gather_rank_states(state, dist)
            if run_dir is not None:
                last_path, best_path = _write_epoch(
                    run_dir,
                    state,
                    core,
                    optimizer,
                    scheduler,
                    scaler,
                    config,
                    meta,
                    improved,
                    writer,
                )
            if dist.is_main and config.log_epochs:
                tqdm.write(_epoch_line(row, config.epochs, improved), file=sys.stderr)
            if config.patience is not None and state.wait >= config.patience:
                stopped_early = True
                break
    if writer is not None:
        writer.close()
    if config.restore_best and state.best_model is not None:
        core.load_state_dict(state.best_model)
    return _result(
        state, config, time.perf_counter() - start, memory, best_path, last_path, stopped_early
    )


def _device(text: str) -> torch.device:
    try:
        device = torch.device(text)
    except RuntimeError:
        raise UsageError(f"device {text!r}: not a device; choose from: cpu, cuda, cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device {text!r}: no CUDA device on this machine; choose from: cpu")
    return device


def _train_epoch(
    model,
    train_ds,
    config,
    dist,
    device,
    loss_fn,
    optimizer,
    scheduler,
    scaler,
    state: _State,
    stop,
    memory: _PeakMemory,
    run_dir,
    meta,
) -> dict | None:
    """One epoch (from state.step on); returns its history row, or None after a stop signal."""
    model.train()
    indices = epoch_order(len(train_ds), state.epoch, config, dist, shuffle=True)
    skip = state.step * config.batch_size  # samples an interrupted run already trained on
    loader = make_loader(EpochView(train_ds, state.epoch), indices[skip:], config, state.epoch)
    sums = {
        "loss": 0.0,
        "correct": 0.0,
        "count": 0.0,
        "samples": 0.0,
        "seconds": 0.0,
        **state.partial,
    }
    bar = tqdm(
        loader,
        desc=f"epoch {state.epoch + 1}/{config.epochs}",
        unit="batch",
        leave=False,
        disable=not (dist.is_main and config.progress),
        initial=state.step,
        total=math.ceil(len(indices) / config.batch_size),
    )
    tick = time.perf_counter()
    for batch in bar:
        inputs, target = _to_device(batch, device)
        with _autocast(device, config.amp):
            logits = model(*inputs)
            loss = loss_fn(logits, target)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if config.grad_clip is not None:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        if config.schedule == "onecycle":
            scheduler.step()
        state.step += 1
        n = target.shape[0]
        # .item() is a device sync point; once per step is cheap next to a 3D conv step.
        sums["loss"] += loss.item() * n
        sums["samples"] += n
        correct, count = _batch_correct(logits.detach(), target)
        sums["correct"] += correct
        sums["count"] += count
        memory.sample()
        bar.set_postfix(loss=f"{sums['loss'] / sums['samples']:.4f}")
        if _stop_requested(stop, dist, device):
            sums["seconds"] += time.perf_counter() - tick
            state.partial = sums
            _gather_rank_states(state, dist)
            if run_dir is not None:
                _save_state(
                    run_dir / LAST_CHECKPOINT,
                    state,
                    _unwrap(model),
                    optimizer,
                    scheduler,
                    scaler,
                    config,
                    meta,
                )
            bar.close()
            return None
    bar.close()
    seconds = sums["seconds"] + time.perf_counter() - tick
    if dist.is_distributed:
        sums = _sum_over_ranks(sums, device)  # the epoch's loss and accuracy over all ranks
    return {
        "epoch": state.epoch + 1,
        "lr": optimizer.param_groups[0]["lr"],
        "train_loss": sums["loss"] / max(sums["samples"], 1),
        "train_accuracy": sums["correct"] / max(sums["count"], 1),
        "epoch_s": seconds,
        "samples_per_s": sums["samples"] / seconds,
        "samples": sums["samples"],  # all ranks' (popped by fit: energy per sample)
    }


def _sum_over_ranks(sums: dict[str, float], device: torch.device) -> dict[str, float]:
    import torch.distributed as tdist

    keys = ("loss", "correct", "count", "samples")
    total = torch.tensor([sums[k] for k in keys], dtype=torch.float64, device=device)
    tdist.all_reduce(total)
    return {**sums, **dict(zip(keys, total.tolist(), strict=True))}


def _batch_correct(logits: torch.Tensor, target: torch.Tensor) -> tuple[float, float]:
    task = infer_task(target)
    if task == "multiclass":
        return float((logits.argmax(1) == target).sum()), float(target.numel())
    pred = logits.reshape(target.shape) >= 0  # logit 0 is probability 0.5
    return float((pred == (target >= 0.5)).sum()), float(target.numel())


def _stop_requested(stop, dist: DistContext, device: torch.device) -> bool:
    if not dist.is_distributed:
        return stop["signal"] is not None
    # Every rank must stop at the same step, or the others would hang in the next all-reduce.
    import torch.distributed as tdist

    flag = torch.tensor([1.0 if stop["signal"] is not None else 0.0], device=device)
    tdist.all_reduce(flag, op=tdist.ReduceOp.MAX)
    if flag.item() > 0 and stop["signal"] is None:
        stop["signal"] = STOP_SIGNALS[0]
    return flag.item() > 0


def _payload(state: _State, core, optimizer, scheduler, scaler, config, meta) -> dict:
    return {
        "model_name": meta.get("model_name"),
        "model_kwargs": dict(meta.get("model_kwargs") or {}),
        **{k: v for k, v in meta.items() if k not in ("model_name", "model_kwargs")},
        "model": core.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "rng": rng_state(),
        "epoch": state.epoch,
        "step": state.step,
        "best_val_loss": state.best_val_loss,
        "best_epoch": state.best_epoch,
        "wait": state.wait,
        "history": state.history,
        "partial": state.partial,
        "best_model": state.best_model,
        "world_size": len(state.ranks) if state.ranks else 1,
        "ranks": state.ranks,
        "config": asdict(config),
    }


def _save_state(path: Path, state, core, optimizer, scheduler, scaler, config, meta) -> Path:
    return save_checkpoint(path, _payload(state, core, optimizer, scheduler, scaler, config, meta))


def _write_epoch(
    run_dir: Path,
    state: _State,
    core,
    optimizer,
    scheduler,
    scaler,
    config,
    meta,
    improved: bool,
    writer,
) -> tuple[Path, Path]:
    """metrics.csv, TensorBoard scalars, checkpoint_last.pt and (if improved) _best.pt."""
    history = pd.DataFrame(state.history)
    tmp = run_dir / (METRICS_FILE + ".tmp")
    history.to_csv(tmp, index=False)
    os.replace(tmp, run_dir / METRICS_FILE)
    if writer is not None:
        row = state.history[-1]
        for key, value in row.items():
            # skip NaN (AUC with one class) and None (a telemetry source this machine lacks)
            if key != "epoch" and isinstance(value, (int, float)) and value == value:
                writer.add_scalar(key, value, int(row["epoch"]))
        writer.flush()
    payload = _payload(state, core, optimizer, scheduler, scaler, config, meta)
    last = save_checkpoint(run_dir / LAST_CHECKPOINT, payload)
    best = run_dir / BEST_CHECKPOINT
    if improved:
        save_checkpoint(best, {k: v for k, v in payload.items() if k != "best_model"})
    return last, best


def _tensorboard(run_dir: Path | None, config: TrainConfig):
    if run_dir is None or not config.tensorboard:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional (the `profile` extra)
        return None
    return SummaryWriter(log_dir=str(run_dir / "tb"))


def _restore(path: Path, core, optimizer, scheduler, scaler, config, meta, dist) -> _State:
    """Load a checkpoint_last.pt into model, optimizer, scheduler, scaler and the RNGs (under
    DDP this rank's own RNG streams and partial sums; the world size must be the same)."""
    ckpt = load_resume_checkpoint(path, config)
    saved_world = int(ckpt.get("world_size", 1))
    if saved_world != dist.world_size:
        older = (
            ""
            if "world_size" in ckpt
            else (
                " (or by a DDP run of a lungbench older than per-rank resume states, which "
                "cannot resume under a launcher)"
            )
        )
        raise UsageError(
            f"{path}: written by a run of {saved_world} process(es){older}; resume it with "
            f"{saved_world}, not {dist.world_size} (each rank's data shard and random "
            "streams are saved for that layout)"
        )
    mine = (ckpt.get("ranks") or [None] * saved_world)[dist.rank] or {
        "rng": ckpt["rng"],
        "partial": ckpt.get("partial"),
    }
    want = meta.get("model_name")
    if want is not None and ckpt.get("model_name") not in (None, want):
        raise UsageError(
            f"{path}: checkpoint is for model {ckpt['model_name']!r}, resuming needs {want!r}"
        )
    _load_weights(core, ckpt["model"], path)
    try:
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
    except (KeyError, ValueError, RuntimeError) as exc:
        raise UsageError(
            f"{path}: optimizer/scheduler state does not fit this config ({str(exc)[:120]})"
        ) from None
    set_rng_state(mine["rng"])
    return _State(
        epoch=int(ckpt["epoch"]),
        step=int(ckpt.get("step", 0)),
        best_val_loss=float(ckpt["best_val_loss"]),
        best_epoch=int(ckpt.get("best_epoch", 0)),
        wait=int(ckpt.get("wait", 0)),
        history=list(ckpt.get("history", [])),
        partial=dict(mine["partial"] or {}),
        best_model=ckpt.get("best_model"),
    )


def _epoch_line(row: Mapping[str, float], epochs: int, improved: bool) -> str:
    mark = " *" if improved else ""
    return (
        f"epoch {int(row['epoch'])}/{epochs}  train_loss {row['train_loss']:.4f}  "
        f"val_loss {row['val_loss']:.4f}  val_acc {row['val_accuracy']:.3f}  "
        f"val_auc {row['val_auc']:.3f}  {row['epoch_s']:.1f}s  "
        f"{row['samples_per_s']:.1f} samples/s{mark}"
    )


def _result(
    state: _State, config, total_s, memory, best_path, last_path, stopped_early
) -> FitResult:
    history = pd.DataFrame(state.history)
    return FitResult(
        history=history,
        best_epoch=state.best_epoch,
        best_val_loss=state.best_val_loss,
        best_checkpoint=best_path if best_path is not None and best_path.exists() else None,
        last_checkpoint=last_path,
        total_s=total_s,
        mean_epoch_s=float(history["epoch_s"].mean()) if len(history) else float("nan"),
        samples_per_s=float(history["samples_per_s"].mean()) if len(history) else float("nan"),
        peak_memory_bytes=memory.value(),
        peak_memory_kind=memory.kind,
        stopped_early=stopped_early,
        extra={"seed": config.seed},
    )
