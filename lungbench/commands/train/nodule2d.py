"""Layer 12 (commands): `lungbench train nodule2d`: the recipe lungbench.experiments.nodule2d
with the options its config declares, and its printed tables."""

from __future__ import annotations

import argparse

from lungbench.commands._options import add_config_options
from lungbench.commands.train import _common as common
from lungbench.experiments import nodule2d as recipe
from lungbench.experiments.nodule2d import Nodule2DConfig, run

NAME = recipe.NAME  # the sub-command: `lungbench train NAME`
HELP = "seed 001: 2D nodule crops, LR finder, cosine/one-cycle, rotation aug, TTA, Grad-CAM"
DESCRIPTION = recipe.__doc__.split("\n\n")[1]  # the recipe's own summary
EPILOG = """\
examples:
  lungbench train nodule2d --quick
  lungbench train nodule2d --model resnet34 --epochs 50 --schedule onecycle
  lungbench train nodule2d --weights weights/resnet50-tv.pth --method A   (head only)
  lungbench train nodule2d --store crops.h5 --lr 1e-3     (a given --lr skips the LR finder)

Store: `lungbench data images --csv labels.csv ...` converts a folder of crops; without
--store the crops are generated slices through generated nodules (results say so)."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.epilog = EPILOG
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    quick = "smoke run: 160 crops, resnet18, 4 one-cycle epochs, 20 LR-finder steps"
    add_config_options(p, Nodule2DConfig, recipe.FULL, recipe.QUICK, quick_help=quick)
    common.add_output_options(p)
    common.add_resume_option(p)


def make_config(args: argparse.Namespace) -> Nodule2DConfig:
    # A given --lr skips the LR finder; without one the finder's suggestion replaces FULL's.
    return common.recipe_config(
        args, Nodule2DConfig, recipe.FULL, recipe.QUICK, find_lr=args.lr is None
    )


def main(args: argparse.Namespace) -> int:
    point = common.resume_point(args, NAME)
    if point is not None:  # the run's saved config (with the LR finder's lr), in its folder
        cfg = common.resumed_config(args, Nodule2DConfig, point.config[NAME])
        done = run(cfg, point.run_dir.parent, point.run_dir.name, resume=point)
    else:
        done = run(make_config(args), args.out, args.run_id)
    print(f"\n{done.text}")
    print(f"\nresults: {done.run_dir}")
    return 0
