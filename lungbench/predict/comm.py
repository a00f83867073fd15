"""Layer 8 (predict): the gradient all-reduce of N data-parallel ranks.

DDP all-reduces the gradients in buckets (`bucket_bytes`: the layout DDP computes, 1 MiB
first, then `bucket_mb`), each as a ring all-reduce (lungbench.measure.allreduce):

    t(bucket) = 2(N-1) alpha + 2(N-1)/N * bytes / beta

alpha and beta come from a device profile (NVLink, PCIe) or, on this machine, from a
least-squares fit of 2-process Gloo all-reduces at several sizes (`fit_gloo`, cached per host).
DDP starts a bucket's all-reduce as soon as its gradients are ready, so all but the last
bucket can hide behind the rest of the backward pass when the device computes while the
network moves data (GPUs: `overlap` 1); on a CPU the Gloo threads take the cores the
backward pass needs, so nothing hides (`overlap` 0), as measured on the 2-core dev box.
"""

from __future__ import annotations

import logging
import os
import socket
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lungbench.core.cache import measured_number, read_cache, register_schema, write_cache
from lungbench.measure.allreduce import AlphaBeta, fit_alpha_beta

log = logging.getLogger(__name__)

CACHE_FILE = "allreduce.json"


def _gloo_entry(entry: dict) -> bool:
    """An alpha-beta fit (latency 0 or more, bandwidth above 0) and its measured points."""
    points = entry.get("points", [])
    return (
        measured_number(entry["alpha_s"], zero=True)
        and measured_number(entry["beta_bytes_per_s"])
        and isinstance(points, list)
        and all(len(p) == 2 and measured_number(p[0]) and measured_number(p[1]) for p in points)
    )


register_schema(CACHE_FILE, _gloo_entry)
FIRST_BUCKET_BYTES = 1024 * 1024  # torch.distributed._DEFAULT_FIRST_BUCKET_BYTES
# Elements per all-reduce of the Gloo fit: from all latency to mostly bandwidth.
FIT_ELEMENTS = (256, 16_384, 262_144, 1_048_576, 4_194_304)


@dataclass(frozen=True)
class CommEstimate:
    """Seconds of all-reduce per step: in all, and what the step cannot hide."""

    total_s: float
    exposed_s: float
    buckets: int
    bytes: int


def bucket_bytes(model: nn.Module, bucket_mb: int = 25) -> list[int]:
    """Bytes of each gradient bucket DDP builds for `model` (FP32 gradients), last layer
    first as DDP fills them. Uses torch's own assignment where it exists."""
    params = [p for p in reversed(list(model.parameters())) if p.requires_grad]
    limits = [FIRST_BUCKET_BYTES, bucket_mb * 1024 * 1024]
    try:
        import torch.distributed as tdist

        groups, _ = tdist._compute_bucket_assignment_by_size(params, limits, [False] * len(params))
        return [sum(params[i].numel() * 4 for i in group) for group in groups]
    except (AttributeError, RuntimeError, TypeError):  # private API: fill them ourselves
        return _greedy_buckets([p.numel() * 4 for p in params], limits)


def _greedy_buckets(sizes: Sequence[int], limits: Sequence[int]) -> list[int]:
    buckets, current = [], 0
    for size in sizes:
        current += size
        if current >= limits[min(len(buckets), len(limits) - 1)]:
            buckets.append(current)
            current = 0
    return buckets + ([current] if current else [])


def ring_allreduce_s(nbytes: float, ranks: int, alpha_s: float, beta: float) -> float:
    """Ring all-reduce of `nbytes` over `ranks`: 2(N-1) alpha + 2(N-1)/N bytes / beta."""
    return AlphaBeta(alpha_s, beta).allreduce_s(nbytes, ranks)


def comm_estimate(
    buckets: Sequence[int],
    ranks: int,
    link: AlphaBeta,
    backward_s: float,
    overlap: float,
) -> CommEstimate:
    """All-reduce of `buckets` over `ranks`; the exposed part is all of it less what
    `overlap` (0..1) of the backward pass hides, never less than the last bucket."""
    if ranks < 2:
        return CommEstimate(0.0, 0.0, len(buckets), sum(buckets))
    times = [link.allreduce_s(b, ranks) for b in buckets]
    total = sum(times)
    hideable = total - times[-1]
    exposed = total - overlap * min(hideable, backward_s)
    return CommEstimate(total, exposed, len(buckets), sum(buckets))


def gloo_host_key() -> str:
    """The cache key of this host's Gloo measurements (host, backend, torch version)."""
    return f"{socket.gethostname()}|gloo|torch {torch.__version__}"


def cached_gloo_fit() -> AlphaBeta | None:
    """This host's cached Gloo alpha-beta fit, if one was measured."""
    entry = read_cache(CACHE_FILE).get(gloo_host_key())
    return AlphaBeta(entry["alpha_s"], entry["beta_bytes_per_s"]) if entry else None


def fit_gloo(repeats: int = 5, refit: bool = False) -> AlphaBeta:
    """alpha and beta of 2-process Gloo all-reduces on this host (spawned processes on
    localhost, one thread each), fitted by least squares and cached per host; `refit`
    measures again, keeping per size the fastest of that and the cache."""
    cached = None if refit else cached_gloo_fit()
    if cached is not None:
        return cached
    log.info(
        "measuring 2-process Gloo all-reduces on this machine (alpha-beta fit; about 10-30 s, "
        "once per host)"
    )
    nbytes, seconds = measure_gloo(FIT_ELEMENTS, repeats)
    # Per size, the best this host has done: a busy moment cannot raise the fit (the dev
    # box once fitted a 1.1 ms latency in a slow minute).
    before = {
        int(n): float(t)
        for n, t in (read_cache(CACHE_FILE).get(gloo_host_key()) or {}).get("points", [])
    }
    seconds = [min(t, before.get(n, t)) for n, t in zip(nbytes, seconds, strict=True)]
    fit = fit_alpha_beta(nbytes, seconds, 2)
    if fit is None:  # too noisy to separate latency from bandwidth: all bandwidth
        fit = AlphaBeta(0.0, 2 * (2 - 1) / 2 * max(nbytes) / max(seconds))
    cache = read_cache(CACHE_FILE)
    cache[gloo_host_key()] = {
        "alpha_s": fit.alpha_s,
        "beta_bytes_per_s": fit.beta_bytes_per_s,
        "points": list(zip(nbytes, seconds, strict=True)),
    }
    write_cache(CACHE_FILE, cache)
    return fit


def measure_gloo(elements: Sequence[int], repeats: int) -> tuple[list[int], list[float]]:
    """(bytes, median seconds) of 2-process Gloo all-reduces of FP32 tensors of `elements`."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "times.txt"
        port = _free_port()
        mp.spawn(_gloo_worker, args=(2, port, list(elements), repeats, str(out)), nprocs=2)
        seconds = [float(x) for x in out.read_text().split()]
    return [n * 4 for n in elements], seconds


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gloo_worker(
    rank: int, world: int, port: int, elements: list[int], repeats: int, out: str
) -> None:
    import torch.distributed as tdist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    tdist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        medians = []
        for n in elements:
            tensor = torch.ones(n)
            times = []
            for i in range(repeats + 2):
                tdist.barrier()  # start together: a late rank's skew is not transfer time
                t0 = time.perf_counter()
                tdist.all_reduce(tensor)
                if i >= 2:  # two warm-ups (the first connects and allocates)
                    times.append(time.perf_counter() - t0)
            medians.append(statistics.median(times))
        if rank == 0:
            Path(out).write_text(" ".join(repr(t) for t in medians))
    finally:
        tdist.destroy_process_group()
