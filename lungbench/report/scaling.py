"""Layer 10 (report): Scaling tables and plots of DDP runs: efficiency per world size, and where the time goes.

    records = combine_runs([Path("results/run-1proc"), Path("results/run-2proc")])
    print(format_scaling_markdown(scaling_table(records)))
    print(format_breakdown(records))

The reference (world size 1) of each configuration is the one-process record with the same
model, preset, filters and device type and the threads of one rank: the baseline that a DDP
run measures on rank 0, or the records of a separate one-process run read in with
`combine_runs`. On a CPU, rank 0 also measures one process with every core ("whole
machine", labelled, column "vs whole machine"): whether the ranks beat it at all.

Throughput is global samples per second of the training step (global batch / step time);
speed-up = throughput(W) / throughput(1); efficiency = speed-up / W. That one formula covers
both modes: weak scaling (per-process batch fixed, so the ideal step time stays constant)
and strong scaling (global batch fixed, so the ideal step time falls as 1/W). The epoch
columns compare the wall time of one epoch over the same samples.

The breakdown splits a step (and an epoch) into compute (the no_sync forward + backward plus
the optimizer), communication the step could not hide (DDP step minus compute) and, for the
epoch, data loading (time spent waiting for the DataLoader).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from lungbench.core.errors import DataError
from lungbench.core.runs import RECORDS_FILE, read_records, save_figure, write_table
from lungbench.harness.ddp import RANK_THREADS, WHOLE
from lungbench.measure.stats import format_seconds
from lungbench.report import plots  # its import selects matplotlib's headless backend

MATCH = ("model", "preset", "filters", "dtype")
SCALING_COLUMNS = [
    "scaling",
    "world_size",
    "nodes",
    "platform",
    "threads",
    "filters",
    "batch_size",
    "per_rank_batch",
    "global_batch",
    "step_s",
    "samples_per_s",
    "speedup",
    "efficiency",
    "compute_s",
    "comm_overhead_s",
    "allreduce_s",
    "allreduce_bytes",
    "allreduce_model_s",
    "vs_whole_machine",
    "epoch_s",
    "epoch_speedup",
    "epoch_efficiency",
    "data_wait_s",
    "params_identical",
    "status",
    "reference",
    "why",
]


def combine_runs(run_dirs: Iterable[str | Path]) -> list[dict[str, Any]]:
    """The records of several run folders (e.g. a 1-process and a 2-process run), in order.
    DataError for a folder without records."""
    records: list[dict[str, Any]] = []
    for run_dir in run_dirs:
        found = read_records(Path(run_dir))
        if not found:
            raise DataError(f"{run_dir}: no {RECORDS_FILE}; choose a lungbench bench run folder")
        records.extend(found)
    return records


def world_size(record: dict[str, Any]) -> int:
    """A record's world size (records of plain one-process runs have none: 1)."""
    return int(record.get("world_size") or 1)


def _device_type(record: dict[str, Any]) -> str:
    return str(record.get("device", "cpu")).split(":")[0]


def _reference(
    record: dict[str, Any], singles: Sequence[dict[str, Any]], batch: int, kind: str = RANK_THREADS
) -> dict[str, Any] | None:
    """The one-process record this DDP record is compared with (None if there is none):
    `kind` RANK_THREADS, the reference of the efficiency (a run without the field is one),
    or WHOLE, the same process with every core."""
    for single in singles:
        if (
            single.get("reference", RANK_THREADS) == kind
            and all(single.get(k) == record.get(k) for k in MATCH)
            and _device_type(single) == _device_type(record)
            and single.get("batch_size") == batch
            and _same_recipe(single, record)
        ):
            return single
    return None


RAN = ("dtype_used", "memory_format_used", "optimizer_used", "compile_used")


def _same_recipe(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Both ran the same switches (where both records say): a reference of another recipe
    would credit the recipe to the scaling."""
    return all(a[k] == b[k] for k in RAN if k in a and k in b)


def _row(
    record: dict[str, Any],
    scaling: str,
    ref: dict[str, Any] | None,
    whole: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One table row; `ref` the reference of its efficiency, `whole` the whole-machine run."""
    ws = world_size(record)
    per_rank = record.get("per_rank_batch") or record.get("batch_size")
    global_batch = record.get("global_batch") or record.get("batch_size")
    step = record.get("step_s_median")
    row = {
        "scaling": scaling,
        "world_size": ws,
        "nodes": record.get("nodes") or 1,
        "platform": record.get("platform"),
        "threads": record.get("threads_used"),  # per process
        "filters": record.get("filters"),
        "batch_size": record.get("batch_size"),
        "per_rank_batch": per_rank,
        "global_batch": global_batch,
        "step_s": step,
        "samples_per_s": global_batch / step if step else float("nan"),
        "compute_s": record.get("compute_s_median", step if ws == 1 else None),
        "comm_overhead_s": record.get("comm_overhead_s", 0.0 if ws == 1 else None),
        "allreduce_s": record.get("allreduce_s_median", 0.0 if ws == 1 else None),
        "allreduce_bytes": record.get("allreduce_bytes"),
        "allreduce_model_s": record.get("allreduce_model_s"),
        "epoch_s": record.get("epoch_s"),
        "data_wait_s": record.get("epoch_data_wait_s"),
        "params_identical": record.get("params_identical"),
        "status": record.get("status"),
        "reference": record.get("reference", RANK_THREADS) if ws == 1 else None,
    }
    ref_step = ref.get("step_s_median") if ref and ref.get("status") == "ok" else None
    if ref_step and step:
        ref_batch = ref.get("global_batch") or ref.get("batch_size")
        row["speedup"] = row["samples_per_s"] / (ref_batch / ref_step)
        row["efficiency"] = row["speedup"] / ws
    if whole and whole.get("status") == "ok" and whole.get("step_s_median") and step:
        whole_batch = whole.get("global_batch") or whole.get("batch_size")
        row["vs_whole_machine"] = row["samples_per_s"] / (whole_batch / whole["step_s_median"])
    if ws > 1:
        row["why"] = explain(record, scaling, ref, row.get("vs_whole_machine"))
    if ref and ref.get("epoch_s") and record.get("epoch_s"):
        row["epoch_speedup"] = ref["epoch_s"] / record["epoch_s"]
        row["epoch_efficiency"] = row["epoch_speedup"] / ws
    return row


def explain(
    record: dict[str, Any],
    scaling: str,
    ref: dict[str, Any] | None,
    vs_whole: float | None = None,
) -> str:
    """Why a DDP row is not at 100%: each measured loss as a share, in words.

    - exposed all-reduce: the part of the step the gradient communication did not hide
      (DDP step - no_sync compute), as a share of the step;
    - shared cores: the ranks' compute against one process alone with the same threads
      (weak scaling: the same per-rank batch; strong: the reference's step / world size);
    - data waits: the slowest rank's time waiting for its DataLoader, share of the epoch;
    - load imbalance: how far the fastest rank's step is ahead of the slowest one's;
    - the isolated all-reduce against its alpha-beta model (latency and bandwidth fitted
      from single all-reduces at three sizes, lungbench.measure.allreduce);
    - against one process with every core (`vs_whole`, when it was measured).
    """
    step = record.get("step_s_median")
    if record.get("status") != "ok" or not step:
        return ""
    parts = []
    comm = record.get("comm_overhead_s")
    if comm is not None:
        parts.append(f"exposed all-reduce {comm / step:.0%} of the step")
    compute = record.get("compute_s_median")
    if ref and ref.get("status") == "ok" and ref.get("step_s_median") and compute:
        ideal = ref["step_s_median"] / (1 if scaling == "weak" else world_size(record))
        ratio = compute / ideal
        if ratio > 1.05:
            parts.append(f"compute {ratio:.2f}x slower than one process alone (shared cores)")
        elif ratio < 0.95:
            parts.append(f"compute {1 / ratio:.2f}x faster than one process alone (caches)")
    wait, epoch = record.get("epoch_data_wait_s"), record.get("epoch_s")
    if wait is not None and epoch:
        parts.append(f"data waits {wait / epoch:.0%} of the epoch")
    imbalance = record.get("step_imbalance")
    if imbalance is not None and imbalance > 0.05:
        parts.append(f"slowest rank {imbalance:.0%} behind the fastest")
    model, measured = record.get("allreduce_model_s"), record.get("allreduce_s_median")
    if model is not None and measured:
        parts.append(
            f"all-reduce {format_seconds(measured)} measured vs {format_seconds(model)} "
            f"alpha-beta (latency {format_seconds(record['allreduce_alpha_s'])}, "
            f"{record['allreduce_beta_bytes_per_s'] / 1e6:.0f} MB/s)"
        )
    if vs_whole is not None and vs_whole < 0.95:
        parts.append(f"one process with every core is {1 / vs_whole:.2f}x faster")
    return "; ".join(parts)


def scaling_table(records: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """One row per scaling mode x configuration x world size, world size 1 included as the
    reference row of each mode (empty frame when no record is a DDP one)."""
    singles = [r for r in records if world_size(r) == 1 and r.get("status") == "ok"]
    rows = []
    for record in records:
        scaling = record.get("scaling")
        if world_size(record) == 1 or scaling not in ("weak", "strong"):
            continue
        # weak: compared with one process at the per-process batch; strong: at the global one
        ref = _reference(record, singles, record["batch_size"])
        whole = _reference(record, singles, record["batch_size"], WHOLE)
        if ref is not None:
            rows.append(_row(ref, scaling, ref, whole))
        if whole is not None:
            rows.append(_row(whole, scaling, None, whole))  # labelled; no efficiency
        rows.append(_row(record, scaling, ref, whole))
    if not rows:
        return pd.DataFrame(columns=SCALING_COLUMNS)
    frame = pd.DataFrame(rows).drop_duplicates(
        subset=["scaling", "world_size", "nodes", "platform", "filters", "batch_size"]
    )
    frame = frame.reindex(columns=SCALING_COLUMNS)
    return frame.sort_values(
        ["scaling", "filters", "batch_size", "world_size"], kind="stable"
    ).reset_index(drop=True)


def format_scaling_markdown(table: pd.DataFrame) -> str:
    """The scaling table as Markdown, seconds in readable units, ratios as x1.83 / 92%."""
    header = (
        "| Scaling | World size | Filters | Batch (per rank / global) | Step | Samples/s | "
        "Speed-up | Efficiency | vs whole machine | Compute | Comm. overhead | "
        "All-reduce (isolated) | All-reduce (alpha-beta) | Epoch | Epoch speed-up | "
        "Data wait | Why |"
    )
    lines = [header, _rule(header)]
    for _, r in table.iterrows():
        lines.append(
            "| "
            + " | ".join(
                [
                    str(r["scaling"]),
                    _world(r),
                    str(r["filters"]),
                    f"{_int(r['per_rank_batch'])} / {_int(r['global_batch'])}",
                    _sec(r["step_s"]),
                    _num(r["samples_per_s"]),
                    _ratio(r["speedup"]),
                    _pct(r["efficiency"]),
                    _ratio(r["vs_whole_machine"]),
                    _sec(r["compute_s"]),
                    _sec(r["comm_overhead_s"]),
                    _sec(r["allreduce_s"]),
                    _sec(r["allreduce_model_s"]),
                    _sec(r["epoch_s"]),
                    _ratio(r["epoch_speedup"]),
                    _sec(r["data_wait_s"]),
                    str(r["why"]) if isinstance(r["why"], str) else "",
                ]
            )
            + " |"
        )
    return "\n".join(lines)


def _rule(header: str) -> str:
    return "|" + "---|" * (header.count("|") - 1)


def _world(r: pd.Series) -> str:
    nodes = r.get("nodes")
    if r.get("reference") == WHOLE:
        return f"{r['world_size']} ({WHOLE}, {_int(r['threads'])} threads)"
    return f"{r['world_size']}" + (f" ({int(nodes)} nodes)" if nodes and nodes > 1 else "")


def _int(v: Any) -> str:
    return "n/a" if pd.isna(v) else str(int(v))


def _sec(v: Any) -> str:
    return "n/a" if v is None or pd.isna(v) else format_seconds(float(v))


def _num(v: Any) -> str:
    return "n/a" if v is None or pd.isna(v) else f"{float(v):.1f}"


def _ratio(v: Any) -> str:
    return "n/a" if v is None or pd.isna(v) else f"x{float(v):.2f}"


def _pct(v: Any) -> str:
    return "n/a" if v is None or pd.isna(v) else f"{100 * float(v):.0f}%"


# ---------------------------------------------------------------------------- breakdown


def breakdown_table(records: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """Per measured record: a step split into compute and unhidden communication, and an
    epoch split into compute, communication and data waiting (seconds and shares)."""
    rows = []
    for r in records:
        if r.get("status") != "ok" or not r.get("step_s_median"):
            continue
        ws = world_size(r)
        step = r["step_s_median"]
        comm = r.get("comm_overhead_s", 0.0) if ws > 1 else 0.0
        row = {
            "platform": r.get("platform"),
            "scaling": r.get("scaling") or "none",
            "world_size": ws,
            "filters": r.get("filters"),
            "batch_size": r.get("batch_size"),
            "step_s": step,
            "step_compute_s": step - comm,
            "step_comm_s": comm,
            "allreduce_isolated_s": r.get("allreduce_s_median", 0.0) if ws > 1 else 0.0,
        }
        if r.get("epoch_s"):
            epoch, data = r["epoch_s"], r.get("epoch_data_wait_s") or 0.0
            steps = r.get("epoch_steps") or 0
            epoch_comm = min(max(0.0, epoch - data), steps * comm)
            row.update(
                epoch_s=epoch,
                epoch_data_s=data,
                epoch_comm_s=epoch_comm,
                epoch_compute_s=max(0.0, epoch - data - epoch_comm),
            )
        rows.append(row)
    return pd.DataFrame(rows)


def format_breakdown(records: Sequence[dict[str, Any]]) -> str:
    """The breakdown as lines of text, one per measured record."""
    table = breakdown_table(records)
    if table.empty:
        return "breakdown: nothing measured"
    lines = [
        "Where the time goes (compute = no_sync forward+backward + optimizer; comm. = "
        "what the DDP step could not overlap; data = DataLoader waits):"
    ]
    for _, r in table.iterrows():
        label = f"{r['platform']}, filters {r['filters']}, batch {r['batch_size']}"
        step = (
            f"step {_sec(r['step_s'])} = compute {_sec(r['step_compute_s'])} "
            f"({_share(r['step_compute_s'], r['step_s'])}) + comm. "
            f"{_sec(r['step_comm_s'])} ({_share(r['step_comm_s'], r['step_s'])})"
        )
        if r["world_size"] > 1:
            step += f"; isolated all-reduce {_sec(r['allreduce_isolated_s'])}"
        if "epoch_s" in r and pd.notna(r.get("epoch_s")):
            e = r["epoch_s"]
            step += (
                f"; epoch {_sec(e)} = compute {_sec(r['epoch_compute_s'])} "
                f"({_share(r['epoch_compute_s'], e)}) + all-reduce "
                f"{_sec(r['epoch_comm_s'])} ({_share(r['epoch_comm_s'], e)}) + data "
                f"{_sec(r['epoch_data_s'])} ({_share(r['epoch_data_s'], e)})"
            )
        lines.append(f"  {label}: {step}")
    return "\n".join(lines)


def _share(part: float, whole: float) -> str:
    return f"{100 * part / whole:.0f}%" if whole else "n/a"


# ---------------------------------------------------------------------------- plot + files


def scaling_plot(table: pd.DataFrame):
    """Throughput (samples/s) and efficiency vs world size, one line per mode x config."""
    fig, (ax_t, ax_e) = plots.plt.subplots(1, 2, figsize=(10, 4))
    table = table[table["reference"] != WHOLE]  # a point beside the lines, not on them
    for (scaling, filters, batch), group in table.groupby(
        ["scaling", "filters", "batch_size"], sort=False
    ):
        group = group.sort_values("world_size")
        label = f"{scaling}, f{filters}, batch {batch}"
        ax_t.plot(group["world_size"], group["samples_per_s"], marker="o", label=label)
        ax_e.plot(group["world_size"], 100 * group["efficiency"], marker="o", label=label)
    sizes = sorted(table["world_size"].unique())
    for ax in (ax_t, ax_e):
        ax.set_xlabel("world size (processes)")
        ax.set_xticks(sizes)
        ax.grid(True, alpha=0.3)
    ax_t.set_ylabel("samples / s (training step)")
    ax_t.set_title("Throughput")
    ax_e.axhline(100, color="grey", linestyle=":", linewidth=1)
    ax_e.set_ylabel("scaling efficiency (%)")
    ax_e.set_title("Efficiency = speed-up / world size")
    ax_t.legend(fontsize=7)
    return fig


# Efficiency above this is not a speed-up to believe without a second look.
SUPERLINEAR = 1.15


def scaling_notes(table: pd.DataFrame) -> list[str]:
    """Warnings about rows whose numbers deserve suspicion: superlinear efficiency, which on
    one machine usually means the 1-process reference was disturbed (a loaded machine) or
    ran with other CPU threads than each rank."""
    notes = []
    for scaling, group in table.groupby("scaling", sort=False):
        ref = group[group["world_size"] == 1]
        ref_threads = ref["threads"].iloc[0] if len(ref) else None
        for _, r in group[group["efficiency"] > SUPERLINEAR].iterrows():
            threads = (
                f"; threads: reference {_int(ref_threads)}, each rank {_int(r['threads'])}"
                if pd.notna(ref_threads) and pd.notna(r["threads"])
                else ""
            )
            notes.append(
                f"note: {scaling} scaling, world size {r['world_size']}, filters "
                f"{r['filters']}, batch {r['batch_size']}: efficiency {_pct(r['efficiency'])} "
                f"is superlinear: the 1-process reference was likely disturbed (other load) "
                f"or not comparable{threads}; rerun on a quiet machine before trusting it"
            )
    return notes


def write_scaling_outputs(run_dir: Path, records: Sequence[dict[str, Any]]) -> str:
    """Write tables/scaling.csv|.md, tables/breakdown.csv|.md and plots/scaling.png; return
    the text to print (scaling table and breakdown)."""
    table = scaling_table(records)
    breakdown = format_breakdown(records)
    write_table(run_dir, "breakdown", breakdown_table(records), index=False)
    (run_dir / "tables" / "breakdown.txt").write_text(breakdown + "\n")
    if table.empty:
        return "no DDP record: no scaling table\n\n" + breakdown
    write_table(run_dir, "scaling", table, index=False)
    text = format_scaling_markdown(table)
    notes = scaling_notes(table)
    if notes:
        text += "\n\n" + "\n".join(notes)
    (run_dir / "tables" / "scaling.md").write_text(text + "\n")
    if table["efficiency"].notna().any():
        save_figure(run_dir, "scaling", scaling_plot(table))
    return "Scaling (speed-up and efficiency vs world size 1):\n\n" + text + "\n\n" + breakdown
