"""Layer 10 (commands): Argument types shared by the commands (argparse turns their errors into exit code 2)."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable


def _parsed(
    text: str,
    cast: Callable[[str], float],
    valid: Callable[[float], bool],
    expected: str,
    bound: str,
):
    """`cast(text)` if `valid`, else argparse's error: 'expected EXPECTED' / 'must be BOUND'."""
    try:
        value = cast(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if not valid(value):
        raise argparse.ArgumentTypeError(f"must be {bound}, got {value}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    return _parsed(text, int, lambda v: v >= 1, "an integer >= 1", ">= 1")


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    return _parsed(text, int, lambda v: v >= 0, "an integer >= 0", ">= 0")


def unit_fraction(text: str) -> float:
    """argparse type: a float in (0, 1)."""
    return _parsed(text, float, lambda v: 0.0 < v < 1.0, "a number in (0, 1)", "in (0, 1)")


def percent(text: str) -> float:
    """argparse type: a percentage in [0, 1000)."""
    return _parsed(text, float, lambda v: 0.0 <= v < 1000.0, "a percentage", "in [0, 1000)")


def non_negative_float(text: str) -> float:
    """argparse type: a finite number >= 0."""
    return _parsed(
        text, float, lambda v: v >= 0 and math.isfinite(v), "a number >= 0", "a finite number >= 0"
    )


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    return _parsed(
        text, float, lambda v: v > 0 and math.isfinite(v), "a number > 0", "a finite number > 0"
    )


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
