"""Layer 11 (experiments): the recipe of `lungbench train lungx-cv`: seed 000's 3-fold cross-validation on LUNGx, three regimes.

Per fold one subset is the test set, 10% of the other two the validation set and the rest
the training set. Regimes (the thesis):

    LIDC only          the LIDC pre-trained model evaluated as is
    w/o pre-training   dualpath3d trained from scratch on LUNGx
    w/ pre-training    the LIDC model fine-tuned on LUNGx

Outputs in the thesis's layouts: the AUC table (rows: regimes; columns: fold 1-3, average),
a confusion matrix with totals per regime (threshold 0.5, pooled over the folds), loss curves
per fold and ROC curves.

Folds: stratified k-fold seeded by --seed, except that a user's --store whose /meta/fold
assigns exactly --folds folds keeps those. The generated default store (a cache in OUT/data/
shared by runs with any --seed) is never given folds, so each run's folds follow its --seed.

    lungbench train lungx-cv --quick
    lungbench train lungx-cv --pretrained results/RUN/checkpoint_best.pt --store lungx.h5
    lungbench train lungx-cv --resume results/RUN        continue a stopped run

Each fold (its three regimes) and the pre-training append a record as they finish, and the
tables are built from the records: a stopped run has the AUC and confusion tables of the
folds that finished, and --resume RUN runs the others (unfinished fits continue from their
checkpoints; lungbench.experiments.resumable).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd

from lungbench.core.errors import UsageError
from lungbench.core.options import (
    nested,
    option,
    positive_float,
    positive_int,
    replaced,
    unit_fraction,
)
from lungbench.core.runs import append_record, read_records, save_figure, write_table
from lungbench.data.splits import (
    Split,
    check_fold_classes,
    cv_splits,
    stored_folds,
    stratified_kfold,
)
from lungbench.data.store import StoreInfo, read_meta, write_folds
from lungbench.experiments import common3d, lidc_pretrain
from lungbench.experiments.resumable import ResumePoint, checkpoint_to_resume
from lungbench.models import create_model
from lungbench.report.training import auc_table, confusion_table, loss_curves_plot, roc_plot
from lungbench.train.checkpoint import load_model_from_checkpoint
from lungbench.train.config import TrainConfig
from lungbench.train.engine import METRICS_FILE, FitOptions, fit, infer, seed_everything
from lungbench.train.metrics import classification_metrics

log = logging.getLogger(__name__)  # progress: the CLI shows it on stderr

NAME = "lungx-cv"
REGIMES = {
    "lidc_only": "LIDC only",
    "without_pretraining": "w/o pre-training",
    "with_pretraining": "w/ pre-training",
}
MODEL = lidc_pretrain.MODEL


DATA = "data and model"  # the --help section of the options below


@dataclasses.dataclass(frozen=True, kw_only=True)
class CVConfig:
    """What lungx-cv does (saved as config.json); the fields with option(...) are the
    command's options, with FULL and QUICK as their defaults."""

    store: str | None = option(
        None,
        group=DATA,
        default_text="generated LUNGx-like nodules, where both classes have the same sizes, "
        "cached in OUT/data/",
        help="LUNGx nodule store",
    )
    synth_n: int = option(
        73,
        type=positive_int,
        group=DATA,
        default_note="the challenge's count",
        help="generated LUNGx nodules when no --store",
    )
    folds: int = option(
        3,
        type=positive_int,
        group=DATA,
        help="cross-validation folds, stratified and seeded by --seed; a --store whose "
        "/meta/fold assigns exactly these folds keeps its own",
    )
    val_fraction: float = option(
        0.1, type=unit_fraction, group=DATA, help="validation share of the non-test folds"
    )
    write_folds: bool = option(
        False,
        group=DATA,
        default_text="no",
        default_note="needs --store",
        help="save the seeded fold assignment into --store's /meta/fold, so that later "
        "runs on it keep these folds whatever their --seed",
    )
    pretrained: str | None = option(
        None,
        group=DATA,
        default_text="run lidc-pretrain first",
        help="LIDC checkpoint of dualpath3d (checkpoint_best.pt of lidc-pretrain)",
    )
    finetune_lr: float = option(
        type=positive_float, group=DATA, help="learning rate of the w/ pre-training regime"
    )
    quick: bool = False
    train: TrainConfig = nested(TrainConfig, group="training", show=common3d.TRAIN_OPTIONS)

    def __post_init__(self) -> None:
        if not self.finetune_lr > 0:
            raise UsageError(f"--finetune-lr must be > 0, got {self.finetune_lr}")
        if self.write_folds and self.store is None:
            raise UsageError(
                "--write-folds needs --store: the generated default store is a cache shared "
                "by runs with any --seed and keeps no folds (each run's folds are in its "
                "tables/predictions.csv)"
            )


FULL = CVConfig(
    finetune_lr=1e-4, train=TrainConfig(epochs=30, batch_size=8, telemetry_interval=1.0)
)
QUICK = replaced(FULL, {"epochs": 2, "lr": 3e-3, "synth_n": 36, "finetune_lr": 1e-3, "quick": True})


def fold_assignment(cfg: CVConfig, info: StoreInfo) -> tuple[np.ndarray, str]:
    """(folds, how they were made): a user's --store keeps its folds if it assigns exactly
    cfg.folds; otherwise stratified folds seeded by --seed (saved into --store with
    --write-folds). The generated default store (cfg.store None) is a cache shared by runs
    with any seed: its folds are neither read nor written, so they follow --seed."""
    k, seed = cfg.folds, cfg.train.seed
    if cfg.store is not None:
        folds = stored_folds(info.path, k)
        if folds is not None:
            log.info(f"using the {k} folds stored in {info.path} (not --seed)")
            return folds, f"stored in {info.path}"
    how = f"stratified {k}-fold, seed {seed}"
    folds = stratified_kfold(read_meta(info.path)["label"], k, seed)
    if cfg.write_folds and cfg.store is not None:
        write_folds(info.path, folds, how=how)
        log.info(f"saved the folds ({how}) into {info.path}")
    return folds, how


def check_pretrained(path: str, info: StoreInfo) -> dict:
    """The checkpoint's model options; UsageError if it is not dualpath3d on the store's grid."""
    _, ckpt = load_model_from_checkpoint(path, expected_model_name=MODEL)
    kwargs = dict(ckpt.get("model_kwargs") or {})
    preset = common3d.nodule_preset(info)
    if kwargs.get("preset", "default") != preset:
        raise UsageError(
            f"--pretrained {path}: made for the {kwargs.get('preset')!r} grid, "
            f"but --store {info.path} is on the {preset!r} grid"
        )
    return kwargs


def run_fold(
    cfg: CVConfig,
    info: StoreInfo,
    split: Split,
    pretrained: str,
    kwargs: dict,
    fold_dir: Path,
    resume: ResumePoint | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, pd.DataFrame]]:
    """The three regimes on one fold: test probabilities and training histories per regime
    (a resumed run's fits continue from their checkpoints)."""
    train_ds = common3d.split_dataset(info, split.train)
    val_ds = common3d.split_dataset(info, split.val)
    test_ds = common3d.split_dataset(info, split.test)
    meta = {"model_name": MODEL, "model_kwargs": kwargs, "fold": split.fold}
    probs, histories = {}, {}
    lidc_model, _ = load_model_from_checkpoint(pretrained, expected_model_name=MODEL)
    probs["lidc_only"], _ = infer(lidc_model, test_ds, cfg.train.batch_size, cfg.train.device)

    seed_everything(cfg.train.seed + split.fold)
    scratch = create_model(MODEL, **kwargs)
    result = fit(
        scratch,
        train_ds,
        val_ds,
        cfg.train,
        run_dir=fold_dir / "without_pretraining",
        resume=checkpoint_to_resume(fold_dir / "without_pretraining", resume),
        options=FitOptions(checkpoint_meta=meta),
    )
    histories["without_pretraining"] = result.history
    probs["without_pretraining"], _ = infer(
        scratch, test_ds, cfg.train.batch_size, cfg.train.device
    )

    finetune_cfg = dataclasses.replace(cfg.train, lr=cfg.finetune_lr)
    tuned, _ = load_model_from_checkpoint(pretrained, expected_model_name=MODEL)
    result = fit(
        tuned,
        train_ds,
        val_ds,
        finetune_cfg,
        run_dir=fold_dir / "with_pretraining",
        resume=checkpoint_to_resume(fold_dir / "with_pretraining", resume),
        options=FitOptions(checkpoint_meta=meta),
    )
    histories["with_pretraining"] = result.history
    probs["with_pretraining"], _ = infer(tuned, test_ds, cfg.train.batch_size, cfg.train.device)
    return probs, histories


def cross_validate(
    cfg: CVConfig,
    info: StoreInfo,
    folds: np.ndarray,
    pretrained: str,
    kwargs: dict,
    run_dir: Path,
    resume: ResumePoint | None = None,
) -> dict[str, pd.DataFrame]:
    """All folds and regimes (those a resumed run lacks), each fold appended to the records
    as it finishes; writes the tables and plots, returns the tables by name."""
    meta = read_meta(info.path)
    labels = meta["label"]
    splits = cv_splits(labels, cfg.folds, cfg.val_fraction, cfg.train.seed, folds=folds)
    done = resume.finished("fold", lambda r: int(r["fold"])) if resume else {}
    for split in splits:
        if split.fold + 1 in done:
            log.info(f"fold {split.fold + 1}/{cfg.folds}: done before")
            continue
        log.info(
            f"fold {split.fold + 1}/{cfg.folds}: {len(split.train)} train, {len(split.val)} "
            f"validation, {len(split.test)} test nodules"
        )
        fold_dir = run_dir / "folds" / f"fold{split.fold + 1}"
        probs, fold_histories = run_fold(cfg, info, split, pretrained, kwargs, fold_dir, resume)
        save_figure(
            run_dir,
            f"loss_fold{split.fold + 1}",
            loss_curves_plot(
                {REGIMES[r]: h for r, h in fold_histories.items()},
                f"Fold {split.fold + 1} ({common3d.data_word(info)})",
            ),
        )
        append_record(
            run_dir,
            {
                "kind": "fold",
                "fold": split.fold + 1,
                "id": meta["id"][split.test].tolist(),
                "label": labels[split.test].tolist(),
                "probability": {r: np.asarray(p).tolist() for r, p in probs.items()},
            },
        )
    return write_outputs(run_dir, info)


def write_outputs(run_dir: Path, info: StoreInfo) -> dict[str, pd.DataFrame]:
    """The AUC and confusion tables, predictions, metrics.csv and the ROC curves of the
    folds whose records are in the run (all of them when it completes, those that finished
    when it stops); the tables by name (none without a finished fold)."""
    records = {int(r["fold"]): r for r in read_records(run_dir) if r.get("kind") == "fold"}
    predictions, histories, aucs = [], [], {r: [] for r in REGIMES}
    for fold, record in sorted(records.items()):
        labels = np.asarray(record["label"])
        for regime, p in record["probability"].items():
            p = np.asarray(p, dtype=float)
            aucs[regime].append(classification_metrics(p, labels)["auc"])
            predictions.append(
                pd.DataFrame(
                    {
                        "fold": fold,
                        "regime": REGIMES[regime],
                        "id": record["id"],
                        "label": labels,
                        "probability": p,
                    }
                )
            )
        for regime in ("without_pretraining", "with_pretraining"):
            path = run_dir / "folds" / f"fold{fold}" / regime / METRICS_FILE
            if path.exists():
                histories.append(pd.read_csv(path).assign(fold=fold, regime=REGIMES[regime]))
    if not predictions:
        return {}
    pred = pd.concat(predictions, ignore_index=True)
    tables = {"auc": auc_table({REGIMES[r]: v for r, v in aucs.items()})}
    for regime, name in REGIMES.items():
        rows = pred[pred["regime"] == name]
        tables[f"confusion_{regime}"] = confusion_table(rows["label"], rows["probability"])
    for name, table in tables.items():
        write_table(run_dir, name, table)
    write_table(run_dir, "predictions", pred, index=False)
    if histories:
        pd.concat(histories, ignore_index=True).to_csv(run_dir / "metrics.csv", index=False)
    curves = {
        name: (
            pred.loc[pred["regime"] == name, "label"].to_numpy(),
            pred.loc[pred["regime"] == name, "probability"].to_numpy(),
        )
        for name in REGIMES.values()
    }
    save_figure(
        run_dir,
        "roc",
        roc_plot(curves, f"LUNGx test ROC, pooled over folds ({common3d.data_word(info)})"),
    )
    return tables


def _lidc_sizes(cfg: CVConfig) -> lidc_pretrain.PretrainConfig:
    """lidc-pretrain's config at this run's size: its QUICK with --quick, else its FULL."""
    return lidc_pretrain.QUICK if cfg.quick else lidc_pretrain.FULL


def lidc_store(
    cfg: CVConfig, preset: str, out: str | Path, data_seed: int = 0, store: str | None = None
) -> StoreInfo:
    """The store to pre-train on: `store` (--lidc-store, on the LUNGx store's grid `preset`)
    or generated LIDC-like nodules on that grid.

    The generated set uses --data-seed + 1, so that it never shares a seed (and thereby
    nodules) with the generated LUNGx-like store of the same run.
    """
    info = lidc_pretrain.nodule_store(
        store,
        _lidc_sizes(cfg).synth_n,
        "lidc",
        Path(out),
        data_seed + 1,
        NAME,
        preset=preset,
    )
    if common3d.nodule_preset(info) != preset:
        raise UsageError(
            f"--lidc-store {info.path}: on the {common3d.nodule_preset(info)!r} grid, but "
            f"the LUNGx store is on the {preset!r} grid; pre-train on the same grid"
        )
    return info


def _pretrain_first(
    cfg: CVConfig, info: StoreInfo, run_dir: Path, resume: ResumePoint | None = None
) -> str:
    """Run lidc-pretrain on `info` into RUN/lidc_pretrain/ and return its best checkpoint
    (a resumed run's finished pre-training is used again, an unfinished one continued)."""
    done = resume.finished("pretrain", lambda r: "pretrain") if resume else {}
    if "pretrain" in done and Path(done["pretrain"]["checkpoint"]).is_file():
        log.info(f"pre-training done before: {done['pretrain']['checkpoint']}")
        return done["pretrain"]["checkpoint"]
    sizes = _lidc_sizes(cfg)
    train = dataclasses.replace(
        cfg.train, epochs=sizes.train.epochs, batch_size=16, lr=sizes.train.lr
    )
    pcfg = lidc_pretrain.PretrainConfig(
        train=train,
        store=str(info.path),
        synth_n=sizes.synth_n,
        preset=common3d.nodule_preset(info),
        filters=sizes.filters,
        depth=sizes.depth,
        quick=cfg.quick,
    )
    sub = run_dir / "lidc_pretrain"
    (sub / "tables").mkdir(parents=True, exist_ok=True)
    (sub / "plots").mkdir(exist_ok=True)
    log.info("no --pretrained checkpoint: pre-training on LIDC first")
    last = checkpoint_to_resume(sub, resume)
    result = lidc_pretrain.pretrain(pcfg, info, sub, resume=str(last) if last else None)
    write_table(run_dir, "pretrain_summary", result.summary)
    append_record(run_dir, {"kind": "pretrain", "checkpoint": str(result.checkpoint)})
    return str(result.checkpoint)


@dataclasses.dataclass
class CVRun:
    """What a lungx-cv run produced."""

    run_dir: Path
    tables: dict[str, pd.DataFrame]  # "auc" and "confusion_<regime>"
    data: str
    folds: str  # how the folds were made
    wall_s: float


def run(
    cfg: CVConfig,
    out: str | Path,
    run_id: str | None = None,
    data_seed: int = 0,
    lidc_store_path: str | None = None,
    resume: ResumePoint | None = None,
) -> CVRun:
    """The three regimes over the folds into OUT/<run-id>/ (pre-training on LIDC first when
    `cfg.pretrained` is None, from `lidc_store_path` or generated nodules); with `resume`,
    the folds (and pre-training) that run folder lacks."""
    started = time.perf_counter()
    if cfg.pretrained:  # a wrong file or architecture fails before any data is generated
        load_model_from_checkpoint(cfg.pretrained, expected_model_name=MODEL)
    info = lidc_pretrain.nodule_store(cfg.store, cfg.synth_n, "lungx", Path(out), data_seed, NAME)
    folds, folds_how = fold_assignment(cfg, info)
    # A fold without both classes ends in a NaN AUC: refuse it before any run folder exists.
    check_fold_classes(read_meta(info.path)["label"], folds, info.label_names, info.path)
    kwargs = check_pretrained(cfg.pretrained, info) if cfg.pretrained else None
    # Without --pretrained, pre-train on the LUNGx store's grid (checked or generated now,
    # not after a whole pre-training).
    preset = common3d.nodule_preset(info)
    lidc = None if cfg.pretrained else lidc_store(cfg, preset, out, data_seed, lidc_store_path)
    note = common3d.data_note(info)
    config = common3d.store_run_config(
        NAME, cfg, info, data_seed, lidc_store=lidc_store_path, folds=folds_how
    )
    with common3d.training_run(
        out,
        run_id,
        config,
        note,
        resume=resume,
        on_stop=lambda run_dir: write_outputs(run_dir, info),
    ) as folder:
        log.info(f"config: {cfg}")
        pretrained = cfg.pretrained or _pretrain_first(cfg, lidc, folder.path, resume)
        kwargs = kwargs or check_pretrained(pretrained, info)
        tables = cross_validate(cfg, info, folds, pretrained, kwargs, folder.path, resume)
        wall = time.perf_counter() - started
        folder.summary.update(wall_s=wall, pretrained=pretrained, folds=folds_how)
    return CVRun(folder.path, tables, note, folds_how, wall)
