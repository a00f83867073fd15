"""Layer 12 (commands): `lungbench train lidc-pretrain`: the recipe
lungbench.experiments.lidc_pretrain with the options its config declares, the launcher's
process group, and its printed summary."""

from __future__ import annotations

import argparse
from pathlib import Path

from lungbench.commands._args import add_dist_timeout, non_negative_int
from lungbench.commands._options import add_config_options, section
from lungbench.commands.train import _common as common
from lungbench.distributed.group import group_session, init_distributed
from lungbench.experiments import lidc_pretrain as recipe
from lungbench.experiments.lidc_pretrain import PretrainConfig, run

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
--resume RUN continues that run folder exactly (from its checkpoint_last.pt), --resume
RUN/checkpoint_last.pt continues it into a new run folder.

examples:
  lungbench train lidc-pretrain --quick
  lungbench train lidc-pretrain --epochs 100 --patience 20 --device cuda
  lungbench train lidc-pretrain --quick --epochs 20 --target loss=0.5
      stops at the first epoch whose validation loss is <= 0.5; the time to it (wall
      time, epochs, samples seen) is printed and saved in RUN/run.json (time_to_quality)
  lungbench train lidc-pretrain --store lidc.h5 --resume results/RUN/checkpoint_last.pt
  lungbench train lidc-pretrain --resume results/RUN
  torchrun --nproc_per_node 4 -m lungbench train lidc-pretrain --device cuda --batch 4

Under torchrun / srun / mpiexec it trains with DDP (NCCL on GPUs, Gloo on CPUs): --batch is
per process (4 x 4 = the thesis's 16), only rank 0 writes and prints."""

# lungbench.commands.train: this experiment joins the launcher's process group itself.
DISTRIBUTED = True


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    add_config_options(p, PretrainConfig, recipe.FULL, recipe.QUICK, quick_help=common.QUICK_HELP)
    d = section(p, "data and model")
    d.add_argument(
        "--resume",
        default=None,
        metavar="RUN|CHECKPOINT",
        help="continue a stopped run folder in place (its folder, or its id under --out), or "
        "a checkpoint_last.pt into a new run folder, exactly (default: start afresh); under a "
        "launcher, with the number of processes that wrote it",
    )
    d.add_argument(
        "--data-seed",
        type=non_negative_int,
        default=0,
        help="seed of the generated data set (default: 0)",
    )
    common.add_output_options(p)
    add_dist_timeout(p.add_argument_group("under a launcher (DDP)"))


def make_config(args: argparse.Namespace) -> PretrainConfig:
    return common.recipe_config(args, PretrainConfig, recipe.FULL, recipe.QUICK)


def main(args: argparse.Namespace) -> int:
    resume, out, run_id, seed = args.resume, args.out, args.run_id, args.data_seed
    if resume is not None and _is_run_folder(resume, args.out):
        resume = common.resume_point(args, NAME)  # the run's saved config, in its folder
        cfg = common.resumed_config(args, PretrainConfig, resume.config["config"])
        out, run_id = resume.run_dir.parent, resume.run_dir.name
        seed = int(resume.config.get("data_seed", 0))
    else:
        cfg = make_config(args)
    # world size 1 without a launcher
    dist = init_distributed(cfg.train.device, timeout_s=args.dist_timeout)
    with group_session(dist):
        done = run(cfg, out, run_id, seed, resume, dist)
    if done is None:  # not rank 0: rank 0 writes and prints
        return 0
    print(f"LIDC pre-training on {done.data}")
    print(done.result.summary.T.to_string())
    quality = done.result.fit.time_to_quality
    if quality is not None:  # --target
        from lungbench.train.quality import QualityRecord

        print(f"\ntime to quality: {QualityRecord(**quality).line()}")
    print(f"\nresults: {done.run_dir}\nbest checkpoint: {done.result.checkpoint}")
    return 0


def _is_run_folder(path: str, out: str) -> bool:
    """--resume names a run folder (or a run id under --out), not a checkpoint file."""
    return Path(path).is_dir() or (not Path(path).is_absolute() and (Path(out) / path).is_dir())
