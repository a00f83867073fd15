"""Layer 7 (train): What a transfer method costs to train: time per epoch, trainable parameters, memory, GPUs.

Seed 004's cost table (ResNet50 / DenseNet121 on ChestX-ray8) has, per method: batch size,
minimum GPUs, time per epoch and trainable parameters. Here:

    time per epoch   measured with the training engine (lungbench.train.engine.fit) on the same
                     small set for every method; the median of the epochs after the first
                     (the first carries allocator and cuDNN warm-up)
    memory           CUDA: the engine's peak allocation. CPU: an estimate that does not depend
                     on what else the process holds: weights + gradients of the trainable
                     parameters + Adam's two moments + the activations autograd saves for
                     backward (counted with saved_tensors_hooks over one training forward)
    minimum GPUs     data parallel: every GPU holds weights, gradients and optimizer state,
                     and the activations of its share of the batch; the smallest g with
                     static + per_sample * ceil(batch / g) <= 90% of --gpu-memory-gb

Freezing cuts all three: frozen layers need no gradients or optimizer state, and autograd
saves no activations before the first trainable layer (so no backward runs through them).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

GIB = 1024**3


MIB = 1024**2


GPU_HEADROOM = 0.9  # CUDA context, allocator fragmentation, cuDNN workspaces


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

    Frozen batch norms stay in eval mode here as in training (lungbench.train.transfer's hook), so
    the probe sees what the real step sees. BatchNorm statistics do not mix samples at
    inference, but do in training; activations still scale linearly with the batch.
    """
    trainable = [p for p in model.parameters() if p.requires_grad]
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    grads = sum(p.numel() * p.element_size() for p in trainable)
    moments = {"adam": 2, "sgd": 1, "adadelta": 2}.get(optimizer, 2)
    device = next(model.parameters()).device
    inputs = [torch.zeros(probe_batch, *s, device=device) for s in sample_shapes]
    state = {k: v.clone() for k, v in model.state_dict().items()}  # BN statistics move
    try:
        activations = saved_activation_bytes(model, inputs)
    finally:
        model.load_state_dict(state)
    return MemoryEstimate(weights, grads, grads * moments, math.ceil(activations / probe_batch))


def min_gpus(estimate: MemoryEstimate, batch_size: int, gpu_memory_gb: float) -> int | None:
    """Fewest GPUs of `gpu_memory_gb` that train `batch_size` data-parallel (None: none do,
    even with one sample per GPU)."""
    budget = gpu_memory_gb * GIB * GPU_HEADROOM
    for gpus in range(1, batch_size + 1):
        if estimate.total(math.ceil(batch_size / gpus)) <= budget:
            return gpus
    return None
