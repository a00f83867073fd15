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
import math
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


# Per cache file, the check of one entry's value (registered by the module that owns the file).
SCHEMAS: dict[str, Callable[[Any], bool]] = {}


def register_schema(name: str, check: Callable[[Any], bool]) -> None:
    """Entries of cache file `name` must pass `check` (True); read_cache drops the others."""
    SCHEMAS[name] = check


def read_cache(name: str) -> dict[str, Any]:
    """The entries of cache file `name` ({} when missing or unreadable, with a note). Entries
    its schema refuses (a string, None, NaN or a negative number where a measurement belongs)
    are dropped with a note and the file rewritten without them: they are measured again."""
    path = cache_dir() / name
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
        if data.get("version") != VERSION or not isinstance(data.get("entries"), dict):
            raise ValueError("unknown layout")
    except (OSError, ValueError, AttributeError) as exc:
        log.warning(f"note: cache {path} is unreadable ({exc}); it will be replaced")
        return {}
    entries, check = data["entries"], SCHEMAS.get(name)
    bad = [key for key, value in entries.items() if check is not None and not _passes(check, value)]
    if bad:
        log.warning(
            f"note: cache {path}: {len(bad)} entr{'y' if len(bad) == 1 else 'ies'} not a valid "
            f"measurement, dropped (measured again): {', '.join(map(repr, bad))[:300]}"
        )
        entries = {k: v for k, v in entries.items() if k not in bad}
        write_cache(name, entries)
    return entries


def _passes(check: Callable[[Any], bool], value: Any) -> bool:
    try:
        return bool(check(value))
    except Exception:  # noqa: BLE001 - any failure to read the entry makes it invalid
        return False


def measured_number(value: Any, zero: bool = False) -> bool:
    """A finite number above 0 (`zero`: at or above), not a bool or a string."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return False
    return value >= 0 if zero else value > 0


def measured_numbers(entry: Any) -> bool:
    """A mapping of names to measured numbers (spreads may be 0), with an optional
    "busy_reason" (None or text): the peaks, convolution rates and bandwidth curve."""
    if not isinstance(entry, dict) or not entry:
        return False
    for name, value in entry.items():
        if name == "busy_reason":
            if value is not None and not isinstance(value, str):
                return False
        elif not measured_number(value, zero=str(name).endswith("_spread")):
            return False
    return True


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


def best_of(cached: dict[str, Any], fresh: dict[str, Any]) -> dict[str, Any]:
    """Per measured number the higher of the cached and the fresh one, the best this host
    has done (a spread: the fresh one's; a number only the cache has: kept)."""
    merged = dict(fresh)
    for name, value in cached.items():
        if name == "busy_reason" or str(name).endswith("_spread") or not measured_number(value):
            continue
        if value > merged.get(name, 0.0):
            merged[name] = value
    return merged


def kept_measurement(
    cached: dict[str, Any] | None,
    fresh: dict[str, Any],
    busy_reason: str | None,
    best: Callable[[dict[str, Any], dict[str, Any]], dict[str, Any]] = best_of,
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
