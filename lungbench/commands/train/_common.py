"""Layer 12 (commands): what every `lungbench train` recipe's command shares.

The recipes' options themselves are declared on their configs' fields and built by
lungbench.commands._options; here are the output options and the config built from the
parsed options, its device checked against this machine.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any

from lungbench.commands._options import config_from_args, section

QUICK_HELP = (
    "tiny smoke run (small data, grid and model, few epochs; about a minute on 2 CPU cores)"
)


def add_output_options(p: argparse.ArgumentParser) -> None:
    """--out and --run-id, in the 'output' section."""
    o = section(p, "output")
    o.add_argument("--out", default="results", help="output root (default: results)")
    o.add_argument(
        "--run-id", default=None, help="run folder name (default: train-<UTC time>-<host>)"
    )


def recipe_config(
    args: argparse.Namespace,
    cls: type,
    full: Any,
    quick: Any,
    **fixed: Any,
) -> Any:
    """The recipe's config: its QUICK (with --quick) or FULL config with the options given
    (config_from_args); UsageError for impossible values (the config's own checks) or a
    device this machine does not have."""
    from lungbench.core.device import parse_device

    cfg = config_from_args(args, cls, full, quick, **fixed)
    parse_device(cfg.train.device)
    return cfg


# Options a resumed run may change: where and how it runs, not what it computes.
RESUME_MAY_CHANGE = ("device", "num_workers", "progress", "telemetry_interval", "target")


def add_resume_option(p: argparse.ArgumentParser) -> None:
    """--resume RUN, in the 'output' section."""
    section(p, "output").add_argument(
        "--resume",
        default=None,
        metavar="RUN",
        help="continue a stopped run (its folder, or its id under --out) with its saved "
        "options: finished folds and fits are kept, the others run (default: a new run)",
    )


def resume_point(args: argparse.Namespace, recipe: str):
    """The ResumePoint of --resume (None without it): an unfinished run of `recipe`."""
    if not getattr(args, "resume", None):
        return None
    from lungbench.experiments.resumable import open_resume

    return open_resume(args.resume, args.out, recipe)


def resumed_config(args: argparse.Namespace, cls: type, saved: Mapping[str, Any]) -> Any:
    """The config a resumed run continues with: its saved one (config.json), with the
    RESUME_MAY_CHANGE options the user gave; UsageError naming any other option given
    with a value the run does not have."""
    from lungbench.commands._options import flag_of, given_values
    from lungbench.core.errors import UsageError
    from lungbench.core.options import config_from_dict, flat_values, replaced
    from lungbench.core.runs import to_jsonable

    cfg = config_from_dict(cls, saved)
    have = flat_values(cfg)
    given = given_values(args, cls)
    conflicts = [
        f"{flag_of(cls, name)} {to_jsonable(value)!r} (the run has {to_jsonable(have.get(name))!r})"
        for name, value in given.items()
        if name not in RESUME_MAY_CHANGE and to_jsonable(value) != to_jsonable(have.get(name))
    ]
    if conflicts:
        raise UsageError(
            f"--resume {args.resume}: continues the run with its saved options; these differ: "
            + "; ".join(conflicts)
            + " (drop them, or start a new run; only "
            + ", ".join(flag_of(cls, n) for n in RESUME_MAY_CHANGE)
            + " may change)"
        )
    changes = {k: v for k, v in given.items() if k in RESUME_MAY_CHANGE}
    cfg = replaced(cfg, changes) if changes else cfg
    from lungbench.core.device import parse_device

    parse_device(cfg.train.device)
    return cfg
