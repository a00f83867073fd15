"""Layer 12 (commands): `lungbench env`: print the environment record (what every run saves as environment.json)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

PEAK_DEVICE = "cpu"
PEAK_DTYPE = "fp32"


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "env",
        help="print the environment record as JSON (versions, CPU, GPU, driver, git, SLURM)",
        description="Print, as JSON, the environment record that every run saves as "
        "environment.json: library versions, CPU model and threads, GPUs, driver, CUDA/cuDNN, "
        "git commit, host, SLURM job and UTC time.",
    )
    p.add_argument(
        "--peak",
        action="store_true",
        help="also measure the device's peak: a large matrix product in --dtype (FLOP/s) and a "
        "large copy (bytes/s), stored under 'peak' (the denominator of every peak_fraction)",
    )
    # Defaults are applied in _run, so that giving either without --peak is an error.
    p.add_argument(
        "--device",
        default=None,
        help=f"device for --peak: cpu, cuda, cuda:N (default: {PEAK_DEVICE})",
    )
    p.add_argument(
        "--dtype",
        default=None,
        help=f"dtype for --peak: fp32, bf16, fp16 (fp16 on CUDA only) (default: {PEAK_DTYPE})",
    )
    p.add_argument("--save", default=None, help="also write the record to this JSON file")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from lungbench.core.environment import environment_record
    from lungbench.core.errors import UsageError

    for option in ("device", "dtype"):
        if getattr(args, option) is not None and not args.peak:
            raise UsageError(f"--{option} {getattr(args, option)}: only used with --peak")
    peak = None
    if args.peak:  # check everything before the measurement, which takes seconds
        from lungbench.core.device import parse_device
        from lungbench.measure.peak import check_dtype

        device = parse_device(args.device or PEAK_DEVICE)
        dtype = check_dtype(args.dtype or PEAK_DTYPE, device)
        peak = (device, dtype)
    if args.save:
        from lungbench.harness.profiler import check_writable

        save = Path(args.save)
        if save.is_dir():
            raise UsageError(f"--save {save}: is a folder, expected a JSON file name")
        check_writable(save.parent, option="--save", what="this folder")

    record = environment_record()
    if peak is not None:
        from lungbench.measure.peak import peak_record

        record["peak"] = peak_record(*peak)
    if args.save:
        from lungbench.core.runs import write_json

        write_json(Path(args.save), record)
    print(json.dumps(record, indent=2))
    return 0
