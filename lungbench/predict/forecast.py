"""Layer 8 (predict): predictions from a measured run: step, epoch, what limits them, and an
interval from the validation errors.

    source = source_from_record(record, environment)     # one measured configuration
    predictor = Predictor()
    pred = predictor.predict(source, Target(batch=8, filters=16, threads=1, ranks=2))
    pred.step_s, pred.epoch_s, pred.bound, pred.interval

The step: the source's operator calls (probed on this machine when it measured the run,
else the measured step shared out by the roofline) scaled call by call to the target's
counts and device (lungbench.predict.model), anchored to the record's measured step
(the probe's own step only sets the ratios), plus the exposed all-reduce of N ranks
(lungbench.predict.comm). The epoch: steps per rank x step, plus the source's time per
sample outside the steps (data loading, the loop), which the target keeps.
"""

from __future__ import annotations

import functools
import logging
import math
import socket
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import torch

from lungbench.core.cache import (
    measured_number,
    read_cache,
    register_schema,
    where_key,
    write_cache,
)
from lungbench.core.errors import DataError, UsageError
from lungbench.harness.sweep import THESIS_N_NODULES, TRAIN_FRACTION
from lungbench.measure.allreduce import AlphaBeta
from lungbench.measure.contention import ContentionWatch
from lungbench.measure.memory import HEADROOM, memory_limit, step_memory
from lungbench.measure.timing import OpCall
from lungbench.measure.workload import Workload
from lungbench.predict import calibration
from lungbench.predict.comm import bucket_bytes, comm_estimate, fit_gloo
from lungbench.predict.ddp_probe import BenchLaunch, ddp_overhead_s
from lungbench.predict.devices import (
    DeviceProfile,
    busy_measurements,
    load_profiles,
    look_up_device,
    measure_bandwidth_curve,
    measure_conv_rates,
    measure_cpu_peaks,
    measured_cpu,
)
from lungbench.predict.kernels import KernelRatios
from lungbench.predict.model import StepEstimate, roofline_calls, scale_step
from lungbench.predict.operators import (
    OperatorTable,
    call_latency,
    count_operators,
    probe_operators,
)
from lungbench.predict.rank_share import NOISY_RATIO_CI, RankContention, precision_words
from lungbench.switches import Switches, fast_defaults

log = logging.getLogger(__name__)

# The thesis's epoch: the 80% training split of 754 nodules.
DEFAULT_EPOCH_SAMPLES = round(TRAIN_FRACTION * THESIS_N_NODULES)
SCALINGS = ("weak", "strong")
# How much wider (each end, log) an interval is when its source or probe was measured while
# the machine was busy: the busy re-run moved two predictions by 13% and 35%.
BUSY_WIDEN = math.log(1.25)


@dataclass(frozen=True)
class Target:
    """What to predict. None keeps the source's value; `batch` is per rank in weak scaling
    and the global batch in strong scaling; `dtype` overrides the autocast dtype."""

    batch: int | None = None
    filters: int | None = None
    threads: int | None = None
    ranks: int = 1
    scaling: str = "weak"
    device: str | None = None
    dtype: str | None = None
    epoch_samples: int | None = None  # None: the source's training split


@dataclass(frozen=True)
class SideBySide:
    """Ranks sharing this machine (rank_share): each rank's compute over its time alone, the
    DDP step's communication beyond it over that time (None: use the all-reduce model), and
    what to say of them."""

    compute: float = 1.0
    communication: float | None = None
    notes: tuple[str, ...] = ()
    busy: str | None = None  # why the processes side by side count as measured while busy


@dataclass
class Source:
    """One measured configuration and what the model needs of it."""

    key: str
    workload: Workload
    switches: Switches
    step_s: float  # the measured median step
    device: DeviceProfile
    table: OperatorTable
    probed: bool  # operator times measured here (else shared out by the roofline)
    epoch_samples: int
    outside_s_per_sample: float | None  # epoch time outside the steps, per sample
    host: str = ""
    notes: tuple[str, ...] = ()  # said with every prediction made from it
    busy: str | None = None  # why its record or probe counts as measured while busy
    step_interval: tuple[float, float] | None = None  # the record's 95% CI of its median step


@dataclass
class Prediction:
    """One predicted configuration: seconds, what limits it, and how sure."""

    source: str
    device: str
    batch: int  # per rank
    global_batch: int
    filters: int
    threads: int | None
    ranks: int
    scaling: str
    status: str = "ok"  # ok | oom | measured (the source's own configuration)
    step_s: float | None = None
    epoch_s: float | None = None
    samples_per_s: float | None = None
    bound: str | None = None
    parts_s: dict[str, float] = field(default_factory=dict)
    interval: tuple[float, float] | None = None  # of step_s
    epoch_interval: tuple[float, float] | None = None
    interval_basis: str = ""
    kinds: tuple[str, ...] = ()
    memory_need_bytes: int | None = None
    memory_limit_bytes: int | None = None
    busy: str | None = None  # why what it was made from counts as measured while busy
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---- sources -------------------------------------------------------------------------------


def switches_of_record(record: Mapping[str, Any]) -> Switches:
    """The switches a record's step ran with (its *_used fields), else the device's table."""
    base = fast_defaults(torch.device("cuda" if "cuda" in str(record.get("device")) else "cpu"))
    used = {
        name: record[f"{name}_used"]
        for name in asdict(base)
        if record.get(f"{name}_used") is not None
    }
    return replace(base, **used)


def workload_of_record(record: Mapping[str, Any]) -> Workload:
    names = {f for f in asdict(Workload())}
    fields_ = {k: record[k] for k in names if k in record}
    if record.get("threads_used"):
        fields_["threads"] = int(record["threads_used"])
    return Workload(**fields_)


def check_record(record: Mapping[str, Any], where: str) -> None:
    """DataError saying what to run first when a record lacks what the model needs."""
    if record.get("status") != "ok":
        raise DataError(f"{where}: configuration {record.get('key')} did not run ok")
    for name, why in (
        ("step_s_median", "a measured step time"),
        ("flops_per_step", "FLOPs per step"),
        ("model", "the model it measured"),
    ):
        if record.get(name) is None:
            raise DataError(
                f"{where}: record {record.get('key')} has no {name} ({why}); "
                "run `lungbench bench` (a current version) first"
            )


def record_from_profile(
    profile: Mapping[str, Any], config: Mapping[str, Any], where: str
) -> dict[str, Any]:
    """A `lungbench profile` run as the one bench-like record predict needs. Its step was
    timed under the profiler (shapes and memory recorded: slower than a plain step), so a
    source made from it on this machine re-times the step without the profiler."""
    workload = (config.get("profile") or {}).get("workload") or {}
    if profile.get("world_size", 1) != 1:
        raise DataError(
            f"{where}: a profile of {profile.get('world_size')} ranks; predict "
            "needs a 1-process run (`lungbench profile` without a launcher)"
        )
    return {
        **{k: v for k, v in workload.items() if k != "threads"},
        **{k: v for k, v in profile.items() if k.endswith("_used")},
        "key": f"profile {workload.get('preset', '?')} f{workload.get('filters')} "
        f"b{workload.get('batch_size')}",
        "status": "ok",
        "device": profile.get("device", workload.get("device", "cpu")),
        "flops_per_step": profile.get("flops_per_step"),
        "step_s_median": profile["step_ms"] / 1e3 if profile.get("step_ms") else None,
        "profiled": True,
    }


def epoch_outside(record: Mapping[str, Any]) -> tuple[int, float | None]:
    """(epoch samples, seconds per sample an epoch spends outside the training steps): the
    epoch less its steps at the median step, at most the data wait the epoch measured
    apart. The residual alone also holds every step of the epoch that ran slower than the
    median (a disturbance, a fresh model's first allocations): on the dev box three quiet
    72-sample epochs left 22-55 ms beside a 70-76 ms data wait, yet one validation source
    left 240 ms and put three epoch predictions 15-27% high."""
    samples = int(record.get("epoch_split_samples") or DEFAULT_EPOCH_SAMPLES)
    if not record.get("epoch_s") or not record.get("epoch_samples"):
        return samples, None
    steps = math.ceil(record["epoch_samples"] / record["batch_size"])
    outside = max(record["epoch_s"] - steps * record["step_s_median"], 0.0)
    data_wait = record.get("epoch_data_wait_s")
    if isinstance(data_wait, (int, float)) and data_wait >= 0:
        outside = min(outside, float(data_wait))
    return samples, outside / record["epoch_samples"]


def cpu_here(
    threads: int, latency_s: float = 0.0, comm: AlphaBeta | None = None, fresh: bool = False
) -> DeviceProfile:
    """This machine's CPU at `threads` threads, measured (peaks, bandwidth curve and
    convolution rate cached per host; `fresh` measures them again, keeping the best)."""
    base = load_profiles()["cpu"]
    limit, _ = memory_limit(torch.device("cpu"))
    profile = measured_cpu(
        base,
        threads,
        measure_cpu_peaks(threads, refresh=fresh),
        limit,
        comm,
        latency_s,
        measure_bandwidth_curve(threads, refresh=fresh),
        measure_conv_rates(threads, refresh=fresh),
    )
    busy = {what: f"{BUSY_MARK} ({why})" for what, why in busy_measurements(threads).items()}
    return replace(profile, sources={**profile.sources, **busy}) if busy else profile


# How a device profile's `sources` say a number was measured on a busy machine.
BUSY_MARK = "measured while busy, cached until a quiet measurement replaces it"


def busy_notes(*devices: DeviceProfile) -> list[str]:
    """One note per busy measurement the devices' numbers come from (each said once)."""
    notes = []
    for device in devices:
        for what, how in device.sources.items():
            note = f"{device.name} {what}: {how}"
            if how.startswith(BUSY_MARK) and note not in notes:
                notes.append(note)
    return notes


def source_from_record(
    record: Mapping[str, Any],
    environment: Mapping[str, Any],
    where: str = "run",
    fresh: bool = False,
) -> Source:
    """The model's view of one bench record (_source_of_record), with what its record says
    of how it was measured: busy, and its median's confidence interval."""
    check_record(record, where)
    source = _source_of_record(record, environment, where, fresh)
    reasons = [source.busy] if source.busy else []
    if record.get("busy"):
        reasons.insert(
            0, f"its record was measured while busy ({record.get('busy_reason') or 'marked busy'})"
        )
    return replace(source, busy="; ".join(reasons) or None, step_interval=step_interval_of(record))


def step_interval_of(record: Mapping[str, Any]) -> tuple[float, float] | None:
    """The record's 95% confidence interval of its median step (None: not measured, or
    NaN: fewer than 6 repeats)."""
    low, high = record.get("step_s_ci_low"), record.get("step_s_ci_high")
    if not isinstance(low, (int, float)) or not isinstance(high, (int, float)):
        return None
    if math.isnan(low) or math.isnan(high) or low <= 0:
        return None
    return float(low), float(high)


def _source_of_record(
    record: Mapping[str, Any], environment: Mapping[str, Any], where: str, fresh: bool
) -> Source:
    """Probed on this machine when this machine measured it (same host, a CPU record), else
    the measured step shared by the roofline."""
    workload = workload_of_record(record)
    switches = switches_of_record(record)
    samples, outside = epoch_outside(record)
    host = str(environment.get("host", ""))
    here = host == socket.gethostname() and workload.device == "cpu"
    if here:
        # A profiled step carries the profiler's overhead: the probe's plain step replaces it.
        step = None if record.get("profiled") else float(record["step_s_median"])
        source = source_here(record["key"], workload, switches, step, samples, outside, fresh)
        if record.get("profiled"):
            source.notes = (
                f"source: a profile run; its step re-timed here without the profiler "
                f"({source.step_s * 1e3:.1f} ms; {record['step_s_median'] * 1e3:.1f} ms profiled)",
            )
        return source
    device = _recorded_device(record, environment, where)
    calls = count_operators(workload, switches)
    shared = roofline_calls(calls, float(record["step_s_median"]), device)
    table = OperatorTable(tuple(shared), float(record["step_s_median"]), 0.0, call_latency(shared))
    return Source(
        record["key"],
        workload,
        switches,
        float(record["step_s_median"]),
        device,
        table,
        False,
        samples,
        outside,
        host,
        (
            "source: a profile run measured elsewhere, its step timed under the profiler "
            "(slower than a plain step)",
        )
        if record.get("profiled")
        else (),
    )


def source_here(
    key: str,
    workload: Workload,
    switches: Switches,
    step_s: float | None,
    epoch_samples: int = DEFAULT_EPOCH_SAMPLES,
    outside_s_per_sample: float | None = None,
    fresh: bool = False,
) -> Source:
    """A source measured on this machine's CPU: its operators probed here (once per host,
    workload and switches, then from the cache, so the same question gets the same answer;
    `fresh` probes again). `step_s` None: the probe's own plain step."""
    table, busy = cached_probe(workload, switches, fresh)
    off = step_s is not None and not agrees(table.step_s, step_s)
    if off and not fresh and not probed_again_for(workload, switches, step_s):
        log.info(
            f"the cached operator probe's step ({table.step_s * 1e3:.1f} ms) is "
            f"{100 * abs(table.step_s / step_s - 1):.0f}% off the run's ({step_s * 1e3:.1f} "
            "ms): probing again"
        )
        table, busy = cached_probe(workload, switches, fresh=True)
        probed_again_for(workload, switches, step_s, mark=True)
    reasons = [f"its operator probe ran while busy ({busy})"] if busy else []
    if step_s is not None and not agrees(table.step_s, step_s):
        reasons.append(
            f"its operator probe's step ({table.step_s * 1e3:.1f} ms) is "
            f"{100 * abs(table.step_s / step_s - 1):.0f}% off the run's ({step_s * 1e3:.1f} "
            "ms): one of them ran on a disturbed machine"
        )
    threads = workload.threads or torch.get_num_threads()
    device = cpu_here(threads, table.call_latency_s, fresh=fresh)
    return Source(
        key,
        workload,
        switches,
        table.step_s if step_s is None else step_s,
        device,
        table,
        True,
        epoch_samples,
        outside_s_per_sample,
        socket.gethostname(),
        busy="; ".join(reasons) or None,
    )


PROBE_CACHE = "operator_probe.json"
# How far the probe's plain step may be from the run's before the probe is taken again: the
# probe sets the ratios between calls, so one measured on a disturbed machine skews them
# (a 25% slower probe put 4 ms outside the calls and a b2 -> b8 prediction 13% low).
PROBE_AGREEMENT = 0.15


def agrees(probe_s: float, step_s: float) -> bool:
    """True when the probe's plain step is within PROBE_AGREEMENT of the run's step."""
    return abs(probe_s / step_s - 1) <= PROBE_AGREEMENT


def probed_again_for(
    workload: Workload, switches: Switches, step_s: float, mark: bool = False
) -> bool:
    """Whether the cached probe was already taken again for a run of `step_s` (`mark`: say
    it was): a run measured in a slow minute disagrees with every probe, and probing again
    on each predict would make none of them fast."""
    key, step = _probe_key(workload, switches), f"{step_s:.9f}"
    cache = read_cache(PROBE_CACHE)
    entry = cache.get(key)
    if entry is None:
        return False
    if mark:
        entry["probed_again_for"] = [*entry.get("probed_again_for", []), step][-20:]
        write_cache(PROBE_CACHE, cache)
    return step in entry.get("probed_again_for", [])


def _probe_entry(entry: Any) -> bool:
    """An operator table as table_from_json reads it: its times measured numbers, each
    call's name and dtype text and its FLOPs, bytes and seconds measured numbers (0 too)."""
    times = (entry["step_s"], entry["overhead_s"], entry["call_latency_s"])
    if not measured_number(times[0]) or not all(measured_number(t, zero=True) for t in times):
        return False
    if entry.get("busy_reason") is not None and not isinstance(entry["busy_reason"], str):
        return False
    lists = [entry["calls"]] + [entry.get(k) for k in REFERENCE_LISTS if entry.get(k)]
    return all(isinstance(calls, list) and all(_call_entry(c) for c in calls) for calls in lists)


REFERENCE_LISTS = ("reference", "width_reference", "low_reference", "smallest_reference")


def _call_entry(call: Any) -> bool:
    if not set(call) <= {f.name for f in fields(OpCall)}:
        return False
    numbers = (call["flops"], call["bytes"], call.get("seconds", 0.0))
    text = (call["name"], call["dtype"], call.get("phase", ""), call.get("signature", ""))
    return all(measured_number(n, zero=True) for n in numbers) and all(
        isinstance(t, str) for t in text
    )


register_schema(PROBE_CACHE, _probe_entry)
# bump when probe_operators measures something else (6: conv signatures; 7: the overhead
# outside the calls paired within each round)
PROBE_VERSION = 8


def _probe_key(workload: Workload, switches: Switches) -> str:
    where = where_key(torch.device("cpu")).rsplit("|", 2)  # host | cpu model | torch
    w = replace(workload, seed=0)
    workload_items, switch_items = sorted(asdict(w).items()), sorted(asdict(switches).items())
    return f"v{PROBE_VERSION}|{where[0]}|{where[-1]}|{workload_items}|{switch_items}"


def cached_probe(
    workload: Workload, switches: Switches, fresh: bool = False
) -> tuple[OperatorTable, str | None]:
    """The operator probe of `workload` on this CPU, through the per-host cache, and why it
    counts as measured while busy (None: it does not)."""
    key = _probe_key(workload, switches)
    cache = read_cache(PROBE_CACHE)
    if key in cache and not fresh:
        return table_from_json(cache[key]), cache[key].get("busy_reason")
    log.info(
        f"probing the operators of {describe_workload(workload)} on this machine "
        "(about 10-60 s, once per host and workload)"
    )
    with ContentionWatch() as watch:  # a busy probe widens every interval made from it
        table = probe_operators(workload, switches)
    busy = watch.result.get("busy_reason") if watch.result.get("busy") else None
    cache = read_cache(PROBE_CACHE)
    cache[key] = {**asdict(table), "busy_reason": busy}
    write_cache(PROBE_CACHE, cache)
    return table, busy


def table_from_json(data: Mapping[str, Any]) -> OperatorTable:
    def calls(items):
        return None if items is None else tuple(OpCall(**c) for c in items)

    return OperatorTable(
        calls(data["calls"]),
        data["step_s"],
        data["overhead_s"],
        data["call_latency_s"],
        calls(data.get("reference")),
        calls(data.get("width_reference")),
        calls(data.get("low_reference")),
        calls(data.get("smallest_reference")),
    )


def describe_workload(w: Workload) -> str:
    return f"{w.preset} f{w.filters} b{w.batch_size} t{w.threads}"


def _recorded_device(
    record: Mapping[str, Any], environment: Mapping[str, Any], where: str
) -> DeviceProfile:
    """The source device from the peaks its run measured (environment.json)."""
    peaks = (environment.get("peak_flops") or {}).get(record.get("device"))
    if not peaks or not peaks.get("fp32") or not peaks.get("copy_bytes_per_s"):
        raise DataError(
            f"{where}: environment.json has no measured peaks for {record.get('device')}; "
            "rerun `lungbench bench` there (it measures them) to predict from this run"
        )
    base = load_profiles()["cpu"]
    kind = "cuda" if "cuda" in str(record.get("device")) else "cpu"
    return replace(
        measured_cpu(base, int(record.get("threads_used") or 1), peaks, 0.0),
        kind=kind,
        name=f"{record.get('device')}@{environment.get('host', 'elsewhere')}",
        title=f"{record.get('device')} of {environment.get('host', 'the run')} (measured)",
    )


# ---- predictions -------------------------------------------------------------------------


def per_rank_batch(target: Target, batch: int) -> int:
    if target.scaling == "weak" or target.ranks == 1:
        return batch
    if batch % target.ranks:
        raise UsageError(
            f"--scaling strong: global batch {batch} does not split over {target.ranks} ranks"
        )
    return batch // target.ranks


def on_this_cpu(source: Source, device: DeviceProfile) -> bool:
    """Whether source and target both run on this machine's CPU: then its convolutions can
    be made alone and timed (kernels) rather than scaled by their bounds."""
    return source.probed and device.measured and device.kind == "cpu"


def channel_block() -> int:
    """The channel block of oneDNN's CPU convolutions: the SIMD width in FP32 lanes (16 with
    AVX-512, else 8)."""
    return 16 if "AVX512" in torch.backends.cpu.get_cpu_capability() else 8


def channel_notes(workload: Workload) -> list[str]:
    """A warning when the workload's convolutions have channel counts off the block and the
    model could only scale them by their bounds (a CPU profile of another machine): their
    kernels may be slower than any scaling says (the dev box: f12's 12 -> 24 convolution's
    backward took longer than f16's 16 -> 32, and scaled by their bounds widths 6, 12 and
    24 ran 13-21% slower than predicted in every validation)."""
    model = workload.build_model(torch.device("cpu"))
    block = channel_block()
    convolutions = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)
    channels = sorted(
        {
            c
            for m in model.modules()
            if isinstance(m, convolutions)
            for c in (m.in_channels, m.out_channels)
            if c > 1 and c % block
        }
    )
    if not channels:
        return []
    return [
        f"convolution channels {', '.join(map(str, channels))} are not multiples of "
        f"{block}: oneDNN may run slower kernels for them than the model scales (on the "
        "dev box such widths ran up to ~20% slower than predicted)"
    ]


def changed_kinds(source: Source, target: Target, workload: Workload, device: DeviceProfile):
    kinds = []
    if workload.batch_size != source.workload.batch_size:
        kinds.append("batch")
    if workload.filters != source.workload.filters:
        kinds.append("filters")
    if device.kind == "cpu" and workload.threads != source.workload.threads:
        kinds.append("threads")
    if target.ranks > 1:
        kinds.append("ranks")
    if device.name != source.device.name:
        kinds.append("device")
    return tuple(kinds)


class Predictor:
    """Predictions from sources, with the device profiles, the Gloo fit, the rank contention
    and the operator counts measured once and reused."""

    def __init__(
        self,
        device_files: tuple[str, ...] = (),
        remeasure: bool = False,
        launch: BenchLaunch | None = None,
    ) -> None:
        self.profiles = load_profiles(device_files)
        self.launch = launch  # starts `lungbench bench` for the DDP overhead probe
        self.remeasure = remeasure  # the Gloo fit, the DDP overhead, the bandwidth curve
        self._cpu: dict[int, DeviceProfile] = {}
        self._gloo: AlphaBeta | None = None
        self._ddp_overhead: tuple[float | None] | None = None
        self.kernels = KernelRatios(fresh=remeasure)
        self.rank_contention = RankContention(fresh=remeasure)
        self.calibration = calibration.for_this_host()
        self.calibration_source = self.calibration.source
        self.bounds = calibration.error_bounds(self.calibration.cases)

    def device(self, name: str | None, source: Source, threads: int) -> DeviceProfile:
        """The target device: the source's (re-measured at `threads` when it is this
        machine's CPU), a shipped or user profile, or `cpu`: this machine, measured."""
        if name is None:
            return self.cpu(threads, source) if source.probed else source.device
        profile = look_up_device(name, self.profiles)
        return self.cpu(threads, source) if profile.measured else profile

    def cpu(self, threads: int, source: Source) -> DeviceProfile:
        # The source's own peaks at its thread count: the same numbers on both sides of
        # every ratio, so an unchanged target predicts the measured step.
        if source.probed and source.device.threads == threads:
            return source.device
        if threads not in self._cpu:
            self._cpu[threads] = cpu_here(
                threads, source.table.call_latency_s, fresh=self.remeasure
            )
        return self._cpu[threads]

    def side_by_side(
        self,
        source: Source,
        device: DeviceProfile,
        workload: Workload,
        switches: Switches,
        ranks: int,
    ) -> SideBySide:
        """How `ranks` processes of `workload` share this machine (rank_share): each rank's
        compute against its time alone, and what their DDP step adds beyond it, both
        measured with that many processes at the target's threads. Only for this machine's
        CPU: a run measured elsewhere says nothing of its machine at other threads, and GPU
        ranks each have their own device."""
        if ranks <= 1 or not on_this_cpu(source, device):
            return SideBySide()
        entry = self.rank_contention.entry(workload, switches, ranks)  # checked: its schema
        if entry is None:
            return SideBySide(notes=(
                f"rank contention: {ranks} processes side by side could not be timed (a "
                "measurement problem); no contention assumed",
            ))  # fmt: skip
        factor, share = entry["factor"], entry["communication"]
        notes = [
            f"ranks side by side: each rank's step {factor:.2f}x its time alone, measured with "
            f"{ranks} processes of {workload.threads} thread(s) each on this machine"
            + precision_words(entry)
        ]
        if (entry.get("ratio_ci") or 0.0) > NOISY_RATIO_CI:
            notes.append(
                f"warning: the {ranks} processes' DDP step over one alone is known only to "
                f"+-{100 * entry['ratio_ci']:.0f}% after {entry['rounds']} rounds (a noisy "
                "machine); `lungbench predict --remeasure` on a quieter machine measures it again"
            )
        if share <= 0:
            notes.append(
                f"communication: the {ranks} processes' DDP step came out no slower than their "
                f"compute ({1e3 * (entry['ddp_s'] - entry['together_s']):+.2f} ms), a "
                "measurement problem (a noisy or busy machine); the all-reduce model is used "
                "instead: `lungbench predict --remeasure` on a quiet machine measures it again"
            )
            share = None
        busy = entry.get("busy_reason")
        if busy:
            busy = f"its {ranks} processes side by side ran while busy ({busy})"
        return SideBySide(factor, share, tuple(notes), busy)

    def gloo(self) -> AlphaBeta:
        if self._gloo is None:
            self._gloo = fit_gloo(refit=self.remeasure)
        return self._gloo

    def ddp_overhead(self) -> float | None:
        """What a CPU DDP step loses beyond the all-reduce (None: not measured)."""
        if self._ddp_overhead is None:
            self._ddp_overhead = (ddp_overhead_s(self.launch, refit=self.remeasure),)
        return self._ddp_overhead[0]

    def predict(self, source: Source, target: Target) -> Prediction:
        base = source.workload
        batch = target.batch or base.batch_size
        rank_batch = per_rank_batch(target, batch)
        cores = source.workload.threads or torch.get_num_threads()
        threads = target.threads or (max(1, cores // target.ranks) if target.ranks > 1 else cores)
        device = self.device(target.device, source, threads)
        workload = replace(
            base,
            batch_size=rank_batch,
            filters=target.filters or base.filters,
            threads=threads if device.kind == "cpu" else None,
        )
        pred = Prediction(
            source=source.key,
            device=device.name,
            batch=rank_batch,
            global_batch=rank_batch * target.ranks,
            filters=workload.filters,
            threads=workload.threads,
            ranks=target.ranks,
            scaling=target.scaling,
            kinds=changed_kinds(source, target, workload, device),
        )
        if not fits(pred, workload, device):
            return pred
        switches = replace(source.switches, dtype=target.dtype or source.switches.dtype)
        alone = self._step(source, workload, switches, device)
        ranks = self.side_by_side(source, device, workload, switches, target.ranks)
        pred.notes.extend(ranks.notes)
        measured_comm = None
        if ranks.communication is not None:
            measured_comm = alone.step_s * ranks.communication
            pred.notes.append(measured_communication_note(measured_comm, target.ranks))
        estimate = scaled(alone, ranks.compute)
        if ranks.busy:  # a busy measurement of the ranks: the same warning and wider interval
            source = replace(source, busy="; ".join(filter(None, (source.busy, ranks.busy))))
        self._finish(pred, source, estimate, workload, device, target, measured_comm)
        if "filters" in pred.kinds and device.kind == "cpu" and not on_this_cpu(source, device):
            pred.notes.extend(channel_notes(workload))
        if not pred.kinds and target.dtype is None:
            as_measured(pred, source)
        return pred

    def _step(
        self, source: Source, workload: Workload, switches: Switches, device: DeviceProfile
    ) -> StepEstimate:
        """The target's step, one process alone on `device`."""
        calls = _counted(workload, switches)
        table = source.table
        here = on_this_cpu(source, device)
        kernel_ratio = self._kernel_ratio(source, workload) if here else None

        estimate = scale_step(
            table.calls,
            source.device,
            calls,
            device,
            table.overhead_s,
            table.call_latency_s,
            table.reference_for(
                workload.batch_size / source.workload.batch_size,
                workload.filters != source.workload.filters,
            ),
            kernel_ratio,
        )
        if device.kind != source.device.kind:
            return estimate
        # The probe's own step sets the ratios; the record's measured step sets the scale.
        return scaled(estimate, source.step_s / (table.calls_s + table.overhead_s))

    def _kernel_ratio(self, source: Source, workload: Workload):
        """Per (source call, target call): the convolutions' measured time ratio on this
        machine (kernels), one process alone."""
        threads = (source.workload.threads or 1, workload.threads or 1)

        def kernel_ratio(was: OpCall, will: OpCall) -> float | None:
            return self.kernels.ratio(was, threads[0], will, threads[1])

        return kernel_ratio

    def _communication(
        self, pred: Prediction, workload: Workload, device: DeviceProfile, source: Source,
        target: Target, backward_s: float,
    ) -> float:  # fmt: skip
        """Seconds of exposed communication a step of `target.ranks` ranks adds."""
        cpu = device.kind == "cpu"
        link = self.gloo() if cpu else AlphaBeta(device.link_latency_s, device.ring_bandwidth)
        if cpu and target.ranks > 2:
            pred.notes.append("all-reduce fitted on 2 ranks, extrapolated by the ring formula")
        model = workload.build_model(torch.device("cpu"))
        comm = comm_estimate(
            bucket_bytes(model, source.switches.ddp_bucket_mb),
            target.ranks,
            link,
            backward_s,
            overlap=0.0 if cpu else 1.0,
        )
        if not cpu:
            return comm.exposed_s
        # The Gloo threads wait for cores the ranks hold (ddp_probe).
        overhead = self.ddp_overhead()
        pred.notes.append(ddp_overhead_note(overhead))
        return comm.exposed_s + (overhead if overhead and overhead > 0 else 0.0)

    def _finish(
        self,
        pred: Prediction,
        source: Source,
        estimate: StepEstimate,
        workload: Workload,
        device: DeviceProfile,
        target: Target,
        measured_comm: float | None = None,
    ) -> None:
        """The prediction's step, epoch, parts and intervals; `measured_comm`: the exposed
        communication measured side by side (None: the all-reduce model's)."""
        parts = dict(estimate.parts)
        step = estimate.step_s
        if target.ranks > 1:
            backward = estimate.phases.get("backward", 0.0)
            exposed = measured_comm
            if exposed is None:
                exposed = self._communication(pred, workload, device, source, target, backward)
            parts["communication"] = exposed
            step += exposed
        epoch_samples = target.epoch_samples or source.epoch_samples
        per_rank_samples = math.ceil(epoch_samples / target.ranks)
        steps = math.ceil(per_rank_samples / workload.batch_size)
        pred.step_s = step
        pred.samples_per_s = pred.global_batch / step
        if source.outside_s_per_sample is None:
            pred.epoch_s = steps * step
            pred.notes.append("epoch: steps only (the run measured no epoch)")
        else:
            outside = source.outside_s_per_sample * per_rank_samples
            pred.epoch_s = steps * step + outside
            parts["data"] = outside / steps
            if device.kind != source.device.kind:
                pred.notes.append("epoch: data path assumed as fast as on the source machine")
        pred.parts_s = parts
        pred.bound = max(parts, key=parts.get)
        self._intervals(pred, source)
        if not source.probed:
            pred.notes.append("operator times shared by the roofline (run measured elsewhere)")
        pred.notes.extend(source.notes)
        pred.notes.extend(busy_notes(source.device, device))

    def _intervals(self, pred: Prediction, source: Source) -> None:
        """The step's and the epoch's intervals: this host's validation errors of the
        prediction's kinds, widened where they come from another host or a busy source."""
        widen = self.calibration.widen + (BUSY_WIDEN if source.busy else 0.0)
        ends = calibration.widened(calibration.log_bounds(pred.kinds, self.bounds), widen)
        pred.interval = calibration.interval(pred.step_s, ends)
        # An epoch adds its data path's spread (the epoch validations') where there is one.
        epoch_kinds = (*pred.kinds, "epoch") if "epoch" in self.bounds else pred.kinds
        epoch_ends = calibration.widened(calibration.log_bounds(epoch_kinds, self.bounds), widen)
        pred.epoch_interval = calibration.interval(pred.epoch_s, epoch_ends)
        missing = [k for k in pred.kinds if k not in self.bounds]
        pred.interval_basis = (
            f"90% range of measured/predicted of {', '.join(pred.kinds) or 'no change'} "
            f"({self.calibration_source})"
            if not missing
            else f"none: {', '.join(missing)} predictions not validated"
        )
        if source.busy:
            pred.busy = source.busy
            pred.interval_basis += f"; widened by {100 * math.expm1(BUSY_WIDEN):.0f}%: busy source"
            pred.notes.append(
                f"warning: the source was measured on a busy machine ({source.busy}); this "
                f"prediction inherits that, its interval is {100 * math.expm1(BUSY_WIDEN):.0f}% "
                "wider: measure the source again on a quiet machine"
            )
        if not self.calibration.own_host:
            pred.notes.append(f"interval: {self.calibration_source}")


def scaled(estimate: StepEstimate, factor: float) -> StepEstimate:
    """`estimate` with every part and phase times `factor`."""
    if factor == 1.0:
        return estimate
    return StepEstimate(
        estimate.step_s * factor,
        {k: v * factor for k, v in estimate.parts.items()},
        {k: v * factor for k, v in estimate.phases.items()},
    )


def measured_communication_note(seconds: float, ranks: int) -> str:
    """In words, the communication a DDP step measured side by side adds."""
    return (
        f"communication: {seconds * 1e3:.1f} ms per step, what the DDP step of {ranks} "
        "processes side by side took beyond their compute (all-reduce, DDP's hooks, Gloo "
        "waiting for cores), measured on this workload"
    )


def ddp_overhead_note(overhead: float | None) -> str:
    """In words, what the DDP step's loss beyond the all-reduce contributes: a figure of 0
    or less is a measurement problem, never "0.0 ms"."""
    if overhead is None:
        return (
            "communication: all-reduce model only; what a DDP step loses beyond it was not "
            "measured (no launcher, or its torchrun probe failed)"
        )
    if overhead <= 0:
        return (
            "communication: all-reduce model only; the DDP probe's step came out no slower "
            f"than its compute plus the all-reduce ({overhead * 1e3:+.2f} ms), a measurement "
            "problem (a noisy or busy probe), so nothing is added: `lungbench predict "
            "--remeasure` on a quiet machine measures it again"
        )
    return (
        f"communication: all-reduce model + {overhead * 1e3:.1f} ms per step a DDP step "
        "loses on this CPU beyond it (measured with a tiny model, 2 processes)"
    )


def as_measured(pred: Prediction, source: Source) -> None:
    """A target the run measured: its measured step and the record's own interval of it."""
    pred.status = "measured"
    pred.step_s = source.step_s
    pred.samples_per_s = pred.global_batch / source.step_s
    pred.interval = source.step_interval
    pred.interval_basis = (
        "measured: the record's 95% confidence interval of its median step"
        if source.step_interval
        else "measured: the record has no confidence interval of its step (under 6 repeats)"
    )
    pred.notes.insert(0, f"measured, not predicted: the run measured {source.key}")


def model_bytes(workload: Workload) -> int:
    """Bytes of the model's weights, gradients and Adam's two moments (FP32), counted on
    the meta device: nothing is allocated, so a width no memory holds is refused, not built."""
    with torch.device("meta"):
        model = workload.build_model(torch.device("meta"))
    return 16 * sum(p.numel() for p in model.parameters())


def fits(pred: Prediction, workload: Workload, device: DeviceProfile) -> bool:
    """Whether the target's step fits `device`'s memory (else `pred` says so: status oom)."""
    # A device of unknown memory (a run measured elsewhere) is held to this machine's:
    # the model counts the target's operators by running its step here.
    limit, holder = device.memory_size, device.name
    if not limit:
        limit, holder = memory_limit(torch.device("cpu"))[0], "this machine (where it is counted)"
    need = model_bytes(workload)
    if need <= HEADROOM * limit:  # a model that fits may be built: its step's estimate
        need = step_memory(replace(workload, device="cpu")).bytes(workload.batch_size)
    pred.memory_need_bytes, pred.memory_limit_bytes = int(need), int(limit)
    if need > HEADROOM * limit:
        pred.status, pred.bound = "oom", "memory size"
        pred.notes.append(
            f"does not fit: f{workload.filters} b{workload.batch_size} needs about "
            f"{need / 2**30:,.1f} GiB (FP32 estimate), {holder} has {limit / 2**30:,.1f} GiB"
        )
        return False
    return True


@functools.lru_cache(maxsize=64)
def _counted(workload: Workload, switches: Switches):
    return tuple(count_operators(workload, switches))
