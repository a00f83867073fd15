"""Layer 10 (commands): `lungbench bench` options for the speed switches, the ablation, the batch-size finder and
the data path (issue 8). Parsing only: the work is in lungbench.step, .ablation,
.batchfinder and .loaderbench."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from lungbench.commands._args import positive_int

# The parser's defaults of --filters / --batch: left as they are, the ablation and the loader
# benchmark use the reference configuration (filters 16, batch 2) instead of 6 runs.
SWEEP_DEFAULT_FILTERS = [8, 16]
SWEEP_DEFAULT_BATCH = [2, 4, 8]
REFERENCE = (16, 2)
ABLATION_ROUNDS = 10  # interleaved rounds of an ablation when --repeats is not given

# Switch options: (dest, default meaning "auto"); explicit values are forced (strict).
_AUTO_DEFAULTS = {
    "dtype": "auto",
    "memory_format": "auto",
    "compile": "auto",
    "tf32": None,
    "cudnn_benchmark": None,
    "optimizer": "auto",
    "cuda_graphs": None,
}


def add_speed_options(p: argparse.ArgumentParser) -> None:
    """The switch, ablation, batch-finder and data-path option groups."""
    add_switch_options(p)
    _add_other_speed_options(p)


def add_switch_options(p: argparse.ArgumentParser) -> None:
    """The speed-switch options, shared by `bench` and `profile` (the same step runs)."""
    s = p.add_argument_group(
        "speed switches (default 'auto': the device's measured fast choice; a value given "
        "here is forced: a device that cannot do it is an error; see docs/performance.md)"
    )
    s.add_argument(
        "--dtype",
        choices=["auto", "fp32", "bf16", "fp16"],
        default="auto",
        help="autocast dtype; fp16 uses a grad scaler (CUDA only) (default: auto)",
    )
    s.add_argument(
        "--memory-format",
        choices=["auto", "contiguous", "channels_last", "channels_last_3d"],
        default="auto",
        help="tensor layout; channels_last* follow the input rank (default: auto)",
    )
    s.add_argument(
        "--compile",
        choices=["auto", "off", "default", "max-autotune"],
        default="auto",
        help="torch.compile mode (auto: off; the first compiled step "
        "costs minutes on a small CPU) (default: auto)",
    )
    s.add_argument(
        "--tf32",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="CUDA TF32 matmul/conv (default: auto = on for CUDA)",
    )
    s.add_argument(
        "--cudnn-benchmark",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="cuDNN autotuning (default: auto = on for CUDA)",
    )
    s.add_argument(
        "--optimizer-impl",
        dest="optimizer",
        choices=["auto", "default", "foreach", "fused"],
        default="auto",
        help="Adam implementation (default: auto = foreach on CPU, fused on CUDA)",
    )
    s.add_argument(
        "--cuda-graphs",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="capture the fixed-shape step as one CUDA graph (default: off)",
    )
    s.add_argument(
        "--ddp-bucket-mb",
        type=positive_int,
        default=25,
        help="DDP gradient bucket size in MB, under a launcher (default: 25)",
    )
    s.add_argument(
        "--eager-fp32",
        action="store_true",
        help="the plain baseline: eager, FP32, contiguous, torch's default Adam",
    )
    s.add_argument(
        "--no-tune",
        dest="tune",
        action="store_false",
        help="'auto' takes the device's table instead of a measurement here (default: a "
        "short tuning pass per workload measures eager FP32 and each switch, interleaved, "
        "and picks the fastest that passes an accuracy check; cached per host, device, "
        "torch version and workload)",
    )
    s.add_argument(
        "--retune",
        action="store_true",
        help="run the tuning pass again though its choice is cached",
    )
    s.add_argument(
        "--tune-compile",
        action="store_true",
        help="let the tuning pass try torch.compile (its first step costs minutes on a CPU)",
    )


def _add_other_speed_options(p: argparse.ArgumentParser) -> None:
    a = p.add_argument_group("what else to run instead of the sweep")
    a.add_argument(
        "--ablation",
        action="store_true",
        help="time the same model and batch with each switch added in turn "
        "(interleaved rounds = --repeats), speed-up over eager FP32 and an accuracy "
        "check; --compile off drops the compile rung (default: filters 16, batch 2; "
        "one process, not under a launcher)",
    )
    a.add_argument(
        "--accuracy-steps",
        type=positive_int,
        default=5,
        help="steps before the ablation's loss comparison (default: 5)",
    )
    a.add_argument(
        "--loader",
        action="store_true",
        help="loader throughput from the store (workers, cache, augmentation on CPU "
        "or device) next to the training step's samples/s (default: filters 16, "
        "batch 2, --workers or 2; one process, not under a launcher)",
    )
    a.add_argument(
        "--loader-samples",
        type=positive_int,
        default=256,
        help="samples per loader pass (default: 256)",
    )
    f = p.add_argument_group("batch-size finder and data path")
    f.add_argument(
        "--find-batch",
        action="store_true",
        help="first find the largest batch that fits per model, filters, grid and "
        "dtype (tables/max_batch.csv); the sweep drops larger batches and adds it",
    )
    f.add_argument(
        "--max-batch",
        type=positive_int,
        default=None,
        help="ceiling of the search (default: 64 on CPU, 4096 on CUDA)",
    )
    f.add_argument(
        "--pin-memory",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="pinned host memory for the epoch's batches (default: on for CUDA)",
    )
    f.add_argument(
        "--cache",
        action="store_true",
        help="decode the store once into shared memory for the epoch (when it "
        "fits in a quarter of the free RAM)",
    )


def switch_request_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The switch fields (and which were forced) from the options of add_switch_options
    (UsageError for --eager-fp32 with a switch)."""
    from lungbench.core.errors import UsageError
    from lungbench.step import eager_fp32, switch_flag

    given = {k: getattr(args, k) for k, auto in _AUTO_DEFAULTS.items() if getattr(args, k) != auto}
    if args.eager_fp32:
        if given:
            name = switch_flag(next(iter(given)))
            raise UsageError(f"--eager-fp32 is the plain baseline; drop {name}")
        values: dict[str, Any] = {k: getattr(eager_fp32(), k) for k in _AUTO_DEFAULTS}
    else:
        values = {k: getattr(args, k) for k in _AUTO_DEFAULTS}
    devices = args.device if isinstance(args.device, list) else [args.device]
    return {
        **values,
        "ddp_bucket_mb": args.ddp_bucket_mb,
        "strict_switches": forced_switches(given, devices),
    }


def tuning_fields(args: argparse.Namespace) -> dict[str, bool]:
    """--no-tune / --retune / --tune-compile (UsageError when they contradict)."""
    from lungbench.core.errors import UsageError

    if not args.tune and (args.retune or args.tune_compile):
        flag = "--retune" if args.retune else "--tune-compile"
        raise UsageError(f"--no-tune skips the tuning pass; drop {flag}")
    return {"tune": args.tune, "retune": args.retune, "tune_compile": args.tune_compile}


def switches_from_args(args: argparse.Namespace) -> tuple[Any, tuple[str, ...]]:
    """The Switches of the options and the names of those the user forced."""
    from lungbench.step import Switches

    values = switch_request_fields(args)
    strict = values.pop("strict_switches")
    return Switches(**values), strict


def speed_request_fields(args: argparse.Namespace) -> dict[str, Any]:
    """BenchRequest fields from the options (UsageError for --eager-fp32 with a switch)."""
    return {
        **switch_request_fields(args),
        **tuning_fields(args),
        "pin_memory": args.pin_memory,
        "cache": args.cache,
        "find_batch": args.find_batch,
        "max_batch": args.max_batch,
    }


def forced_switches(given: dict[str, Any], devices: list[str]) -> tuple[str, ...]:
    """The switches the user forced (an error where a device cannot do them). In a sweep over
    CPU and CUDA, the CUDA-only ones (and fp16) are meant for the CUDA rows: not forced."""
    from lungbench.step import CUDA_ONLY_SWITCHES

    kinds = {d.split(":")[0] for d in devices}
    if len(kinds) == 1:
        return tuple(given)
    return tuple(
        name
        for name, value in given.items()
        if name not in CUDA_ONLY_SWITCHES and not (name == "dtype" and value == "fp16")
    )


def _reference(args: argparse.Namespace) -> tuple[list[int], list[int]]:
    """--filters / --batch, or the reference (16, 2) when both were left at their defaults."""
    if args.filters == SWEEP_DEFAULT_FILTERS and args.batch == SWEEP_DEFAULT_BATCH:
        return [REFERENCE[0]], [REFERENCE[1]]
    return list(args.filters), list(args.batch)


def run_ablation_cli(args: argparse.Namespace) -> int:
    """`lungbench bench --ablation`."""
    from lungbench.experiments.speedup import BenchRequest, validate
    from lungbench.measure.ablation import AblationConfig, run_ablation_bench
    from lungbench.measure.workload import Workload

    validate(
        BenchRequest(
            model=args.model, preset=args.preset, devices=tuple(args.device), out=Path(args.out)
        )
    )
    _refuse_switches_for_ablation(args)
    filters, batches = _reference(args)
    rung = {"auto": "default"}.get(args.compile, args.compile)
    configs = [
        AblationConfig(
            Workload(
                model=args.model,
                preset=args.preset,
                filters=f,
                batch_size=b,
                device=d,
                threads=(args.threads or [None])[0],
                seed=args.seed,
            ),
            warmup=args.warmup,
            rounds=args.repeats or ABLATION_ROUNDS,
            accuracy_steps=args.accuracy_steps,
            compile_rung=rung,
        )
        for d in args.device
        for f in filters
        for b in batches
    ]
    run_dir, records, text = run_ablation_bench(configs, Path(args.out), args.run_id)
    print(text)
    print(f"\nresults: {run_dir}")
    return 0


def _refuse_switches_for_ablation(args: argparse.Namespace) -> None:
    """The ablation sets every switch itself, rung by rung from the eager FP32 baseline: a
    switch option would be silently ignored, so it is an error (--compile picks the rung)."""
    from lungbench.core.errors import UsageError
    from lungbench.step import switch_flag

    given = [k for k, auto in _AUTO_DEFAULTS.items() if k != "compile" and getattr(args, k) != auto]
    if args.eager_fp32:
        given.insert(0, "eager_fp32")
    if given:
        flag = "--eager-fp32" if given[0] == "eager_fp32" else switch_flag(given[0])
        raise UsageError(
            f"--ablation measures every speed switch in turn from the eager FP32 baseline; "
            f"drop {flag} (only --compile is read: the mode of its torch.compile rung)"
        )


def run_loader_cli(args: argparse.Namespace) -> int:
    """`lungbench bench --loader`."""
    from lungbench.experiments.speedup import BenchRequest, prepare_store, validate
    from lungbench.measure.loader import run_loader_run
    from lungbench.measure.workload import Workload

    request = BenchRequest(
        model=args.model,
        preset=args.preset,
        devices=tuple(args.device),
        store=Path(args.store) if args.store else None,
        synth_n=args.synth_n,
        out=Path(args.out),
        seed=args.seed,
    )
    validate(request)
    info = prepare_store(request, reads=args.loader_samples)  # generates only those
    filters, batches = _reference(args)
    workload = Workload(
        model=args.model,
        preset=args.preset,
        filters=filters[0],
        batch_size=batches[0],
        device=args.device[0],
        seed=args.seed,
    )
    run_dir, text = run_loader_run(
        info.path,
        workload,
        workers=args.workers or 2,
        samples=args.loader_samples,
        out=Path(args.out),
        run_id=args.run_id,
    )
    print(text)
    print(f"\nresults: {run_dir}")
    return 0
