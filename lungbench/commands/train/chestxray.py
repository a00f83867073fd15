"""Layer 10 (commands): `lungbench train chestxray`, the options of the recipe
lungbench.experiments.chestxray, and its printed tables."""

from __future__ import annotations

import argparse

from lungbench.commands._args import non_negative_int, positive_int, unit_fraction
from lungbench.commands.train import _common as common
from lungbench.core.errors import UsageError
from lungbench.experiments import chestxray as recipe
from lungbench.experiments import common2d as c2d
from lungbench.experiments.chestxray import (
    DEFAULTS,
    QUICK,
    ChestXrayConfig,
    run,
)
from lungbench.train.config import TrainConfig

NAME = recipe.NAME  # the sub-command: `lungbench train NAME`
HELP = "seed 004: transfer methods A-D x pretrained weights, weighted BCE, 5-fold CV, costs"
DESCRIPTION = recipe.__doc__.split("\n\n")[1]  # the recipe's own summary
EPILOG = """\
examples:
  lungbench train chestxray --quick
      generated X-rays (13 findings), ResNet50, methods A, B_10/22/40, C, D, 5 folds
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
    g = p.add_argument_group("data")
    g.add_argument(
        "--store",
        default=None,
        help="multi-label image store (default: generated chest X-rays in the run's data/)",
    )
    g.add_argument(
        "--n", type=positive_int, default=None, help="generated images (default: 400; --quick: 60)"
    )
    g.add_argument(
        "--image-size",
        type=positive_int,
        default=None,
        help="generated image size in pixels, >= 32 (default: 64; --quick: 32)",
    )
    g.add_argument(
        "--labels",
        nargs="+",
        default=None,
        help="train on these labels of the store only (default: all of them)",
    )
    m = p.add_argument_group("model and methods")
    m.add_argument(
        "--model",
        choices=c2d.BACKBONES,
        default=None,
        help="network (default: resnet50, with Keras-compatible conv biases; --quick: resnet18)",
    )
    m.add_argument(
        "--methods",
        nargs="+",
        default=["A", "B", "C", "D"],
        help="transfer methods: A, B (every --freeze depth) or B_<depth>, C, D (default: A B C D)",
    )
    m.add_argument(
        "--freeze",
        nargs="+",
        default=None,
        help="B depths: layer counts or stage names (default: resnet50 10 22 40, "
        "densenet121 14 39 88, other networks every stage boundary)",
    )
    m.add_argument(
        "--weights",
        action="append",
        default=None,
        metavar="NAME=PATH",
        help="a pretrained-weights source (repeat for several); default: pretrain "
        "on generated nodule slices",
    )
    m.add_argument(
        "--dropout", type=float, default=0.2, help="dropout before the output layer (default: 0.2)"
    )
    t = p.add_argument_group("training (seed 004: Adam, lr 1e-4, 30 epochs)")
    t.add_argument(
        "--epochs",
        type=positive_int,
        default=None,
        help="epochs per fold (default: 30; --quick: 1)",
    )
    t.add_argument(
        "--batch-size", type=positive_int, default=None, help="batch size (default: 16; --quick: 8)"
    )
    t.add_argument("--lr", type=float, default=1e-4, help="learning rate (default: 1e-4)")
    t.add_argument(
        "--patience",
        type=positive_int,
        default=None,
        help="early stopping patience in epochs (default: none)",
    )
    t.add_argument(
        "--folds",
        type=positive_int,
        default=5,
        help="cross-validation folds, >= 2, stratified by each image's rarest finding (default: 5)",
    )
    t.add_argument(
        "--val-fraction",
        type=unit_fraction,
        default=0.1,
        help="validation share of each training part (default: 0.1)",
    )
    t.add_argument(
        "--class-weights",
        choices=("dataset", "per-label"),
        default="dataset",
        help="weighted BCE's beta_P/beta_N: 'dataset' counts the 1s and 0s of all labels "
        "together, as seed 004 defines them; 'per-label' gives each finding its own "
        "(default: dataset)",
    )
    t.add_argument(
        "--save-models",
        action="store_true",
        help="keep every fold's best model as models/<weights>_<method>_fold<k>.pt, to start "
        "a weight chain from (--weights ChestX-ray8=that file in a later run)",
    )
    t.add_argument(
        "--pretrain-epochs",
        type=positive_int,
        default=None,
        help="epochs of generated-data pretraining without --weights (default: 5; --quick: 1)",
    )
    t.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    common.add_telemetry_argument(t)
    t.add_argument(
        "--workers", type=non_negative_int, default=0, help="DataLoader workers (default: 0)"
    )
    t.add_argument("--seed", type=non_negative_int, default=0, help="random seed (default: 0)")
    c = p.add_argument_group("cost table")
    c.add_argument(
        "--cost-only",
        action="store_true",
        help="only measure the cost table (for --cost-models), no CV",
    )
    c.add_argument(
        "--cost-models",
        nargs="+",
        choices=c2d.BACKBONES,
        default=["resnet50", "densenet121"],
        help="networks of --cost-only (default: resnet50 densenet121)",
    )
    c.add_argument(
        "--cost-samples",
        type=positive_int,
        default=None,
        help="training samples per timed epoch (default: 64; --quick: 32)",
    )
    c.add_argument(
        "--cost-epochs",
        type=positive_int,
        default=None,
        help="timed epochs per method, the first is warm-up (default: 3; --quick: 2)",
    )
    c.add_argument(
        "--gpu-memory-gb",
        type=float,
        default=16.0,
        help="memory per GPU for the 'min GPUs' column (default: 16)",
    )
    o = p.add_argument_group("output")
    o.add_argument(
        "--quick",
        action="store_true",
        help="tiny settings for a smoke run (60 images of 32x32, 1 epoch)",
    )
    o.add_argument("--out", default="results", help="output root (default: results)")
    o.add_argument("--run-id", default=None, help="run folder name (default: train-<UTC>-<host>)")


def make_config(args: argparse.Namespace) -> ChestXrayConfig:
    base = QUICK if args.quick else DEFAULTS

    def pick(name):
        value = getattr(args, name)
        return base[name] if value is None else value

    if not 0.0 <= args.dropout < 1.0:
        raise UsageError(f"--dropout must be in [0, 1), got {args.dropout}")
    if args.gpu_memory_gb <= 0:
        raise UsageError(f"--gpu-memory-gb must be > 0, got {args.gpu_memory_gb}")
    if not args.lr > 0:
        raise UsageError(f"--lr must be > 0, got {args.lr}")
    if args.folds < 2:
        raise UsageError(f"--folds must be >= 2 (each fold is the test set once), got {args.folds}")
    from lungbench.core.device import parse_device

    parse_device(args.device)
    if args.store is None:
        if pick("image_size") < 32:
            raise UsageError(
                "--image-size must be >= 32 pixels (the networks downsample 32x), "
                f"got {pick('image_size')}"
            )
        if args.folds > pick("n"):
            raise UsageError(f"--folds {args.folds} is more than the {pick('n')} images (--n)")
    train = TrainConfig(
        epochs=pick("epochs"),
        batch_size=pick("batch_size"),
        lr=args.lr,
        optimizer="adam",
        patience=args.patience,
        seed=args.seed,
        num_workers=args.workers,
        device=args.device,
        progress=False,
        log_epochs=False,  # dozens of fits (methods x folds); each prints its own summary
        tensorboard=False,
        telemetry_interval=args.telemetry_interval,  # fits with a folder: the pretraining
    )
    return ChestXrayConfig(
        model=pick("model"),
        methods=tuple(args.methods),
        weights=tuple(c2d.parse_weights(args.weights)),
        store=args.store,
        n=pick("n"),
        image_size=pick("image_size"),
        labels=tuple(args.labels or ()),
        folds=args.folds,
        val_fraction=args.val_fraction,
        dropout=args.dropout,
        per_label_weights=args.class_weights == "per-label",
        save_models=args.save_models,
        pretrain_epochs=pick("pretrain_epochs"),
        cost_models=tuple(args.cost_models),
        cost_samples=pick("cost_samples"),
        cost_epochs=pick("cost_epochs"),
        gpu_memory_gb=args.gpu_memory_gb,
        cost_only=args.cost_only,
        generated=args.store is None,
        train=train,
        freeze=tuple(args.freeze or ()),
    )


def main(args: argparse.Namespace) -> int:
    done = run(make_config(args), args.out, args.run_id)
    for section in done.sections:
        print(f"\n{section}")
    print(f"\nresults: {done.run_dir}")
    return 0
