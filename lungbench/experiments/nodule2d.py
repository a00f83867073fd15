"""Layer 11 (experiments): `lungbench train nodule2d`: seed 001's fine-tuning recipe on 64x64 nodule crops.

LR range test (its plot and the suggestion at the steepest descent) -> training with cosine
annealing or one-cycle and random-rotation augmentation -> test accuracy with and without
test-time augmentation -> Grad-CAM overlays, the most confidently right, most wrong and most
uncertain test crops, and the confusion matrix. Split 80/10/10 as the seed, stratified by
class. A given --lr skips the LR finder.

    lungbench train nodule2d --quick                       generated slices, about 2 minutes
    lungbench train nodule2d --weights resnet50-tv.pth --method A --epochs 200
    lungbench train nodule2d --store crops.h5 --schedule onecycle
    lungbench train nodule2d --resume results/RUN          continue a stopped run

Outputs in results/<run-id>/: plots/{lr_finder, lr_schedule, loss, gradcam, most_correct,
most_incorrect, most_uncertain, confusion_matrix}.png, tables/{accuracy, confusion_matrix,
history, gradcam_nodule}, and the training's checkpoint_best.pt, metrics.csv and lr_steps.csv
(the learning rate of every step) under train/.

Shown working: plots/lr_schedule.png draws the learning rate of every optimizer step (the
quick run trains with one-cycle: warm-up to the peak at 30% of the steps, then annealing);
tables/gradcam_nodule says how much of each Grad-CAM map falls on the nodule (generated
crops are centred on it, and their diameter is known) against the nodule's share of the crop.
Two choices make the maps mean something on small crops: the explained layer is the
deepest stage with maps of at least 7x7 cells (at 64 pixels ResNet's last stage is 2x2
cells, which cannot point at the centre), and each crop's map explains its predicted class.
The batch-norm statistics are recomputed for each epoch's weights before validation
(--no-precise-bn: off): after a few hundred steps the running averages trail the weights
and the evaluated network would call every crop benign (lungbench.train.batchnorm).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Subset

from lungbench.core.errors import UsageError, look_up_option
from lungbench.core.options import nested, option, positive_int, replaced
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
from lungbench.experiments.resumable import ResumePoint, checkpoint_to_resume
from lungbench.report.training import confusion_table, lr_schedule_plot
from lungbench.train.batchnorm import recalibrate_batchnorm
from lungbench.train.cam import cam_overlay_figure, grad_cam
from lungbench.train.config import TrainConfig
from lungbench.train.engine import LR_STEPS_FILE, METRICS_FILE, FitOptions, fit, infer
from lungbench.train.lr_finder import LRRange, find_lr, lr_finder_figure
from lungbench.train.transfer import parse_method
from lungbench.train.tta import DEFAULT_VIEWS, VIEWS, tta_predict

log = logging.getLogger(__name__)  # progress: the CLI shows it on stderr

NAME = "nodule2d"
GRID = 8  # images per grid
CAM_MIN_SIZE = 7  # Grad-CAM explains the deepest stage with maps of >= 7x7 cells


@dataclass(frozen=True, kw_only=True)
class Nodule2DConfig:
    """Everything the run does (saved to config.json); the fields with option(...) are the
    command's options, with FULL and QUICK as their defaults."""

    store: str | None = option(
        None,
        group="data",
        default_text="generated nodule slices",
        help="binary image store of crops",
    )
    n: int = option(type=positive_int, group="data", help="generated crops")
    image_size: int = option(
        64,
        type=positive_int,
        group="data",
        default_note="as the seed",
        help="generated crop size in pixels",
    )
    augmentation: str = option(
        "rotation_only",
        group="data",
        default_note="as the seed",
        help="training augmentation preset of lungbench.data.transforms: none, "
        "rotation_only, flips, standard",
    )
    model: str = option(
        choices=c2d.BACKBONES, group="model", default_note="the seed's choice", help="network"
    )
    method: str = option(
        "C",
        group="model",
        default_note="without --weights C starts from random weights",
        help="transfer method A, B_<depth>, C or D",
    )
    weights: str | None = option(
        None,
        group="model",
        default_text="none",
        help="local pretrained weights (torchvision/MONAI .pth or lungbench checkpoint)",
    )
    train: TrainConfig = nested(
        TrainConfig,
        group="training",
        show={
            "epochs": {},
            "batch_size": {"aliases": ("--batch-size",)},  # --batch, as every command
            "lr": {
                "help": "learning rate; given, the LR finder is skipped",
                "default_text": "run the LR finder and train with its suggestion",
            },
            "schedule": {"default_note": "as the seed"},
            "device": {},
            "num_workers": {},
            "seed": {},
            "telemetry_interval": {},
        },
    )
    lr_iters: int = option(
        type=positive_int, group="training", help="LR finder steps, >= 5, without --lr"
    )
    tta_views: tuple[str, ...] = option(
        DEFAULT_VIEWS,
        flag="--tta",
        nargs="+",
        metavar="TTA",
        group="training",
        default_text=f"all 8: {' '.join(DEFAULT_VIEWS)}",
        help="TTA views",
    )
    precise_bn: bool = option(
        True,
        flag="--no-precise-bn",
        group="training",
        default_text="on",
        help="do not recompute the batch-norm statistics for each epoch's weights before "
        "validation (lungbench.train.batchnorm)",
    )
    find_lr: bool = True  # run the LR finder and train at its suggestion (no --lr given)
    generated: bool = field(init=False)  # no store: generated nodule slices

    def __post_init__(self) -> None:
        from lungbench.data.transforms import PRESETS

        object.__setattr__(self, "generated", self.store is None)
        parse_method(self.method)
        if self.find_lr and self.lr_iters < 5:
            raise UsageError(
                f"--lr-iters: the LR finder needs at least 5 steps, got {self.lr_iters}"
            )
        if self.generated:
            if self.image_size < 32:
                raise UsageError(
                    f"--image-size must be >= 32 pixels (the networks downsample 32x), "
                    f"got {self.image_size}"
                )
            if self.n < 10:
                raise UsageError(f"--n: nodule2d needs at least 10 crops, got {self.n}")
        look_up_option(self.augmentation, PRESETS, what="augmentation preset")
        for view in self.tta_views:
            look_up_option(view, VIEWS, what="TTA view")


FULL = Nodule2DConfig(
    model="resnet50",
    n=600,
    lr_iters=100,
    # lr: TrainConfig's 1e-3, replaced by the LR finder's suggestion when find_lr (no --lr)
    train=TrainConfig(
        epochs=30,
        batch_size=32,
        schedule="cosine",
        tensorboard=False,
        telemetry_interval=1.0,
    ),
)
# Quick: enough steps (4 epochs of 128 crops, batch 16) for the network to tell the classes
# apart and for Grad-CAM to find the nodule; one-cycle, so its shape shows in lr_schedule.png.
QUICK = replaced(
    FULL,
    {
        "model": "resnet18",
        "n": 160,
        "epochs": 4,
        "batch_size": 16,
        "schedule": "onecycle",
        "lr_iters": 20,
    },
)


@dataclass
class Nodule2DRun:
    """What a nodule2d run produced: its folder and the tables to show, as text."""

    run_dir: Path
    text: str


def run(
    cfg: Nodule2DConfig,
    out: str | Path,
    run_id: str | None = None,
    resume: ResumePoint | None = None,
) -> Nodule2DRun:
    """LR finder (unless cfg.find_lr is off), training, TTA, Grad-CAM into OUT/<run-id>/;
    with `resume`, that folder continued: the LR finder's result kept, the training
    continued from its last checkpoint, the evaluation done again."""
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
    # a later failure marks the run "failed", a stop "interrupted"; the training history so
    # far is written first
    with c3d.training_run(
        out, run_id, config, _data_note(cfg), resume=resume, on_stop=_history_after_stop
    ) as folder:
        text = _experiment(cfg, folder.path, built, kwargs, resume)
    return Nodule2DRun(folder.path, text)


def _history_after_stop(run_dir: Path) -> None:
    """tables/history and the loss and learning-rate plots of the epochs that finished."""
    metrics = run_dir / "train" / METRICS_FILE
    if metrics.exists():
        history = pd.read_csv(metrics)
        write_table(run_dir, "history", history, index=False)
        save_figure(run_dir, "loss", _loss_figure(history))
    steps = run_dir / "train" / LR_STEPS_FILE
    if steps.exists():
        save_figure(run_dir, "lr_schedule", lr_schedule_plot(pd.read_csv(steps), "learning rate"))


def _experiment(
    cfg: Nodule2DConfig,
    run_dir: Path,
    built: c2d.BuiltModel,
    kwargs: dict,
    resume: ResumePoint | None = None,
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

    cfg, finder = _learning_rate(cfg, run_dir, built.model, train_ds, resume)
    log.info(f"config: {cfg}")
    write_json(run_dir / "config.json", {"nodule2d": asdict(cfg), "lr_finder": finder})

    result = fit(
        built.model,
        train_ds,
        val_ds,
        cfg.train,
        run_dir=run_dir / "train",
        resume=checkpoint_to_resume(run_dir / "train", resume),
        options=_fit_options(cfg, built, kwargs, Subset(plain, train_idx.tolist())),
    )
    write_table(run_dir, "history", result.history, index=False)
    save_figure(run_dir, "loss", _loss_figure(result.history))
    save_figure(
        run_dir,
        "lr_schedule",
        lr_schedule_plot(
            result.lr_steps,
            f"learning rate per step, {cfg.train.schedule} (peak {cfg.train.lr:.2e})",
        ),
    )
    accuracy, tta_probs, targets = _test_accuracy(cfg, built.model, test_ds)
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
    text = (
        f"Test accuracy, {cfg.model} method {method.label} ({note}):\n"
        f"{markdown(accuracy, index=False)}\n\nConfusion matrix (TTA):\n{markdown(confusion)}"
    )
    if cfg.generated:  # centred on the nodule, its diameter known: where does Grad-CAM look?
        summary = nodule_cam_table(run_dir, built.model, store, test_idx, tta_probs)
        append_record(run_dir, {"kind": "gradcam_nodule", **summary.iloc[0].to_dict()})
        text += (
            "\n\nGrad-CAM on the nodule (test crops; a map spread evenly would have a "
            f"lift of 1):\n{markdown(summary, index=False)}"
        )
    return text


def _learning_rate(
    cfg: Nodule2DConfig, run_dir: Path, model, train_ds, resume: ResumePoint | None
) -> tuple[Nodule2DConfig, dict | None]:
    """The configuration with the learning rate to train with (the LR finder's suggestion
    with --find-lr; a resumed run's saved one) and the finder's sweep, if it ran."""
    finder = resume.config.get("lr_finder") if resume else None
    if finder:  # a resumed run's LR finder had finished: its lr is in the saved config
        log.info(f"LR finder done before: training with lr {cfg.train.lr:.2e}")
        return cfg, finder
    if not cfg.find_lr:
        log.info(f"--lr {cfg.train.lr:.2e} given: LR finder skipped")
        return cfg, None
    sweep = find_lr(
        model,
        train_ds,
        LRRange(num_iter=cfg.lr_iters),
        batch_size=cfg.train.batch_size,
        device=cfg.train.device,
        seed=cfg.train.seed,
    )
    save_figure(run_dir, "lr_finder", lr_finder_figure(sweep, f"LR finder, {cfg.model}"))
    cfg = replace(cfg, train=replace(cfg.train, lr=sweep.suggestion))
    log.info(f"LR finder suggests {sweep.suggestion:.2e}; training with lr {cfg.train.lr:.2e}")
    return cfg, {"suggestion": sweep.suggestion, "lrs": sweep.lrs, "smoothed": sweep.smoothed}


def _fit_options(
    cfg: Nodule2DConfig, built: c2d.BuiltModel, kwargs: dict, plain_train
) -> FitOptions:
    """Precise BN on the training crops without augmentation (as validation and test see
    them), and checkpoints that name the model, its weights chain and transfer method."""

    def precise_bn(model) -> None:
        recalibrate_batchnorm(model, plain_train, cfg.train.batch_size, cfg.train.device)

    return FitOptions(
        before_eval=precise_bn if cfg.precise_bn else None,
        checkpoint_meta={
            "model_name": cfg.model,
            "model_kwargs": kwargs,
            "weights_chain": list(built.load.chain) if built.load else [],
            "transfer_method": built.plan.method.label,
        },
    )


def _test_accuracy(
    cfg: Nodule2DConfig, model, test_ds
) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """Test accuracy of plain and test-time-augmented prediction; the TTA probabilities and
    the targets."""
    batch, device = cfg.train.batch_size, cfg.train.device
    probs, targets = infer(model, test_ds, batch, device)
    tta_probs, _ = tta_predict(model, test_ds, "binary", batch, device, cfg.tta_views)
    accuracy = pd.DataFrame(
        {
            "prediction": ["plain", f"TTA ({len(cfg.tta_views)} views)"],
            "test_accuracy": [_accuracy(probs, targets), _accuracy(tta_probs, targets)],
            "n_test": [len(targets)] * 2,
        }
    )
    return accuracy, tta_probs, targets


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
    from lungbench.data.synth2d import write_nodule2d_store

    def generate(path: Path, progress) -> None:
        write_nodule2d_store(
            path, cfg.n, seed=cfg.train.seed, size=cfg.image_size, progress=progress
        )

    path = run_dir / "data" / "nodule2d-synth.h5"
    return c2d.store_or_generated(cfg.store, path, cfg.n, ("nodule slices", "crop"), generate)


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


def predicted_class_cams(model, images: torch.Tensor, probs: np.ndarray) -> np.ndarray:
    """Grad-CAM (N, H, W) of each crop's predicted class, on the deepest stage with maps of
    at least CAM_MIN_SIZE cells (lungbench.train.cam)."""
    negative = torch.as_tensor(np.asarray(probs) < 0.5)
    return grad_cam(model, (images,), target=0, min_size=CAM_MIN_SIZE, negative=negative).numpy()


def _case_grids(run_dir: Path, model, test_ds, probs, targets, names) -> None:
    cases = case_indices(probs, targets, GRID)
    for name, positions in cases.items():
        if len(positions) == 0:
            continue
        images = torch.stack([test_ds[int(i)][0][0] for i in positions])
        cams = predicted_class_cams(model, images, probs[positions])  # on CPU, as the images
        titles = [f"{names[int(targets[i] >= 0.5)]}: p(mal)={probs[i]:.2f}" for i in positions]
        save_figure(run_dir, name, cam_overlay_figure(images[:, 0].numpy(), cams, titles))
    first = np.arange(min(GRID, len(targets)))
    images = torch.stack([test_ds[int(i)][0][0] for i in first])
    cams = predicted_class_cams(model, images, probs[first])
    titles = [f"{names[int(targets[i] >= 0.5)]}: p={probs[i]:.2f}" for i in first]
    save_figure(run_dir, "gradcam", cam_overlay_figure(images[:, 0].numpy(), cams, titles))


def nodule_masks(shape: tuple[int, int], diameters_px: np.ndarray, margin: float = 2.0):
    """(N, H, W) discs at the crop's centre, each the nodule's radius + `margin` pixels."""
    rows, cols = np.mgrid[: shape[0], : shape[1]]
    distance = np.hypot(rows - (shape[0] - 1) / 2, cols - (shape[1] - 1) / 2)
    radius = np.asarray(diameters_px, dtype=float)[:, None, None] / 2 + margin
    return distance[None] <= radius


def cam_on_masks(cams: np.ndarray, masks: np.ndarray) -> pd.DataFrame:
    """Per map: its share inside the mask, the mask's share of the image, their ratio (the
    lift: 1 for a map spread evenly) and whether its peak is inside. Maps that are zero
    everywhere (Grad-CAM found no evidence for the class) get NaN."""
    total = cams.reshape(len(cams), -1).sum(axis=1)
    inside = (cams * masks).reshape(len(cams), -1).sum(axis=1)
    area = masks.reshape(len(masks), -1).mean(axis=1)
    flat = total <= 1e-12
    share = np.where(flat, np.nan, inside / np.maximum(total, 1e-12))
    peaks = cams.reshape(len(cams), -1).argmax(axis=1)
    peak_inside = masks.reshape(len(masks), -1)[np.arange(len(masks)), peaks]
    return pd.DataFrame(
        {
            "cam_share_in_nodule": share,
            "nodule_share_of_crop": area,
            "lift": share / area,
            "peak_in_nodule": np.where(flat, np.nan, peak_inside.astype(float)),
        }
    )


def nodule_cam_table(
    run_dir: Path, model, store: Path, test_idx: np.ndarray, probs: np.ndarray
) -> pd.DataFrame:
    """How much of each test crop's Grad-CAM map (its predicted class) falls on the nodule:
    tables/gradcam_nodule.csv per crop and the summary (returned, also as
    tables/gradcam_nodule_summary). Generated crops only: centred, diameter known."""
    from lungbench.data.store import read_meta
    from lungbench.data.synth2d import NODULE_SPACING_MM
    from lungbench.train.cam import stage_layer_for_size

    data = StoreDataset(store, cache=True)
    images = torch.stack([data[int(i)][0][0] for i in test_idx])
    meta = read_meta(store)
    cams = predicted_class_cams(model, images, probs)
    masks = nodule_masks(images.shape[-2:], meta["diameter"][test_idx] / NODULE_SPACING_MM)
    per_crop = cam_on_masks(cams, masks)
    per_crop.insert(0, "id", meta["id"][test_idx])
    per_crop.insert(1, "label", data.labels[test_idx])
    per_crop.insert(2, "p_malignant", probs)
    write_table(run_dir, "gradcam_nodule", per_crop, index=False)
    layer = stage_layer_for_size(model, (images,), CAM_MIN_SIZE)
    summary = pd.DataFrame(
        [
            {
                "layer": layer,
                "crops": len(per_crop),
                "flat maps": int(per_crop["lift"].isna().sum()),
                "median CAM share on nodule": per_crop["cam_share_in_nodule"].median(),
                "median nodule share of crop": per_crop["nodule_share_of_crop"].median(),
                "median lift": per_crop["lift"].median(),
                "peaks on nodule": per_crop["peak_in_nodule"].mean(),
            }
        ]
    )
    write_table(run_dir, "gradcam_nodule_summary", summary, index=False)
    return summary


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
