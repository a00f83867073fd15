"""Layer 8 (predict): the gap to the hardware, per operator: time in the step, bound, time alone.

For each aten operator of a training step (summed over its calls):

    in step   the calls' measured seconds inside the step (lungbench.predict.operators)
    bound     max(compute bound, memory bound) at this machine's measured peaks and copy
              bandwidth (lungbench.predict.model.roof_s on lungbench.predict.forecast.cpu_here)
    alone     the same calls made again one by one with fresh tensors (lungbench.predict.
              kernels.call_runner: the convolutions, the calls `predict` makes alone); the
              other operators have no isolated time, and count with their in-step time

and two rows below them: "outside the calls" (the plain step's median less the calls' sum:
Python, autograd's engine, the dispatcher) and "overhead vs alone" (the step less the sum of
the alone times: what fusion and a leaner step could at most win).

    table = operator_roofline(workload, switches)       # CPU: measured peaks, this machine
    table = roofline_table(calls, step_s, device, alone)  # the arithmetic, planted values
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence

import pandas as pd
import torch

from lungbench.core.errors import UsageError
from lungbench.measure.timing import OpCall
from lungbench.measure.workload import Workload
from lungbench.predict.devices import DeviceProfile
from lungbench.predict.model import roof_s
from lungbench.switches import Switches

ALONE_REPEATS = 3  # each call made alone this many times; its median
OUTSIDE = "(outside the calls)"
OVERHEAD = "(overhead vs alone)"
STEP = "(step)"


def roofline_table(
    calls: Sequence[OpCall],
    step_s: float,
    device: DeviceProfile,
    alone: Mapping[int, float],
) -> pd.DataFrame:
    """Per operator (by time in the step): calls, ms in the step, bound ms and its kind, ms
    alone (None where no call of it was made alone), in-step / bound; then the step, what
    it spends outside the calls and its overhead over the alone times. `alone`: call
    index -> seconds alone."""
    rows: dict[str, dict] = {}
    for i, call in enumerate(calls):
        compute, memory = roof_s(call, device)
        row = rows.setdefault(
            call.name,
            {"calls": 0, "step_ms": 0.0, "compute_ms": 0.0, "memory_ms": 0.0, "alone_ms": None},
        )
        row["calls"] += 1
        row["step_ms"] += 1e3 * call.seconds
        row["compute_ms"] += 1e3 * compute
        row["memory_ms"] += 1e3 * memory
        if i in alone:
            row["alone_ms"] = (row["alone_ms"] or 0.0) + 1e3 * alone[i]
    frame = pd.DataFrame.from_dict(rows, orient="index").rename_axis("operator")
    frame["bound_ms"] = frame[["compute_ms", "memory_ms"]].max(axis=1)
    frame["bound"] = [
        "compute" if c >= m else "memory"
        for c, m in zip(frame["compute_ms"], frame["memory_ms"], strict=True)
    ]
    frame["x_bound"] = frame["step_ms"] / frame["bound_ms"].where(frame["bound_ms"] > 0)
    frame = frame.sort_values("step_ms", ascending=False, kind="stable")
    calls_ms = float(frame["step_ms"].sum())
    # operators without an alone time count with their in-step time
    alone_sum = float(frame["alone_ms"].fillna(frame["step_ms"]).sum())
    step_ms = 1e3 * step_s
    tail = pd.DataFrame(
        {
            "calls": [len(calls), None, None],
            "step_ms": [step_ms, max(step_ms - calls_ms, 0.0), max(step_ms - alone_sum, 0.0)],
            "bound_ms": [float(frame["bound_ms"].sum()), None, None],
            "alone_ms": [alone_sum, None, None],
        },
        index=pd.Index([STEP, OUTSIDE, OVERHEAD], name="operator"),
    )
    tail["x_bound"] = tail["step_ms"] / tail["bound_ms"]
    columns = ["calls", "step_ms", "bound_ms", "bound", "alone_ms", "x_bound"]
    return pd.concat([frame, tail])[columns]


def alone_seconds(calls: Sequence[OpCall], threads: int) -> dict[int, float]:
    """Call index -> median seconds of the call made alone (the calls kernels can make)."""
    from lungbench.predict.kernels import OPERATORS, call_runner, timed

    cpu = torch.device("cpu")
    out: dict[int, float] = {}
    for i, call in enumerate(calls):
        if not call.signature or call.name not in OPERATORS:
            continue
        try:
            run = call_runner(call, cpu)
            out[i] = statistics.median(timed(run, threads) for _ in range(ALONE_REPEATS))
        except (RuntimeError, ValueError, KeyError, TypeError):  # no such kernel alone
            continue
    return out


def operator_roofline(workload: Workload, switches: Switches, repeats: int = 3) -> pd.DataFrame:
    """The table for `workload`'s step with `switches` on this machine's CPU (measured
    peaks, bandwidth and convolution rate, cached per host)."""
    from lungbench.measure.timing import set_threads
    from lungbench.predict.forecast import cpu_here
    from lungbench.predict.operators import probe_operators

    if not workload.device.startswith("cpu"):
        raise UsageError(
            "--roofline: the CPU only for now (the bounds are this CPU's measured peaks)"
        )
    threads = set_threads(workload.threads)
    measured = probe_operators(
        workload, switches, repeats=repeats, reference_batch=None, reference_width=None
    )
    device = cpu_here(threads, measured.call_latency_s)
    alone = alone_seconds(measured.calls, threads)
    return roofline_table(measured.calls, measured.step_s, device, alone)
