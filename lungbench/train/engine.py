"""Layer 9 (train): The training engine: one plain, readable loop shared by every experiment.

    config = TrainConfig(epochs=30, batch_size=16, lr=1e-3)
    result = fit(model, train_ds, val_ds, config, run_dir=run_dir,
                 options=FitOptions(checkpoint_meta={"model_name": "dualpath3d", ...}))
    probs, targets = infer(model, test_ds)

Batches are `(inputs_tuple, target)` and the model is called as `model(*inputs)`. The default
loss follows the target: BCE-with-logits for float targets (binary: logits (B, 1) vs target
(B,); multi-label: (B, K) vs (B, K)), cross-entropy for int64 targets (logits (B, K)).

Every epoch the engine validates, appends a row to `run_dir/metrics.csv` (and TensorBoard
scalars under `run_dir/tb`), writes the learning rate every optimizer step ran with to
`run_dir/lr_steps.csv` (one-cycle moves it every step: its shape is only visible there), and
writes `checkpoint_last.pt` atomically; the best epoch by
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
from collections.abc import Callable, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import psutil
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler
from tqdm import tqdm

from lungbench.core.device import parse_device
from lungbench.core.errors import LungbenchError, UsageError
from lungbench.data.loader import LoaderOptions, make_loader, to_device
from lungbench.data.transforms import sample_key
from lungbench.distributed.group import DistContext, all_gather, single_process
from lungbench.step import NO_TIMER, TrainStep, distributed_model, make_optimizer
from lungbench.switches import Switches, autocast
from lungbench.train.checkpoint import (
    BEST_CHECKPOINT,
    LAST_CHECKPOINT,
    _load_weights,
    load_resume_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from lungbench.train.config import FitResult, LossFn, MetricsFn, TrainConfig
from lungbench.train.metrics import (
    _batch_correct,
    classification_metrics,
    default_loss,
    infer_task,
    to_probabilities,
)
from lungbench.train.mlperf_log import hyperparameters, open_log
from lungbench.train.quality import QualityRecord, parse_target, quality_record

METRICS_FILE = "metrics.csv"
LR_STEPS_FILE = "lr_steps.csv"  # step, epoch, lr: the learning rate of every optimizer step


STOP_SIGNALS = tuple(
    s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGUSR1", None)) if s is not None
)


class TrainingInterrupted(LungbenchError):
    """Training stopped on a signal after writing a resumable checkpoint (exit 128+SIGTERM)."""

    exit_code = 143

    def __init__(self, message: str, checkpoint: Path | None) -> None:
        super().__init__(message)
        self.checkpoint = checkpoint


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) from one integer."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


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


def epoch_loader(
    dataset: Dataset, indices: list[int], config: TrainConfig, epoch: int, device: torch.device
) -> DataLoader:
    """The epoch's loader (lungbench.data.loader, the one data path) over `indices` in order.
    Its own generator: creating the iterator must not draw from the global RNG, or a resumed
    run would diverge from an uninterrupted one."""
    opts = LoaderOptions(
        batch_size=config.batch_size,
        num_workers=config.num_workers,
        persistent_workers=False,  # a new loader every epoch
        seed=config.seed * 100_003 + epoch,
    )
    return make_loader(dataset, opts, device, sampler=indices)


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


def training_switches(config: TrainConfig, device: torch.device) -> Switches:
    """The step's switches for a training config: eager FP32, or with `amp` fp16 autocast and
    a grad scaler on CUDA, bf16 autocast on CPU."""
    if not config.amp:
        return Switches()
    return Switches(dtype="fp16" if device.type == "cuda" else "bf16")


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
    """GPU/CPU telemetry beside a fit with a run folder (lungbench.measure.telemetry): the time series
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
            from lungbench.measure.telemetry import TelemetrySampler, nvml_indices

            gpus = nvml_indices(str(device))
            self.sampler = TelemetrySampler(config.telemetry_interval, gpus=gpus).start()

    def epoch_row(self, samples: int | None) -> dict[str, Any]:
        """The summary of the telemetry samples taken since the last call (the epoch's
        training and validation), energy per training sample when `samples` is given; the
        series saved so far."""
        if self.sampler is None:
            return {}
        self.sampler.mark()  # the epoch's closing sample, however short the epoch was
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


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: Dataset,
    config: TrainConfig,
    loss_fn: LossFn | None = None,
    dist: DistContext | None = None,
    epoch: int = 0,
    switches: Switches | None = None,
) -> tuple[float, np.ndarray, np.ndarray]:
    """Mean loss, probabilities and targets over `dataset` (gathered across ranks, in order),
    under the autocast of `switches` (default: the config's, training_switches)."""
    dist = dist or single_process(config.device)
    device = torch.device(config.device) if not dist.is_distributed else dist.device
    switches = switches or training_switches(config, device)
    loss_fn = loss_fn or default_loss
    indices = epoch_order(len(dataset), 0, config, dist, shuffle=False)
    model.eval()
    losses, probs, targets = [], [], []
    for batch in epoch_loader(dataset, indices, config, epoch, device):
        inputs, target = to_device(batch, device)
        with autocast(switches, device):
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


def infer(
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
    # {"step", "epoch", "lr"} per optimizer step so far: the lr the step ran with (1-based
    # step over the whole fit, 1-based epoch)
    lr_steps: list[dict[str, float]] = field(default_factory=list)
    best_model: dict[str, torch.Tensor] | None = None
    # Under DDP: every rank's RNG streams and partial-epoch sums, gathered before each save,
    # so that each rank resumes with its own (rank 0's alone would be given to all).
    ranks: list[dict[str, Any]] | None = None
    # Time to quality: wall time of the finished epochs (validation included) and the
    # training samples they saw, carried across a resume; the record once the target is met.
    elapsed_s: float = 0.0
    samples_seen: int = 0
    quality: dict[str, Any] | None = None


@dataclass(frozen=True)
class FitOptions:
    """What a recipe adds to the plain fit (each optional).

    loss_fn: `loss_fn(logits, target) -> scalar`; default: default_loss.
    metrics_fn: `metrics_fn(val_probs, val_targets) -> {name: value}`, extra validation
        metrics added to each history row as `val_<name>`.
    before_eval: called with the model (without its DDP wrapper) after each epoch's training,
        before its validation: e.g. batch-norm statistics recomputed for the epoch's final
        weights (lungbench.train.batchnorm); it must be deterministic for a resumed run to
        match an uninterrupted one.
    checkpoint_meta: stored in checkpoints, e.g. {"model_name": ..., "model_kwargs": ...} so
        that load_model_from_checkpoint can rebuild the model.
    switches: the step's speed switches (lungbench.switches; e.g. the tuned default of
        `lungbench bench --to-quality`); default: training_switches(config).
    """

    loss_fn: LossFn | None = None
    metrics_fn: MetricsFn | None = None
    before_eval: Callable[[nn.Module], None] | None = None
    checkpoint_meta: Mapping[str, Any] | None = None
    switches: Switches | None = None


@dataclass
class _Run:
    """What every epoch of one fit() shares: the one training step (model, loss, optimizer,
    grad scaler, clipping, per-step schedule), the unwrapped model, the epoch scheduler,
    the quality target, the recipe's options, and where and how to write."""

    step: TrainStep
    core: nn.Module  # the model without its DDP wrapper (what checkpoints hold)
    scheduler: Any
    config: TrainConfig
    dist: DistContext
    run_dir: Path | None
    meta: dict[str, Any]
    memory: _PeakMemory
    options: FitOptions
    target: Any  # lungbench.train.quality target, or None


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
    dist: DistContext | None = None,
    resume: str | os.PathLike | None = None,
    options: FitOptions | None = None,
) -> FitResult:
    """Train `model` on `train_ds`, validating on `val_ds` after every epoch.

    Args:
        run_dir: where metrics.csv, tb/ and the checkpoints go (None: nothing written).
        dist: the process's DistContext; world_size > 1 wraps the model in DDP.
        resume: a checkpoint_last.pt to continue from exactly.
        options: what the recipe adds (FitOptions: loss, extra metrics, a step before each
            validation, checkpoint metadata, speed switches).

    With `config.target` (lungbench.train.quality) the fit stops after the first epoch whose
    validation meets it; FitResult.time_to_quality records the wall time, epochs and samples.
    """
    if len(train_ds) == 0 or len(val_ds) == 0:
        raise UsageError(f"empty training ({len(train_ds)}) or validation ({len(val_ds)}) set")
    dist = dist or single_process(config.device)
    run = _start_run(model, len(train_ds), config, run_dir, dist, options or FitOptions())
    state = _restore(Path(resume), run) if resume is not None else _State()
    run.memory = _PeakMemory(run.step.device)  # from here: loading a checkpoint is not training

    writer = _tensorboard(run.run_dir, config)
    telemetry = _Telemetry(run.run_dir, config, run.step.device)
    mlog = open_log(run.run_dir, run.meta.get("model_name"), resumed=resume is not None)
    mlog.start(hyperparameters(config, dist.world_size), len(train_ds), len(val_ds))
    start = time.perf_counter()
    last_path = best_path = None
    stopped_early = False
    with stop_on_signals() as stop, contextlib.closing(telemetry), contextlib.closing(mlog):
        while state.epoch < config.epochs:
            epoch_start = time.perf_counter()
            row = _trained_epoch(run, train_ds, state, stop, mlog)
            _validate_epoch(run, val_ds, state, row, telemetry, mlog)
            improved = _note_epoch(run, state, row, epoch_start)
            reached = _check_target(run.target, state, dist.is_main and config.log_epochs)
            state.epoch, state.step, state.partial = state.epoch + 1, 0, {}
            _gather_rank_states(state, dist)
            if run.run_dir is not None:
                last_path, best_path = _write_epoch(run, state, improved, writer)
            if dist.is_main and config.log_epochs:
                tqdm.write(_epoch_line(row, config.epochs, improved), file=sys.stderr)
            if reached:
                break
            if config.patience is not None and state.wait >= config.patience:
                stopped_early = True
                break
        mlog.stop(reached=None if run.target is None else state.quality is not None)
    if writer is not None:
        writer.close()
    if run.run_dir is not None:  # a resumed fit that had finished runs no epoch here
        last_path = last_path or run.run_dir / LAST_CHECKPOINT
        best_path = best_path or run.run_dir / BEST_CHECKPOINT
    _finish(run, state)
    elapsed = time.perf_counter() - start
    return _result(state, config, elapsed, run.memory, best_path, last_path, stopped_early)


def _start_run(
    model: nn.Module,
    n_train: int,
    config: TrainConfig,
    run_dir: str | os.PathLike | None,
    dist: DistContext,
    options: FitOptions,
) -> _Run:
    """The model on its device (wrapped in DDP under a launcher), its optimizer, schedule and
    training step, seeded; the run folder made (rank 0 alone writes)."""
    device = dist.device if dist.is_distributed else parse_device(config.device, what="device")
    run_dir = Path(run_dir) if run_dir is not None and dist.is_main else None
    if run_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
    switches = options.switches or training_switches(config, device)
    target = parse_target(config.target) if config.target is not None else None
    seed_everything(config.seed)
    core = model.to(device)
    model = distributed_model(core, dist, switches) if dist.is_distributed else core
    steps_per_epoch = math.ceil(
        len(epoch_order(n_train, 0, config, dist, True)) / config.batch_size
    )
    optimizer = make_optimizer(
        core.parameters(),
        switches,  # its Adam implementation (foreach / fused); the rest is the config's
        config.lr,
        name=config.optimizer,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
    )
    scheduler = make_scheduler(optimizer, config, steps_per_epoch)
    step = TrainStep(
        model,
        options.loss_fn or default_loss,
        switches,
        device,
        optimizer=optimizer,
        grad_clip=config.grad_clip,
        after_step=scheduler.step if config.schedule == "onecycle" else None,
    )
    meta = dict(options.checkpoint_meta or {})
    return _Run(
        step, core, scheduler, config, dist, run_dir, meta, _PeakMemory(device), options, target
    )


def _trained_epoch(run: _Run, train_ds: Dataset, state: _State, stop: dict, mlog) -> dict:
    """The epoch's training (from state.step on) and its history row; after a stop signal
    the checkpoint is written and TrainingInterrupted raised."""
    mlog.epoch_start(state.epoch + 1)
    row = _train_epoch(run, train_ds, state, stop)
    if row is None:  # a stop signal arrived; the checkpoint is written
        mlog.stop(reached=False)
        path = run.run_dir / LAST_CHECKPOINT if run.run_dir else None
        raise TrainingInterrupted(
            f"stopped by signal {stop['signal']} in epoch {state.epoch + 1}, step "
            f"{state.step}; checkpoint {path}; continue with --resume {path}",
            path,
        )
    mlog.epoch_stop(state.epoch + 1)
    return row


def _validate_epoch(
    run: _Run, val_ds: Dataset, state: _State, row: dict, telemetry: _Telemetry, mlog
) -> None:
    """Validate after the epoch's training: the validation metrics, the epoch's telemetry and
    the samples it trained on go into its row; the epoch scheduler steps."""
    config, options, target = run.config, run.options, run.target
    mlog.eval_start(state.epoch + 1)
    if options.before_eval is not None:
        options.before_eval(run.core)
    val_loss, probs, targets = evaluate(
        run.step.model, val_ds, config, run.step.loss_fn, run.dist, state.epoch, run.step.switches
    )
    row["val_loss"] = val_loss
    row.update({f"val_{k}": v for k, v in classification_metrics(probs, targets).items()})
    if options.metrics_fn is not None:
        row.update({f"val_{k}": float(v) for k, v in options.metrics_fn(probs, targets).items()})
    accuracy = row.get(target.column if target else "val_auc", float("nan"))
    mlog.eval_stop(state.epoch + 1, accuracy, {"eval_loss": val_loss})
    # Energy per sample only where the sampler sees every sample's device: under DDP rank 0
    # samples its own GPU and CPU, not the other ranks'.
    samples = int(row.pop("samples"))
    state.samples_seen += samples
    row.update(telemetry.epoch_row(None if run.dist.is_distributed else samples))
    if config.schedule != "onecycle":
        run.scheduler.step()


def _note_epoch(run: _Run, state: _State, row: dict, epoch_start: float) -> bool:
    """Add the validated epoch to the history; True if its validation loss is the best so far
    (its weights are then kept as the best model)."""
    improved = row["val_loss"] < state.best_val_loss
    if improved:
        state.best_val_loss, state.best_epoch, state.wait = row["val_loss"], row["epoch"], 0
        state.best_model = {k: v.detach().cpu().clone() for k, v in run.core.state_dict().items()}
    else:
        state.wait += 1
    state.history.append(row)
    state.elapsed_s += time.perf_counter() - epoch_start
    return improved


def _finish(run: _Run, state: _State) -> None:
    """After the last epoch: the best weights restored if asked, and a quality target that was
    never met recorded as such (how long the fit ran without reaching it)."""
    if run.config.restore_best and state.best_model is not None:
        run.core.load_state_dict(state.best_model)
    if run.target is not None and state.quality is None and state.history:
        state.quality = quality_record(
            run.target, state.history, state.elapsed_s, state.samples_seen
        ).as_dict()


def _check_target(target, state: _State, say: bool) -> bool:
    """After an epoch's validation: True (and state.quality recorded, the line printed)
    the first time the target is met. Every rank sees the same (all-gathered) metrics, so
    they all stop at the same epoch."""
    if target is None or state.quality is not None or not target.reached(state.history[-1]):
        return False
    record: QualityRecord = quality_record(
        target, state.history, state.elapsed_s, state.samples_seen
    )
    state.quality = record.as_dict()
    if say:
        tqdm.write(record.line(), file=sys.stderr)
    return True


def _train_epoch(run: _Run, train_ds: Dataset, state: _State, stop: dict) -> dict | None:
    """One epoch (from state.step on); returns its history row, or None after a stop signal."""
    config, dist, device = run.config, run.dist, run.step.device
    run.step.model.train()
    indices = epoch_order(len(train_ds), state.epoch, config, dist, shuffle=True)
    skip = state.step * config.batch_size  # samples an interrupted run already trained on
    loader = epoch_loader(
        EpochView(train_ds, state.epoch), indices[skip:], config, state.epoch, device
    )
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
        inputs, target = to_device(batch, device)
        inputs = run.step.prepare_inputs(inputs)  # the switches' memory format
        lr = run.step.optimizer.param_groups[0]["lr"]  # one-cycle moves it after each step
        loss, logits = run.step.run(NO_TIMER, inputs, target)  # the one step (lungbench.step)
        state.lr_steps.append({"step": len(state.lr_steps) + 1, "epoch": state.epoch + 1, "lr": lr})
        state.step += 1
        n = target.shape[0]
        # .item() is a device sync point; once per step is cheap next to a 3D conv step.
        sums["loss"] += loss.item() * n
        sums["samples"] += n
        correct, count = _batch_correct(logits, target)
        sums["correct"] += correct
        sums["count"] += count
        run.memory.sample()
        bar.set_postfix(loss=f"{sums['loss'] / sums['samples']:.4f}")
        if _stop_requested(stop, dist, device):
            sums["seconds"] += time.perf_counter() - tick
            state.partial = sums
            _gather_rank_states(state, dist)
            if run.run_dir is not None:
                save_checkpoint(run.run_dir / LAST_CHECKPOINT, _payload(run, state))
            bar.close()
            return None
    bar.close()
    seconds = sums["seconds"] + time.perf_counter() - tick
    if dist.is_distributed:
        sums = _sum_over_ranks(sums, device)  # the epoch's loss and accuracy over all ranks
    return {
        "epoch": state.epoch + 1,
        "lr": run.step.optimizer.param_groups[0]["lr"],
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


def _payload(run: _Run, state: _State) -> dict:
    meta = run.meta
    return {
        "model_name": meta.get("model_name"),
        "model_kwargs": dict(meta.get("model_kwargs") or {}),
        **{k: v for k, v in meta.items() if k not in ("model_name", "model_kwargs")},
        "model": run.core.state_dict(),
        "optimizer": run.step.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "scaler": run.step.scaler.state_dict(),
        "rng": rng_state(),
        "epoch": state.epoch,
        "step": state.step,
        "best_val_loss": state.best_val_loss,
        "best_epoch": state.best_epoch,
        "wait": state.wait,
        "history": state.history,
        "partial": state.partial,
        "lr_steps": state.lr_steps,
        "elapsed_s": state.elapsed_s,
        "samples_seen": state.samples_seen,
        "quality": state.quality,
        "best_model": state.best_model,
        "world_size": len(state.ranks) if state.ranks else 1,
        "ranks": state.ranks,
        "config": asdict(run.config),
    }


def _write_epoch(run: _Run, state: _State, improved: bool, writer) -> tuple[Path, Path]:
    """metrics.csv, TensorBoard scalars, checkpoint_last.pt and (if improved) _best.pt."""
    run_dir = run.run_dir
    history = pd.DataFrame(state.history)
    tmp = run_dir / (METRICS_FILE + ".tmp")
    history.to_csv(tmp, index=False)
    os.replace(tmp, run_dir / METRICS_FILE)
    tmp = run_dir / (LR_STEPS_FILE + ".tmp")
    lr_steps_frame(state.lr_steps).to_csv(tmp, index=False)
    os.replace(tmp, run_dir / LR_STEPS_FILE)
    if writer is not None:
        row = state.history[-1]
        for key, value in row.items():
            # skip NaN (AUC with one class) and None (a telemetry source this machine lacks)
            if key != "epoch" and isinstance(value, (int, float)) and value == value:
                writer.add_scalar(key, value, int(row["epoch"]))
        writer.flush()
    payload = _payload(run, state)
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


def _restore(path: Path, run: _Run) -> _State:
    """Load a checkpoint_last.pt into model, optimizer, scheduler, scaler and the RNGs (under
    DDP this rank's own RNG streams and partial sums; the world size must be the same)."""
    dist, meta = run.dist, run.meta
    ckpt = load_resume_checkpoint(path, run.config)
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
    _load_weights(run.core, ckpt["model"], path)
    try:
        run.step.optimizer.load_state_dict(ckpt["optimizer"])
        run.scheduler.load_state_dict(ckpt["scheduler"])
        run.step.scaler.load_state_dict(ckpt["scaler"])
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
        lr_steps=list(ckpt.get("lr_steps", [])),
        elapsed_s=float(ckpt.get("elapsed_s", 0.0)),
        samples_seen=int(ckpt.get("samples_seen", 0)),
        quality=ckpt.get("quality"),
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
        time_to_quality=state.quality,
        extra={"seed": config.seed},
        lr_steps=lr_steps_frame(state.lr_steps),
    )


def lr_steps_frame(lr_steps: list[dict[str, float]]) -> pd.DataFrame:
    """The per-step learning rates as a table: step (1-based over the fit), epoch, lr."""
    frame = pd.DataFrame(lr_steps, columns=["step", "epoch", "lr"])
    return frame.astype({"step": int, "epoch": int, "lr": float})
