"""Layer 8 (predict): `lungbench predict --validate`: predict, then measure, on this machine,
from several sources in turn.

The model is only worth its error where sources and targets were not chosen for it. So the
validation rotates its source over ROTATION: batch 2 and 4, filters 8 and 16, threads 1 and
2, the tuned switches and `--eager-fp32`. From each source (measured, its operators probed)
the model predicts targets that are neither the source nor one of its probe's points (batch
1, half and twice the batch, twice the width): other batch sizes, widths and thread counts,
2 DDP ranks (Gloo, weak and strong scaling) and epochs; every prediction is made before any
target is measured; then each is measured with the same protocol and set beside it with the
error (predicted / measured - 1). The summary gives the median |error| per kind and per
source, and the intervals' coverage leave-one-source-out: each source's cases against the
intervals the other sources' errors make. The cases are stored (lungbench.predict.
calibration): the intervals of later predictions come from them.

    cases = run_rotation(QUICK_ROTATION, bench_subprocess)   # ~3 min on 2 cores
    cases = run_rotation(ROTATION, bench_subprocess)         # ~7 min on the 2-core dev VM
"""

from __future__ import annotations

import json
import logging
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from lungbench.core.runs import utc_now
from lungbench.measure.contention import ContentionWatch
from lungbench.measure.workload import Protocol, Workload
from lungbench.predict import calibration
from lungbench.predict.ddp_probe import BenchLaunch, DDPRun, bench_args, run_ddp_bench
from lungbench.predict.forecast import (
    Prediction,
    Predictor,
    Target,
    source_from_record,
    source_here,
)
from lungbench.predict.operators import plain_step_s, step_timer
from lungbench.switches import Switches, eager_fp32, fast_defaults

log = logging.getLogger(__name__)

SWITCH_SETS = ("tuned", "eager-fp32")


@dataclass(frozen=True)
class Plan:
    """The source and the targets of one validation."""

    source: Workload = Workload(filters=8, batch_size=4, threads=1)
    # the step only; the epochs have their own run (epoch_targets, epoch_samples)
    protocol: Protocol = Protocol(warmup=2, repeats=10, epoch=False)
    switches: str = "tuned"  # tuned: the bench's fast defaults; eager-fp32: the baseline
    # Not 1, 2, 8 or 16: batch 1, half and twice the source's batch and twice its width are
    # the probe's own points (operators.probe_operators): a target there would be measured.
    batches: tuple[int, ...] = (3, 5, 6, 16)
    widths: tuple[int, ...] = (4, 6, 12, 24)
    thread_counts: tuple[int, ...] = (2,)
    ddp: bool = True
    scalings: tuple[str, ...] = ("weak", "strong")  # of the 2-rank targets
    # A target is measured in `rounds` alternations with the source (measure_pair), and
    # the 2-rank DDP run `ddp_runs` times, each between two measurements of the source.
    rounds: int = 5
    ddp_runs: int = 3  # the median of 3: one slow minute moves a 2-rank run by 10-25%
    # Epochs: one `lungbench bench` of the source and these (batch, filters), each with an
    # epoch of `epoch_samples` through the real loader; the source's predicts the others.
    epoch_targets: tuple[tuple[int, int], ...] = ((6, 8), (4, 12), (6, 12))
    epoch_samples: int = 72  # whole batches of 2, 3, 4 and 6

    def name(self) -> str:
        w = self.source
        return f"{w.preset} f{w.filters} b{w.batch_size} t{w.threads} {self.switches}"

    def switch_set(self) -> Switches:
        if self.switches not in SWITCH_SETS:
            raise ValueError(f"switches {self.switches!r}: one of {', '.join(SWITCH_SETS)}")
        return fast_defaults(torch.device("cpu")) if self.switches == "tuned" else eager_fp32()

    def bench_switches(self) -> list[str]:
        """The `lungbench bench` options that run this plan's switches: "tuned" is the
        device's table (fast_defaults), so no tuning pass, and no choice a tuning pass
        cached on this host (a launcher's ranks take one), may run anything else."""
        return ["--eager-fp32"] if self.switches == "eager-fp32" else ["--no-tune"]

    def probe_points(self) -> tuple[set[int], set[int]]:
        """(batches, widths) the source's probe measures: not targets."""
        batch, filters = self.source.batch_size, self.source.filters
        return {1, batch, max(1, batch // 2), 2 * batch}, {filters, 2 * filters}

    def targets(self) -> list[tuple[str, Target]]:
        batches, widths = self.probe_points()
        cases = [("batch", Target(batch=b)) for b in self.batches if b not in batches]
        cases += [("filters", Target(filters=f)) for f in self.widths if f not in widths]
        threads = [t for t in self.thread_counts if t != self.source.threads]
        cases += [("threads", Target(threads=t)) for t in threads]
        if self.ddp:
            for scaling in self.scalings:
                if scaling == "weak" or self.source.batch_size % 2 == 0:
                    cases.append(("ranks", Target(ranks=2, threads=1, scaling=scaling)))
        return cases


DEFAULT = Plan()


def _source(**changes: Any) -> Workload:
    """The default plan's source with some fields changed."""
    return replace(DEFAULT.source, **changes)


# The rotation: every source differs from another in one of batch, filters, threads or
# switches; targets avoid each source's probe points (Plan.targets drops any that do not).
ROTATION = (
    DEFAULT,
    Plan(_source(batch_size=2), batches=(3, 6), widths=(6, 12), epoch_targets=((3, 8), (2, 12))),
    Plan(
        _source(filters=16, batch_size=2),
        batches=(3, 6),
        widths=(12, 24),
        epoch_targets=((3, 16), (2, 12)),
    ),  # fmt: skip
    Plan(
        _source(threads=2),
        batches=(3, 6),
        widths=(6, 12),
        thread_counts=(1,),
        epoch_targets=((6, 8),),
    ),
    Plan(switches="eager-fp32", batches=(3, 6), widths=(6, 12), epoch_targets=((6, 8),)),
)
QUICK = Plan(
    _source(preset="dey2018", filters=2, batch_size=2),
    Protocol(warmup=1, repeats=6, epoch=False),
    batches=(3,),
    widths=(3,),
    rounds=3,
    ddp_runs=1,
    scalings=("weak",),  # each scaling's rank contention starts 2 processes: ~30-60 s
    epoch_targets=((3, 2),),
    epoch_samples=12,
)
# Two tiny sources (tuned and eager), the second without DDP or epochs: short for tests.
QUICK_ROTATION = (
    QUICK,
    replace(
        QUICK,
        source=replace(QUICK.source, batch_size=4),
        switches="eager-fp32",
        batches=(3,),
        ddp=False,
        epoch_targets=(),
    ),
)


def target_workload(source: Workload, target: Target) -> Workload:
    return replace(
        source,
        batch_size=target.batch or source.batch_size,
        filters=target.filters or source.filters,
        threads=target.threads or source.threads,
    )


def measure_step_s(workload: Workload, plan: Plan) -> float:
    """The median step of `workload` on this CPU (the plan's switches, fixed repeats)."""
    torch.set_num_threads(workload.threads or torch.get_num_threads())
    cpu = torch.device("cpu")
    return plain_step_s(
        workload, plan.switch_set(), cpu, plan.protocol.warmup, plan.protocol.repeats
    )


def run_rotation(
    plans: Sequence[Plan], launch: BenchLaunch, out: Path | None = None
) -> list[dict[str, Any]]:
    """Every plan validated in turn with one predictor (this machine measured once, as it
    is now, like the targets); the cases of all, each naming its source, stored together."""
    predictor = Predictor(remeasure=True, launch=launch)
    cases: list[dict[str, Any]] = []
    for i, plan in enumerate(plans):
        where = None if out is None else out / f"source-{i + 1}"
        cases += validate_source(plan, predictor, launch, where)
    calibration.save_cases([c for c in cases if c["kind"] != "source"], utc_now())
    return cases


def run_validation(
    plan: Plan, launch: BenchLaunch, out: Path | None = None
) -> list[dict[str, Any]]:
    """One source's validation (run_rotation of one plan)."""
    return run_rotation([plan], launch, out)


def validate_source(
    plan: Plan, predictor: Predictor, launch: BenchLaunch, out: Path | None
) -> list[dict[str, Any]]:
    """Measure the plan's source, predict every target, measure the targets: the cases,
    the source's own first. `launch` starts `lungbench bench` for the epochs and DDP."""
    switches = plan.switch_set()
    source_workload = plan.source
    log.info(f"validation source: {plan.name()}")
    step = measure_step_s(source_workload, plan)
    source = source_here(plan.name(), source_workload, switches, step, fresh=True)
    predictions = [(kind, t, predictor.predict(source, t)) for kind, t in plan.targets()]
    cases = []
    # A shared machine's speed drifts (2x within minutes on the dev box): each target is
    # measured as a ratio to the source measured beside it, and the prediction (a ratio to
    # the source) is taken against the source's step of that moment.
    with ContentionWatch() as ddp_watch:
        ddp_ratios = measure_ddp(plan, source_workload, launch, out) if plan.ddp else {}
    for kind, target, pred in tqdm(predictions, desc="measuring targets", leave=False):
        with ContentionWatch() as watch:
            if kind == "ranks":
                ratio = ddp_ratios.get(target.scaling)
                now, measured = step, ratio and step * ratio
            else:
                now, measured = measure_pair(
                    source_workload, target_workload(source_workload, target), plan
                )
        seen = ddp_watch if kind == "ranks" else watch
        # busy: while the target was measured, or while what predicted it was (the source's
        # probe, the ranks side by side)
        cases.append(
            case(kind, describe_target(target, pred), rescaled(pred, now / step), measured)
            | {"busy": busy_of(seen) or pred.busy}
        )
    with ContentionWatch() as epoch_watch:
        epochs = epoch_cases(plan, predictor, out)
    cases += [c | {"busy": busy_of(epoch_watch)} for c in epochs]
    torch.set_num_threads(plan.source.threads or torch.get_num_threads())
    head = {
        "kind": "source",
        "target": plan.name(),
        "measured_s": step,
        "note": "each prediction is scaled by the source's step measured beside its target "
        "(a shared machine drifts)",
    }
    return [{**c, "source": plan.name()} for c in [head, *cases]]


def busy_of(watch: ContentionWatch) -> str | None:
    """Why the machine counted as busy while `watch` ran (None: quiet): a busy case's error
    measures the neighbours as much as the model."""
    return watch.result.get("busy_reason") if watch.result.get("busy") else None


def epoch_cases(plan: Plan, predictor: Predictor, out: Path | None) -> list[dict[str, Any]]:
    """Epoch predictions against measured epochs: one `lungbench bench` (subprocess, the
    real loader) of the source and the epoch targets; the source's record (its step and its
    time outside the steps) predicts each target's epoch of the same samples."""
    if not plan.epoch_targets:
        return []
    log.info("measuring epochs (lungbench bench with the real loader)")
    records, environment = measure_epochs(plan, predictor.launch, out)
    key = {(r["batch_size"], r["filters"]): r for r in records if r.get("epoch_s")}
    source_record = key.get((plan.source.batch_size, plan.source.filters))
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
        cases.append(case("epoch", f"f{filters} b{batch} t{plan.source.threads} epoch of "
                          f"{plan.epoch_samples}", epoch, measured))  # fmt: skip
    return cases


def measure_epochs(
    plan: Plan, launch: BenchLaunch | None, out: Path | None
) -> tuple[list[dict], dict[str, Any]]:
    """(ok records, environment) of `lungbench bench` over the source and the epoch targets."""
    batches = sorted({plan.source.batch_size, *(b for b, _ in plan.epoch_targets)})
    widths = sorted({plan.source.filters, *(f for _, f in plan.epoch_targets)})
    protocol = replace(plan.protocol, epoch=True, epoch_samples=plan.epoch_samples)
    args = bench_args(plan.source, protocol, batches, widths)
    if launch is None:
        return [], {}
    return launch([*args, *plan.bench_switches()], 1, out)


def measure_pair(source: Workload, target: Workload, plan: Plan) -> tuple[float, float]:
    """(source step, target step), measured in alternation: `plan.rounds` rounds of a block
    of steps of each (threads set per block, the block's first step untimed). A shared
    machine drifts within seconds (the dev box: one t2/t1 ratio read 0.62 to 1.10 over six
    rounds), so the target's step is the source's median times the median of the rounds'
    target/source ratios: the ratio of neighbours holds where absolute times do not."""
    cpu = torch.device("cpu")
    switches = plan.switch_set()
    timers = [(w.threads, step_timer(w, switches, cpu)) for w in (source, target)]
    block = max(plan.protocol.repeats // 2, 3)
    rounds: list[tuple[float, float]] = []
    for _ in range(plan.rounds):
        medians = []
        for threads, time_steps in timers:
            torch.set_num_threads(threads or torch.get_num_threads())
            time_steps(1 if rounds else plan.protocol.warmup)  # the pool wakes, caches refill
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
    run = DDPRun(replace(source, threads=1), plan.protocol, "both", tuple(plan.bench_switches()))
    ratios: dict[str, list[float]] = {}
    for i in range(plan.ddp_runs):
        before = measure_step_s(source, plan)
        records = run_ddp_bench(run, launch, None if out is None else out / f"ddp-{i + 1}")
        now = (before + measure_step_s(source, plan)) / 2
        for record in records:
            ratios.setdefault(record["scaling"], []).append(record["step_s_median"] / now)
    return {scaling: statistics.median(r) for scaling, r in ratios.items()}


def summary(cases: list[dict[str, Any]]) -> dict[str, Any]:
    """Median |error| overall, per kind and per source; the intervals' coverage as the
    cases were predicted (from earlier validations) and leave-one-source-out."""
    scored = [c for c in cases if c.get("error") is not None]
    covered = [c["inside"] for c in scored if c.get("inside") is not None]
    loso = leave_one_source_out(scored)
    quiet = [c for c in scored if not c.get("busy")]
    return {
        "busy_cases": len(scored) - len(quiet),
        "median_abs_error_quiet": statistics.median(abs(c["error"]) for c in quiet)
        if quiet
        else None,
        "median_abs_error": statistics.median(abs(c["error"]) for c in scored) if scored else None,
        "median_abs_error_by_kind": median_abs_by(scored, "kind"),
        "median_abs_error_by_source": median_abs_by(scored, "source"),
        "interval_coverage": sum(covered) / len(covered) if covered else None,
        "coverage_leave_one_source_out": sum(loso) / len(loso) if loso else None,
        "coverage_cases": len(loso),
        "sources": len({c.get("source") for c in scored}),
        "cases": len(scored),
    }


def median_abs_by(scored: list[dict[str, Any]], field: str) -> dict[str, float]:
    groups: dict[str, list[float]] = {}
    for c in scored:
        groups.setdefault(str(c.get(field)), []).append(abs(c["error"]))
    return {k: statistics.median(v) for k, v in groups.items()}


def leave_one_source_out(scored: list[dict[str, Any]]) -> list[bool]:
    """Per case: whether the interval the OTHER sources' errors make for its kind
    (calibration.error_bounds) covers its measured value; a kind no other source
    validated gives no verdict."""
    verdicts = []
    for name in {c.get("source") for c in scored}:
        bounds = calibration.error_bounds(c for c in scored if c.get("source") != name)
        for c in (c for c in scored if c.get("source") == name):
            ends = calibration.log_bounds([c["kind"]], bounds)
            low_high = calibration.interval(c["predicted_s"], ends)
            if low_high is not None:
                verdicts.append(low_high[0] <= c["measured_s"] <= low_high[1])
    return verdicts


def dumps(cases: list[dict[str, Any]]) -> str:
    return json.dumps({"cases": cases, "summary": summary(cases)}, indent=2)
