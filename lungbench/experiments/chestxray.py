"""Layer 11 (experiments): `lungbench train chestxray`: seed 004's transfer-learning study on chest radiographs.

For every pretrained-weights source x transfer method (A head only, B freeze up to a stage
boundary at each depth, C all layers from the weights; D from random init, once), train a
multi-label classifier with seed 004's weighted BCE in k-fold cross-validation (stratified on
each image's rarest finding, "no finding" a class of its own; 10% of each training part for
validation; early-stopping picks the best epoch) and evaluate binary accuracy and the mean
AUC over labels on the held-out fold. Then time one short training per method for the cost
table (time per epoch, trainable parameters, memory, GPUs needed).

    lungbench train chestxray --quick                  generated X-rays, about 2 minutes on 2 cores
    lungbench train chestxray --weights ImageNet=resnet50-imagenet.pth --store cxr.h5
    lungbench train chestxray --cost-only --quick      the cost table alone
    lungbench train chestxray --resume results/RUN     continue a stopped run

--quick shrinks the grid, not only the data: 2 folds, one B depth (the middle stage
boundary) instead of every one, so A, B, C and D are each trained twice (8 fits, not 30).

Outputs in results/<run-id>/: tables/methods_binary_accuracy, tables/methods_auc (rows:
weights, columns: methods, "mean% (+/- std%)"), tables/folds (every fold), tables/cost_<model>,
plus run.json, config.json, environment.json, records.jsonl, data/ (generated stores),
pretrain/ (the checkpoint of the generated-data pretraining when no --weights are given) and,
with --save-models, models/ (every fold's best model, the next link of a weight chain).
Options, the store, the folds and every --weights file are checked before the run folder is
made; a run that fails later is marked "failed" in run.json. Every fit, the pretraining and
each cost table append a record to records.jsonl as they finish, and the tables are built
from the records: a stopped run (Ctrl-C, SIGTERM, an error) has the tables of the fits that
finished, and --resume RUN trains only the fits it lacks (lungbench.experiments.resumable).
"""

from __future__ import annotations

import logging
import re
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from torch.utils.data import Subset
from tqdm import tqdm

from lungbench.core.errors import UsageError
from lungbench.core.options import nested, option, positive_int, replaced, unit_fraction
from lungbench.core.runs import append_record, markdown, read_records, write_table
from lungbench.data.splits import Split, cv_splits
from lungbench.data.store import StoreDataset, StoreInfo, read_info
from lungbench.experiments import common2d as c2d
from lungbench.experiments import common3d as c3d
from lungbench.experiments.resumable import ResumePoint, checkpoint_to_resume
from lungbench.train.checkpoint import save_checkpoint
from lungbench.train.config import TrainConfig
from lungbench.train.engine import FitOptions, fit, infer
from lungbench.train.losses import WeightedBCE
from lungbench.train.metrics import classification_metrics
from lungbench.train.transfer import Method

log = logging.getLogger(__name__)  # progress: the CLI shows it on stderr

NAME = "chestxray"
# The --help sections of the options below.
DATA, MODEL, TRAINING, COST = (
    "data",
    "model and methods",
    "training (seed 004: Adam, lr 1e-4, 30 epochs)",
    "cost table",
)


def _per_label(text: str) -> bool:
    return text == "per-label"


@dataclass(frozen=True, kw_only=True)
class ChestXrayConfig:
    """Everything the run does (saved to config.json); the fields with option(...) are the
    command's options, with FULL and QUICK as their defaults."""

    store: str | None = option(
        None,
        group=DATA,
        default_text="generated chest X-rays in the run's data/",
        help="multi-label image store",
    )
    n: int = option(type=positive_int, group=DATA, help="generated images")
    image_size: int = option(
        type=positive_int, group=DATA, help="generated image size in pixels, >= 32"
    )
    labels: tuple[str, ...] = option(
        (),
        nargs="+",
        group=DATA,
        default_text="all of them",
        help="train on these labels of the store only",
    )
    model: str = option(
        choices=c2d.BACKBONES,
        group=MODEL,
        default_note="with Keras-compatible conv biases",
        help="network",
    )
    methods: tuple[str, ...] = option(
        ("A", "B", "C", "D"),
        nargs="+",
        group=MODEL,
        help="transfer methods: A, B (every --freeze depth) or B_<depth>, C, D",
    )
    freeze: tuple[str, ...] = option(  # B_k depths asked for; () = the seed's
        (),
        nargs="+",
        group=MODEL,
        default_text="resnet50 10 22 40, densenet121 14 39 88, other networks every stage "
        "boundary; --quick: the middle one of those",
        help="B depths: layer counts or stage names",
    )
    weights: tuple[tuple[str, str], ...] = option(
        (),
        action="append",
        metavar="NAME=PATH",
        group=MODEL,
        convert=c2d.parse_weights,
        default_text="pretrain on generated nodule slices",
        help="a pretrained-weights source (repeat for several)",
    )
    dropout: float = option(0.2, type=float, group=MODEL, help="dropout before the output layer")
    train: TrainConfig = nested(
        TrainConfig,
        group=TRAINING,
        show={
            "epochs": {"help": "epochs per fold"},
            "batch_size": {"aliases": ("--batch-size",)},  # --batch, as every command
            "lr": {},
            "patience": {},
            "device": {},
            "telemetry_interval": {},
            "num_workers": {},
            "seed": {},
        },
    )
    folds: int = option(
        5,
        type=positive_int,
        group=TRAINING,
        help="cross-validation folds, >= 2, stratified by each image's rarest finding",
    )
    quick: bool = False  # --quick: one B depth (the middle one) unless --freeze says
    val_fraction: float = option(
        0.1, type=unit_fraction, group=TRAINING, help="validation share of each training part"
    )
    per_label_weights: bool = option(
        False,
        flag="--class-weights",
        choices=("dataset", "per-label"),
        convert=_per_label,
        group=TRAINING,
        default_text="dataset",
        help="weighted BCE's beta_P/beta_N: 'dataset' counts the 1s and 0s of all labels "
        "together, as seed 004 defines them; 'per-label' gives each finding its own",
    )
    save_models: bool = option(
        False,
        group=TRAINING,
        help="keep every fold's best model as models/<weights>_<method>_fold<k>.pt, to start "
        "a weight chain from (--weights ChestX-ray8=that file in a later run)",
    )
    pretrain_epochs: int = option(
        type=positive_int,
        group=TRAINING,
        help="epochs of generated-data pretraining without --weights",
    )
    cost_only: bool = option(
        False, group=COST, help="only measure the cost table (for --cost-models), no CV"
    )
    cost_models: tuple[str, ...] = option(
        ("resnet50", "densenet121"),
        nargs="+",
        choices=c2d.BACKBONES,
        group=COST,
        help="networks of --cost-only",
    )
    cost_samples: int = option(
        type=positive_int, group=COST, help="training samples per timed epoch"
    )
    cost_epochs: int = option(
        type=positive_int, group=COST, help="timed epochs per method, the first is warm-up"
    )
    gpu_memory_gb: float = option(
        16.0, type=float, group=COST, help="memory per GPU for the 'min GPUs' column"
    )
    generated: bool = field(init=False)  # no store: generated chest X-rays

    def __post_init__(self) -> None:
        object.__setattr__(self, "generated", self.store is None)
        if not 0.0 <= self.dropout < 1.0:
            raise UsageError(f"--dropout must be in [0, 1), got {self.dropout}")
        if self.gpu_memory_gb <= 0:
            raise UsageError(f"--gpu-memory-gb must be > 0, got {self.gpu_memory_gb}")
        if self.folds < 2:
            raise UsageError(
                f"--folds must be >= 2 (each fold is the test set once), got {self.folds}"
            )
        if self.generated:
            if self.image_size < 32:
                raise UsageError(
                    "--image-size must be >= 32 pixels (the networks downsample 32x), "
                    f"got {self.image_size}"
                )
            if self.folds > self.n:
                raise UsageError(f"--folds {self.folds} is more than the {self.n} images (--n)")


FULL = ChestXrayConfig(
    model="resnet50",
    n=400,
    image_size=64,
    pretrain_epochs=5,
    cost_samples=64,
    cost_epochs=3,
    train=TrainConfig(
        epochs=30,
        lr=1e-4,  # seed 004: Adam (TrainConfig's optimizer) at 1e-4
        progress=False,  # dozens of fits (methods x folds); each prints its own summary
        log_epochs=False,
        tensorboard=False,
        telemetry_interval=1.0,  # fits with a folder: the pretraining
    ),
)
# Quick: every table of the full run from 8 short fits (2 folds x A, one B, C, D), not 30.
QUICK = replaced(
    FULL,
    {
        "model": "resnet18",
        "n": 60,
        "image_size": 32,
        "epochs": 1,
        "batch_size": 8,
        "folds": 2,
        "pretrain_epochs": 1,
        "cost_samples": 16,
        "cost_epochs": 2,
        "quick": True,
    },
)


@dataclass
class ChestXrayRun:
    """What a chestxray run produced: its folder and the tables to show, as text."""

    run_dir: Path
    sections: list[str]


def methods_of(cfg: ChestXrayConfig) -> list[Method]:
    """The methods to train, B expanded into its depths (with --quick and no --freeze only
    the middle one of the default depths)."""
    methods = c2d.expand_methods(cfg.model, cfg.methods, list(cfg.freeze) or None)
    depths = [m for m in methods if m.name == "B"]
    if cfg.quick and not cfg.freeze and len(depths) > 1:
        middle = depths[(len(depths) - 1) // 2]
        methods = [m for m in methods if m.name != "B" or m == middle]
    return methods


def run(
    cfg: ChestXrayConfig,
    out: str | Path,
    run_id: str | None = None,
    resume: ResumePoint | None = None,
) -> ChestXrayRun:
    """The methods x weights cross-validation and the cost tables into OUT/<run-id>/ (or,
    with `resume`, the fits and tables that run folder lacks)."""
    # Everything the user gave is checked before the run folder exists: methods and freeze
    # depths, the store, labels and folds, and that every --weights file loads into the
    # chosen network.
    methods = [] if cfg.cost_only else methods_of(cfg)
    if cfg.store is not None:
        info = _check_store(Path(cfg.store))
        columns = c2d.select_labels(info.label_names, cfg.labels, str(info.path))
        in_channels = info.inputs["image"][0]
        if not cfg.cost_only:
            _splits(StoreDataset(info.path).labels[:, columns], cfg)
    else:
        from lungbench.data.synth2d import FINDINGS

        columns = c2d.select_labels(FINDINGS, cfg.labels, "the generated chest X-rays")
        in_channels = 1
    if not cfg.cost_only:
        kwargs = c2d.model_kwargs(cfg.model, in_channels, len(columns), cfg.dropout)
        c2d.check_weights(cfg.model, kwargs, cfg.weights)
    # a later failure marks the run "failed", a stop "interrupted"; either way the tables of
    # the fits that finished are written first
    with c3d.training_run(
        out,
        run_id,
        {"chestxray": asdict(cfg)},
        _data_note(cfg),
        resume=resume,
        on_stop=lambda run_dir: write_tables(run_dir, cfg, methods),
    ) as folder:
        log.info(f"config: {cfg}")
        sections = _experiment(cfg, methods, folder.path, resume)
    return ChestXrayRun(folder.path, sections)


def _experiment(
    cfg: ChestXrayConfig, methods: list[Method], run_dir: Path, resume: ResumePoint | None
) -> list[str]:
    """Run the study into `run_dir` (what a resumed run lacks); the tables to show, as text."""
    store = _store(cfg, run_dir)
    info = _check_store(store)
    columns = c2d.select_labels(info.label_names, cfg.labels, str(store))
    dataset = c2d.LabelColumns(StoreDataset(store, cache=True), columns)
    labels = dataset.dataset.labels[:, columns]
    names = [info.label_names[i] for i in columns]
    sample_shape = info.inputs["image"]
    costs = {r["model"] for r in (resume.records if resume else []) if r.get("kind") == "cost"}
    if cfg.cost_only:
        for model_name in cfg.cost_models:
            if model_name not in costs:
                _record_cost(
                    run_dir, model_name, cost_table(model_name, cfg, dataset, labels, sample_shape)
                )
        return write_tables(run_dir, cfg, methods, names)
    sources = list(cfg.weights) or [_pretrain(cfg, run_dir, sample_shape, resume)]
    cross_validate(cfg, dataset, labels, sample_shape, methods, sources, run_dir, resume)
    if cfg.model not in costs:
        cost = cost_table(cfg.model, cfg, dataset, labels, sample_shape, methods)
        _record_cost(run_dir, cfg.model, cost)
    return write_tables(run_dir, cfg, methods, names)


def fit_key(record: dict) -> tuple[str, str, int]:
    """(weights, method, fold): what a fold record is the result of."""
    return (str(record["weights"]), str(record["method"]), int(record["fold"]))


def write_tables(
    run_dir: Path,
    cfg: ChestXrayConfig,
    methods: list[Method],
    names: list[str] | None = None,
) -> list[str]:
    """Every table from the run's records (the fits and cost tables that finished): folds,
    methods_binary_accuracy and methods_auc (rows: weights, columns: methods), cost_<model>;
    the tables to show, as text (`names`: the labels trained on)."""
    records = read_records(run_dir)
    note = _data_note(cfg)
    sections = []
    fits = {fit_key(r): r for r in records if r.get("kind") == "fold"}
    if fits and not cfg.cost_only:
        sections += _methods_tables(run_dir, cfg, methods, list(fits.values()), names, note)
    costs = {r["model"]: r["rows"] for r in records if r.get("kind") == "cost"}
    for model_name, rows in costs.items():
        sections.append(_write_cost(run_dir, model_name, pd.DataFrame(rows), cfg, note))
    return sections


def _methods_tables(
    run_dir: Path,
    cfg: ChestXrayConfig,
    methods: list[Method],
    fits: list[dict],
    names: list[str] | None,
    note: str,
) -> list[str]:
    columns = ["weights", "method", "fold", *FOLD_COLUMNS]
    folds = pd.DataFrame([{k: r.get(k) for k in columns} for r in fits], columns=columns)
    write_table(run_dir, "folds", folds, index=False)
    shown = [m.label for m in methods if m.name != "D"]
    source_names = list(dict.fromkeys(folds.loc[folds["method"] != "D", "weights"]))
    source_names = [s for s, _ in cfg.weights] or source_names or [PRETRAINED_HERE]
    has_d = any(m.name == "D" for m in methods)
    planned = cfg.folds * (len(source_names) * len(shown) + has_d)
    done = "" if len(folds) >= planned else f"; {len(folds)} of {planned} fits finished"
    labels = f", labels {', '.join(names)}" if names else ""
    sections = []
    for metric, title in (("binary_accuracy", "Binary accuracy"), ("auc", "AUC")):
        table = c2d.methods_table(folds, metric, shown, source_names)
        if has_d:
            table["D"] = ""
            d_rows = folds[folds["method"] == "D"]
            table.loc[RANDOM_INIT] = [""] * len(shown) + [
                c2d.mean_std_cell(d_rows[metric].tolist()) if len(d_rows) else ""
            ]
        write_table(run_dir, f"methods_{metric}", table)
        sections.append(
            f"{title} on the test folds, {cfg.model}, {cfg.folds}-fold CV{labels} "
            f"({note}{done}):\n{markdown(table)}"
        )
    return sections


def _check_store(path: Path) -> StoreInfo:
    """The store's info if it is a multi-label store of 2D images, else UsageError."""
    info = read_info(path)
    hint = "`lungbench data images` with a ChestX-ray8 CSV, or leave out --store"
    c2d.require_image(info, NAME, hint)
    if info.task != "multilabel":
        raise UsageError(
            f"--store {info.path}: a {info.kind!r} store with task {info.task!r}; "
            f"{NAME} needs a multi-label store ({hint})"
        )
    return info


def fold_strata(labels: np.ndarray, folds: int) -> np.ndarray:
    """A class per image to stratify the folds on: its rarest finding, K for no finding.

    A stratum too small to put an image in every test fold and leave two in every training
    part (where the validation images are drawn, stratified again) is merged into the
    largest stratum, smallest first, so rare findings never make the split impossible.
    """
    labels = np.asarray(labels) > 0
    frequency = labels.sum(axis=0)
    rank = np.where(labels, frequency[None, :], np.inf)
    key = np.where(labels.any(axis=1), np.argmin(rank, axis=1), labels.shape[1])
    while True:
        classes, counts = np.unique(key, return_counts=True)
        fits = (counts >= folds) & (counts - np.ceil(counts / folds) >= 2)
        if fits.all() or len(classes) == 1:
            return key
        key[key == classes[np.argmin(counts)]] = classes[np.argmax(counts)]


def _splits(labels: np.ndarray, cfg: ChestXrayConfig) -> list[Split]:
    """Stratified k folds with `val_fraction` of each training part for validation."""
    if cfg.folds > len(labels):
        raise UsageError(f"--folds {cfg.folds} is more than the {len(labels)} images")
    strata = fold_strata(labels, cfg.folds)
    return cv_splits(strata, cfg.folds, cfg.val_fraction, cfg.train.seed)


def _data_note(cfg: ChestXrayConfig) -> str:
    return "generated chest X-rays (not ChestX-ray8)" if cfg.generated else str(cfg.store)


def _store(cfg: ChestXrayConfig, run_dir: Path) -> Path:
    from lungbench.data.synth2d import write_chestxray_store

    def generate(path: Path, progress) -> None:
        write_chestxray_store(
            path, cfg.n, seed=cfg.train.seed, size=cfg.image_size, progress=progress
        )
        log.info(f"data: {cfg.n} generated chest X-rays, {cfg.image_size}x{cfg.image_size}")

    path = run_dir / "data" / "chestxray-synth.h5"
    return c2d.store_or_generated(cfg.store, path, cfg.n, ("chest X-rays", "image"), generate)


def _pretrain(
    cfg: ChestXrayConfig, run_dir: Path, sample_shape, resume: ResumePoint | None
) -> tuple[str, str]:
    """No --weights: pretrain on generated nodule slices (a weight chain's first link); a
    resumed run's finished pretraining is used again, an unfinished one continued."""
    from lungbench.data.synth2d import write_nodule2d_store

    done = resume.finished("pretrain", lambda r: "pretrain") if resume else {}
    if "pretrain" in done and Path(done["pretrain"]["checkpoint"]).is_file():
        log.info(f"pretraining done before: {done['pretrain']['checkpoint']}")
        return PRETRAINED_HERE, done["pretrain"]["checkpoint"]
    path = run_dir / "data" / "nodule2d-synth.h5"
    n = max(2 * cfg.train.batch_size, cfg.n // 2)
    if not path.exists():
        write_nodule2d_store(path, n, seed=cfg.train.seed + 1, size=sample_shape[-1])
    ds = StoreDataset(path, cache=True)
    val = max(2, n // 10)
    kwargs = c2d.model_kwargs(cfg.model, sample_shape[0], 1, cfg.dropout)
    built = c2d.build_transfer_model(cfg.model, kwargs, Method("D"), None, cfg.train.seed)
    log.info(
        f"pretraining {cfg.model} on {n} generated nodule slices for {cfg.pretrain_epochs} "
        "epoch(s) (no --weights given)"
    )
    result = fit(
        built.model,
        Subset(ds, range(val, n)),
        Subset(ds, range(val)),
        replace(cfg.train, epochs=cfg.pretrain_epochs),
        run_dir=run_dir / "pretrain",
        resume=checkpoint_to_resume(run_dir / "pretrain", resume),
        options=FitOptions(
            checkpoint_meta={
                "model_name": cfg.model,
                "model_kwargs": kwargs,
                "weights_chain": [],
                "data": "generated nodule slices",
            }
        ),
    )
    append_record(run_dir, {"kind": "pretrain", "checkpoint": str(result.best_checkpoint)})
    return PRETRAINED_HERE, str(result.best_checkpoint)


PRETRAINED_HERE = "generated nodules (pretrained here)"
RANDOM_INIT = "none (random init)"
# A fold record's results, after its key (weights, method, fold): the columns of folds.csv.
FOLD_COLUMNS = (
    "binary_accuracy",
    "auc",
    "best_epoch",
    "best_val_loss",
    "mean_epoch_s",
    "trainable_parameters",
    "n_train",
    "n_val",
    "n_test",
)


@dataclass(frozen=True)
class _Study:
    """What every fit of the cross-validation shares: the configuration, the labelled
    images, the model's arguments and the run folder."""

    cfg: ChestXrayConfig
    dataset: Any
    labels: np.ndarray
    kwargs: dict
    run_dir: Path


def cross_validate(
    cfg: ChestXrayConfig,
    dataset,
    labels: np.ndarray,
    sample_shape,
    methods: list[Method],
    sources: list[tuple[str, str]],
    run_dir: Path,
    resume: ResumePoint | None = None,
) -> pd.DataFrame:
    """Every (weights source, method, fold) -> one row with test binary accuracy and AUC,
    appended to the run's records as it finishes (a resumed run's finished fits are kept)."""
    splits = _splits(labels, cfg)
    kwargs = c2d.model_kwargs(cfg.model, sample_shape[0], labels.shape[1], cfg.dropout)
    study = _Study(cfg, dataset, labels, kwargs, run_dir)
    pairs = [(s, m) for s in sources for m in methods if m.name != "D"]
    if any(m.name == "D" for m in methods):
        pairs.append(((RANDOM_INIT, None), Method("D")))
    done = resume.finished("fold", fit_key) if resume else {}
    rows = []
    total = len(pairs) * len(splits)
    with tqdm(total=total, desc="cross-validation", unit="fit", file=sys.stderr) as bar:
        for (source, weights), method in pairs:
            for k, split in enumerate(splits, start=1):
                kept = done.get((source, method.label, k))
                if kept is not None:
                    rows.append(
                        {c: kept.get(c) for c in ("weights", "method", "fold", *FOLD_COLUMNS)}
                    )
                else:
                    bar.set_postfix_str(f"{source[:20]} {method.label} fold {k}")
                    rows.append(_fold_row(study, (source, weights), method, k, split))
                bar.update(1)
    if done:
        log.info(f"resumed: {len(done)} of {total} fits were done before")
    return pd.DataFrame(rows)


def _fold_row(
    study: _Study, source: tuple[str, str | None], method: Method, k: int, split: Split
) -> dict[str, Any]:
    """Train one method from one weights source on fold k, test it, record it; its row."""
    cfg, dataset = study.cfg, study.dataset
    name, weights = source
    built = c2d.build_transfer_model(cfg.model, study.kwargs, method, weights, cfg.train.seed + k)
    loss = WeightedBCE.from_labels(study.labels[split.train], cfg.per_label_weights)
    result = fit(
        built.model,
        Subset(dataset, split.train.tolist()),
        Subset(dataset, split.val.tolist()),
        cfg.train,
        options=FitOptions(loss_fn=loss),
    )
    test = Subset(dataset, split.test.tolist())
    probs, targets = infer(built.model, test, cfg.train.batch_size, cfg.train.device)
    metrics = classification_metrics(probs, targets)
    if cfg.save_models:
        _save_fold_model(study.run_dir, cfg, study.kwargs, name, method, k, built)
    row = {
        "weights": name,
        "method": method.label,
        "fold": k,
        "binary_accuracy": metrics["accuracy"],
        "auc": metrics["auc"],
        "best_epoch": result.best_epoch,
        "best_val_loss": result.best_val_loss,
        "mean_epoch_s": result.mean_epoch_s,
        "trainable_parameters": built.plan.trainable,
        "n_train": len(split.train),
        "n_val": len(split.val),
        "n_test": len(split.test),
    }
    chain = list(built.load.chain) if built.load else []
    append_record(study.run_dir, {"kind": "fold", **row, "weights_chain": chain})
    return row


def _save_fold_model(run_dir: Path, cfg, kwargs: dict, source: str, method: Method, fold, built):
    """models/<weights>_<method>_fold<k>.pt: a lungbench checkpoint a later run can load as
    --weights, carrying the chain of weights files this model started from."""
    slug = re.sub(r"[^A-Za-z0-9.-]+", "-", source).strip("-") or "weights"
    path = run_dir / "models" / f"{slug}_{method.label}_fold{fold}.pt"
    path.parent.mkdir(exist_ok=True)
    save_checkpoint(
        path,
        {
            "model_name": cfg.model,
            "model_kwargs": kwargs,
            "model": built.model.state_dict(),
            "weights_chain": list(built.load.chain) if built.load else [],
            "data": _data_note(cfg),
            "method": method.label,
            "fold": fold,
        },
    )


def cost_table(
    model_name: str,
    cfg: ChestXrayConfig,
    dataset,
    labels: np.ndarray,
    sample_shape,
    methods: list[Method] | None = None,
) -> pd.DataFrame:
    """Time training per method on the same `cost_samples` images (the seed's layout).

    Methods are interleaved: round r trains one epoch of every method, so load from other
    processes on a shared machine hits all methods alike; the first round is warm-up.
    """
    if methods is None:
        methods = c2d.expand_methods(model_name, ["A", "B", "C"], None)
    # C and D cost the same (only the starting weights differ): measure once, as the seed.
    unique: list[Method] = []
    for m in methods:
        if not (m.name in "CD" and any(u.name in "CD" for u in unique)):
            unique.append(m)
    n = min(cfg.cost_samples, len(dataset) - 2)
    # RGB input as the seed's ImageNet networks (grey images repeated to 3 channels), so the
    # first convolution, and with it the trainable counts of C/D, match the seed's table.
    rgb = c2d.RepeatChannels(dataset, 3)
    train_part, val_part = Subset(rgb, range(n)), Subset(rgb, range(n, n + 2))
    sample_shape = (3, *sample_shape[1:])
    kwargs = c2d.model_kwargs(model_name, 3, labels.shape[1], cfg.dropout)
    loss = WeightedBCE.from_labels(labels[:n], cfg.per_label_weights)
    config = replace(cfg.train, epochs=1, patience=None, restore_best=False)
    # Weights do not change the cost; a random init stands in for every source.
    built = [c2d.build_transfer_model(model_name, kwargs, m, None, cfg.train.seed) for m in unique]
    seconds: list[list[float]] = [[] for _ in unique]
    peaks = [0] * len(unique)
    with tqdm(
        total=cfg.cost_epochs * len(unique),
        desc=f"cost table {model_name}",
        unit="epoch",
        file=sys.stderr,
    ) as bar:
        for _ in range(cfg.cost_epochs):
            for i, b in enumerate(built):
                result = fit(
                    b.model, train_part, val_part, config, options=FitOptions(loss_fn=loss)
                )
                seconds[i].append(float(result.history["epoch_s"].iloc[-1]))
                if result.peak_memory_kind.startswith("cuda"):
                    peaks[i] = max(peaks[i], result.peak_memory_bytes)
                bar.update(1)
    rows = [
        c2d.cost_row(m, b, config, secs, [sample_shape], cfg.gpu_memory_gb, peak or None)
        for m, b, secs, peak in zip(unique, built, seconds, peaks, strict=True)
    ]
    for row in rows:
        log.info(
            f"cost {model_name} {row['method']}: {row['time_per_epoch_s']:.2f} s/epoch, "
            f"{row['trainable_parameters']:,} trainable"
        )
    return pd.DataFrame(rows)


def _record_cost(run_dir: Path, model_name: str, table: pd.DataFrame) -> None:
    """One cost table into the records (write_tables makes tables/cost_<model> of it)."""
    append_record(
        run_dir, {"kind": "cost", "model": model_name, "rows": table.to_dict(orient="records")}
    )


def _write_cost(
    run_dir: Path, model_name: str, table: pd.DataFrame, cfg: ChestXrayConfig, note: str
) -> str:
    """Write one cost table; its text."""
    write_table(run_dir, f"cost_{model_name}", table, index=False)
    shown = c2d.fmt_parameters(table)[
        [
            "method",
            "batch_size",
            "min_gpus",
            "time_per_epoch_s",
            "trainable_parameters",
            "peak_memory_mib",
        ]
    ]
    return (
        f"Computing resources when training {model_name} ({cfg.cost_samples} samples per "
        f"epoch, {note}, device {cfg.train.device}, min GPUs of {cfg.gpu_memory_gb:g} GB):\n"
        f"{markdown(shown, index=False)}"
    )
