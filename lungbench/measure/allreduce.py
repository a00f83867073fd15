"""Layer 6 (measure): the alpha-beta model of a ring all-reduce, fitted from measured ones.

A ring all-reduce of n bytes over N ranks sends 2(N-1) messages of n/N bytes from each rank
(reduce-scatter, then all-gather), so with a per-message latency alpha (s) and a link
bandwidth beta (bytes/s):

    t(n) = 2(N-1) * alpha + 2(N-1)/N * n / beta

(Thakur, Rabenseifner and Gropp, "Optimization of Collective Communication Operations in
MPICH", 2005). DDP all-reduces its gradient buckets one after another, so a step's
communication is the sum over its buckets. `fit_alpha_beta` takes measured (bytes, seconds)
pairs at two or more sizes and returns the least-squares alpha and beta; the DDP benchmark
(lungbench.harness.ddp) measures them and sets the model's estimate beside the measured
all-reduce of the step's real buckets.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class AlphaBeta:
    """Latency per message (s) and bandwidth (bytes/s) of a ring all-reduce."""

    alpha_s: float
    beta_bytes_per_s: float

    def allreduce_s(self, nbytes: float, world_size: int) -> float:
        """Seconds to all-reduce one tensor of `nbytes` over `world_size` ranks."""
        if world_size < 2:
            return 0.0
        steps = 2 * (world_size - 1)
        return steps * self.alpha_s + steps / world_size * nbytes / self.beta_bytes_per_s

    def buckets_s(self, bucket_bytes: Sequence[float], world_size: int) -> float:
        """Seconds to all-reduce DDP's buckets one after another."""
        return sum(self.allreduce_s(b, world_size) for b in bucket_bytes)


def fit_alpha_beta(
    nbytes: Sequence[float], seconds: Sequence[float], world_size: int
) -> AlphaBeta | None:
    """Least-squares alpha and beta from all-reduces of `nbytes` that took `seconds` each
    (at least two distinct sizes). None when the fit is not physical (a negative latency
    or a bandwidth <= 0: the timings were too noisy to tell the two apart)."""
    if world_size < 2 or len(set(nbytes)) < 2:
        return None
    steps = 2 * (world_size - 1)
    # t = steps * alpha + (steps / N) * n * (1 / beta): linear in (alpha, 1 / beta)
    design = np.column_stack(
        [np.full(len(nbytes), steps), steps / world_size * np.asarray(nbytes, dtype=float)]
    )
    (alpha, inverse_beta), *_ = np.linalg.lstsq(design, np.asarray(seconds, float), rcond=None)
    if inverse_beta <= 0:
        return None
    return AlphaBeta(max(float(alpha), 0.0), float(1.0 / inverse_beta))
