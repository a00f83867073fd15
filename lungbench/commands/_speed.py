"""Layer 12 (commands): the speed options of `lungbench bench` and `profile` that are no request field, and the switches the options ask for.

The speed switches, the batch-size finder and the data path are options declared on the
fields of lungbench.switches.SwitchRequest and lungbench.experiments.speedup.BenchRequest
(lungbench.commands._options builds them). Here are the rest: --eager-fp32 (a name for the
switch values of the plain baseline), the modes that run instead of the sweep (--ablation,
--loader), and `asked_switches`: the switch values and which of them the user forced.
Parsing only: the work is in lungbench.step and lungbench.measure (ablation, batch_finder,
loader).
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence
from typing import Any, TypeVar

from lungbench.commands._args import positive_int
from lungbench.commands._options import add_config_options, config_from_args, section
from lungbench.switches import SWITCH_OPTIONS, SwitchRequest

# Left at their defaults (8 16 x 2 4 8), --filters / --batch give the ablation and the loader
# benchmark the reference configuration (filters 16, batch 2) instead of 6 runs.
REFERENCE = (16, 2)
ABLATION_ROUNDS = 10  # interleaved rounds of an ablation when --repeats is not given
MODES = "what else to run instead of the sweep"  # the --help section of --ablation, --loader

# The switches with an 'auto' value, in option order: a value other than SwitchRequest's
# default is one the user asked for (forced: strict).
AUTO_SWITCHES = (
    "dtype",
    "memory_format",
    "compile",
    "tf32",
    "cudnn_benchmark",
    "optimizer",
    "cuda_graphs",
)

R = TypeVar("R", bound=SwitchRequest)


def add_switch_options(p: argparse.ArgumentParser) -> None:
    """The speed-switch options, shared by `bench` and `profile` (the same step runs):
    SwitchRequest's fields and --eager-fp32. `bench` has the fields through BenchRequest
    and adds only --eager-fp32."""
    add_config_options(p, SwitchRequest, quick_help=None)
    add_eager_fp32(p)


def add_eager_fp32(p: argparse.ArgumentParser) -> None:
    """--eager-fp32: not a field, but a name for the switch values it sets (saved as such)."""
    section(p, SWITCH_OPTIONS).add_argument(
        "--eager-fp32",
        action="store_true",
        help="the plain baseline: eager, FP32, contiguous, torch's default Adam",
    )


def add_mode_options(p: argparse.ArgumentParser) -> None:
    """--ablation and --loader, which run instead of the sweep, and their own settings."""
    a = section(p, MODES)
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


def given_switches(request: SwitchRequest) -> dict[str, Any]:
    """The switches asked for with a value other than 'auto', in option order."""
    auto = SwitchRequest()
    return {
        name: getattr(request, name)
        for name in AUTO_SWITCHES
        if getattr(request, name) != getattr(auto, name)
    }


def asked_switches(request: R, eager_fp32: bool, devices: Sequence[str]) -> R:
    """`request` with its switches as asked: the plain baseline's values with --eager-fp32,
    and strict_switches = those the user forced on `devices` (forced_switches). UsageError
    for --eager-fp32 with a switch, and for --no-tune with --retune or --tune-compile."""
    from lungbench.core.errors import UsageError
    from lungbench.switches import eager_fp32 as baseline
    from lungbench.switches import switch_flag

    given = given_switches(request)
    values: dict[str, Any] = {}
    if eager_fp32:
        if given:
            raise UsageError(
                f"--eager-fp32 is the plain baseline; drop {switch_flag(next(iter(given)))}"
            )
        values = {name: getattr(baseline(), name) for name in AUTO_SWITCHES}
    if not request.tune and (request.retune or request.tune_compile):
        flag = "--retune" if request.retune else "--tune-compile"
        raise UsageError(f"--no-tune skips the tuning pass; drop {flag}")
    strict = forced_switches(given, list(devices))
    return dataclasses.replace(request, **values, strict_switches=strict)


def switch_request(args: argparse.Namespace, devices: Sequence[str]) -> SwitchRequest:
    """The SwitchRequest of the options of add_switch_options (asked_switches)."""
    request = config_from_args(args, SwitchRequest)
    return asked_switches(request, args.eager_fp32, devices)


def forced_switches(given: dict[str, Any], devices: list[str]) -> tuple[str, ...]:
    """The switches the user forced (an error where a device cannot do them). In a sweep over
    CPU and CUDA, the CUDA-only ones (and fp16) are meant for the CUDA rows: not forced."""
    from lungbench.switches import CUDA_ONLY_SWITCHES

    kinds = {d.split(":")[0] for d in devices}
    if len(kinds) == 1:
        return tuple(given)
    return tuple(
        name
        for name, value in given.items()
        if name not in CUDA_ONLY_SWITCHES and not (name == "dtype" and value == "fp16")
    )


def _reference(request: Any) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """--filters / --batch, or the reference (16, 2) when both were left at their defaults."""
    defaults = type(request)()
    if request.filters == defaults.filters and request.batch_sizes == defaults.batch_sizes:
        return (REFERENCE[0],), (REFERENCE[1],)
    return request.filters, request.batch_sizes


def run_ablation_cli(request: Any, args: argparse.Namespace) -> int:
    """`lungbench bench --ablation`: the workload of `request` (a BenchRequest built from
    the options, switches not yet settled), --accuracy-steps and --eager-fp32 from `args`."""
    from lungbench.experiments.speedup import BenchRequest, validate
    from lungbench.harness.ablation import AblationConfig, run_ablation_bench
    from lungbench.measure.workload import Workload

    validate(
        BenchRequest(
            model=request.model, preset=request.preset, devices=request.devices, out=request.out
        )
    )
    _refuse_switches_for_ablation(request, args.eager_fp32)
    filters, batches = _reference(request)
    rung = {"auto": "default"}.get(request.compile, request.compile)
    configs = [
        AblationConfig(
            Workload(
                model=request.model,
                preset=request.preset,
                filters=f,
                batch_size=b,
                device=d,
                threads=request.threads[0],
                seed=request.seed,
            ),
            warmup=request.warmup,
            rounds=request.repeats or ABLATION_ROUNDS,
            accuracy_steps=args.accuracy_steps,
            compile_rung=rung,
        )
        for d in request.devices
        for f in filters
        for b in batches
    ]
    run_dir, records, text = run_ablation_bench(configs, request.out, request.run_id)
    print(text)
    print(f"\nresults: {run_dir}")
    return 0


def _refuse_switches_for_ablation(request: SwitchRequest, eager_fp32: bool) -> None:
    """The ablation sets every switch itself, rung by rung from the eager FP32 baseline: a
    switch option would be silently ignored, so it is an error (--compile picks the rung)."""
    from lungbench.core.errors import UsageError
    from lungbench.switches import switch_flag

    given = [name for name in given_switches(request) if name != "compile"]
    if eager_fp32:
        given.insert(0, "eager_fp32")
    if given:
        flag = "--eager-fp32" if given[0] == "eager_fp32" else switch_flag(given[0])
        raise UsageError(
            f"--ablation measures every speed switch in turn from the eager FP32 baseline; "
            f"drop {flag} (only --compile is read: the mode of its torch.compile rung)"
        )


def run_loader_cli(request: Any, args: argparse.Namespace) -> int:
    """`lungbench bench --loader`: the workload and data of `request`, --loader-samples
    from `args`."""
    from lungbench.experiments.speedup import BenchRequest, prepare_store, validate
    from lungbench.harness.loader import run_loader_run
    from lungbench.measure.workload import Workload

    data = BenchRequest(  # only what the loader benchmark reads is checked
        model=request.model,
        preset=request.preset,
        devices=request.devices,
        store=request.store,
        synth_n=request.synth_n,
        out=request.out,
        seed=request.seed,
    )
    validate(data)
    info = prepare_store(data, reads=args.loader_samples)  # generates only those
    filters, batches = _reference(request)
    workload = Workload(
        model=request.model,
        preset=request.preset,
        filters=filters[0],
        batch_size=batches[0],
        device=request.devices[0],
        seed=request.seed,
    )
    run_dir, text = run_loader_run(
        info.path,
        workload,
        workers=request.num_workers or 2,
        samples=args.loader_samples,
        out=request.out,
        run_id=request.run_id,
    )
    print(text)
    print(f"\nresults: {run_dir}")
    return 0
