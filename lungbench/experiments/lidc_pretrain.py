"""Layer 11 (experiments): the recipe of `lungbench train lidc-pretrain`, seed 000's pre-training of the two-path 3D CNN on LIDC-IDRI.

Protocol (the thesis): 20% of the nodules for validation (stratified), batch 16, the best
epoch by validation loss; report accuracy and AUC on the validation set at that epoch (the
thesis: epoch 63, accuracy 0.78, AUC 0.90 on the real LIDC-IDRI).

    lungbench train lidc-pretrain --quick
    lungbench train lidc-pretrain --epochs 100 --patience 20
    lungbench train lidc-pretrain --store lidc.h5 --device cuda
    lungbench train lidc-pretrain --resume results/<run>/checkpoint_last.pt
    lungbench train lidc-pretrain --resume results/<run>       the same run folder continued
    torchrun --nproc_per_node 4 -m lungbench train lidc-pretrain --device cuda

Under a launcher (torchrun, srun, mpiexec) it trains with DDP (lungbench.distributed.group):
--batch is per process, rank 0 generates the data, writes the run folder and prints.

Default data: a generated LIDC-like store (lungbench.data.synth), cached in OUT/data/.
A run that stops (a signal, Ctrl-C, an error) writes tables/pretrain_summary of the epochs
that finished (the best so far) before run.json says "interrupted" or "failed".
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd

from lungbench.core.options import nested, option, positive_int, replaced, unit_fraction
from lungbench.core.runs import save_figure, write_table
from lungbench.data.splits import stratified_split
from lungbench.data.store import StoreInfo, read_info, read_meta
from lungbench.distributed.group import (
    DistContext,
    barrier,
    collective_guard,
    single_process,
)
from lungbench.experiments import common3d
from lungbench.experiments.resumable import ResumePoint, checkpoint_to_resume
from lungbench.harness.sweep import default_store_path
from lungbench.models import create_model
from lungbench.report.training import loss_curves_plot, roc_plot
from lungbench.train.checkpoint import load_resume_checkpoint
from lungbench.train.config import FitResult, TrainConfig
from lungbench.train.engine import METRICS_FILE, FitOptions, fit, infer

log = logging.getLogger(__name__)  # progress: the CLI shows it on stderr

NAME = "lidc-pretrain"
MODEL = "dualpath3d"


DATA = "data and model"  # the --help section of the options below


@dataclass(frozen=True, kw_only=True)
class PretrainConfig:
    """What lidc-pretrain does (saved as config.json); the fields with option(...) are the
    command's options, with FULL and QUICK as their defaults."""

    store: str | None = option(
        None,
        group=DATA,
        default_text="generated LIDC-like nodules, cached in OUT/data/",
        help="nodule store with context/zoom cubes",
    )
    synth_n: int = option(
        754,
        type=positive_int,
        group=DATA,
        default_note="the thesis's LIDC count",
        help="generated nodules when no --store",
    )
    preset: str = "default"
    filters: int = option(8, type=positive_int, group=DATA, help="base width of dualpath3d")
    depth: int = option(4, type=positive_int, group=DATA, help="conv levels per path")
    val_fraction: float = option(
        0.2,
        type=unit_fraction,
        group=DATA,
        default_note="the thesis",
        help="stratified validation share",
    )
    quick: bool = False
    # --target: time to quality (lungbench.train.quality), the thesis's own measure of
    # pre-training length ("63 epochs to the best validation loss")
    train: TrainConfig = nested(
        TrainConfig, group="training", show={**common3d.TRAIN_OPTIONS, "target": {}}
    )

    @property
    def model_kwargs(self) -> dict:
        return {"preset": self.preset, "filters": self.filters, "depth": self.depth}


FULL = PretrainConfig(train=TrainConfig(epochs=30, telemetry_interval=1.0))
QUICK = replaced(
    FULL, {"epochs": 3, "lr": 3e-3, "synth_n": 48, "filters": 4, "depth": 3, "quick": True}
)


@dataclass
class PretrainResult:
    fit: FitResult
    checkpoint: Path | None
    summary: pd.DataFrame
    model_kwargs: dict


def nodule_store(
    store: str | None,
    synth_n: int,
    kind: str,
    out: Path,
    data_seed: int,
    experiment: str,
    preset: str = "default",
) -> StoreInfo:
    """The user's nodule store (checked), or a generated one of `kind` on grid `preset`."""
    if store is None:
        from lungbench.data.geometry import geometry
        from lungbench.data.synth import write_synthetic_store

        path = common3d.cached_store(
            out,
            default_store_path(Path(out), kind, synth_n, preset, data_seed).stem,
            synth_n,
            lambda p, bar: write_synthetic_store(
                p,
                kind,
                synth_n,
                geometry(preset),
                seed=data_seed,
                progress=bar,
                # A small set renders faster here than in a freshly spawned pool.
                workers=1 if synth_n <= 64 else None,
            ),
        )
        store = str(path)
    info = read_info(store)
    common3d.require_inputs(
        info,
        ("context", "zoom"),
        experiment,
        f"a nodule store, e.g. `lungbench data synth --kind {kind}`",
    )
    return info


def pretrain(
    cfg: PretrainConfig,
    info: StoreInfo,
    run_dir: Path | None,
    resume: str | None = None,
    dist: DistContext | None = None,
) -> PretrainResult | None:
    """Train dualpath3d on the store; files go to run_dir (metrics.csv, checkpoints, plots).

    With `dist` of several processes the training is DDP; the ranks other than 0 return
    None after training (run_dir is rank 0's).
    """
    dist = dist or single_process(cfg.train.device)
    labels = read_meta(info.path)["label"]
    train_idx, val_idx = stratified_split(range(info.n), labels, cfg.val_fraction, cfg.train.seed)
    if dist.is_main:
        log.info(
            f"LIDC pre-training: {len(train_idx)} train / {len(val_idx)} validation nodules, "
            f"grid {info.grid}, {MODEL} {cfg.model_kwargs}"
            + (f", DDP x{dist.world_size} ({dist.backend})" if dist.is_distributed else "")
        )
    train_ds = common3d.split_dataset(info, train_idx)
    val_ds = common3d.split_dataset(info, val_idx)
    from lungbench.train.engine import seed_everything

    seed_everything(cfg.train.seed)  # the initial weights depend on the seed only
    model = create_model(MODEL, **cfg.model_kwargs)
    with collective_guard(dist, "training"):  # a lost rank: one line, not a traceback
        result = fit(
            model,
            train_ds,
            val_ds,
            cfg.train,
            run_dir=run_dir,
            resume=resume,
            dist=dist,
            options=FitOptions(
                checkpoint_meta={
                    "model_name": MODEL,
                    "model_kwargs": cfg.model_kwargs,
                    "store": str(info.path),
                }
            ),
        )
    if not dist.is_main:
        return None
    summary = pretrain_summary(result.history, len(train_idx), len(val_idx))
    write_table(run_dir, "pretrain_summary", summary)
    save_figure(
        run_dir,
        "loss_curves",
        loss_curves_plot(
            {"LIDC": result.history}, f"LIDC pre-training ({common3d.data_word(info)})"
        ),
    )
    probs, targets = infer(model, val_ds, batch_size=cfg.train.batch_size, device=cfg.train.device)
    save_figure(
        run_dir,
        "roc_validation",
        roc_plot(
            {"best epoch": (targets, probs)}, f"LIDC validation ROC ({common3d.data_word(info)})"
        ),
    )
    return PretrainResult(result, result.best_checkpoint, summary, cfg.model_kwargs)


def pretrain_summary(history: pd.DataFrame, n_train: int, n_val: int) -> pd.DataFrame:
    """The thesis's pre-training line from the epochs' history: the best epoch by validation
    loss, its loss, accuracy and AUC, and how long the epochs took."""
    best = history.loc[history["val_loss"].idxmin()]
    return pd.DataFrame(
        [
            {
                "best epoch": int(best["epoch"]),
                "val loss": best["val_loss"],
                "val accuracy": best["val_accuracy"],
                "val AUC": best["val_auc"],
                "epochs run": len(history),
                "train nodules": n_train,
                "val nodules": n_val,
                "time per epoch (s)": history["epoch_s"].mean(),
                "samples/s": history["samples_per_s"].mean(),
            }
        ],
        index=pd.Index(["LIDC pre-training"], name="run"),
    )


def summary_after_stop(run_dir: Path, cfg: PretrainConfig, info: StoreInfo) -> None:
    """tables/pretrain_summary and the loss curves of the epochs that finished."""
    path = run_dir / METRICS_FILE
    if not path.exists():
        return
    history = pd.read_csv(path)
    if history.empty:
        return
    labels = read_meta(info.path)["label"]
    train_idx, val_idx = stratified_split(range(info.n), labels, cfg.val_fraction, cfg.train.seed)
    write_table(
        run_dir, "pretrain_summary", pretrain_summary(history, len(train_idx), len(val_idx))
    )
    save_figure(
        run_dir,
        "loss_curves",
        loss_curves_plot({"LIDC": history}, f"LIDC pre-training ({common3d.data_word(info)})"),
    )


@dataclass
class PretrainRun:
    """What a lidc-pretrain run produced (rank 0's; the other ranks get None)."""

    run_dir: Path
    result: PretrainResult
    data: str


def run(
    cfg: PretrainConfig,
    out: str | Path,
    run_id: str | None = None,
    data_seed: int = 0,
    resume: str | ResumePoint | None = None,
    dist: DistContext | None = None,
) -> PretrainRun | None:
    """Pre-train as `cfg` says into OUT/<run-id>/ (continuing `resume` exactly: a
    checkpoint_last.pt into a new run folder, or a stopped run folder (ResumePoint) in
    place, from its checkpoint_last.pt when it has one). Under a launcher (`dist` of several
    ranks) every rank trains its DDP shard; rank 0 generates the data, writes the run folder
    and returns the result, the others return None."""
    dist = dist or single_process(cfg.train.device)
    point = resume if isinstance(resume, ResumePoint) else None
    if point is not None:
        found = checkpoint_to_resume(point.run_dir, point)
        resume = str(found) if found is not None else None
    if resume is not None:
        # A corrupt file or changed training options fail before data or a run folder is
        # made; under a launcher every rank reads the file (a shared file system, as for the
        # data), and the engine checks the world size is the one that wrote it.
        load_resume_checkpoint(resume, cfg.train)
    # Every rank checks a given store itself (a bad one fails everywhere at once); a generated
    # one is made by rank 0 while the others wait, then read by all.
    generate_first = dist.is_distributed and cfg.store is None
    if generate_first and not dist.is_main:
        barrier(dist, "waiting for rank 0 to generate the data")
    info = nodule_store(cfg.store, cfg.synth_n, "lidc", Path(out), data_seed, NAME)
    if generate_first and dist.is_main:
        barrier(dist, "waiting for rank 0 to generate the data")
    cfg = PretrainConfig(**{**_shallow(cfg), "preset": common3d.nodule_preset(info)})
    note = common3d.data_note(info)
    if not dist.is_main:
        pretrain(cfg, info, None, resume=resume, dist=dist)  # every rank resumes
        return None
    config = common3d.store_run_config(NAME, cfg, info, data_seed, distributed=dist.describe())
    with common3d.training_run(
        out,
        run_id,
        config,
        note,
        resume=point,
        on_stop=lambda run_dir: summary_after_stop(run_dir, cfg, info),
    ) as folder:
        log.info(f"config: {cfg}")
        result = pretrain(cfg, info, folder.path, resume=resume, dist=dist)
        folder.summary["best_checkpoint"] = result.checkpoint
        if result.fit.time_to_quality is not None:  # --target: the time to it, in run.json
            folder.summary["time_to_quality"] = result.fit.time_to_quality
    return PretrainRun(folder.path, result, note)


def _shallow(cfg: PretrainConfig) -> dict:
    # asdict() would turn the nested TrainConfig into a dict; keep the dataclass.
    return {k: getattr(cfg, k) for k in asdict(cfg)}
