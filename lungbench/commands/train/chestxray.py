"""Layer 12 (commands): `lungbench train chestxray`: the recipe lungbench.experiments.chestxray
with the options its config declares, and its printed tables."""

from __future__ import annotations

import argparse

from lungbench.commands._options import add_config_options
from lungbench.commands.train import _common as common
from lungbench.experiments import chestxray as recipe
from lungbench.experiments.chestxray import ChestXrayConfig, run

NAME = recipe.NAME  # the sub-command: `lungbench train NAME`
HELP = "seed 004: transfer methods A-D x pretrained weights, weighted BCE, 5-fold CV, costs"
DESCRIPTION = recipe.__doc__.split("\n\n")[1]  # the recipe's own summary
EPILOG = """\
examples:
  lungbench train chestxray --quick
      generated X-rays (13 findings), ResNet18, 2 folds x methods A, B_9, C, D: 8 fits
  lungbench train chestxray --resume results/RUN
      a stopped run continued in its folder: the fits it lacks, then every table
  lungbench train chestxray --model densenet121 --methods A B_88 C --epochs 30
  lungbench train chestxray --store cxr.h5 --weights ImageNet=weights/resnet50-tv.pth \\
      --methods C --save-models --run-id cxr8
      a weight chain, link 2: ImageNet -> ChestX-ray8, every fold's model kept in models/
  lungbench train chestxray --store target.h5 --labels Effusion Nodule Mass \\
      --weights ChestX-ray8=results/cxr8/models/ImageNet_C_fold1.pt
      link 3: the ChestX-ray8 model as initial values (C) or frozen layers (A, B_*)
  lungbench train chestxray --cost-only --cost-models resnet50 densenet121 --gpu-memory-gb 16

weights: NAME=PATH, a local torchvision/MONAI state dict or a lungbench checkpoint (a weight
chain: point at an earlier run's checkpoint; each checkpoint records the chain it came
from). Nothing is ever downloaded. Without --weights,
the network is first pretrained on generated nodule slices and that checkpoint is the source.
Store: `lungbench data images --csv Data_Entry_2017.csv ...` converts ChestX-ray8."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.epilog = EPILOG
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    quick = (
        "tiny settings for a smoke run (60 images of 32x32, 1 epoch, 2 folds x A, the middle "
        "B depth, C, D: 8 fits)"
    )
    add_config_options(p, ChestXrayConfig, recipe.FULL, recipe.QUICK, quick_help=quick)
    common.add_output_options(p)
    common.add_resume_option(p)


def make_config(args: argparse.Namespace) -> ChestXrayConfig:
    return common.recipe_config(args, ChestXrayConfig, recipe.FULL, recipe.QUICK)


def main(args: argparse.Namespace) -> int:
    point = common.resume_point(args, NAME)
    if point is not None:  # the run's saved config, continued in its folder
        cfg = common.resumed_config(args, ChestXrayConfig, point.config[NAME])
        done = run(cfg, point.run_dir.parent, point.run_dir.name, resume=point)
    else:
        done = run(make_config(args), args.out, args.run_id)
    for section in done.sections:
        print(f"\n{section}")
    print(f"\nresults: {done.run_dir}")
    return 0
