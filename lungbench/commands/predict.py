"""Layer 12 (commands): `lungbench predict`: step and epoch time of configurations not run,
projected from a measured bench run, and `--validate`, which measures the model's error here."""

from __future__ import annotations

import argparse
import itertools
import json
import math
from pathlib import Path
from typing import Any

from lungbench.commands._args import positive_int
from lungbench.commands._launch import bench_subprocess
from lungbench.commands._options import add_declared
from lungbench.measure.workload import Protocol, Workload

DESCRIPTION = """\
Project the training step and epoch time of a measured `lungbench bench` (or `lungbench
profile`) run to other batch sizes, widths (filters), CPU thread counts, numbers of DDP
ranks and devices, before you book them. Each operator of the measured step is scaled by its
FLOPs and bytes on source and target (compute or memory bound; memory bandwidth read off
this machine's measured cache-to-DRAM curve), along a per-operator line probed at other
batches and a second width. Convolutions follow no bound (their speed per FLOP moves with
their channels): on this machine each one is made again alone, source call against target
call, and scaled by the measured ratio; on a device profile, by its bounds. N ranks on this
machine are N processes: N processes of the target's step in one Gloo group measure how
much slower each rank's compute runs beside the others and what their DDP step adds beyond
it (all-reduce, hooks, Gloo waiting for cores), round after round until that ratio is known
within +-5% (at least 12 rounds, at most 48 or 60 s; the notes say how well it is known,
and warn past +-10%); on a device profile the all-reduce is a ring over DDP's real buckets
on its NVLink/PCIe. Every row says what limits it: compute, memory bandwidth,
launch/latency, communication or data. Probes and fits are
measured once per host and cached, so the same question gets the same answer. Intervals
(90%) are the range of measured/predicted this host's last `predict --validate` runs showed
for that kind of prediction; on a host with none, the shipped ones, widened by the spread
across the shipped hosts, and said; a busy source, or ranks measured side by side while
other processes used the cores, widens them too, with a warning. A target the run measured
is returned as "measured" with its record's interval. The first predict on a host measures
it (says what and for how long); later ones read the cache. The shipped validation (model 6:
6 runs of `--validate` on a 2-core Zen 3, 5 rotated sources each, 288 cases) had a 4.6% median
error (batch 3.3%, filters 3.2%, threads 6.7%, 2 ranks 8.3%, epochs 7.5%; the ranks predicted
low there, -6%: -8% in the four runs whose side-by-side ratio took 12 rounds, -2.4% (5.0%
median error) in the two that measured it to +-5%) and covered 91% of cases
leave-one-source-out; see docs/predict.md. CPU -> GPU projections have
not been validated on a GPU."""

EPILOG = """\
examples:
  lungbench predict --from results/default-a --batch 16 32
  lungbench predict --from results/default-a --ranks 2 4 --scaling strong --batch 8
  lungbench predict --from results/default-a --device v100-sxm2 a100-sxm-80gb h100-sxm
  lungbench predict --from results/default-a --thesis     seed 000's M100 rows, projected
  lungbench predict --from results/profile-a --batch 8   a profile run is a source too
  lungbench predict --validate                           5 sources rotated (~15-20 min, 2 cores)
  lungbench predict --validate --quick                   2 tiny sources (a few minutes)
  lungbench predict --validate --gpu                     the same on this node's GPU
  lungbench predict --list-devices

devices: cpu (this machine, measured) and the shipped profiles (vendor data sheets; each
value names its source: --list-devices); add your own with --device-file FILE.toml."""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "predict",
        help="project step/epoch time to other batch, filters, threads, ranks, devices",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--from", dest="run", metavar="RUN", help="a lungbench bench or profile run folder"
    )
    # The targets: the workload's own options (declared on Workload, Protocol), several values
    targets = {"nargs": "+", "group": None}
    add_declared(p, Workload, "batch_size", **targets, help="batch sizes (per rank, weak)")
    add_declared(p, Workload, "filters", **targets, help="base widths")
    add_declared(p, Workload, "threads", **targets, help="CPU threads (per rank)")
    p.add_argument("--ranks", type=positive_int, nargs="+", default=[1], help="DDP ranks")
    p.add_argument(
        "--scaling",
        choices=["weak", "strong"],
        default="weak",
        help="weak: the batch is per rank; strong: the batch is global, split (default: weak)",
    )
    add_declared(
        p,
        Protocol,
        "epoch_samples",
        group=None,
        help="samples in an epoch (default: the run's training split, else the thesis's 603)",
    )
    p.add_argument("--device", nargs="+", help="device profiles (default: the run's device)")
    p.add_argument("--device-file", nargs="+", default=[], help="your own profiles (TOML)")
    p.add_argument("--json", action="store_true", help="one JSON object per prediction")
    p.add_argument(
        "--remeasure",
        action="store_true",
        help="measure this machine again (operator probe, bandwidth curve, Gloo fit, DDP "
        "overhead) instead of this host's cached measurements",
    )
    p.add_argument("--thesis", action="store_true", help="seed 000's M100 rows, projected")
    p.add_argument("--list-devices", action="store_true", help="the known device profiles")
    p.add_argument("--validate", action="store_true", help="predict, measure and compare here")
    p.add_argument(
        "--quick", action="store_true", help="--validate on 2 tiny sources (tests, a few minutes)"
    )
    p.add_argument("--no-ddp", dest="ddp", action="store_false", help="--validate without DDP")
    p.add_argument(
        "--gpu",
        action="store_true",
        help="--validate on this node's GPU: batch and width scaling on the GPU, and CPU -> "
        "GPU through the GPU model's shipped profile",
    )
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from lungbench.core.errors import UsageError

    if args.list_devices:
        return _list_devices(args)
    if args.validate:
        return _validate(args)
    if args.gpu:
        raise UsageError("--gpu goes with --validate (lungbench predict --validate --gpu)")
    if not args.run:
        raise UsageError("give --from RUN (a lungbench bench or profile run folder), or --validate")
    from lungbench.predict.devices import load_profiles, look_up_device

    profiles = load_profiles(args.device_file)
    for name in args.device or []:
        look_up_device(name, profiles)  # an unknown name fails before anything is measured
    records, environment = _read_run(Path(args.run))
    if args.thesis:
        return _thesis(args, records, environment)
    return _predict(args, records, environment)


# Record fields the model reads as numbers: a record that has one of them as anything else
# (`"batch_size": "two"`) is refused in one line naming the file and the field.
NUMBER_FIELDS = (
    "batch_size", "filters", "threads_used", "step_s_median", "flops_per_step", "epoch_s",
    "epoch_samples", "epoch_split_samples", "world_size",
)  # fmt: skip


def check_numbers(record: dict[str, Any], path: Path) -> None:
    """DataError naming `path`, the record and the field whose value is not a positive number."""
    from lungbench.core.errors import DataError

    for name in NUMBER_FIELDS:
        value = record.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise DataError(
                f"{path}: record {record.get('key', '?')}: field {name} is {value!r}, not a "
                "positive number; rerun `lungbench bench` (or fix the file)"
            )


def _read_run(run: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The run's single-process ok records and its environment (DataError: what to run).
    A run that did not complete, or configurations that failed, are said as warnings
    (`run_warnings`); a record with a field that is not a number is refused."""
    from lungbench.core.errors import DataError
    from lungbench.core.runs import read_json, read_records

    if not run.is_dir():
        raise DataError(f"--from {run}: no such run folder; run `lungbench bench` first")
    env_path = run / "environment.json"
    environment = read_json(env_path) if env_path.is_file() else {}
    if not (run / "records.jsonl").is_file() and (run / "profile.json").is_file():
        from lungbench.predict.forecast import record_from_profile

        config = read_json(run / "config.json") if (run / "config.json").is_file() else {}
        record = record_from_profile(read_json(run / "profile.json"), config, str(run))
        check_numbers(record, run / "profile.json")
        return [record], environment
    if not (run / "records.jsonl").is_file():
        raise DataError(
            f"--from {run}: no records.jsonl or profile.json (not a bench or profile run); "
            f"predict needs measured steps: run `lungbench bench --out {run.parent}` first"
        )
    single = [r for r in read_records(run) if r.get("world_size", 1) == 1]
    records = [r for r in single if r.get("status") == "ok"]
    for record in records:
        check_numbers(record, run / "records.jsonl")
    if not records:
        raise DataError(
            f"--from {run}: no single-process configuration ran ok; run `lungbench bench` first"
        )
    return records, environment


def run_warnings(run: Path) -> list[str]:
    """Warnings, in words, about the run as a whole: not complete, configurations failed."""
    from lungbench.core.runs import read_json, read_records

    warnings = []
    status = (read_json(run / "run.json") if (run / "run.json").is_file() else {}).get("status")
    if (run / "records.jsonl").is_file() and status != "complete":
        warnings.append(
            f"warning: run {run} is partial (run.json status {status or 'missing'}): "
            "predictions come from the configurations it finished"
        )
    failed = [
        f"{r.get('key', '?')} ({r.get('status')})"
        for r in read_records(run)
        if r.get("status") != "ok" and r.get("world_size", 1) == 1
    ]
    if failed:
        warnings.append(
            f"warning: {len(failed)} configuration(s) of the run failed and are not sources: "
            + ", ".join(failed[:5])
            + (" ..." if len(failed) > 5 else "")
        )
    return warnings


class _Sources:
    """Sources made on demand (a probe costs seconds), the nearest record for each target."""

    def __init__(
        self,
        records: list[dict[str, Any]],
        environment: dict[str, Any],
        where: str,
        fresh: bool = False,
    ):
        self.records, self.environment, self.where = records, environment, where
        self.fresh = fresh  # probe the operators again instead of reading the cache
        self.made: dict[str, Any] = {}

    def nearest(self, batch: int | None, filters: int | None, threads: int | None = None):
        from lungbench.predict.forecast import source_from_record

        def distance(r: dict[str, Any]) -> float:
            terms = [(batch, r.get("batch_size")), (filters, r.get("filters"))]
            terms.append((threads, r.get("threads_used")))
            return sum(abs(math.log(a / b)) for a, b in terms if a and b)

        record = min(self.records, key=distance)
        if record["key"] not in self.made:
            self.made[record["key"]] = source_from_record(
                record, self.environment, self.where, self.fresh
            )
        return self.made[record["key"]]


def _targets(args: argparse.Namespace):
    from lungbench.predict.forecast import Target

    for batch, filters, threads, ranks, device in itertools.product(
        args.batch_size or [None],
        args.filters or [None],
        args.threads or [None],
        args.ranks,
        args.device or [None],
    ):
        yield Target(
            batch, filters, threads, ranks, args.scaling, device, epoch_samples=args.epoch_samples
        )


def _predict(args, records, environment) -> int:
    import logging

    from lungbench.predict.forecast import Predictor

    warnings = run_warnings(Path(args.run))
    predictor = Predictor(tuple(args.device_file), args.remeasure, launch=bench_subprocess)
    sources = _Sources(records, environment, str(args.run), args.remeasure)
    predictions = []
    for target in _targets(args):
        source = sources.nearest(target.batch, target.filters, target.threads)
        pred = predictor.predict(source, target)
        pred.notes.extend(warnings)
        predictions.append(pred)
    # said once the predictions stand: a run that cannot be predicted from gets only its error
    for warning in warnings:
        logging.getLogger(__name__).warning(warning)
    if args.json:
        for pred in predictions:
            print(json.dumps(pred.as_dict()))
        return 0
    print(format_predictions(predictions))
    print(f"\nintervals: {predictor.calibration_source}")
    return 0


def _seconds(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value * 1e3:.1f} ms" if value < 1 else f"{value:.2f} s"


BOUND_WORDS = {
    "compute": "compute",
    "memory": "memory bandwidth",
    "latency": "launch/latency",
    "communication": "communication",
    "data": "data",
    "memory size": "does not fit in memory",
}


def format_predictions(predictions) -> str:
    """A Markdown table, one row per prediction, saying what limits each."""
    head = "| device | ranks | batch | filters | threads | step | interval | epoch | samples/s | limited by |"
    lines = [head, "|" + "---|" * 10]
    for p in predictions:
        interval = f"{_seconds(p.interval[0])}-{_seconds(p.interval[1])}" if p.interval else "n/a"
        if p.status == "oom":
            interval = next((n for n in p.notes if n.startswith("does not fit")), "-")
        rate = f"{p.samples_per_s:.1f}" if p.samples_per_s else "-"
        ranks = f"{p.ranks} ({p.scaling})" if p.ranks > 1 else "1"
        lines.append(
            f"| {p.device} | {ranks} | {p.batch} | {p.filters} | {p.threads or '-'} | "
            f"{_seconds(p.step_s)}{' (measured)' if p.status == 'measured' else ''} | "
            f"{interval} | {_seconds(p.epoch_s)} | {rate} | "
            f"{BOUND_WORDS.get(p.bound or '', p.bound)} |"
        )
    notes = sorted({n for p in predictions for n in p.notes if p.status != "oom"})
    return "\n".join(lines + [f"note: {n}" for n in notes])


def _thesis(args, records, environment) -> int:
    from lungbench.predict.forecast import Predictor
    from lungbench.predict.thesis import THESIS_FILTERS, difference_line, project_m100
    from lungbench.predict.thesis import __doc__ as unknowns

    predictor = Predictor(tuple(args.device_file), args.remeasure, launch=bench_subprocess)
    sources = _Sources(records, environment, str(args.run), args.remeasure)
    rows = project_m100([], predictor, lambda _s, b, f: sources.nearest(b, f, None))
    published = _published_m100()
    if args.json:
        for row in rows:
            print(
                json.dumps(
                    {**row, "published_epoch_s": published.get((row["platform"], row["filters"]))}
                )
            )
        return 0
    print("Seed 000, batch 2: Marconi100 rows PROJECTED from this run (not measured) beside the")
    print("published ones. Exec. time = one training epoch (603 samples).\n")
    cols = " | ".join(
        f"Filters = {f}: projected | Filters = {f}: published" for f in THESIS_FILTERS
    )
    print(f"| Batch size = 2 | {cols} | limited by |")
    print("|---|" + "---|" * (2 * len(THESIS_FILTERS) + 1))
    for platform in dict.fromkeys(r["platform"] for r in rows):
        cells, bounds = [], []
        for f in THESIS_FILTERS:
            row = next(r for r in rows if r["platform"] == platform and r["filters"] == f)
            cells += [_seconds(row["epoch_s"]), published.get((platform, f), "-")]
            bounds.append(BOUND_WORDS.get(row["bound"] or "", row["bound"]))
        print(
            f"| {platform} (projected) | {' | '.join(cells)} | {', '.join(dict.fromkeys(bounds))} |"
        )
    sources_used = sorted({r["source"] for r in rows})
    print(f"\nsource configurations: {', '.join(sources_used)}")
    written = _write_projection(Path(args.run), rows)
    if written:
        print(f"written: {written} (`lungbench report {args.run}` shows it beside the thesis's)")
    print("\n" + difference_line(rows, _published_seconds(published)))
    print("\n" + " ".join(unknowns.split("\n\n", 1)[1].split()))
    return 0


def _published_seconds(published: dict[tuple[str, int], str]) -> dict[tuple[str, int], float]:
    """The published epochs ("123.4 s") as seconds; cells that are not numbers left out."""
    found = {}
    for key, text in published.items():
        try:
            found[key] = float(str(text).removesuffix(" s"))
        except ValueError:
            continue
    return found


def _write_projection(run: Path, rows) -> Path | None:
    """tables/speedup_b2_projected.csv of the run folder (None, with a note, when the
    folder cannot be written): the report sets it beside seed 000's published table."""
    import logging

    import pandas as pd

    from lungbench.core.runs import write_table
    from lungbench.predict.thesis import TABLE, projected_table

    measured_path = run / "tables" / "speedup_b2.csv"
    measured = pd.read_csv(measured_path) if measured_path.is_file() else None
    try:
        (run / "tables").mkdir(exist_ok=True)
        return write_table(run, TABLE, projected_table(rows, measured), index=False)
    except OSError as exc:
        logging.getLogger(__name__).warning(f"note: {run}/tables not written ({exc})")
        return None


def _published_m100() -> dict[tuple[str, int], str]:
    """(platform, filters) -> the published epoch time, from results/reference/."""
    from lungbench.core.errors import DataError
    from lungbench.report.reference import default_reference_dir, read_reference

    folder = default_reference_dir()
    if folder is None:
        return {}
    try:
        table = read_reference(folder / "seed000_speedup_b2.csv")
    except DataError:
        return {}
    found = {}
    for _, row in table.iterrows():
        for f in (8, 16):
            found[(str(row.iloc[0]), f)] = f"{row[f'Filters = {f} | Exec. time (s)']} s"
    return found


def _list_devices(args) -> int:
    from lungbench.predict.devices import load_profiles

    for name, profile in sorted(load_profiles(args.device_file).items()):
        peaks = ", ".join(f"{d} {v / 1e12:g} TFLOP/s" for d, v in profile.peak_flops.items() if v)
        what = "measured on this machine when used" if profile.measured else peaks
        print(f"{name}: {profile.title}: {what}")
        if args.json:
            for key, source in profile.sources.items():
                print(f"    {key}: {source}")
    return 0


def _validate(args) -> int:
    from dataclasses import replace

    from lungbench.predict.validate import QUICK_ROTATION, ROTATION, dumps, run_rotation

    if args.gpu:
        from lungbench.predict.validate_gpu import (
            GPU_DEFAULT,
            GPU_QUICK,
            run_gpu_validation,
        )

        cases = run_gpu_validation(GPU_QUICK if args.quick else GPU_DEFAULT, bench_subprocess)
    else:
        plans = [
            replace(p, ddp=p.ddp and args.ddp) for p in (QUICK_ROTATION if args.quick else ROTATION)
        ]
        cases = run_rotation(plans, bench_subprocess)
    if args.json:
        print(dumps(cases))
        return 0
    print(format_validation(cases))
    return 0


def format_validation(cases: list[dict[str, Any]]) -> str:
    """The cases as one table (a row per target, grouped by source), then the median
    |error| per kind and per source and the intervals' coverage."""
    lines = [
        "| source | kind | target | predicted | measured | error | interval covers | limited by |",
        "|---|---|---|---|---|---|---|---|",
    ]
    notes = []
    for c in cases:
        if c["kind"] == "source":
            lines.append(
                f"| {c['target']} | source | (measured) | - | {_seconds(c['measured_s'])} | - | - | - |"
            )
            notes.append(c.get("note", ""))
            continue
        error = f"{100 * c['error']:+.1f}%" if c.get("error") is not None else "not measured"
        covers = {True: "yes", False: "no", None: "n/a"}[c.get("inside")]
        error += " (busy)" if c.get("busy") else ""
        lines.append(
            f"| {c.get('source', '-')} | {c['kind']} | {c['target']} | "
            f"{_seconds(c['predicted_s'])} | {_seconds(c['measured_s'])} | {error} | {covers} | "
            f"{c['bound']} |"
        )
    lines += [f"note: {n}" for n in dict.fromkeys(notes) if n]
    lines += summary_lines(cases)
    lines.append("errors stored: later predictions' intervals come from them")
    return "\n".join(lines)


def summary_lines(cases: list[dict[str, Any]]) -> list[str]:
    from lungbench.predict.validate import summary

    s = summary(cases)
    if s["median_abs_error"] is None:
        return ["\nno target was measured: no error to report"]

    def percents(values: dict[str, float]) -> str:
        return ", ".join(f"{k} {100 * v:.1f}%" for k, v in values.items())

    lines = [
        f"\nmedian |error|: {100 * s['median_abs_error']:.1f}% over {s['cases']} cases "
        f"from {s['sources']} source(s)",
        f"by kind: {percents(s['median_abs_error_by_kind'])}",
        f"by source: {percents(s['median_abs_error_by_source'])}",
    ]
    if s["busy_cases"]:
        quiet = s["median_abs_error_quiet"]
        lines.append(
            f"warning: {s['busy_cases']} of {s['cases']} cases were measured while the machine "
            "was busy (marked '(busy)'): their errors measure the neighbours too; median "
            f"|error| of the quiet ones: {'-' if quiet is None else f'{100 * quiet:.1f}%'}"
        )
    if s["coverage_leave_one_source_out"] is not None:
        lines.append(
            f"interval coverage, leave-one-source-out: "
            f"{100 * s['coverage_leave_one_source_out']:.0f}% of {s['coverage_cases']} cases "
            "(each source's cases against the intervals the other sources' errors make)"
        )
    if s["interval_coverage"] is not None:
        lines.append(
            f"intervals as predicted (from this host's earlier validations) covered "
            f"{100 * s['interval_coverage']:.0f}%"
        )
    return lines
