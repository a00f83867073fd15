"""Layer 1 (core): Run folders: where every command writes what it measured, in one layout.

    results/<run-id>/
        run.json            kind (bench | train | profile), command line, status, timestamps
        config.json         the frozen config dataclass(es) of the run
        environment.json    lungbench.core.environment.environment_record()
        records.jsonl       one JSON line per measurement, appended + fsynced as it finishes
        tables/NAME.csv     every table also as NAME.md (Markdown)
        plots/NAME.png

A run is complete when run.json says status "complete"; a folder without that was
interrupted (its records.jsonl still holds everything that finished).
"""

from __future__ import annotations

import json
import math
import os
import socket
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, is_dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd

from lungbench.core.errors import DataError, message_of
from lungbench.core.paths import check_name, check_out_dir
from lungbench.core.runlock import lock_run, unlock_run

RUN_FILE = "run.json"


RECORDS_FILE = "records.jsonl"


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def make_run_id(kind: str) -> str:
    """A sortable, unique-enough id: KIND-YYYYmmdd-HHMMSS-HOST."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    host = socket.gethostname().split(".")[0][:20] or "host"
    return f"{kind}-{stamp}-{host}"


def create_run_dir(out_root: str | os.PathLike, kind: str, run_id: str | None = None) -> Path:
    """Create results/<run-id>/ (UsageError if the root or the run folder is a file), or
    <run-id>-2, -3, ... when that name is taken, atomically, and hold its lock
    (lungbench.core.runlock) until finish_run."""
    root = Path(out_root)
    check_out_dir(root)
    if run_id is not None:
        check_name(run_id, "--run-id")  # results stay inside --out: no '/', no '..'
    run_id = run_id or make_run_id(kind)
    root.mkdir(parents=True, exist_ok=True)
    run_dir, suffix = root / run_id, 1
    while True:  # mkdir is atomic: of two processes asking for one name, one gets "-2"
        try:
            run_dir.mkdir()
            break
        except FileExistsError:
            suffix += 1
            run_dir = root / f"{run_id}-{suffix}"
    lock_run(run_dir)  # held until finish_run (or this process ends)
    (run_dir / "tables").mkdir()
    (run_dir / "plots").mkdir()
    write_json(
        run_dir / RUN_FILE,
        {
            "kind": kind,
            "run_id": run_dir.name,
            "status": "running",
            "started_utc": utc_now(),
            "argv": sys.argv[1:],
        },
    )
    return run_dir


def to_jsonable(obj: Any) -> Any:
    """Dataclasses, paths, numpy scalars and tuples as plain JSON values."""
    if is_dataclass(obj) and not isinstance(obj, type):
        return to_jsonable(asdict(obj))
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item") and callable(obj.item):  # numpy / torch scalars
        return obj.item()
    if isinstance(obj, float) and obj != obj:  # NaN is not JSON
        return None
    return obj if isinstance(obj, (str, int, float, bool, type(None))) else str(obj)


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (temporary file + rename)."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # two writers never share one
    tmp.write_text(json.dumps(to_jsonable(data), indent=2) + "\n")
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def read_run_files(run_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(run.json, config.json) of a run folder; DataError naming the folder when either is
    missing, unreadable or not a JSON object (what `--resume` reads first)."""
    try:
        info, config = read_json(run_dir / RUN_FILE), read_json(run_dir / "config.json")
    except (OSError, ValueError) as exc:
        raise DataError(f"{run_dir}: cannot read run.json / config.json ({exc})") from None
    if not isinstance(info, dict) or not isinstance(config, dict):
        raise DataError(f"{run_dir}: run.json / config.json is not a JSON object")
    return info, config


def append_record(run_dir: Path, record: Mapping[str, Any]) -> None:
    """Append one measurement as a JSON line, flushed and fsynced (survives a kill)."""
    line = json.dumps(to_jsonable(record)) + "\n"
    with open(run_dir / RECORDS_FILE, "a") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


# The record fields every reader relies on, and what each must be when present (None too:
# a configuration that failed has no times). A record read back with another value is
# refused in one line naming the file, the line and the field, never a traceback later.
TEXT_FIELDS = ("key", "status", "model", "preset", "device", "dtype_used")
COUNT_FIELDS = ("batch_size", "filters", "threads_used", "world_size", "epoch_samples")
TIME_FIELDS = ("step_s_median", "step_s_ci_low", "step_s_ci_high", "epoch_s",
               "flops_per_step")  # fmt: skip


def read_records(run_dir: Path) -> list[dict[str, Any]]:
    """All complete records of a run (a torn line from a kill is skipped); DataError naming
    the file, line and field for a record whose known fields have the wrong type."""
    path = Path(run_dir) / RECORDS_FILE
    if not path.exists():
        return []
    records = []
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    for number, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):  # a stray non-object line is not a record
            check_record_fields(record, f"{path}: line {number}")
            records.append(record)
    return records


def check_record_fields(record: dict[str, Any], where: str) -> None:
    """DataError naming `where` and the field when a known field has the wrong type."""
    for name, value in record.items():
        if value is None:
            continue
        if name in TEXT_FIELDS and not isinstance(value, str):
            expected = "text"
        elif name in COUNT_FIELDS and (
            isinstance(value, bool) or not isinstance(value, int) or value < 0
        ):
            expected = "a whole number >= 0"
        elif name in TIME_FIELDS and (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not math.isfinite(value)
            or value < 0
        ):
            expected = "a finite number >= 0"
        else:
            continue
        raise DataError(f"{where}: field {name!r} is {value!r}, not {expected}")


def write_table(run_dir: Path, name: str, table: pd.DataFrame, index: bool = True) -> Path:
    """Write tables/NAME.csv and tables/NAME.md; returns the CSV path."""
    csv_path = run_dir / "tables" / f"{name}.csv"
    table.to_csv(csv_path, index=index)
    (run_dir / "tables" / f"{name}.md").write_text(markdown(table, index) + "\n")
    return csv_path


def save_figure(run_dir: Path, name: str, fig) -> Path:
    """Save a matplotlib figure as plots/NAME.png and close it."""
    import matplotlib.pyplot as plt

    path = run_dir / "plots" / f"{name}.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def finish_run(run_dir: Path, status: str = "complete", **extra: Any) -> None:
    """Mark the run complete (or interrupted / failed) in run.json and release its lock."""
    info = read_json(run_dir / RUN_FILE)
    info.update(status=status, finished_utc=utc_now(), **extra)
    write_json(run_dir / RUN_FILE, info)
    unlock_run(run_dir)  # the last write: another process may resume it now


@contextmanager
def marking_run(
    run_dir: Path,
    interrupted_by: tuple[type[BaseException], ...] = (KeyboardInterrupt,),
    on_interrupt: Callable[[], None] | None = None,
    **extra: Any,
) -> Iterator[None]:
    """Mark run_dir "interrupted" (Ctrl-C, SIGTERM: `interrupted_by`) or "failed" (any other
    exception, with its first line) when the block raises, then re-raise, so that no run
    folder is left "running". `on_interrupt` runs first on an interruption (for example to
    rebuild the tables from the records measured so far); `extra` goes into run.json."""
    try:
        yield
    except BaseException as exc:
        interrupted = isinstance(exc, interrupted_by)
        if interrupted and on_interrupt is not None:
            on_interrupt()
        status = "interrupted" if interrupted else "failed"
        finish_run(run_dir, status, error=message_of(exc), **extra)
        raise


@dataclass
class RunFolder:
    """An open run folder: its path, and the fields run.json gets when the run completes."""

    path: Path
    summary: dict[str, Any] = field(default_factory=dict)


@contextmanager
def run_folder(
    out_root: str | os.PathLike,
    kind: str,
    run_id: str | None = None,
    config: Any = None,
    *,
    environment: Mapping[str, Any] | None = None,
    interrupted_by: tuple[type[BaseException], ...] = (KeyboardInterrupt,),
    on_interrupt: Callable[[], None] | None = None,
    **extra: Any,
) -> Iterator[RunFolder]:
    """The whole life of a run folder in one block: create OUT/<run-id>/, write config.json
    and environment.json (when given), and mark run.json "complete" (with `summary`) when the
    block ends, "interrupted" or "failed" when it raises (marking_run); `extra` goes into
    run.json either way.

        with run_folder(out, "ablation", run_id, config, environment=env) as run:
            ...                              # write records and tables into run.path
            run.summary["wall_s"] = wall     # into run.json on completion
    """
    path = create_run_dir(out_root, kind, run_id)
    run = RunFolder(path)
    with marking_run(path, interrupted_by, on_interrupt, **extra):
        if config is not None:
            write_json(path / "config.json", config)
        if environment is not None:
            write_json(path / "environment.json", environment)
        yield run
    finish_run(path, "complete", **extra, **run.summary)


def _plain_markdown(table: pd.DataFrame, index: bool) -> str:
    """Markdown without the optional `tabulate` dependency."""
    frame = table.reset_index() if index else table
    cols = [str(c) for c in frame.columns]
    rows = [[_fmt(v) for v in row] for row in frame.itertuples(index=False)]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def markdown(table: pd.DataFrame, index: bool = True) -> str:
    """A table as Markdown text (no dependency on the optional `tabulate`)."""
    return _plain_markdown(table, index)


def iter_tables(run_dir: Path) -> Iterable[Path]:
    return sorted((Path(run_dir) / "tables").glob("*.csv"))
