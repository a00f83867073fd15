"""Layer 12 (commands): one module per CLI command; each has `register(subparsers)`. Parsing only: no work here.

Commands are registered lazily, so that a command pays only for the imports it uses:
`lungbench --version` and `lungbench --help` import no command module (their modules pull
torch, MONAI, pandas or matplotlib), and `lungbench report` never imports a training
recipe. A `LazySubParsers` knows each sub-command by its name and one-line help (enough for
`--help`) and builds the command's full parser, importing its module, only when that name is
parsed (`lungbench bench ...`, `lungbench bench --help`).
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable
from dataclasses import dataclass

Register = Callable[[argparse._SubParsersAction], None]


@dataclass(frozen=True)
class Lazy:
    """A sub-command known before its module is imported: its one-line help for `--help`,
    and `register(subparsers)`, which adds its full parser when the command is chosen."""

    help: str
    register: Register


def lazy_module(module: str, help: str) -> Lazy:
    """A sub-command whose module (imported on demand) has `register(subparsers)`."""
    return Lazy(help, lambda subparsers: importlib.import_module(module).register(subparsers))


class LazySubParsers(argparse._SubParsersAction):
    """argparse's sub-parsers, with placeholders that become the full parser on first use.

    Use as `parser.add_subparsers(action=LazySubParsers, ...)`, then `add_lazy(name, Lazy)`.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._lazy: dict[str, Lazy] = {}

    def add_lazy(self, name: str, entry: Lazy) -> None:
        self.add_parser(name, help=entry.help)  # a placeholder: `--help` lists name and help
        self._lazy[name] = entry

    def load(self, name: str) -> argparse.ArgumentParser:
        """The full parser of `name`, built (its module imported) the first time it is asked."""
        entry = self._lazy.pop(name, None)
        if entry is not None:
            # The command registers into a scratch action with the same prog prefix and
            # parser class; its parser then replaces the placeholder (argparse refuses a
            # second add_parser of one name).
            scratch = argparse._SubParsersAction(
                option_strings=[], prog=self._prog_prefix, parser_class=self._parser_class
            )
            entry.register(scratch)
            self._name_parser_map[name] = scratch._name_parser_map[name]
            remember_leaf_parsers(self._name_parser_map[name])
        return self._name_parser_map[name]

    def load_all(self) -> None:
        """Every sub-command's full parser (for tests and documentation; imports them all)."""
        for name in list(self._lazy):
            load_nested(self.load(name))

    def __call__(self, parser, namespace, values, option_string=None):
        if values and values[0] in self._lazy:
            self.load(values[0])
        super().__call__(parser, namespace, values, option_string)


def subparser_actions(parser: argparse.ArgumentParser) -> list[argparse._SubParsersAction]:
    return [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]


def load_nested(parser: argparse.ArgumentParser) -> None:
    """Build every lazy sub-command under `parser`, at every depth."""
    for action in subparser_actions(parser):
        if isinstance(action, LazySubParsers):
            action.load_all()
        for sub in action.choices.values():
            load_nested(sub)


def remember_leaf_parsers(parser: argparse.ArgumentParser) -> None:
    """Each command's own parser in its namespace (`_parser`), so that an unknown option is
    reported by that command ("see `lungbench bench --help`"), not by the top level."""
    actions = subparser_actions(parser)
    if not actions:
        parser.set_defaults(_parser=parser)
    for action in actions:
        for sub in action.choices.values():
            remember_leaf_parsers(sub)
