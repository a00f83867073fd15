"""Layer 6 (measure): how much memory a training step needs, how much the device has, and
the refusal of a configuration that cannot fit.

    need = step_memory(workload)                 # FP32 estimate, linear in the batch
    limit = memory_limit(device)                 # free bytes, and where that figure comes from
    why = refusal(workload)                      # None, or one line with both and the largest batch

The estimate (the counting of seed 004's cost table, lungbench.train.costs): weights,
gradients and optimizer state, plus per sample the activations autograd saves for backward
(counted with saved_tensors_hooks over a training forward of 2 samples, or 1 for batch 1, on
the CPU, so no device memory is touched) times ACTIVATION_FACTOR, plus a fixed RUNTIME_OVERHEAD. It is an
upper estimate for FP32 (autocast saves smaller activations); it exists to refuse work that
cannot fit (`lungbench bench --batch 100000` would otherwise grow until the kernel kills it),
not to tune a batch to the last MiB: the batch finder (lungbench.harness.batch_finder) does that.

The limit: CUDA, the driver's free memory; CPU, the available memory (psutil) or the cgroup's
remaining allowance when that is smaller (a SLURM job or a container). LUNGBENCH_MEMORY_LIMIT
(bytes, or a number with KiB/MiB/GiB) replaces it, e.g. to leave room for other jobs.

What a step really used (`step_peak_bytes`, over one extra untimed step): the high-water mark
of the tensor memory the step allocates above what was live when it began (activations,
gradients, temporaries, optimizer state made on the first step). CUDA: the allocator's
max_memory_allocated minus memory_allocated at the start; CPU: the running sum of the
profiler's memory events (torch.profiler.profile(profile_memory=True)). The process's RSS
(peak_memory_bytes) holds the interpreter, libraries and every cache too: it hardly moves
with the batch; this does.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import re
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import psutil
import torch
from torch import nn

from lungbench.core.errors import UsageError
from lungbench.measure.workload import Workload

MIB = 1024**2
GIB = 1024**3

# Backward holds the gradients of the activations beside the saved activations themselves:
# measured on the CPU for the two-path model (peak RSS growth per sample over the saved
# activations per sample, batches 16 -> 64): 1.34x. 1.5 leaves a margin.
ACTIVATION_FACTOR = 1.5
# Allocator caches, oneDNN / cuDNN workspaces, the CUDA context: about 100 MiB was measured on
# the CPU above the estimate at batch 2.
RUNTIME_OVERHEAD = 256 * MIB
HEADROOM = 0.9  # of the limit: the data loader, the profiler and Python itself need some too
LIMIT_VARIABLE = "LUNGBENCH_MEMORY_LIMIT"
OPTIMIZER_MOMENTS = {"adam": 2, "adamw": 2, "sgd": 1, "adadelta": 2}


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes for one data-parallel replica: `static` + `per_sample` x samples on it."""

    weights: int
    gradients: int
    optimizer: int
    per_sample: int

    @property
    def static(self) -> int:
        return self.weights + self.gradients + self.optimizer

    def total(self, batch_size: int) -> int:
        return self.static + self.per_sample * batch_size


def saved_activation_bytes(model: nn.Module, inputs: Sequence[torch.Tensor]) -> int:
    """Bytes of the tensors autograd saves for backward in one training-mode forward.

    Each storage counts once (a view of a saved tensor adds nothing); parameters are not
    activations and are left out.
    """
    params = {p.data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = max(seen.get(ptr, 0), t.untyped_storage().nbytes())
        return t

    was_training = model.training
    model.train()
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(*inputs)
        del out
    finally:
        model.train(was_training)
    return sum(seen.values())


def estimate_memory(
    model: nn.Module,
    sample_shapes: Sequence[Sequence[int]],
    optimizer: str = "adam",
    probe_batch: int = 2,
) -> MemoryEstimate:
    """Training memory of `model` for inputs of per-sample `sample_shapes` (fp32).

    Frozen batch norms stay in eval mode here as in training (lungbench.train.transfer's hook),
    so the probe sees what the real step sees. BatchNorm statistics do not mix samples at
    inference, but do in training; activations still scale linearly with the batch.
    """
    trainable = [p for p in model.parameters() if p.requires_grad]
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    grads = sum(p.numel() * p.element_size() for p in trainable)
    moments = OPTIMIZER_MOMENTS.get(optimizer, 2)
    device = next(model.parameters()).device
    inputs = [torch.zeros(probe_batch, *s, device=device) for s in sample_shapes]
    state = {k: v.clone() for k, v in model.state_dict().items()}  # BN statistics move
    try:
        activations = saved_activation_bytes(model, inputs)
    finally:
        model.load_state_dict(state)
    return MemoryEstimate(weights, grads, grads * moments, math.ceil(activations / probe_batch))


@dataclass(frozen=True)
class StepMemory:
    """What a training step of a workload needs, as a function of its batch."""

    estimate: MemoryEstimate

    def bytes(self, batch: int) -> int:
        per_sample = math.ceil(self.estimate.per_sample * ACTIVATION_FACTOR)
        return RUNTIME_OVERHEAD + self.estimate.static + per_sample * batch

    def largest_batch(self, limit: int) -> int:
        """The largest batch whose step fits in HEADROOM x `limit` (0: not even one)."""
        per_sample = math.ceil(self.estimate.per_sample * ACTIVATION_FACTOR)
        room = HEADROOM * limit - RUNTIME_OVERHEAD - self.estimate.static
        return max(0, int(room // max(per_sample, 1)))


def step_memory(workload: Workload, shapes: Sequence[Sequence[int]] | None = None) -> StepMemory:
    """The FP32 estimate of `workload`'s training step (Adam), probed on the CPU.

    `shapes`: per-sample input shapes (default: the model registry's)."""
    sample_shapes = tuple(tuple(s) for s in shapes or [s[1:] for s in workload.input_shapes(1)])
    # The device and threads do not change what one sample needs: probe once per model, with
    # 2 samples (a batch the step itself would run: no batch the user did not ask for).
    probe = replace(workload, batch_size=min(2, workload.batch_size), device="cpu", threads=None)
    return StepMemory(_estimate(probe, sample_shapes))


@functools.lru_cache(maxsize=64)
def _estimate(workload: Workload, shapes: tuple[tuple[int, ...], ...]) -> MemoryEstimate:
    model = workload.build_model(torch.device("cpu"))
    return estimate_memory(model, shapes, "adam", probe_batch=workload.batch_size)


def parse_size(text: str, what: str = LIMIT_VARIABLE) -> int:
    """Bytes from "123", "512MiB", "1.5 GiB", "2G" (binary units)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(i?B)?\s*", text, re.IGNORECASE)
    if not match:
        raise UsageError(f"{what}={text!r} is not a size; use bytes or e.g. 512MiB, 4GiB")
    unit = {"": 1, "K": 1024, "M": MIB, "G": GIB, "T": 1024 * GIB}[match[2].upper()]
    size = int(float(match[1]) * unit)
    if size <= 0:
        raise UsageError(f"{what}={text!r}: must be more than 0 bytes, e.g. 512MiB, 4GiB")
    return size


def memory_limit(device: torch.device) -> tuple[int, str]:
    """Bytes a step on `device` may use now, and where that figure comes from."""
    planted = os.environ.get(LIMIT_VARIABLE)
    if planted:
        return parse_size(planted), LIMIT_VARIABLE
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free), f"free memory of {device}"
    available = int(psutil.virtual_memory().available)
    allowance = _cgroup_allowance()
    if allowance is not None and allowance < available:
        return allowance, "the cgroup's remaining memory allowance"
    return available, "available memory (psutil)"


def _cgroup_allowance(root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """cgroup v2 memory.max - memory.current of this process's group (None: no limit)."""
    try:
        limit = (root / "memory.max").read_text().strip()
        used = int((root / "memory.current").read_text())
    except (OSError, ValueError):
        return None
    if limit == "max":
        return None
    return max(0, int(limit) - used)


def refusal(workload: Workload, shapes: Sequence[Sequence[int]] | None = None) -> str | None:
    """None when `workload`'s step fits on its device; else one line with the estimate, the
    limit and the largest batch that would fit."""
    device = torch.device(workload.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        return None  # the device check reports that, in its own words
    try:
        need = step_memory(workload, shapes)
    except Exception:  # noqa: BLE001 - a model that fails here fails in the measurement too,
        return None  # which records its error in its own words
    limit, source = memory_limit(device)
    wanted = need.bytes(workload.batch_size)
    if wanted <= HEADROOM * limit:
        return None
    largest = need.largest_batch(limit)
    fits = f"the largest batch that fits is {largest}" if largest else "not even batch 1 fits"
    return (
        f"batch {workload.batch_size} needs about {wanted / GIB:.1f} GiB (FP32 estimate: "
        f"weights, gradients, optimizer state, {ACTIVATION_FACTOR}x the saved activations) "
        f"but {device} has {limit / GIB:.1f} GiB ({source}); {fits}"
    )


# Lines the profiler's C++ side writes to stderr on every start and stop (kineto's stages, and
# a note about blocks allocated before it started): noise between the bench's progress lines.
PROFILER_NOISE = ("STAGE:", "USDT:", "Memory block of unknown size")


def step_peak_bytes(run_step: Callable[[], object], device: torch.device) -> tuple[int, str]:
    """Run `run_step` once and return the high-water mark of the tensor memory it allocated
    above what was live when it began, and how that was measured."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        run_step()
        torch.cuda.synchronize(device)
        return max(0, torch.cuda.max_memory_allocated(device) - start), "cuda_max_allocated"
    cpu_only = [torch.profiler.ProfilerActivity.CPU]
    with _quiet_stderr(), torch.profiler.profile(activities=cpu_only, profile_memory=True) as prof:
        run_step()
    events = prof.profiler.kineto_results.events() if prof.profiler else []
    cpu = torch.autograd.DeviceType.CPU
    memory = sorted(
        (e for e in events if e.name() == "[memory]" and e.device_type() == cpu),
        key=lambda e: e.start_ns(),
    )
    return high_water(e.nbytes() for e in memory), "cpu_profiler_memory_events"


def high_water(deltas: Iterable[int]) -> int:
    """The highest running sum of allocation (+) and free (-) sizes, from 0 (a free of a block
    allocated before the first event can take the sum below 0: that is not a peak)."""
    running = high = 0
    for delta in deltas:
        running += delta
        high = max(high, running)
    return high


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """File descriptor 2 into a temporary file meanwhile; what is not PROFILER_NOISE is written
    back afterwards (the profiler's C++ logging bypasses Python's sys.stderr)."""
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # pytest's capture, a notebook: no fd
        yield
        return
    sys.stderr.flush()
    saved = os.dup(fd)
    with tempfile.TemporaryFile(mode="w+b") as sink:
        os.dup2(sink.fileno(), fd)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, fd)
            os.close(saved)
            sink.seek(0)
            for line in sink.read().decode(errors="replace").splitlines(keepends=True):
                if not line.startswith(PROFILER_NOISE) and PROFILER_NOISE[2] not in line:
                    sys.stderr.write(line)
