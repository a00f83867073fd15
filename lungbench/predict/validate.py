"""Layer 8 (predict): `lungbench predict --validate`: predict, then measure, on this machine.

From one measured source configuration (CPU, 1 thread: steady on a shared machine) the
model predicts other batch sizes, widths, thread counts and a 2-rank DDP run (Gloo, weak
and strong scaling); then each is measured with the same protocol and the predicted and
measured step times are set side by side with the error. Every prediction is made before
any target is measured. The cases are stored (lungbench.predict.calibration): the
intervals of later predictions come from them.

    cases = run_validation(QUICK, bench_subprocess)      # a minute on 2 cores; DEFAULT: a few minutes
"""

from __future__ import annotations

import json
import logging
import statistics
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from lungbench.core.runs import utc_now
from lungbench.measure.workload import Workload
from lungbench.predict import calibration
from lungbench.predict.ddp_probe import BenchLaunch, DDPRun, run_ddp_bench
from lungbench.predict.forecast import (
    Prediction,
    Predictor,
    Target,
    describe_workload,
    source_from_record,
    source_here,
)
from lungbench.predict.operators import plain_step_s, step_timer
from lungbench.switches import fast_defaults

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Plan:
    """The source and the targets of one validation."""

    preset: str = "default"
    filters: int = 8
    batch: int = 4
    threads: int = 1
    # Not 1, 2, 8 or 16: batch 1, half and twice the source's batch and twice its width are
    # the probe's own points (operators.probe_operators): a target there would be measured.
    batches: tuple[int, ...] = (3, 5, 6, 16)
    widths: tuple[int, ...] = (4, 6, 12, 24)
    thread_counts: tuple[int, ...] = (2,)
    ddp: bool = True
    warmup: int = 2
    repeats: int = 10
    # A target is measured in `rounds` alternations with the source (measure_pair), and
    # the 2-rank DDP run `ddp_runs` times, each between two measurements of the source.
    rounds: int = 5
    ddp_runs: int = 2
    # Epochs: one `lungbench bench` of the source and these (batch, filters), each with an
    # epoch of `epoch_samples` through the real loader; the source's predicts the others.
    epoch_targets: tuple[tuple[int, int], ...] = ((6, 8), (4, 12), (6, 12))
    epoch_samples: int = 72  # whole batches of 4 and 6

    def source(self) -> Workload:
        return Workload(
            preset=self.preset, filters=self.filters, batch_size=self.batch, threads=self.threads
        )

    def targets(self) -> list[tuple[str, Target]]:
        cases = [("batch", Target(batch=b)) for b in self.batches]
        cases += [("filters", Target(filters=f)) for f in self.widths]
        cases += [("threads", Target(threads=t)) for t in self.thread_counts]
        if self.ddp:
            cases.append(("ranks", Target(ranks=2, threads=1, scaling="weak")))
            if self.batch % 2 == 0:
                cases.append(("ranks", Target(ranks=2, threads=1, scaling="strong")))
        return cases


DEFAULT = Plan()
QUICK = Plan(
    preset="dey2018",
    filters=2,
    batch=2,
    batches=(3,),
    widths=(3,),
    repeats=6,
    warmup=1,
    rounds=3,
    ddp_runs=1,
    epoch_targets=((3, 2),),
    epoch_samples=12,
)


def target_workload(source: Workload, target: Target) -> Workload:
    return replace(
        source,
        batch_size=target.batch or source.batch_size,
        filters=target.filters or source.filters,
        threads=target.threads or source.threads,
    )


def measure_step_s(workload: Workload, plan: Plan) -> float:
    """The median step of `workload` on this CPU (the bench's switches, fixed repeats)."""
    switches = fast_defaults(torch.device("cpu"))
    torch.set_num_threads(workload.threads or torch.get_num_threads())
    return plain_step_s(workload, switches, torch.device("cpu"), plan.warmup, plan.repeats)


def run_validation(
    plan: Plan, launch: BenchLaunch, out: Path | None = None
) -> list[dict[str, Any]]:
    """Measure the source, predict every target, measure the targets; the cases. `launch`
    starts `lungbench bench` for the epochs and the DDP runs."""
    switches = fast_defaults(torch.device("cpu"))
    source_workload = plan.source()
    log.info(f"validation source: {describe_workload(source_workload)}")
    step = measure_step_s(source_workload, plan)
    source = source_here("source", source_workload, switches, step, fresh=True)
    predictor = Predictor(
        remeasure=True, launch=launch
    )  # this machine as it is now, like the targets
    targets = plan.targets()
    predictions = [(kind, t, predictor.predict(source, t)) for kind, t in targets]
    cases = []
    # A shared machine's speed drifts (2x within minutes on the dev box): each target is
    # measured as a ratio to the source measured beside it, and the prediction (a ratio to
    # the source) is taken against the source's step of that moment.
    ddp_ratios = measure_ddp(plan, source_workload, launch, out) if plan.ddp else {}
    for kind, target, pred in tqdm(predictions, desc="measuring targets", leave=False):
        if kind == "ranks":
            ratio = ddp_ratios.get(target.scaling)
            now, measured = step, ratio and step * ratio
        else:
            now, measured = measure_pair(
                source_workload, target_workload(source_workload, target), plan
            )
        cases.append(
            case(kind, describe_target(target, pred), rescaled(pred, now / step), measured)
        )
    cases += epoch_cases(plan, predictor, out)
    torch.set_num_threads(plan.threads)
    cases.insert(
        0,
        {
            "kind": "source",
            "target": describe_workload(source_workload),
            "measured_s": step,
            "note": "each prediction is scaled by the source's step measured beside its target "
            "(a shared machine drifts)",
        },
    )
    calibration.save_cases([c for c in cases if c["kind"] != "source"], utc_now())
    return cases


def epoch_cases(plan: Plan, predictor: Predictor, out: Path | None) -> list[dict[str, Any]]:
    """Epoch predictions against measured epochs: one `lungbench bench` (subprocess, the
    real loader) of the source and the epoch targets; the source's record (its step and its
    time outside the steps) predicts each target's epoch of the same samples."""
    if not plan.epoch_targets:
        return []
    log.info("measuring epochs (lungbench bench with the real loader)")
    records, environment = measure_epochs(plan, predictor.launch, out)
    key = {(r["batch_size"], r["filters"]): r for r in records if r.get("epoch_s")}
    source_record = key.get((plan.batch, plan.filters))
    if source_record is None:
        log.warning("note: the epoch run measured no source epoch; epochs not validated")
        return []
    source = source_from_record(source_record, environment, "epoch validation")
    cases = []
    for batch, filters in plan.epoch_targets:
        target = Target(batch=batch, filters=filters, epoch_samples=plan.epoch_samples)
        pred = predictor.predict(source, target)
        measured = key.get((batch, filters), {}).get("epoch_s")
        epoch = replace(pred, step_s=pred.epoch_s, interval=pred.epoch_interval)
        cases.append(case("epoch", f"f{filters} b{batch} t{plan.threads} epoch of "
                          f"{plan.epoch_samples}", epoch, measured))  # fmt: skip
    return cases


def measure_epochs(
    plan: Plan, launch: BenchLaunch | None, out: Path | None
) -> tuple[list[dict], dict[str, Any]]:
    """(ok records, environment) of `lungbench bench` over the source and the epoch targets."""
    batches = sorted({plan.batch, *(b for b, _ in plan.epoch_targets)})
    widths = sorted({plan.filters, *(f for _, f in plan.epoch_targets)})
    bench_args = [
        "--preset", plan.preset, "--batch", *map(str, batches), "--filters", *map(str, widths),
        "--threads", str(plan.threads), "--epoch-samples", str(plan.epoch_samples),
        "--warmup", str(plan.warmup), "--repeats", str(plan.repeats), "--no-tune",
    ]  # fmt: skip
    if launch is None:
        return [], {}
    return launch(bench_args, 1, out)


def measure_pair(source: Workload, target: Workload, plan: Plan) -> tuple[float, float]:
    """(source step, target step), measured in alternation: `plan.rounds` rounds of a block
    of steps of each (threads set per block, the block's first step untimed). A shared
    machine drifts within seconds (the dev box: one t2/t1 ratio read 0.62 to 1.10 over six
    rounds), so the target's step is the source's median times the median of the rounds'
    target/source ratios: the ratio of neighbours holds where absolute times do not."""
    cpu = torch.device("cpu")
    switches = fast_defaults(cpu)
    timers = [(w.threads, step_timer(w, switches, cpu)) for w in (source, target)]
    block = max(plan.repeats // 2, 3)
    rounds: list[tuple[float, float]] = []
    for _ in range(plan.rounds):
        medians = []
        for threads, time_steps in timers:
            torch.set_num_threads(threads or torch.get_num_threads())
            time_steps(1 if rounds else plan.warmup)  # the pool wakes, the caches refill
            medians.append(statistics.median(time_steps(block)))
        rounds.append((medians[0], medians[1]))
    torch.set_num_threads(source.threads or torch.get_num_threads())
    source_s = statistics.median(r[0] for r in rounds)
    return source_s, source_s * statistics.median(r[1] / r[0] for r in rounds)


def rescaled(pred: Prediction, factor: float) -> Prediction:
    """The prediction against the source as fast as it measured beside the target."""
    if pred.step_s is None:
        return pred
    low_high = pred.interval and (pred.interval[0] * factor, pred.interval[1] * factor)
    return replace(pred, step_s=pred.step_s * factor, interval=low_high or None)


def case(kind: str, label: str, pred: Prediction, measured: float | None) -> dict[str, Any]:
    error = pred.step_s / measured - 1 if measured and pred.step_s else None
    inside = None
    if pred.interval is not None and measured:
        inside = pred.interval[0] <= measured <= pred.interval[1]
    return {
        "kind": kind,
        "target": label,
        "predicted_s": pred.step_s,
        "measured_s": measured,
        "error": error,
        "bound": pred.bound,
        "interval": pred.interval,
        "inside": inside,
    }


def describe_target(target: Target, pred: Prediction) -> str:
    text = f"f{pred.filters} b{pred.batch} t{pred.threads}"
    return text + (f" x{pred.ranks} ranks ({pred.scaling})" if pred.ranks > 1 else "")


def measure_ddp(
    plan: Plan, source: Workload, launch: BenchLaunch, out: Path | None
) -> dict[str, float]:
    """The 2-rank DDP step (Gloo, 1 thread per rank, `lungbench bench` under torchrun) as a
    ratio to the source's step measured just before and after it, per scaling: the median
    over `plan.ddp_runs` runs. {scaling: ratio}; {} when the launch failed."""
    log.info("measuring the 2-rank DDP run (torchrun, Gloo)")
    run = DDPRun(plan.preset, plan.filters, plan.batch, 1, "both", plan.warmup, plan.repeats)
    ratios: dict[str, list[float]] = {}
    for i in range(plan.ddp_runs):
        before = measure_step_s(source, plan)
        records = run_ddp_bench(run, launch, None if out is None else out / f"ddp-{i + 1}")
        now = (before + measure_step_s(source, plan)) / 2
        for record in records:
            ratios.setdefault(record["scaling"], []).append(record["step_s_median"] / now)
    return {scaling: statistics.median(r) for scaling, r in ratios.items()}


def summary(cases: list[dict[str, Any]]) -> dict[str, Any]:
    """Median |error| per kind and overall, and the intervals' coverage."""
    scored = [c for c in cases if c.get("error") is not None]
    by_kind: dict[str, list[float]] = {}
    for c in scored:
        by_kind.setdefault(c["kind"], []).append(abs(c["error"]))
    covered = [c["inside"] for c in scored if c.get("inside") is not None]
    return {
        "median_abs_error": statistics.median(abs(c["error"]) for c in scored) if scored else None,
        "median_abs_error_by_kind": {k: statistics.median(v) for k, v in by_kind.items()},
        "interval_coverage": sum(covered) / len(covered) if covered else None,
        "cases": len(scored),
    }


def dumps(cases: list[dict[str, Any]]) -> str:
    return json.dumps({"cases": cases, "summary": summary(cases)}, indent=2)
