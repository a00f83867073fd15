"""Layer 1 (core): Command-line options declared where the value lives: on a config's fields.

`option(...)` is `dataclasses.field(...)` with the option's flag, help text and value parser
in the field's metadata; `nested(...)` marks a field holding another config (a recipe's
TrainConfig) whose fields are offered as options too. The recipes declare their options this
way without importing argparse; lungbench.commands._options turns the declarations into
argparse options (help text with the full and the --quick default) and builds the frozen
config back from the parsed options.

    @dataclass(frozen=True)
    class Config:
        n: int = option(600, type=positive_int, group="data", help="generated crops")
        train: TrainConfig = nested(TrainConfig, group="training", show={"epochs": {}})

A recipe's full-size values are an instance of its config (only the fields that differ from
their defaults given), its --quick values that instance with some fields replaced, named by
their flat names (a nested config's fields by their own names, as the options are):

    FULL = Config(n=400, train=TrainConfig(epochs=30))
    QUICK = replaced(FULL, {"n": 60, "epochs": 2})

The value parsers (positive_int, unit_fraction, ...) turn text typed by a user into a value
or raise OptionValueError saying what was expected.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

OPTION = "lungbench.option"  # the metadata key of option() and nested()

ON_OFF = "on_off"  # Option.action of a --X / --no-X pair (None when neither is given)


@dataclasses.dataclass(frozen=True)
class Option:
    """How a config field appears on the command line.

    flag: the option string (default: --field-name). type, choices, nargs, metavar, action:
    as argparse's; a bool field becomes a switch (store_true, or store_false for a --no-
    flag), and action=ON_OFF makes a pair --X / --no-X of a field that is None unless one
    of them is given ("auto"). group: the --help section. The help text ends with the default, "(default: V;
    --quick: Q)": `default_text` says it in words instead of the value, `default_note` is
    said after it. convert: the parsed value -> the field's value (lists become tuples).
    aliases: old spellings still accepted for a release, hidden from --help, each use
    warned about with the current one.
    """

    help: str
    flag: str | None = None
    type: Callable[[str], Any] | None = None
    choices: Sequence[Any] | None = None
    nargs: int | str | None = None
    metavar: str | tuple[str, ...] | None = None
    action: str | None = None
    group: str | None = None
    default_text: str | None = None
    default_note: str | None = None
    convert: Callable[[Any], Any] | None = None
    aliases: tuple[str, ...] = ()

    def flag_of(self, name: str) -> str:
        return self.flag or "--" + name.replace("_", "-")


@dataclasses.dataclass(frozen=True)
class Nested:
    """A field holding config `cls`; its fields named in `show` are options too, each with
    those Option fields replaced (e.g. {"epochs": {"help": "epochs per fold"}})."""

    cls: type
    show: Mapping[str, Mapping[str, Any]]
    group: str | None = None


def option(default: Any = dataclasses.MISSING, *, help: str, **how: Any) -> Any:
    """A dataclass field that is also a command-line option (see Option for `how`)."""
    spec = Option(help=help, **how)
    return dataclasses.field(default=default, metadata={OPTION: spec})


def nested(cls: type, *, show: Mapping[str, Mapping[str, Any]], group: str | None = None) -> Any:
    """A dataclass field holding config `cls`, the fields in `show` offered as options."""
    return dataclasses.field(metadata={OPTION: Nested(cls, dict(show), group)})


def option_like(cls: type, name: str, default: Any = dataclasses.MISSING, **changes: Any) -> Any:
    """A field that is option `name` of config `cls` (its flag, type and help declared once,
    there) with `changes`: a sweep's list of values, another section, a longer help.

        filters: tuple[int, ...] = option_like(Workload, "filters", (8, 16), nargs="+")
    """
    spec = declared_option(cls, name)
    return dataclasses.field(
        default=default, metadata={OPTION: dataclasses.replace(spec, **changes)}
    )


def declared_option(cls: type, name: str) -> Option:
    """The Option declared on field `name` of config `cls`; TypeError when it has none."""
    for f in dataclasses.fields(cls):
        if f.name == name and isinstance(spec_of(f), Option):
            return spec_of(f)
    raise TypeError(f"{cls.__name__}.{name} declares no option")


def spec_of(f: dataclasses.Field) -> Option | Nested | None:
    """The field's option declaration, if any."""
    return f.metadata.get(OPTION)


def field_default(f: dataclasses.Field) -> Any:
    """The field's default value, or dataclasses.MISSING."""
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


class OptionValueError(ValueError):
    """Text that is not a valid value of an option; the message says what was expected."""


def _parsed(
    text: str, cast: Callable[[str], Any], valid: Callable[[Any], bool], expected: str, bound: str
) -> Any:
    """`cast(text)` if `valid`, else OptionValueError: 'expected EXPECTED' / 'must be BOUND'."""
    try:
        value = cast(text)
    except ValueError:
        raise OptionValueError(f"expected {expected}, got {text!r}") from None
    if not valid(value):
        raise OptionValueError(f"must be {bound}, got {value}")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1."""
    return _parsed(text, int, lambda v: v >= 1, "an integer >= 1", ">= 1")


def non_negative_int(text: str) -> int:
    """An integer >= 0."""
    return _parsed(text, int, lambda v: v >= 0, "an integer >= 0", ">= 0")


def unit_fraction(text: str) -> float:
    """A float in (0, 1)."""
    return _parsed(text, float, lambda v: 0.0 < v < 1.0, "a number in (0, 1)", "in (0, 1)")


def percent(text: str) -> float:
    """A percentage in [0, 1000)."""
    return _parsed(text, float, lambda v: 0.0 <= v < 1000.0, "a percentage", "in [0, 1000)")


def non_negative_float(text: str) -> float:
    """A finite number >= 0."""
    return _parsed(
        text, float, lambda v: v >= 0 and math.isfinite(v), "a number >= 0", "a finite number >= 0"
    )


def positive_float(text: str) -> float:
    """A finite number > 0."""
    return _parsed(
        text, float, lambda v: v > 0 and math.isfinite(v), "a number > 0", "a finite number > 0"
    )


def config_from_dict(cls: type, data: Mapping[str, Any]) -> Any:
    """Config `cls` back from its saved form (dataclasses.asdict, as in config.json): a
    nested config built from its own dict, JSON lists made tuples again; fields missing
    from `data` keep their defaults, and fields the class computes (init=False) are its own.

        cfg = config_from_dict(ChestXrayConfig, read_json(run / "config.json")["chestxray"])
    """
    kwargs = {}
    for f in dataclasses.fields(cls):
        if not f.init or f.name not in data:
            continue
        value = data[f.name]
        spec = spec_of(f)
        if isinstance(spec, Nested) and isinstance(value, Mapping):
            value = config_from_dict(spec.cls, value)
        kwargs[f.name] = _tuples(value)
    return cls(**kwargs)


def _tuples(value: Any) -> Any:
    """JSON lists (also nested ones) as tuples, the configs' sequence type."""
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    return value


def config_from_flat(cls: type, values: Mapping[str, Any]) -> Any:
    """Config `cls` from flat values (the options' names: a nested config's fields by their
    own names); fields missing there keep their defaults.

        cfg = config_from_flat(MosmedConfig, {"epochs": 2, "synth_n": 32})
    """
    kwargs = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        if f.name in values:
            kwargs[f.name] = values[f.name]
        elif isinstance(spec_of(f), Nested):
            kwargs[f.name] = config_from_flat(spec_of(f).cls, values)
    return cls(**kwargs)


def flat_values(cfg: Any) -> dict[str, Any]:
    """A config's field values by name, a nested config's fields in place of it (the flat
    names of the options and of `replaced`)."""
    values = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(spec_of(f), Nested):
            values.update(flat_values(value))
        else:
            values[f.name] = value
    return values


def replaced(cfg: Any, changes: Mapping[str, Any]) -> Any:
    """`cfg` with the flat `changes` (fields of it or of a nested config, by their own names)
    applied; TypeError for a name that is neither.

        QUICK = replaced(FULL, {"epochs": 2, "synth_n": 32})
    """
    values = flat_values(cfg)
    unknown = sorted(set(changes) - set(values) - {f.name for f in dataclasses.fields(cfg)})
    if unknown:
        raise TypeError(f"{type(cfg).__name__}: no field {unknown}")
    return config_from_flat(type(cfg), {**values, **changes})
