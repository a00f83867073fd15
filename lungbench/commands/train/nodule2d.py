"""Layer 10 (commands): `lungbench train nodule2d`, the options of the recipe
lungbench.experiments.nodule2d, and its printed tables."""

from __future__ import annotations

import argparse

from lungbench.commands._args import non_negative_int, positive_int
from lungbench.commands.train import _common as common
from lungbench.core.errors import UsageError
from lungbench.experiments import common2d as c2d
from lungbench.experiments import nodule2d as recipe
from lungbench.experiments.nodule2d import DEFAULTS, QUICK, Nodule2DConfig, run
from lungbench.train.config import SCHEDULES, TrainConfig
from lungbench.train.transfer import parse_method
from lungbench.train.tta import DEFAULT_VIEWS

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
    g = p.add_argument_group("data")
    g.add_argument(
        "--store",
        default=None,
        help="binary image store of crops (default: generated nodule slices)",
    )
    g.add_argument(
        "--n", type=positive_int, default=None, help="generated crops (default: 600; --quick: 80)"
    )
    g.add_argument(
        "--image-size",
        type=positive_int,
        default=64,
        help="generated crop size in pixels (default: 64, as the seed)",
    )
    g.add_argument(
        "--augmentation",
        default="rotation_only",
        help="training augmentation preset of lungbench.data.transforms: none, "
        "rotation_only, flips, standard (default: rotation_only, as the seed)",
    )
    m = p.add_argument_group("model")
    m.add_argument(
        "--model",
        choices=c2d.BACKBONES,
        default=None,
        help="network (default: resnet50, the seed's choice; --quick: resnet18)",
    )
    m.add_argument(
        "--method",
        default="C",
        help="transfer method A, B_<depth>, C or D (default: C; without --weights "
        "C starts from random weights)",
    )
    m.add_argument(
        "--weights",
        default=None,
        help="local pretrained weights (torchvision/MONAI .pth or lungbench "
        "checkpoint; default: none)",
    )
    t = p.add_argument_group("training")
    t.add_argument(
        "--epochs", type=positive_int, default=None, help="epochs (default: 30; --quick: 2)"
    )
    t.add_argument("--batch-size", type=positive_int, default=32, help="batch size (default: 32)")
    t.add_argument(
        "--lr",
        type=float,
        default=None,
        help="learning rate; given, the LR finder is skipped (default: run the LR finder and "
        "train with its suggestion)",
    )
    t.add_argument(
        "--lr-iters",
        type=positive_int,
        default=None,
        help="LR finder steps, >= 5, without --lr (default: 100; --quick: 20)",
    )
    t.add_argument(
        "--schedule",
        choices=SCHEDULES,
        default="cosine",
        help="LR schedule (default: cosine annealing, as the seed)",
    )
    t.add_argument(
        "--tta",
        nargs="+",
        default=list(DEFAULT_VIEWS),
        help=f"TTA views (default: all 8: {' '.join(DEFAULT_VIEWS)})",
    )
    t.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    t.add_argument(
        "--workers", type=non_negative_int, default=0, help="DataLoader workers (default: 0)"
    )
    t.add_argument("--seed", type=non_negative_int, default=0, help="random seed (default: 0)")
    common.add_telemetry_argument(t)
    o = p.add_argument_group("output")
    o.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 80 crops, resnet18, 2 epochs, 20 LR-finder steps",
    )
    o.add_argument("--out", default="results", help="output root (default: results)")
    o.add_argument("--run-id", default=None, help="run folder name (default: train-<UTC>-<host>)")


def make_config(args: argparse.Namespace) -> Nodule2DConfig:
    base = QUICK if args.quick else DEFAULTS

    def pick(name):
        value = getattr(args, name)
        return base[name] if value is None else value

    parse_method(args.method)
    from lungbench.core.device import parse_device
    from lungbench.core.errors import look_up_option
    from lungbench.data.transforms import PRESETS
    from lungbench.train.tta import VIEWS

    parse_device(args.device)
    if args.lr is not None and not args.lr > 0:
        raise UsageError(f"--lr must be > 0, got {args.lr}")
    if args.lr is None and pick("lr_iters") < 5:
        raise UsageError(
            f"--lr-iters: the LR finder needs at least 5 steps, got {pick('lr_iters')}"
        )
    if args.store is None:
        if args.image_size < 32:
            raise UsageError(
                f"--image-size must be >= 32 pixels (the networks downsample 32x), "
                f"got {args.image_size}"
            )
        if pick("n") < 10:
            raise UsageError(f"--n: nodule2d needs at least 10 crops, got {pick('n')}")
    look_up_option(args.augmentation, PRESETS, what="augmentation preset")
    for view in args.tta:
        look_up_option(view, VIEWS, what="TTA view")
    train = TrainConfig(
        epochs=pick("epochs"),
        batch_size=args.batch_size,
        lr=args.lr or 1e-3,  # the LR finder's suggestion replaces it when no --lr
        schedule=args.schedule,
        seed=args.seed,
        num_workers=args.workers,
        device=args.device,
        tensorboard=False,
        telemetry_interval=args.telemetry_interval,
    )
    return Nodule2DConfig(
        model=pick("model"),
        method=args.method,
        weights=args.weights,
        store=args.store,
        n=pick("n"),
        image_size=args.image_size,
        augmentation=args.augmentation,
        lr_iters=pick("lr_iters"),
        tta_views=tuple(args.tta),
        generated=args.store is None,
        train=train,
        find_lr=args.lr is None,
    )


def main(args: argparse.Namespace) -> int:
    done = run(make_config(args), args.out, args.run_id)
    print(f"\n{done.text}")
    print(f"\nresults: {done.run_dir}")
    return 0
