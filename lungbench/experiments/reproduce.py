"""Layer 11 (experiments): `lungbench reproduce`: every twin of the seeds' experiments in one resumable run, ending in one report.

A twin is lungbench's version of one published experiment:

    speedup         seed 000  CPU (vs GPU) speed-up table                 lungbench bench
    lidc-pretrain   seed 000  LIDC pre-training: best epoch, accuracy, AUC  train lidc-pretrain
    lungx-cv        seed 000  LUNGx 3-fold CV: AUC and confusion tables     train lungx-cv
    mosmed          seed 002  MosMed 3D CNN and its six modifications       train mosmed
    chestxray       seed 004  methods x weights, transfer and cost tables   train chestxray
    nodule2d        seed 001  2D nodule crops: LR finder, one-cycle, TTA, Grad-CAM  train nodule2d

Each runs at its --quick size (minutes on a laptop, generated data) or its full size, into
a run folder inside the reproduction's own folder (lungx-cv fine-tunes lidc-pretrain's
checkpoint when that twin ran, as in the thesis). Then one report (lungbench.report.combined)
lists the twins and shows, for each, its tables beside the published ones.

    results/<run-id>/
        run.json, config.json, environment.json   the reproduction (kind "reproduce")
        reproduce.json      the state: each twin's run folder, status, wall time, estimate
        tables/twins.csv    one row per twin (also .md)
        <twin>/             each twin's own run folder (RUN/speedup, RUN/lidc-pretrain, ...)
        report.html, report.md

Resuming (`lungbench reproduce --resume RUN`): twins whose run is complete are skipped; an
interrupted or failed one continues in its folder (each recipe resumes: finished folds and
fits are kept, lungbench.experiments.resumable; bench measures only what it lacks) or,
when its folder cannot be continued, starts again in a new one.

Time estimate (before anything runs): per twin, the median wall time of its last 5 runs of
the same size on this host and device, with their spread (kept in
$LUNGBENCH_CACHE_DIR/reproduce_times.json after every twin that completes), else the table
QUICK_SECONDS measured on the 2-core development VM; a full-size twin without a time of its
own is its quick time (data, set-up, evaluation) plus its full training's FLOPs (training
samples passed x FLOPs per sample, FULL_GFLOP) at TRAIN_GFLOPS, the rate a training step of
that network sustained on that VM. On a GPU it takes far less.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from lungbench.core.cache import (
    measured_number,
    read_cache,
    register_schema,
    where_key,
    write_cache,
)
from lungbench.core.errors import DataError, LungbenchError, UsageError, look_up_option
from lungbench.core.options import config_from_dict, flat_values, replaced
from lungbench.core.paths import check_name
from lungbench.core.runlock import held_unless_failed
from lungbench.core.runs import (
    RUN_FILE,
    create_run_dir,
    finish_run,
    markdown,
    marking_run,
    read_json,
    utc_now,
    write_json,
    write_table,
)
from lungbench.harness.sweep_state import (
    mark_resumed,
    resolve_run_dir,
    stop_on_sigterm,
)
from lungbench.train.engine import TrainingInterrupted

log = logging.getLogger(__name__)  # progress: the CLI shows it on stderr

NAME = "reproduce"
STATE_FILE = "reproduce.json"
TIMES_CACHE = "reproduce_times.json"


KEPT_TIMES = 5  # the wall times a twin keeps per host, size and device: the estimate's spread


def _times_entry(entry: Any) -> bool:
    """A twin's wall times here: {"wall_s": the last, seconds > 0, "utc": text, "runs": the
    last KEPT_TIMES, each > 0 (absent in caches written before lungbench kept them)}."""
    runs = entry.get("runs", []) if isinstance(entry, dict) else None
    return (
        isinstance(entry, dict)
        and measured_number(entry.get("wall_s"))
        and isinstance(entry.get("utc", ""), str)
        and isinstance(runs, list)
        and all(measured_number(r) for r in runs)
    )


register_schema(TIMES_CACHE, _times_entry)

# Wall seconds of each twin's --quick run inside `lungbench reproduce --quick` (59 s in all
# with start-up and report), measured on the 2-core development VM (AMD EPYC, torch 2.13.0
# CPU) when it was quiet: the estimate when this host has no time of its own. The same VM
# shared with other jobs (load 3-6) took 5 to 10 times as long.
QUICK_SECONDS: dict[str, float] = {
    "speedup": 9.0,
    "lidc-pretrain": 5.0,
    "lungx-cv": 5.0,
    "mosmed": 4.0,
    "chestxray": 8.0,
    "nodule2d": 17.0,
}
# GFLOPs of one training sample at full size (forward + backward, torch's FlopCounterMode):
# dualpath3d filters 8 depth 4 on the 32^3 grids (quick: filters 4 depth 3, 0.092), the
# MosMed CNN at 64x128x128 with Keras's widths (quick: 16x32x32, 0.043), ResNet50 at 64 px
# (quick: ResNet18 at 32 px 0.21, at 64 px 0.84).
FULL_GFLOP: dict[str, float] = {
    "lidc-pretrain": 0.354,
    "lungx-cv": 0.354,
    "mosmed": 94.0,
    "chestxray": 1.96,
    "nodule2d": 1.96,
}
# Training GFLOP/s of each full-size network's FP32 step on the quiet 2-core VM (Adam, batch
# 16; the MosMed CNN batch 2): dualpath3d 34, the MosMed CNN 64, ResNet50 at 64 px 104.
TRAIN_GFLOPS: dict[str, float] = {
    "lidc-pretrain": 34.0,
    "lungx-cv": 34.0,
    "mosmed": 64.0,
    "chestxray": 104.0,
    "nodule2d": 104.0,
}
# The speed-up sweep at full size (6 configurations, a whole 603-sample epoch each, the
# 754-nodule set generated) took 92 s on the development VM (README).
SPEEDUP_FULL_SECONDS = 92.0


def _speedup_request(quick: bool, device: str, out: Path, run_id: str):
    """The speed-up sweep: the thesis's table at full size (filters 8, 16 x batch 2, 4, 8,
    one whole epoch each), one configuration at quick size; CPU, and CUDA beside it when
    --device cuda (the thesis's CPU vs GPU layout)."""
    from lungbench.experiments.speedup import BenchRequest

    devices = ("cpu", "cuda") if device.startswith("cuda") else ("cpu",)
    sizes: dict[str, Any] = {}
    if quick:  # one configuration, a short epoch, no tuning pass
        sizes = {
            "filters": (8,),
            "batch_sizes": (2,),
            "repeats": 5,
            "warmup": 2,
            "epoch_samples": 32,
            "synth_n": 64,
            "tune": False,
        }
    return BenchRequest(devices=devices, out=out, run_id=run_id, **sizes)


@dataclass(frozen=True)
class TwinContext:
    """What a twin runs with: the size, device, where its run folder goes (OUT/RUN-ID), the
    stopped run folder it continues (None: a new run) and the run folders of the twins that
    completed before it in this reproduction."""

    quick: bool
    device: str
    out: Path
    run_id: str
    resume: Path | None = None
    done: Mapping[str, Path] = field(default_factory=dict)


@dataclass(frozen=True)
class Twin:
    """One experiment of the seeds and how lungbench runs it."""

    name: str
    seed: str
    what: str
    run: Callable[[TwinContext], Path]  # runs (or continues) it; returns its run folder
    passes: Callable[[bool], float]  # training samples passed, at quick (True) or full size


def _recipe_config(module, ctx: TwinContext):
    """The recipe's config at the context's size (its QUICK or its FULL) on its device."""
    return replaced(module.QUICK if ctx.quick else module.FULL, {"device": ctx.device})


def _point(ctx: TwinContext, recipe: str):
    from lungbench.experiments.resumable import open_resume

    return open_resume(ctx.resume, ctx.out, recipe) if ctx.resume is not None else None


def _run_recipe(ctx: TwinContext, recipe, cls, saved_as: str = "config") -> Path:
    """Run `recipe` with config `cls`: the saved one when resuming (config.json's
    `saved_as` entry), else the recipe's at the context's size."""
    point = _point(ctx, recipe.NAME)
    if point is not None:
        cfg = config_from_dict(cls, point.config[saved_as])
    else:
        cfg = _recipe_config(recipe, ctx)
    return recipe.run(cfg, ctx.out, ctx.run_id, resume=point).run_dir


def _run_speedup(ctx: TwinContext) -> Path:
    from lungbench.experiments.speedup import run_bench
    from lungbench.harness.sweep_state import open_for_resume, resumed_request

    request = _speedup_request(ctx.quick, ctx.device, ctx.out, ctx.run_id)
    point = open_for_resume(ctx.resume, ctx.out) if ctx.resume is not None else None
    if point is not None:
        request = resumed_request(point, request, request)
    return run_bench(request, resume=point).run_dir


def _run_lidc(ctx: TwinContext) -> Path:
    from lungbench.experiments import lidc_pretrain as recipe

    return _run_recipe(ctx, recipe, recipe.PretrainConfig)


def _run_lungx(ctx: TwinContext) -> Path:
    from lungbench.experiments import lungx_cv as recipe

    point = _point(ctx, recipe.NAME)
    if point is not None:
        cfg = config_from_dict(recipe.CVConfig, point.config["config"])
    else:
        cfg = _recipe_config(recipe, ctx)
        lidc = ctx.done.get("lidc-pretrain")
        best = lidc / "checkpoint_best.pt" if lidc is not None else None
        if best is not None and best.is_file():  # the thesis: fine-tune the LIDC model
            cfg = replace(cfg, pretrained=str(best))
    return recipe.run(cfg, ctx.out, ctx.run_id, resume=point).run_dir


def _run_mosmed(ctx: TwinContext) -> Path:
    from lungbench.experiments import mosmed as recipe

    return _run_recipe(ctx, recipe, recipe.MosmedConfig)


def _run_chestxray(ctx: TwinContext) -> Path:
    from lungbench.experiments import chestxray as recipe

    return _run_recipe(ctx, recipe, recipe.ChestXrayConfig, saved_as=recipe.NAME)


def _run_nodule2d(ctx: TwinContext) -> Path:
    from lungbench.experiments import nodule2d as recipe

    return _run_recipe(ctx, recipe, recipe.Nodule2DConfig, saved_as=recipe.NAME)


# ----------------------------------------------------------------------------- work ratios


def _sizes(module_name: str, quick: bool) -> dict[str, Any]:
    import importlib

    module = importlib.import_module(f"lungbench.experiments.{module_name}")
    return flat_values(module.QUICK if quick else module.FULL)


def _passes_lidc(quick: bool) -> float:
    s = _sizes("lidc_pretrain", quick)
    return s["epochs"] * s["synth_n"] * 0.8


def _passes_lungx(quick: bool) -> float:
    s = _sizes("lungx_cv", quick)
    folds = 3
    return folds * 2 * s["epochs"] * s["synth_n"] * (folds - 1) / folds * 0.9


def _passes_mosmed(quick: bool) -> float:
    from lungbench.models.mosmed3d import VARIANTS

    s = _sizes("mosmed", quick)
    return len(VARIANTS) * s["epochs"] * s["synth_n"] * 0.7


def _passes_chestxray(quick: bool) -> float:
    s = _sizes("chestxray", quick)
    folds = s["folds"]
    # A, every B depth (3 at full size, 1 at quick), C for one weights source, then D
    fits = folds * (3 + (1 if quick else 3))
    train = s["n"] * (folds - 1) / folds * 0.9
    return fits * s["epochs"] * train + s["pretrain_epochs"] * s["n"] / 2


def _passes_nodule2d(quick: bool) -> float:
    s = _sizes("nodule2d", quick)
    return s["epochs"] * s["n"] * 0.8 * 2 + s["lr_iters"] * s["batch_size"]


TWINS: dict[str, Twin] = {
    twin.name: twin
    for twin in (
        Twin("speedup", "seed 000", "CPU (vs GPU) speed-up table", _run_speedup, lambda q: 1.0),
        Twin(
            "lidc-pretrain",
            "seed 000",
            "LIDC pre-training: best epoch, accuracy, AUC",
            _run_lidc,
            _passes_lidc,
        ),
        Twin(
            "lungx-cv",
            "seed 000",
            "LUNGx 3-fold CV: AUC and confusion tables",
            _run_lungx,
            _passes_lungx,
        ),
        Twin(
            "mosmed",
            "seed 002",
            "MosMed CT-0 vs CT-2/3: the 3D CNN and its six variants",
            _run_mosmed,
            _passes_mosmed,
        ),
        Twin(
            "chestxray",
            "seed 004",
            "chest X-rays: methods x weights, transfer-learning and cost tables",
            _run_chestxray,
            _passes_chestxray,
        ),
        Twin(
            "nodule2d",
            "seed 001",
            "2D nodule crops: LR finder, one-cycle, TTA, Grad-CAM",
            _run_nodule2d,
            _passes_nodule2d,
        ),
    )
}


def twin_names(names: Sequence[str] | None) -> tuple[str, ...]:
    """The twins asked for (all without `names`), in TWINS order, each checked: an unknown
    name is a UsageError listing the known ones."""
    if not names:
        return tuple(TWINS)
    for name in names:
        look_up_option(name, TWINS, what="twin (--only)")
    return tuple(n for n in TWINS if n in names)


# ----------------------------------------------------------------------------- estimates


@dataclass(frozen=True)
class Estimate:
    """A twin's expected wall time and where the number comes from."""

    twin: str
    seconds: float
    how: str


def _times_key(twin: str, quick: bool, device: str) -> str:
    return f"{where_key(torch.device(device))}|{twin}|{'quick' if quick else 'full'}"


def estimate(twin: str, quick: bool, device: str) -> Estimate:
    """The expected wall time of `twin` (see the module docstring for how)."""
    own = read_cache(TIMES_CACHE).get(_times_key(twin, quick, device))  # checked: _times_entry
    if own is not None:
        return _measured_here(twin, own)
    base = QUICK_SECONDS[twin]
    if quick:
        return Estimate(twin, base, "the development VM's quick time (none measured here yet)")
    if twin == "speedup":
        return Estimate(twin, SPEEDUP_FULL_SECONDS, "the development VM's full time")
    train = TWINS[twin].passes(False) * FULL_GFLOP[twin] / TRAIN_GFLOPS[twin]
    return Estimate(
        twin,
        base + train,
        f"quick time + {TWINS[twin].passes(False):,.0f} sample passes x "
        f"{FULL_GFLOP[twin]:g} GFLOP at {TRAIN_GFLOPS[twin]:g} GFLOP/s",
    )


def _measured_here(twin: str, own: dict[str, Any]) -> Estimate:
    """The median of this host's kept wall times of `twin`, saying how many and how far
    apart they were: how sure the estimate is."""
    runs = [float(r) for r in own.get("runs") or [own["wall_s"]]]
    middle = statistics.median(runs)
    if len(runs) == 1:
        how = f"measured here once ({own.get('utc', '?')}); its spread shows after a second run"
    else:
        spread = (max(runs) - min(runs)) / 2 / middle
        how = (
            f"measured here: median of {len(runs)} runs, {duration(min(runs))} to "
            f"{duration(max(runs))} (+-{spread:.0%})"
        )
    return Estimate(twin, middle, how)


def remember_time(twin: str, quick: bool, device: str, seconds: float) -> None:
    """Keep a completed twin's wall time (its last KEPT_TIMES) for the next estimate on this
    host and device."""
    entries = read_cache(TIMES_CACHE)
    key = _times_key(twin, quick, device)
    runs = [*entries.get(key, {}).get("runs", []), round(seconds, 1)][-KEPT_TIMES:]
    entries[key] = {"wall_s": round(seconds, 1), "utc": utc_now(), "runs": runs}
    write_cache(TIMES_CACHE, entries)


def estimate_table(estimates: Sequence[Estimate]) -> pd.DataFrame:
    """One row per twin: its estimate and how it was made, and the total."""
    rows = [{"twin": e.twin, "estimate": duration(e.seconds), "from": e.how} for e in estimates]
    rows.append(
        {"twin": "total", "estimate": duration(sum(e.seconds for e in estimates)), "from": ""}
    )
    return pd.DataFrame(rows)


HOW_ESTIMATED = (
    "estimate: per twin, the median of its last 5 wall times at this size on this host and "
    "device (with their spread), else the "
    "quick time measured on a quiet 2-core VM (at full size plus the training's FLOPs at the "
    "rate that network's step sustained there); a busy machine takes several times longer, "
    "a GPU far less"
)


def duration(seconds: float) -> str:
    """'45 s', '3 min 20 s', '2 h 05 min', '3.1 days'."""
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{int(seconds // 60)} min {int(seconds % 60):02d} s"
    if seconds < 48 * 3600:
        return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"
    return f"{seconds / 86400:.1f} days"


# ----------------------------------------------------------------------------- the run


@dataclass(frozen=True)
class ReproduceConfig:
    """What the reproduction runs (config.json, and the state file's header)."""

    twins: tuple[str, ...]
    quick: bool = False
    device: str = "cpu"


@dataclass
class TwinState:
    """One twin in the state file: its run folder (relative to the reproduction's), status
    (pending, running, complete, interrupted, failed), wall time, estimate, attempts."""

    run_dir: str | None = None
    status: str = "pending"
    wall_s: float | None = None
    estimate_s: float | None = None
    attempts: int = 0
    error: str | None = None


@dataclass
class Plan:
    """A reproduction about to run: its config, folder (None until made) and twins' states."""

    config: ReproduceConfig
    out: Path
    run_id: str | None = None
    run_dir: Path | None = None
    states: dict[str, TwinState] = field(default_factory=dict)
    estimates: list[Estimate] = field(default_factory=list)

    @property
    def pending(self) -> list[str]:
        return [n for n in self.config.twins if self.states[n].status != "complete"]


def plan(
    twins: Sequence[str] | None,
    quick: bool,
    device: str,
    out: str | Path,
    run_id: str | None = None,
) -> Plan:
    """A new reproduction of `twins` (all without them; unknown names: UsageError) and its
    time estimate; nothing is written."""
    from lungbench.core.device import parse_device
    from lungbench.core.paths import check_out_dir

    names = twin_names(twins)
    parse_device(device)
    check_out_dir(Path(out))
    if run_id is not None:
        check_name(run_id, "--run-id")
    config = ReproduceConfig(names, quick, device)
    estimates = [estimate(n, quick, device) for n in names]
    states = {e.twin: TwinState(estimate_s=e.seconds) for e in estimates}
    return Plan(config, Path(out), run_id, None, states, estimates)


def plan_resume(run: str | Path, out: str | Path) -> Plan:
    """The reproduction in run folder RUN (or run id under OUT), to continue: its twins,
    size and device as saved, the twins still to run with new estimates."""
    run_dir = resolve_run_dir(run, out)
    with held_unless_failed(run_dir):  # one writer: a second --resume is refused
        return _resume_plan(run, run_dir)


def _resume_plan(run: str | Path, run_dir: Path) -> Plan:
    try:
        info = read_json(run_dir / RUN_FILE)
        state = read_json(run_dir / STATE_FILE)
        if not isinstance(state, dict) or not isinstance(state.get("twins"), dict):
            raise TypeError("needs an object with 'config' and 'twins' objects")
        config = _saved_config(state["config"])
        states = {n: _twin_state(state["twins"].get(n, {})) for n in config.twins}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise DataError(f"{run_dir}: not a readable reproduction ({STATE_FILE}: {exc})") from None
    kind = info.get("kind") if isinstance(info, dict) else None
    if kind != NAME:
        raise UsageError(f"--resume {run}: a {kind!r} run, not a reproduction")
    twin_names(config.twins)  # a state file naming twins this version does not know
    for name, twin_state in states.items():
        check_twin_folder(run_dir, name, twin_state.run_dir)
    result = Plan(config, run_dir.parent, run_dir.name, run_dir, states)
    for name in result.pending:
        result.estimates.append(estimate(name, config.quick, config.device))
        states[name].estimate_s = result.estimates[-1].seconds
    return result


@dataclass
class ReproduceRun:
    """What a reproduction produced."""

    run_dir: Path
    table: pd.DataFrame  # one row per twin
    report_html: Path
    report_md: Path
    warnings: tuple[str, ...]
    failed: list[str]


def reproduce(p: Plan) -> ReproduceRun:
    """Run the plan's pending twins one after another into its folder (made now for a new
    plan), keeping the state file current, then write the combined report. A twin that
    fails is recorded (its error) and the others still run; Ctrl-C or SIGTERM stops the
    whole reproduction ("interrupted", the state and a report of what finished written),
    and `plan_resume` continues it."""
    resumed = p.run_dir is not None
    if p.run_dir is None:
        p.run_dir = create_run_dir(p.out, NAME, p.run_id)
        write_json(p.run_dir / "config.json", asdict(p.config))
        from lungbench.core.environment import environment_record

        write_json(p.run_dir / "environment.json", environment_record())
    else:
        mark_resumed(p.run_dir)
    run_dir = p.run_dir
    _save_state(p)
    started = time.perf_counter()
    with (
        stop_on_sigterm(),
        marking_run(
            run_dir,
            interrupted_by=(TrainingInterrupted, KeyboardInterrupt),
            on_interrupt=lambda: _report_after_stop(p),
        ),
    ):
        done = {
            n: run_dir / s.run_dir
            for n, s in p.states.items()
            if s.status == "complete" and s.run_dir
        }
        pending = p.pending
        left = sum(p.states[n].estimate_s or 0.0 for n in pending)
        if resumed:
            log.info(
                f"resuming {run_dir}: {len(p.config.twins) - len(pending)} of "
                f"{len(p.config.twins)} twins complete"
            )
        for i, name in enumerate(pending, start=1):
            state = p.states[name]
            log.info(
                f"[{i}/{len(pending)}] {name} ({TWINS[name].seed}: {TWINS[name].what}), "
                f"{'quick' if p.config.quick else 'full size'}: about "
                f"{duration(state.estimate_s or 0)} ({duration(left)} left in all)"
            )
            path = _run_twin(p, name, done)
            if p.states[name].status == "complete":
                done[name] = path
            left -= state.estimate_s or 0.0
        wall = time.perf_counter() - started
        files, table = _report(p)
    failed = [n for n in p.config.twins if p.states[n].status != "complete"]
    finish_run(run_dir, "complete", wall_s=wall, failed=failed)
    return ReproduceRun(run_dir, table, files.html, files.markdown, files.warnings, failed)


_STATE_TYPES = {
    "run_dir": (str, type(None)),
    "status": (str,),
    "wall_s": (int, float, type(None)),
    "estimate_s": (int, float, type(None)),
    "attempts": (int,),
    "error": (str, type(None)),
}


def _saved_config(data: Any) -> ReproduceConfig:
    """reproduce.json's "config", its types checked (TypeError / ValueError name the field)."""
    if not isinstance(data, dict):
        raise TypeError(f"config is {type(data).__name__}, not an object")
    twins, quick, device = data["twins"], data["quick"], data["device"]
    if not isinstance(twins, list) or not all(isinstance(t, str) for t in twins):
        raise TypeError(f"config.twins is {twins!r}, not a list of twin names")
    unknown = [t for t in twins if t not in TWINS]
    if unknown:
        raise ValueError(f"config.twins: unknown twin {unknown[0]!r}; known: {', '.join(TWINS)}")
    if not isinstance(quick, bool):
        raise TypeError(f"config.quick is {quick!r}, not true or false")
    if not isinstance(device, str):
        raise TypeError(f"config.device is {device!r}, not a device name")
    from lungbench.core.device import parse_device

    try:
        parse_device(device)
    except UsageError as exc:
        raise ValueError(f"config.device: {exc}") from None
    return ReproduceConfig(tuple(twins), quick, device)


def _twin_state(data: Mapping[str, Any]) -> TwinState:
    """A twin's entry of reproduce.json, its fields' types checked (TypeError names one)."""
    if not isinstance(data, Mapping):
        raise TypeError(f"a twin's entry is {type(data).__name__}, not an object")
    for key, value in data.items():
        if key not in _STATE_TYPES:
            raise TypeError(
                f"unknown field {key!r} in a twin's entry; known: {', '.join(_STATE_TYPES)}"
            )
        if not isinstance(value, _STATE_TYPES[key]) or isinstance(value, bool):
            raise TypeError(f"field {key!r} is {value!r}")
        if isinstance(value, float) and not (math.isfinite(value) and value >= 0):
            raise ValueError(f"field {key!r} is {value!r}, not a finite number >= 0")
        if key == "attempts" and value < 0:
            raise ValueError(f"field 'attempts' is {value!r}, not a count")
    return TwinState(**data)


def check_twin_folder(run_dir: Path, twin: str, folder: Any) -> None:
    """DataError naming reproduce.json unless a twin's saved run folder is a name or path
    that resolves inside the reproduction's folder (the state file is a file anyone can
    edit: '../../elsewhere' would make --resume write records outside it)."""
    if folder is None:
        return
    where = f"{run_dir / STATE_FILE}: twin {twin!r} run_dir {folder!r}"
    if not isinstance(folder, str) or not folder or "\0" in folder:
        raise DataError(f"{where}: not a folder name")
    base = run_dir.resolve()
    target = (base / folder).resolve()
    if base not in target.parents:
        raise DataError(f"{where}: lies outside the reproduction folder {run_dir}; refused")


def _run_twin(p: Plan, name: str, done: Mapping[str, Path]) -> Path | None:
    """Run (or continue) one twin, keeping its state current; returns its run folder."""
    state, twin = p.states[name], TWINS[name]
    run_dir = p.run_dir
    resume = _resumable(run_dir, state)
    if resume is not None and _status(resume) == "complete":  # finished just before a kill
        state.status = "complete"
        _save_state(p)
        return resume
    if resume is None:
        state.run_dir = _fresh_id(run_dir, name)
    state.status, state.attempts, state.error = "running", state.attempts + 1, None
    _save_state(p)
    ctx = TwinContext(p.config.quick, p.config.device, run_dir, state.run_dir, resume, dict(done))
    tick = time.perf_counter()
    try:
        try:
            path = twin.run(ctx)
        except (UsageError, DataError) as exc:
            if resume is None:
                raise
            # a folder that cannot be continued (torn before its config was written, say)
            log.warning(f"{name}: cannot continue {resume} ({exc}); starting it again")
            state.run_dir = _fresh_id(run_dir, name)
            _save_state(p)
            path = twin.run(
                TwinContext(
                    p.config.quick, p.config.device, run_dir, state.run_dir, None, dict(done)
                )
            )
    except (TrainingInterrupted, KeyboardInterrupt):
        state.status, state.wall_s = "interrupted", _add(state.wall_s, time.perf_counter() - tick)
        _save_state(p)
        raise
    except Exception as exc:  # one twin failing does not stop the others
        state.status, state.error = (
            "failed",
            str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__,
        )
        state.wall_s = _add(state.wall_s, time.perf_counter() - tick)
        _save_state(p)
        log.warning(f"{name}: failed: {state.error}")
        if not isinstance(exc, LungbenchError):
            log.debug("traceback", exc_info=True)
        return None
    seconds = time.perf_counter() - tick
    state.status, state.wall_s = "complete", _add(state.wall_s, seconds)
    state.run_dir = path.name if path.parent == run_dir else str(path)
    _save_state(p)
    if resume is None:  # a whole run, not the rest of one: the next estimate's time
        remember_time(name, p.config.quick, p.config.device, seconds)
    log.info(
        f"{name}: complete in {duration(seconds)} (estimated {duration(state.estimate_s or 0)})"
    )
    return path


def _add(total: float | None, seconds: float) -> float:
    return round((total or 0.0) + seconds, 1)


def _resumable(run_dir: Path, state: TwinState) -> Path | None:
    """The twin's run folder from an earlier attempt, when there is one."""
    if state.run_dir and (run_dir / state.run_dir / RUN_FILE).is_file():
        return run_dir / state.run_dir
    return None


def _status(path: Path) -> str:
    try:
        return str(read_json(path / RUN_FILE).get("status"))
    except (OSError, ValueError, AttributeError):
        return "unknown"


def _fresh_id(run_dir: Path, name: str) -> str:
    """NAME, or NAME-2, NAME-3, ... when an earlier attempt left a folder of that name."""
    candidate, n = name, 1
    while (run_dir / candidate).exists():
        n += 1
        candidate = f"{name}-{n}"
    return candidate


def _save_state(p: Plan) -> None:
    write_json(
        p.run_dir / STATE_FILE,
        {
            "config": asdict(p.config),
            "updated_utc": utc_now(),
            "twins": {n: asdict(s) for n, s in p.states.items()},
        },
    )


def twins_table(p: Plan) -> pd.DataFrame:
    """One row per twin: seed, what, status, wall time, estimate, run folder."""
    rows = []
    for name in p.config.twins:
        s, twin = p.states[name], TWINS[name]
        rows.append(
            {
                "twin": name,
                "seed": twin.seed,
                "what": twin.what,
                "status": s.status + (f": {s.error}" if s.error else ""),
                "wall time": duration(s.wall_s) if s.wall_s is not None else "",
                "estimate": duration(s.estimate_s) if s.estimate_s is not None else "",
                "run folder": s.run_dir or "",
            }
        )
    return pd.DataFrame(rows)


def _report(p: Plan):
    """The combined report of every twin that has a run folder, with the published tables
    beside ours, and a column saying how many stand beside each twin's."""
    from lungbench.report.combined import Chapter, published_counts, write_combined_report
    from lungbench.report.reference import default_reference_dir, load_references

    references = load_references(default_reference_dir())
    table = twins_table(p)
    chapters, beside = [], []
    for name in p.config.twins:
        s, twin = p.states[name], TWINS[name]
        folder = p.run_dir / s.run_dir if s.run_dir else None
        folder = folder if folder is not None and (folder / RUN_FILE).is_file() else None
        shown, total, names = published_counts(folder, references)
        beside.append(f"{shown} of {total}" + (f" ({names})" if names else "") if total else "none")
        wall = f", {duration(s.wall_s)}" if s.wall_s is not None else ""
        chapters.append(
            Chapter(
                name,
                f"{twin.seed}, {twin.what}",
                folder,
                f"{s.status}{wall}; run folder {s.run_dir}",
            )
        )
    table["published tables beside ours"] = beside
    write_table(p.run_dir, "twins", table, index=False)
    size = "quick" if p.config.quick else "full size"
    title = f"lungbench reproduce ({size}, {p.config.device}): {p.run_dir.name}"
    return write_combined_report(title, table, chapters, p.run_dir), table


def _report_after_stop(p: Plan) -> None:
    """After Ctrl-C / SIGTERM: the state is saved; a report of what finished (never raises)."""
    try:
        _report(p)
    except Exception as exc:  # the stop is what to report, not this
        log.warning(f"could not write the report of what finished: {exc}")
    log.info(f"interrupted: continue with `lungbench reproduce --resume {p.run_dir}`")


def summary_text(result: ReproduceRun) -> str:
    """The twins table as Markdown."""
    return markdown(result.table, index=False)
