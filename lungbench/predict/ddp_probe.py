"""Layer 8 (predict): what a 2-rank DDP step on this machine's CPU loses beyond its
all-reduce, measured once per host with a tiny model.

On a CPU the Gloo thread that all-reduces a bucket during the backward pass has to wait for
a core the ranks' compute threads hold; with the ranks' skew and DDP's hooks, a step loses
milliseconds even when its all-reduce alone takes a fraction of one (the dev box: 3.6 ms
for a 46 KB gradient whose isolated all-reduce took 0.37 ms). That cost depends on the model
too (f8 b2 lost 7.7 ms where this tiny model lost 4.5), so a prediction of ranks on this
machine measures the target's own DDP step side by side (rank_share); this per-host figure
on the smallest workload (the dey2018 preset at 2 filters, 2 samples per rank) is the
fallback, added to the all-reduce model when that measurement fails or comes out no slower
than the ranks' compute:

    overhead = DDP step - the slower rank's compute (no_sync) - the all-reduce model

    records = run_ddp_bench(DDPRun(Workload(filters=8, batch_size=4, threads=1)), launch)
    ddp_overhead_s(launch)                                                 # cached per host

`launch` starts `lungbench bench` (lungbench.commands._launch.bench_subprocess).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from lungbench.core.cache import measured_number, read_cache, register_schema, write_cache
from lungbench.core.options import declared_option
from lungbench.measure.workload import Protocol, Workload
from lungbench.predict.comm import gloo_host_key

log = logging.getLogger(__name__)

CACHE_FILE = "ddp_overhead.json"
# an overhead in seconds: finite, of either sign (a noisy probe can give 0 or less; the
# caller says so rather than adding it)
register_schema(
    CACHE_FILE,
    lambda entry: (
        measured_number(abs(entry["overhead_s"]), zero=True)
        and isinstance(entry.get("probe", ""), str)
    ),
)

# How predict starts `lungbench bench` (bench arguments, ranks, run folder's parent) ->
# (ok records, environment). Only the commands may start a `lungbench` process, so they pass
# theirs in (lungbench.commands._launch.bench_subprocess).
BenchLaunch = Callable[[list[str], int, "Path | None"], tuple[list[dict[str, Any]], dict[str, Any]]]


def bench_args(
    workload: Workload,
    protocol: Protocol,
    batches: Sequence[int] = (),
    widths: Sequence[int] = (),
) -> list[str]:
    """The `lungbench bench` options that measure `workload` by `protocol` (with `batches`
    and `widths`: a sweep of those instead of its batch and filters): the one place predict
    spells them."""
    values = {f.name: [getattr(workload, f.name)] for f in fields(Workload)}
    values["batch_size"] = list(batches) or values["batch_size"]
    values["filters"] = list(widths) or values["filters"]
    args = _flags(Workload, values)
    args += _flags(
        Protocol, {"warmup": [protocol.warmup], "epoch_samples": [protocol.epoch_samples]}
    )
    args += ["--repeats", str(protocol.repeats)]  # bench's own: exactly N (None = adaptive)
    return args + ([] if protocol.epoch else ["--no-epoch"])


def _flags(cls: type, values: dict[str, list[Any]]) -> list[str]:
    """Each option of `cls` named in `values`, spelled by its declaration: flag and values
    (a None value: the option left out, its default)."""
    args = []
    for name, given in values.items():
        if None not in given:
            args += [declared_option(cls, name).flag_of(name), *map(str, given)]
    return args


@dataclass(frozen=True)
class DDPRun:
    """One `lungbench bench` under torchrun: 2 CPU ranks, each running `workload` (its
    threads per rank), timed by `protocol`."""

    workload: Workload = Workload(preset="dey2018", filters=2, batch_size=2, threads=1)
    protocol: Protocol = Protocol(warmup=2, repeats=10, epoch=False)
    scaling: str = "weak"
    extra: tuple[str, ...] = ()  # more bench options (--eager-fp32: the validation's switches)

    def describe(self) -> str:
        w = self.workload
        return f"{w.preset} f{w.filters} b{w.batch_size} t{w.threads} x2 ranks"


PROBE = DDPRun()


def run_ddp_bench(
    run: DDPRun, launch: BenchLaunch, out: Path | None = None
) -> list[dict[str, Any]]:
    """The DDP records (world size 2, status ok) of `run`; [] (with a warning) when the
    launch failed."""
    args = [*bench_args(run.workload, run.protocol), "--no-baseline", "--scaling", run.scaling]
    records, _ = launch([*args, *run.extra], 2, out)
    return [r for r in records if r.get("world_size") == 2]


def overhead_of(record: dict[str, Any]) -> float:
    """Seconds a DDP record's step spent beyond its slower rank's compute and the
    all-reduce model (the isolated all-reduce when there is no fit). Not clamped: 0 or
    less is a measurement problem the caller says in words (forecast), not a cost of 0."""
    compute = max(rank["compute_s_median"] for rank in record["ranks"])
    comm = record.get("allreduce_model_s") or record.get("allreduce_s_median") or 0.0
    return record["step_s_median"] - compute - comm


def ddp_overhead_s(launch: BenchLaunch | None, refit: bool = False) -> float | None:
    """This host's DDP overhead (see the module doc), measured once and cached; None when
    it could not be measured. It may come out 0 or negative (a noisy probe): the caller
    says so rather than adding it."""
    entry = None if refit else read_cache(CACHE_FILE).get(gloo_host_key())
    if entry is not None:
        return float(entry["overhead_s"])
    if launch is None:
        log.warning(
            "note: no DDP overhead measured (no launcher given); predictions of several "
            "ranks omit it"
        )
        return None
    log.info(
        f"measuring what a DDP step loses on this machine ({PROBE.describe()}, torchrun; "
        "about 20-60 s, once per host)"
    )
    records = run_ddp_bench(PROBE, launch)
    if not records:
        log.warning("note: no DDP overhead measured; predictions of several ranks omit it")
        return None
    overhead = overhead_of(records[0])
    cache = read_cache(CACHE_FILE)
    cache[gloo_host_key()] = {"overhead_s": overhead, "probe": PROBE.describe()}
    write_cache(CACHE_FILE, cache)
    return overhead
