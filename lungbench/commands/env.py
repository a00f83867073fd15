"""`lungbench env`: print the environment record (what every run saves as environment.json)."""

from __future__ import annotations

import argparse
import json


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "env",
        help="print the environment record (versions, CPU, GPU, driver, git, SLURM)",
        description="Print the environment record that every run saves as environment.json: "
        "library versions, CPU model and threads, GPUs, driver, CUDA/cuDNN, git commit, host, "
        "SLURM job and UTC time.",
    )
    p.add_argument("--json", action="store_true", help="print JSON only (default: JSON too)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from lungbench.env import environment_record

    print(json.dumps(environment_record(), indent=2))
    return 0
