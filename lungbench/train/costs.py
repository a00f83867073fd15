"""Layer 9 (train): What a transfer method costs to train: time per epoch, trainable parameters, memory, GPUs.

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

from lungbench.measure.memory import MemoryEstimate, estimate_memory, saved_activation_bytes

__all__ = ["MemoryEstimate", "estimate_memory", "min_gpus", "saved_activation_bytes"]

GIB = 1024**3


MIB = 1024**2


GPU_HEADROOM = 0.9  # CUDA context, allocator fragmentation, cuDNN workspaces


def min_gpus(estimate: MemoryEstimate, batch_size: int, gpu_memory_gb: float) -> int | None:
    """Fewest GPUs of `gpu_memory_gb` that train `batch_size` data-parallel (None: none do,
    even with one sample per GPU)."""
    budget = gpu_memory_gb * GIB * GPU_HEADROOM
    for gpus in range(1, batch_size + 1):
        if estimate.total(math.ceil(batch_size / gpus)) <= budget:
            return gpus
    return None
