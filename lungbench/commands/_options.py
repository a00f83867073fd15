"""Layer 12 (commands): argparse options made from a config's field declarations, and the config made back from them.

A recipe declares its options on its frozen config (lungbench.core.options: `option`,
`nested`) and its full and --quick values as two instances of it, FULL and QUICK (FULL with
some fields replaced: `QUICK = replaced(FULL, {...})`). `add_config_options` adds one option
per declared field, its help text ending with FULL's value and, where it differs, QUICK's;
`config_from_args` builds the config: QUICK (with --quick) or FULL with the values the user
gave. Without FULL the field defaults stand in for it, without QUICK FULL does.

    add_config_options(parser, MosmedConfig, FULL, QUICK, quick_help="tiny smoke run")
    cfg = config_from_args(parser.parse_args(argv), MosmedConfig, FULL, QUICK)
    add_config_options(parser, Workload, Workload(filters=16), quick_help=None)
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from collections.abc import Iterator
from typing import Any

from lungbench.commands._args import for_argparse
from lungbench.core.options import (
    ON_OFF,
    Nested,
    Option,
    config_from_flat,
    declared_option,
    field_default,
    flat_values,
    replaced,
    spec_of,
)


@dataclasses.dataclass(frozen=True)
class Shown:
    """One option of a config: its field `name` (also argparse's dest), its declaration (a
    nested field's group and overrides applied) and its field default."""

    name: str
    option: Option
    default: Any


def shown_options(cls: type) -> Iterator[Shown]:
    """The options of config `cls` in field order, a nested config's shown fields in place."""
    for f in dataclasses.fields(cls):
        spec = spec_of(f)
        if isinstance(spec, Option):
            yield Shown(f.name, spec, field_default(f))
        elif isinstance(spec, Nested):
            inner = {g.name: g for g in dataclasses.fields(spec.cls)}
            for name, changes in spec.show.items():
                base = spec_of(inner[name]) if name in inner else None
                if not isinstance(base, Option):
                    raise TypeError(f"{spec.cls.__name__}.{name} declares no option")
                if base.group is None:  # the nested field's section, unless it has its own
                    changes = {"group": spec.group, **changes}
                yield Shown(name, dataclasses.replace(base, **changes), field_default(inner[name]))


def check_flat_names(cls: type, *configs: Any) -> None:
    """TypeError when a field of `cls` is also a field of a nested config (the flat names of
    `replaced` and argparse's dests need one meaning per name), or when one of `configs`
    (None: none given) is not a `cls`."""
    names = [f.name for f in dataclasses.fields(cls)]
    for f in dataclasses.fields(cls):
        spec = spec_of(f)
        if isinstance(spec, Nested):
            names += [g.name for g in dataclasses.fields(spec.cls)]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise TypeError(f"{cls.__name__}: fields of the config and a nested one share {twice}")
    for cfg in configs:
        if cfg is not None and not isinstance(cfg, cls):
            raise TypeError(f"{cls.__name__}: FULL/QUICK must be one, got {type(cfg).__name__}")


def shown_value(value: Any) -> str:
    """A default as --help says it: None/False 'off', True 'on', sequences space-separated."""
    if value is None or value is False:
        return "off"
    if value is True:
        return "on"
    if isinstance(value, (tuple, list)):
        return " ".join(map(shown_value, value))
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def help_text(option: Option, full: Any, quick: Any = dataclasses.MISSING) -> str:
    """The option's help and '(default: FULL[, note][; --quick: QUICK])'."""
    said = option.default_text or shown_value(full)
    if option.default_note:
        said += f", {option.default_note}"
    if quick is not dataclasses.MISSING and not option.default_text:
        said += f"; --quick: {shown_value(quick)}"
    return f"{option.help} (default: {said})"


def section(parser: argparse.ArgumentParser, title: str | None) -> Any:
    """The parser's argument group `title` (made on first use); None: the parser itself."""
    if title is None:
        return parser
    for group in parser._action_groups:
        if group.title == title:
            return group
    return parser.add_argument_group(title)


def add_config_options(
    parser: argparse.ArgumentParser,
    cls: type,
    full: Any = None,
    quick: Any = None,
    *,
    quick_help: str | None,
) -> None:
    """--quick (unless `quick_help` is None: a config without a quick size) and one option
    per declared field of `cls` (nested ones included), its help text saying the value of
    config `full` (None: the field's default) and, where it differs, the value of config
    `quick`; every option's argparse default is None, so that config_from_args sees what
    the user gave."""
    check_flat_names(cls, full, quick)
    fulls = flat_values(full) if full is not None else {}
    quicks = flat_values(quick) if quick is not None else {}
    if quick_help is not None:
        parser.add_argument("--quick", action="store_true", help=quick_help)
    for shown in shown_options(cls):
        option, name = shown.option, shown.name
        value = fulls.get(name, shown.default)
        if value is dataclasses.MISSING:
            raise TypeError(f"{cls.__name__}: option {name} has no default in FULL or the field")
        flag = option.flag_of(name)
        quick_value = quicks.get(name, dataclasses.MISSING)
        if quick_value == value:
            quick_value = dataclasses.MISSING  # --quick keeps the full value: not said
        text = help_text(option, value, quick_value)
        how = {"dest": name, "default": None, "help": text.replace("%", "%%")}
        how.update(argparse_keywords(option, flag, value))
        section(parser, option.group).add_argument(flag, **how)
        for alias in option.aliases:  # an old spelling: accepted, hidden, warned about
            hidden = {**how, "help": argparse.SUPPRESS}
            if "action" not in hidden:
                hidden["action"] = renamed(flag)
            parser.add_argument(alias, **hidden)


def argparse_keywords(option: Option, flag: str, default: Any) -> dict[str, Any]:
    """add_argument's action, type, choices, nargs and metavar of a declared option whose
    field default is `default` (a bool one is a switch)."""
    how: dict[str, Any] = {}
    switch = isinstance(default, bool) and option.choices is None and option.type is None
    if option.action is None and switch:
        how["action"] = "store_false" if flag.startswith("--no-") else "store_true"
    elif option.action == ON_OFF:
        how["action"] = argparse.BooleanOptionalAction
    else:
        if option.action is not None:
            how["action"] = option.action
        if option.type is not None:
            how["type"] = for_argparse(option.type)
        for key in ("choices", "nargs", "metavar"):
            if getattr(option, key) is not None:
                how[key] = getattr(option, key)
    return how


def add_declared(parser: argparse.ArgumentParser, cls: type, name: str, **changes: Any) -> None:
    """Option `name` as config `cls` declares it (flag, value parser), with `changes`: how
    `predict` takes several target values of the workload's options. Its argparse default
    is None (not given) and its help says no default.

        add_declared(p, Workload, "filters", nargs="+", help="base widths")
    """
    option = dataclasses.replace(declared_option(cls, name), **changes)
    flag = option.flag_of(name)
    how = {"dest": name, "default": None, "help": option.help.replace("%", "%%")}
    how.update(argparse_keywords(option, flag, None))
    section(parser, option.group).add_argument(flag, **how)


def renamed(current: str) -> type[argparse.Action]:
    """An argparse action that stores the value and says the option's current spelling."""

    class Renamed(argparse.Action):
        def __call__(self, parser, namespace, values, option_string=None):
            logging.getLogger(__name__).warning(
                f"note: {option_string} is now {current}; the old spelling goes in a later release"
            )
            setattr(namespace, self.dest, values)

    return Renamed


def config_from_args(
    args: argparse.Namespace,
    cls: type,
    full: Any = None,
    quick: Any = None,
    **fixed: Any,
) -> Any:
    """Config `cls` from options added by add_config_options: config `quick` (with --quick,
    if given) or `full` (None: the field defaults) with the values the user gave (converted);
    `fixed` sets fields (of `cls` or a nested config) outright."""
    check_flat_names(cls, full, quick)
    base = quick if quick is not None and getattr(args, "quick", False) else full
    changes = {**given_values(args, cls), **fixed}
    return config_from_flat(cls, changes) if base is None else replaced(base, changes)


def given_values(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The options of `cls` the user gave (argparse defaults are None), converted."""
    given = {}
    for shown in shown_options(cls):
        value = getattr(args, shown.name, None)
        if value is not None:
            if shown.option.convert is not None:
                value = shown.option.convert(value)
            given[shown.name] = tuple(value) if isinstance(value, list) else value
    return given


def flag_of(cls: type, name: str) -> str:
    """The command-line flag of option `name` of config `cls`."""
    for shown in shown_options(cls):
        if shown.name == name:
            return shown.option.flag_of(name)
    return "--" + name.replace("_", "-")
