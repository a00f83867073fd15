"""Layer 7 (harness): `lungbench bench --ablation`: which speed switch buys how much.

The same model, batch and data are run with each switch added in turn (a cumulative ladder
from the eager FP32 contiguous baseline), timed in interleaved rounds (round r times one step
of every variant, in order, so machine noise hits all variants alike) and reported as
speed-up over the baseline: the ratio of medians, plus the median and IQR of the per-round
ratios. Each variant also passes an accuracy check: from the same initial weights and the
same batches, the FP32 loss after `accuracy_steps` steps must be within a stated tolerance
of the baseline's (dropout is switched off for every variant so they compute one function).

    lungbench bench --ablation --filters 16 --batch 2                 # this machine's CPU
    lungbench bench --ablation --device cuda --filters 8 16 --batch 2  # on a GPU
    lungbench bench --ablation --compile off                          # skip the compile rung

Output: results/<run-id>/{records.jsonl, tables/ablation.csv|.md, environment.json, ...}.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from lungbench.core.device import synchronize
from lungbench.core.errors import UsageError
from lungbench.harness.sweep import SINGLE_PROCESS
from lungbench.measure.memory import refusal as memory_refusal
from lungbench.measure.peak import attach_peak, device_peaks
from lungbench.measure.stats import summarize
from lungbench.measure.timing import STEP, PhaseTimer, set_threads, training_step_flops
from lungbench.measure.workload import Workload
from lungbench.step import TrainStep, bce_loss
from lungbench.switches import (
    Resolved,
    Switches,
    adam_implementations,
    backend_flags,
    bf16_supported,
    compiler_available,
    eager_fp32,
    resolve,
)

log = logging.getLogger(__name__)  # progress: the CLI shows it on stderr

# Loss after `accuracy_steps` steps may differ from the eager FP32 baseline by at most this
# (absolute; the BCE loss starts near 0.69). FP32 variants reorder sums (channels-last
# kernels, fused optimizers, compiled graphs): Adam's sign-like update turns those last-bit
# differences into ~1e-4 weight changes, so 1e-3 leaves room without hiding a real bug.
# Reduced precision rounds activations to 8 (bf16) or 11 (fp16, TF32) mantissa bits.
TOLERANCE = {"fp32": 1e-3, "tf32": 1e-2, "fp16": 2e-2, "bf16": 5e-2}


@dataclass(frozen=True)
class Variant:
    """One rung of the ladder: a name, the switch it adds and the switches in force."""

    name: str
    added: str
    switches: Switches


@dataclass(frozen=True)
class AblationConfig:
    """One ablation: a workload (model, batch, device, ...), and how long to measure."""

    workload: Workload = field(default_factory=lambda: Workload(filters=16))
    warmup: int = 2  # untimed steps per variant after the accuracy steps
    rounds: int = 10  # interleaved timed rounds (one step of every variant per round)
    accuracy_steps: int = 5
    compile_rung: str = "default"  # mode of the torch.compile rung; "off" leaves it out
    # per-sample input shapes (a store's); None = the model registry's for the workload
    input_shapes: tuple[tuple[int, ...], ...] | None = None

    def record_fields(self) -> dict[str, Any]:
        """Flat record fields (model, preset, filters, ..., rounds, ...)."""
        fields_ = asdict(self)
        fields_.pop("input_shapes")
        return {**fields_.pop("workload"), **fields_}


def tolerance(switches: Switches) -> float:
    """The accuracy tolerance for a variant (see TOLERANCE)."""
    if switches.dtype != "fp32":
        return TOLERANCE[switches.dtype]
    return TOLERANCE["tf32"] if switches.tf32 else TOLERANCE["fp32"]


def ladder(device: torch.device, compile_mode: str = "default") -> list[Variant]:
    """The cumulative ladder for `device`: each variant adds one switch to the previous.

    CPU: channels_last_3d, fused Adam (foreach on a torch without a CPU fused Adam), bf16
    autocast (where native), torch.compile.
    CUDA: TF32, cudnn.benchmark, channels_last_3d, fused Adam, bf16, CUDA graphs, and
    torch.compile as the last rung (in place of CUDA graphs: compile manages its own).
    """
    steps: list[tuple[str, str, dict[str, Any]]] = []
    cuda = device.type == "cuda"
    if cuda:
        steps += [
            ("tf32", "TF32", {"tf32": True}),
            ("cudnn_benchmark", "cudnn.benchmark", {"cudnn_benchmark": True}),
        ]
    steps.append(("channels_last_3d", "channels_last_3d", {"memory_format": "channels_last_3d"}))
    adam = adam_implementations(device)[-1]  # fused where the device has it
    steps.append((adam, f"{adam} Adam", {"optimizer": adam}))
    if bf16_supported(device):
        steps.append(("bf16", "bf16 autocast", {"dtype": "bf16"}))
    if cuda:
        steps.append(("cuda_graphs", "CUDA graphs", {"cuda_graphs": True}))
    if compile_mode != "off" and compiler_available(device) is None:
        steps.append(
            (
                f"compile-{compile_mode}",
                f"torch.compile ({compile_mode})",
                {"compile": compile_mode, "cuda_graphs": False},
            )
        )
    variants = [Variant("eager_fp32", "baseline: eager, FP32, contiguous", eager_fp32())]
    for name, added, change in steps:
        variants.append(Variant(f"+{name}", added, replace(variants[-1].switches, **change)))
    return variants


@dataclass
class _Runner:
    """A variant's model, step and data; the same init and batches as every other variant."""

    variant: Variant
    resolved: Resolved
    step: TrainStep
    batches: list[tuple[list[torch.Tensor], torch.Tensor]]
    timing_batch: tuple[list[torch.Tensor], torch.Tensor]

    def run(self, timer: Any, batch: tuple[list[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        with backend_flags(self.resolved.switches):
            return self.step(timer, *batch)


def _no_dropout(model: nn.Module) -> nn.Module:
    # Dropout draws from different RNG streams eagerly and compiled: switch it off so that
    # every variant computes the same function and the accuracy check compares like with like.
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    return model


def fp32_loss(model: nn.Module, batch: tuple[list[torch.Tensor], torch.Tensor]) -> float:
    """The loss of `model` on `batch` in eager FP32 (training-mode BatchNorm, no update)."""
    inputs, target = batch
    with torch.no_grad():
        return float(bce_loss(model(*[x.contiguous() for x in inputs]).float(), target))


def accuracy_run(runner: _Runner) -> float:
    """Train `accuracy_steps` steps on the shared batches; the FP32 loss afterwards."""
    from lungbench.step import NO_TIMER

    for batch in runner.batches:
        runner.run(NO_TIMER, (runner.step.prepare_inputs(batch[0]), batch[1]))
    synchronize(runner.step.device)
    return fp32_loss(runner.step.model, runner.batches[-1])


def run_ablation(
    cfg: AblationConfig,
    variants: Sequence[Variant] | None = None,
    label: str = "ablation",
) -> list[dict[str, Any]]:
    """Measure every variant of `cfg` (default: `ladder()`); one record per variant.
    `label` begins the progress lines (the tuning pass runs variants too)."""
    from lungbench.core.device import parse_device

    w = cfg.workload
    device = parse_device(w.device)
    threads = set_threads(w.threads) if device.type == "cpu" else torch.get_num_threads()
    if cfg.rounds < 1:
        raise UsageError(f"--repeats must be >= 1 for an ablation, got {cfg.rounds}")
    too_big = memory_refusal(w, cfg.input_shapes)
    if too_big:
        raise UsageError(f"--batch {w.batch_size}: {too_big}")
    variants = list(variants or ladder(device, cfg.compile_rung))
    reference = _no_dropout(w.build_model(torch.device("cpu")))
    init = {k: v.clone() for k, v in reference.state_dict().items()}
    shapes = cfg.input_shapes
    batches = [
        w.random_batch(device, seed=w.seed + 2 + k, shapes=shapes)
        for k in range(cfg.accuracy_steps)
    ]
    timing_batch = w.random_batch(device, seed=w.seed + 1, shapes=shapes)
    flops = training_step_flops(reference.to(device), bce_loss, *timing_batch)
    # How far training moves the loss: a tolerance is only a check when the move is larger.
    initial = fp32_loss(reference.to(device), batches[-1])

    runners, losses, first_steps = [], [], []
    for variant in variants:
        # the ablation shows each variant (a compile takes minutes); the tuning pass its table
        (log.info if label == "ablation" else log.debug)(
            f"{label}: {variant.name} (accuracy steps{', compiling' if _compiles(variant) else ''})"
        )
        started = time.perf_counter()
        runner = _make_runner(cfg, variant, init, batches, timing_batch, device)
        losses.append(accuracy_run(runner))
        first_steps.append(time.perf_counter() - started)  # a compile is paid here
        runners.append(runner)
    samples = _interleaved(runners, cfg.warmup, cfg.rounds, device)
    records = _records(cfg, runners, samples, losses, flops, threads, initial)
    for record, seconds in zip(records, first_steps, strict=True):
        record["first_steps_s"] = seconds
    attach_one_off_costs(records, cfg.accuracy_steps)
    return records


def attach_one_off_costs(records: list[dict[str, Any]], first_steps: int) -> None:
    """For each compiled variant: its one-off cost (the wall time of its first
    `first_steps` steps, the compile among them, beyond that many of its timed steps), its
    gain per step over the same switches without compile (else eager FP32, the first
    record), and after how many steps the gain has paid the cost back (None: never, the
    compiled step is not faster)."""
    for r in records:
        if r.get("compile", "off") == "off":
            continue
        base = _uncompiled_twin(r, records)
        r["one_off_s"] = max(r["first_steps_s"] - first_steps * r["step_s_median"], 0.0)
        r["gain_per_step_s"] = base["step_s_median"] - r["step_s_median"]
        r["gain_against"] = base["variant"]
        gain = r["gain_per_step_s"]
        r["pays_off_after_steps"] = math.ceil(r["one_off_s"] / gain) if gain > 0 else None


def _uncompiled_twin(record: dict[str, Any], records: Sequence[dict[str, Any]]) -> dict:
    """The record whose switches are `record`'s with compile off (CUDA graphs aside: the
    compile rung turns them off); else the first (eager FP32)."""
    keys = ("dtype", "memory_format", "optimizer", "tf32", "cudnn_benchmark")
    for other in records:
        if other.get("compile", "off") == "off" and all(
            other.get(k) == record.get(k) for k in keys
        ):
            return other
    return records[0]


def _make_runner(
    cfg: AblationConfig,
    variant: Variant,
    init: dict[str, torch.Tensor],
    batches: list,
    timing_batch: tuple,
    device: torch.device,
) -> _Runner:
    model = _no_dropout(cfg.workload.build_model(torch.device("cpu")))
    model.load_state_dict(init)
    model = model.to(device).train()
    inputs = timing_batch[0]
    resolved = resolve(
        variant.switches, device, inputs[0].dim(), warn=log.info, probe=(model, inputs)
    )
    step = TrainStep(model, bce_loss, resolved.switches, device)
    inputs, target = timing_batch
    return _Runner(variant, resolved, step, batches, (step.prepare_inputs(inputs), target))


def _interleaved(
    runners: Sequence[_Runner], warmup: int, rounds: int, device: torch.device
) -> list[list[float]]:
    """Step seconds per variant: `rounds` rounds, each timing one step of every variant."""
    timer = PhaseTimer(device)
    for runner in runners:
        for _ in range(warmup):
            timer.start()
            runner.run(timer, runner.timing_batch)
            timer.finish()
    samples: list[list[float]] = [[] for _ in runners]
    for _ in range(rounds):
        for i, runner in enumerate(runners):
            timer.start()
            runner.run(timer, runner.timing_batch)
            samples[i].append(timer.finish()[STEP])
    return samples


def _records(
    cfg: AblationConfig,
    runners: Sequence[_Runner],
    samples: list[list[float]],
    losses: list[float],
    flops: int,
    threads: int,
    initial_loss: float,
) -> list[dict[str, Any]]:
    base = np.asarray(samples[0])
    records = []
    for runner, times, loss in zip(runners, samples, losses, strict=True):
        stats = summarize(times)
        ratios = summarize(list(base / np.asarray(times)))  # per-round speed-ups
        sw = runner.resolved.switches
        tol = tolerance(sw)
        records.append(
            {
                **cfg.record_fields(),
                "variant": runner.variant.name,
                "added": runner.variant.added,
                **asdict(runner.variant.switches),
                **runner.resolved.record(),
                "threads_used": threads,
                **SINGLE_PROCESS,
                "status": "ok",
                **stats.as_dict(prefix="step_s_"),
                "samples_s": {STEP: list(times)},
                "samples_per_s": cfg.workload.batch_size / stats.median,
                "speedup": float(np.median(base) / stats.median),
                # Under heavy load the fastest step is the least disturbed one: report both.
                "speedup_best": float(np.min(base) / stats.min),
                "speedup_round_median": ratios.median,
                "speedup_round_iqr": ratios.iqr,
                "flops_per_step": flops,
                "achieved_flops": flops / stats.median,
                "fp32_math": sw.is_fp32_math(),
                "loss_after_n": loss,
                "loss_fp32": losses[0],
                "loss_initial": initial_loss,
                "loss_delta": abs(loss - losses[0]),
                "tolerance": tol,
                "accuracy_ok": abs(loss - losses[0]) <= tol,
                "noisy": stats.noisy,
            }
        )
    return records


def ablation_table(records: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """One row per variant: time, speed-up (with its per-round spread), FLOP/s, accuracy."""
    rows = []
    for r in records:
        rows.append(
            {
                "variant": r["variant"],
                "added": r["added"],
                "step ms (median)": 1e3 * r["step_s_median"],
                "IQR ms": 1e3 * r["step_s_iqr"],
                "speed-up": r["speedup"],
                "best ms": 1e3 * r["step_s_min"],
                "speed-up (best)": r["speedup_best"],
                "per-round speed-up (median / IQR)": f"{r['speedup_round_median']:.2f} / {r['speedup_round_iqr']:.2f}",
                "samples/s": r["samples_per_s"],
                "GFLOP/s": r["achieved_flops"] / 1e9,
                "% peak": _percent(r.get("peak_fraction")),
                "loss after N": r["loss_after_n"],
                "|Δ loss|": r["loss_delta"],
                "tolerance": r["tolerance"],
                "accuracy": "ok" if r["accuracy_ok"] else "FAIL",
                "one-off s (compile)": one_off_words(r),
            }
        )
    return pd.DataFrame(rows).set_index("variant")


def one_off_words(record: dict[str, Any]) -> str:
    """A compiled variant's one-off cost and when its gain pays it back, in words ("" for
    a variant that compiles nothing); the ablation table and the tuning line say it so."""
    if "one_off_s" not in record:
        return ""
    after = record["pays_off_after_steps"]
    paid = f"pays off after {after:,} steps" if after else "never pays off (no faster)"
    return f"{record['one_off_s']:.1f} ({paid} vs {record['gain_against']})"


def attach_peaks(records: list[dict[str, Any]], peaks: dict[str, float]) -> None:
    """Peak fraction of each record, against the peak of the dtype its math ran in."""
    for r in records:
        attach_peak(r, peaks)


def run_ablation_bench(
    configs: Sequence[AblationConfig],
    out: Path,
    run_id: str | None = None,
) -> tuple[Path, list[dict[str, Any]], str]:
    """The whole `--ablation` run: one ablation per config, written to a run folder."""
    from lungbench.core.device import parse_device
    from lungbench.core.environment import environment_record
    from lungbench.core.runs import (
        append_record,
        markdown,
        run_folder,
        write_json,
        write_table,
    )

    for cfg in configs:
        parse_device(cfg.workload.device)
    config = {"ablation": list(configs), "tolerance": TOLERANCE}
    # a failure marks the run "failed", Ctrl-C "interrupted"
    with run_folder(out, "ablation", run_id, config) as run:
        run_dir = run.path
        env = environment_record()
        devices = dict.fromkeys(c.workload.device for c in configs)
        peaks = {d: device_peaks(parse_device(d)) for d in devices}
        env["peak_flops"] = peaks
        write_json(run_dir / "environment.json", env)
        records: list[dict[str, Any]] = []
        texts = []
        for i, cfg in enumerate(configs):
            found = run_ablation(cfg)
            attach_peaks(found, peaks[cfg.workload.device])
            for record in found:
                append_record(run_dir, record)
            records += found
            table = ablation_table(found)
            name = "ablation" if len(configs) == 1 else f"ablation_{i + 1}"
            write_table(run_dir, name, table)
            texts.append(
                f"{cfg.workload.model} {cfg.workload.preset} filters {cfg.workload.filters} "
                f"batch {cfg.workload.batch_size} on {cfg.workload.device} ({cfg.rounds} "
                "interleaved rounds, "
                f"accuracy after {cfg.accuracy_steps} steps: the eager FP32 loss went from "
                f"{found[0]['loss_initial']:.4f} to {found[0]['loss_after_n']:.4f})\n"
                + markdown(table)
            )
    return run_dir, records, "\n\n".join(texts)


def _compiles(variant: Variant) -> bool:
    return variant.switches.compile != "off"


def _percent(value: float | None) -> str:
    return "" if value is None else f"{100 * value:.0f}%"
