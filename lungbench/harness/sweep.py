"""Layer 7 (harness): The benchmark sweep: configurations x devices -> self-describing measurement records.

For each configuration (model, filters, batch size, device, threads, ...):
  1. compute-only: a training step on tensors already resident on the device, timed by the
     protocol in lungbench.measure.timing (warm-up off the clock, then repeats; forward, backward,
     optimizer and the whole step), FLOPs per step, achieved FLOP/s, peak memory;
  2. end to end ("Exec. time", the thesis's column): one epoch of the store's training split
     through a DataLoader, with the time spent waiting for data measured separately.

Each record is appended to records.jsonl as soon as it is measured, so a killed sweep keeps
everything that finished. Runs: see `lungbench bench --help`.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lungbench.core.allocator import minor_page_faults
from lungbench.core.device import parse_device, synchronize
from lungbench.core.errors import LungbenchError, is_oom, message_of
from lungbench.data.loader import LoaderOptions, make_loader, shared_dataset, to_device
from lungbench.data.store import StoreDataset, StoreInfo
from lungbench.measure.contention import ContentionWatch
from lungbench.measure.data_wait import DATA_BOUND_FRACTION, DeviceWaitClock
from lungbench.measure.memory import refusal as memory_refusal
from lungbench.measure.memory import step_peak_bytes
from lungbench.measure.stats import median_ci, median_ci_relative, summarize
from lungbench.measure.timing import (
    STEP,
    PhaseTimer,
    StopRule,
    peak_memory_bytes,
    report,
    reset_peak_memory,
    run_until,
    set_threads,
    training_step_cost,
)
from lungbench.measure.workload import Protocol, Workload, random_batch
from lungbench.step import NO_TIMER, TrainStep, bce_loss
from lungbench.switches import Switches, auto_switches, backend_flags, resolve_switches

log = logging.getLogger(__name__)

# The thesis's LIDC-IDRI set has 754 nodules; its 80/20 split trains on 603 per epoch.
THESIS_N_NODULES = 754


TRAIN_FRACTION = 0.8


@dataclass(frozen=True)
class BenchConfig:
    """One measured configuration: a workload, the step's switches, the timing protocol and
    the epoch's data path. `record_fields()` is how every record carries it (flat)."""

    workload: Workload = field(default_factory=Workload)
    # Speed switches (lungbench.step; "auto"/None = the device's measured fast default,
    # resolved per device; records hold what ran and the fallbacks, if any).
    switches: Switches = field(default_factory=auto_switches)
    strict_switches: tuple[str, ...] = ()  # switches the user forced: UsageError, no fallback
    protocol: Protocol = field(default_factory=Protocol)
    num_workers: int = 0
    pin_memory: bool | None = None  # None = on for CUDA devices
    cache: bool = False  # decode the store once into shared memory (lungbench.data.loader)
    # The measured fast choice for this workload here (lungbench.harness.tuning): what the
    # "auto" switches take; None = the device's table. Not part of the key: the request is.
    fast: Switches | None = None

    def key(self) -> str:
        """Identifies the configuration (for resuming and comparing runs)."""
        w, sw = self.workload, self.switches
        return (
            f"{w.model}|{w.preset}|f{w.filters}|b{w.batch_size}|{w.device}"
            f"|t{w.threads}|{sw.dtype}|{sw.memory_format}|{sw.compile}"
        )

    def with_workload(self, **changes: Any) -> BenchConfig:
        """The same configuration with some workload fields changed."""
        return replace(self, workload=replace(self.workload, **changes))

    def record_fields(self) -> dict[str, Any]:
        """The configuration as flat record fields (model, ..., dtype, ..., warmup, ...)."""
        return {
            **asdict(self.workload),
            **asdict(self.switches),
            "strict_switches": self.strict_switches,
            **asdict(self.protocol),
            "num_workers": self.num_workers,
            "pin_memory": self.pin_memory,
            "cache": self.cache,
        }

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> BenchConfig:
        """The configuration a record was measured with (fields it lacks keep defaults)."""

        def part(kind: type, default: Any) -> Any:
            names = {f.name for f in fields(kind)}
            return replace(default, **{k: v for k, v in record.items() if k in names})

        return cls(
            workload=part(Workload, Workload()),
            switches=part(Switches, auto_switches()),
            strict_switches=tuple(record.get("strict_switches") or ()),  # JSON has no tuples
            protocol=part(Protocol, Protocol()),
            **{k: record[k] for k in ("num_workers", "pin_memory", "cache") if k in record},
        )


def train_split(info: StoreInfo, labels: np.ndarray, seed: int = 0) -> np.ndarray:
    """Indices of a stratified 80% training split (the thesis: 603 of 754 nodules)."""
    rng = np.random.default_rng(seed)
    labels = labels if labels.ndim == 1 else labels.argmax(axis=1)
    chosen = []
    for value in np.unique(labels):
        members = np.flatnonzero(labels == value)
        rng.shuffle(members)
        chosen.append(members[: int(round(TRAIN_FRACTION * len(members)))])
    return np.sort(np.concatenate(chosen))


def synthetic_batch(
    info: StoreInfo, batch: int, device: torch.device, seed: int
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Random inputs with the store's shapes and random 0/1 targets, resident on `device`."""
    return random_batch(list(info.inputs.values()), batch, device, seed)


def measure_compute(cfg: BenchConfig, info: StoreInfo, device: torch.device) -> dict[str, Any]:
    """Time the training step on resident tensors; FLOPs, FLOP/s and peak memory."""
    w = cfg.workload
    model = w.build_model(device)
    inputs, target = w.random_batch(device, shapes=list(info.inputs.values()))
    flops, bytes_moved = training_step_cost(model, bce_loss, inputs, target)
    resolved = resolve_switches(cfg, device, inputs[0].dim(), probe=(model, inputs))
    step_fn = TrainStep(model, bce_loss, resolved.switches, device)  # format, compile, optim
    inputs = step_fn.prepare_inputs(inputs)
    reset_peak_memory(device)
    timer = PhaseTimer(device)
    faults: list[int] = []  # per step: pages the kernel mapped in (lungbench.core.allocator)

    def counted_step(t: PhaseTimer) -> None:
        before = minor_page_faults()
        step_fn(t, inputs, target)
        faults.append(minor_page_faults() - before)

    with backend_flags(resolved.switches):
        samples, stop = run_until(
            counted_step,
            timer,
            warmup=cfg.protocol.warmup,
            repeats=cfg.protocol.repeats,
            until=stop_rule(cfg.protocol),
        )
    peak, peak_kind = peak_memory_bytes(device)
    with backend_flags(resolved.switches):  # one more step, untimed, for its own memory
        own, own_kind = step_peak_bytes(lambda: step_fn(NO_TIMER, inputs, target), device)
    step = summarize(samples[STEP])
    low, high = median_ci(samples[STEP])
    record: dict[str, Any] = {
        "repeats_used": step.n,
        "repeats_stop": stop,  # lungbench.measure.timing.STOPS says what each means
        "step_s_ci_low": low,  # the median's 95% confidence interval (nan: < 6 repeats)
        "step_s_ci_high": high,
        "step_s_ci_rel": median_ci_relative(samples[STEP]),
        "parameters": sum(p.numel() for p in model.parameters()),
        "flops_per_step": flops,
        "bytes_per_step": bytes_moved,  # FP32 operators' traffic (lungbench.measure.timing)
        "achieved_flops": flops / step.median,
        "samples_per_s": w.batch_size / step.median,
        "peak_memory_bytes": peak,
        "peak_memory_kind": peak_kind,
        # What the step itself allocated at its high-water mark, above what was live before
        # it (lungbench.measure.memory.step_peak_bytes); RSS above hardly moves with the batch.
        "step_peak_memory_mib": own / 2**20,
        "step_peak_memory_kind": own_kind,
        # The timed steps' median; thousands a step: memory the allocator gave back to the
        # kernel and faults in again every step (LUNGBENCH_MALLOC, environment.json "malloc")
        "page_faults_per_step": statistics.median(faults[cfg.protocol.warmup :]),
        "noisy": step.noisy,
        "samples_s": samples,
        **resolved.record(),  # the switches that ran (and what was asked, and fallbacks)
    }
    for phase, values in samples.items():
        record.update(summarize(values).as_dict(prefix=f"{phase}_s_"))
    return record


def stop_rule(protocol: Protocol) -> StopRule | None:
    """The adaptive repeats' stop rule of `protocol` (None: a fixed number of repeats)."""
    if protocol.ci_target is None:
        return None
    return StopRule(protocol.ci_target, protocol.max_repeats, protocol.budget_s)


def timed_epoch(loader, step_fn: TrainStep, device: torch.device) -> tuple[float, float, int]:
    """One epoch of `step_fn` over `loader`, timed: (wall seconds, seconds the device waited
    for data, steps). The one epoch loop of bench's single-process and DDP epochs (under DDP
    the caller holds the ranks at a barrier first, so they start together)."""
    clock = DeviceWaitClock(device)
    synchronize(device)
    start = time.perf_counter()
    clock.start()
    batches, steps = len(loader), 0
    with backend_flags(step_fn.switches):
        for batch in loader:
            steps += 1
            report(f"epoch batch {steps}/{batches}")
            inputs, target = to_device(batch, device)
            clock.batch_ready()
            step_fn(NO_TIMER, step_fn.prepare_inputs(inputs), target)
            clock.step_done()
    synchronize(device)  # note: CPU-GPU sync point; the epoch ends when the last kernel does
    return time.perf_counter() - start, clock.seconds(), steps


def measure_epoch(
    cfg: BenchConfig, dataset: StoreDataset, indices: np.ndarray, device: torch.device
) -> dict[str, Any]:
    """Wall time of one training epoch through the DataLoader, data waits measured apart."""
    w = cfg.workload
    model = w.build_model(device)
    # The epoch's last batch may be smaller: CUDA graphs (fixed shapes) stay off here.
    probe = (model, [torch.zeros((1, *s), device=device) for s in dataset.info.inputs.values()])
    resolved = resolve_switches(cfg, device, 5, quiet=True, probe=probe)
    switches = replace(resolved.switches, cuda_graphs=False)
    step_fn = TrainStep(model, bce_loss, switches, device)
    split = len(indices)  # the training split: a full epoch
    if cfg.protocol.epoch_samples is not None:
        indices = indices[: cfg.protocol.epoch_samples]
    if cfg.cache:
        dataset = shared_dataset(dataset.path)  # decoded once, in shared memory
    loader = make_loader(
        dataset,
        LoaderOptions(
            batch_size=w.batch_size,
            num_workers=cfg.num_workers,
            pin_memory=cfg.pin_memory,
            seed=w.seed,
        ),
        device,
        indices.tolist(),
    )
    elapsed, data_wait, _ = timed_epoch(loader, step_fn, device)
    return {
        "epoch_s": elapsed,
        "epoch_samples": len(indices),
        "epoch_split_samples": split,
        "epoch_partial": len(indices) < split,  # --epoch-samples: not the thesis's full epoch
        "epoch_data_wait_s": data_wait,
        "epoch_samples_per_s": len(indices) / elapsed,
        "data_bound": data_wait / elapsed > DATA_BOUND_FRACTION,  # the device waited on data
    }


# What every single-process record says about the distributed layout (DDP records carry
# their own world size, nodes, backend and launcher), so all records share these columns.
SINGLE_PROCESS = {"world_size": 1, "nodes": 1, "backend": "none", "launcher": "none"}


def measure(
    cfg: BenchConfig, info: StoreInfo, dataset: StoreDataset, indices: np.ndarray
) -> dict[str, Any]:
    """One configuration's record; failures become a record with status oom / error."""
    device = parse_device(cfg.workload.device)
    threads = set_threads(cfg.workload.threads) if device.type == "cpu" else torch.get_num_threads()
    record = base_record(cfg, threads)
    watch = ContentionWatch().start()  # what else ran on the CPU meanwhile
    try:
        record.update(measure_compute(cfg, info, device))
        if cfg.protocol.epoch:
            record.update(measure_epoch(cfg, dataset, indices, device))
    except (MemoryError, RuntimeError) as exc:  # torch.cuda.OutOfMemoryError is a RuntimeError
        # CUDA says "out of memory", the CPU allocator "can't allocate memory": both oom.
        record.update(status="oom" if is_oom(exc) else "error", error=message_of(exc))
    except LungbenchError:
        raise  # the user's input is wrong (a forced switch, a NaN in the store): stop, exit 2
    except Exception as exc:
        # Any other failure of one configuration is a result too; KeyboardInterrupt and
        # SIGTERM (lungbench.harness.sweep_state.SweepTerminated) are not Exceptions: they stop it.
        record.update(status="error", error=f"{type(exc).__name__}: {message_of(exc)}")
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()
    record.update(watch.stop())
    return record


def base_record(cfg: BenchConfig, threads: int | None) -> dict[str, Any]:
    """The fields every record of `cfg` starts with: what was measured, status "ok"."""
    return {
        "key": cfg.key(),
        **cfg.record_fields(),
        "threads_used": threads,
        **SINGLE_PROCESS,
        "status": "ok",
        "error": None,
    }


def refused_for_memory(cfg: BenchConfig, shapes: Sequence[Sequence[int]]) -> dict[str, Any] | None:
    """An "oom" record, without running anything, for a configuration whose step cannot fit
    in the device's memory (lungbench.measure.memory); None when it may fit."""
    why = memory_refusal(cfg.workload, shapes)
    if why is None:
        return None
    log.warning(f"warning: {cfg.key()} not measured: {why}")
    threads = cfg.workload.threads or torch.get_num_threads()  # what it would have run with
    record = base_record(cfg, threads if cfg.workload.device == "cpu" else None)
    record.update(status="oom", error=f"refused before running: {why}", memory_refused=True)
    return record


@dataclass(frozen=True)
class SweepData:
    """The store a sweep reads, opened once for all its configurations: the dataset, the
    per-sample input shapes and the training split its epochs read."""

    info: StoreInfo
    dataset: StoreDataset
    indices: np.ndarray

    @classmethod
    def open(cls, info: StoreInfo, seed: int = 0) -> SweepData:
        dataset = StoreDataset(info.path)
        return cls(info, dataset, train_split(info, dataset.labels, seed=seed))

    @property
    def shapes(self) -> list[tuple[int, ...]]:
        return list(self.info.inputs.values())


Monitor = Callable[[BenchConfig, Callable[[], dict[str, Any]]], dict[str, Any]]


def measure_config(cfg: BenchConfig, data: SweepData, monitor: Monitor | None = None) -> dict:
    """One configuration's record. `monitor(cfg, run)` may wrap the measurement, e.g.
    lungbench.measure.telemetry.SweepMonitor, which samples GPU/CPU telemetry while `run()`
    measures and adds its summary to the record."""
    if monitor is None:
        return measure(cfg, data.info, data.dataset, data.indices)
    return monitor(cfg, lambda: measure(cfg, data.info, data.dataset, data.indices))


def default_store_path(root: Path, kind: str, n: int, preset: str, seed: int) -> Path:
    """Where the generated default data set is cached between runs (the generator's version
    in the name: a newer lungbench never reuses an older generator's data)."""
    from lungbench.data.synth import GENERATOR_VERSION

    return root / "data" / f"synth-{kind}-v{GENERATOR_VERSION}-n{n}-{preset}-seed{seed}.h5"
