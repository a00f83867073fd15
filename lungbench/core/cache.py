"""Layer 1 (core): what lungbench measured about this host, kept between runs.

One JSON file per kind (`tuning.json`, `peaks.json`) in $LUNGBENCH_CACHE_DIR (default
~/.cache/lungbench), as {"version": 1, "entries": {key: value}}. A file that cannot be read
is replaced with a note, never fatal; a home that cannot be written costs a note and a
re-measurement next time. Keys start with `where_key(device)`: a value is reused only on
the host, device and torch version that measured it.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lungbench.core.environment import cpu_model
from lungbench.core.runs import to_jsonable

log = logging.getLogger(__name__)

VERSION = 1


def cache_dir() -> Path:
    """$LUNGBENCH_CACHE_DIR, else ~/.cache/lungbench."""
    return Path(os.environ.get("LUNGBENCH_CACHE_DIR") or Path.home() / ".cache" / "lungbench")


def where_key(device: torch.device) -> str:
    """'host|device model (threads)|torch version': what a measurement depends on."""
    where = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu {cpu_model()} x{torch.get_num_threads()}"
    )
    return f"{socket.gethostname()}|{where}|torch {torch.__version__}"


def read_cache(name: str) -> dict[str, Any]:
    """The entries of cache file `name` ({} when missing or unreadable, with a note)."""
    path = cache_dir() / name
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
        if data.get("version") != VERSION or not isinstance(data.get("entries"), dict):
            raise ValueError("unknown layout")
        return data["entries"]
    except (OSError, ValueError, AttributeError) as exc:
        log.warning(f"note: cache {path} is unreadable ({exc}); it will be replaced")
        return {}


def write_cache(name: str, entries: dict[str, Any]) -> None:
    """Replace cache file `name` atomically (a note when it cannot be written)."""
    path = cache_dir() / name
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")  # two writers never share a file
        tmp.write_text(json.dumps(to_jsonable({"version": VERSION, "entries": entries})))
        os.replace(tmp, path)
    except OSError as exc:  # a read-only home: measure again next time, say so
        log.warning(f"note: could not write the cache {path} ({exc})")


def kept_measurement(
    cached: dict[str, Any] | None,
    fresh: dict[str, Any],
    busy_reason: str | None,
    best: Callable[[dict[str, Any], dict[str, Any]], dict[str, Any]],
) -> dict[str, Any]:
    """The cache entry after a fresh measurement; entries say how they were measured in
    "busy_reason" (None: quiet; entries from before it existed count as quiet).

    Quiet after quiet: the best of both. Quiet after busy or nothing: the fresh one replaces
    it. Busy after quiet: the quiet one stays. Busy after busy or nothing: kept (the best of
    both), marked busy, so the same question gets the same answer on a busy machine until a
    quiet measurement replaces it."""
    old = {k: v for k, v in (cached or {}).items() if k != "busy_reason"}
    was_busy = bool(cached) and cached.get("busy_reason") is not None
    if busy_reason is None:
        return {**(best(old, fresh) if old and not was_busy else fresh), "busy_reason": None}
    if old and not was_busy:
        return dict(cached)
    return {**(best(old, fresh) if old else fresh), "busy_reason": busy_reason}


def busy_reason_of(watch_result: dict[str, Any]) -> str | None:
    """A ContentionWatch result's reason when it found the machine busy, else None."""
    if not watch_result.get("busy"):
        return None
    return watch_result.get("busy_reason") or "the machine was busy"
