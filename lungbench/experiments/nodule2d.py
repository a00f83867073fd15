"""Layer 9 (experiments): `lungbench train nodule2d`: seed 001's fine-tuning recipe on 64x64 nodule crops.

LR range test (its plot and the suggestion at the steepest descent) -> training with cosine
annealing or one-cycle and random-rotation augmentation -> test accuracy with and without
test-time augmentation -> Grad-CAM overlays, the most confidently right, most wrong and most
uncertain test crops, and the confusion matrix. Split 80/10/10 as the seed, stratified by
class. A given --lr skips the LR finder.

    lungbench train nodule2d --quick                       generated slices, about a minute
    lungbench train nodule2d --weights resnet50-tv.pth --method A --epochs 200
    lungbench train nodule2d --store crops.h5 --schedule onecycle

Outputs in results/<run-id>/: plots/{lr_finder, loss, gradcam, most_correct, most_incorrect,
most_uncertain, confusion_matrix}.png, tables/{accuracy, confusion_matrix, history}, and the
training's checkpoint_best.pt / metrics.csv under train/.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Subset
from tqdm import tqdm

from lungbench.core.runs import (
    append_record,
    markdown,
    save_figure,
    write_json,
    write_table,
)
from lungbench.data.splits import stratified_split
from lungbench.data.store import StoreDataset, StoreInfo, read_info
from lungbench.experiments import common2d as c2d
from lungbench.experiments import common3d as c3d
from lungbench.report.training import confusion_table
from lungbench.train.cam import cam_overlay_figure, grad_cam
from lungbench.train.config import TrainConfig
from lungbench.train.engine import fit, predict
from lungbench.train.lr_finder import find_lr, lr_finder_figure
from lungbench.train.transfer import parse_method
from lungbench.train.tta import tta_predict

log = logging.getLogger(__name__)  # progress: the CLI shows it on stderr

NAME = "nodule2d"
QUICK = {"model": "resnet18", "n": 80, "epochs": 2, "lr_iters": 20}
DEFAULTS = {"model": "resnet50", "n": 600, "epochs": 30, "lr_iters": 100}
GRID = 8  # images per grid


@dataclass(frozen=True)
class Nodule2DConfig:
    """Everything the run does (saved to config.json)."""

    model: str
    method: str
    weights: str | None
    store: str | None
    n: int
    image_size: int
    augmentation: str
    lr_iters: int
    tta_views: tuple[str, ...]
    generated: bool
    train: TrainConfig
    find_lr: bool = True  # run the LR finder and train at its suggestion (no --lr given)


@dataclass
class Nodule2DRun:
    """What a nodule2d run produced: its folder and the tables to show, as text."""

    run_dir: Path
    text: str


def run(cfg: Nodule2DConfig, out: str | Path, run_id: str | None = None) -> Nodule2DRun:
    """LR finder (unless cfg.find_lr is off), training, TTA, Grad-CAM into OUT/<run-id>/."""
    # Everything the user gave is checked before the run folder exists: the store (a 2D
    # binary image store, enough crops of each class to split), the weights and method.
    in_channels = 1  # the generated crops are grey
    if cfg.store is not None:
        info = _check_store(Path(cfg.store))
        _split(StoreDataset(info.path).labels, cfg.train.seed)
        in_channels = info.inputs["image"][0]
    kwargs = c2d.model_kwargs(cfg.model, in_channels, 1, 0.0)
    method = parse_method(cfg.method)
    built = c2d.build_transfer_model(cfg.model, kwargs, method, cfg.weights, cfg.train.seed)
    config = {"nodule2d": asdict(cfg), "lr_finder": None}
    # a later failure marks the run "failed"
    with c3d.training_run(out, run_id, config, _data_note(cfg)) as folder:
        text = _experiment(cfg, folder.path, built, kwargs)
    return Nodule2DRun(folder.path, text)


def _experiment(
    cfg: Nodule2DConfig,
    run_dir: Path,
    built: c2d.BuiltModel,
    kwargs: dict,
) -> str:
    """The study into `run_dir`; the tables to show, as text."""
    store = _store(cfg, run_dir)
    info = _check_store(store)
    note = _data_note(cfg)
    train_idx, val_idx, test_idx = _split(StoreDataset(store).labels, cfg.train.seed)
    from lungbench.data.transforms import make_transform

    train_ds = Subset(
        StoreDataset(store, transform=make_transform(cfg.augmentation, cfg.train.seed)),
        train_idx.tolist(),
    )
    plain = StoreDataset(store, cache=True)
    val_ds, test_ds = Subset(plain, val_idx.tolist()), Subset(plain, test_idx.tolist())
    method = built.plan.method

    finder = None
    if cfg.find_lr:
        sweep = find_lr(
            built.model,
            train_ds,
            num_iter=cfg.lr_iters,
            batch_size=cfg.train.batch_size,
            device=cfg.train.device,
            seed=cfg.train.seed,
        )
        save_figure(run_dir, "lr_finder", lr_finder_figure(sweep, f"LR finder, {cfg.model}"))
        cfg = replace(cfg, train=replace(cfg.train, lr=sweep.suggestion))
        finder = {"suggestion": sweep.suggestion, "lrs": sweep.lrs, "smoothed": sweep.smoothed}
        log.info(f"LR finder suggests {sweep.suggestion:.2e}; training with lr {cfg.train.lr:.2e}")
    else:
        log.info(f"--lr {cfg.train.lr:.2e} given: LR finder skipped")
    log.info(f"config: {cfg}")
    write_json(run_dir / "config.json", {"nodule2d": asdict(cfg), "lr_finder": finder})

    result = fit(
        built.model,
        train_ds,
        val_ds,
        cfg.train,
        run_dir=run_dir / "train",
        checkpoint_meta={
            "model_name": cfg.model,
            "model_kwargs": kwargs,
            "weights_chain": list(built.load.chain) if built.load else [],
            "transfer_method": method.label,
        },
    )
    write_table(run_dir, "history", result.history, index=False)
    save_figure(run_dir, "loss", _loss_figure(result.history))
    probs, targets = predict(built.model, test_ds, cfg.train.batch_size, cfg.train.device)
    tta_probs, _ = tta_predict(
        built.model, test_ds, "binary", cfg.train.batch_size, cfg.train.device, cfg.tta_views
    )
    accuracy = pd.DataFrame(
        {
            "prediction": ["plain", f"TTA ({len(cfg.tta_views)} views)"],
            "test_accuracy": [_accuracy(probs, targets), _accuracy(tta_probs, targets)],
            "n_test": [len(targets)] * 2,
        }
    )
    write_table(run_dir, "accuracy", accuracy, index=False)
    append_record(
        run_dir,
        {
            "kind": "nodule2d",
            "lr": cfg.train.lr,
            "lr_finder": finder is not None,
            **dict(zip(accuracy["prediction"], accuracy["test_accuracy"], strict=True)),
        },
    )
    confusion = confusion_table(targets, tta_probs, class_names=info.label_names)
    write_table(run_dir, "confusion_matrix", confusion)
    save_figure(run_dir, "confusion_matrix", _confusion_figure(confusion))
    _case_grids(run_dir, built.model, test_ds, tta_probs, targets, info.label_names)
    return (
        f"Test accuracy, {cfg.model} method {method.label} ({note}):\n"
        f"{markdown(accuracy, index=False)}\n\nConfusion matrix (TTA):\n{markdown(confusion)}"
    )


def _check_store(path: Path) -> StoreInfo:
    """The store's info if it holds binary 2D crops (C, H, W) under 'image', else UsageError."""
    info = read_info(path)
    hint = "2D crops: `lungbench data images --csv labels.csv ...`, or leave out --store"
    c3d.require_inputs(info, ["image"], NAME, hint)
    c2d.require_image(info, NAME, hint)
    return info


def _data_note(cfg: Nodule2DConfig) -> str:
    return "generated nodule slices (not real crops)" if cfg.generated else str(cfg.store)


def _store(cfg: Nodule2DConfig, run_dir: Path) -> Path:
    if cfg.store is not None:
        return Path(cfg.store)
    from lungbench.data.synth2d import write_nodule2d_store

    path = run_dir / "data" / "nodule2d-synth.h5"
    with tqdm(total=cfg.n, desc="generate nodule slices", unit="crop", file=sys.stderr) as bar:
        write_nodule2d_store(
            path, cfg.n, seed=cfg.train.seed, size=cfg.image_size, progress=bar.update
        )
    return path


def _split(labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The seed's 80/10/10 train/validation/test, stratified by class: 10% test, then 1/9 of
    the rest for validation (UsageError when a class has too few crops)."""
    rest, test = stratified_split(np.arange(len(labels)), labels, 0.1, seed)
    train, val = stratified_split(rest, labels, 1 / 9, seed)
    return train, val, test


def _accuracy(probs: np.ndarray, targets: np.ndarray) -> float:
    return float(np.mean((probs >= 0.5) == (targets >= 0.5)))


def case_indices(probs: np.ndarray, targets: np.ndarray, k: int) -> dict[str, np.ndarray]:
    """Test positions of the most confidently right, most wrong and most uncertain cases."""
    truth = (targets >= 0.5).astype(float)
    confidence_in_truth = np.where(truth == 1, probs, 1 - probs)
    correct = confidence_in_truth >= 0.5
    order = np.argsort(-confidence_in_truth)
    return {
        "most_correct": order[correct[order]][:k],
        "most_incorrect": order[::-1][~correct[order[::-1]]][:k],
        "most_uncertain": np.argsort(np.abs(probs - 0.5))[:k],
    }


def _case_grids(run_dir: Path, model, test_ds, probs, targets, names) -> None:
    cases = case_indices(probs, targets, GRID)
    for name, positions in cases.items():
        if len(positions) == 0:
            continue
        images = torch.stack([test_ds[int(i)][0][0] for i in positions])
        cams = grad_cam(model, (images,), target=0).numpy()  # images on CPU, maps too
        titles = [f"{names[int(targets[i] >= 0.5)]}: p(mal)={probs[i]:.2f}" for i in positions]
        save_figure(run_dir, name, cam_overlay_figure(images[:, 0].numpy(), cams, titles))
    first = np.arange(min(GRID, len(targets)))
    images = torch.stack([test_ds[int(i)][0][0] for i in first])
    cams = grad_cam(model, (images,), target=0).numpy()
    titles = [f"{names[int(targets[i] >= 0.5)]}: p={probs[i]:.2f}" for i in first]
    save_figure(run_dir, "gradcam", cam_overlay_figure(images[:, 0].numpy(), cams, titles))


def _loss_figure(history: pd.DataFrame):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(history["epoch"], history["train_loss"], marker="o", label="train")
    ax.plot(history["epoch"], history["val_loss"], marker="o", label="validation")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.legend()
    return fig


def _confusion_figure(table: pd.DataFrame):
    import matplotlib.pyplot as plt

    counts = table.iloc[:-1, :-1].to_numpy()
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.imshow(counts, cmap="Blues")
    for (i, j), v in np.ndenumerate(counts):
        ax.text(j, i, str(v), ha="center", va="center")
    ax.set_xticks(range(counts.shape[1]), table.columns[:-1], rotation=20)
    ax.set_yticks(range(counts.shape[0]), table.index[:-1])
    ax.set_xlabel("true diagnosis")
    return fig
