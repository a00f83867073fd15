"""Layer 12 (commands): `lungbench train lungx-cv`: the recipe lungbench.experiments.lungx_cv
with the options its config declares, and its printed AUC and confusion tables."""

from __future__ import annotations

import argparse

from lungbench.commands._args import non_negative_int
from lungbench.commands._options import add_config_options, section
from lungbench.commands.train import _common as common
from lungbench.experiments import lungx_cv as recipe
from lungbench.experiments.lungx_cv import REGIMES, CVConfig, run

NAME = recipe.NAME  # the sub-command: `lungbench train NAME`
HELP = "seed 000: LUNGx 3-fold CV, LIDC only / w/o / w/ pre-training (AUC table, confusion)"
DESCRIPTION = """\
Seed 000's transfer-learning study on LUNGx: stratified 3-fold cross-validation (per fold one
subset for testing, 10% of the other two for validation, the rest for training), batch 8, in
three regimes: LIDC only (the pre-trained model as is), w/o pre-training (from scratch) and
w/ pre-training (fine-tuned from the LIDC checkpoint). Writes the AUC table (rows: regimes;
columns: fold 1-3, average), the confusion matrices with totals (threshold 0.5, pooled over
folds), loss curves per fold and ROC curves. Without --pretrained it first runs
lidc-pretrain (into RUN/lidc_pretrain/). Default data: generated LUNGx-like and LIDC-like
nodules (not the real archives).

folds: stratified --folds folds seeded by --seed; only a --store whose /meta/fold already
assigns exactly --folds folds keeps its own (--seed then still seeds the validation split,
initialisation and shuffling). The generated default store is shared by runs in OUT/data/
and never stores folds, so runs on it with another --seed get other folds.

outputs (in OUT/RUN-ID/): tables/auc.csv and .md, tables/confusion_REGIME.csv and .md,
tables/predictions.csv (fold, regime, id, label, probability of every test nodule),
metrics.csv, plots/loss_foldK.png, plots/roc.png, folds/foldK/REGIME/ (metrics.csv and
checkpoints), without --pretrained lidc_pretrain/ and tables/pretrain_summary.csv,
config.json, environment.json, run.json (config.json and run.json say how folds were made).

examples:
  lungbench train lungx-cv --quick
  lungbench train lungx-cv --pretrained results/RUN/checkpoint_best.pt
  lungbench train lungx-cv --store lungx.h5 --lidc-store lidc.h5 --device cuda"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    add_config_options(p, CVConfig, recipe.FULL, recipe.QUICK, quick_help=common.QUICK_HELP)
    d = section(p, "data and model")
    d.add_argument(
        "--lidc-store",
        default=None,
        help="LIDC store for the pre-training without --pretrained (default: generated LIDC-like)",
    )
    d.add_argument(
        "--data-seed",
        type=non_negative_int,
        default=0,
        help="seed of the generated LUNGx-like set; the generated LIDC-like set for the "
        "pre-training uses this + 1 (default: 0)",
    )
    common.add_output_options(p)
    common.add_resume_option(p)


def make_config(args: argparse.Namespace) -> CVConfig:
    return common.recipe_config(args, CVConfig, recipe.FULL, recipe.QUICK)


def main(args: argparse.Namespace) -> int:
    point = common.resume_point(args, NAME)
    if point is not None:  # the run's saved config and data, continued in its folder
        cfg = common.resumed_config(args, CVConfig, point.config["config"])
        seed, lidc = int(point.config.get("data_seed", 0)), point.config.get("lidc_store")
        done = run(cfg, point.run_dir.parent, point.run_dir.name, seed, lidc, resume=point)
    else:
        cfg = make_config(args)
        done = run(cfg, args.out, args.run_id, args.data_seed, args.lidc_store)
    print(f"LUNGx {cfg.folds}-fold cross-validation on {done.data}; folds: {done.folds}\n")
    print(done.tables["auc"].round(3).to_string())
    for regime, name in REGIMES.items():
        print(f"\n{name}\n{done.tables[f'confusion_{regime}'].to_string()}")
    print(f"\nwall time {done.wall_s:.1f} s\nresults: {done.run_dir}")
    return 0
