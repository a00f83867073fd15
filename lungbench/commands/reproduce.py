"""Layer 12 (commands): `lungbench reproduce`: every twin of the seeds' experiments, one resumable run, one report."""

from __future__ import annotations

import argparse
import sys

DESCRIPTION = """\
Run every twin of the seeds' experiments one after another, each in its own run folder
inside this run's folder, and end with one report (report.html, report.md) that lists the
twins and shows, for each, its tables beside the published ones (results/reference/):

  speedup        seed 000  CPU (vs GPU) speed-up table               (lungbench bench)
  lidc-pretrain  seed 000  LIDC pre-training: best epoch, accuracy, AUC
  lungx-cv       seed 000  LUNGx 3-fold CV: AUC and confusion tables (fine-tunes lidc-pretrain's model)
  mosmed         seed 002  MosMed 3D CNN and its six variants
  chestxray      seed 004  methods x weights, transfer-learning and cost tables
  nodule2d       seed 001  2D nodule crops: LR finder, one-cycle, TTA, Grad-CAM

--quick runs each at its --quick size (generated data; about a minute in all on 2 quiet CPU
cores); without it, the full sizes (hours on a CPU, most of them MosMed and the chest
X-rays: a GPU node is the place). Before anything runs it prints the time it expects per
twin: the twin's last wall time at that size on this host and device, else the quick time
measured on a quiet 2-core VM, at full size plus the full training's FLOPs (training
samples x FLOPs per sample) at the rate that network's training step sustained there.

A kill (Ctrl-C, SIGTERM, a time limit) leaves the state in RUN/reproduce.json and a report
of what finished; --resume RUN skips the twins that completed and continues the others in
their folders (finished folds and fits kept). A twin that fails is reported and the others
still run (exit code 1)."""

EPILOG = """\
examples:
  lungbench reproduce --quick                          every twin, small (minutes)
  lungbench reproduce --quick --only nodule2d mosmed   two of them
  lungbench reproduce --estimate                       the full-size estimate, nothing run
  lungbench reproduce --device cuda --run-id repro     full size on a GPU node
  lungbench reproduce --resume results/repro           continue after a kill"""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "reproduce",
        help="every twin of the seeds' experiments (--quick: minutes), resumable, one report",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--quick",
        action="store_true",
        default=None,
        help="each twin at its --quick size (default: full size)",
    )
    p.add_argument(
        "--only",
        nargs="+",
        metavar="NAME",
        default=None,
        help="these twins only (default: all): speedup lidc-pretrain lungx-cv mosmed "
        "chestxray nodule2d",
    )
    p.add_argument(
        "--device",
        default=None,
        help="cpu, cuda or cuda:N for the training twins; with cuda the speed-up table has "
        "CPU and GPU rows (default: cpu)",
    )
    p.add_argument(
        "--estimate",
        action="store_true",
        help="print the plan and its time estimate, run nothing",
    )
    o = p.add_argument_group("output")
    o.add_argument("--out", default="results", help="output root (default: results)")
    o.add_argument(
        "--run-id", default=None, help="run folder name (default: reproduce-<UTC time>-<host>)"
    )
    o.add_argument(
        "--resume",
        default=None,
        metavar="RUN",
        help="continue a stopped reproduction (its folder, or its id under --out) with its "
        "twins, size and device",
    )
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from lungbench.core.errors import UsageError
    from lungbench.core.runs import markdown
    from lungbench.distributed.launch import require_single_process
    from lungbench.experiments import reproduce as recipe
    from lungbench.harness.sweep_state import interrupt_exit_code
    from lungbench.train.engine import TrainingInterrupted

    require_single_process("lungbench reproduce", "; run the twins one by one under the launcher")
    if args.resume is not None:
        plan = recipe.plan_resume(args.resume, args.out)
        saved = plan.config
        given = {
            "--quick": (args.quick, saved.quick),
            "--only": (
                recipe.twin_names(args.only) if args.only else None,
                saved.twins,
            ),
            "--device": (args.device, saved.device),
            "--run-id": (args.run_id, plan.run_dir.name),
        }
        differ = [flag for flag, (value, have) in given.items() if value not in (None, have)]
        if differ:
            raise UsageError(
                f"--resume {args.resume}: continues with its saved twins, size and device; "
                f"drop {', '.join(differ)}"
            )
    else:
        plan = recipe.plan(args.only, bool(args.quick), args.device or "cpu", args.out, args.run_id)
    size = "quick" if plan.config.quick else "full size"
    print(
        f"lungbench reproduce ({size}, {plan.config.device}): "
        f"{len(plan.pending)} of {len(plan.config.twins)} twin(s) to run"
    )
    if plan.estimates:
        print(markdown(recipe.estimate_table(plan.estimates), index=False))
        print(f"({recipe.HOW_ESTIMATED})\n", flush=True)
    if args.estimate:
        return 0
    try:
        done = recipe.reproduce(plan)
    except (KeyboardInterrupt, TrainingInterrupted) as exc:  # Ctrl-C, SIGTERM: state + report
        print(
            f"lungbench reproduce: interrupted; continue with `lungbench reproduce --resume "
            f"{plan.run_dir}`",
            file=sys.stderr,
        )
        return interrupt_exit_code(exc)
    print(recipe.summary_text(done))
    for warning in done.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(f"\nreport:   {done.report_html}\nmarkdown: {done.report_md}\nresults:  {done.run_dir}")
    if done.failed:
        print(f"error: twin(s) failed: {', '.join(done.failed)} (see above)", file=sys.stderr)
        return 1
    return 0
