"""Layer 10 (commands): `lungbench train mosmed`, the options of the recipe
lungbench.experiments.mosmed, and its printed table."""

from __future__ import annotations

import argparse

from lungbench.commands._args import non_negative_int, positive_int, unit_fraction
from lungbench.commands.train import _common as common
from lungbench.experiments import mosmed as recipe
from lungbench.experiments.mosmed import (
    FULL,
    QUICK,
    VARIANTS,
    MosmedConfig,
    memory_note,
    run,
)

NAME = recipe.NAME  # the sub-command: `lungbench train NAME`
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
    common.add_train_arguments(p, FULL, QUICK)


def make_config(args: argparse.Namespace) -> MosmedConfig:
    def get(name):
        return common.resolve(args, name, FULL, QUICK)

    return MosmedConfig(
        train=common.train_config(args, FULL, QUICK),
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


def main(args: argparse.Namespace) -> int:
    done = run(make_config(args), args.out, args.run_id, args.data_seed)
    print(f"MosMed CT-0 vs CT-2/3 on {done.data} (best epoch by validation loss)\n")
    print(done.table.drop(columns="memory measure").round(3).to_string())
    print(f"\n{memory_note(done.table)}\nwall time {done.wall_s:.1f} s")
    print(f"results: {done.run_dir}")
    return 0
