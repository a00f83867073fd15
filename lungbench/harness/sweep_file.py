"""Layer 7 (harness): Sweep files: a `lungbench bench` sweep written down in TOML, so it can be versioned.

    # bench/sweeps/thesis.toml
    model = "dualpath3d"
    preset = "dey2018"
    filters = [8, 16]
    batch = [2]
    device = ["cpu"]

    lungbench bench --config bench/sweeps/thesis.toml            # the file as written
    lungbench bench --config bench/sweeps/thesis.toml --repeats 3  # the command line wins

Keys are the long option names of `lungbench bench` (with '_' or '-'), or the field names
of `BenchRequest`; an unknown key is an error that lists the valid ones. Values are checked
by the same rules as the options. Both come from the request's option declarations
(lungbench.core.options): an option spelt unlike its field (--batch for batch_sizes) is a
key for it, and a field whose option takes an integer >= 1 takes one here too. A negated
switch (--no-epoch) is set by its field's name instead (epoch = false).
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lungbench.core.errors import DataError, UsageError, look_up_option
from lungbench.core.options import Option, positive_int, spec_of

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 needs the backport
    import tomli as tomllib


# Keys a sweep file may carry that configure nothing (documentation for people).
FREE_TEXT = ("description",)


def _options(request_type: type) -> dict[str, Option]:
    """The request's fields declared as options, by field name."""
    found = ((f.name, spec_of(f)) for f in dataclasses.fields(request_type))
    return {name: spec for name, spec in found if isinstance(spec, Option)}


def aliases(request_type: type) -> dict[str, str]:
    """Option names that differ from the field they set (batch -> batch_sizes); negated
    switches (--no-epoch) are left out: their key is the field's (epoch = false)."""
    found = {}
    for name, spec in _options(request_type).items():
        key = spec.flag_of(name).removeprefix("--").replace("-", "_")
        if key != name and not key.startswith("no_"):
            found[key] = name
    return found


def positive_fields(request_type: type) -> tuple[str, ...]:
    """Fields whose values must be >= 1 (the rest of the integers must be >= 0)."""
    return tuple(n for n, spec in _options(request_type).items() if spec.type is positive_int)


def read_sweep_file(path: str | os.PathLike) -> dict[str, Any]:
    """The raw TOML table of a sweep file (DataError if missing or not TOML)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"--config {path}: file not found")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"--config {path}: not valid TOML ({exc})") from None


def parse_sweep(table: Mapping[str, Any], defaults: Any, source: str = "--config") -> dict:
    """Validated BenchRequest field values from a sweep table (UsageError on bad keys/values)."""
    names = [f.name for f in dataclasses.fields(defaults)]
    alias = aliases(type(defaults))
    positive = positive_fields(type(defaults))
    options = _options(type(defaults))
    valid = sorted({*names, *alias, *FREE_TEXT})
    values: dict[str, Any] = {}
    for raw_key, value in table.items():
        key = raw_key.replace("-", "_")
        if key not in valid:
            look_up_option(raw_key, valid, what=f"key in {source}")
        if key in FREE_TEXT:
            continue
        field = alias.get(key, key)
        where = f"{source}: {raw_key}"
        coerced = _coerce(field, value, getattr(defaults, field), where, positive)
        values[field] = _as_the_command_line(options.get(field), coerced, where)
    return values


def _as_the_command_line(spec: Option | None, value: Any, where: str) -> Any:
    """`value` through the option's own command-line validator (positive_float, ...), so a
    file takes exactly what the command line takes (ci_target = 0 is refused by both)."""
    if spec is None or spec.type is None or not isinstance(value, (int, float, tuple)):
        return value
    for item in value if isinstance(value, tuple) else (value,):
        if item is None or isinstance(item, bool):
            continue
        try:
            spec.type(str(item))
        except (ValueError, TypeError) as exc:
            raise UsageError(f"{where}: {item!r}: {exc}") from None
    return value


def apply_sweep_file(path: str | os.PathLike, given: Any, defaults: Any) -> Any:
    """`given` (from the command line) with the file's values where the command line kept
    the default: the command line wins over the file, the file over the defaults."""
    values = parse_sweep(read_sweep_file(path), defaults, source=f"--config {path}")
    merged = {}
    for f in dataclasses.fields(given):
        mine, default = getattr(given, f.name), getattr(defaults, f.name)
        merged[f.name] = values.get(f.name, mine) if mine == default else mine
    return type(given)(**merged)


def _coerce(field: str, value: Any, default: Any, where: str, positive: tuple[str, ...]) -> Any:
    """One value, typed like the field's default (tuple, bool, int, Path or str); the
    integers of the `positive` fields must be >= 1, the others >= 0."""
    low = 1 if field in positive else 0
    if isinstance(default, tuple):
        items = value if isinstance(value, list) else [value]
        if not items:
            raise UsageError(f"{where}: needs at least one value")
        kind = int if field in positive else type(next((d for d in default if d is not None), ""))
        return tuple(_scalar(v, kind, where, low) for v in items)
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise UsageError(f"{where}: expected true or false, got {value!r}")
        return value
    if field == "run_id":
        return _scalar(value, str, where, low)
    if isinstance(default, Path) or field in ("store", "out"):
        if not isinstance(value, str) or not value:
            raise UsageError(f"{where}: expected a path string, got {value!r}")
        return Path(value)
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise UsageError(f"{where}: expected a number >= 0, got {value!r}")
        return float(value)
    if isinstance(default, int) or field in positive:
        return _scalar(value, int, where, low)
    if default is None:  # an optional switch (tf32, pin_memory, ...): checked where it is used
        if not isinstance(value, (str, int, float, bool)):
            raise UsageError(f"{where}: expected a single value, got {value!r}")
        return value
    return _scalar(value, str, where, low)


def _scalar(value: Any, kind: type, where: str, low: int) -> Any:
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UsageError(f"{where}: expected an integer, got {value!r}")
        if value < low:
            raise UsageError(f"{where}: must be >= {low}, got {value}")
        return value
    if not isinstance(value, str):
        raise UsageError(f"{where}: expected a string, got {value!r}")
    return value
