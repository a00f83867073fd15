"""Layer 12 (commands): `lungbench compare A B`: per configuration, is run B faster, slower or the same as A?"""

from __future__ import annotations

import argparse
import json
import sys

from lungbench.commands._args import percent, unit_fraction

DESCRIPTION = """\
Compare two run folders configuration by configuration: the ratio of median step times
(B / A) with a bootstrap confidence interval from the raw repeats, flagged faster / slower
/ same (same when the interval contains 1 or the change is within --threshold); the epoch
time too when both runs measured it. Warns when the environments differ (library versions,
CPU model, threads, GPU, host). For CI, --fail-above PCT exits 1 on a step-time regression
larger than PCT percent, and on a configuration measured in A that failed or is missing in
B."""

EPILOG = """\
examples:
  lungbench compare results/run-a results/run-b
  lungbench compare results/main results/branch --fail-above 10     exit 1 if >10% slower
  lungbench compare A B --out results/a-vs-b                        also compare.csv / .md"""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "compare",
        help="compare two runs: faster / slower / same per configuration",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("a", metavar="A", help="the baseline run folder")
    p.add_argument("b", metavar="B", help="the run compared with it")
    p.add_argument(
        "--threshold",
        type=percent,
        default=5.0,
        metavar="PCT",
        help="changes within PCT percent count as 'same' (default: 5)",
    )
    p.add_argument(
        "--fail-above",
        type=percent,
        default=None,
        metavar="PCT",
        help="exit 1 when a step time got slower by more than PCT percent (its interval "
        "above 1; independent of --threshold), or a configuration measured in A failed "
        "(oom / error) or is missing in B",
    )
    p.add_argument(
        "--confidence",
        type=unit_fraction,
        default=0.95,
        help="bootstrap interval confidence (default: 0.95)",
    )
    p.add_argument(
        "--bootstrap",
        type=int,
        default=2000,
        metavar="N",
        help="bootstrap resamples (default: 2000)",
    )
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default: 0)")
    p.add_argument(
        "--out", default=None, metavar="DIR", help="also write DIR/compare.csv and DIR/compare.md"
    )
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:

    from lungbench.core.errors import UsageError
    from lungbench.core.paths import check_out_dir
    from lungbench.report.compare import compare_runs, format_comparison
    from lungbench.report.labels import config_label
    from lungbench.report.runview import load_run

    if args.bootstrap < 100:
        raise UsageError(f"--bootstrap must be >= 100, got {args.bootstrap}")
    result = compare_runs(
        load_run(args.a),
        load_run(args.b),
        threshold=args.threshold / 100,
        n_boot=args.bootstrap,
        confidence=args.confidence,
        seed=args.seed,
    )
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    text = format_comparison(result)
    print(text)
    if args.out:
        out = check_out_dir(args.out)
        out.mkdir(parents=True, exist_ok=True)
        result.table().to_csv(out / "compare.csv", index=False)
        (out / "compare.md").write_text(text + "\n")
    print(
        json.dumps(
            {
                "step": result.counts("step"),
                "epoch": result.counts("epoch"),
                "environment_warnings": len(result.warnings),
            }
        )
    )
    if args.fail_above is not None:
        worse = result.regressions(args.fail_above)
        if worse:
            names = ", ".join(f"{c.key} (+{c.change_pct:.1f}%)" for c in worse)
            print(
                f"lungbench compare: regression above {args.fail_above:g}%: {names}",
                file=sys.stderr,
            )
        if result.lost_in_b:
            lost = "; ".join(
                f"{config_label({'key': k})} ({s})" for k, s in result.lost_in_b.items()
            )
            print(f"lungbench compare: measured in A, not in B: {lost}", file=sys.stderr)
        if worse or result.lost_in_b:
            return 1
    return 0
