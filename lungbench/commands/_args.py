"""Layer 12 (commands): Argument types shared by the commands (argparse turns their errors into exit code 2).

The value parsers themselves live in lungbench.core.options (config fields declare them);
here they raise argparse's error type, so that argparse shows their message as it is.
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable
from typing import Any

from lungbench.core import options


def for_argparse(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """`parse` as an argparse type: its OptionValueError becomes argparse's one-line error."""

    @functools.wraps(parse)
    def typed(text: str) -> Any:
        try:
            return parse(text)
        except options.OptionValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return typed


positive_int = for_argparse(options.positive_int)
non_negative_int = for_argparse(options.non_negative_int)
unit_fraction = for_argparse(options.unit_fraction)
percent = for_argparse(options.percent)
non_negative_float = for_argparse(options.non_negative_float)
positive_float = for_argparse(options.positive_float)


def add_dist_timeout(group) -> None:
    """--dist-timeout, for every command that runs under a launcher (torchrun, srun, mpiexec)."""
    group.add_argument(
        "--dist-timeout",
        type=positive_float,
        default=1800.0,
        metavar="SECONDS",
        help="end the job with an error when a rank dies or does not answer for this long, "
        "rendezvous included (default: 1800)",
    )
