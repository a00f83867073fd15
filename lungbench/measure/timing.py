"""Layer 6 (measure): The measurement protocol: warm-up off the clock, then timed repeats of a step whose
phases (forward, backward, optimizer) are timed separately and as a whole.

CPU: `time.perf_counter` around each phase. CUDA: a pair of CUDA events per phase, and one
synchronize at the end of each step (kernels are asynchronous: a host clock around a launch
measures the launch, not the work). Note: `torch.cuda.synchronize` is a CPU-GPU sync point,
so it is called once per timed step, never inside a phase.

    timer = PhaseTimer(torch.device("cpu"))
    step = TrainStep(model, loss_fn, Switches(), device)        # lungbench.step
    samples = run_protocol(lambda t: step(t, inputs, y), timer, warmup=3, repeats=10)
    samples["forward"], samples["step"]   # lists of seconds
"""

from __future__ import annotations

import contextlib
import functools
import json
import resource
import time
from collections.abc import Callable, Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import psutil
import torch
from torch import nn

from lungbench.measure.stats import median_ci_relative

PHASES = ("forward", "backward", "optimizer")


STEP = "step"


class PhaseTimer:
    """Times named phases of one step on `device`; `finish()` returns seconds per phase.

    On a CPU the phases are read from `clock` (perf_counter; a test plants its own)."""

    def __init__(
        self, device: torch.device, clock: Callable[[], float] = time.perf_counter
    ) -> None:
        self.device = device
        self.clock = clock
        self.cuda = device.type == "cuda"
        self._cpu: dict[str, float] = {}
        self._events: dict[str, tuple] = {}
        self._step_start: float | object = 0.0

    def start(self) -> None:
        self._cpu.clear()
        self._events.clear()
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self._step_start = event
        else:
            self._step_start = self.clock()

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if self.cuda:
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            yield
            end.record()
            self._events[name] = (begin, end)
        else:
            t0 = self.clock()
            yield
            self._cpu[name] = self.clock() - t0

    def finish(self) -> dict[str, float]:
        """Seconds per phase plus the whole step (STEP)."""
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            torch.cuda.synchronize(self.device)  # one sync per step: read all events after it
            times = {k: b.elapsed_time(e) / 1e3 for k, (b, e) in self._events.items()}
            times[STEP] = self._step_start.elapsed_time(end) / 1e3  # type: ignore[union-attr]
            return times
        times = dict(self._cpu)
        times[STEP] = self.clock() - self._step_start  # type: ignore[operator]
        return times


# Where progress inside a configuration goes (warm-up, repeats, epoch): set by the caller
# that shows it (lungbench bench's progress bar), so a slow machine is visibly working.
_REPORT: ContextVar[Callable[[str], None] | None] = ContextVar("lungbench_report", default=None)


@contextlib.contextmanager
def reporting(show: Callable[[str], None], every_s: float = 0.5) -> Iterator[None]:
    """Send progress inside each configuration to `show` (at most every `every_s` s)."""
    last = [0.0]

    def throttled(text: str) -> None:
        now = time.perf_counter()
        if now - last[0] >= every_s:
            last[0] = now
            show(text)

    token = _REPORT.set(throttled)
    try:
        yield
    finally:
        _REPORT.reset(token)


def report(text: str) -> None:
    """Progress inside a configuration ("repeat 3/10"); nothing unless someone shows it."""
    show = _REPORT.get()
    if show is not None:
        show(text)


def run_protocol(
    step: Callable[[PhaseTimer], None],
    timer: PhaseTimer,
    warmup: int,
    repeats: int,
) -> dict[str, list[float]]:
    """Call `step(timer)` `warmup` times off the clock, then `repeats` times timed.

    Returns {phase: [seconds per repeat]} including STEP for the whole step.
    """
    return run_until(step, timer, warmup, repeats)[0]


@dataclass(frozen=True)
class StopRule:
    """When adaptive repeats end: the median's CI within +-`ci_target`, or `max_repeats`
    timed, or `budget_s` seconds of timed repeats, whichever comes first."""

    ci_target: float
    max_repeats: int = 100
    budget_s: float = 30.0


# Why the timed repeats ended (the record's repeats_stop).
STOPS = {
    "fixed": "the number of repeats asked for",
    "ci": "the median's 95% confidence interval reached the target",
    "max": "the repeat limit (the interval did not reach the target)",
    "budget": "the time budget (the interval did not reach the target)",
}


def run_until(
    step: Callable[[PhaseTimer], None],
    timer: PhaseTimer,
    warmup: int,
    repeats: int,
    until: StopRule | None = None,
) -> tuple[dict[str, list[float]], str]:
    """`warmup` calls off the clock, then timed calls: exactly `repeats` without `until`,
    else at least `repeats` and on until `until` says stop. Returns ({phase: seconds per
    repeat}, why it stopped: a key of STOPS)."""
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    for i in range(warmup):
        report(f"warm-up {i + 1}/{warmup}")
        timer.start()
        step(timer)
        timer.finish()
    samples: dict[str, list[float]] = {}
    started = time.perf_counter()
    done = 0
    while True:
        done += 1
        report(f"repeat {done}/{repeats}" if until is None else f"repeat {done}")
        timer.start()
        step(timer)
        for name, seconds in timer.finish().items():
            samples.setdefault(name, []).append(seconds)
        stop = stop_reason(samples[STEP], repeats, until, time.perf_counter() - started)
        if stop is not None:
            return samples, stop


def stop_reason(
    samples: list[float], repeats: int, until: StopRule | None, spent: float
) -> str | None:
    """Why timed repeats end now (a key of STOPS), or None to go on: `samples` so far (the
    step's seconds, or any positive figure whose median is sought), at least `repeats` of
    them, `spent` seconds of them. lungbench.predict.rank_share stops its rounds by it too."""
    if len(samples) < repeats:
        return None
    if until is None:
        return "fixed"
    if median_ci_relative(samples) <= until.ci_target:  # nan (too few) compares False
        return "ci"
    if len(samples) >= until.max_repeats:
        return "max"
    return "budget" if spent >= until.budget_s else None


def set_threads(threads: int | None) -> int:
    """Set torch's intra-op threads (None keeps the current value); return what is in force.

    Recorded with every CPU measurement: `torch.utils.benchmark.Timer` would silently use one.
    """
    if threads is not None:
        torch.set_num_threads(int(threads))
    return torch.get_num_threads()


def training_step_flops(
    model: nn.Module,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    inputs: Sequence[torch.Tensor],
    target: torch.Tensor,
) -> int:
    """FLOPs of one forward + backward pass, counted by torch's FlopCounterMode.

    Counts matmul/convolution FLOPs (2 per multiply-add); element-wise work is not counted,
    so achieved FLOP/s is a lower bound on what the device did.
    """
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        loss = loss_fn(model(*inputs), target)
        loss.backward()
    model.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


def training_step_bytes(
    model: nn.Module,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    inputs: Sequence[torch.Tensor],
    target: torch.Tensor,
) -> int:
    """Bytes the operators of one forward + backward read and write (see
    training_step_cost)."""
    return training_step_cost(model, loss_fn, inputs, target)[1]


def training_step_cost(
    model: nn.Module,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    inputs: Sequence[torch.Tensor],
    target: torch.Tensor,
) -> tuple[int, int]:
    """(FLOPs, bytes moved) of one forward + backward, counted in the same pass.

    FLOPs as training_step_flops. Bytes: the tensors each aten operator takes and returns,
    as if nothing stayed in a cache (views move nothing and are skipped): the memory side
    of the roofline, an upper estimate of the traffic.
    """
    from torch.utils.flop_counter import FlopCounterMode

    flops, moved = FlopCounterMode(display=False), operator_counter()
    with flops, moved:
        loss = loss_fn(model(*inputs), target)
        loss.backward()
    model.zero_grad(set_to_none=True)
    return int(flops.get_total_flops()), int(moved.total_bytes)


@dataclass
class OpCall:
    """One aten operator call of a step: FLOPs (torch's flop registry: matmul and
    convolution, 2 per multiply-add), bytes its tensors take and return, the dtype its
    math ran in, the step phase it ran in, its measured seconds (0 when not timed) and, for
    a call of SIGNED_OPERATORS, its `signature`: its arguments as JSON, tensors as shape,
    dtype and layout, so that the same call can be made again alone (lungbench.predict.
    kernels); "" for other operators."""

    name: str
    flops: float
    bytes: float
    dtype: str
    phase: str = ""
    seconds: float = 0.0
    signature: str = ""


_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def _math_dtype(tensors: Sequence[object]) -> str:
    """The dtype an operator computes in: its first floating-point tensor's."""
    for x in tensors:
        if isinstance(x, torch.Tensor) and x.is_floating_point():
            return _DTYPE_NAMES.get(x.dtype, "fp32")
    return "fp32"


# Operators whose calls keep their signature, so that lungbench.predict.kernels can make
# them again alone: the convolutions, whose speed per FLOP moves with their shapes in ways
# no bound says, and the poolings and BatchNorms, whose thread scaling their memory bound
# does not say (why: that module's doc).
SIGNED_OPERATORS = (
    "aten.convolution",
    "aten.convolution_backward",
    "aten.max_pool3d_with_indices",
    "aten.max_pool3d_with_indices_backward",
    "aten.native_batch_norm",
    "aten.native_batch_norm_backward",
)


def call_signature(args: Sequence[object]) -> str:
    """The positional arguments of an aten call as JSON: a tensor as ["tensor", shape, dtype,
    channels-last], anything else as itself (ints, bools, lists of ints, None)."""

    def encode(value: object) -> object:
        if isinstance(value, torch.Tensor):
            last = (
                value.dim() in (4, 5)
                and not value.is_contiguous()
                and value.is_contiguous(
                    memory_format=torch.channels_last
                    if value.dim() == 4
                    else torch.channels_last_3d
                )
            )
            return ["tensor", list(value.shape), str(value.dtype).removeprefix("torch."), last]
        if isinstance(value, (list, tuple)):
            return [encode(v) for v in value]
        return value

    return json.dumps([encode(a) for a in args])


def operator_counter(
    record: bool = False, timed: bool = False, device: torch.device | None = None
) -> Any:
    """A TorchDispatchMode that sums the bytes every aten operator moves (the tensors it
    takes and returns, views skipped: they move nothing) in `.total_bytes` and, with
    `record=True`, keeps one OpCall per operator call in `.calls`: its FLOPs from torch's
    flop registry (what FlopCounterMode counts), bytes, dtype, the `.phase` the caller set
    and, with `timed=True`, its seconds (on CUDA synchronized around each call: the op's
    work, while the whole step runs slower than a real one).

        with operator_counter(record=True, timed=True) as ops:
            step()
        ops.calls   # [OpCall("aten.convolution", 5.1e8, 7.1e6, "bf16", "forward", 0.012), ...]
    """
    return _operator_counter_class()(record=record, timed=timed, device=device)


@functools.lru_cache(maxsize=1)
def _operator_counter_class() -> type:
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten
    from torch.utils.flop_counter import flop_registry

    class _OperatorCounter(TorchDispatchMode):
        def __init__(self, record: bool, timed: bool, device: torch.device | None) -> None:
            super().__init__()
            self.record, self.timed = record, timed
            self.cuda = device is not None and device.type == "cuda"
            self.total_bytes = 0
            self.calls: list[OpCall] = []
            self.phase = ""

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if self.timed and self.cuda:
                torch.cuda.synchronize()  # note: CPU-GPU sync point, so the clock sees one op
            t0 = time.perf_counter()
            out = func(*args, **kwargs)
            if self.timed and self.cuda:
                torch.cuda.synchronize()
            seconds = time.perf_counter() - t0 if self.timed else 0.0
            if getattr(func, "is_view", False):
                return out
            tensors = tree_flatten((args, kwargs, out))[0]
            moved = sum(
                x.numel() * x.element_size() for x in tensors if isinstance(x, torch.Tensor)
            )
            self.total_bytes += moved
            if self.record:
                packet = func.overloadpacket
                flops = (
                    flop_registry[packet](*args, **kwargs, out_val=out)
                    if packet in flop_registry
                    else 0
                )
                self.calls.append(
                    OpCall(
                        str(packet),
                        float(flops),
                        float(moved),
                        _math_dtype(tensors),
                        self.phase,
                        seconds,
                        call_signature(args) if str(packet) in SIGNED_OPERATORS else "",
                    )
                )
            return out

    return _OperatorCounter


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_bytes(device: torch.device) -> tuple[int, str]:
    """Peak memory and what it means: the CUDA allocator's peak since the last reset, or,
    on CPU, the process's peak resident set size (whole process lifetime, Linux ru_maxrss)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda_max_allocated"
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(max(peak_kb * 1024, psutil.Process().memory_info().rss)), "process_peak_rss"
