"""Layer 9 (experiments): the recipe of `lungbench train lungx-cv`: seed 000's 3-fold cross-validation on LUNGx, three regimes.

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
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd

from lungbench.core.errors import UsageError
from lungbench.core.runs import save_figure, write_table
from lungbench.data.splits import Split, cv_splits, stored_folds, stratified_kfold
from lungbench.data.store import StoreInfo, read_meta, write_folds
from lungbench.experiments import common3d, lidc_pretrain
from lungbench.models import create_model
from lungbench.report.training import auc_table, confusion_table, loss_curves_plot, roc_plot
from lungbench.train.checkpoint import load_model_from_checkpoint
from lungbench.train.config import TrainConfig
from lungbench.train.engine import fit, predict, seed_everything
from lungbench.train.metrics import classification_metrics

log = logging.getLogger(__name__)  # progress: the CLI shows it on stderr

NAME = "lungx-cv"
FULL = {
    "epochs": 30,
    "batch_size": 8,
    "lr": 1e-3,
    "optimizer": "adam",
    "schedule": "constant",
    "patience": None,
    "synth_n": 73,
    "finetune_lr": 1e-4,
}
QUICK = {
    "epochs": 2,
    "batch_size": 8,
    "lr": 3e-3,
    "optimizer": "adam",
    "schedule": "constant",
    "patience": None,
    "synth_n": 36,
    "finetune_lr": 1e-3,
}
REGIMES = {
    "lidc_only": "LIDC only",
    "without_pretraining": "w/o pre-training",
    "with_pretraining": "w/ pre-training",
}
MODEL = lidc_pretrain.MODEL


@dataclasses.dataclass(frozen=True)
class CVConfig:
    """What lungx-cv does (saved as config.json)."""

    train: TrainConfig
    finetune_lr: float
    folds: int = 3
    val_fraction: float = 0.1
    store: str | None = None
    synth_n: int = 73
    pretrained: str | None = None
    write_folds: bool = False
    quick: bool = False


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
    cfg: CVConfig, info: StoreInfo, split: Split, pretrained: str, kwargs: dict, fold_dir: Path
) -> tuple[dict[str, np.ndarray], dict[str, pd.DataFrame]]:
    """The three regimes on one fold: test probabilities and training histories per regime."""
    train_ds = common3d.split_dataset(info, split.train)
    val_ds = common3d.split_dataset(info, split.val)
    test_ds = common3d.split_dataset(info, split.test)
    meta = {"model_name": MODEL, "model_kwargs": kwargs, "fold": split.fold}
    probs, histories = {}, {}
    lidc_model, _ = load_model_from_checkpoint(pretrained, expected_model_name=MODEL)
    probs["lidc_only"], _ = predict(lidc_model, test_ds, cfg.train.batch_size, cfg.train.device)

    seed_everything(cfg.train.seed + split.fold)
    scratch = create_model(MODEL, **kwargs)
    result = fit(
        scratch,
        train_ds,
        val_ds,
        cfg.train,
        run_dir=fold_dir / "without_pretraining",
        checkpoint_meta=meta,
    )
    histories["without_pretraining"] = result.history
    probs["without_pretraining"], _ = predict(
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
        checkpoint_meta=meta,
    )
    histories["with_pretraining"] = result.history
    probs["with_pretraining"], _ = predict(tuned, test_ds, cfg.train.batch_size, cfg.train.device)
    return probs, histories


def cross_validate(
    cfg: CVConfig, info: StoreInfo, folds: np.ndarray, pretrained: str, kwargs: dict, run_dir: Path
) -> dict[str, pd.DataFrame]:
    """All folds and regimes; writes the tables and plots, returns the tables by name."""
    meta = read_meta(info.path)
    labels = meta["label"]
    splits = cv_splits(labels, cfg.folds, cfg.val_fraction, cfg.train.seed, folds=folds)
    predictions, histories, aucs = [], [], {r: [] for r in REGIMES}
    for split in splits:
        log.info(
            f"fold {split.fold + 1}/{cfg.folds}: {len(split.train)} train, {len(split.val)} "
            f"validation, {len(split.test)} test nodules"
        )
        fold_dir = run_dir / "folds" / f"fold{split.fold + 1}"
        probs, fold_histories = run_fold(cfg, info, split, pretrained, kwargs, fold_dir)
        for regime, p in probs.items():
            aucs[regime].append(classification_metrics(p, labels[split.test])["auc"])
            predictions.append(
                pd.DataFrame(
                    {
                        "fold": split.fold + 1,
                        "regime": REGIMES[regime],
                        "id": meta["id"][split.test],
                        "label": labels[split.test],
                        "probability": p,
                    }
                )
            )
        for regime, history in fold_histories.items():
            histories.append(history.assign(fold=split.fold + 1, regime=REGIMES[regime]))
        save_figure(
            run_dir,
            f"loss_fold{split.fold + 1}",
            loss_curves_plot(
                {REGIMES[r]: h for r, h in fold_histories.items()},
                f"Fold {split.fold + 1} ({common3d.data_word(info)})",
            ),
        )
    pred = pd.concat(predictions, ignore_index=True)
    tables = {"auc": auc_table({REGIMES[r]: v for r, v in aucs.items()})}
    for regime, name in REGIMES.items():
        rows = pred[pred["regime"] == name]
        tables[f"confusion_{regime}"] = confusion_table(rows["label"], rows["probability"])
    for name, table in tables.items():
        write_table(run_dir, name, table)
    write_table(run_dir, "predictions", pred, index=False)
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


def _lidc_sizes(cfg: CVConfig) -> dict:
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
        _lidc_sizes(cfg)["synth_n"],
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


def _pretrain_first(cfg: CVConfig, info: StoreInfo, run_dir: Path) -> str:
    """Run lidc-pretrain on `info` into RUN/lidc_pretrain/ and return its best checkpoint."""
    sizes = _lidc_sizes(cfg)
    train = dataclasses.replace(cfg.train, epochs=sizes["epochs"], batch_size=16, lr=sizes["lr"])
    pcfg = lidc_pretrain.PretrainConfig(
        train=train,
        store=str(info.path),
        synth_n=sizes["synth_n"],
        preset=common3d.nodule_preset(info),
        filters=sizes["filters"],
        depth=sizes["depth"],
        quick=cfg.quick,
    )
    sub = run_dir / "lidc_pretrain"
    (sub / "tables").mkdir(parents=True, exist_ok=True)
    (sub / "plots").mkdir(exist_ok=True)
    log.info("no --pretrained checkpoint: pre-training on LIDC first")
    result = lidc_pretrain.pretrain(pcfg, info, sub)
    write_table(run_dir, "pretrain_summary", result.summary)
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
) -> CVRun:
    """The three regimes over the folds into OUT/<run-id>/ (pre-training on LIDC first when
    `cfg.pretrained` is None, from `lidc_store_path` or generated nodules)."""
    started = time.perf_counter()
    if cfg.pretrained:  # a wrong file or architecture fails before any data is generated
        load_model_from_checkpoint(cfg.pretrained, expected_model_name=MODEL)
    info = lidc_pretrain.nodule_store(cfg.store, cfg.synth_n, "lungx", Path(out), data_seed, NAME)
    folds, folds_how = fold_assignment(cfg, info)
    kwargs = check_pretrained(cfg.pretrained, info) if cfg.pretrained else None
    # Without --pretrained, pre-train on the LUNGx store's grid (checked or generated now,
    # not after a whole pre-training).
    preset = common3d.nodule_preset(info)
    lidc = None if cfg.pretrained else lidc_store(cfg, preset, out, data_seed, lidc_store_path)
    note = common3d.data_note(info)
    config = {"experiment": NAME, "config": cfg, "store": info.path, "data": note}
    with common3d.training_run(out, run_id, {**config, "folds": folds_how}, note) as folder:
        log.info(f"config: {cfg}")
        pretrained = cfg.pretrained or _pretrain_first(cfg, lidc, folder.path)
        kwargs = kwargs or check_pretrained(pretrained, info)
        tables = cross_validate(cfg, info, folds, pretrained, kwargs, folder.path)
        wall = time.perf_counter() - started
        folder.summary.update(wall_s=wall, pretrained=pretrained, folds=folds_how)
    return CVRun(folder.path, tables, note, folds_how, wall)
