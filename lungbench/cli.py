"""Layer 13 (cli): the `lungbench` command line: argument parsing and error reporting only.

Each command lives in `lungbench/commands/<name>.py` and exposes `register(subparsers)`,
which adds its parser and sets `func(args) -> int`. The work itself is done by the library.
COMMANDS names them; a command's module is imported only when that command is chosen
(lungbench.commands.LazySubParsers), so `import lungbench.cli` and `lungbench --version`
load no torch, MONAI, pandas or matplotlib (tests/test_startup.py holds that).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from lungbench import __version__
from lungbench.commands import LazySubParsers, lazy_module
from lungbench.core.allocator import check_setting as check_malloc_setting
from lungbench.core.allocator import keep_freed_memory
from lungbench.core.console import capture_foreign_messages, show_progress
from lungbench.core.errors import LungbenchError, message_of

# name -> (module, one-line help), in the order `lungbench --help` shows them. A command's
# module is imported only when that command runs (or shows its own --help): the modules pull
# torch, MONAI, pandas or matplotlib, and `--version` / `--help` need none of them.
COMMANDS: dict[str, tuple[str, str]] = {
    "bench": (
        "lungbench.commands.bench",
        "speed-up sweep: batch size x filters x device (the thesis's table)",
    ),
    "train": (
        "lungbench.commands.train",
        "full training runs: the experiments of the seeds (AUC tables, confusion matrices)",
    ),
    "reproduce": (
        "lungbench.commands.reproduce",
        "every twin of the seeds' experiments (--quick: minutes), resumable, one report",
    ),
    "profile": (
        "lungbench.commands.profile",
        "profile a training step with torch.profiler (traces, top operators, phases)",
    ),
    "data": (
        "lungbench.commands.data",
        "build HDF5 stores (generated nodules, LIDC-IDRI, LUNGx, MosMedData, 2D images)",
    ),
    "env": (
        "lungbench.commands.env",
        "print the environment record as JSON (versions, CPU, GPU, driver, git, SLURM)",
    ),
    "report": (
        "lungbench.commands.report",
        "HTML + Markdown report of one or more runs (side by side)",
    ),
    "compare": (
        "lungbench.commands.compare",
        "compare two runs: faster / slower / same per configuration",
    ),
    "predict": (
        "lungbench.commands.predict",
        "project step/epoch time to other batch, filters, threads, ranks, devices",
    ),
}

EPILOG = """\
examples:
  lungbench bench                         CPU, generated data, batch 2,4,8 x filters 8,16
  lungbench bench --device cpu cuda --filters 8 16 --batch 2     the thesis's table
  torchrun --nproc_per_node 4 -m lungbench bench --device cuda   DDP scaling (see hpc/)
  lungbench bench --ablation              which speed switch buys how much
  lungbench profile --filters 16 --batch 2                       torch.profiler trace
  lungbench train lungx-cv --quick        LUNGx 3-fold CV: AUC table, confusion matrices
  lungbench reproduce --quick             every seed's twin, one report beside the published tables
  lungbench data synth --kind lidc --n 754 --out results/data/lidc-synth.h5
  lungbench report results/<run-id>       one self-contained HTML file + Markdown
  lungbench compare results/<a> results/<b> --fail-above 10
  lungbench env --peak                    environment record + measured device peak
Run `lungbench COMMAND --help` for each command's options."""


class OneLineParser(argparse.ArgumentParser):
    """argparse with its errors on one line (no usage block: `--help` has it), exit 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="lungbench",
        description="Benchmark and profile deep learning on 3D lung CT: how fast a 3D CNN "
        "trains on CPU, one GPU or many, where the time goes, and what accuracy it reaches.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"lungbench {__version__}")
    subparsers = parser.add_subparsers(
        dest="command", metavar="COMMAND", required=True, action=LazySubParsers
    )
    for name, (module, summary) in COMMANDS.items():
        subparsers.add_lazy(name, lazy_module(module, summary))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        args._parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    show_progress()  # progress messages (logging) on stderr; stdout keeps the tables
    keep_freed_memory()  # before the first step: no page faults of its tensors every step
    capture_foreign_messages()  # third-party warnings into the log, not on the terminal
    try:
        check_environment()
        code = int(args.func(args) or 0)
    except LungbenchError as exc:
        print(f"lungbench {args.command}: error: {message_of(exc)}", file=sys.stderr)
        code = exc.exit_code
    except KeyboardInterrupt as exc:  # Ctrl-C: 130; SIGTERM turned into one (SweepTerminated): 143
        print(f"lungbench {args.command}: interrupted", file=sys.stderr)
        code = int(getattr(exc, "exit_code", 130))
    leave_after_group(code)
    return code


def check_environment() -> None:
    """The environment variables lungbench reads, checked before any command runs, so that
    a bad one is one line and never a run folder left behind."""
    check_malloc_setting()
    if os.environ.get("LUNGBENCH_MEMORY_LIMIT"):
        from lungbench.measure.memory import LIMIT_VARIABLE, parse_size  # torch: only then

        parse_size(os.environ[LIMIT_VARIABLE])


def leave_after_group(code: int) -> None:
    """A process that was a rank of a process group ends here with `code`, without the
    interpreter's teardown: torch's Gloo/NCCL threads can abort it ("terminate called
    without an active exception": a process group torn down during finalization, seen in CI)
    or block on a lost peer. Its records and run.json are already on disk (written and
    fsynced as they were made); logging and the streams are flushed first."""
    distributed = sys.modules.get("lungbench.distributed.group")  # loaded iff a group may exist
    if distributed is not None and distributed.group_joined():
        logging.shutdown()
        sys.stdout.flush()  # before MPI_Finalize: mpiexec forwards only what came before it
        sys.stderr.flush()
        if not distributed.group_is_broken():  # MPI_Finalize would wait for a lost peer
            from lungbench.distributed.launch import finalize_mpi

            finalize_mpi()
        distributed.exit_now(code)


if __name__ == "__main__":
    sys.exit(main())
