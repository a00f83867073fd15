"""Layer 12 (commands): `lungbench bench --to-quality`: its options and the request they make.

The mode itself is lungbench.experiments.to_quality; the sweep's --filters, --batch,
--device, --threads, --store, --synth-n, --seed, --out, --run-id and --retune are read from
the BenchRequest (--filters / --batch / --synth-n left at the sweep's defaults give the
mode's own quick workload: filters 4, batch 16, 96 generated nodules).
"""

from __future__ import annotations

import argparse
from typing import Any

from lungbench.commands._args import positive_int
from lungbench.commands._options import section
from lungbench.commands._speed import MODES


def add_quality_options(p: argparse.ArgumentParser) -> None:
    """--to-quality and its settings, in the section of the modes run instead of the sweep."""
    from lungbench.commands._args import for_argparse
    from lungbench.experiments.to_quality import DEFAULT_TARGET, QualityRequest
    from lungbench.train.quality import target_option

    a = section(p, MODES)
    a.add_argument(
        "--to-quality",
        action="store_true",
        help="time to a validation target (--target) for eager FP32 and the tuned default, "
        "interleaved over --quality-seeds seeds: median and min-max per variant, as MLPerf "
        "reports (dualpath3d on generated LIDC-like nodules; one process)",
    )
    a.add_argument(
        "--target",
        type=for_argparse(target_option),
        default=DEFAULT_TARGET,
        metavar="METRIC=VALUE",
        help=f"--to-quality's target: auc, accuracy (at least) or loss (at most) on the "
        f"validation split (default: {DEFAULT_TARGET})",
    )
    a.add_argument(
        "--quality-seeds",
        type=positive_int,
        default=QualityRequest.seeds,
        help=f"--to-quality's runs per variant, seeds --seed, --seed+1, ... "
        f"(default: {QualityRequest.seeds})",
    )
    a.add_argument(
        "--quality-epochs",
        type=positive_int,
        default=QualityRequest.max_epochs,
        help="--to-quality's cap: a run without the target by then is 'not reached' "
        f"(default: {QualityRequest.max_epochs})",
    )


def quality_request(request: Any, args: argparse.Namespace):
    """The QualityRequest of a BenchRequest and the --to-quality options (checked)."""
    from lungbench.experiments.speedup import BenchRequest
    from lungbench.experiments.to_quality import QualityRequest

    sweep, mine = BenchRequest(), QualityRequest()

    def given(name: str, own: Any) -> Any:
        value = getattr(request, name)
        return own if value == getattr(sweep, name) else value

    filters = given("filters", (mine.filters,))
    batches = given("batch_sizes", (mine.batch_size,))
    return QualityRequest(
        target=args.target,
        seeds=args.quality_seeds,
        first_seed=request.seed,
        max_epochs=args.quality_epochs,
        filters=filters[0],
        batch_size=batches[0],
        preset=request.preset,
        device=request.devices[0],
        threads=request.threads[0],
        store=str(request.store) if request.store else None,
        synth_n=given("synth_n", mine.synth_n),
        out=request.out,
        run_id=request.run_id,
        retune=bool(request.retune),
    ).check()


def run_quality_cli(request: Any, args: argparse.Namespace) -> int:
    """`lungbench bench --to-quality`: the table, printed, and where it was written."""
    from lungbench.distributed.launch import require_single_process
    from lungbench.experiments.to_quality import run_to_quality

    require_single_process("--to-quality")
    done = run_to_quality(quality_request(request, args))
    print(
        f"time to quality ({done.table['target'].iloc[0]}), tuned default: "
        f"{done.tuning.get('tuning_choice')}\n"
    )
    print(done.table.drop(columns="target").round(3).to_string())
    print(f"\nresults: {done.run_dir}")
    return 0
