"""Layer 12 (commands): `lungbench train mosmed`: the recipe lungbench.experiments.mosmed
with the options its config declares, and its printed table."""

from __future__ import annotations

import argparse

from lungbench.commands._args import non_negative_int
from lungbench.commands._options import add_config_options, section
from lungbench.commands.train import _common as common
from lungbench.experiments import mosmed as recipe
from lungbench.experiments.mosmed import MosmedConfig, memory_note, run

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
    add_config_options(p, MosmedConfig, recipe.FULL, recipe.QUICK, quick_help=common.QUICK_HELP)
    section(p, "data and model").add_argument(
        "--data-seed",
        type=non_negative_int,
        default=0,
        help="seed of the generated data set (default: 0)",
    )
    common.add_output_options(p)
    common.add_resume_option(p)


def make_config(args: argparse.Namespace) -> MosmedConfig:
    return common.recipe_config(args, MosmedConfig, recipe.FULL, recipe.QUICK)


def main(args: argparse.Namespace) -> int:
    point = common.resume_point(args, NAME)
    if point is not None:  # the run's saved config and data, continued in its folder
        cfg = common.resumed_config(args, MosmedConfig, point.config["config"])
        seed = int(point.config.get("data_seed", 0))
        done = run(cfg, point.run_dir.parent, point.run_dir.name, seed, resume=point)
    else:
        done = run(make_config(args), args.out, args.run_id, args.data_seed)
    print(f"MosMed CT-0 vs CT-2/3 on {done.data} (best epoch by validation loss)\n")
    print(done.table.drop(columns="memory measure").round(3).to_string())
    print(f"\n{memory_note(done.table)}\nwall time {done.wall_s:.1f} s")
    print(f"results: {done.run_dir}")
    return 0
