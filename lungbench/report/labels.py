"""Layer 10 (report): One readable label for a benchmark configuration, everywhere it is shown.

    config_label(record)  # 'f8 b2, 2 threads, bf16'
    config_label({"key": "dualpath3d|default|f8|b2|cpu|tNone|auto|auto|auto"})
                          # 'f8 b2, default threads, dtype auto'

The label says what ran when the record knows it (threads_used, dtype_used, ...) and what was
asked otherwise (the key's fields). The key (model|preset|f|b|device|t|dtype|format|compile)
stays the identifier in every CSV; the label is for people: tables, plots, the console.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

DEFAULT_MODEL = ("dualpath3d", "default")
KEY_FIELDS = ("model", "preset", "filters", "batch_size", "device", "threads", "dtype")
KEY_SWITCHES = ("memory_format", "compile")
# Switch values that are the default: not worth a word in the label.
PLAIN = {None, "", "auto", "contiguous", "off", "none", "None", "False", False}


def fields_from_key(key: str) -> dict[str, Any]:
    """The configuration fields a key holds ({} for text that is not a key)."""
    parts = str(key).split("|")
    if len(parts) != len(KEY_FIELDS) + len(KEY_SWITCHES):
        return {}
    values: dict[str, Any] = dict(zip((*KEY_FIELDS, *KEY_SWITCHES), parts, strict=True))
    for name, prefix in (("filters", "f"), ("batch_size", "b"), ("threads", "t")):
        text = str(values[name]).removeprefix(prefix)
        values[name] = int(text) if text.isdigit() else None
    return values


def config_label(record: Mapping[str, Any]) -> str:
    """'f8 b2, 2 threads, bf16' (plus the model, device, world size and switches when they
    are not the defaults); the key itself when the record holds neither fields nor a key."""
    known = {**fields_from_key(str(record.get("key", ""))), **_present(record)}
    if known.get("filters") is None and known.get("batch_size") is None:
        return str(record.get("key", "?"))
    words = []
    model = (known.get("model"), known.get("preset"))
    head = f"f{known.get('filters')} b{known.get('batch_size')}"
    if model[0] is not None and model != DEFAULT_MODEL:
        head = f"{model[0]}{'' if model[1] in (None, 'default') else '/' + str(model[1])} {head}"
    words.append(head)
    words.append(_where(known))
    world = known.get("world_size")
    if isinstance(world, int) and world > 1:
        words.append(f"{world} ranks")
    dtype = _used(known, "dtype")
    words.append(f"dtype {dtype}" if dtype in PLAIN else str(dtype))
    for switch in KEY_SWITCHES:
        value = _used(known, switch)
        if value not in PLAIN:
            words.append(
                "compiled" if switch == "compile" and value in ("on", True) else str(value)
            )
    return ", ".join(w for w in words if w)


def _present(record: Mapping[str, Any]) -> dict[str, Any]:
    """The record's own fields that are set (NaN, as read back from a CSV, is not set)."""
    return {k: v for k, v in record.items() if v is not None and v == v}


def _used(known: Mapping[str, Any], name: str) -> Any:
    """What ran (`NAME_used`), else what was asked."""
    used = known.get(f"{name}_used")
    return used if used not in (None, "") else known.get(name)


def _where(known: Mapping[str, Any]) -> str:
    """'2 threads' on the CPU, the device otherwise."""
    device = str(known.get("device") or "cpu")
    if device != "cpu":
        return device
    threads = _used(known, "threads")
    if isinstance(threads, float) and threads.is_integer():
        threads = int(threads)
    if not isinstance(threads, int):
        return "default threads"
    return f"{threads} thread{'s' if threads != 1 else ''}"
