"""Layer 10 (commands): `lungbench train lidc-pretrain`, the options of the recipe
lungbench.experiments.lidc_pretrain, the launcher's process group, and its printed summary."""

from __future__ import annotations

import argparse

from lungbench.commands._args import (
    add_dist_timeout,
    non_negative_int,
    positive_int,
    unit_fraction,
)
from lungbench.commands.train import _common as common
from lungbench.distributed.group import init_distributed, shutdown
from lungbench.experiments import lidc_pretrain as recipe
from lungbench.experiments.lidc_pretrain import FULL, QUICK, PretrainConfig, run

NAME = recipe.NAME  # the sub-command: `lungbench train NAME`
HELP = "seed 000: pre-train the two-path 3D CNN on LIDC (20%% validation, batch 16)"
DESCRIPTION = """\
Pre-train the two-path 3D CNN (dualpath3d) of seed 000 on LIDC-IDRI nodules: a stratified
20% of the nodules for validation, batch 16, Adam; the best epoch is the one with the lowest
validation loss, and its accuracy and AUC on the validation set are reported (the thesis:
epoch 63, accuracy 0.78, AUC 0.90). Default data: generated LIDC-like nodules (not the real
archive); --store uses a real store (`lungbench data ...`). The checkpoint of the best epoch
(RUN/checkpoint_best.pt) is what `lungbench train lungx-cv --pretrained` fine-tunes.
SIGTERM/SIGUSR1 (SLURM before a time limit) write a checkpoint and exit with code 143;
--resume RUN/checkpoint_last.pt continues exactly.

examples:
  lungbench train lidc-pretrain --quick
  lungbench train lidc-pretrain --epochs 100 --patience 20 --device cuda
  lungbench train lidc-pretrain --store lidc.h5 --resume results/RUN/checkpoint_last.pt
  torchrun --nproc_per_node 4 -m lungbench train lidc-pretrain --device cuda --batch 4

Under torchrun / srun / mpiexec it trains with DDP (NCCL on GPUs, Gloo on CPUs): --batch is
per process (4 x 4 = the thesis's 16), only rank 0 writes and prints."""

# lungbench.commands.train: this experiment joins the launcher's process group itself.
DISTRIBUTED = True


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    d = p.add_argument_group("data and model")
    d.add_argument(
        "--store",
        default=None,
        help="nodule store with context/zoom cubes (default: generated LIDC-like "
        "nodules, cached in OUT/data/)",
    )
    d.add_argument(
        "--synth-n",
        type=positive_int,
        default=None,
        help=f"generated nodules when no --store (default: {FULL['synth_n']}, the "
        f"thesis's LIDC count; --quick: {QUICK['synth_n']})",
    )
    d.add_argument(
        "--val-fraction",
        type=unit_fraction,
        default=0.2,
        help="stratified validation share (default: 0.2, the thesis)",
    )
    d.add_argument(
        "--filters",
        type=positive_int,
        default=None,
        help=f"base width of dualpath3d (default: {FULL['filters']}; --quick: {QUICK['filters']})",
    )
    d.add_argument(
        "--depth",
        type=positive_int,
        default=None,
        help=f"conv levels per path (default: {FULL['depth']}; --quick: {QUICK['depth']})",
    )
    d.add_argument(
        "--resume",
        default=None,
        help="continue exactly from a checkpoint_last.pt (default: start afresh); under a "
        "launcher, with the number of processes that wrote it",
    )
    d.add_argument(
        "--data-seed",
        type=non_negative_int,
        default=0,
        help="seed of the generated data set (default: 0)",
    )
    common.add_train_arguments(p, FULL, QUICK)
    add_dist_timeout(p.add_argument_group("under a launcher (DDP)"))


def make_config(args: argparse.Namespace) -> PretrainConfig:
    return PretrainConfig(
        train=common.train_config(args, FULL, QUICK),
        store=args.store,
        synth_n=common.resolve(args, "synth_n", FULL, QUICK),
        filters=common.resolve(args, "filters", FULL, QUICK),
        depth=common.resolve(args, "depth", FULL, QUICK),
        val_fraction=args.val_fraction,
        quick=args.quick,
    )


def main(args: argparse.Namespace) -> int:
    cfg = make_config(args)
    # world size 1 without a launcher
    dist = init_distributed(cfg.train.device, timeout_s=args.dist_timeout)
    try:
        done = run(cfg, args.out, args.run_id, args.data_seed, args.resume, dist)
    finally:
        shutdown(dist)
    if done is None:  # not rank 0: rank 0 writes and prints
        return 0
    print(f"LIDC pre-training on {done.data}")
    print(done.result.summary.T.to_string())
    print(f"\nresults: {done.run_dir}\nbest checkpoint: {done.result.checkpoint}")
    return 0
