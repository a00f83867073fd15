"""Layer 6 (measure): reading profiler traces (Chrome-trace JSON).

Per-phase time from the record_function ranges (data, forward, backward, optimizer), the
communication spans (NCCL / Gloo / c10d) and how much of them overlapped with compute.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from lungbench.core.errors import DataError

PHASES = ("data", "forward", "backward", "optimizer")


TRACE_SUFFIXES = (".pt.trace.json", ".pt.trace.json.gz")


# Operator / kernel names of collective communication: NCCL kernels on GPU, the c10d and
# Gloo ops on the CPU side (DDP's gradient all-reduce shows up as these).
COMM_PATTERN = re.compile(
    r"nccl|gloo|c10d::|record_param_comms|all_?reduce|all_?gather|reduce_?scatter|broadcast",
    re.IGNORECASE,
)


def trace_files(trace_dir: Path) -> list[Path]:
    """The Chrome-trace files in `trace_dir`, oldest first."""
    return sorted(p for p in Path(trace_dir).iterdir() if p.name.endswith(TRACE_SUFFIXES))


def load_trace(path: Path) -> dict[str, Any]:
    """A trace as JSON (DataError naming the file unless it is Chrome-trace JSON)."""
    path = Path(path)
    try:
        if path.name.endswith(".gz"):
            import gzip

            with gzip.open(path, "rt") as f:
                trace = json.load(f)
        else:
            with open(path) as f:
                trace = json.load(f)
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: not a readable Chrome-trace JSON file ({exc})") from None
    if not isinstance(trace, dict) or not isinstance(trace.get("traceEvents"), list):
        raise DataError(f"{path}: JSON without a 'traceEvents' list; not a Chrome trace")
    return trace


def _spans(events: Iterable[dict[str, Any]], keep: Callable[[dict[str, Any]], bool]) -> list:
    """(start_us, end_us, pid, tid, name) of complete events ('ph': 'X') passing `keep`."""
    return [
        (
            float(e["ts"]),
            float(e["ts"]) + float(e.get("dur", 0)),
            e.get("pid"),
            e.get("tid"),
            e.get("name", ""),
        )
        for e in events
        if e.get("ph") == "X" and "ts" in e and keep(e)
    ]


def union_length(intervals: Iterable[tuple[float, float]]) -> float:
    """Total length covered by the union of [start, end) intervals."""
    total, end = 0.0, float("-inf")
    for s, e in sorted(intervals):
        if e <= end:
            continue
        total += e - max(s, end)
        end = e
    return total


def _merge(intervals: Iterable[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[list[float]] = []
    for s, e in sorted(intervals):
        if merged and s <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], e)
        else:
            merged.append([s, e])
    return [(s, e) for s, e in merged]


def overlap_fraction(
    comm: Iterable[tuple[float, float]], compute: Iterable[tuple[float, float]]
) -> float:
    """Share of communication time during which compute also runs (0 without communication)."""
    a, b = _merge(comm), _merge(compute)
    total = sum(e - s for s, e in a)
    if total <= 0:
        return 0.0
    i = j = 0
    both = 0.0
    while i < len(a) and j < len(b):
        lo, hi = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        both += max(0.0, hi - lo)
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return both / total


def communication_spans(events: Sequence[dict[str, Any]]) -> tuple[list, list]:
    """(communication, compute) spans of a trace.

    With GPU kernels in the trace: NCCL kernels vs every other kernel (device time). CPU-only:
    collective ops (c10d / Gloo) vs the other CPU ops, leaving out ops nested inside a
    collective on the same thread (its own copies are not compute that hides it).
    """
    kernels = _spans(events, lambda e: e.get("cat") == "kernel")
    if kernels:
        comm = [k for k in kernels if "nccl" in k[4].lower()]
        return comm, [k for k in kernels if "nccl" not in k[4].lower()]
    ops = _spans(events, lambda e: e.get("cat") == "cpu_op")
    comm = [o for o in ops if COMM_PATTERN.search(o[4])]
    inside = {(c[2], c[3]): [] for c in comm}
    for c in comm:
        inside[(c[2], c[3])].append((c[0], c[1]))

    def nested(o: tuple) -> bool:
        return any(s <= o[0] and o[1] <= e for s, e in inside.get((o[2], o[3]), ()))

    compute = [o for o in ops if not COMM_PATTERN.search(o[4]) and not nested(o)]
    return comm, compute


def phase_summary(
    traces: Sequence[dict[str, Any]], phases: Sequence[str] = PHASES
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Per-phase time from the traces' record_function ranges, and the overlap summary.

    Returns (table, summary): the table has one row per phase plus "communication" and
    "step" (ProfilerStep#N) with CPU-side and, when recorded, GPU-side milliseconds per step;
    the summary holds profiled steps, shares of the step and the communication overlap.
    """
    cpu = dict.fromkeys(phases, 0.0)
    gpu = dict.fromkeys(phases, 0.0)
    step_us = comm_us = both_us = 0.0
    steps = 0
    for trace in traces:
        events = trace["traceEvents"]
        for s, e, _, _, name in _spans(events, lambda ev: ev.get("cat") == "user_annotation"):
            if name in cpu:
                cpu[name] += e - s
            elif name.startswith("ProfilerStep#"):
                step_us += e - s
                steps += 1
        for s, e, _, _, name in _spans(events, lambda ev: ev.get("cat") == "gpu_user_annotation"):
            if name in gpu:
                gpu[name] += e - s
        comm, compute = communication_spans(events)
        c = union_length((s, e) for s, e, *_ in comm)
        comm_us += c
        both_us += (
            overlap_fraction([(s, e) for s, e, *_ in comm], [(s, e) for s, e, *_ in compute]) * c
        )
    has_gpu = any(gpu.values())
    per = max(steps, 1) * 1e3  # us -> ms per step
    rows = [
        {
            "phase": p,
            "cpu_ms_per_step": cpu[p] / per,
            "gpu_ms_per_step": gpu[p] / per if has_gpu else None,
            "share_of_step": cpu[p] / step_us if step_us else None,
        }
        for p in phases
    ]
    rows.append(
        {
            "phase": "communication",
            "cpu_ms_per_step": comm_us / per,
            "gpu_ms_per_step": None,
            "share_of_step": comm_us / step_us if step_us else None,
        }
    )
    rows.append(
        {
            "phase": "step",
            "cpu_ms_per_step": step_us / per,
            "gpu_ms_per_step": None,
            "share_of_step": 1.0 if step_us else None,
        }
    )
    compute_us = sum(cpu[p] for p in ("forward", "backward", "optimizer") if p in cpu)
    summary = {
        "profiled_steps": steps,
        "step_ms": step_us / per,
        "data_ms": cpu.get("data", 0.0) / per,
        "compute_ms": compute_us / per,
        "communication_ms": comm_us / per,
        "data_share": cpu.get("data", 0.0) / step_us if step_us else None,
        "compute_share": compute_us / step_us if step_us else None,
        "communication_share": comm_us / step_us if step_us else None,
        "communication_overlap_fraction": both_us / comm_us if comm_us else 0.0,
    }
    return pd.DataFrame(rows), summary
