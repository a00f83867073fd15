"""Layer 1 (core): one writer per run folder: an exclusive lock held for the writer's life.

Every command that writes a run folder (a new run, or `--resume` of one) holds an exclusive
`fcntl.flock` on RUN/.lock from before it reads the records until it marks run.json
finished (or exits). A second writer is refused in one line naming the process that holds
the folder (pid, host, command): two `bench --resume` of one folder would otherwise both
measure the configurations missing from it and write each twice.

flock, not a pid file: the kernel drops the lock when its process dies (a SIGKILL, an
out-of-memory kill, a node reboot), so a stale lock is never left to clean up; the next
writer takes it over and overwrites the holder's note. Locks are per process and
re-entrant within it (a reproduction that resumes its own twins locks each folder once).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import sys
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

from lungbench.core.errors import UsageError

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"

# run folder (resolved) -> the open file descriptor that holds its lock
_held: dict[str, int] = {}


def _holder_note() -> str:
    command = f"lungbench {' '.join(sys.argv[1:])}".strip()  # a note, never run
    return json.dumps(
        {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "command": command[:300],
            "since_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
    )


def holder(run_dir: str | os.PathLike) -> str:
    """'pid N on HOST (COMMAND) since T' of the process holding `run_dir`, as far as its
    note says ('another process' when the note is missing or being written)."""
    try:
        note = json.loads((Path(run_dir) / LOCK_FILE).read_text(encoding="utf-8"))
        return (
            f"pid {int(note['pid'])} on {note['host']} ({note['command']}) "
            f"since {note['since_utc']}"
        )
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


def lock_run(run_dir: str | os.PathLike) -> None:
    """Hold `run_dir`'s exclusive lock from now until `unlock_run` or this process ends;
    UsageError naming the holder when another process has it."""
    key = str(Path(run_dir).resolve())
    if key in _held:
        return
    fd = os.open(Path(run_dir) / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise UsageError(
            f"run folder {run_dir} is in use by {holder(run_dir)}; wait for it to finish "
            "or stop it, then try again"
        ) from None
    except OSError as exc:  # a file system without locks (some NFS): say so, go on unlocked
        os.close(fd)
        log.warning(f"note: cannot lock {run_dir} ({exc}); another writer would not be stopped")
        return
    # ours now: a killed holder's note is overwritten
    os.ftruncate(fd, 0)
    os.pwrite(fd, _holder_note().encode(), 0)
    _held[key] = fd


def unlock_run(run_dir: str | os.PathLike) -> None:
    """Release `run_dir`'s lock if this process holds it (the note stays; it is stale)."""
    fd = _held.pop(str(Path(run_dir).resolve()), None)
    if fd is not None:
        os.close(fd)  # closing the descriptor releases the flock


@contextlib.contextmanager
def held_unless_failed(run_dir: str | os.PathLike) -> Iterator[None]:
    """`run_dir`'s lock taken for the block and kept after it (until finish_run), given back
    if the block raises: a refused --resume leaves the folder free."""
    lock_run(run_dir)
    try:
        yield
    except BaseException:
        unlock_run(run_dir)
        raise


def holds(run_dir: str | os.PathLike) -> bool:
    """Whether this process holds `run_dir`'s lock."""
    return str(Path(run_dir).resolve()) in _held
