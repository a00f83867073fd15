"""Layer 11 (experiments): the recipe of `lungbench train mosmed`, seed 002's CT-0 vs CT-2/3 task with the MosMed 3D CNN and each of
its six modifications; one comparison table (accuracy, AUC, parameters, time per epoch, peak
memory: measured on CUDA, estimated on CPU) and the curves of every variant.

    lungbench train mosmed --quick
    lungbench train mosmed --variants baseline residual --epochs 20 --device cuda
    lungbench train mosmed --store mosmed.h5
    lungbench train mosmed --resume results/RUN         continue a stopped run

Default data: generated whole-lung volumes (lungbench.data.synth_mosmed), not MosMedData.
Each variant appends a record as it finishes and the table is built from the records: a
stopped run has the rows of the variants that finished, and --resume RUN trains the others
(an unfinished one continues from its checkpoint; lungbench.experiments.resumable).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import pandas as pd

from lungbench.core.errors import UsageError
from lungbench.core.options import nested, option, positive_int, replaced, unit_fraction
from lungbench.core.runs import append_record, read_records, save_figure, write_table
from lungbench.data.splits import stratified_split
from lungbench.data.store import StoreInfo, read_info, read_meta
from lungbench.experiments import common3d
from lungbench.experiments.resumable import ResumePoint, checkpoint_to_resume
from lungbench.models import create_model
from lungbench.models.mosmed3d import KERAS_FILTERS, VARIANTS, keras_parameter_count
from lungbench.report.training import metric_curves_plot
from lungbench.train.config import TrainConfig
from lungbench.train.costs import MIB, estimate_memory
from lungbench.train.engine import METRICS_FILE, FitOptions, fit, seed_everything

log = logging.getLogger(__name__)  # progress: the CLI shows it on stderr

NAME = "mosmed"
MODEL = "mosmed3d"


DATA = "data and model"  # the --help section of the options below


def _once(names: tuple[str, ...]) -> tuple[str, ...]:
    """The names in order, each once (--variants baseline baseline trains it once)."""
    return tuple(dict.fromkeys(names))


@dataclasses.dataclass(frozen=True, kw_only=True)
class MosmedConfig:
    """What the mosmed experiment does (saved as config.json); the fields with option(...)
    are the command's options, with FULL and QUICK as their defaults."""

    variants: tuple[str, ...] = option(
        VARIANTS,
        nargs="+",
        choices=VARIANTS,
        group=DATA,
        convert=_once,
        default_text="all seven: " + " ".join(VARIANTS),
        help="variants to train",
    )
    store: str | None = option(
        None,
        group=DATA,
        default_text="generated CT-0 / CT-2/3 volumes, cached in OUT/data/",
        help="whole-CT store with one 'volume' input",
    )
    synth_n: int = option(
        200, type=positive_int, group=DATA, help="generated studies when no --store"
    )
    grid: tuple[int, int, int] = option(
        (64, 128, 128),
        type=positive_int,
        nargs=3,
        metavar=("D", "H", "W"),
        group=DATA,
        default_note="Keras's 128x128x64",
        help="grid of the generated volumes",
    )
    filters: tuple[int, ...] = option(
        KERAS_FILTERS, type=positive_int, nargs="+", group=DATA, help="conv widths per level"
    )
    dense: int = option(512, type=positive_int, group=DATA, help="hidden dense width")
    padding: str = option(
        "valid",
        choices=("valid", "same"),
        group=DATA,
        default_note="as Keras, needs >= 46 voxels per axis",
        help="conv padding",
    )
    val_fraction: float = option(
        0.3,
        type=unit_fraction,
        group=DATA,
        default_note="as the Keras example",
        help="stratified validation share",
    )
    quick: bool = False
    train: TrainConfig = nested(TrainConfig, group="training", show=common3d.TRAIN_OPTIONS)

    def model_kwargs(self, variant: str) -> dict:
        return {
            "variant": variant,
            "filters": list(self.filters),
            "dense": self.dense,
            "padding": self.padding,
        }


# 10 epochs (seed 002: "at least 10"), early stopping off (patience None).
FULL = MosmedConfig(train=TrainConfig(epochs=10, batch_size=2, lr=1e-4, telemetry_interval=1.0))
QUICK = replaced(
    FULL,
    {
        "epochs": 2,
        "batch_size": 4,
        "lr": 1e-3,
        "synth_n": 32,
        "grid": (16, 32, 32),
        "filters": (8, 8, 16, 32),
        "dense": 64,
        "padding": "same",
        "quick": True,
    },
)


def volume_store(cfg: MosmedConfig, out: Path, data_seed: int) -> StoreInfo:
    """The user's whole-CT store (checked), or generated CT-0 / CT-2/3 volumes."""
    store = cfg.store
    if store is None:
        from lungbench.data.synth_mosmed import GENERATOR_VERSION, write_mosmed_store

        grid = "x".join(map(str, cfg.grid))
        store = str(
            common3d.cached_store(
                out,
                f"synth-mosmed-v{GENERATOR_VERSION}-n{cfg.synth_n}-{grid}-seed{data_seed}",
                cfg.synth_n,
                lambda p, bar: write_mosmed_store(p, cfg.synth_n, cfg.grid, data_seed, bar),
            )
        )
    info = read_info(store)
    common3d.require_inputs(
        info, ("volume",), NAME, "a whole-CT store such as a converted MosMedData"
    )
    check_grid(info, cfg)
    return info


def check_grid(info: StoreInfo, cfg: MosmedConfig) -> None:
    """UsageError when the store's grid would shrink to nothing inside the network."""
    levels = len(cfg.filters)
    # Residual variants always pad "same"; the others lose 2 voxels per level when "valid".
    valid = cfg.padding == "valid" and any(
        v not in ("residual", "res_inception") for v in cfg.variants
    )
    size = min(info.grid)
    for _ in range(levels):
        size = (size - 2 if valid else size) // 2
    if size < 1:
        need = "46" if valid and levels == 4 else f"2^{levels}"
        raise UsageError(
            f"--store {info.path}: grid {info.grid} is too small for {levels} "
            f"{'valid' if valid else 'same'}-padded levels (needs >= {need} "
            f"voxels per axis); use --padding same, fewer --filters or a larger "
            f"--grid"
        )


def train_variant(
    cfg: MosmedConfig,
    variant: str,
    info: StoreInfo,
    train_idx,
    val_idx,
    run_dir: Path,
    resume: ResumePoint | None = None,
) -> tuple[dict, pd.DataFrame]:
    """Train one variant (a resumed run's unfinished one from its checkpoint); returns its
    comparison row and history."""
    kwargs = cfg.model_kwargs(variant)
    seed_everything(cfg.train.seed)
    model = create_model(MODEL, **kwargs)
    log.info(f"variant {variant}: {keras_parameter_count(model):,} parameters")
    result = fit(
        model,
        common3d.split_dataset(info, train_idx),
        common3d.split_dataset(info, val_idx),
        cfg.train,
        run_dir=run_dir / "variants" / variant,
        resume=checkpoint_to_resume(run_dir / "variants" / variant, resume),
        options=FitOptions(checkpoint_meta={"model_name": MODEL, "model_kwargs": kwargs}),
    )
    memory, kind = training_memory(
        cfg, model, info, result.peak_memory_bytes, result.peak_memory_kind
    )
    best = result.best_row
    row = {
        "variant": variant,
        "best epoch": result.best_epoch,
        "val accuracy": best["val_accuracy"],
        "val AUC": best["val_auc"],
        "val loss": result.best_val_loss,
        "parameters": keras_parameter_count(model),
        "time per epoch (s)": result.mean_epoch_s,
        "samples/s": result.samples_per_s,
        MEMORY_COLUMNS[kind]: memory / MIB,
        "memory measure": kind,
    }
    return row, result.history


# How the peak-memory column is counted: its name and the table's note.
MEMORY_COLUMNS = {
    "cuda_max_allocated": "peak memory, measured (MiB)",
    "estimated": "peak memory, estimated (MiB)",
}
MEMORY_NOTES = {
    "cuda_max_allocated": "peak memory measured on CUDA: torch.cuda.max_memory_allocated "
    "during each variant's training",
    "estimated": "peak memory estimated (not measured; training ran on CPU, where the process "
    "memory does not separate the variants): fp32 weights + gradients + optimizer state + "
    "the activations autograd saves for one batch (lungbench.train.costs.estimate_memory); data, "
    "loader and framework memory not included",
}


def training_memory(
    cfg: MosmedConfig, model, info: StoreInfo, measured: int, measured_kind: str
) -> tuple[int, str]:
    """(bytes, kind): the CUDA allocator's peak of the fit when it ran on CUDA, else the
    estimate of lungbench.train.costs (the 2D cost tables' CPU figure), which does not depend on
    what earlier variants left in the process."""
    if measured_kind == "cuda_max_allocated" and measured > 0:
        return measured, measured_kind
    estimate = estimate_memory(model, [info.inputs["volume"]], cfg.train.optimizer)
    return estimate.total(cfg.train.batch_size), "estimated"


def compare(
    cfg: MosmedConfig, info: StoreInfo, run_dir: Path, resume: ResumePoint | None = None
) -> pd.DataFrame:
    """Every variant on one split (those a resumed run lacks), each appended to the records
    as it finishes; writes the table, metrics.csv and the curves."""
    labels = read_meta(info.path)["label"]
    train_idx, val_idx = stratified_split(range(info.n), labels, cfg.val_fraction, cfg.train.seed)
    log.info(
        f"MosMed task: {len(train_idx)} train / {len(val_idx)} validation studies, grid {info.grid}"
    )
    done = resume.finished("variant", lambda r: r["row"]["variant"]) if resume else {}
    for variant in cfg.variants:
        if variant in done:
            log.info(f"variant {variant}: trained before")
            continue
        row, _ = train_variant(cfg, variant, info, train_idx, val_idx, run_dir, resume)
        append_record(run_dir, {"kind": "variant", "row": row})
    return write_outputs(run_dir, info)


def write_outputs(run_dir: Path, info: StoreInfo) -> pd.DataFrame:
    """The comparison table, metrics.csv and the curves of the variants whose records are
    in the run (all of them when it completes, those that finished when it stops)."""
    rows = {
        r["row"]["variant"]: r["row"] for r in read_records(run_dir) if r.get("kind") == "variant"
    }
    if not rows:
        return pd.DataFrame()
    table = pd.DataFrame(list(rows.values())).set_index("variant")
    histories = {
        v: pd.read_csv(run_dir / "variants" / v / METRICS_FILE)
        for v in rows
        if (run_dir / "variants" / v / METRICS_FILE).exists()
    }
    write_table(run_dir, "variants", table)
    with open(run_dir / "tables" / "variants.md", "a") as f:
        f.write("\n" + memory_note(table) + "\n")
    if not histories:
        return table
    pd.concat([h.assign(variant=v) for v, h in histories.items()], ignore_index=True).to_csv(
        run_dir / "metrics.csv", index=False
    )
    word = common3d.data_word(info)
    for column, title in (
        ("val_loss", "validation loss"),
        ("val_auc", "validation AUC"),
        ("train_loss", "training loss"),
    ):
        save_figure(
            run_dir, column, metric_curves_plot(histories, column, f"MosMed {title} ({word})")
        )
    return table


def memory_note(table: pd.DataFrame) -> str:
    """The footnote saying how the table's peak memory was counted."""
    kinds = dict.fromkeys(table["memory measure"])
    return "\n".join(MEMORY_NOTES[k] for k in kinds)


@dataclasses.dataclass
class MosmedRun:
    """What a mosmed run produced."""

    run_dir: Path
    table: pd.DataFrame  # one row per variant (best epoch by validation loss)
    data: str  # what the data were (generated or the store)
    wall_s: float


def run(
    cfg: MosmedConfig,
    out: str | Path,
    run_id: str | None = None,
    data_seed: int = 0,
    resume: ResumePoint | None = None,
) -> MosmedRun:
    """Train every variant of `cfg` and write the comparison into OUT/<run-id>/ (with
    `resume`, the variants that run folder lacks)."""
    started = time.perf_counter()
    info = volume_store(cfg, Path(out), data_seed)
    note = common3d.data_note(info)
    config = common3d.store_run_config(NAME, cfg, info, data_seed)
    with common3d.training_run(
        out,
        run_id,
        config,
        note,
        resume=resume,
        on_stop=lambda run_dir: write_outputs(run_dir, info),
    ) as folder:
        log.info(f"config: {cfg}")
        table = compare(cfg, info, folder.path, resume)
        wall = time.perf_counter() - started
        folder.summary["wall_s"] = wall
    return MosmedRun(folder.path, table, note, wall)
