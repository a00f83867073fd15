"""Layer 8 (predict): the per-operator model: each measured call scaled by its bounds.

For operator call i of the step, with FLOPs F, bytes B and math dtype d on a device of peak
P[d] and memory bandwidth W:

    compute bound  c = F / P[d]        memory bound  m = B / W        roof = max(c, m)

(P: the dtype's matrix-product peak; for a convolution on a measured CPU, the measured rate
of a 3D convolution, whose scaling with threads the product's does not share.)

On a device of the same kind as the source (CPU -> CPU at other threads, batch or width;
GPU -> GPU) each call keeps its measured efficiency (Habitat's idea, Yu et al., USENIX ATC
2021): its measured time less a fixed per-call latency is scaled by roof' / roof, the ratio
of the bounds that limit it on target and source. What the step spends outside the calls
(Python, autograd, the dispatcher) does not depend on shapes and is kept. A call whose
ratio was measured (`kernel_ratio`: the convolutions, poolings and BatchNorms, made alone on
this machine by lungbench.predict.kernels) is scaled by that ratio instead: a convolution's
rate moves with its shapes, and a pooling or BatchNorm runs so far below its memory bound
that its time does not follow the copy bandwidth when the threads change.

Across kinds (a CPU run -> a GPU profile) a CPU's efficiency says nothing about a GPU's:
each kernel takes launch + roof' / efficiency (the profile's fraction of peak), and the host
issues the calls at this machine's measured cost per call; the step is the longer of the
two streams (kernels run asynchronously behind the host).

    est = scale_step(source_calls, source_dev, target_calls, target_dev, overhead_s, latency_s)
    est = scale_step(..., kernel_ratio=lambda was, will: 1.7)   # measured ratios where known
    est.step_s, est.parts   # {"compute": s, "memory": s, "latency": s}
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from lungbench.measure.timing import OpCall
from lungbench.predict.devices import DeviceProfile
from lungbench.predict.operators import matching

BOUNDS = ("compute", "memory", "latency", "communication", "data")


@dataclass(frozen=True)
class StepEstimate:
    """A predicted step: its seconds and what they are made of (seconds per bound)."""

    step_s: float
    parts: dict[str, float] = field(default_factory=dict)
    phases: dict[str, float] = field(default_factory=dict)  # forward, backward, optimizer

    @property
    def bound(self) -> str:
        """What limits the step: the part with the most seconds."""
        return max(self.parts, key=self.parts.get) if self.parts else "compute"


def roof_s(call: OpCall, device: DeviceProfile) -> tuple[float, float]:
    """(compute bound, memory bound) of `call` on `device`, in seconds."""
    compute = call.flops / device.compute_rate(call.name, call.dtype) if call.flops else 0.0
    bandwidth = device.bandwidth_for(call.bytes)
    memory = call.bytes / bandwidth if bandwidth else 0.0
    return compute, memory


def aligned(source: Sequence[OpCall], target: Sequence[OpCall]) -> list[tuple[OpCall, OpCall]]:
    """Pairs (source call, target call): call by call when both steps call the same
    operators in order; else the k-th call of each operator name with the k-th of the same
    name (a target call without a partner keeps its own counts and no measured time)."""
    if matching(source, target):
        return list(zip(source, target, strict=True))
    by_name: dict[str, list[OpCall]] = defaultdict(list)
    for call in source:
        by_name[call.name].append(call)
    seen: dict[str, int] = defaultdict(int)
    pairs = []
    for call in target:
        k = seen[call.name]
        seen[call.name] += 1
        mates = by_name.get(call.name, [])
        pairs.append((mates[k] if k < len(mates) else replace(call, seconds=0.0), call))
    return pairs


def fixed_costs(
    source: Sequence[OpCall],
    reference: Sequence[OpCall] | None,
    device: DeviceProfile,
    call_latency_s: float,
) -> list[float]:
    """Per source call, the seconds that do not grow with its bounds. With the same step
    probed at a second size (`reference`), each call's two (roof, seconds) points give a
    line: its intercept, kept within [0, seconds]. Without: the per-call latency."""
    if reference is None or not matching(source, reference):
        return [min(c.seconds, call_latency_s) for c in source]
    fixed = []
    for a, b in zip(source, reference, strict=True):
        r1, r2 = max(roof_s(a, device)), max(roof_s(b, device))
        slope = (b.seconds - a.seconds) / (r2 - r1) if r2 != r1 else 0.0  # either side
        intercept = a.seconds - max(slope, 0.0) * r1
        fixed.append(min(max(intercept, min(a.seconds, call_latency_s)), a.seconds))
    return fixed


def scale_step(
    source: Sequence[OpCall],
    source_device: DeviceProfile,
    target: Sequence[OpCall],
    target_device: DeviceProfile,
    overhead_s: float,
    call_latency_s: float,
    reference: Sequence[OpCall] | None = None,
    kernel_ratio: Callable[[OpCall, OpCall], float | None] | None = None,
) -> StepEstimate:
    """The target step's seconds from the source's measured calls (see the module doc);
    `reference`: the source step probed at a second size (see fixed_costs); `kernel_ratio`:
    a call's measured target/source time ratio, or None where there is none."""
    if source_device.kind != target_device.kind:
        return _across_kinds(source, target, target_device, overhead_s, call_latency_s)
    parts = {"compute": 0.0, "memory": 0.0, "latency": overhead_s}
    phases: dict[str, float] = defaultdict(float)
    fixed_of = {
        id(c): f
        for c, f in zip(
            source, fixed_costs(source, reference, source_device, call_latency_s), strict=True
        )
    }
    for was, will in aligned(source, target):
        c0, m0 = roof_s(was, source_device)
        c1, m1 = roof_s(will, target_device)
        ratio = kernel_ratio(was, will) if kernel_ratio is not None else None
        if ratio is not None:
            parts["compute" if c1 >= m1 else "memory"] += was.seconds * ratio
            phases[will.phase] += was.seconds * ratio
            continue
        fixed = fixed_of.get(id(was), min(was.seconds, call_latency_s))
        work = was.seconds - fixed
        scaled = work * max(c1, m1) / max(c0, m0) if max(c0, m0) > 0 else work
        parts["latency"] += fixed
        parts["compute" if c1 >= m1 else "memory"] += scaled
        phases[will.phase] += fixed + scaled
    return StepEstimate(sum(parts.values()), parts, dict(phases))


def _across_kinds(
    source: Sequence[OpCall],
    target: Sequence[OpCall],
    device: DeviceProfile,
    overhead_s: float,
    call_latency_s: float,
) -> StepEstimate:
    # The host's cost to issue one call: this machine's measured fixed cost per call plus
    # its share of the Python / autograd time around the calls.
    host_per_call = call_latency_s + overhead_s / max(len(source), 1)
    compute = memory = 0.0
    phases: dict[str, float] = defaultdict(float)
    for call in target:
        c, m = roof_s(call, device)
        c, m = c / device.compute_efficiency, m / device.memory_efficiency
        if c >= m:
            compute += c
        else:
            memory += m
        phases[call.phase] += max(host_per_call, device.kernel_launch_s + max(c, m))
    host = host_per_call * len(target)
    kernels = device.kernel_launch_s * len(target) + compute + memory
    if host >= kernels:  # the GPU waits for the host: launch / latency bound
        parts = {"compute": 0.0, "memory": 0.0, "latency": host}
    else:
        parts = {"compute": compute, "memory": memory, "latency": kernels - compute - memory}
    return StepEstimate(max(host, kernels), parts, dict(phases))


def roofline_calls(calls: Sequence[OpCall], step_s: float, device: DeviceProfile) -> list[OpCall]:
    """Calls without measured times given the measured step's seconds in proportion to their
    bounds on `device`: what the model has when the source ran elsewhere (no probe there)."""
    roofs = [max(roof_s(c, device)) for c in calls]
    total = sum(roofs)
    if total <= 0:
        return [replace(c, seconds=step_s / max(len(calls), 1)) for c in calls]
    return [replace(c, seconds=step_s * r / total) for c, r in zip(calls, roofs, strict=True)]
