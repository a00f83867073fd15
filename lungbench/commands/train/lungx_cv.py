"""Layer 10 (commands): `lungbench train lungx-cv`, the options of the recipe
lungbench.experiments.lungx_cv, and its printed AUC and confusion tables."""

from __future__ import annotations

import argparse

from lungbench.commands._args import non_negative_int, positive_int, unit_fraction
from lungbench.commands.train import _common as common
from lungbench.core.errors import UsageError
from lungbench.experiments import lungx_cv as recipe
from lungbench.experiments.lungx_cv import FULL, QUICK, REGIMES, CVConfig, run

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
    d = p.add_argument_group("data and model")
    d.add_argument(
        "--store",
        default=None,
        help="LUNGx nodule store (default: generated LUNGx-like nodules, where both "
        "classes have the same sizes, cached in OUT/data/)",
    )
    d.add_argument(
        "--synth-n",
        type=positive_int,
        default=None,
        help=f"generated LUNGx nodules when no --store (default: {FULL['synth_n']}, "
        f"the challenge's count; --quick: {QUICK['synth_n']})",
    )
    d.add_argument(
        "--folds",
        type=positive_int,
        default=3,
        help="cross-validation folds (default: 3), stratified and seeded by --seed; a "
        "--store whose /meta/fold assigns exactly these folds keeps its own",
    )
    d.add_argument(
        "--val-fraction",
        type=unit_fraction,
        default=0.1,
        help="validation share of the non-test folds (default: 0.1)",
    )
    d.add_argument(
        "--write-folds",
        action="store_true",
        help="save the seeded fold assignment into --store's /meta/fold, so that later "
        "runs on it keep these folds whatever their --seed (default: no; needs --store)",
    )
    d.add_argument(
        "--pretrained",
        default=None,
        help="LIDC checkpoint of dualpath3d (checkpoint_best.pt of lidc-pretrain) "
        "(default: run lidc-pretrain first)",
    )
    d.add_argument(
        "--lidc-store",
        default=None,
        help="LIDC store for that pre-training (default: generated LIDC-like)",
    )
    d.add_argument(
        "--finetune-lr",
        type=float,
        default=None,
        help=f"learning rate of the w/ pre-training regime (default: "
        f"{FULL['finetune_lr']}; --quick: {QUICK['finetune_lr']})",
    )
    d.add_argument(
        "--data-seed",
        type=non_negative_int,
        default=0,
        help="seed of the generated LUNGx-like set; the generated LIDC-like set for the "
        "pre-training uses this + 1 (default: 0)",
    )
    common.add_train_arguments(p, FULL, QUICK)


def make_config(args: argparse.Namespace) -> CVConfig:
    finetune_lr = common.resolve(args, "finetune_lr", FULL, QUICK)
    if finetune_lr <= 0:
        raise UsageError(f"--finetune-lr must be > 0, got {finetune_lr}")
    if args.write_folds and args.store is None:
        raise UsageError(
            "--write-folds needs --store: the generated default store is a cache shared by "
            "runs with any --seed and keeps no folds (each run's folds are in its "
            "tables/predictions.csv)"
        )
    return CVConfig(
        train=common.train_config(args, FULL, QUICK),
        finetune_lr=finetune_lr,
        folds=args.folds,
        val_fraction=args.val_fraction,
        store=args.store,
        synth_n=common.resolve(args, "synth_n", FULL, QUICK),
        pretrained=args.pretrained,
        write_folds=args.write_folds,
        quick=args.quick,
    )


def main(args: argparse.Namespace) -> int:
    cfg = make_config(args)
    done = run(cfg, args.out, args.run_id, args.data_seed, args.lidc_store)
    print(f"LUNGx {cfg.folds}-fold cross-validation on {done.data}; folds: {done.folds}\n")
    print(done.tables["auc"].round(3).to_string())
    for regime, name in REGIMES.items():
        print(f"\n{name}\n{done.tables[f'confusion_{regime}'].to_string()}")
    print(f"\nwall time {done.wall_s:.1f} s\nresults: {done.run_dir}")
    return 0
