"""Layer 11 (experiments): A whole `lungbench bench` run: validate, prepare data, sweep, write and publish results.

Everything the user asked for is checked before the run folder is created, so bad input
leaves nothing behind; a run that fails or is interrupted later is marked so in run.json.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import socket
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from lungbench.core.device import parse_device
from lungbench.core.environment import (
    allowed_cores,
    describe_device,
    environment_record,
    provenance,
)
from lungbench.core.errors import DataError, UsageError, look_up_option
from lungbench.core.options import (
    ON_OFF,
    non_negative_int,
    option,
    option_like,
    positive_float,
    positive_int,
)
from lungbench.core.paths import check_name, check_out_dir
from lungbench.core.runs import (
    append_record,
    create_run_dir,
    finish_run,
    marking_run,
    read_records,
    run_folder,
    write_json,
    write_table,
)
from lungbench.data.geometry import GEOMETRY_PRESETS, geometry, preset_mismatch
from lungbench.data.store import StoreInfo, read_info
from lungbench.distributed.group import (
    DistContext,
    all_gather,
    barrier,
)
from lungbench.harness.batch_finder import apply_batch_finder
from lungbench.harness.ddp import DDPOptions, run_ddp_sweep
from lungbench.harness.sweep import (
    TRAIN_FRACTION,
    BenchConfig,
    SweepData,
    default_store_path,
    measure_config,
    refused_for_memory,
)
from lungbench.harness.sweep_state import (
    ResumePoint,
    SweepState,
    environment_file,
    rebuild_outputs,
    saved_peaks,
    signals_deferred,
    start_resume,
    stop_on_sigterm,
)
from lungbench.harness.tuning import Tuner, TuningOptions, fast_choice, untuned
from lungbench.measure.peak import attach_peak, matmul_peak_stats
from lungbench.measure.peak_cache import robust_peaks
from lungbench.measure.telemetry import SweepMonitor
from lungbench.measure.timing import reporting
from lungbench.measure.workload import Protocol, Workload
from lungbench.models import create_model, list_models
from lungbench.report.labels import config_label
from lungbench.switches import SwitchRequest, check_switches, switches_of

log = logging.getLogger(__name__)  # progress: the CLI shows it on stderr


# The fewest repeats of an adaptive protocol: the median's 95% interval needs 6, and 10 were
# the fixed default before repeats adapted (and stay what each DDP rank times).
ADAPTIVE_MIN_REPEATS = 10


# The --help sections of BenchRequest's options (`lungbench bench`), in their order there.
WHAT = "what to measure"
HOW = "how to measure"
DATA = "data and output"
FINDER = "batch-size finder and data path"


def _unique(values: Any) -> tuple:
    """The values in the order given, each once (a value given twice would measure, and
    record, one configuration twice)."""
    return tuple(dict.fromkeys(values))


def _path_or_none(text: str) -> Path | None:
    """A path option's value; an empty one means the default (None)."""
    return Path(text) if text else None


@dataclass(frozen=True, kw_only=True)
class BenchRequest(SwitchRequest):
    """What the user asked `lungbench bench` for (saved as config.json, flat: the speed
    switches, inherited from SwitchRequest, beside the fields below). The fields with
    option(...) are the command's options (lungbench.commands._options builds the parser
    and the request from them); `--config` sweep files use the same names."""

    # The workload's options are declared on Workload (and Protocol); a sweep takes lists.
    model: str = option_like(
        Workload, "model", "dualpath3d", group=WHAT, default_note="see `--list-models`"
    )
    preset: str = option_like(Workload, "preset", "default", group=WHAT)
    filters: tuple[int, ...] = option_like(
        Workload,
        "filters",
        (8, 16),
        nargs="+",
        group=WHAT,
        convert=_unique,
        default_note="as the thesis",
        help="base widths to sweep",
    )
    batch_sizes: tuple[int, ...] = option_like(
        Workload,
        "batch_size",
        (2, 4, 8),
        nargs="+",
        group=WHAT,
        convert=_unique,
        help="batch sizes to sweep",
    )
    devices: tuple[str, ...] = option_like(
        Workload,
        "device",
        ("cpu",),
        nargs="+",
        metavar="DEVICE",
        group=WHAT,
        convert=_unique,
        help="devices: cpu, cuda, cuda:N; the first is the speed-up baseline",
    )
    threads: tuple[int | None, ...] = option_like(
        Workload,
        "threads",
        (None,),
        nargs="+",
        group=WHAT,
        convert=_unique,
        help="CPU intra-op thread counts to sweep",
    )
    warmup: int = option_like(Protocol, "warmup", 3, group=HOW)
    repeats: int | None = option(  # exactly this many; None = adaptive (below)
        None,
        type=positive_int,
        group=HOW,
        default_text=f"adaptive: at least {ADAPTIVE_MIN_REPEATS}, then on until the median "
        "step time's 95% confidence interval is within +-CI-TARGET%, or --max-repeats, or "
        "--time-budget; each record says which",
        help="timed steps per configuration, exactly N",
    )
    # Adaptive repeats: at least ADAPTIVE_MIN_REPEATS, then on until the median's 95% CI is
    # within +-ci_target_pct percent, max_repeats are timed or time_budget_s has passed.
    ci_target_pct: float = option(
        3.0,
        flag="--ci-target",
        type=positive_float,
        metavar="PERCENT",
        group=HOW,
        help="adaptive repeats: the half-width of the median's 95% confidence interval to "
        "reach, in percent of the median",
    )
    max_repeats: int = option(
        100, type=positive_int, group=HOW, help="adaptive repeats: at most this many timed steps"
    )
    time_budget_s: float = option(
        30.0,
        flag="--time-budget",
        type=positive_float,
        metavar="SECONDS",
        group=HOW,
        help="adaptive repeats: stop after this many seconds of timed steps",
    )
    epoch: bool = option(
        True,
        flag="--no-epoch",
        group=HOW,
        default_text="the epoch is timed",
        help="skip the end-to-end epoch; the table then uses the step time",
    )
    epoch_samples: int | None = option_like(Protocol, "epoch_samples", None, group=HOW)
    num_workers: int = option(
        0,
        flag="--workers",
        type=non_negative_int,
        metavar="WORKERS",
        group=HOW,
        help="DataLoader worker processes for the epoch",
    )
    seed: int = option(0, type=non_negative_int, group=HOW, help="random seed")
    telemetry_interval: float = option(  # seconds between samples; 0 = off (checked: >= 0)
        0.5,
        type=float,
        metavar="SECONDS",
        group=HOW,
        help="GPU/CPU telemetry sampling interval per configuration, saved to "
        "telemetry/<config>.csv with a summary in each record; 0 = off",
    )
    store: Path | None = option(
        None,
        group=DATA,
        convert=_path_or_none,
        default_text="generated LIDC-like set, cached in OUT/data/",
        help="HDF5 store to train the epoch on",
    )
    synth_n: int = option(
        754,
        type=positive_int,
        group=DATA,
        default_note="only the samples the run reads are generated: with --epoch-samples E "
        "the first ceil(E/0.8)+2, with --no-epoch 2, with --loader its --loader-samples",
        help="size of the generated set when no --store",
    )
    out: Path = option(Path("results"), group=DATA, convert=Path, help="output root")
    run_id: str | None = option(
        None, group=DATA, default_text="bench-<UTC>-<host>", help="run folder name"
    )
    # The data path (lungbench.harness.loader) and the batch-size finder; the speed
    # switches are SwitchRequest's.
    pin_memory: bool | None = option(
        None,
        action=ON_OFF,
        group=FINDER,
        default_text="on for CUDA",
        help="pinned host memory for the epoch's batches",
    )
    cache: bool = option(
        False,
        group=FINDER,
        help="decode the store once into shared memory for the epoch (when it fits in a "
        "quarter of the free RAM)",
    )
    find_batch: bool = option(  # search the largest batch first; it bounds the sweep
        False,
        group=FINDER,
        help="first find the largest batch that fits per model, filters, grid and dtype "
        "(tables/max_batch.csv); the sweep drops larger batches and adds it",
    )
    max_batch: int | None = option(  # ceiling of that search (None: 64 on CPU, 4096 on CUDA)
        None,
        type=positive_int,
        group=FINDER,
        default_text="64 on CPU, 4096 on CUDA",
        help="ceiling of the search",
    )

    def sweep(self) -> list[BenchConfig]:
        """The configurations, in run order: device, threads, filters, then batch size."""
        base = BenchConfig(
            workload=Workload(model=self.model, preset=self.preset, seed=self.seed),
            switches=switches_of(self),
            strict_switches=tuple(self.strict_switches),
            protocol=self.protocol(),
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            cache=self.cache,
        )
        return [
            base.with_workload(device=d, threads=t, filters=f, batch_size=b)
            for d, t, f, b in itertools.product(
                self.devices, self.threads, self.filters, self.batch_sizes
            )
        ]

    def protocol(self) -> Protocol:
        """The timing protocol: `repeats` exactly, or adaptive repeats when it is None."""
        adaptive = self.repeats is None
        return Protocol(
            self.warmup,
            ADAPTIVE_MIN_REPEATS if adaptive else self.repeats,
            self.epoch,
            self.epoch_samples,
            ci_target=self.ci_target_pct / 100 if adaptive else None,
            max_repeats=max(self.max_repeats, ADAPTIVE_MIN_REPEATS),
            budget_s=self.time_budget_s,
        )


@dataclass
class BenchResult:
    run_dir: Path
    records: list[dict[str, Any]]
    table_text: str


def validate(request: BenchRequest) -> None:
    """UsageError for anything invalid, before any file is written."""
    look_up_option(request.model, list_models(), what="--model")
    look_up_option(request.preset, GEOMETRY_PRESETS, what="--preset")
    for device in request.devices:
        parse_device(device)
    check_out_dir(request.out)
    if request.run_id is not None:
        check_name(request.run_id, "--run-id")
    if not request.telemetry_interval >= 0:
        raise UsageError(
            f"--telemetry-interval must be >= 0 seconds (0 = off), got {request.telemetry_interval}"
        )
    if request.store is not None:
        check_store_fits_model(request, read_info(request.store))
    check_switches(request, request.devices)  # forced switches a device cannot do: UsageError
    warn_oversubscribed(request.threads)


def warn_oversubscribed(threads: tuple[int | None, ...]) -> None:
    """A warning, in words, for thread counts above the cores this process may use: they
    run, but share cores, and their times are of an oversubscribed CPU."""
    cores = allowed_cores()
    over = sorted({t for t in threads if t is not None and t > cores})
    if over:
        log.warning(
            f"warning: --threads {' '.join(map(str, over))}: more than the {cores} core(s) this "
            "process may use; the threads share cores, so those times are of an "
            "oversubscribed CPU"
        )


def check_store_fits_model(request: BenchRequest, info: StoreInfo) -> None:
    """DataError unless the model takes one sample of each store input (a dry forward); the
    two-path model also needs the preset's grids (both paths on the same grid: a smaller
    zoom cube would still run, through the global pooling, but measure another network)."""
    if request.model == "dualpath3d" and list(info.inputs) == ["context", "zoom"]:
        reason = preset_mismatch(list(info.inputs.values()), request.preset)
        if reason:
            raise DataError(f"{info.path}: {reason}")
    model = create_model(request.model, preset=request.preset, filters=min(request.filters))
    inputs = [torch.zeros((1, *shape)) for shape in info.inputs.values()]
    try:
        with torch.no_grad():
            model.eval()(*inputs)
    except (RuntimeError, TypeError, ValueError) as exc:
        shapes = ", ".join(
            f"dataset '{k}' has shape {(info.n, *v)}" for k, v in info.inputs.items()
        )
        reason = str(exc).splitlines()[0][:160]
        raise DataError(
            f"{info.path}: {shapes}; model {request.model!r} (preset "
            f"{request.preset!r}) cannot take it: {reason}"
        ) from None


def generated_samples(request: BenchRequest, reads: int | None = None) -> int:
    """How many of the `synth_n` generated nodules a run needs: only those it reads.

    Sample i does not depend on the set's size (lungbench.data.synth), so a smaller set is the
    first samples of the full one. `reads`: a run that reads the first `reads` samples (the
    loader benchmark). Otherwise the epoch: the 80% training split of all `synth_n`, or with
    --epoch-samples E the first E of the split of ceil(E / 0.8) + 2 samples (each of the two
    classes' share of the split is rounded, losing at most half a sample). No epoch: one
    sample per class, since the sweep then reads only the store's shapes.
    """
    from lungbench.data.synth import LABEL_NAMES

    classes = len(LABEL_NAMES)
    if reads is not None:
        needed = reads
    elif not request.epoch:
        needed = classes
    elif request.epoch_samples is None:
        needed = request.synth_n
    else:
        needed = math.ceil(request.epoch_samples / TRAIN_FRACTION) + classes
    return min(request.synth_n, needed)


def prepare_store(request: BenchRequest, reads: int | None = None) -> StoreInfo:
    """The user's store, or the generated default: only the samples the run needs
    (`generated_samples`), made once, then reused from OUT/data/. The file name carries the
    count, so a later run that needs more generates its own larger set."""
    if request.store is not None:
        return read_info(request.store)
    n = generated_samples(request, reads)
    path = default_store_path(request.out, "lidc", n, request.preset, request.seed)
    if not path.exists():
        from lungbench.data.synth import write_synthetic_store

        log.info(f"generating {n} LIDC-like nodules into {path} (once; reused later)")
        with tqdm(total=n, desc="generate data", unit="nodule") as bar:
            write_synthetic_store(
                path, "lidc", n, geometry(request.preset), seed=request.seed, progress=bar.update
            )
    return read_info(path)


def measure_peaks(devices: tuple[str, ...], dtype: str = "auto") -> dict[str, dict[str, float]]:
    """Matrix-product peak per device and dtype, the denominators of every 'peak_fraction'
    (a record is compared with the peak of the dtype its math ran in). Only the dtypes
    `dtype` ("auto" or a fixed one) can lead to are measured."""
    dtypes = ("fp32", "bf16", "fp16") if dtype == "auto" else ("fp32", dtype)
    peaks = {}
    for name in dict.fromkeys(devices):
        found, source = robust_peaks(parse_device(name), dtypes)
        peaks[name] = {**found, "source": source}
    return peaks


def remeasure_peak(record: dict[str, Any], peaks: dict[str, dict[str, float]]) -> None:
    """A step above the measured peak means the peak was measured low (a busy machine while
    it ran): measure it again, longer, keep the higher one, and say so in the record."""
    device, dtype = record["device"], record["peak_dtype"]
    best, _ = matmul_peak_stats(parse_device(device), dtype, repeats=10)
    old = peaks[device][dtype]
    peaks[device][dtype] = max(old, best)
    attach_peak(record, peaks[device])
    record["peak_note"] = (
        f"achieved FLOP/s was above the {dtype} peak of {old / 1e9:.1f} GFLOP/s; measured "
        f"again: {best / 1e9:.1f} GFLOP/s"
        + ("; still above it: fraction capped at 1" if record.get("peak_exceeded") else "")
    )
    log.warning(f"note: {config_label(record)}: {record['peak_note']}")


def record_peaks(env: dict[str, Any], peaks: dict[str, dict[str, float]]) -> None:
    """Store the peaks in the environment record: all of them, and FP32 alone as before."""
    env["peak_flops"] = peaks
    env["peak_flops_fp32"] = {d: p["fp32"] for d, p in peaks.items()}


def run_bench(
    request: BenchRequest,
    resume: ResumePoint | None = None,
    dist: Any = None,
    ddp: Any = None,
) -> BenchResult:
    """Run the sweep described by `request` and write its result folder.

    With `resume` (lungbench.harness.sweep_state.open_for_resume), continue that run folder: only
    configurations without a record are measured. Ctrl-C / SIGTERM mark the run
    "interrupted" with its tables rebuilt from the records, then re-raise.

    With `dist` (a lungbench.distributed.group.DistContext of world size > 1) the DDP
    measurements of lungbench.harness.ddp run instead, configured by `ddp` (DDPOptions);
    only rank 0 writes.
    """
    if dist is not None and dist.is_distributed:
        return run_ddp_bench(request, dist, ddp or DDPOptions())
    validate(request)
    info = prepare_store(request)
    configs, batch_limits = sweep_configs(request, info)
    state = SweepState.from_records(resume.records if resume else [])
    pending = state.pending(configs)
    done = len(configs) - len(pending)
    run_dir = open_run_dir(request, resume, f"{done} of {len(configs)}")
    # a failure marks the run "failed"; Ctrl-C / SIGTERM "interrupted", with its tables
    # rebuilt from the records measured so far (SIGTERM from here on: while the peaks are
    # measured or the tables written too, not only during the sweep)
    with (
        stop_on_sigterm(),
        marking_run(run_dir, on_interrupt=lambda: rebuild_outputs(run_dir, write_bench_outputs)),
    ):
        write_plan(run_dir, request, info, len(configs), batch_limits, resumed=resume is not None)
        folder = BenchFolder.start(run_dir, request, resumed=resume is not None)
        data = SweepData.open(info, request.seed)
        tuner = Tuner(TuningOptions(retune=request.retune, allow_compile=request.tune_compile))
        monitor = _telemetry_monitor(request, run_dir)
        with SweepProgress(len(configs), done) as progress:
            for cfg in pending:  # skip or refuse, tune, measure, annotate, append
                progress.show(cfg)
                record = state.skip_record(cfg) or refused_for_memory(cfg, data.shapes)
                chosen: dict[str, Any] = {}
                if record is None:
                    ready, chosen = tuned(cfg, request, tuner, data.shapes)
                    record = measure_config(ready, data, monitor)
                folder.annotate(record, chosen)
                state.note(record)
                folder.append(record)
                progress.advance()
        records = read_records(run_dir)  # with those of earlier attempts when resumed
        table_text = write_bench_outputs(run_dir, records)
    finish_run(run_dir, "complete")
    return BenchResult(run_dir, records, table_text)


def write_bench_outputs(run_dir: Path, records: list[dict[str, Any]]) -> str:
    """The tables and plots of a finished (or interrupted) sweep. matplotlib is imported here,
    when there is something to draw, not at import: `bench --help`, a refused option and every
    DDP rank but rank 0 never draw."""
    from lungbench.report.bench_outputs import write_bench_outputs as write

    return write(run_dir, records)


def write_scaling_outputs(run_dir: Path, records: list[dict[str, Any]]) -> str:
    """The DDP scaling tables and plots; matplotlib imported when drawn, as above."""
    from lungbench.report.scaling import write_scaling_outputs as write

    return write(run_dir, records)


def sweep_configs(
    request: BenchRequest, info: StoreInfo
) -> tuple[list[BenchConfig], list[dict[str, Any]] | None]:
    """The configurations to measure, in order, and with --find-batch the largest batch that
    fits each (which bounds the sweep)."""
    configs = request.sweep()
    if not request.find_batch:
        return configs, None
    return apply_batch_finder(configs, list(info.inputs.values()), request.max_batch)


def open_run_dir(request: BenchRequest, resume: ResumePoint | None, measured: str) -> Path:
    """A new run folder, or the resumed one made ready to be appended to again."""
    if resume is None:
        return create_run_dir(request.out, "bench", request.run_id)
    start_resume(resume.run_dir)
    log.info(f"resuming {resume.run_dir}: {measured} configurations already measured")
    return resume.run_dir


def write_plan(
    run_dir: Path,
    request: BenchRequest,
    info: StoreInfo,
    n_configs: int,
    batch_limits: list[dict[str, Any]] | None,
    resumed: bool,
) -> None:
    """config.json (the request, once: a resume keeps the first) and max_batch.csv."""
    if batch_limits is not None:
        write_table(run_dir, "max_batch", batch_limits, index=False)
    if not resumed:
        config = {"request": request, "store": str(info.path), "store_inputs": info.inputs}
        write_json(
            run_dir / "config.json", {**config, "store_kind": info.kind, "configs": n_configs}
        )


class BenchFolder:
    """The run's environment record, the device peaks its records are compared with, and the
    records appended to records.jsonl, each annotated first (platform, peak fraction, tuning
    choice, provenance)."""

    def __init__(self, run_dir: Path, env: dict[str, Any], env_file: str, peaks: dict) -> None:
        self.run_dir, self.env, self.env_file, self.peaks = run_dir, env, env_file, peaks

    @classmethod
    def start(cls, run_dir: Path, request: BenchRequest, resumed: bool) -> BenchFolder:
        """Record the environment with the peaks: those the run began with when resumed (every
        record of a run shares its denominators), measured otherwise."""
        env = environment_record()
        peaks = (saved_peaks(run_dir) if resumed else None) or measure_peaks(
            request.devices, request.dtype
        )
        folder = cls(run_dir, env, environment_file(run_dir, resumed), peaks)
        folder.write_environment()
        return folder

    def write_environment(self) -> None:
        record_peaks(self.env, self.peaks)
        write_json(self.run_dir / self.env_file, self.env)

    def annotate(self, record: dict[str, Any], tuning: dict[str, Any]) -> None:
        """Add the record's platform, peak fraction, tuning fields and provenance."""
        record["platform"] = _platform(record, torch.device(record["device"]))
        attach_peak(record, self.peaks.get(record["device"]))
        if record.get("peak_exceeded"):
            remeasure_peak(record, self.peaks)
            self.write_environment()  # the environment record holds the peaks in use
        record.update(tuning)
        record.update(provenance(self.env, self.env_file))
        if record.get("busy"):
            log.warning(
                f"warning: the machine is busy: {record['busy_reason']} "
                f"({config_label(record)}); its times are not trustworthy"
            )

    def append(self, record: dict[str, Any]) -> None:
        with signals_deferred():  # a signal now would tear the line
            append_record(self.run_dir, record)


class SweepProgress:
    """The sweep's progress bar: configurations done, the one being measured and where it is
    (warm-up, repeats, epoch batches: lungbench.measure.timing.reporting)."""

    def __init__(self, total: int, done: int) -> None:
        self.bar = tqdm(total=total, initial=done, desc="bench", unit="config")
        self.current = ""
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> SweepProgress:
        self._stack.enter_context(self.bar)
        self._stack.enter_context(reporting(self._inside))
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stack.__exit__(*exc)

    def show(self, cfg: BenchConfig) -> None:
        w = cfg.workload
        self.current = f"{w.device} f{w.filters} b{w.batch_size}"
        self.bar.set_postfix_str(self.current)

    def advance(self) -> None:
        self.bar.update(1)

    def _inside(self, text: str) -> None:
        self.bar.set_postfix_str(f"{self.current}: {text}")


def tuned(
    cfg: BenchConfig, request: BenchRequest, tuner: Tuner, shapes: list[tuple[int, ...]]
) -> tuple[BenchConfig, dict[str, Any]]:
    """The configuration with its "auto" switches set to the measured fast choice for its
    workload on its device (one tuning pass per workload, just before its first measurement;
    lungbench.harness.tuning), and the record fields saying what was chosen among which
    measured alternatives."""
    skip = None if request.tune else "--no-tune"
    device = parse_device(cfg.workload.device)
    fast, fields = fast_choice(cfg.switches, cfg.workload, device, tuner, skip, shapes)
    return replace(cfg, fast=fast), fields


def _telemetry_monitor(request: BenchRequest, run_dir: Path) -> Any:
    """Samples telemetry around each configuration into run_dir/telemetry/<key>.csv."""
    if not request.telemetry_interval:
        return None
    return SweepMonitor(run_dir / "telemetry", request.telemetry_interval, run_dir=run_dir)


def _platform(record: dict[str, Any], device: torch.device) -> str:
    if device.type == "cpu":
        threads = record["threads_used"]
        return f"cpu ({threads} thread{'s' if threads != 1 else ''})"
    return describe_device(device)


def run_ddp_bench(request, dist: DistContext, options: DDPOptions):
    """`lungbench bench` with several processes: every rank calls it; rank 0 writes the run
    folder and returns the BenchResult with the tables, the others a result without them."""
    validate(request)  # every rank: bad input ends every rank with the same message
    if getattr(request, "find_batch", False):
        raise UsageError(
            "--find-batch: not supported under a launcher; find the batch in a 1-process "
            "run, then pass it with --batch"
        )
    if dist.device.type not in {torch.device(d).type for d in request.devices}:
        raise UsageError(
            f"--device {' '.join(request.devices)}: the process group runs on "
            f"{dist.device.type}; add it to --device"
        )
    # Rank 0 generates the default data set if it is missing; the others then read it
    # (or, on nodes without a shared file system, generate the same deterministic file).
    info = prepare_store(request) if dist.is_main else None
    barrier(dist, "waiting for rank 0 to prepare the data set")
    info = info or prepare_store(request)  # quiet: only rank 0 reports (init_distributed)
    configs = request.sweep()
    hosts = all_gather(dist, socket.gethostname(), "exchanging host names")
    if not dist.is_main:
        run_ddp_sweep(configs, info, dist, options, on_record=lambda r: None)
        return BenchResult(None, [], "")  # type: ignore[arg-type]

    config = {
        "request": request,
        "ddp": options,
        "distributed": dist.describe(),
        "store": str(info.path),
        "store_inputs": info.inputs,
        "store_kind": info.kind,
        "configs": len(configs),
    }
    # a failure marks the run "failed", Ctrl-C "interrupted"
    with run_folder(request.out, "bench", request.run_id, config) as run:
        run_dir = run.path
        peaks = measure_peaks(tuple(request.devices), request.dtype)
        env = environment_record()
        record_peaks(env, peaks)
        env["distributed"] = {**dist.describe(), "hosts": hosts}
        write_json(run_dir / "environment.json", env)
        bar = tqdm(desc="bench", unit="record")

        def on_record(record: dict[str, Any]) -> None:
            if record.get("scaling") == "none":
                record["platform"] = _platform(record, torch.device(record["device"]))
            attach_peak(record, peaks.get(record["device"]))
            # every rank runs the same switches: rank 0's cached choice, or the table
            # (lungbench.harness.ddp.agreed_tuning); no rank stops to tune
            if "tuning_source" not in record:
                record.update(untuned("under a launcher: the device's table"))
            record.update(provenance(env))
            append_record(run_dir, record)
            bar.update(1)

        monitor = None
        if request.telemetry_interval:
            monitor = SweepMonitor(run_dir / "telemetry", request.telemetry_interval, run_dir)
        with bar:
            records = run_ddp_sweep(
                configs, info, dist, options, on_record, bar.set_postfix_str, monitor
            )
        flat = [{k: v for k, v in r.items() if k != "ranks"} for r in records]
        table_text = write_bench_outputs(run_dir, flat)
        table_text += "\n\n" + write_scaling_outputs(run_dir, records)
    return BenchResult(run_dir, records, table_text)
