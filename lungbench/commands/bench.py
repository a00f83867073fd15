"""Layer 12 (commands): `lungbench bench`: the speed-up sweep (batch size x filters x device) of seed 000."""

from __future__ import annotations

import argparse
import json
import sys

from lungbench.commands._args import add_dist_timeout
from lungbench.commands._options import add_config_options, config_from_args, section
from lungbench.commands._quality import add_quality_options, run_quality_cli
from lungbench.commands._speed import (
    MODES,
    add_eager_fp32,
    add_mode_options,
    asked_switches,
    run_ablation_cli,
    run_loader_cli,
)
from lungbench.experiments.speedup import DATA, FINDER, HOW, WHAT, BenchRequest, run_bench
from lungbench.switches import SWITCH_OPTIONS

LAUNCHER = "under a launcher (torchrun, srun, mpiexec; see hpc/README.md)"

DESCRIPTION = """\
Measure how fast a 3D CNN trains: for every combination of filters x batch size x device
(x CPU threads), time the training step on resident tensors (warm-up off the clock, then
repeats; forward, backward and optimizer timed separately; median, IQR, p90/p95) and one
end-to-end epoch through the DataLoader ("Exec. time", the thesis's column), then write
the thesis's speed-up table, long-form CSV/JSONL and plots to results/<run-id>/.

With no options: CPU, the generated LIDC-like data set (754 nodules, epoch = the 603 of
the 80% training split), batch 2, 4, 8 x filters 8, 16; a few minutes on 2 cores."""

EPILOG = """\
examples:
  lungbench bench                                      the default CPU sweep
  lungbench bench --device cpu cuda --filters 8 16 --batch 2
                                                       the thesis's table: CPU vs 1 GPU
  lungbench bench --threads 1 2 --batch 2 --no-epoch   thread scaling, compute only
  lungbench bench --store lidc.h5 --epoch-samples 128  your own store, shorter epochs
  lungbench bench --config bench/sweeps/thesis.toml    a sweep written down in TOML
  lungbench bench --resume results/<run-id>            finish an interrupted sweep
  torchrun --standalone --nproc_per_node 4 -m lungbench bench --device cpu cuda --batch 2
                                  CPU, 1 GPU and 4 GPUs (DDP) in one run; also under srun
                                  or mpiexec: see hpc/README.md (scaling tables added)

output: results/<run-id>/{run.json, config.json, environment.json, records.jsonl,
        tables/{summary,measurements,speedup_b<B>}.csv|.md, plots/*.png}

memory: a configuration whose step cannot fit (an FP32 estimate of weights, gradients,
optimizer state and activations against the device's free memory) is not run: it is
recorded "oom" with the estimate and the largest batch that fits. LUNGBENCH_MEMORY_LIMIT
(e.g. 8GiB) sets the memory to plan with. Exit status 1 when every configuration failed."""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "bench",
        help="speed-up sweep: batch size x filters x device (the thesis's table)",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    for title in (WHAT, HOW, DATA, LAUNCHER, SWITCH_OPTIONS, MODES, FINDER):
        section(p, title)  # the --help sections in this order
    # Every BenchRequest field declared with option(...): its flag, parser, default, help.
    add_config_options(p, BenchRequest, quick_help=None)
    section(p, WHAT).add_argument(
        "--list-models", action="store_true", help="list registered models and exit"
    )
    d = section(p, DATA)
    d.add_argument(
        "--resume",
        default=None,
        metavar="RUN",
        help="continue an interrupted run (its folder, or its id under --out) with "
        "its saved options, measuring only the configurations it lacks",
    )
    d.add_argument(
        "--config",
        default=None,
        metavar="FILE.toml",
        help="read the sweep from a TOML file (e.g. bench/sweeps/thesis.toml); "
        "options given on the command line override it",
    )
    dd = section(p, LAUNCHER)
    dd.add_argument(
        "--scaling",
        choices=["weak", "strong", "both"],
        default="both",
        help="DDP modes: weak (per-process batch = --batch) or strong (global "
        "batch = --batch, split over the ranks) (default: both)",
    )
    dd.add_argument(
        "--no-baseline",
        dest="baseline",
        action="store_false",
        help="skip the 1-process reference that rank 0 measures first",
    )
    add_dist_timeout(dd)
    add_eager_fp32(p)
    add_mode_options(p)  # --ablation, --loader
    add_quality_options(p)  # --to-quality (lungbench.commands._quality)
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from lungbench.models import list_models

    if args.list_models:
        print("\n".join(list_models()))
        return 0
    request = config_from_args(args, BenchRequest)
    if args.to_quality:
        return run_quality_cli(request, args)
    if args.ablation or args.loader:
        from lungbench.distributed.launch import require_single_process

        require_single_process("--ablation" if args.ablation else "--loader")
        run_mode = run_ablation_cli if args.ablation else run_loader_cli
        return run_mode(request, args)
    request = asked_switches(request, args.eager_fp32, request.devices)
    from lungbench.harness.sweep_state import apply_resume_and_config, interrupt_exit_code

    request, resume = apply_resume_and_config(request, BenchRequest(), args.config, args.resume)
    from lungbench.distributed.group import group_session, init_distributed
    from lungbench.harness.ddp import DDPOptions, parse_scaling

    # One process without a launcher: world size 1, no process group, the plain sweep.
    dist = init_distributed(_group_device(request.devices), timeout_s=args.dist_timeout)
    ddp = DDPOptions(
        parse_scaling(args.scaling), args.baseline, args.dist_timeout, cached_tuning=request.tune
    )
    if dist.is_distributed and resume is not None:
        from lungbench.core.errors import UsageError

        raise UsageError("--resume: not supported under a launcher; start a new run")
    try:
        with group_session(dist):
            result = run_bench(request, resume=resume, dist=dist, ddp=ddp)
    except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM: the run is saved as "interrupted"
        return interrupt_exit_code(exc)
    if not dist.is_main:
        return 0  # only rank 0 prints and writes
    print(result.table_text)
    print(f"\nresults: {result.run_dir}")
    failed = sum(r["status"] != "ok" for r in result.records)
    print(json.dumps({"configs": len(result.records), "failed": failed}))
    if result.records and failed == len(result.records):
        print(
            "error: every configuration failed (see above); nothing was measured", file=sys.stderr
        )
        return 1
    return 0


def _group_device(devices) -> str:
    """The process group's device: CUDA when one is asked for and present, else CPU (an
    absent GPU is reported by the option check that follows)."""
    import torch

    wants_cuda = any(d.startswith("cuda") for d in devices)
    return "cuda" if wants_cuda and torch.cuda.is_available() else "cpu"
