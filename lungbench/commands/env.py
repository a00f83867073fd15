"""`lungbench env`: print the environment record (what every run saves as environment.json)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "env",
        help="print the environment record (versions, CPU, GPU, driver, git, SLURM)",
        description="Print the environment record that every run saves as environment.json: "
        "library versions, CPU model and threads, GPUs, driver, CUDA/cuDNN, git commit, host, "
        "SLURM job and UTC time.",
    )
    p.add_argument("--json", action="store_true", help="print JSON only (default: JSON too)")
    p.add_argument(
        "--peak",
        action="store_true",
        help="also measure the device's peak: a large matrix product in --dtype (FLOP/s) and a "
        "large copy (bytes/s), stored under 'peak' (the denominator of every peak_fraction)",
    )
    p.add_argument("--device", default="cpu", help="device for --peak: cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="fp32", help="dtype for --peak: fp32, bf16, fp16")
    p.add_argument("--save", default=None, help="also write the record to this JSON file")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from lungbench.env import environment_record

    record = environment_record()
    if args.peak:
        from lungbench.errors import look_up_option
        from lungbench.harness import parse_device
        from lungbench.peak import DTYPES, peak_record

        device = parse_device(args.device)
        record["peak"] = peak_record(device, look_up_option(args.dtype, DTYPES, what="--dtype"))
    if args.save:
        from lungbench.profiling import check_writable
        from lungbench.results import write_json

        check_writable(Path(args.save).parent or Path("."), option="--save")
        write_json(Path(args.save), record)
    print(json.dumps(record, indent=2))
    return 0
