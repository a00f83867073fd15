"""Layer 7 (harness): Where the time goes: a training step under torch.profiler, traces and summaries.

The workload (the two-path model's training step, as the bench harness measures it) runs
under `torch.profiler` with an explicit schedule: `wait` steps ignored, `warmup` steps
profiled and thrown away, `active` steps recorded, the cycle repeated `repeat` times. Each
step is cut into record_function ranges "data", "forward", "backward" and "optimizer" (and
NVTX ranges of the same names on CUDA, for Nsight Systems). Outputs in the run folder:

    traces/<host>_<pid>.<ns>.pt.trace.json   Chrome-trace JSON, one per cycle, written by
                                             tensorboard_trace_handler: open with
                                             `tensorboard --logdir RUN` (torch-tb-profiler),
                                             https://ui.perfetto.dev or chrome://tracing
    tables/operators.csv|.md                 top-N operators by self CPU (or CUDA) time
    tables/phases.csv|.md                    data / forward / backward / optimizer /
                                             communication time per step
    profile.json                             the summary: phase shares, the share of
                                             communication overlapped with compute, files

    lungbench profile --filters 16 --batch 2            # CPU, default preset
    lungbench profile --device cuda --activities cpu,cuda --with-stack
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch.profiler import ProfilerActivity, record_function

from lungbench.core.errors import DataError, UsageError, look_up_option, message_of
from lungbench.core.options import non_negative_int, option, positive_int
from lungbench.distributed.group import DistContext
from lungbench.harness.ddp import agreed_choice, ddp_train_step, rank_threads
from lungbench.harness.tuning import Tuner, TuningOptions, fast_choice
from lungbench.measure.timing import training_step_flops
from lungbench.measure.trace import load_trace, phase_summary, trace_files
from lungbench.measure.workload import Workload
from lungbench.step import TrainStep, bce_loss
from lungbench.switches import (
    Switches,
    auto_switches,
    backend_flags,
    has_auto,
    resolve_switches,
)

log = logging.getLogger(__name__)  # progress: the CLI shows it on stderr

ACTIVITIES = {"cpu": ProfilerActivity.CPU, "cuda": ProfilerActivity.CUDA}


SCHEDULE = "profiler schedule and options"  # the --help section of the schedule's options


@dataclass(frozen=True)
class ProfileSchedule:
    """torch.profiler's schedule; one cycle = wait + warmup + active steps (each field
    declared with its `lungbench profile` option)."""

    wait: int = option(1, type=non_negative_int, group=SCHEDULE, help="steps skipped")
    warmup: int = option(1, type=non_negative_int, group=SCHEDULE, help="steps profiled, discarded")
    active: int = option(3, type=positive_int, group=SCHEDULE, help="steps recorded")
    repeat: int = option(1, type=positive_int, group=SCHEDULE, help="cycles")

    @property
    def steps(self) -> int:
        """Steps the whole schedule needs."""
        return (self.wait + self.warmup + self.active) * self.repeat

    def check(self, run_steps: int | None = None) -> int:
        """UsageError unless the schedule is valid and fits `run_steps`; returns the length."""
        for name in ("wait", "warmup"):
            if getattr(self, name) < 0:
                raise UsageError(f"--{name} must be >= 0, got {getattr(self, name)}")
        for name in ("active", "repeat"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if run_steps is not None and run_steps < self.steps:
            raise UsageError(
                f"--steps {run_steps}: the schedule needs (wait {self.wait} + warmup "
                f"{self.warmup} + active {self.active}) x repeat {self.repeat} = {self.steps} "
                "steps; raise --steps or shorten the schedule"
            )
        return self.steps

    def torch_schedule(self) -> Callable[[int], Any]:
        return torch.profiler.schedule(
            wait=self.wait, warmup=self.warmup, active=self.active, repeat=self.repeat
        )


@dataclass(frozen=True)
class ProfileConfig:
    """One profiled workload. Every field is saved in config.json."""

    workload: Workload = field(default_factory=lambda: Workload(filters=16))
    # The step's speed switches, as in lungbench bench ("auto" = the device's fast default,
    # lungbench.step): the profiled step is the timed one.
    switches: Switches = field(default_factory=auto_switches)
    strict_switches: tuple[str, ...] = ()  # switches the user forced
    schedule: ProfileSchedule = field(default_factory=ProfileSchedule)
    steps: int | None = None  # run length; None = exactly the schedule
    activities: tuple[str, ...] = ("cpu",)
    record_shapes: bool = True
    profile_memory: bool = True
    with_stack: bool = False
    top: int = 25
    store: Path | None = None  # batches from this store through a DataLoader; else random
    # "auto" by measurement, as in lungbench bench (lungbench.harness.tuning)
    tune: bool = True
    retune: bool = False
    tune_compile: bool = False
    fast: Switches | None = None  # the tuned choice the "auto" switches take

    @property
    def run_steps(self) -> int:
        return self.steps if self.steps is not None else self.schedule.steps


def parse_activities(text: str | Iterable[str], device: str = "cpu") -> tuple[str, ...]:
    """'cpu,cuda' -> ('cpu', 'cuda'); UsageError for an unknown or unusable activity."""
    names = text.split(",") if isinstance(text, str) else list(text)
    names = [n.strip().lower() for n in names if n.strip()]
    if not names:
        raise UsageError(f"--activities: empty; choose from: {', '.join(ACTIVITIES)}")
    for name in names:
        look_up_option(name, ACTIVITIES, what="--activities entry")
    if "cuda" in names and not torch.cuda.is_available():
        raise UsageError("--activities cuda: no CUDA device on this machine; choose from: cpu")
    if "cuda" in names and torch.device(device).type != "cuda":
        raise UsageError(f"--activities cuda needs --device cuda, got --device {device}")
    return tuple(dict.fromkeys(names))


def check_writable(folder: Path, option: str = "--out", what: str = "the trace folder") -> None:
    """UsageError unless `folder` can be created and written (before anything runs)."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check-"):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise UsageError(f"{option} {folder}: cannot write {what} ({reason})") from None


@contextlib.contextmanager
def phase_range(name: str, nvtx: bool = False) -> Iterator[None]:
    """A record_function range for the profiler, and an NVTX range on CUDA (Nsight)."""
    with contextlib.ExitStack() as stack:
        if nvtx:
            stack.enter_context(torch.cuda.nvtx.range(name))
        stack.enter_context(record_function(name))
        yield


def _batches(cfg: ProfileConfig, device: torch.device) -> Iterator[tuple[list, torch.Tensor]]:
    """Endless batches on the host: from the store through a DataLoader, or random."""
    if cfg.store is not None:
        from lungbench.data.loader import LoaderOptions, make_loader
        from lungbench.data.store import StoreDataset

        opts = LoaderOptions(
            batch_size=cfg.workload.batch_size, drop_last=True, seed=cfg.workload.seed
        )
        loader = make_loader(StoreDataset(cfg.store), opts, device)
        while True:
            empty = True
            for inputs, target in loader:
                empty = False
                yield list(inputs), target.float()
            if empty:  # drop_last with fewer samples than a batch: never spin on nothing
                raise DataError(
                    f"--store {cfg.store}: {len(loader.dataset)} samples < --batch "
                    f"{cfg.workload.batch_size}; no full batch to profile"
                )
    # A few distinct host batches, cycled: the "data" range then holds the host-to-device
    # copy, not random number generation.
    cpu = torch.device("cpu")
    pool = [cfg.workload.random_batch(cpu, seed=cfg.workload.seed + k) for k in range(2)]
    if device.type == "cuda":
        pool = [([x.pin_memory() for x in xs], y.pin_memory()) for xs, y in pool]
    yield from itertools.cycle(pool)


def _tuned(
    cfg: ProfileConfig, device: torch.device, dist: DistContext
) -> tuple[ProfileConfig, dict[str, Any]]:
    """`cfg` with the tuned choice for its "auto" switches (the one `lungbench bench` uses,
    from the same cache) and the record fields saying so. Under a launcher no rank stops to
    tune (every rank must run the same switches): rank 0's cached choice for one rank's
    workload, as `lungbench bench` takes it, so the DDP step profiled is the one timed."""
    skip = None
    if not cfg.tune:
        skip = "--no-tune"
    elif dist.is_distributed:
        if not has_auto(cfg.switches):
            return cfg, {}
        fast, fields = agreed_choice(cfg.workload, cfg.workload.batch_size, dist)
        return replace(cfg, fast=fast), fields
    tuner = Tuner(TuningOptions(retune=cfg.retune, allow_compile=cfg.tune_compile))
    fast, fields = fast_choice(cfg.switches, cfg.workload, device, tuner, skip)
    return replace(cfg, fast=fast), fields


class RangeTimer:
    """The timer a TrainStep is given under the profiler: each phase becomes a named
    record_function range (and an NVTX range on CUDA) instead of a clock reading."""

    def __init__(self, nvtx: bool) -> None:
        self.nvtx = nvtx

    def phase(self, name: str) -> contextlib.AbstractContextManager[None]:
        return phase_range(name, self.nvtx)


def training_step_fn(
    cfg: ProfileConfig, device: torch.device, dist: DistContext | None = None
) -> tuple[Callable[[], None], dict[str, Any]]:
    """The step `lungbench bench` times (lungbench.step.TrainStep, the same switches resolved
    the same way), preceded by a "data" range, and the record fields saying what ran. Under
    a launcher the model is DDP's (lungbench.harness.ddp), so communication shows in the trace.
    """
    model = cfg.workload.build_model(device)
    examples, target = cfg.workload.random_batch(device)
    fields = {"flops_per_step": training_step_flops(model, bce_loss, examples, target)}
    if dist is not None and dist.is_distributed:
        step, _, switches = ddp_train_step(cfg, model, dist, examples)
    else:
        resolved = resolve_switches(cfg, device, examples[0].dim(), probe=(model, examples))
        # one CUDA graph would hide the phases the trace is for: the profile runs without it
        resolved = replace(resolved, switches=replace(resolved.switches, cuda_graphs=False))
        step = TrainStep(model, bce_loss, resolved.switches, device)
        switches = resolved.record()
    fields.update(switches)
    batches = _batches(cfg, device)
    timer = RangeTimer(nvtx=device.type == "cuda")

    def run() -> None:
        with timer.phase("data"):
            inputs, target = next(batches)
            inputs = step.prepare_inputs([x.to(device, non_blocking=True) for x in inputs])
            target = target.to(device, non_blocking=True)
        with backend_flags(step.switches):
            step(timer, inputs, target)

    return run, fields


@dataclass(frozen=True)
class TraceDetail:
    """What the profiler records besides operator times: input shapes, memory events, and
    Python stacks (large traces; off by default)."""

    record_shapes: bool = True
    profile_memory: bool = True
    with_stack: bool = False


def profile_steps(
    step: Callable[[], None],
    run_steps: int,
    schedule: ProfileSchedule,
    activities: Sequence[str],
    trace_dir: Path,
    *,
    detail: TraceDetail | None = None,
    worker_name: str | None = None,
) -> dict[str, dict[str, float]]:
    """Run `step` `run_steps` times under the profiler; traces go to `trace_dir`.

    Returns the operator statistics summed over every recorded cycle:
    {operator: {calls, self_cpu_us, cpu_total_us, self_device_us, device_total_us, ...}}.
    """
    schedule.check(run_steps)
    detail = detail or TraceDetail()
    handler = torch.profiler.tensorboard_trace_handler(str(trace_dir), worker_name=worker_name)
    totals: dict[str, dict[str, float]] = {}

    def on_trace_ready(prof: torch.profiler.profile) -> None:
        handler(prof)
        _add_key_averages(totals, prof.key_averages())

    with torch.profiler.profile(
        activities=[ACTIVITIES[a] for a in activities],
        schedule=schedule.torch_schedule(),
        on_trace_ready=on_trace_ready,
        record_shapes=detail.record_shapes,
        profile_memory=detail.profile_memory,
        with_stack=detail.with_stack,
    ) as prof:
        for _ in range(run_steps):
            step()
            prof.step()
    cuda = any(a == "cuda" for a in activities)
    if cuda:
        torch.cuda.synchronize()
    return totals


def _add_key_averages(totals: dict[str, dict[str, float]], averages: Iterable[Any]) -> None:
    """Accumulate one cycle's operators (user ranges and ProfilerStep#N are left out)."""
    for e in averages:
        if getattr(e, "is_user_annotation", False) or e.key.startswith("ProfilerStep"):
            continue
        row = totals.setdefault(
            e.key,
            dict.fromkeys(
                (
                    "calls",
                    "self_cpu_us",
                    "cpu_total_us",
                    "self_device_us",
                    "device_total_us",
                    "self_cpu_memory_bytes",
                    "self_device_memory_bytes",
                ),
                0.0,
            ),
        )
        row["calls"] += e.count
        row["self_cpu_us"] += e.self_cpu_time_total
        row["cpu_total_us"] += e.cpu_time_total
        row["self_device_us"] += getattr(e, "self_device_time_total", 0.0)
        row["device_total_us"] += getattr(e, "device_time_total", 0.0)
        row["self_cpu_memory_bytes"] += e.self_cpu_memory_usage
        row["self_device_memory_bytes"] += getattr(e, "self_device_memory_usage", 0)


def operator_table(
    totals: dict[str, dict[str, float]], top: int = 25, by: str = "cpu"
) -> pd.DataFrame:
    """The top-`top` operators by self CPU (`by`='cpu') or self CUDA ('cuda') time, in ms."""
    if not totals:
        return pd.DataFrame(columns=["operator", "calls", "self_cpu_ms", "self_cpu_pct"])
    frame = pd.DataFrame.from_dict(totals, orient="index").rename_axis("operator").reset_index()
    frame["calls"] = frame["calls"].astype(int)
    out = pd.DataFrame(
        {
            "operator": frame["operator"],
            "calls": frame["calls"],
            "self_cpu_ms": frame["self_cpu_us"] / 1e3,
            "self_cpu_pct": 100 * frame["self_cpu_us"] / max(frame["self_cpu_us"].sum(), 1e-12),
            "cpu_total_ms": frame["cpu_total_us"] / 1e3,
            "self_cuda_ms": frame["self_device_us"] / 1e3,
            "self_cuda_pct": 100
            * frame["self_device_us"]
            / max(frame["self_device_us"].sum(), 1e-12),
            "cuda_total_ms": frame["device_total_us"] / 1e3,
            "self_cpu_memory_bytes": frame["self_cpu_memory_bytes"].astype("int64"),
            "self_cuda_memory_bytes": frame["self_device_memory_bytes"].astype("int64"),
        }
    )
    key = "self_cuda_ms" if by == "cuda" else "self_cpu_ms"
    return out.sort_values(key, ascending=False, kind="stable").head(top).reset_index(drop=True)


@dataclass
class ProfileResult:
    run_dir: Path
    traces: list[Path]
    operators: pd.DataFrame
    phases: pd.DataFrame
    summary: dict[str, Any]


def validate(cfg: ProfileConfig, out: Path) -> torch.device:
    """UsageError for anything invalid, before any file is written; returns the device."""
    from lungbench.core.device import parse_device
    from lungbench.data.geometry import GEOMETRY_PRESETS
    from lungbench.models import list_models

    w = cfg.workload
    look_up_option(w.model, list_models(), what="--model")
    look_up_option(w.preset, GEOMETRY_PRESETS, what="--preset")
    device = parse_device(w.device)
    parse_activities(cfg.activities, w.device)
    cfg.schedule.check(cfg.run_steps)
    if cfg.store is not None:
        check_store(cfg)
    check_fits(cfg)
    check_writable(out)
    return device


def check_fits(cfg: ProfileConfig) -> None:
    """UsageError when the profiled step cannot fit in the device's memory (with the
    estimate and the largest batch that would)."""
    from lungbench.data.store import read_info
    from lungbench.measure.memory import refusal

    shapes = list(read_info(cfg.store).inputs.values()) if cfg.store is not None else None
    too_big = refusal(cfg.workload, shapes)
    if too_big:
        raise UsageError(f"--batch {cfg.workload.batch_size}: {too_big}")


def check_store(cfg: ProfileConfig) -> None:
    """UsageError unless `cfg.store` holds a full batch of inputs shaped for `cfg`'s model."""
    from lungbench.data.store import read_info

    info = read_info(cfg.store)
    w = cfg.workload
    if info.n < w.batch_size:
        raise UsageError(f"--store {cfg.store}: {info.n} samples < --batch {w.batch_size}")
    if w.model != "dualpath3d":
        return  # other models take any grid; their example shapes are no requirement
    from lungbench.data.geometry import preset_mismatch

    reason = preset_mismatch(list(info.inputs.values()), w.preset)
    if reason:
        raise UsageError(f"--store {cfg.store}: {reason}")


def run_profile(
    cfg: ProfileConfig,
    out: Path = Path("results"),
    run_id: str | None = None,
    dist: DistContext | None = None,
) -> ProfileResult | None:
    """Profile `cfg`'s training step and write traces, tables and profile.json.

    Under a launcher (`dist` with several ranks) every rank profiles its DDP step and writes
    its own trace (traces/rank<R>.*) into rank 0's run folder, which rank 0 alone makes; rank
    0 then summarizes all of them (the communication overlap is DDP's) and returns the
    result, the other ranks return None. The run folder must be on a file system that every
    rank sees, as for a data store.
    """
    from lungbench.core.environment import environment_record
    from lungbench.core.runs import finish_run, marking_run, write_json
    from lungbench.distributed.group import barrier, single_process
    from lungbench.measure.timing import set_threads

    w = cfg.workload
    dist = dist or single_process(w.device)
    device = validate(cfg, Path(out))
    if dist.is_distributed:
        device = dist.device  # cuda:<local rank> on a GPU node
    if device.type != "cpu":
        threads = torch.get_num_threads()
    elif dist.is_distributed:  # each rank's share of its node, as `lungbench bench` gives it
        threads = set_threads(rank_threads(w, dist))
    else:
        threads = set_threads(w.threads)
    run_dir = _shared_run_dir(Path(out), run_id, dist)
    with marking_run(run_dir) if dist.is_main else contextlib.nullcontext():
        if dist.is_main:  # a failure marks the run "failed", Ctrl-C "interrupted"
            write_json(
                run_dir / "config.json",
                {"profile": cfg, "threads_used": threads, "distributed": dist.describe()},
            )
            write_json(run_dir / "environment.json", environment_record())
            (run_dir / "traces").mkdir()
        barrier(dist, "waiting for rank 0's run folder")
        trace_dir = run_dir / "traces"
        log.info(
            f"profiling {w.model} f{w.filters} b{w.batch_size} on {device}"
            f"{f' (DDP x{dist.world_size}, {dist.backend})' if dist.is_distributed else ''}: "
            f"{cfg.run_steps} steps, schedule {cfg.schedule}"
        )
        cfg, tuning = _tuned(cfg, device, dist)
        step, step_fields = training_step_fn(cfg, device, dist)
        step_fields.update(tuning)
        totals = profile_steps(
            step,
            cfg.run_steps,
            cfg.schedule,
            cfg.activities,
            trace_dir,
            detail=TraceDetail(cfg.record_shapes, cfg.profile_memory, cfg.with_stack),
            worker_name=f"rank{dist.rank}" if dist.is_distributed else None,
        )
        barrier(dist, "waiting for every rank's trace")
        if not dist.is_main:
            return None
        result = _summarize(run_dir, cfg, totals, dist)
        result.summary.update({"device": str(device), "threads_used": threads, **step_fields})
        write_json(run_dir / "profile.json", result.summary)
    finish_run(run_dir, "complete")
    return result


def _shared_run_dir(out: Path, run_id: str | None, dist: DistContext) -> Path:
    """The run folder rank 0 makes, known to every rank; a failure to make it ends every
    rank with rank 0's message (the others must hear of it, not wait for a timeout)."""
    from lungbench.core.runs import create_run_dir
    from lungbench.distributed.group import all_gather

    made, failure = None, None
    if dist.is_main:
        try:
            made = create_run_dir(out, "profile", run_id)
        except Exception as exc:
            failure = exc
    shared = all_gather(
        dist, (str(made), message_of(failure) if failure else None), "sharing the run folder"
    )[0]
    if failure is not None:
        raise failure
    if shared[1] is not None:
        raise UsageError(f"rank 0 could not make the run folder: {shared[1]}")
    return Path(shared[0])


def _summarize(
    run_dir: Path, cfg: ProfileConfig, totals: dict[str, dict[str, float]], dist: DistContext
) -> ProfileResult:
    """Rank 0, after every rank's trace is written: the operator and phase tables, and the
    summary (profile.json's content, without the device and step fields)."""
    from lungbench.core.runs import write_table

    files = trace_files(run_dir / "traces")
    traces = [load_trace(p) for p in files]  # also proves they are valid Chrome traces
    operators = operator_table(totals, cfg.top, by="cuda" if "cuda" in cfg.activities else "cpu")
    phases, summary = phase_summary(traces)
    write_table(run_dir, "operators", operators, index=False)
    write_table(run_dir, "phases", phases, index=False)
    top = operators.head(5)[["operator", "self_cpu_ms", "self_cuda_ms"]]
    summary.update(
        {
            "trace_files": [str(p.relative_to(run_dir)) for p in files],
            "trace_events": sum(len(t["traceEvents"]) for t in traces),
            "top_operators": top.to_dict("records"),
            "tensorboard": f"tensorboard --logdir {run_dir}",
            "world_size": dist.world_size,
            "operators_of": "rank 0" if dist.is_distributed else "this process",
        }
    )
    return ProfileResult(run_dir, files, operators, phases, summary)
