"""Layer 10 (commands): `lungbench bench`: the speed-up sweep (batch size x filters x device) of seed 000."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lungbench.commands._args import (
    add_dist_timeout,
    non_negative_int,
    positive_float,
    positive_int,
)
from lungbench.commands._speed import (
    add_speed_options,
    run_ablation_cli,
    run_loader_cli,
    speed_request_fields,
)

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
    g = p.add_argument_group("what to measure")
    g.add_argument(
        "--model",
        default="dualpath3d",
        help="registered model (default: dualpath3d; see `--list-models`)",
    )
    g.add_argument(
        "--preset",
        default="default",
        help="geometry preset of the two-path model: default (32^3), iso64 (64^3), "
        "dey2018 (5x50x50) (default: default)",
    )
    g.add_argument(
        "--filters",
        type=positive_int,
        nargs="+",
        default=[8, 16],
        help="base widths to sweep (default: 8 16, as the thesis)",
    )
    g.add_argument(
        "--batch",
        type=positive_int,
        nargs="+",
        default=[2, 4, 8],
        help="batch sizes to sweep (default: 2 4 8)",
    )
    g.add_argument(
        "--device",
        nargs="+",
        default=["cpu"],
        help="devices: cpu, cuda, cuda:N (default: cpu); the first is the speed-up baseline",
    )
    g.add_argument(
        "--threads",
        type=positive_int,
        nargs="+",
        default=None,
        help="CPU intra-op thread counts to sweep (default: torch's, all cores)",
    )
    g.add_argument("--list-models", action="store_true", help="list registered models and exit")
    m = p.add_argument_group("how to measure")
    m.add_argument(
        "--warmup",
        type=non_negative_int,
        default=3,
        help="warm-up steps off the clock (default: 3)",
    )
    m.add_argument(
        "--repeats",
        type=positive_int,
        default=None,
        help="timed steps per configuration, exactly N (default: adaptive: at least 10, "
        "then on until the median step time's 95%% confidence interval is within "
        "+-CI-TARGET%%, or --max-repeats, or --time-budget; each record says which)",
    )
    m.add_argument(
        "--ci-target",
        type=positive_float,
        default=3.0,
        metavar="PERCENT",
        help="adaptive repeats: the half-width of the median's 95%% confidence interval to "
        "reach, in percent of the median (default: 3)",
    )
    m.add_argument(
        "--max-repeats",
        type=positive_int,
        default=100,
        help="adaptive repeats: at most this many timed steps (default: 100)",
    )
    m.add_argument(
        "--time-budget",
        type=positive_float,
        default=30.0,
        metavar="SECONDS",
        help="adaptive repeats: stop after this many seconds of timed steps (default: 30)",
    )
    m.add_argument(
        "--no-epoch",
        dest="epoch",
        action="store_false",
        help="skip the end-to-end epoch; the table then uses the step time",
    )
    m.add_argument(
        "--epoch-samples",
        type=positive_int,
        default=None,
        help="samples per timed epoch (default: the whole 80%% training split)",
    )
    m.add_argument(
        "--workers",
        type=non_negative_int,
        default=0,
        help="DataLoader worker processes for the epoch (default: 0)",
    )
    m.add_argument("--seed", type=non_negative_int, default=0, help="random seed (default: 0)")
    m.add_argument(
        "--telemetry-interval",
        type=float,
        default=0.5,
        metavar="SECONDS",
        help="GPU/CPU telemetry sampling interval per configuration, saved to "
        "telemetry/<config>.csv with a summary in each record; 0 = off (default: 0.5)",
    )
    d = p.add_argument_group("data and output")
    d.add_argument(
        "--store",
        default=None,
        help="HDF5 store to train the epoch on (default: generated LIDC-like set, "
        "cached in OUT/data/)",
    )
    d.add_argument(
        "--synth-n",
        type=positive_int,
        default=754,
        help="size of the generated set when no --store (default: 754); only the samples "
        "the run reads are generated: with --epoch-samples E the first ceil(E/0.8)+2, with "
        "--no-epoch 2, with --loader its --loader-samples",
    )
    d.add_argument("--out", default="results", help="output root (default: results)")
    d.add_argument("--run-id", default=None, help="run folder name (default: bench-<UTC>-<host>)")
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
    dd = p.add_argument_group("under a launcher (torchrun, srun, mpiexec; see hpc/README.md)")
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
    add_speed_options(p)  # switches, --ablation, --find-batch, --loader, data path
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from lungbench.models import list_models

    if args.list_models:
        print("\n".join(list_models()))
        return 0
    if args.ablation or args.loader:
        from lungbench.distributed.launch import require_single_process

        require_single_process("--ablation" if args.ablation else "--loader")
        return run_ablation_cli(args) if args.ablation else run_loader_cli(args)
    from lungbench.experiments.speedup import BenchRequest, run_bench

    request = BenchRequest(
        **speed_request_fields(args),
        model=args.model,
        preset=args.preset,
        # A value given twice would measure (and record) one configuration twice.
        filters=_unique(args.filters),
        batch_sizes=_unique(args.batch),
        devices=_unique(args.device),
        threads=_unique(args.threads) if args.threads else (None,),
        warmup=args.warmup,
        repeats=args.repeats,
        ci_target_pct=args.ci_target,
        max_repeats=args.max_repeats,
        time_budget_s=args.time_budget,
        epoch=args.epoch,
        epoch_samples=args.epoch_samples,
        num_workers=args.workers,
        seed=args.seed,
        store=Path(args.store) if args.store else None,
        synth_n=args.synth_n,
        out=Path(args.out),
        run_id=args.run_id,
        telemetry_interval=args.telemetry_interval,
    )
    from lungbench.measure.sweep_state import apply_resume_and_config, interrupt_exit_code

    request, resume = apply_resume_and_config(request, BenchRequest(), args.config, args.resume)
    from lungbench.distributed.group import init_distributed, shutdown
    from lungbench.measure.ddp import DDPOptions, parse_scaling

    # One process without a launcher: world size 1, no process group, the plain sweep.
    dist = init_distributed(_group_device(request.devices), timeout_s=args.dist_timeout)
    ddp = DDPOptions(parse_scaling(args.scaling), args.baseline, args.dist_timeout)
    if dist.is_distributed and resume is not None:
        from lungbench.core.errors import UsageError

        raise UsageError("--resume: not supported under a launcher; start a new run")
    try:
        result = run_bench(
            request,
            resume=resume,
            dist=dist,
            ddp=ddp,
        )
    except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM: the run is saved as "interrupted"
        return interrupt_exit_code(exc)
    finally:
        shutdown(dist)
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


def _unique(values) -> tuple:
    """The values in the order given, each once."""
    return tuple(dict.fromkeys(values))
