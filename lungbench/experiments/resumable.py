"""Layer 11 (experiments): Recipe run folders that survive a stop: tables of what finished, and `--resume RUN`.

A recipe's truth is its records.jsonl, as for `lungbench bench` (lungbench.harness.sweep_state):
each finished fold, fit or variant appends one fsynced record, and the recipe's tables are
built from the records. So when a run stops (Ctrl-C, SIGTERM, a scheduler's time limit, an
exception) the tables are rebuilt from the folds that finished before run.json is marked
"interrupted" or "failed"; and `lungbench train RECIPE --resume RUN` continues that folder:
finished folds are skipped, a fit that wrote checkpoints continues from its
checkpoint_last.pt (exactly; lungbench.train.engine), any other unfinished fit starts again.

    with training_run(out, run_id, config, note, resume=point, on_stop=write_tables) as run:
        done = finished(point, "fold")            # keys of the records already there
        ...                                       # append_record(run.path, ...) per fold
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lungbench.core.errors import UsageError
from lungbench.core.runlock import held_unless_failed
from lungbench.core.runs import (
    RunFolder,
    finish_run,
    marking_run,
    read_records,
    read_run_files,
    run_folder,
    write_json,
)
from lungbench.harness.sweep_state import (
    environment_file,
    resolve_run_dir,
    start_resume,
    stop_on_sigterm,
)
from lungbench.train.engine import TrainingInterrupted

log = logging.getLogger(__name__)  # progress: the CLI shows it on stderr

# Ctrl-C, SIGTERM outside a fit (SweepTerminated is a KeyboardInterrupt) and a signal inside
# a fit (the engine checkpoints and raises TrainingInterrupted): the run is "interrupted".
INTERRUPTED_BY: tuple[type[BaseException], ...] = (TrainingInterrupted, KeyboardInterrupt)


@dataclass(frozen=True)
class ResumePoint:
    """A recipe's run folder to continue: its saved config.json and the records it holds."""

    run_dir: Path
    config: dict[str, Any]
    records: list[dict[str, Any]]
    status: str

    def finished(self, kind: str, key: Callable[[Mapping[str, Any]], Any]) -> dict[Any, dict]:
        """key(record) -> record for the records of `kind` (the last one of a key wins)."""
        return {key(r): r for r in self.records if r.get("kind") == kind}


def recipe_of(config: Mapping[str, Any]) -> str | None:
    """The recipe a train run's config.json belongs to."""
    if isinstance(config.get("experiment"), str):
        return config["experiment"]
    for name in ("chestxray", "nodule2d"):
        if isinstance(config.get(name), Mapping):
            return name
    return None


def open_resume(run: str | os.PathLike, out: str | os.PathLike, recipe: str) -> ResumePoint:
    """`--resume RUN` of `lungbench train RECIPE`: the run folder (a path, or a run id under
    --out) checked to be an unfinished run of that recipe; nothing is written."""
    run_dir = resolve_run_dir(run, out)
    with held_unless_failed(run_dir):  # before reading what finished: one writer
        return _resume_point(run, run_dir, recipe)


def _resume_point(run: str | os.PathLike, run_dir: Path, recipe: str) -> ResumePoint:
    info, config = read_run_files(run_dir)
    found = recipe_of(config) if info.get("kind") == "train" else info.get("kind")
    if found != recipe:
        raise UsageError(
            f"--resume {run}: a {found or 'unknown'!s} run, not a `lungbench train {recipe}` run"
        )
    status = str(info.get("status"))
    if status == "complete":
        raise UsageError(f"--resume {run}: the run is complete; nothing to resume")
    return ResumePoint(run_dir, config, read_records(run_dir), status)


@contextmanager
def training_run(
    out: str | Path,
    run_id: str | None,
    config: Mapping[str, Any],
    note: str,
    *,
    resume: ResumePoint | None = None,
    on_stop: Callable[[Path], None] | None = None,
) -> Iterator[RunFolder]:
    """A recipe's run folder for the block: a new one (OUT/<run-id>/ with config.json and
    environment.json), or `resume`'s folder continued (config.json kept, the environment of
    this part saved as environment-resume<N>.json). SIGTERM outside a fit stops the block
    like Ctrl-C. When the block raises, `on_stop(run_dir)` writes the tables of what finished
    (a failure there is logged, never raised over the first), then run.json is marked
    "interrupted" (a stop) or "failed" (any other error); "complete" (with `data` and the
    run's summary) when the block ends."""
    from lungbench.core.environment import environment_record

    with stop_on_sigterm():
        if resume is None:
            folder = run_folder(
                out,
                "train",
                run_id,
                config,
                environment=environment_record(),
                interrupted_by=INTERRUPTED_BY,
                data=note,
            )
        else:
            folder = _continued(resume.run_dir, environment_record(), data=note)
        with folder as run:
            log.info(f"run folder {run.path}" + (" (resumed)" if resume else ""))
            recipe = recipe_of(resume.config if resume else config) or "RECIPE"
            again = f"lungbench train {recipe} --resume {run.path}"
            try:
                yield run
            except BaseException as exc:
                if on_stop is not None:
                    _tables_after_stop(run.path, on_stop)
                if isinstance(exc, INTERRUPTED_BY):
                    log.info(f"stopped: continue with `{again}`")
                if isinstance(exc, TrainingInterrupted):  # the engine names a checkpoint:
                    # the whole run continues from its folder (fits with checkpoints too)
                    where = str(exc).split("; checkpoint")[0]
                    raise TrainingInterrupted(
                        f"{where}; continue with `{again}`", exc.checkpoint
                    ) from None
                raise


@contextmanager
def _continued(run_dir: Path, environment: Mapping[str, Any], **extra: Any) -> Iterator[RunFolder]:
    """run_folder's life for an existing folder: torn record cut, run.json "running" again."""
    start_resume(run_dir)
    write_json(run_dir / environment_file(run_dir, resumed=True), environment)
    run = RunFolder(run_dir)
    with marking_run(run_dir, INTERRUPTED_BY, **extra):
        yield run
    finish_run(run_dir, "complete", **extra, **run.summary)


def _tables_after_stop(run_dir: Path, write: Callable[[Path], None]) -> None:
    try:
        write(run_dir)
    except Exception as exc:  # the stop is the error to report, not this one
        log.warning(f"could not write the tables of what finished in {run_dir}: {exc}")
        return
    log.info(f"the tables of what finished are in {run_dir / 'tables'}")


def checkpoint_to_resume(fit_dir: Path | None, resume: ResumePoint | None) -> Path | None:
    """A resumed run's fit folder's checkpoint_last.pt, when it has one (the fit continues
    from it exactly); None for a new run or a fit that had not finished an epoch."""
    from lungbench.train.checkpoint import LAST_CHECKPOINT

    if resume is None or fit_dir is None:
        return None
    path = fit_dir / LAST_CHECKPOINT
    return path if path.is_file() else None
