"""`lungbench train mosmed`: seed 002's CT-0 vs CT-2/3 task with the MosMed 3D CNN and each of
its six modifications; one comparison table (accuracy, AUC, parameters, time per epoch, peak
memory: measured on CUDA, estimated on CPU) and the curves of every variant.

    lungbench train mosmed --quick
    lungbench train mosmed --variants baseline residual --epochs 20 --device cuda
    lungbench train mosmed --store mosmed.h5

Default data: generated whole-lung volumes (lungbench.data.synth_mosmed), not MosMedData.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import time
from pathlib import Path

import pandas as pd

from lungbench.commands._args import non_negative_int, positive_int, unit_fraction
from lungbench.core.errors import UsageError
from lungbench.core.runs import finish_run, save_figure, write_table
from lungbench.data.splits import stratified_split
from lungbench.data.store import StoreInfo, read_info, read_meta
from lungbench.experiments import common3d
from lungbench.models import create_model
from lungbench.models.mosmed3d import KERAS_FILTERS, VARIANTS, keras_parameter_count
from lungbench.report.training import metric_curves_plot
from lungbench.train.config import TrainConfig
from lungbench.train.costs import MIB, estimate_memory
from lungbench.train.engine import fit, seed_everything

log = logging.getLogger(__name__)  # progress: the CLI shows it on stderr

NAME = "mosmed"
HELP = "seed 002: CT-0 vs CT-2/3 with the MosMed 3D CNN and its six modifications"
DESCRIPTION = """\
Seed 002's practical: tell CT-0 from CT-2/3 studies with the Keras "3D image classification
from CT scans" network (conv blocks 64, 64, 128, 256; global pooling; dense 512; dropout 0.3;

128x128x64 input) and each of its six modifications: dense100 (extra dense 100 + ReLU),
double_conv (a second conv per level), sigmoid (sigmoid activations), avgpool (average
pooling), residual (residual blocks), res_inception (residual inception blocks). 30% of the
studies (stratified) validate; each variant's best epoch by validation loss is reported in
one table: accuracy, AUC, parameters, time per epoch, samples/s and peak memory. Peak memory
on CUDA is measured (the allocator's peak, column "peak memory, measured (MiB)"); on CPU it
is estimated (column "peak memory, estimated (MiB)": fp32 weights + gradients + optimizer
state + the activations autograd saves for one batch, as the 2D cost tables count it),
since the process memory does not separate variants trained one after another. Full
defaults: 10 epochs (seed 002: "at least 10"), no early stopping (the Keras example's
patience of 15 needs more epochs, e.g. --epochs 100 --patience 15). Default data: generated
whole-lung volumes with ground-glass patches (not MosMedData). --quick shrinks the grid to
16x32x32, the widths to 8, 8, 16, 32 with "same" padding, and the data to 32 studies.

outputs (in OUT/RUN-ID/): tables/variants.csv and .md (the comparison, with a note on how
memory was counted), metrics.csv (every variant's epochs), plots/val_loss.png, val_auc.png
and train_loss.png, variants/VARIANT/ (each variant's metrics.csv and checkpoints),
config.json, environment.json, run.json.

examples:
  lungbench train mosmed --quick
  lungbench train mosmed --variants baseline residual res_inception --epochs 20
  lungbench train mosmed --store mosmed.h5 --device cuda --amp"""

FULL = {
    "epochs": 10,
    "batch_size": 2,
    "lr": 1e-4,
    "optimizer": "adam",
    "schedule": "constant",
    "patience": None,  # 10 epochs (seed 002); early stopping off
    "synth_n": 200,
    "grid": (64, 128, 128),
    "filters": KERAS_FILTERS,
    "dense": 512,
    "padding": "valid",
}
QUICK = {
    "epochs": 2,
    "batch_size": 4,
    "lr": 1e-3,
    "optimizer": "adam",
    "schedule": "constant",
    "patience": None,
    "synth_n": 32,
    "grid": (16, 32, 32),
    "filters": (8, 8, 16, 32),
    "dense": 64,
    "padding": "same",
}
MODEL = "mosmed3d"


@dataclasses.dataclass(frozen=True)
class MosmedConfig:
    """What the mosmed experiment does (saved as config.json)."""

    train: TrainConfig
    variants: tuple[str, ...] = VARIANTS
    store: str | None = None
    synth_n: int = 200
    grid: tuple[int, int, int] = (64, 128, 128)
    filters: tuple[int, ...] = KERAS_FILTERS
    dense: int = 512
    padding: str = "valid"
    val_fraction: float = 0.3
    quick: bool = False

    def model_kwargs(self, variant: str) -> dict:
        return {
            "variant": variant,
            "filters": list(self.filters),
            "dense": self.dense,
            "padding": self.padding,
        }


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    d = p.add_argument_group("data and model")
    d.add_argument(
        "--variants",
        nargs="+",
        choices=VARIANTS,
        default=list(VARIANTS),
        help="variants to train (default: all seven: " + " ".join(VARIANTS) + ")",
    )
    d.add_argument(
        "--store",
        default=None,
        help="whole-CT store with one 'volume' input (default: generated CT-0 / "
        "CT-2/3 volumes, cached in OUT/data/)",
    )
    d.add_argument(
        "--synth-n",
        type=positive_int,
        default=None,
        help=f"generated studies when no --store (default: {FULL['synth_n']}; "
        f"--quick: {QUICK['synth_n']})",
    )
    d.add_argument(
        "--grid",
        type=positive_int,
        nargs=3,
        metavar=("D", "H", "W"),
        default=None,
        help=f"grid of the generated volumes (default: {' '.join(map(str, FULL['grid']))}"
        f", Keras's 128x128x64; --quick: {' '.join(map(str, QUICK['grid']))})",
    )
    d.add_argument(
        "--filters",
        type=positive_int,
        nargs="+",
        default=None,
        help=f"conv widths per level (default: {' '.join(map(str, FULL['filters']))}; "
        f"--quick: {' '.join(map(str, QUICK['filters']))})",
    )
    d.add_argument(
        "--dense",
        type=positive_int,
        default=None,
        help=f"hidden dense width (default: {FULL['dense']}; --quick: {QUICK['dense']})",
    )
    d.add_argument(
        "--padding",
        choices=("valid", "same"),
        default=None,
        help=f"conv padding (default: {FULL['padding']}, as Keras, needs >= 46 voxels "
        f"per axis; --quick: {QUICK['padding']})",
    )
    d.add_argument(
        "--val-fraction",
        type=unit_fraction,
        default=0.3,
        help="stratified validation share (default: 0.3, as the Keras example)",
    )
    d.add_argument(
        "--data-seed",
        type=non_negative_int,
        default=0,
        help="seed of the generated data set (default: 0)",
    )
    common3d.add_train_arguments(p, FULL, QUICK)


def make_config(args: argparse.Namespace) -> MosmedConfig:
    def get(name):
        return common3d.resolve(args, name, FULL, QUICK)

    return MosmedConfig(
        train=common3d.train_config(args, FULL, QUICK),
        variants=tuple(dict.fromkeys(args.variants)),
        store=args.store,
        synth_n=get("synth_n"),
        grid=tuple(get("grid")),
        filters=tuple(get("filters")),
        dense=get("dense"),
        padding=get("padding"),
        val_fraction=args.val_fraction,
        quick=args.quick,
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
    cfg: MosmedConfig, variant: str, info: StoreInfo, train_idx, val_idx, run_dir: Path
) -> tuple[dict, pd.DataFrame]:
    """Train one variant; returns its comparison row and history."""
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
        checkpoint_meta={"model_name": MODEL, "model_kwargs": kwargs},
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


def compare(cfg: MosmedConfig, info: StoreInfo, run_dir: Path) -> pd.DataFrame:
    """Every variant on one split; writes the table, metrics.csv and the curves."""
    labels = read_meta(info.path)["label"]
    train_idx, val_idx = stratified_split(range(info.n), labels, cfg.val_fraction, cfg.train.seed)
    log.info(
        f"MosMed task: {len(train_idx)} train / {len(val_idx)} validation studies, grid {info.grid}"
    )
    rows, histories = [], {}
    for variant in cfg.variants:
        row, histories[variant] = train_variant(cfg, variant, info, train_idx, val_idx, run_dir)
        rows.append(row)
    table = pd.DataFrame(rows).set_index("variant")
    write_table(run_dir, "variants", table)
    with open(run_dir / "tables" / "variants.md", "a") as f:
        f.write("\n" + memory_note(table) + "\n")
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


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    cfg = make_config(args)
    info = volume_store(cfg, Path(args.out), args.data_seed)
    note = common3d.data_note(info)
    run_dir = common3d.start_run(
        args.out, args.run_id, {"experiment": NAME, "config": cfg, "store": info.path, "data": note}
    )
    log.info(f"config: {cfg}")
    with common3d.marking_run(run_dir, note):
        table = compare(cfg, info, run_dir)
    wall = time.perf_counter() - started
    finish_run(run_dir, "complete", data=note, wall_s=wall)
    print(f"MosMed CT-0 vs CT-2/3 on {note} (best epoch by validation loss)\n")
    print(table.drop(columns="memory measure").round(3).to_string())
    print(f"\n{memory_note(table)}\nwall time {wall:.1f} s")
    print(f"results: {run_dir}")
    return 0
