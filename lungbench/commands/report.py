"""Layer 12 (commands): `lungbench report RUN...`: an HTML report (self-contained) and its Markdown twin."""

from __future__ import annotations

import argparse
import sys

DESCRIPTION = """\
Write one self-contained HTML file (plots embedded, no external assets) and a Markdown
twin for one or more run folders: environment, configuration, the speed-up and scaling
tables, step time vs batch size and filters, memory, telemetry timelines, training tables
and curves, and failed configurations. Every table the seeds published (results/reference/:
seed 000's speed-up, AUC, confusion and pre-training tables, seed 001's accuracy, seed 002's
variants, seed 004's methods x weights, transfer-learning and cost tables) stands beside
ours in the same layout; a missing or malformed reference file is named in a warning and the
report goes on. Several runs are shown side by side."""

EPILOG = """\
examples:
  lungbench report results/bench-20260101-120000-node1     -> RUN/report.html, RUN/report.md
  lungbench report results/run-a results/run-b --out results/ab
  xdg-open RUN/report.html        (or open file:///.../report.html in any browser)"""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "report",
        help="HTML + Markdown report of one or more runs (side by side)",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folders (results/<run-id>)")
    p.add_argument(
        "--out",
        default=None,
        help="folder to write the report into (default: the first run's folder)",
    )
    p.add_argument(
        "--reference",
        default=None,
        metavar="DIR",
        help="published tables to show beside ours (default: results/reference/ of this checkout)",
    )
    p.add_argument(
        "--no-reference",
        dest="use_reference",
        action="store_false",
        help="leave the published tables out",
    )
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from lungbench.report.html import write_report

    files = write_report(
        args.runs, out=args.out, reference=args.reference, use_reference=args.use_reference
    )
    for warning in files.warnings:  # a missing or malformed published table: said, not fatal
        print(f"warning: {warning}", file=sys.stderr)
    print(f"report:   {files.html}")
    print(f"markdown: {files.markdown}")
    print(
        f"open it:  xdg-open {files.html}   (or file://{files.html.resolve()} in a browser; "
        "it is one file and can be copied anywhere)"
    )
    return 0
