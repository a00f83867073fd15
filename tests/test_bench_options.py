"""`lungbench bench` options are made from BenchRequest's field declarations (and `profile`'s
speed switches from SwitchRequest's): every declared field is in --help with its default, the
options give back the request they spell, and the sweep files in bench/sweeps/ still load."""

from __future__ import annotations

import argparse
import dataclasses
import re
import shutil
from pathlib import Path

import pytest

from lungbench.commands import bench, profile
from lungbench.commands._options import config_from_args, help_text, shown_options, shown_value
from lungbench.commands._speed import AUTO_SWITCHES, asked_switches, switch_request
from lungbench.core.errors import UsageError
from lungbench.core.options import ON_OFF
from lungbench.experiments.speedup import BenchRequest
from lungbench.harness.sweep_file import aliases, apply_sweep_file, parse_sweep
from lungbench.harness.sweep_state import apply_resume_and_config
from lungbench.switches import SwitchRequest

REPO = Path(__file__).resolve().parents[1]
SWEEPS = sorted((REPO / "bench" / "sweeps").glob("*.toml"))

# Every option `lungbench bench` / `profile` had when they were written by hand.
BENCH_FLAGS = (
    "--ablation --accuracy-steps --batch --cache --ci-target --compile --config --cuda-graphs "
    "--cudnn-benchmark --ddp-bucket-mb --device --dist-timeout --dtype --eager-fp32 "
    "--epoch-samples --filters --find-batch --list-models --loader --loader-samples "
    "--max-batch --max-repeats --memory-format --model --no-baseline --no-cuda-graphs "
    "--no-cudnn-benchmark --no-epoch --no-pin-memory --no-tf32 --no-tune --optimizer-impl "
    "--out --pin-memory --preset --repeats --resume --retune --run-id --scaling --seed --store "
    "--synth-n --telemetry-interval --tf32 --threads --time-budget --tune-compile --warmup "
    "--workers --to-quality --target --quality-seeds --quality-epochs"
)
PROFILE_FLAGS = (
    "--active --activities --batch --compile --cuda-graphs --cudnn-benchmark --ddp-bucket-mb "
    "--device --dist-timeout --dtype --eager-fp32 --filters --memory-format --model "
    "--no-cuda-graphs --no-cudnn-benchmark --no-memory --no-shapes --no-tf32 --no-tune "
    "--optimizer-impl --out --preset --repeat --retune --run-id --seed --steps --store --tf32 "
    "--threads --top --tune-compile --wait --warmup --with-stack --roofline"
)
NOT_OPTIONS = {"strict_switches"}  # derived from the switch options, never typed

# A request with every option away from its default (the switches' forced values included).
ELSEWHERE = BenchRequest(
    dtype="bf16",
    memory_format="channels_last_3d",
    compile="off",
    tf32=False,
    cudnn_benchmark=True,
    optimizer="foreach",
    cuda_graphs=False,
    ddp_bucket_mb=50,
    tune=False,
    model="mosmed3d",
    preset="iso64",
    filters=(4, 2),
    batch_sizes=(1, 3),
    devices=("cpu", "cuda:1"),
    threads=(1, 2),
    warmup=0,
    repeats=7,
    ci_target_pct=2.5,
    max_repeats=40,
    time_budget_s=12.5,
    epoch=False,
    epoch_samples=16,
    num_workers=2,
    seed=3,
    telemetry_interval=0.0,
    store=Path("some/store.h5"),
    synth_n=100,
    out=Path("elsewhere"),
    run_id="r1",
    pin_memory=False,
    cache=True,
    find_batch=True,
    max_batch=32,
)


def _parser(module, name: str) -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="lungbench")
    module.register(root.add_subparsers())
    return root._subparsers._group_actions[0].choices[name]


def _squeezed(text: str) -> str:
    return re.sub(r"\s+", "", text)  # argparse wraps help lines anywhere, hyphens included


def _flags(parser: argparse.ArgumentParser) -> set[str]:
    return {s for a in parser._actions for s in a.option_strings} - {"-h", "--help"}


def _argv(cls: type, request) -> list[str]:
    """The options that say `request`'s values on the command line."""
    argv = []
    for item in shown_options(cls):
        spec, value = item.option, getattr(request, item.name)
        flag = spec.flag_of(item.name)
        if value == item.default:
            continue
        if spec.action == ON_OFF:
            argv.append(flag if value else "--no-" + flag.removeprefix("--"))
        elif isinstance(value, bool):
            argv.append(flag)  # a store_true switch, or a --no- one whose default is True
        elif isinstance(value, tuple):
            argv += [flag, *map(str, value)]
        else:
            argv += [flag, repr(value) if isinstance(value, float) else str(value)]
    return argv


def test_every_request_option_is_in_bench_help_with_its_default():
    parser = _parser(bench, "bench")
    flags = _flags(parser)
    assert flags == set(BENCH_FLAGS.split())
    helped = _squeezed(parser.format_help())
    shown = {item.name: item for item in shown_options(BenchRequest)}
    fields = {f.name for f in dataclasses.fields(BenchRequest)}
    assert set(shown) == fields - NOT_OPTIONS  # a new field is an option, or said here why not
    for item in shown.values():
        spec = item.option
        assert spec.flag_of(item.name) in flags, item.name
        text = help_text(spec, item.default)
        assert _squeezed(text) in helped, (item.name, text)
        said = spec.default_text or shown_value(item.default)
        assert _squeezed(f"(default:{said}") in _squeezed(text), item.name


def test_profile_keeps_its_options_and_shares_the_switches():
    parser = _parser(profile, "profile")
    assert _flags(parser) == set(PROFILE_FLAGS.split())
    helped = _squeezed(parser.format_help())
    for item in shown_options(SwitchRequest):
        assert _squeezed(help_text(item.option, item.default)) in helped, item.name
    args = parser.parse_args(_argv(SwitchRequest, ELSEWHERE))
    asked = switch_request(args, ["cpu"])
    values = {f.name: getattr(ELSEWHERE, f.name) for f in dataclasses.fields(SwitchRequest)}
    # every switch was given a value other than 'auto': all forced, in option order
    assert asked == SwitchRequest(**{**values, "strict_switches": AUTO_SWITCHES})


def test_no_options_give_the_default_request():
    args = _parser(bench, "bench").parse_args([])
    assert config_from_args(args, BenchRequest) == BenchRequest()
    assert asked_switches(BenchRequest(), False, ["cpu"]) == BenchRequest()


@pytest.mark.parametrize("request_", [ELSEWHERE, dataclasses.replace(ELSEWHERE, tune=True)])
def test_options_round_trip_the_request(request_):
    argv = _argv(BenchRequest, request_)
    args = _parser(bench, "bench").parse_args(argv)
    assert config_from_args(args, BenchRequest) == request_, argv


def test_aliases_repeats_and_the_forced_switches():
    parser = _parser(bench, "bench")
    argv = ["--batch", "4", "2", "4", "--device", "cpu", "cuda", "cpu", "--workers", "3"]
    argv += ["--threads", "2", "2", "--filters", "8", "8", "--dtype", "bf16", "--tf32"]
    args = parser.parse_args(argv)
    request = asked_switches(config_from_args(args, BenchRequest), False, ("cpu", "cuda"))
    assert request.batch_sizes == (4, 2) and request.devices == ("cpu", "cuda")
    assert request.threads == (2,) and request.filters == (8,) and request.num_workers == 3
    assert request.strict_switches == ("dtype",)  # tf32 is CUDA-only: meant for the CUDA rows
    eager = asked_switches(BenchRequest(), True, ["cpu"])
    assert (eager.dtype, eager.memory_format, eager.optimizer) == ("fp32", "contiguous", "default")
    assert eager.strict_switches == ()
    with pytest.raises(UsageError, match="drop --optimizer-impl"):
        asked_switches(BenchRequest(optimizer="fused"), True, ["cpu"])
    with pytest.raises(UsageError, match="drop --tune-compile"):
        asked_switches(BenchRequest(tune=False, tune_compile=True), False, ["cpu"])


def test_the_readme_sweep_file_is_there():
    assert REPO / "bench" / "sweeps" / "thesis.toml" in SWEEPS  # README: --config thesis.toml


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.name)
def test_sweep_files_parse(path):
    request = apply_sweep_file(path, BenchRequest(), BenchRequest())
    assert isinstance(request, BenchRequest) and request != BenchRequest()
    args = _parser(bench, "bench").parse_args(["--config", str(path), "--repeats", "3"])
    given = config_from_args(args, BenchRequest)
    merged, resume = apply_resume_and_config(given, BenchRequest(), args.config, args.resume)
    assert resume is None and merged.repeats == 3  # the command line wins over the file
    assert dataclasses.replace(merged, repeats=request.repeats) == request


def test_sweep_file_keys_are_the_option_names():
    alias = aliases(BenchRequest)
    assert alias["batch"] == "batch_sizes" and alias["device"] == "devices"
    assert alias["workers"] == "num_workers" and alias["optimizer_impl"] == "optimizer"
    assert not any(key.startswith("no_") for key in alias)  # epoch = false, not no_epoch
    table = {"batch": [2], "device": "cpu", "workers": 1, "ci-target": 5, "optimizer": "fused"}
    values = parse_sweep(table, BenchRequest())
    assert values == {
        "batch_sizes": (2,),
        "devices": ("cpu",),
        "num_workers": 1,
        "ci_target_pct": 5.0,
        "optimizer": "fused",
    }
    with pytest.raises(UsageError, match="must be >= 1"):
        parse_sweep({"ddp_bucket_mb": 0}, BenchRequest())  # its option takes an integer >= 1


def test_an_old_run_folder_resumes_with_the_generated_options(tmp_path):
    run = tmp_path / "bench-v0.1.0"
    shutil.copytree(REPO / "tests" / "fixtures" / "bench-v0.1.0", run)
    parser = _parser(bench, "bench")
    args = parser.parse_args(["--resume", str(run), "--filters", "2"])
    given = asked_switches(config_from_args(args, BenchRequest), False, ["cpu"])
    request, point = apply_resume_and_config(given, BenchRequest(), None, args.resume)
    assert point is not None and point.run_dir == run
    assert request.filters == (2,) and request.batch_sizes == (2, 4) and request.repeats == 2
    assert request.tune is True and request.ci_target_pct == 3.0  # fields the old run lacks


def _parser_of(*names: str) -> argparse.ArgumentParser:
    """The parser of `lungbench NAME [SUBNAME]` (the lazy command table loads it)."""
    from lungbench import cli

    parser = cli.build_parser()
    for name in names:
        (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        parser = sub.load(name) if hasattr(sub, "load") else sub.choices[name]
    return parser


def _action(parser: argparse.ArgumentParser, flag: str) -> argparse.Action:
    (action,) = [a for a in parser._actions if flag in a.option_strings]
    return action


def test_the_workload_is_declared_once_on_workload_and_protocol():
    """bench, profile, predict and the training recipes take the workload's options as
    Workload / Protocol declare them: one flag, one value parser, one help text."""
    from lungbench.core.options import declared_option
    from lungbench.measure.workload import Protocol, Workload

    parsers = {
        "bench": _parser_of("bench"),
        "profile": _parser_of("profile"),
        "predict": _parser_of("predict"),
        "train": _parser_of("train", "lidc-pretrain"),
    }
    where = {
        (Workload, "batch_size"): ("bench", "profile", "predict", "train"),
        (Workload, "filters"): ("bench", "profile", "predict"),
        (Workload, "threads"): ("bench", "profile", "predict"),
        (Workload, "seed"): ("bench", "profile"),
        (Protocol, "warmup"): ("bench",),
        (Protocol, "epoch_samples"): ("bench", "predict"),
    }
    for (cls, name), commands in where.items():
        declared = declared_option(cls, name)
        for command in commands:
            action = _action(parsers[command], declared.flag_of(name))
            assert action.type.__wrapped__ is declared.type, (command, name)
    assert _action(parsers["profile"], "--filters").help.startswith("base width (default: 16)")
    assert _action(parsers["predict"], "--filters").nargs == "+"
    assert _action(parsers["bench"], "--device").metavar == "DEVICE"
