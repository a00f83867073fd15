"""Layer 7 (harness): Distributed (DDP) benchmark measurements: `lungbench bench` under a launcher.

    torchrun --nproc_per_node 2 -m lungbench bench --preset dey2018 --batch 2 4 --filters 8
    mpiexec -n 2 python -m lungbench bench --scaling weak --dist-timeout 120
    srun --ntasks-per-node 4 --gpus-per-node 4 python -m lungbench bench --device cuda

For every configuration (filters x batch size x threads), with W processes:
  * baseline: rank 0 measures the same configuration in one process
    (lungbench.harness.sweep.measure) while the other ranks wait, so one run holds world
    size 1 and W and the ratios between them
    come from one allocation (turn off with --no-baseline when combining runs instead);
  * weak scaling: per-process batch = --batch (global batch W x batch);
    strong scaling: global batch = --batch, split over the W ranks (skipped if it does not
    divide);
  * for each: the DDP training step timed by lungbench.measure.timing's protocol (forward, backward
    with its overlapped gradient all-reduce, optimizer); the same forward + backward under
    `no_sync()` (no gradient communication: the compute); the gradient all-reduce of the
    model's DDP bucket sizes timed on its own; and one end-to-end epoch through a
    DistributedSampler, with the time spent waiting for data measured apart;
  * every rank's timings are gathered to rank 0, which writes one record per configuration
    and scaling mode (the slowest rank's times, since a DDP step ends when the slowest does;
    the per-rank numbers under "ranks" in records.jsonl) and, at the end, the tables.

Only rank 0 creates the run folder and writes; records are appended as they are measured,
so a job that fails later keeps everything measured before.
"""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from functools import partial
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Subset
from torch.utils.data.distributed import DistributedSampler

from lungbench.core.device import synchronize
from lungbench.core.environment import allowed_cores
from lungbench.core.errors import is_oom, look_up_option, message_of
from lungbench.data.loader import LoaderOptions, make_loader
from lungbench.data.store import StoreDataset, StoreInfo
from lungbench.distributed.group import (
    DEFAULT_TIMEOUT_S,
    DistContext,
    DistributedError,
    all_gather,
    barrier,
    collective_guard,
    gather_records,
    parameter_digest,
    single_process,
    threads_per_rank,
)
from lungbench.harness.sweep import (
    BenchConfig,
    measure,
    refused_for_memory,
    timed_epoch,
    train_split,
)
from lungbench.harness.tuning import cached_tuning, untuned
from lungbench.measure.allreduce import fit_alpha_beta
from lungbench.measure.data_wait import data_bound
from lungbench.measure.memory import refusal as memory_refusal
from lungbench.measure.stats import summarize
from lungbench.measure.timing import (
    STEP,
    PhaseTimer,
    run_protocol,
    set_threads,
    training_step_flops,
)
from lungbench.measure.workload import Workload
from lungbench.step import TrainStep, bce_loss, distributed_model
from lungbench.switches import (
    Switches,
    backend_flags,
    has_auto,
    resolve_switches,
)

SCALINGS = ("weak", "strong")


SCALING_CHOICES = ("weak", "strong", "both")


# Phase name of the no_sync forward + backward (kept apart from the synchronised phases).
LOCAL = "local_fwd_bwd"


# Keys of a rank's result copied into the record's per-rank list.
RANK_FIELDS = (
    "rank",
    "host",
    "local_rank",
    "device",
    "threads_used",
    "status",
    "error",
    "step_s_median",
    "compute_s_median",
    "sync_fwd_bwd_s_median",
    "local_fwd_bwd_s_median",
    "optimizer_s_median",
    "allreduce_s_median",
    "epoch_s",
    "epoch_data_wait_s",
    "epoch_steps",
    "param_digest",
    "samples_s",
)


@dataclass(frozen=True)
class DDPOptions:
    """How `lungbench bench` measures when a launcher started several processes."""

    scaling: tuple[str, ...] = SCALINGS
    baseline: bool = True  # rank 0 also measures world size 1 (the scaling reference)
    timeout_s: float = DEFAULT_TIMEOUT_S
    # "auto" switches: the choice a 1-process tuning pass cached on rank 0's host for one
    # rank's workload (False, --no-tune: the device's table)
    cached_tuning: bool = True


def parse_scaling(text: str) -> tuple[str, ...]:
    """'weak', 'strong' or 'both' -> the modes to measure (UsageError otherwise)."""
    choice = look_up_option(text, SCALING_CHOICES, what="--scaling")
    return SCALINGS if choice == "both" else (choice,)


def split_batch(scaling: str, batch: int, world_size: int) -> tuple[int | None, str | None]:
    """(per-rank batch, None), or (None, why) when strong scaling cannot split `batch`."""
    if scaling == "weak":
        return batch, None
    if batch % world_size:
        return None, (
            f"global batch {batch} does not split evenly over {world_size} ranks; "
            f"use a multiple of {world_size}"
        )
    return batch // world_size, None


def platform_label(dist: DistContext, scaling: str) -> str:
    """The speed-up table's row name: 'cpu x2 (DDP, gloo)', 'cuda x8 (2 nodes, DDP, nccl)';
    strong scaling adds ', strong' (its batch is the global one)."""
    where = f"{dist.nodes} nodes, " if dist.nodes > 1 else ""
    mode = ", strong" if scaling == "strong" else ""
    return f"{dist.device.type} x{dist.world_size} ({where}DDP, {dist.backend}{mode})"


def bucket_numels(ddp: DistributedDataParallel, model: nn.Module) -> list[int]:
    """Elements per gradient bucket as DDP runs them: read after the first backward, when DDP
    has rebuilt its buckets in the order the gradients arrived (the construction-time layout
    in DDP's logging data is not updated then). Falls back to that logging data, then to one
    bucket of every parameter, when torch does not report them (private APIs, may change)."""
    elements = sum(p.numel() for p in model.parameters() if p.requires_grad)
    size = next(model.parameters()).element_size()
    try:
        sizes = [b.buffer().numel() for b in ddp.reducer._get_zeros_like_grad_buckets()]
    except (AttributeError, RuntimeError):
        sizes = []
    if not sizes or sum(sizes) != elements:
        try:
            text = str(ddp._get_ddp_logging_data().get("bucket_sizes", ""))
            sizes = [int(b) // size for b in re.findall(r"\d+", text)]
        except (AttributeError, RuntimeError):
            sizes = []
    return sizes if sizes and sum(sizes) == elements else [elements]


def time_allreduce(
    dist: DistContext, numels: Sequence[int], warmup: int, repeats: int
) -> list[float]:
    """Seconds to all-reduce one step's gradient buckets, one after another, with nothing
    to overlap them with: the communication a DDP step has to hide."""
    import torch.distributed as tdist

    tensors = [torch.ones(n, device=dist.device) for n in numels]
    samples = []
    for i in range(warmup + repeats):
        barrier(dist)  # start together, so a late rank's skew is not counted as transfer
        synchronize(dist.device)
        t0 = time.perf_counter()
        for tensor in tensors:
            tdist.all_reduce(tensor)
        synchronize(dist.device)  # note: CPU-GPU sync point, the clock stops when NCCL is done
        if i >= warmup:
            samples.append(time.perf_counter() - t0)
    return samples


# The sizes (elements) of the single all-reduces the alpha-beta model is fitted from: one
# small enough to be all latency, and the step's whole gradient as one tensor and a quarter
# of it, to see the bandwidth.
PROBE_ELEMENTS = 256


def allreduce_model(
    dist: DistContext, numels: Sequence[int], element_size: int, repeats: int
) -> dict[str, Any]:
    """The alpha-beta fit (lungbench.measure.allreduce) of isolated all-reduces of one tensor
    at three sizes, and what it predicts for the step's buckets: record fields."""
    total = sum(numels)
    sizes = sorted({PROBE_ELEMENTS, max(total // 4, PROBE_ELEMENTS + 1), max(total, 2)})
    medians = [
        summarize(time_allreduce(dist, [n], warmup=1, repeats=max(repeats, 5))).median
        for n in sizes
    ]
    nbytes = [n * element_size for n in sizes]
    fit = fit_alpha_beta(nbytes, medians, dist.world_size)
    fields: dict[str, Any] = {"allreduce_probe_bytes": nbytes, "allreduce_probe_s": medians}
    if fit is not None:
        fields.update(
            allreduce_alpha_s=fit.alpha_s,
            allreduce_beta_bytes_per_s=fit.beta_bytes_per_s,
            allreduce_model_s=fit.buckets_s([n * element_size for n in numels], dist.world_size),
        )
    return fields


def ddp_train_step(
    cfg: BenchConfig, model: nn.Module, dist: DistContext, inputs: Sequence[torch.Tensor]
) -> tuple[TrainStep, DistributedDataParallel, dict[str, Any]]:
    """The DDP-wrapped model and its training step with the same speed switches as the
    1-process baseline (lungbench.step, resolved with the same probe of the model on
    example `inputs`), and the record fields saying what ran."""
    resolved = resolve_switches(
        cfg, dist.device, inputs[0].dim(), quiet=not dist.is_main, probe=(model, inputs)
    )
    # DDP's gradient hooks cannot be captured in a CUDA graph: graphs stay off.
    switches = replace(resolved.switches, cuda_graphs=False)
    ddp = distributed_model(model, dist, switches)
    step_fn = TrainStep(ddp, bce_loss, switches, dist.device)
    return step_fn, ddp, replace(resolved, switches=switches).record()


def measure_ddp_step(
    cfg: BenchConfig, per_rank: int, info: StoreInfo, dist: DistContext
) -> dict[str, Any]:
    """This rank's DDP step timings, no_sync compute, isolated all-reduce, weight digest."""
    device = dist.device
    w = cfg.workload
    model = w.build_model(device)  # same initial weights everywhere (DDP broadcasts them too)
    # Different samples on every rank, as a DistributedSampler would give them.
    shapes = list(info.inputs.values())
    inputs, target = w.random_batch(device, w.seed + 1000 * dist.rank, per_rank, shapes)
    flops = training_step_flops(model, bce_loss, inputs, target)
    step_fn, ddp, switch_fields = ddp_train_step(cfg, model, dist, inputs)
    inputs = step_fn.prepare_inputs(inputs)
    timer = PhaseTimer(device)
    barrier(dist)
    with backend_flags(step_fn.switches):
        synced = run_protocol(
            lambda t: step_fn(t, inputs, target),
            timer,
            warmup=cfg.protocol.warmup,
            repeats=cfg.protocol.repeats,
        )
        digest = parameter_digest(model)  # after identical updates: equal on every rank
        barrier(dist)
        local = run_protocol(
            lambda t: step_fn.forward_backward(t, inputs, target, sync=False),
            timer,
            warmup=min(cfg.protocol.warmup, 1),
            repeats=cfg.protocol.repeats,
        )
    step_fn.optimizer.zero_grad(set_to_none=True)
    numels = bucket_numels(ddp, model)
    protocol = cfg.protocol
    reduce = time_allreduce(dist, numels, warmup=min(protocol.warmup, 2), repeats=protocol.repeats)
    element = next(model.parameters()).element_size()
    model_fields = allreduce_model(dist, numels, element, protocol.repeats)
    sync_fb = [f + b for f, b in zip(synced["forward"], synced["backward"], strict=True)]
    local_fb = [f + b for f, b in zip(local["forward"], local["backward"], strict=True)]
    optimizer_median = summarize(synced["optimizer"]).median
    step = summarize(synced[STEP])
    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        "flops_per_step": flops,
        "achieved_flops": flops / step.median,
        "param_digest": digest,
        "buckets": len(numels),
        "allreduce_bytes": sum(numels) * next(model.parameters()).element_size(),
        "step_s": step,
        "sync_fwd_bwd_s_median": summarize(sync_fb).median,
        "local_fwd_bwd_s_median": summarize(local_fb).median,
        "optimizer_s_median": optimizer_median,
        "compute_s_median": summarize(local_fb).median + optimizer_median,
        "allreduce_s_median": summarize(reduce).median,
        **model_fields,
        "switches": switch_fields,
        "samples_s": {**synced, LOCAL: local_fb, "allreduce": reduce},
    }


def measure_ddp_epoch(
    cfg: BenchConfig,
    per_rank: int,
    info: StoreInfo,
    dataset: StoreDataset,
    indices: np.ndarray,
    dist: DistContext,
) -> dict[str, Any]:
    """One DDP epoch over the training split, each rank on its DistributedSampler shard."""
    device = dist.device
    model = cfg.workload.build_model(device)
    examples = [torch.zeros((1, *shape), device=device) for shape in info.inputs.values()]
    step_fn, _, _ = ddp_train_step(cfg, model, dist, examples)
    if cfg.protocol.epoch_samples is not None:
        indices = indices[: cfg.protocol.epoch_samples]
    subset = Subset(dataset, indices.tolist())
    # Padding keeps the same number of steps on every rank (DDP needs matching collectives).
    sampler = DistributedSampler(
        subset, num_replicas=dist.world_size, rank=dist.rank, shuffle=True, seed=cfg.workload.seed
    )
    sampler.set_epoch(0)
    opts = LoaderOptions(
        batch_size=per_rank,
        num_workers=cfg.num_workers,
        pin_memory=cfg.pin_memory,
        persistent_workers=False,  # one epoch
        seed=cfg.workload.seed,
    )
    loader = make_loader(subset, opts, device, sampler=sampler)
    barrier(dist)
    elapsed, data_wait, steps = timed_epoch(loader, step_fn, device)
    return {
        "epoch_s": elapsed,
        "epoch_data_wait_s": data_wait,
        "epoch_steps": steps,
        "epoch_samples": len(indices),
    }


def rank_threads(workload: Workload, dist: DistContext) -> int:
    """Intra-op threads of one rank's CPU step: the workload's, else the cores this rank may
    use without oversubscribing its node. `bench` and `profile` under a launcher both set it,
    and the tuning choice they share is cached under it."""
    return workload.threads or threads_per_rank(dist)


def measure_rank(
    cfg: BenchConfig,
    scaling: str,
    per_rank: int,
    info: StoreInfo,
    dataset: StoreDataset,
    indices: np.ndarray,
    dist: DistContext,
) -> dict[str, Any]:
    """This rank's part of one DDP measurement. A failed collective raises DistributedError
    (the job cannot go on); any other failure becomes this rank's status, as in harness."""
    threads = (
        set_threads(rank_threads(cfg.workload, dist))
        if dist.device.type == "cpu"
        else torch.get_num_threads()
    )
    result: dict[str, Any] = {
        "rank": dist.rank,
        "host": socket.gethostname(),
        "local_rank": dist.local_rank,
        "device": str(dist.device),
        "threads_used": threads,
        "status": "ok",
        "error": None,
    }
    what = f"DDP {scaling} scaling, filters {cfg.workload.filters}, batch {cfg.workload.batch_size}"
    try:
        with collective_guard(dist, what):
            result.update(measure_ddp_step(cfg, per_rank, info, dist))
            if cfg.protocol.epoch:
                result.update(measure_ddp_epoch(cfg, per_rank, info, dataset, indices, dist))
    except DistributedError:
        raise
    except (MemoryError, RuntimeError) as exc:  # torch.cuda.OutOfMemoryError is a RuntimeError
        result.update(status="oom" if is_oom(exc) else "error", error=message_of(exc))
    finally:
        if dist.device.type == "cuda":
            torch.cuda.empty_cache()
    return result


def combine_ranks(
    cfg: BenchConfig,
    scaling: str,
    per_rank: int,
    dist: DistContext,
    ranks: Sequence[dict[str, Any]],
) -> dict[str, Any]:
    """One record from every rank's result: the slowest rank's times (a DDP step or epoch
    ends when its slowest rank does), per-rank numbers under "ranks"."""
    record = base_record(cfg, scaling, per_rank, dist)
    record["threads_used"] = ranks[0]["threads_used"]
    bad = [r for r in ranks if r["status"] != "ok"]
    if bad:
        record.update(status=bad[0]["status"], error=f"rank {bad[0]['rank']}: {bad[0]['error']}")
    else:
        record.update(_timings(ranks, record["global_batch"], dist.world_size))
        record.update(ranks[0].get("switches", {}))  # what ran (the same on every rank)
    record["ranks"] = [{k: r[k] for k in RANK_FIELDS if k in r} | _rank_step(r) for r in ranks]
    return record


def base_record(
    cfg: BenchConfig, scaling: str, per_rank: int | None, dist: DistContext
) -> dict[str, Any]:
    """The fields every DDP record has, measured or not."""
    batch = cfg.workload.batch_size
    global_batch = batch * dist.world_size if scaling == "weak" else batch
    return {
        "key": f"{cfg.key()}|ddp{dist.world_size}|{scaling}",
        **cfg.record_fields(),
        "device": dist.device.type,
        "platform": platform_label(dist, scaling),
        "scaling": scaling,
        "world_size": dist.world_size,
        "nodes": dist.nodes,
        "backend": dist.backend,
        "launcher": dist.launcher,
        "per_rank_batch": per_rank,
        "global_batch": global_batch,
        # Every rank must time the same steps (each has collectives): no adaptive repeats.
        "ci_target": None,
        "repeats_used": cfg.protocol.repeats,
        "repeats_stop": "fixed",
        "status": "ok",
        "error": None,
    }


def _rank_step(result: dict[str, Any]) -> dict[str, Any]:
    step = result.get("step_s")
    return step.as_dict(prefix="step_s_") if step is not None else {}


ALPHA_BETA_FIELDS = (
    "allreduce_alpha_s",
    "allreduce_beta_bytes_per_s",
    "allreduce_model_s",
    "allreduce_probe_bytes",
    "allreduce_probe_s",
)


def _timings(ranks: Sequence[dict[str, Any]], global_batch: int, world_size: int) -> dict[str, Any]:
    slowest = max(ranks, key=lambda r: r["step_s"].median)
    step = slowest["step_s"]
    compute = max(r["compute_s_median"] for r in ranks)
    reduce = max(r["allreduce_s_median"] for r in ranks)
    out: dict[str, Any] = {
        **step.as_dict(prefix="step_s_"),
        "forward_s_median": summarize(slowest["samples_s"]["forward"]).median,
        "backward_s_median": summarize(slowest["samples_s"]["backward"]).median,
        "optimizer_s_median": slowest["optimizer_s_median"],
        "samples_per_s": global_batch / step.median,
        "noisy": step.noisy,
        "parameters": slowest["parameters"],
        # per process, so that peak_fraction compares one device with its own peak
        "flops_per_step": slowest["flops_per_step"],
        "achieved_flops": slowest["flops_per_step"] / step.median,
        "compute_s_median": compute,
        "comm_overhead_s": max(0.0, step.median - compute),
        "allreduce_s_median": reduce,
        "allreduce_bytes": slowest["allreduce_bytes"],
        "buckets": slowest["buckets"],
        "allreduce_busbw_bytes_per_s": (
            slowest["allreduce_bytes"] / reduce * 2 * (world_size - 1) / world_size
        ),
        # the alpha-beta model of the same buckets, fitted from single all-reduces
        **{k: slowest[k] for k in ALPHA_BETA_FIELDS if k in slowest},
        "params_identical": len({r["param_digest"] for r in ranks}) == 1,
        # load imbalance: how far the fastest rank's own compute (no_sync forward + backward
        # + optimizer) is ahead of the slowest one's (the synchronised steps are in lockstep)
        "step_imbalance": 1.0 - min(r["compute_s_median"] for r in ranks) / compute,
        "samples_s": slowest["samples_s"],
    }
    if all("epoch_s" in r for r in ranks):
        epoch = max(r["epoch_s"] for r in ranks)
        samples = ranks[0]["epoch_samples"]
        out.update(
            epoch_s=epoch,
            epoch_samples=samples,
            epoch_samples_per_s=samples / epoch,
            epoch_data_wait_s=max(r["epoch_data_wait_s"] for r in ranks),
            epoch_steps=ranks[0]["epoch_steps"],
        )
        out["data_bound"] = data_bound(out)  # the rank that waited longest on data
    return out


def baseline_config(cfg: BenchConfig, device: str, rank_threads: int) -> BenchConfig:
    """The world-size-1 reference of `cfg` on `device`: on CPU with the threads each rank
    has (`rank_threads`), so that the speed-up compares like with like. (A reference with
    every core against ranks of one thread each gave efficiencies of 388-4408%.)"""
    cfg = cfg.with_workload(device=device)
    if cfg.workload.threads is None and torch.device(device).type == "cpu":
        cfg = cfg.with_workload(threads=rank_threads)
    return cfg


# What a world-size-1 record is the reference of (its "reference" field).
RANK_THREADS = "rank threads"  # the threads of one rank: the reference of the efficiency
WHOLE = "whole machine"  # every core this process may use: what one process could do alone


def whole_machine_config(cfg: BenchConfig, dist: DistContext) -> BenchConfig | None:
    """The 1-process run of `cfg` with every core this process may use, when that is more
    than a rank's share (CPU, threads not fixed by the user); else None. It answers "would
    one process with all the cores beat the ranks?", which the efficiency does not."""
    if torch.device(cfg.workload.device).type != "cpu" or cfg.workload.threads is not None:
        return None
    cores = allowed_cores()
    if cores <= threads_per_rank(dist):
        return None
    return cfg.with_workload(threads=cores)


def ddp_configs(configs: Sequence[BenchConfig], dist: DistContext) -> list[BenchConfig]:
    """The configurations measured with DDP: one per threads x filters x batch size (in
    sweep order), on the process group's device type."""
    unique: dict[tuple, BenchConfig] = {}
    for cfg in configs:
        unique.setdefault(_group(cfg), cfg.with_workload(device=dist.device.type))
    return list(unique.values())


def _group(cfg: BenchConfig) -> tuple:
    w = cfg.workload
    return (w.threads, w.filters, w.batch_size)


NO_CACHED_CHOICE = (
    "under a launcher: the device's table; no tuning pass cached one rank's workload on rank "
    "0's host (run that workload in one process first: lungbench bench --batch B --threads T)"
)


def agreed_tuning(
    cfg: BenchConfig, per_rank: int, info: StoreInfo, dist: DistContext, options: DDPOptions
) -> tuple[BenchConfig, dict[str, Any]]:
    """`cfg` with its "auto" switches set to what a 1-process tuning pass cached on rank 0's
    host for one rank's workload (its batch and threads), the same on every rank (rank 0
    says; no rank stops to tune), and the record fields saying so; without such a choice,
    or with --no-tune, the device's table. So a DDP step runs what one process of the same
    workload measured fastest, and a prediction made from that process holds for it."""
    if not options.cached_tuning:
        return cfg, untuned("--no-tune: the device's table (lungbench.step)")
    if not has_auto(cfg.switches):
        return cfg, {}
    fast, fields = agreed_choice(cfg.workload, per_rank, dist, list(info.inputs.values()))
    return (cfg if fast is None else replace(cfg, fast=fast)), fields


def agreed_choice(
    workload: Workload,
    per_rank: int,
    dist: DistContext,
    shapes: Sequence[tuple[int, ...]] | None = None,
) -> tuple[Switches | None, dict[str, Any]]:
    """The switches a 1-process tuning pass cached on rank 0's host for one rank's workload
    (`per_rank` samples, its threads per rank), the same on every rank (rank 0 reads, all
    take its answer), and the record fields saying so; (None, fields saying why) without
    such a choice: the device's table. `lungbench bench` and `lungbench profile` under a
    launcher both take it, so they run the step one process measured fastest."""
    found = None
    if dist.is_main:
        threads = rank_threads(workload, dist) if dist.device.type == "cpu" else workload.threads
        rank_workload = replace(workload, batch_size=per_rank, threads=threads)
        tuning = cached_tuning(rank_workload, dist.device, shapes)
        found = tuning and (asdict(tuning.switches), tuning.record())
    chosen = all_gather(dist, found, "agreeing on the tuned switches")[0]
    if chosen is None:
        return None, untuned(NO_CACHED_CHOICE)
    switches, fields = chosen
    return Switches(**switches), {**fields, "tuning_source": "cache, rank 0"}


def alone_tuning(
    cfg: BenchConfig, info: StoreInfo, dist: DistContext, options: DDPOptions
) -> tuple[BenchConfig, dict[str, Any]]:
    """agreed_tuning for a 1-process reference rank 0 measures while the others wait."""
    alone = single_process(dist.device)
    return agreed_tuning(cfg, cfg.workload.batch_size, info, alone, options)


def run_ddp_sweep(
    configs: Sequence[BenchConfig],
    info: StoreInfo,
    dist: DistContext,
    options: DDPOptions,
    on_record: Callable[[dict[str, Any]], None],
    progress: Callable[[str], None] | None = None,
    monitor: Callable[..., dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """Every rank calls this. Rank 0 gets every record (baseline and DDP) via `on_record`
    and in the returned list; the other ranks get an empty list. `monitor` (rank 0's
    lungbench.measure.telemetry.SweepMonitor) samples rank 0's GPU and CPU around each measurement."""
    dataset = StoreDataset(info.path)
    indices = train_split(info, dataset.labels, seed=configs[0].workload.seed if configs else 0)
    records: list[dict[str, Any]] = []

    def emit(record: dict[str, Any]) -> None:
        on_record(record)
        records.append(record)

    def measured(cfg: BenchConfig, run: Callable[[], dict[str, Any]], **kw: Any) -> dict:
        """run() itself, under rank 0's telemetry monitor when there is one."""
        return monitor(cfg, run, **kw) if monitor is not None and dist.is_main else run()

    for cfg in ddp_configs(configs, dist):
        if options.baseline:
            same = [c for c in configs if _group(c) == _group(cfg)]
            if dist.is_main:
                for c in same:
                    if progress:
                        w = c.workload
                        progress(f"1 process {w.device} f{w.filters} b{w.batch_size}")
                    one = baseline_config(c, c.workload.device, threads_per_rank(dist))
                    one, chosen = alone_tuning(one, info, dist, options)
                    run = partial(baseline_record, one, info, dataset, indices)
                    emit(measured(one, run) | chosen)
                    whole = whole_machine_config(c, dist)
                    if whole is not None:  # labelled: not the reference of the efficiency
                        whole, chosen = alone_tuning(whole, info, dist, options)
                        run = partial(baseline_record, whole, info, dataset, indices, WHOLE)
                        emit(measured(whole, run) | chosen)
            barrier(
                dist,
                "waiting for rank 0's 1-process baseline (raise --dist-timeout or "
                "use --no-baseline)",
            )
        for scaling in options.scaling:
            if progress and dist.is_main:
                w = cfg.workload
                progress(f"DDP x{dist.world_size} {scaling} f{w.filters} b{w.batch_size}")
            per_rank, why = split_batch(scaling, cfg.workload.batch_size, dist.world_size)
            if per_rank is None:
                if dist.is_main:
                    emit(
                        {**base_record(cfg, scaling, None, dist), "status": "skipped", "error": why}
                    )
                continue
            refused = _memory_refusal(cfg, per_rank, list(info.inputs.values()), dist)
            if refused is not None:
                if dist.is_main:
                    record = base_record(cfg, scaling, per_rank, dist)
                    emit({**record, "status": "oom", "error": refused, "memory_refused": True})
                continue
            ready, chosen = agreed_tuning(cfg, per_rank, info, dist, options)
            ddp = partial(ddp_record, ready, scaling, per_rank, info, dataset, indices, dist)
            record = measured(ready, ddp, device=str(dist.device), per_sample=False)
            if dist.is_main:
                emit(record | chosen)
    return records


def _memory_refusal(
    cfg: BenchConfig, per_rank: int, shapes: list[tuple[int, ...]], dist: DistContext
) -> str | None:
    """Why a rank's step cannot fit in its device's memory, or None; every rank learns the
    same answer (a rank that measured alone would wait for the others forever)."""
    rank_workload = replace(cfg.workload, batch_size=per_rank, device=str(dist.device))
    why = memory_refusal(rank_workload, shapes)
    reasons = [r for r in all_gather(dist, why, "checking the ranks' memory") if r]
    return f"refused before running: rank memory: {reasons[0]}" if reasons else None


def ddp_record(
    cfg: BenchConfig,
    scaling: str,
    per_rank: int,
    info: StoreInfo,
    dataset: StoreDataset,
    indices: np.ndarray,
    dist: DistContext,
) -> dict[str, Any]:
    """Every rank measures its part; rank 0 gets the combined record (the others: {})."""
    mine = measure_rank(cfg, scaling, per_rank, info, dataset, indices, dist)
    ranks = gather_records(dist, mine, f"gathering DDP {scaling} results")
    return combine_ranks(cfg, scaling, per_rank, dist, ranks) if dist.is_main else {}


def baseline_record(
    cfg: BenchConfig,
    info: StoreInfo,
    dataset: StoreDataset,
    indices: np.ndarray,
    reference: str = RANK_THREADS,
) -> dict[str, Any]:
    """The sweep's measure in this process (or its refusal when it cannot fit in memory),
    labelled as world size 1."""
    shapes = list(info.inputs.values())
    record = refused_for_memory(cfg, shapes) or measure(cfg, info, dataset, indices)
    record.update(
        scaling="none",
        world_size=1,
        nodes=1,
        backend="none",
        launcher="none",
        per_rank_batch=cfg.workload.batch_size,
        global_batch=cfg.workload.batch_size,
        reference=reference,
    )
    return record
