"""Layer 5 (step): the one training step (TrainStep), the one optimizer factory and the loss.

    sw = resolve(Switches(dtype="bf16"), torch.device("cpu"))      # lungbench.switches
    step = TrainStep(model, loss_fn, sw.switches, device)            # applies format / compile
    inputs = step.prepare_inputs(inputs)
    with backend_flags(sw.switches):
        loss = step(timer, inputs, target)

`lungbench bench` times this step, the DDP bench scales it, the ablation and the batch finder
measure it, `lungbench profile` traces it, and the training engine and the LR finder train
with it. How each switch is chosen and applied lives in lungbench.switches.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from lungbench.core.cache import cache_dir
from lungbench.core.errors import look_up_option
from lungbench.distributed.group import DistContext, wrap_model
from lungbench.switches import (
    Switches,
    apply_memory_format,
    autocast,
    in_format,
    pools_in_input_dtype,
)

OPTIMIZERS = ("adam", "sgd", "adadelta")


def make_optimizer(
    params: Sequence[nn.Parameter] | Any,
    switches: Switches,
    lr: float = 1e-3,
    capturable: bool = False,
    name: str = "adam",
    momentum: float = 0.9,
    weight_decay: float = 0.0,
) -> torch.optim.Optimizer:
    """The one optimizer factory: `name` (adam | sgd with `momentum` | adadelta) with the
    switches' implementation for Adam (foreach / fused; default = torch's own choice)."""
    kwargs: dict[str, Any] = {"lr": lr, "weight_decay": weight_decay}
    if name == "sgd":
        return torch.optim.SGD(params, momentum=momentum, **kwargs)
    if name == "adadelta":
        return torch.optim.Adadelta(params, **kwargs)
    look_up_option(name, OPTIMIZERS, what="optimizer")
    if switches.optimizer == "foreach":
        kwargs["foreach"] = True
    elif switches.optimizer == "fused":
        kwargs["fused"] = True
    if capturable:
        kwargs["capturable"] = True
    return torch.optim.Adam(params, **kwargs)


def distributed_model(model: nn.Module, dist: DistContext, switches: Switches) -> nn.Module:
    """`model` on this rank's device in the switches' memory format, then in DDP under a
    launcher with the switches' gradient bucket size: the one way every DDP step (bench's
    ranks, training, predict's ranks side by side) is built. The layout comes first because
    DDP lays out its gradient buckets from the parameters' strides when it is built: a model
    converted after (TrainStep converts too, a no-op here) keeps contiguous bucket views, so
    every synced step copies each channels-last gradient into them, and torch warns "Grad
    strides do not match bucket view strides" on the user's terminal."""
    apply_memory_format(model.to(dist.device), switches.memory_format)
    return wrap_model(model, dist, bucket_cap_mb=switches.ddp_bucket_mb)


class _NoTimer:
    """Stands in for a PhaseTimer when a step is run untimed."""

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        yield


NO_TIMER = _NoTimer()


class StepResult(NamedTuple):
    """What one step returns: the loss (detached) and the model's output (detached)."""

    loss: torch.Tensor
    output: torch.Tensor


@dataclass
class TrainStep:
    """One optimisation step of `model` with `switches` applied (phases timed).

    The one step of lungbench: `lungbench bench` times it, the DDP bench scales it, the
    ablation and the batch finder measure it, `lungbench profile` traces it and the training
    engine and the LR finder train with it.

    Construction applies the memory format (in place) and wraps the model in torch.compile.
    The optimizer is Adam built here, so that fused / foreach / capturable match the switches,
    unless one is given (the training engine's SGD / Adadelta / weight decay). Autocast runs
    the forward pass; the loss is computed in FP32 outside it (small, numerically sensitive).
    fp16 gets a grad scaler (disabled for the other dtypes, so checkpoints always hold one).
    `grad_clip` clips the gradients' global norm (unscaled first); `after_step` runs after
    every optimizer step (a per-step LR schedule such as one-cycle). Each phase runs inside
    `timer.phase(name)`: a PhaseTimer times it, the profiler's timer labels it.
    """

    model: nn.Module
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    switches: Switches
    device: torch.device
    lr: float = 1e-3
    optimizer: torch.optim.Optimizer | None = None  # None: Adam of the switches' implementation
    grad_clip: float | None = None
    after_step: Callable[[], Any] | None = None
    forward: Callable[..., torch.Tensor] = field(init=False)
    scaler: torch.amp.GradScaler = field(init=False)
    _graph: Any = field(init=False, default=None)

    def __post_init__(self) -> None:
        apply_memory_format(self.model, self.switches.memory_format)
        pools_in_input_dtype(self.model, self.switches.dtype != "fp32")
        if self.optimizer is None:
            self.optimizer = make_optimizer(
                self.model.parameters(),
                self.switches,
                self.lr,
                capturable=bool(self.switches.cuda_graphs),
            )
        self.forward = self.model
        if self.switches.compile != "off":
            self.forward = compiled(self.model, self.switches.compile)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.switches.dtype == "fp16")

    def prepare_inputs(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Inputs in the step's memory format."""
        return [in_format(x, self.switches.memory_format) for x in inputs]

    def __call__(
        self, timer: Any, inputs: Sequence[torch.Tensor], target: torch.Tensor
    ) -> torch.Tensor:
        """Run one step and return its detached loss (see `run`)."""
        return self.run(timer, inputs, target).loss

    def run(self, timer: Any, inputs: Sequence[torch.Tensor], target: torch.Tensor) -> StepResult:
        """One step; with CUDA graphs the first call captures and later calls replay."""
        if self.switches.cuda_graphs:
            return self._graphed(timer, inputs, target)
        result = self.forward_backward(timer, inputs, target)
        self.optimizer_step(timer)
        return result

    def forward_backward(
        self,
        timer: Any,
        inputs: Sequence[torch.Tensor],
        target: torch.Tensor,
        sync: bool = True,
    ) -> StepResult:
        """Forward and backward; `sync=False` keeps a DDP model's gradients local (no_sync:
        nothing is reduced, the compute alone)."""
        local = not sync and isinstance(self.model, nn.parallel.DistributedDataParallel)
        with self.model.no_sync() if local else contextlib.nullcontext():
            with timer.phase("forward"):
                with autocast(self.switches, self.device):
                    out = self.forward(*inputs)
                loss = self.loss_fn(out.float(), target)
            with timer.phase("backward"):
                self.optimizer.zero_grad(set_to_none=True)
                self.scaler.scale(loss).backward()
        return StepResult(loss.detach(), out.detach())

    def optimizer_step(self, timer: Any) -> None:
        """Clip (if asked), step the optimizer through the grad scaler, run `after_step`."""
        with timer.phase("optimizer"):
            if self.grad_clip is not None:
                self.scaler.unscale_(self.optimizer)
                nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            if self.after_step is not None:
                self.after_step()

    def _graphed(
        self, timer: Any, inputs: Sequence[torch.Tensor], target: torch.Tensor
    ) -> StepResult:
        # The whole step (forward, backward, Adam) is one graph: phases cannot be separated,
        # so it is timed as a single "graph" phase. Inputs are copied into static buffers.
        if self._graph is None:
            self._graph = _capture(self, inputs, target)
        graph, static_inputs, static_target, static_loss, static_out = self._graph
        with timer.phase("graph"):
            for dst, src in zip(static_inputs, inputs, strict=True):
                if dst.data_ptr() != src.data_ptr():
                    dst.copy_(src, non_blocking=True)
            if static_target.data_ptr() != target.data_ptr():
                static_target.copy_(target, non_blocking=True)
            graph.replay()
        return StepResult(static_loss.detach(), static_out.detach())


def _capture(step: TrainStep, inputs: Sequence[torch.Tensor], target: torch.Tensor) -> tuple:
    """Capture `step` as one CUDA graph (PyTorch's whole-network capture recipe)."""
    static_inputs = [x.clone() for x in inputs]
    static_target = target.clone()

    def body() -> tuple[torch.Tensor, torch.Tensor]:
        with autocast(step.switches, step.device, cache=False):  # no cache across capture
            out = step.model(*static_inputs)
        loss = step.loss_fn(out.float(), static_target)
        loss.backward()
        step.optimizer.step()
        return loss, out

    # Warm up on a side stream (allocator pools, cuDNN/cuBLAS handles, optimizer state),
    # then put the weights back so the graphed run starts from the same state as eager.
    saved = [t.detach().clone() for t in (*step.model.parameters(), *step.model.buffers())]
    side = torch.cuda.Stream(step.device)
    side.wait_stream(torch.cuda.current_stream(step.device))
    with torch.cuda.stream(side):
        for _ in range(3):
            step.optimizer.zero_grad(set_to_none=True)
            body()
    torch.cuda.current_stream(step.device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    step.optimizer.zero_grad(set_to_none=True)  # grads are allocated inside the graph's pool
    with torch.cuda.graph(graph):
        static_loss, static_out = body()  # capture records kernels; nothing is executed
    with torch.no_grad():
        for tensor, value in zip(
            (*step.model.parameters(), *step.model.buffers()), saved, strict=True
        ):
            tensor.copy_(value)  # in place: the graph keeps pointing at these tensors
        for state in step.optimizer.state.values():
            for value in state.values():
                if torch.is_tensor(value):
                    value.zero_()  # Adam's step count and moments, as before any step
    return graph, static_inputs, static_target, static_loss, static_out


def bce_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy on logits (B, 1) against targets (B,)."""
    return F.binary_cross_entropy_with_logits(logits.reshape(target.shape), target)


def keep_compiled_code_in_our_cache() -> None:
    """Inductor's cache folder under lungbench's ($LUNGBENCH_CACHE_DIR/inductor) unless the
    user chose one in TORCHINDUCTOR_CACHE_DIR. Inductor writes its own default
    (/tmp/torchinductor_<user>) into that variable the first time anything asks for its
    folder (FlopCounterMode does, before any compile), so its default counts as not chosen.
    Inductor reads the variable at every cache access, so setting it before the compile
    (which runs at the first call) is enough."""
    current, default = os.environ.get("TORCHINDUCTOR_CACHE_DIR"), _inductor_default()
    if current is None or (default and os.path.abspath(current) == os.path.abspath(default)):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_dir() / "inductor")


def _inductor_default() -> str:
    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir
    except ImportError:  # another torch: only an unset variable counts as not chosen
        return ""
    return default_cache_dir()


def compiled(model: nn.Module, mode: str) -> Callable[..., torch.Tensor]:
    """torch.compile(model), its generated code and graphs cached under lungbench's cache
    ($LUNGBENCH_CACHE_DIR/inductor, unless TORCHINDUCTOR_CACHE_DIR says otherwise): inductor's
    FX-graph and AOTAutograd caches then survive the process, so a compile is paid once per
    host and workload, not in every run (its default, /tmp/torchinductor_<user>, is wiped
    with /tmp)."""
    keep_compiled_code_in_our_cache()
    return torch.compile(model, mode=mode)
