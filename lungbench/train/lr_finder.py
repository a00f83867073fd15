"""Layer 9 (train): Learning-rate range test (Smith 2017; fastai's `lr_find`, used by seed 001).

    result = find_lr(model, train_ds, LRRange(start_lr=1e-7, end_lr=10, num_iter=100))
    result.suggestion          # the LR at the steepest descent of the smoothed loss
    fig = lr_finder_figure(result)

The LR grows exponentially from `start_lr` to `end_lr`, one mini-batch per step; the loss is
smoothed with a bias-corrected exponential moving average (beta 0.98) and the sweep stops
early when it diverges (4x the best smoothed loss). The model's weights, training mode and
the global RNG are restored afterwards, so the sweep leaves no trace on the training that
follows. Only parameters with `requires_grad` are swept (a frozen backbone stays frozen).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lungbench.core.errors import UsageError
from lungbench.data.loader import LoaderOptions, make_loader
from lungbench.step import NO_TIMER, TrainStep, make_optimizer
from lungbench.switches import Switches
from lungbench.train.metrics import default_loss

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class LRFinderResult:
    """The sweep: learning rates, raw and smoothed losses, and the suggested LR."""

    lrs: list[float]
    losses: list[float]
    smoothed: list[float]
    suggestion: float
    stopped_early: bool = False
    notes: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class LRRange:
    """The range test: from `start_lr` to `end_lr` over `num_iter` mini-batches with
    `optimizer`; the loss smoothed with `beta`, stopped at `diverge` x the best."""

    start_lr: float = 1e-7
    end_lr: float = 10.0
    num_iter: int = 100
    optimizer: str = "adam"
    beta: float = 0.98
    diverge: float = 4.0


def find_lr(
    model: nn.Module,
    dataset: Dataset,
    sweep: LRRange | None = None,
    loss_fn: LossFn | None = None,
    batch_size: int = 16,
    device: str = "cpu",
    seed: int = 0,
) -> LRFinderResult:
    """Sweep the LR over `sweep.num_iter` mini-batches (cycling through `dataset` as needed)."""
    sweep = sweep or LRRange()
    start_lr, end_lr, num_iter = sweep.start_lr, sweep.end_lr, sweep.num_iter
    beta, diverge = sweep.beta, sweep.diverge
    if not 0 < start_lr < end_lr:
        raise UsageError(f"LR finder needs 0 < start_lr < end_lr, got {start_lr}, {end_lr}")
    if num_iter < 5:
        raise UsageError(f"LR finder needs at least 5 iterations, got {num_iter}")
    loss_fn = loss_fn or default_loss
    saved_state = copy.deepcopy(model.state_dict())
    was_training = model.training
    rng_state = torch.get_rng_state()
    torch.manual_seed(seed)
    model = model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise UsageError("LR finder: the model has no trainable parameters")
    opt = make_optimizer(params, Switches(), start_lr, name=sweep.optimizer)
    # The training engine's step (lungbench.step.TrainStep), eager FP32, this optimizer.
    train_step = TrainStep(model, loss_fn, Switches(), torch.device(device), optimizer=opt)

    def step(inputs: list[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        return train_step(NO_TIMER, inputs, target)

    factor = (end_lr / start_lr) ** (1.0 / (num_iter - 1))
    lrs, losses, smoothed = [], [], []
    avg, best, stopped = 0.0, math.inf, False
    opts = LoaderOptions(batch_size, seed=seed)
    batches = _cycle(make_loader(dataset, opts, torch.device(device)))
    model.train()
    try:
        for i in range(num_iter):
            lr = start_lr * factor**i
            for group in opt.param_groups:
                group["lr"] = lr
            inputs, target = next(batches)
            loss = step([x.to(device) for x in inputs], target.to(device))
            value = float(loss)
            avg = beta * avg + (1 - beta) * value
            smooth = avg / (1 - beta ** (i + 1))  # bias correction for the first steps
            lrs.append(lr)
            losses.append(value)
            smoothed.append(smooth)
            best = min(best, smooth)
            if not math.isfinite(smooth) or (i > 5 and smooth > diverge * best):
                stopped = True
                break
    finally:
        model.load_state_dict(saved_state)
        model.train(was_training)
        torch.set_rng_state(rng_state)
    return LRFinderResult(lrs, losses, smoothed, steepest_descent(lrs, smoothed), stopped)


def steepest_descent(
    lrs: list[float], smoothed: list[float], skip_start: int = 3, skip_end: int = 2
) -> float:
    """The LR where the smoothed loss falls fastest per decade of LR (finite, always)."""
    x = np.log10(np.asarray(lrs, dtype=float))
    y = np.asarray(smoothed, dtype=float)
    ok = np.isfinite(y)
    x, y = x[ok], y[ok]
    if len(x) < skip_start + skip_end + 3:
        return float(10 ** x[len(x) // 2]) if len(x) else float("nan")
    grad = np.gradient(y, x)
    window = slice(skip_start, len(x) - skip_end)
    return float(10 ** x[window][int(np.argmin(grad[window]))])


def lr_finder_figure(result: LRFinderResult, title: str = "LR finder"):
    """Smoothed (and raw) loss against the LR on a log axis, suggestion marked."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(result.lrs, result.losses, color="0.75", lw=0.8, label="loss (raw)")
    ax.plot(result.lrs, result.smoothed, color="C0", label="loss (smoothed)")
    ax.axvline(
        result.suggestion, color="C3", ls="--", label=f"steepest descent: {result.suggestion:.2e}"
    )
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss")
    finite = [v for v in result.smoothed if math.isfinite(v)]
    if finite:
        ax.set_ylim(min(finite) * 0.9, min(max(finite), 4 * min(finite)) * 1.1)
    ax.set_title(title)
    ax.legend()
    return fig


def _cycle(loader: DataLoader):
    while True:
        yield from loader
