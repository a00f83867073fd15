"""Layer 8 (predict): the operators of one training step, counted and timed.

A step is the sequence of aten operator calls that lungbench's TrainStep dispatches (forward,
backward, optimizer). The sequence is the same for every batch size and width of a model, so
call i of one workload matches call i of another: the model (lungbench.predict.model)
scales each call by its own FLOPs and bytes.

    table = probe_operators(workload, switches)      # timed, on the workload's device
    calls = count_operators(workload, switches)      # counted only, on the CPU

Timing: each call inside a TorchDispatchMode is timed with perf_counter (CPU operators are
synchronous). What the step spends outside the calls (Python, autograd's engine, the
dispatcher) is `overhead_s`: a plain step's median minus the sum of the calls' medians.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from lungbench.core.device import synchronize
from lungbench.measure.timing import OpCall, operator_counter, set_threads
from lungbench.measure.workload import Workload
from lungbench.step import NO_TIMER, TrainStep, bce_loss
from lungbench.switches import Switches, backend_flags

log = logging.getLogger(__name__)

# A call moving fewer bytes than this is pure fixed cost (dispatch, a thread-pool wake-up):
# the median time of such calls is the per-call latency.
TINY_CALL_BYTES = 4096
DEFAULT_CALL_LATENCY_S = 2e-6


@dataclass(frozen=True)
class OperatorTable:
    """The measured step of one workload: its calls (with seconds), the plain step's median
    and what the step spends outside the calls."""

    calls: tuple[OpCall, ...]
    step_s: float
    overhead_s: float
    call_latency_s: float
    # The same step probed at a second batch size: per call, two (size, time) points split
    # its time into a fixed cost and a part that grows with its bounds (the model's fit).
    reference: tuple[OpCall, ...] | None = None
    # ... and at a second width (twice: `wider`): a convolution's efficiency changes with its
    # channels (the dev box: f8 -> f4 kept 65% of the time where the bounds kept 53%), so
    # width targets take their fit from this line rather than from the batch one.
    width_reference: tuple[OpCall, ...] | None = None
    # ... and at half the batch: a target below the source takes the line on its own side
    # (per-call time is not one line from batch 1 to 16: caches, blocking).
    low_reference: tuple[OpCall, ...] | None = None
    # ... and at batch 1 (when half the batch is more): below half the batch a call's time
    # falls faster than the line through the source and its half says (the dev box, f8 b4
    # -> b1: that line put the convolutions' backward 35% high), so a target there reads
    # the line to the smallest batch instead of extrapolating.
    smallest_reference: tuple[OpCall, ...] | None = None

    def reference_for(self, batch_ratio: float, width_changed: bool):
        """The second probe whose line suits a target of `batch_ratio` times the source's
        batch: the width one when the width changes, else the one on the target's side
        (below half the batch: batch 1's)."""
        if width_changed and self.width_reference is not None:
            return self.width_reference
        if batch_ratio < 0.5 and self.smallest_reference is not None:
            return self.smallest_reference
        if batch_ratio < 1 and self.low_reference is not None:
            return self.low_reference
        return self.reference

    @property
    def calls_s(self) -> float:
        return sum(c.seconds for c in self.calls)


class _PhaseTags:
    """A TrainStep timer that only names the phase the counter's calls belong to."""

    def __init__(self, counter) -> None:
        self.counter = counter

    def phase(self, name: str):
        import contextlib

        @contextlib.contextmanager
        def tagged():
            self.counter.phase = name
            yield

        return tagged()


def _train_step(workload: Workload, switches: Switches, device: torch.device):
    model = workload.build_model(device)
    inputs, target = workload.random_batch(device)
    step = TrainStep(model, bce_loss, switches, device)
    return step, step.prepare_inputs(inputs), target


def record_calls(
    workload: Workload, switches: Switches, device: torch.device, timed: bool, repeats: int = 1
) -> list[list[OpCall]]:
    """The operator calls of `repeats` training steps (after one untimed step, which builds
    the optimizer state: Adam's first step allocates its moments)."""
    record = call_recorder(workload, switches, device, timed)
    return [record() for _ in range(repeats)]


def call_recorder(workload: Workload, switches: Switches, device: torch.device, timed: bool):
    """`workload`'s training step, built and run once untimed (Adam's first step allocates
    its moments): `record()` runs one more step and returns its operator calls."""
    step, inputs, target = _train_step(workload, switches, device)
    with backend_flags(switches):
        step(NO_TIMER, inputs, target)

    def record() -> list[OpCall]:
        counter = operator_counter(record=True, timed=timed, device=device)
        with backend_flags(switches), counter:
            step(_PhaseTags(counter), inputs, target)
        return counter.calls

    return record


def count_operators(workload: Workload, switches: Switches) -> list[OpCall]:
    """FLOPs, bytes, dtype and phase of every call of `workload`'s step, counted on the CPU
    (shapes decide them; the CPU has every operator the count needs)."""
    cpu = replace(workload, device="cpu")
    cpu_switches = replace(switches, tf32=False, cudnn_benchmark=False, cuda_graphs=False)
    if switches.dtype == "fp16":  # CPU autocast runs bf16: the same bytes per element
        cpu_switches = replace(cpu_switches, dtype="bf16")
    if switches.optimizer == "fused":
        cpu_switches = replace(cpu_switches, optimizer="foreach")
    return record_calls(cpu, cpu_switches, torch.device("cpu"), timed=False)[0]


def probe_operators(
    workload: Workload,
    switches: Switches,
    repeats: int = 5,  # per-call medians: at 3 the f12 probe moved f16 predictions by 25%
    warmup: int = 2,
    reference_batch: int | None = -1,
    reference_width: int | None = -1,
) -> OperatorTable:
    """Time `workload`'s step: plain steps (their median is the step) and `repeats` steps
    with every call timed (per call, the median over the repeats); and the calls again at
    `reference_batch` (-1: twice the batch; None: no second probes of the batch), at half
    the batch and at batch 1, and at `reference_width` filters (-1: twice the width, see
    `wider`).

    The workloads are timed in alternation, one step of each per round: the model reads
    ratios between them, and a shared machine drifts within seconds (timed one after the
    other, the dev box's b8 probe ran at another speed than its b4 one and moved the b16
    prediction by 15% from one probe to the next)."""
    device = torch.device(workload.device)
    if device.type == "cpu":
        set_threads(workload.threads)
    probes = {"source": workload, **second_probes(workload, reference_batch, reference_width)}
    plain = step_timer(workload, switches, device)
    plain(warmup)
    plain_times: list[float] = []
    outside: list[float] = []  # per round: the plain step less the source's timed calls
    runs: dict[str, list[list[OpCall]]] = {name: [] for name in probes}
    for group in probe_groups(probes, device):
        recorders = {name: call_recorder(probes[name], switches, device, True) for name in group}
        for _ in range(max(repeats, 3)):
            plain_times += plain(1)
            for name, record in recorders.items():
                runs[name].append(record())
            if "source" in recorders:
                outside.append(plain_times[-1] - sum(c.seconds for c in runs["source"][-1]))
        del recorders  # the group's models and batches, before the next group's
    timed = {name: tuple(per_call_medians(r)) for name, r in runs.items()}
    calls = timed["source"]
    width = timed.get("width")
    step_s = statistics.median(plain_times)
    return OperatorTable(
        calls,
        step_s,
        # What the step spends outside its calls, paired within each round: the difference
        # of the two medians moved with the machine's drift (the dev box: a probe said 4.2 ms
        # where three others said 0.3-1.1 ms, and its b2 -> b8 prediction lost 9%).
        max(statistics.median(outside), 0.0),
        call_latency(calls),
        timed.get("reference"),
        width if width is not None and matching(calls, width) else None,
        timed.get("low"),
        timed.get("smallest"),
    )


def probe_groups(probes: dict[str, Workload], device: torch.device) -> list[list[str]]:
    """The probe workloads timed together: all of them, when their steps fit in memory at
    once (HEADROOM of what the device allows); else one at a time (no alternation: a
    drifting machine then moves the lines, and the log says so)."""
    from lungbench.measure.memory import HEADROOM, memory_limit, step_memory

    limit, _ = memory_limit(device)
    need = sum(step_memory(w).bytes(w.batch_size) for w in probes.values())
    if not limit or need <= HEADROOM * limit:
        return [list(probes)]
    log.warning(
        f"note: the probe's {len(probes)} workloads need about {need / 2**30:.1f} GiB at once; "
        "timing them one after another (a drifting machine moves their lines)"
    )
    return [[name] for name in probes]


def second_probes(
    workload: Workload, reference_batch: int | None, reference_width: int | None
) -> dict[str, Workload]:
    """The probe's second workloads, by name (see probe_operators)."""
    probes = {}
    if reference_batch is not None:
        batch = 2 * workload.batch_size if reference_batch == -1 else reference_batch
        probes["reference"] = replace(workload, batch_size=batch)
        if workload.batch_size > 1:
            probes["low"] = replace(workload, batch_size=workload.batch_size // 2)
        if workload.batch_size // 2 > 1:
            probes["smallest"] = replace(workload, batch_size=1)
    if reference_width is not None:
        filters = wider(workload.filters) if reference_width == -1 else reference_width
        probes["width"] = replace(workload, filters=filters)
    return probes


def wider(filters: int) -> int:
    """The width of the second probe: twice the width. Not 1.5 times: oneDNN pads channels
    to its SIMD block (8 or 16), so on the dev box f12 cost nearly what f16 did in bf16 and a
    line through f8 and f12 overshot f16 by 24%; doubling keeps a width's alignment."""
    return 2 * filters


def per_call_medians(runs: Sequence[Sequence[OpCall]]) -> list[OpCall]:
    """Call i of the first run, with the median seconds of call i over all runs."""
    return [
        replace(first, seconds=statistics.median(run[i].seconds for run in runs))
        for i, first in enumerate(runs[0])
    ]


def plain_step_s(
    workload: Workload, switches: Switches, device: torch.device, warmup: int, repeats: int
) -> float:
    """The median of `repeats` plain steps of `workload`, after `warmup` untimed ones."""
    steps = step_timer(workload, switches, device)
    steps(warmup)
    return statistics.median(steps(repeats))


def step_timer(workload: Workload, switches: Switches, device: torch.device):
    """`workload`'s training step, built once: `time_steps(n)` runs n plain steps and
    returns their seconds (the first calls build the optimizer state: warm up first)."""
    step, inputs, target = _train_step(workload, switches, device)

    def time_steps(n: int) -> list[float]:
        times = []
        with backend_flags(switches):
            for _ in range(n):
                synchronize(device)
                t0 = time.perf_counter()
                step(NO_TIMER, inputs, target)
                synchronize(device)  # note: CPU-GPU sync point, the step ends with its last kernel
                times.append(time.perf_counter() - t0)
        return times

    return time_steps


def call_latency(calls: Sequence[OpCall]) -> float:
    """The fixed cost of one call: the median time of the calls that move almost nothing."""
    tiny = [c.seconds for c in calls if c.bytes < TINY_CALL_BYTES and c.seconds > 0]
    return statistics.median(tiny) if tiny else DEFAULT_CALL_LATENCY_S


def matching(source: Sequence[OpCall], target: Sequence[OpCall]) -> bool:
    """True when two workloads' steps call the same operators in the same order."""
    return len(source) == len(target) and all(
        a.name == b.name for a, b in zip(source, target, strict=True)
    )
