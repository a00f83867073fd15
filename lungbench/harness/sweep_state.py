"""Layer 7 (harness): Sweeps that survive: resume a run folder, skip what cannot fit, stop cleanly on a signal.

A sweep's truth is its records.jsonl (one fsynced JSON line per finished configuration);
everything here is derived from it:

- `open_for_resume(run)` finds the run folder, repairs a line torn by a kill, and returns
  the request saved in config.json plus the records already there; `merge_request` refuses
  options that contradict the saved request.
- `SweepState` knows which configurations are finished (by `BenchConfig.key()`) and which
  must be skipped because a smaller batch of the same kind ran out of memory.
- `stop_on_sigterm()` turns SIGTERM into `SweepTerminated` (a KeyboardInterrupt), so Ctrl-C
  and a scheduler's SIGTERM leave the run the same way: status "interrupted", tables rebuilt.

    lungbench bench --batch 2 4 8 --run-id nightly      # killed half-way
    lungbench bench --resume results/nightly            # measures only what is missing
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from lungbench.core.errors import DataError, UsageError
from lungbench.core.runlock import held_unless_failed, unlock_run
from lungbench.core.runs import (
    RECORDS_FILE,
    RUN_FILE,
    read_json,
    read_records,
    read_run_files,
    utc_now,
    write_json,
)
from lungbench.harness.sweep import BenchConfig

log = logging.getLogger(__name__)  # progress: the CLI shows it on stderr

# Exit codes of a process ended by SIGINT / SIGTERM (128 + signal number), as shells report.
EXIT_SIGINT = 128 + signal.SIGINT


EXIT_SIGTERM = 128 + signal.SIGTERM


# Statuses after which a configuration is finished (a resumed sweep does not measure it
# again): "error" is included so that records.jsonl never holds a key twice; start a new
# run to retry failures.
FINISHED = ("ok", "oom", "error", "skipped")


class SweepTerminated(KeyboardInterrupt):
    """SIGTERM arrived (a scheduler's time limit or `kill`); handled like Ctrl-C."""

    exit_code = EXIT_SIGTERM


def interrupt_exit_code(exc: BaseException) -> int:
    """130 for Ctrl-C, 143 for SIGTERM."""
    return getattr(exc, "exit_code", EXIT_SIGINT)


@contextlib.contextmanager
def stop_on_sigterm() -> Iterator[None]:
    """Within the block, SIGTERM raises SweepTerminated in the main thread.

    Outside the main thread (where Python cannot install handlers) this does nothing.
    """

    def handler(signum, frame):  # noqa: ARG001 - signal handler signature
        raise SweepTerminated(f"stopped by signal {signum}")

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM while a record is written, so a signal never tears the line.

    Blocked signals are delivered (and their Python handlers run) when the block ends.
    """
    mask = {signal.SIGINT, signal.SIGTERM}
    if not hasattr(signal, "pthread_sigmask"):  # not POSIX: nothing to hold
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, mask)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def family_key(cfg: BenchConfig) -> str:
    """The configuration's key with the batch size left out ("the same kind")."""
    return cfg.with_workload(batch_size=0).key()


def config_from_record(record: Mapping[str, Any]) -> BenchConfig:
    """Rebuild the BenchConfig a record was measured with (fields it lacks keep defaults)."""
    return BenchConfig.from_record(record)


@dataclass
class SweepState:
    """Finished keys and out-of-memory limits, updated as records arrive."""

    done: set[str] = field(default_factory=set)
    # family key -> smallest batch size that ran out of memory
    oom_batch: dict[str, int] = field(default_factory=dict)

    @classmethod
    def from_records(cls, records: Sequence[Mapping[str, Any]]) -> SweepState:
        state = cls()
        for record in records:
            state.note(record)
        return state

    def note(self, record: Mapping[str, Any]) -> None:
        """Take a finished record into account."""
        if record.get("status") in FINISHED and "key" in record:
            self.done.add(str(record["key"]))
        if record.get("status") == "oom":
            cfg = config_from_record(record)
            family = family_key(cfg)
            known = self.oom_batch.get(family)
            batch = cfg.workload.batch_size
            self.oom_batch[family] = min(batch, known or batch)

    def pending(self, configs: Sequence[BenchConfig]) -> list[BenchConfig]:
        """The configurations not measured yet, in sweep order."""
        return [c for c in configs if c.key() not in self.done]

    def skip_record(self, cfg: BenchConfig) -> dict[str, Any] | None:
        """A 'skipped' record if a smaller batch of the same kind ran out of memory."""
        limit = self.oom_batch.get(family_key(cfg))
        if limit is None or cfg.workload.batch_size <= limit:
            return None
        reason = f"skipped: batch {limit} of the same configuration ran out of memory"
        threads = cfg.workload.threads or torch.get_num_threads()
        return {
            "key": cfg.key(),
            **cfg.record_fields(),
            "threads_used": threads,
            "status": "skipped",
            "error": reason,
        }


def resolve_run_dir(run: str | os.PathLike, out_root: str | os.PathLike) -> Path:
    """`--resume RUN`: a run folder path, or a run id under the output root."""
    path = Path(run)
    candidates = [path] if path.is_absolute() else [path, Path(out_root) / path]
    for candidate in candidates:
        if (candidate / RUN_FILE).is_file():
            return candidate
    raise UsageError(
        f"--resume {run}: no run folder there (expected {RUN_FILE} in "
        f"{' or '.join(str(c) for c in candidates)})"
    )


def repair_records(run_dir: Path) -> int:
    """Cut a torn last line (a kill mid-write) so the next append starts a fresh line.

    Returns the number of bytes removed.
    """
    path = run_dir / RECORDS_FILE
    if not path.exists():
        return 0
    data = path.read_bytes()
    if not data or data.endswith(b"\n"):
        return 0
    keep = data.rfind(b"\n") + 1
    with open(path, "r+b") as f:
        f.truncate(keep)
        f.flush()
        os.fsync(f.fileno())
    return len(data) - keep


@dataclass(frozen=True)
class ResumePoint:
    """A run folder being resumed: its saved request and the records already measured."""

    run_dir: Path
    saved: dict[str, Any]  # config.json's "request" (JSON values)
    records: list[dict[str, Any]]
    status: str
    store: str | None = None  # the store the run measured (config.json "store")


def open_for_resume(
    run: str | os.PathLike, out_root: str | os.PathLike = "results", kind: str = "bench"
) -> ResumePoint:
    """Validate a run folder for `--resume` and read what it holds (nothing is written).
    Its lock is taken first and held until the run finishes (lungbench.core.runlock), so a
    second resume of the folder is refused before it reads what is missing."""
    run_dir = resolve_run_dir(run, out_root)
    with held_unless_failed(run_dir):
        return _resume_point(run, run_dir, kind)


def _resume_point(run: str | os.PathLike, run_dir: Path, kind: str) -> ResumePoint:
    info, config = read_run_files(run_dir)
    if info.get("kind") != kind:
        raise UsageError(
            f"--resume {run}: a {info.get('kind')!r} run; only {kind!r} runs can "
            f"be resumed by `lungbench {kind}`"
        )
    if not isinstance(config, dict) or not isinstance(config.get("request"), dict):
        raise DataError(f"{run_dir / 'config.json'}: no 'request' saved; cannot resume")
    return ResumePoint(
        run_dir,
        config["request"],
        read_records(run_dir),
        str(info.get("status")),
        config.get("store"),
    )


def start_resume(run_dir: Path) -> None:
    """Make a run folder ready to be appended to again (torn line cut, run.json running)."""
    repair_records(run_dir)
    mark_resumed(run_dir)


def saved_peaks(run_dir: Path) -> dict[str, dict[str, float]] | None:
    """The device peaks (per device, per dtype) measured when the run began, so every record
    of a resumed run shares the same denominators."""
    try:
        env = read_json(run_dir / "environment.json")
        peaks = env.get("peak_flops")
        if not isinstance(peaks, dict) or not peaks:  # a run of an earlier version: FP32 only
            peaks = {d: {"fp32": v} for d, v in (env.get("peak_flops_fp32") or {}).items()}
    except (OSError, ValueError, AttributeError):
        return None
    return peaks or None


def environment_file(run_dir: Path, resumed: bool) -> str:
    """environment.json for a new run; environment-resume<N>.json for the N-th resume,
    so the machine of every part of a resumed run stays on record."""
    if not resumed:
        return "environment.json"
    n = 1
    while (run_dir / f"environment-resume{n}.json").exists():
        n += 1
    return f"environment-resume{n}.json"


def rebuild_outputs(run_dir: Path, write_outputs) -> None:
    """Rebuild tables and plots from records.jsonl after an interruption (never raises
    again: the records are what matters, and a second failure must not hide the first)."""
    records = read_records(run_dir)
    try:
        write_outputs(run_dir, records)
    except Exception as exc:  # the interrupt is the error to report, not this one
        log.info(f"could not rebuild the tables of {run_dir}: {exc}")
    log.info(
        f"interrupted: {len(records)} configuration(s) saved in {run_dir}; continue with: "
        f"lungbench bench --resume {run_dir}"
    )


def mark_resumed(run_dir: Path) -> None:
    """run.json: back to "running", with the time of each resume kept."""
    info = read_json(run_dir / RUN_FILE)
    info["resumed_utc"] = [*info.get("resumed_utc", []), utc_now()]
    info["status"] = "running"
    for stale in ("finished_utc", "error"):
        info.pop(stale, None)
    write_json(run_dir / RUN_FILE, info)


def _normalize(value: Any) -> Any:
    """JSON-comparable form (tuples as lists, paths as strings)."""
    if isinstance(value, (tuple, list)):
        return [_normalize(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


# Options that may differ on resume without changing what is measured.
# strict_switches is derived from the switch options, which are compared themselves (and a
# run made before it named the forced switches saved a bool).
RESUME_FREE = ("out", "run_id", "strict_switches")


def merge_request(saved: Mapping[str, Any], given: Any, defaults: Any) -> dict[str, Any]:
    """The saved request's values, after checking the user asked for nothing different.

    `given` is the request built from the command line, `defaults` the one built with no
    options: an option whose value differs from its default counts as given, and must equal
    the saved value. Returns field values for the request class (saved ones win).
    """
    conflicts = []
    merged: dict[str, Any] = {}
    for f in fields(given):
        name = f.name
        value, default = getattr(given, name), getattr(defaults, name)
        if name not in saved:  # a field added after the run was made: keep the default
            merged[name] = default
            continue
        merged[name] = saved[name]
        if name in RESUME_FREE:
            continue
        if _normalize(value) != _normalize(default) and _normalize(value) != saved[name]:
            conflicts.append(f"{name}={_normalize(value)!r} (the run has {saved[name]!r})")
    if conflicts:
        raise UsageError(
            "--resume: options conflict with the run's saved config: "
            + "; ".join(conflicts)
            + "; drop them or start a new run"
        )
    return merged


def resumed_request(point: ResumePoint, given: Any, defaults: Any) -> Any:
    """The request to continue `point` with: the saved one, typed like `given`.

    The run measured a particular store: use it again (so a generated default is not
    regenerated elsewhere when resuming from another directory), and write into the same
    folder (out = its parent, run_id = its name).
    """
    merged = merge_request(point.saved, given, defaults)
    for f in fields(given):
        default = getattr(defaults, f.name)
        value = merged[f.name]
        if isinstance(default, tuple) and isinstance(value, list):
            merged[f.name] = tuple(value)
        elif isinstance(default, Path) and value is not None:
            merged[f.name] = Path(value)
    if point.store and Path(point.store).exists():
        merged["store"] = Path(point.store)
    elif merged.get("store") is not None:
        merged["store"] = Path(merged["store"])
    merged["out"] = point.run_dir.parent
    merged["run_id"] = point.run_dir.name
    return type(given)(**merged)


def apply_resume_and_config(
    given: Any, defaults: Any, config: str | None, resume: str | None
) -> tuple[Any, ResumePoint | None]:
    """`lungbench bench [--config FILE] [--resume RUN]`: the request to run, and the run
    folder to continue (None for a new run)."""
    if config is not None:
        from lungbench.harness.sweep_file import apply_sweep_file

        given = apply_sweep_file(config, given, defaults)
    if resume is None:
        return given, None
    point = open_for_resume(resume, getattr(given, "out", "results"))
    try:
        return resumed_request(point, given, defaults), point
    except BaseException:
        unlock_run(point.run_dir)
        raise
