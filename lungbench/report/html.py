"""Layer 10 (report): `lungbench report`: one self-contained HTML file and its Markdown twin for one or more runs.

    lungbench report results/bench-20260101-120000-node1            # -> report.html, report.md
    lungbench report results/run-a results/run-b --out results/ab   # side by side

The HTML has no external assets: plots are embedded as base64 PNG and the style is inline,
so the file can be mailed, attached to a ticket or opened from a cluster's scratch folder.
The Markdown twin links the same images as files (the run's plots/*.png, and the figures the
report draws into report_files/). Runs appear side by side, one column per run.

What goes in, for each run, when it has it: overview (status, command line), environment,
configuration, the speed-up and scaling tables, step time vs batch size and filters, memory,
telemetry timelines, the training tables and curves, other tables and plots, failed
configurations, and the list of published tables shown. Every table with a published one in
results/reference/ (lungbench.report.reference) has it beside, in the same layout; a
reference that is missing or malformed is named in a note (and on the console) instead.
Everything read from a run is escaped: a run folder is data, not markup.

A reader's page: a configuration is named in words (lungbench.report.labels), a run measured
on a busy machine says so in one line at the top with a link to the section that lists each
busy configuration and why, every table scrolls inside its own box rather than widening the
page, and the telemetry panels are folded (<details>).
"""

from __future__ import annotations

import base64
import html
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from lungbench.core.errors import DataError, UsageError
from lungbench.core.paths import check_out_dir
from lungbench.core.runs import markdown, save_figure, utc_now
from lungbench.report import figures
from lungbench.report.beside import derived_tables, pair, pairings, summary_table
from lungbench.report.busy import busy_details, busy_line
from lungbench.report.labels import config_label
from lungbench.report.reference import ReferenceSet, default_reference_dir, load_references
from lungbench.report.roofline import roofline_blocks
from lungbench.report.runview import MAX_TABLE_ROWS, RunView, load_run, read_table

FILES_DIR = "report_files"
MAX_TELEMETRY_FILES = 8
# Tables with one row per record or prediction: pointed to, not shown.
LONG_TABLES = ("measurements", "configurations")
TRAINING_TABLE = re.compile(
    r"^(auc|confusion|methods|pretrain|folds|cost|cv|mosmed|metrics"
    r"|variants|accuracy|history|transfer)"
)
TRAINING_PLOT = re.compile(r"^(loss|roc|auc|confusion|lr|cam|accuracy|metrics)")
SCALING_NAME = re.compile(r"(scaling|breakdown|ddp|weak|strong|world)")
BENCH_PLOTS = ("step_time", "throughput")
BUSY_SECTION = "Measured on a busy machine"


@dataclass
class Block:
    """One item of a report: a paragraph, a table or an image (with an optional caption)."""

    kind: str  # "text" | "table" | "image" | "group" (its children side by side)
    caption: str = ""
    text: str = ""
    table: pd.DataFrame | None = None
    image: Path | None = None
    note: str = ""
    children: list[Block] = field(default_factory=list)
    folded: bool = False  # HTML: inside <details>, its caption the summary line
    link: str = ""  # "banner": the id of the section it points to


@dataclass
class Section:
    """A titled part of the report: one list of blocks per run (side by side)."""

    title: str
    columns: list[list[Block]] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not any(self.columns)


@dataclass(frozen=True)
class ReportFiles:
    html: Path
    markdown: Path
    warnings: tuple[str, ...] = ()  # published tables missing, malformed or not shown


# ----------------------------------------------------------------------------- building


def write_report(
    runs: Sequence[str | os.PathLike],
    out: str | os.PathLike | None = None,
    reference: str | os.PathLike | None = None,
    use_reference: bool = True,
) -> ReportFiles:
    """Write report.html and report.md for `runs` into `out` (default: the first run's
    folder); several runs give report-side-by-side.html/.md. Returns the two paths."""
    if not runs:
        raise UsageError("report: give at least one run folder")
    views = [load_run(r) for r in runs]
    out_dir = Path(out) if out is not None else views[0].path
    check_out_dir(out_dir)
    (out_dir / FILES_DIR).mkdir(parents=True, exist_ok=True)
    references = ReferenceSet(None)
    if use_reference:
        ref_dir = Path(reference) if reference is not None else default_reference_dir()
        references = load_references(ref_dir)
    sections = build_sections(views, out_dir / FILES_DIR, references)
    stem = "report" if len(views) == 1 else "report-side-by-side"
    title = "lungbench report: " + ", ".join(v.name for v in views)
    html_path = out_dir / f"{stem}.html"
    md_path = out_dir / f"{stem}.md"
    _write_text(html_path, render_html(title, views, sections))
    _write_text(md_path, render_markdown(title, views, sections, out_dir))
    return ReportFiles(html_path, md_path, reference_warnings(views, references))


def reference_warnings(views: Sequence[RunView], references: ReferenceSet) -> tuple[str, ...]:
    """The reference folder's problems, then each published table kept from beside a run's
    table for another reason (its layout)."""
    warnings = list(references.problems)
    for view in views:
        for pairing in pairings(view, references):
            for published in pairing.published:
                if published.problem and not published.reference.problem:
                    warnings.append(
                        f"{view.name}: {published.reference.path} beside {pairing.name}: "
                        f"{published.problem}"
                    )
    return tuple(warnings)


def build_sections(
    views: Sequence[RunView], figure_dir: Path, references: ReferenceSet
) -> list[Section]:
    """Every section with at least one block for one of the runs, in reading order."""
    builders: list[tuple[str, Callable[[RunView, Path], list[Block]]]] = [
        ("Overview", lambda v, d: overview_blocks(v)),
        ("Environment", lambda v, d: environment_blocks(v)),
        ("Configuration", lambda v, d: config_blocks(v)),
        ("Speed-up", lambda v, d: table_blocks(v, _names(v.tables, "speedup"), references)),
        ("Scaling", lambda v, d: scaling_blocks(v, references)),
        ("Step time vs batch size and filters", step_time_blocks),
        ("Memory", memory_blocks),
        ("The gap per operator", lambda v, d: [Block(**b) for b in roofline_blocks(v, d)]),
        ("Telemetry", telemetry_blocks),
        ("Training", lambda v, d: training_blocks(v, d, references)),
        ("Other tables and plots", lambda v, d: other_blocks(v, references)),
        ("Failed configurations", lambda v, d: failure_blocks(v)),
        (BUSY_SECTION, lambda v, d: busy_blocks(v)),
        ("Published tables", lambda v, d: reference_blocks(v, references, v is views[0])),
    ]
    sections = []
    for title, build in builders:
        section = Section(title, [build(v, _figure_folder(figure_dir, v, views)) for v in views])
        if not section.empty:
            sections.append(section)
    return sections


def overview_blocks(view: RunView) -> list[Block]:
    info = view.info
    counts: dict[str, int] = {}
    for r in view.records:
        # a training run's records (folds, fits, variants) carry no status: they finished
        status = str(r.get("status") or "finished")
        counts[status] = counts.get(status, 0) + 1
    rows = {
        "run": view.name,
        "folder": str(view.path),
        "kind": view.kind,
        "status": view.status,
        "started (UTC)": info.get("started_utc"),
        "finished (UTC)": info.get("finished_utc"),
        "resumed (UTC)": ", ".join(info.get("resumed_utc", [])) or None,
        "command": "lungbench " + " ".join(map(str, info.get("argv", []))),
        "records": ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or None,
    }
    blocks = [Block("table", table=_key_values(rows))]
    banner = busy_line(view.records, short=True)
    if banner:
        blocks.insert(0, Block("banner", text=banner, link=section_id(BUSY_SECTION)))
    if view.status != "complete":
        hint = (
            f" Continue it with `lungbench bench --resume {view.path}`."
            if view.kind == "bench"
            else ""
        )
        blocks.append(
            Block(
                "text",
                text=f"This run is {view.status!r}, not complete: its "
                f"tables hold what was measured before it stopped.{hint}",
            )
        )
    return blocks


def environment_blocks(view: RunView) -> list[Block]:
    env = view.environment
    if not env:
        return []
    cpu, tor = env.get("cpu") or {}, env.get("torch") or {}
    git = env.get("git") or {}
    rows = {
        "host": env.get("host"),
        "time (UTC)": env.get("utc_time"),
        "lungbench": env.get("lungbench"),
        "git commit": (
            f"{str(git.get('commit'))[:12]}{' (dirty)' if git.get('dirty') else ''}"
            if git
            else None
        ),
        "python": env.get("python"),
        "platform": env.get("platform"),
        "torch": tor.get("version"),
        "CUDA / cuDNN": f"{tor.get('cuda_version')} / {tor.get('cudnn_version')}"
        if tor.get("cuda_available")
        else "not available",
        "CPU": cpu.get("model"),
        "cores (physical / logical / usable)": f"{cpu.get('physical_cores')} / {cpu.get('logical_cores')} / "
        f"{cpu.get('affinity_cores')}",
        "torch threads": cpu.get("torch_threads"),
        "memory (GiB)": _gib(env.get("memory_total_bytes")),
        "GPUs": ", ".join(
            f"{g.get('name')} ({_gib(g.get('memory_total_bytes'))} GiB, driver {g.get('driver')})"
            for g in env.get("gpus") or []
        )
        or "none",
        "SLURM job": (env.get("slurm") or {}).get("SLURM_JOB_ID"),
    }
    peaks = env.get("peak_flops") or {
        d: {"fp32": v} for d, v in (env.get("peak_flops_fp32") or {}).items()
    }
    for name, by_dtype in peaks.items():
        for dtype in ("fp32", "bf16", "fp16"):
            value = by_dtype.get(dtype)
            if isinstance(value, (int, float)):
                spread = by_dtype.get(f"{dtype}_spread")
                rows[f"measured peak {dtype}, {name} (GFLOP/s)"] = f"{value / 1e9:.1f}" + (
                    f" (median {100 * spread:.0f}% below)" if isinstance(spread, float) else ""
                )
        bandwidth = by_dtype.get("copy_bytes_per_s")
        if isinstance(bandwidth, (int, float)):
            rows[f"measured copy bandwidth, {name} (GB/s)"] = f"{bandwidth / 1e9:.1f}"
        if by_dtype.get("source"):
            rows[f"peaks of {name}"] = by_dtype["source"]
    libraries = {k: v for k, v in (env.get("libraries") or {}).items() if v}
    if libraries:
        rows["libraries"] = ", ".join(f"{k} {v}" for k, v in libraries.items())
    return [Block("table", table=_key_values(rows))]


def config_blocks(view: RunView) -> list[Block]:
    config = view.config.get("request", view.config) if view.config else {}
    if not config:
        return []
    flat = _flatten(config)
    for key in ("store", "configs", "store_kind"):
        if key in view.config and key not in flat:
            flat[key] = view.config[key]
    return [Block("table", table=_key_values(flat))]


def table_blocks(
    view: RunView, names: Sequence[str], references: ReferenceSet, suffix: str = " (this run)"
) -> list[Block]:
    """The named tables of the run, each with its published tables beside it."""
    blocks = []
    for name in names:
        blocks += beside_blocks(
            view, name, _table_block(view.tables[name], f"{name}{suffix}"), references
        )
    return blocks


def beside_blocks(view: RunView, name: str, ours: Block, references: ReferenceSet) -> list[Block]:
    """Our table `name` and the published tables of the same layout side by side (one group),
    then a note for each published table that cannot be shown, saying which and why."""
    if ours.kind != "table" or ours.table is None:
        return [ours]
    pairing = pair(view, name, ours.table, references)
    shown, notes = [], []
    for published in pairing.published:
        ref = published.reference
        if published.problem:
            notes.append(
                Block(
                    "text",
                    text=f"Published table {ref.path.name} ({ref.seed_label}) is not shown "
                    f"beside {name}: {published.problem}.",
                )
            )
            continue
        table, cut = _head(ref.frame, ref.path.name)
        caption = f"{name}: published ({ref.seed_label}, {ref.path.name})"
        note = "; ".join(n for n in (ref.describe(), cut) if n)
        shown.append(Block("table", caption=caption, table=table, note=note))
    group = Block("group", children=[ours, *shown]) if shown else ours
    if pairing.note and shown:  # published for another network: said before the numbers
        return [Block("text", text=f"Beside {name}: {pairing.note}."), group, *notes]
    return [group, *notes]


def reference_blocks(view: RunView, references: ReferenceSet, first: bool) -> list[Block]:
    """Which published tables stand beside this run's, from where, shown or why not; and (in
    the first run's column) the problems of the reference folder."""
    blocks = []
    table = summary_table(view, references)
    if not table.empty:
        blocks.append(
            Block("table", caption=f"published tables ({references.folder})", table=table)
        )
    if first and references.problems:
        blocks += [Block("text", text=f"Reference problem: {p}") for p in references.problems]
    return blocks


def scaling_blocks(view: RunView, references: ReferenceSet) -> list[Block]:
    """DDP tables (weak / strong scaling, time breakdown) and their plots."""
    blocks = table_blocks(view, _scaling_names(view), references)
    return blocks + [Block("image", caption=n, image=view.plots[n]) for n in _scaling_plots(view)]


def step_time_blocks(view: RunView, figure_dir: Path) -> list[Block]:
    blocks = [
        Block("image", caption=name, image=view.plots[name])
        for name in BENCH_PLOTS
        if name in view.plots
    ]
    blocks += [
        Block("image", caption=name, image=view.plots[name])
        for name in _names(view.plots, "speedup")
    ]
    fig = figures.filters_plot(view.records)
    if fig is not None:
        blocks.append(
            Block(
                "image",
                caption="step time vs filters",
                image=save_figure(figure_dir, "step_time_vs_filters", fig),
            )
        )
    return blocks


def memory_blocks(view: RunView, figure_dir: Path) -> list[Block]:
    fig = figures.memory_plot(view.records)
    if fig is None:
        return []
    path = save_figure(figure_dir, "peak_memory", fig)
    caption = (
        "the training step's own peak memory vs batch size: what one step allocates above "
        "what was live before it (step_peak_memory_mib); the process's RSS is peak_memory_bytes"
    )
    return [Block("image", caption=caption, image=path)]


def telemetry_blocks(view: RunView, figure_dir: Path) -> list[Block]:
    blocks = []
    names = list(view.telemetry)
    # telemetry/<key with | as _>.csv: named by its configuration's label
    labels = {_safe(str(r.get("key"))): config_label(r) for r in view.records if r.get("key")}
    for name in names[:MAX_TELEMETRY_FILES]:
        try:
            frame = read_table(view.telemetry[name])
        except DataError as exc:
            blocks.append(Block("text", text=str(exc)))
            continue
        label = labels.get(name, name)
        fig = figures.telemetry_plot(frame, label)
        if fig is not None:
            path = save_figure(figure_dir, f"telemetry_{_safe(name)}", fig)
            caption = f"telemetry: {label}"
            blocks.append(Block("image", caption=caption, image=path, folded=True))
    if len(names) > MAX_TELEMETRY_FILES:
        blocks.append(
            Block(
                "text",
                text=f"{len(names) - MAX_TELEMETRY_FILES} more telemetry "
                f"files in {view.path / 'telemetry'}",
            )
        )
    return blocks


def training_blocks(view: RunView, figure_dir: Path, references: ReferenceSet) -> list[Block]:
    names = [n for n in view.tables if TRAINING_TABLE.match(n)]
    blocks = table_blocks(view, names, references)
    for name, (table, how) in derived_tables(view).items():
        ours = Block("table", caption=f"{name} (this run)", table=table, note=how)
        blocks += beside_blocks(view, name, ours, references)
    plots = [n for n in view.plots if TRAINING_PLOT.match(n)]
    blocks += [Block("image", caption=n, image=view.plots[n]) for n in plots]
    if view.metrics is not None and not any(n.startswith("loss") for n in plots):
        fig = _metrics_figure(view.metrics)
        if fig is not None:
            blocks.append(
                Block(
                    "image",
                    caption="loss per epoch (metrics.csv)",
                    image=save_figure(figure_dir, "loss_curves", fig),
                )
            )
    return blocks


def other_blocks(view: RunView, references: ReferenceSet) -> list[Block]:
    shown = {
        *_names(view.tables, "speedup"),
        *_scaling_names(view),
        *(n for n in view.tables if TRAINING_TABLE.match(n)),
    }
    blocks = []
    for name in view.tables:
        if name in shown:
            continue
        if name in LONG_TABLES:
            blocks.append(
                Block(
                    "text",
                    text=f"{name}: every record, in {view.tables[name].relative_to(view.path)}",
                )
            )
            continue
        blocks += table_blocks(view, [name], references, suffix="")
    shown_plots = {
        *_scaling_plots(view),
        *BENCH_PLOTS,
        *_names(view.plots, "speedup"),
        *(n for n in view.plots if TRAINING_PLOT.match(n)),
    }
    blocks += [
        Block("image", caption=n, image=p) for n, p in view.plots.items() if n not in shown_plots
    ]
    return blocks


def failure_blocks(view: RunView) -> list[Block]:
    rows = [
        {
            "configuration": config_label(r),
            "status": r.get("status"),
            "error": r.get("error"),
            "key": r.get("key"),
        }
        for r in view.records
        if r.get("status") not in (None, "ok")
    ]
    return [Block("table", table=pd.DataFrame(rows))] if rows else []


def busy_blocks(view: RunView) -> list[Block]:
    """Each configuration measured on a busy machine, and why (the banner links here)."""
    table = busy_details(view.records)
    return [Block("table", table=table)] if not table.empty else []


# ----------------------------------------------------------------------------- rendering

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:1.5em;
color:#222;max-width:72em}
.scroll{overflow-x:auto;max-width:100%}.kv td{overflow-wrap:anywhere;min-width:8em}.kv thead{display:none}
.busy{border-left:4px solid #c00;background:#fff4f4;padding:.3em .6em;margin:.4em 0;
color:#600;font-size:.9em}details{margin:.2em 0}summary{cursor:pointer;font-size:.85em}
h1{font-size:1.4em}h2{font-size:1.15em;border-bottom:1px solid #ccc;margin-top:1.6em}
h3{font-size:1em;margin:.3em 0}.row{display:flex;gap:1.5em;align-items:flex-start}
.col{flex:1 1 0;min-width:0;overflow-x:auto}table{border-collapse:collapse;font-size:.85em;
margin:.4em 0 1em}th,td{border:1px solid #ddd;padding:.2em .5em;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}
.kv td{text-align:left}.pair{display:flex;flex-wrap:wrap;gap:0 1.5em}
.pair>div{flex:1 1 24em;min-width:0;overflow-x:auto}img{max-width:100%;height:auto}figure{margin:.3em 0 1em}figcaption,.note{font-size:.8em;
color:#555}code{background:#f3f3f3;padding:0 .2em}
"""


def render_html(title: str, views: Sequence[RunView], sections: Sequence[Section]) -> str:
    """The report as one HTML document with every image inlined (data: URIs)."""
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{_e(title)}</h1>",
        f'<p class="note">Written {_e(utc_now())} by lungbench; {len(views)} run(s).</p>',
    ]
    for section in sections:
        anchor = section_id(section.title)
        parts.append(f'<section id="{anchor}"><h2>{_e(section.title)}</h2><div class="row">')
        for view, blocks in zip(views, section.columns, strict=True):
            parts.append('<div class="col">')
            if len(views) > 1:
                parts.append(f"<h3>{_e(view.name)}</h3>")
            parts.extend(_html_block(b) for b in blocks)
            if not blocks:
                parts.append('<p class="note">(none in this run)</p>')
            parts.append("</div>")
        parts.append("</div></section>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _html_block(block: Block) -> str:
    if block.kind == "group":
        cells = "".join(f"<div>{_html_block(child)}</div>" for child in block.children)
        return f'<div class="pair">{cells}</div>'
    if block.kind == "text":
        return f"<p>{_inline_code(_e(block.text))}</p>"
    if block.kind == "banner":
        return (
            f'<p class="busy">{_e(block.text)} '
            f'<a href="#{_e(block.link)}">Which configurations, and why</a></p>'
        )
    caption = f"<figcaption>{_e(block.caption)}</figcaption>" if block.caption else ""
    if block.kind == "image" and block.image is not None:
        data = base64.b64encode(block.image.read_bytes()).decode("ascii")
        figure = (
            f'<figure><img alt="{_e(block.caption)}" src="data:image/png;base64,{data}">'
            f"{caption}</figure>"
        )
        if block.folded:
            return f"<details><summary>{_e(block.caption)}</summary>{figure}</details>"
        return figure
    if block.kind == "table" and block.table is not None:
        kind = "kv" if list(block.table.columns) == ["", "value"] else "t"
        speedups = {c: _speedup for c in block.table.columns if "Speed-up" in str(c)}
        table = block.table.to_html(
            index=False,
            escape=True,
            na_rep="",
            border=0,
            float_format=_float,
            classes=kind,
            formatters=speedups,
        )
        note = f'<p class="note">{_e(block.note)}</p>' if block.note else ""
        head = f"<p><b>{_e(block.caption)}</b></p>" if block.caption else ""
        return f'{head}<div class="scroll">{table}</div>{note}'
    return ""


def render_markdown(
    title: str, views: Sequence[RunView], sections: Sequence[Section], out_dir: Path
) -> str:
    """The same report as Markdown; images are links relative to `out_dir`."""
    lines = [f"# {title}", "", f"Written {utc_now()} by lungbench; {len(views)} run(s).", ""]
    for section in sections:
        lines += [f"## {section.title}", ""]
        for view, blocks in zip(views, section.columns, strict=True):
            if len(views) > 1:
                lines += [f"### {view.name}", ""]
            for block in blocks:
                lines += [_markdown_block(block, out_dir), ""]
            if not blocks and len(views) > 1:
                lines += ["(none in this run)", ""]
    return "\n".join(lines).rstrip() + "\n"


def _markdown_block(block: Block, out_dir: Path) -> str:
    if block.kind == "group":
        return "\n\n".join(_markdown_block(child, out_dir) for child in block.children)
    if block.kind == "text":
        return block.text
    if block.kind == "banner":
        return f"**{block.text}** Which configurations, and why: section *{BUSY_SECTION}*."
    if block.kind == "image" and block.image is not None:
        link = Path(os.path.relpath(block.image, out_dir)).as_posix()
        return f"![{block.caption}]({link})"
    if block.kind == "table" and block.table is not None:
        head = f"**{block.caption}**\n\n" if block.caption else ""
        note = f"\n\n{block.note}" if block.note else ""
        return head + markdown(_markdown_safe(block.table), index=False) + note
    return ""


def _markdown_safe(table: pd.DataFrame) -> pd.DataFrame:
    """Pipes escaped (they would split a Markdown cell) and missing values blank."""

    def cell(value: Any) -> Any:
        if isinstance(value, str):
            return value.replace("|", "\\|").replace("\n", " ")
        return "" if value is None or (isinstance(value, float) and value != value) else value

    safe = table.rename(columns=lambda c: cell(str(c)))
    return safe.astype(object).map(cell)


# ----------------------------------------------------------------------------- helpers


def _table_block(path: Path, caption: str) -> Block:
    try:
        table = read_table(path)
    except DataError as exc:
        return Block("text", text=str(exc))
    table, note = _head(table, path.name)
    table = table.rename(columns=lambda c: "" if str(c).startswith("Unnamed: ") else c)
    return Block("table", caption=caption, table=table, note=note)


def _head(table: pd.DataFrame, file_name: str) -> tuple[pd.DataFrame, str]:
    """The first MAX_TABLE_ROWS rows, and a note when there were more."""
    if len(table) <= MAX_TABLE_ROWS:
        return table, ""
    note = f"first {MAX_TABLE_ROWS} of {len(table)} rows; all in {file_name}"
    return table.head(MAX_TABLE_ROWS), note


def _names(items, prefix: str) -> list[str]:
    return [n for n in items if n.startswith(prefix)]


def _scaling_names(view: RunView) -> list[str]:
    return [n for n in view.tables if SCALING_NAME.search(n) and not n.startswith("speedup")]


def _scaling_plots(view: RunView) -> list[str]:
    return [n for n in view.plots if SCALING_NAME.search(n) and not n.startswith("speedup")]


def _metrics_figure(path: Path):
    try:
        frame = read_table(path)
    except DataError:
        return None
    losses = [c for c in frame.columns if "loss" in str(c)]
    if not losses or "epoch" not in frame:
        return None
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for column in losses:
        ax.plot(frame["epoch"], frame[column], marker=".", label=column)
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def _figure_folder(figure_dir: Path, view: RunView, views: Sequence[RunView]) -> Path:
    """report_files/ (one run) or report_files/<i>_<run>/ (several), created on demand."""
    if len(views) == 1:
        folder = figure_dir
    else:
        folder = figure_dir / f"{views.index(view) + 1}_{_safe(view.name)}"
    (folder / "plots").mkdir(parents=True, exist_ok=True)
    # save_figure writes into <run_dir>/plots/: `folder` plays the run_dir here.
    return folder


def _key_values(rows: dict[str, Any]) -> pd.DataFrame:
    items = [(k, _text(v)) for k, v in rows.items() if v not in (None, "", [], {})]
    return pd.DataFrame(items, columns=["", "value"])


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _text(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ", ".join(map(_text, value))
    if isinstance(value, float):
        return _float(value)
    return str(value)


def _float(value: float) -> str:
    return f"{value:.4g}"


def _speedup(value: Any) -> str:
    """Speed-ups as everywhere else: two decimals (lungbench.report.bench_tables)."""
    if isinstance(value, (int, float)) and value == value:
        return f"{value:.2f}"
    return "" if value is None or value != value else str(value)


def section_id(title: str) -> str:
    """The HTML id of the section titled `title` (links point to it)."""
    return "s-" + re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")


def _gib(value: Any) -> str | None:
    return f"{value / 2**30:.1f}" if isinstance(value, (int, float)) else None


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "run"


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _inline_code(escaped: str) -> str:
    """`code` spans in already escaped text."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", escaped)


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
