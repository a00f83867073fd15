"""Layer 10 (report): One report for several runs read one after another: a chapter per run, each table beside its published ones.

`lungbench report A B` sets runs side by side, one column each, to compare them; a
reproduction (`lungbench reproduce`) is six different experiments, which read better one
after another. This writes report.html (self-contained, plots embedded) and report.md: a
list of the chapters (the twins: seed, what, status, time, how many published tables stand
beside ours), then per chapter the sections `lungbench report` writes for its run (the
environment, telemetry and long configuration left to each run's own report), the seeds'
published tables beside ours in the same layout (lungbench.report.beside).

    write_combined_report("lungbench reproduce", overview, chapters, out_dir)
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import pandas as pd

from lungbench.core.errors import DataError
from lungbench.core.runs import utc_now
from lungbench.report.beside import pairings
from lungbench.report.html import (
    CSS,
    FILES_DIR,
    ReportFiles,
    Section,
    _e,
    _html_block,
    _markdown_block,
    _write_text,
    build_sections,
    reference_warnings,
    section_id,
)
from lungbench.report.reference import ReferenceSet, default_reference_dir, load_references
from lungbench.report.runview import load_run

# Sections of a run's own report left out of a chapter: the run's own report has them.
LEFT_OUT = ("Environment", "Telemetry", "Configuration")


@dataclass(frozen=True)
class Chapter:
    """One run of the combined report: its name (an anchor), heading, folder (None when it
    never ran) and a line said under the heading (its status, how long it took)."""

    name: str
    title: str
    run_dir: Path | None
    note: str = ""


def published_counts(run_dir: Path | None, references: ReferenceSet) -> tuple[int, int, str]:
    """(shown, beside, names): how many published tables stand beside the run's tables and
    are shown, of how many, and which of our tables they stand beside."""
    if run_dir is None:
        return 0, 0, ""
    try:
        view = load_run(run_dir)
    except DataError:
        return 0, 0, ""
    pairs = pairings(view, references)
    shown = sum(1 for p in pairs for pub in p.published if not pub.problem)
    total = sum(len(p.published) for p in pairs)
    names = ", ".join(
        dict.fromkeys(p.name for p in pairs if any(not x.problem for x in p.published))
    )
    return shown, total, names


def write_combined_report(
    title: str,
    overview: pd.DataFrame,
    chapters: Sequence[Chapter],
    out_dir: Path,
    reference: str | Path | None = None,
    use_reference: bool = True,
) -> ReportFiles:
    """report.html and report.md in `out_dir`: `overview` (a table, one row per chapter) and
    each chapter's run report with the published tables beside ours."""
    out_dir = Path(out_dir)
    figure_dir = out_dir / FILES_DIR
    figure_dir.mkdir(parents=True, exist_ok=True)
    references = ReferenceSet(None)
    if use_reference:
        references = load_references(Path(reference) if reference else default_reference_dir())
    parts: list[tuple[Chapter, list[Section]]] = []
    warnings: list[str] = list(references.problems)
    for chapter in chapters:
        sections: list[Section] = []
        if chapter.run_dir is not None:
            try:
                view = load_run(chapter.run_dir)
            except DataError as exc:
                warnings.append(str(exc))
            else:
                folder = figure_dir / _anchor(chapter.name)
                sections = [
                    s for s in build_sections([view], folder, references) if s.title not in LEFT_OUT
                ]
                warnings += [w for w in reference_warnings([view], references) if w not in warnings]
        parts.append((chapter, sections))
    html_path, md_path = out_dir / "report.html", out_dir / "report.md"
    _write_text(html_path, _html(title, overview, parts))
    _write_text(md_path, _markdown(title, overview, parts, out_dir))
    return ReportFiles(html_path, md_path, tuple(warnings))


def _anchor(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "-", name).strip("-") or "run"


def _html(title: str, overview: pd.DataFrame, parts) -> str:
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{_e(title)}</h1>",
        f'<p class="note">Written {_e(utc_now())} by lungbench; {len(parts)} part(s).</p>',
        '<div class="scroll">'  # a wide table scrolls in its box, not the page
        + overview.to_html(index=False, escape=True, na_rep="", border=0)
        + "</div>",
        "<ul>"
        + "".join(
            f'<li><a href="#{_anchor(c.name)}">{_e(c.name)}</a>: {_e(c.title)}</li>'
            for c, _ in parts
        )
        + "</ul>",
    ]
    for chapter, sections in parts:
        out.append(f'<section id="{_anchor(chapter.name)}"><h2>{_e(chapter.name)}: ')
        out.append(f"{_e(chapter.title)}</h2>")
        if chapter.note:
            out.append(f'<p class="note">{_e(chapter.note)}</p>')
        if not sections:
            out.append('<p class="note">(nothing to show)</p>')
        for section in sections:
            # ids per chapter: a banner links to its own chapter's section
            prefix = f"{_anchor(chapter.name)}-"
            out.append(f'<h3 id="{prefix}{section_id(section.title)}">{_e(section.title)}</h3>')
            out.extend(
                _html_block(replace(b, link=prefix + b.link) if b.link else b)
                for b in section.columns[0]
            )
        out.append("</section>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def _markdown(title: str, overview: pd.DataFrame, parts, out_dir: Path) -> str:
    from lungbench.core.runs import markdown

    lines = [f"# {title}", "", f"Written {utc_now()} by lungbench; {len(parts)} part(s).", ""]
    lines += [markdown(overview.fillna(""), index=False), ""]
    for chapter, sections in parts:
        lines += [f"## {chapter.name}: {chapter.title}", ""]
        if chapter.note:
            lines += [chapter.note, ""]
        if not sections:
            lines += ["(nothing to show)", ""]
        for section in sections:
            lines += [f"### {section.title}", ""]
            for block in section.columns[0]:
                lines += [_markdown_block(block, out_dir), ""]
    return "\n".join(lines).rstrip() + "\n"
