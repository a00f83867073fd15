"""Layer 12 (commands): `lungbench profile`: a training step under torch.profiler; traces for TensorBoard/Perfetto."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lungbench.commands._args import add_dist_timeout, positive_int
from lungbench.commands._options import add_config_options, config_from_args, section
from lungbench.commands._speed import add_switch_options, switch_request
from lungbench.harness.profiler import SCHEDULE, ProfileSchedule
from lungbench.measure.workload import WORKLOAD, Workload

# The workload profiled by default: the thesis's reference step (filters 16, batch 2).
PROFILED = Workload(filters=16)

DESCRIPTION = """\
Run the training step of a model (default: the two-path 3D CNN, filters 16, batch 2) under
torch.profiler with an explicit schedule: WAIT steps skipped, WARMUP steps profiled and
discarded, ACTIVE steps recorded, the cycle repeated REPEAT times. Each step is split into
the ranges data / forward / backward / optimizer (NVTX ranges too on CUDA).

The step is the one `lungbench bench` times (lungbench.step.TrainStep), with the same speed
switches: the same options give the same dtype, memory format and optimizer, and
profile.json records what ran (dtype_used, ...).

Writes to results/<run-id>/: traces/*.pt.trace.json (one per cycle; Chrome-trace JSON for
TensorBoard's torch-tb-profiler plugin, https://ui.perfetto.dev and chrome://tracing),
tables/operators.csv (top operators by self CPU, or CUDA, time), tables/phases.csv
(data / compute / communication per step) and profile.json (shares, communication overlap).
Under torchrun / srun / mpiexec every rank profiles its DDP step (traces/rank<R>.*), and the
summary gives the share of the gradient all-reduce that overlapped with compute. Its threads
and switches are those `lungbench bench` takes there: --threads, else each rank's share of its
node's cores; the choice a 1-process tuning pass cached on rank 0's host for one rank's
workload, else the device's table (profile.json: threads_used, tuning_source)."""

EPILOG = """\
examples:
  lungbench profile                                    CPU, filters 16, batch 2, 5 steps
  lungbench profile --filters 8 --preset iso64 --active 5
  lungbench profile --device cuda --activities cpu,cuda --with-stack
  lungbench profile --eager-fp32                       the plain FP32 baseline's step
  torchrun --nproc_per_node 2 -m lungbench profile --threads 1   DDP: communication overlap
  tensorboard --logdir results/<run-id>                then open the PYTORCH_PROFILER tab"""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "profile",
        help="profile a training step with torch.profiler (traces, top operators, phases)",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_options(p, Workload, PROFILED, quick_help=None)  # declared on Workload
    section(p, WORKLOAD).add_argument(
        "--store",
        default=None,
        help="read batches from this HDF5 store through a DataLoader; it needs at least "
        "--batch samples on the --preset grid (default: random tensors)",
    )
    add_config_options(p, ProfileSchedule, quick_help=None)  # declared on ProfileSchedule
    s = section(p, SCHEDULE)
    s.add_argument(
        "--steps",
        type=positive_int,
        default=None,
        help="run length in steps (default: (wait + warmup + active) x repeat)",
    )
    s.add_argument(
        "--activities",
        default=None,
        help="comma-separated: cpu, cuda (default: cpu, plus cuda on a CUDA device)",
    )
    s.add_argument("--with-stack", action="store_true", help="record Python stacks (slower)")
    s.add_argument("--no-shapes", action="store_true", help="do not record input shapes")
    s.add_argument("--no-memory", action="store_true", help="do not profile memory")
    s.add_argument(
        "--roofline",
        action="store_true",
        help="also the gap per operator (CPU): each operator's time in the step, its bound "
        "at this machine's measured peaks and bandwidth, its time alone (the convolutions), "
        "and the step's overhead over them, in tables/roofline.csv (lungbench.predict.roofline)",
    )
    s.add_argument(
        "--top", type=positive_int, default=25, help="rows of the operator table (default: 25)"
    )
    add_switch_options(p)
    o = p.add_argument_group("output")
    o.add_argument("--out", default="results", help="output root (default: results)")
    o.add_argument("--run-id", default=None, help="run folder name (default: profile-<UTC>-<host>)")
    add_dist_timeout(p.add_argument_group("under a launcher (torchrun, srun, mpiexec: DDP)"))
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from lungbench.distributed.group import group_session, init_distributed
    from lungbench.harness.profiler import run_profile

    cfg = _config(args)
    device = cfg.workload.device
    if args.roofline and not device.startswith("cpu"):
        from lungbench.core.errors import UsageError

        raise UsageError("--roofline: the CPU only for now (its bounds are this CPU's peaks)")
    # World size 1 without a launcher; under one, every rank profiles its DDP step.
    dist = init_distributed(device, timeout_s=args.dist_timeout)
    with group_session(dist):
        result = run_profile(cfg, Path(args.out), args.run_id, dist=dist)
    if result is None:  # not rank 0: rank 0 writes and prints
        return 0
    _print_result(result)
    if args.roofline:
        _roofline(cfg, result)
    return 0


def _config(args: argparse.Namespace):
    """The ProfileConfig of the command line."""
    from lungbench.harness.profiler import ProfileConfig, parse_activities
    from lungbench.switches import switches_of

    workload = config_from_args(args, Workload, PROFILED)
    activities = args.activities
    if activities is None:
        activities = "cpu,cuda" if workload.device.startswith("cuda") else "cpu"
    asked = switch_request(args, [workload.device])  # the switch options, as in bench
    cfg = ProfileConfig(
        workload=workload,
        switches=switches_of(asked),
        strict_switches=asked.strict_switches,
        schedule=config_from_args(args, ProfileSchedule),
        steps=args.steps,
        activities=parse_activities(activities, workload.device),
        record_shapes=not args.no_shapes,
        profile_memory=not args.no_memory,
        with_stack=args.with_stack,
        top=args.top,
        store=Path(args.store) if args.store else None,
        tune=asked.tune,
        retune=asked.retune,
        tune_compile=asked.tune_compile,
    )
    return cfg


def _print_result(result) -> None:
    """The operator and phase tables, where the traces are, and the step's summary."""
    from lungbench.core.runs import markdown

    print(
        markdown(
            result.operators.head(10)[
                ["operator", "calls", "self_cpu_ms", "self_cpu_pct", "self_cuda_ms"]
            ],
            index=False,
        )
    )
    print()
    print(markdown(result.phases, index=False))
    print(f"\nresults: {result.run_dir}")
    print(
        f"traces:  tensorboard --logdir {result.run_dir}  (or open "
        f"{result.traces[0] if result.traces else 'the trace'} in https://ui.perfetto.dev)"
    )
    summary = result.summary
    if "dtype_used" in summary:  # the step bench times: say which switches it ran
        tuned = summary.get("tuning_choice")
        print(
            f"step:    dtype {summary['dtype_used']}, {summary['memory_format_used']}, "
            f"Adam {summary['optimizer_used']}, compile {summary['compile_used']}"
            + (f" (tuned here: {tuned}, {summary.get('tuning_source')})" if tuned else "")
        )
    keys = (
        "profiled_steps",
        "step_ms",
        "data_share",
        "compute_share",
        "communication_share",
        "communication_overlap_fraction",
    )
    print(json.dumps({k: result.summary[k] for k in keys}))


def _roofline(cfg, result) -> None:
    """tables/roofline of the step that was profiled (the switches it ran), printed."""
    from lungbench.core.runs import markdown, write_table
    from lungbench.predict.roofline import operator_roofline
    from lungbench.switches import Switches

    used = result.summary
    switches = Switches(
        dtype=used.get("dtype_used", "fp32"),
        memory_format=used.get("memory_format_used", "contiguous"),
        optimizer=used.get("optimizer_used", "default"),
    )  # eager: the operators are timed one by one, which a compiled graph would hide
    table = operator_roofline(cfg.workload, switches)
    write_table(result.run_dir, "roofline", table)
    print("\nthe gap per operator (ms; bound at this CPU's measured peaks and bandwidth):")
    print(markdown(table.round(3)))
