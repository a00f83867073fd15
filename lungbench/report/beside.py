"""Layer 10 (report): Which published tables stand beside which of a run's tables.

For each table of a run (its tables/NAME.csv, and the tables the report derives in a seed's
layout from what a recipe wrote: seed 004's with/without transfer-learning table from a
chestxray run's folds.csv) the references of results/reference/ that stand beside it, each
either to be shown or with the reason it is not (missing, malformed, another layout).

    for pairing in pairings(view, load_references(folder)):
        pairing.name, pairing.ours, [(p.reference.path.name, p.problem) for p in pairing.published]
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import pandas as pd

from lungbench.core.errors import DataError
from lungbench.report.reference import Reference, ReferenceSet, layout_problem, run_models
from lungbench.report.runview import RunView, read_table
from lungbench.report.training import transfer_table

# Tables the report derives: name -> (the run table it is made from, how).
DERIVED: dict[str, tuple[str, Callable[[pd.DataFrame], tuple[pd.DataFrame, str] | None]]] = {
    "transfer": ("folds", transfer_table),
}


@dataclass(frozen=True)
class Published:
    """A reference beside one of our tables; `problem` says why it is not shown ('' if it is)."""

    reference: Reference
    problem: str = ""


@dataclass(frozen=True)
class Pairing:
    """One table of the run and the published tables beside it."""

    name: str
    ours: pd.DataFrame
    published: list[Published] = field(default_factory=list)
    note: str = ""  # e.g. published for another network than the run's
    derived: str = ""  # how the report made `ours` from the run's tables ('' for tables/NAME.csv)


def pair(view: RunView, name: str, ours: pd.DataFrame, references: ReferenceSet) -> Pairing:
    """The published tables beside our table `name` (`ours` as read from its CSV)."""
    beside = references.beside(name, run_models(view.config))
    published = []
    for ref in beside.references:
        problem = ref.problem
        if not problem and ref.frame is not None:
            problem = layout_problem(ref.frame, ours)
        published.append(Published(ref, problem))
    return Pairing(name, ours, published, beside.note)


def derived_tables(view: RunView) -> dict[str, tuple[pd.DataFrame, str]]:
    """name -> (table, how it was made) for each table the report derives from the run's
    tables (absent when the run wrote the table itself or lacks what it is made from)."""
    out = {}
    for name, (source, build) in DERIVED.items():
        if name in view.tables or source not in view.tables:
            continue
        try:
            made = build(read_table(view.tables[source]))
        except DataError:
            continue
        if made is not None:
            table, how = made
            out[name] = (table.reset_index(), f"derived from {source}.csv: {how}")
    return out


def pairings(view: RunView, references: ReferenceSet) -> list[Pairing]:
    """Every table of the run (written or derived) that has published tables beside it."""
    out = []
    for name, path in view.tables.items():
        if not references.beside(name, run_models(view.config)).references:
            continue
        try:
            ours = read_table(path)
        except DataError:
            continue  # the report says so where the table would be
        ours = ours.rename(columns=lambda c: "" if str(c).startswith("Unnamed: ") else c)
        out.append(pair(view, name, ours, references))
    for name, (table, how) in derived_tables(view).items():
        if references.beside(name, run_models(view.config)).references:
            out.append(replace(pair(view, name, table, references), derived=how))
    return out


def summary_table(view: RunView, references: ReferenceSet) -> pd.DataFrame:
    """One row per published table beside one of the run's: which, where from, shown or why not."""
    rows = [
        {
            "ours": p.name + (" (derived)" if p.derived else ""),
            "published": f"{pub.reference.seed_label}: {pub.reference.path.name}",
            "source": pub.reference.source,
            "shown": "yes" if not pub.problem else f"no: {pub.problem}",
        }
        for p in pairings(view, references)
        for pub in p.published
    ]
    return pd.DataFrame(rows, columns=["ours", "published", "source", "shown"])
