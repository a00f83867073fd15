"""Layer 12 (commands): `lungbench train EXPERIMENT`, the training recipes of the seeds.

Each command module in EXPERIMENT_MODULES (one per recipe of lungbench.experiments) exposes
NAME, HELP, DESCRIPTION, `add_arguments(parser)` (the options the recipe's config declares on
its fields, made by lungbench.commands._options, and the few that only the command has, such
as --out) and `main(args) -> int`, which builds the recipe's config from the options, runs
the recipe and prints its tables; one that sets DISTRIBUTED = True joins the launcher's
process group itself (DDP), the others refuse to run under a launcher.
"""

from __future__ import annotations

import argparse
import functools
import importlib

from lungbench.commands import Lazy, LazySubParsers

# sub-command -> (command module, its one-line help; tests/test_startup.py checks them against
# the module's NAME and HELP). A recipe's module (torch; MONAI for the 2D backbones) is
# imported only when that recipe is chosen: `lungbench train --help` imports none of them.
EXPERIMENTS: dict[str, tuple[str, str]] = {
    "chestxray": (
        "lungbench.commands.train.chestxray",
        "seed 004: transfer methods A-D x pretrained weights, weighted BCE, 5-fold CV, costs",
    ),
    "nodule2d": (
        "lungbench.commands.train.nodule2d",
        "seed 001: 2D nodule crops, LR finder, cosine/one-cycle, rotation aug, TTA, Grad-CAM",
    ),
    "lidc-pretrain": (
        "lungbench.commands.train.lidc_pretrain",
        "seed 000: pre-train the two-path 3D CNN on LIDC (20%% validation, batch 16)",
    ),
    "lungx-cv": (
        "lungbench.commands.train.lungx_cv",
        "seed 000: LUNGx 3-fold CV, LIDC only / w/o / w/ pre-training (AUC table, confusion)",
    ),
    "mosmed": (
        "lungbench.commands.train.mosmed",
        "seed 002: CT-0 vs CT-2/3 with the MosMed 3D CNN and its six modifications",
    ),
}
EXPERIMENT_MODULES: list[str] = [module for module, _ in EXPERIMENTS.values()]


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="full training runs: the experiments of the seeds (AUC tables, confusion matrices)",
        description="Train and evaluate models; every experiment runs on generated data by "
        "default (say so in any result) and on real stores when given.",
    )
    sub = parser.add_subparsers(
        dest="experiment", metavar="EXPERIMENT", required=True, action=LazySubParsers
    )
    for name, (module, summary) in EXPERIMENTS.items():
        sub.add_lazy(name, Lazy(summary, functools.partial(_register_experiment, module)))


def _register_experiment(module_name: str, subparsers: argparse._SubParsersAction) -> None:
    module = importlib.import_module(module_name)
    p = subparsers.add_parser(module.NAME, help=module.HELP, description=module.DESCRIPTION)
    module.add_arguments(p)
    run = module.main if getattr(module, "DISTRIBUTED", False) else _single(module)
    p.set_defaults(func=_out_checked(run))


def _out_checked(run):
    """--out checked before an experiment generates data or makes its run folder."""

    def checked(args: argparse.Namespace) -> int:
        from lungbench.core.paths import check_out_dir

        if getattr(args, "out", None):
            check_out_dir(args.out)
        return run(args)

    return checked


def _single(module):
    """module.main, refused under a multi-process launcher (it trains in one process)."""

    def run(args: argparse.Namespace) -> int:
        from lungbench.distributed.launch import require_single_process

        require_single_process(
            f"lungbench train {module.NAME}",
            "; DDP training: `lungbench train lidc-pretrain` under the launcher",
        )
        return module.main(args)

    return run
