"""lungbench.measure.trace against Meta's HolisticTraceAnalysis (HTA) on the same traces.

Two kinds of trace, both read by both tools:

(a) planted: a Chrome-trace JSON per rank (2 ranks, 3 profiler steps each) laid out the way
    torch.profiler writes a CUDA + NCCL run: the CPU-side record_function ranges that
    lungbench.harness.profiler labels phases with (data / forward / backward / optimizer
    inside ProfilerStep#N), cudaLaunchKernel events whose `correlation` links them to the GPU
    kernels, compute kernels on two streams, an NCCL all-reduce on its own stream(s), a
    memcpy that runs during the all-reduce (not compute for either tool), gpu_user_annotation
    ranges, and `distributedInfo` naming the rank. Every expected value is also computed by
    hand below, so a disagreement says which side is wrong.
(b) real: a CPU trace written by torch.profiler through lungbench's own profile_steps and
    phase_range (tiny model, so it stays fast). HTA's overlap and temporal breakdown need GPU
    kernels, so on a CPU trace only the phase times and shares are compared.

Tolerances: 1e-9 relative for the planted phase times and shares (quarter-microsecond
timestamps, exact in float64 for both tools); 5e-5 absolute for the overlap fraction, half of
the 0.01 percentage point to which HTA rounds `comp_comm_overlap_pctg`; on the real trace
1 ns per event on phase times (lungbench takes (ts + dur) - ts, HTA sums dur: at ~5e12 us
one float64 step is 2**-10 us) and 1e-6 absolute on shares.

HTA by default rounds every event to whole microseconds (ceil the start, floor the end; a
workaround for pytorch/pytorch#122425) and drops the last profiler step as possibly
incomplete. lungbench reads torch's nanosecond timestamps as they are and keeps every
recorded step (the profiler's schedule records only complete steps), so HTA runs here with
HTA_DISABLE_NS_ROUNDING=1 and include_last_profiler_step=True. With the rounding on, each
short kernel loses up to 2 us: on HTA's own NCCL test trace (nccl_parser_config) the overlap
reads 15.14% rounded against 15.61% unrounded, which is what lungbench gives.

HTA has its own extra, `hta` (it pulls JupyterLab, plotly and ~85 packages), which only this
module uses: `make test` does not install it, and this module is skipped, with the reason
shown, until `pip install -e ".[hta]"` (or `make install-dev`) adds it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from lungbench.harness.profiler import ProfileSchedule, phase_range, profile_steps
from lungbench.measure.trace import (
    PHASES,
    communication_spans,
    load_trace,
    phase_summary,
    trace_files,
    union_length,
)

pytest.importorskip(
    "hta",
    reason='HolisticTraceAnalysis is not installed (the `hta` extra: pip install -e ".[hta]")',
)
from hta.trace_analysis import TraceAnalysis  # noqa: E402  (a broken HTA must fail, not skip)

pytestmark = [
    # HTA 0.5 uses pandas' inplace= keywords, deprecated in pandas 3 (Pandas4Warning)
    pytest.mark.filterwarnings("ignore::DeprecationWarning:hta"),
    pytest.mark.filterwarnings("ignore::FutureWarning:hta"),
]

REL = 1e-9  # planted traces: exact arithmetic on quarter-microsecond timestamps
OVERLAP_ABS = 5e-5  # HTA reports the overlap as a percentage rounded to 2 decimals
REAL_US_PER_EVENT = 1e-3  # real trace: (ts + dur) - ts rounds to 2**-10 us at ~5e12 us

# --- (a) planted traces --------------------------------------------------------------------

STEPS = 3
STEP_US = 1000.0
STEP_GAP_US = 20.0
PID = 4242
TID = 4242
COMPUTE_STREAM, SIDE_STREAM, NCCL_STREAM, NCCL_STREAM_2 = 7, 13, 20, 24

# CPU phase ranges (start, end) inside each 1000 us step, per rank. 50 / 100 us of each step
# are outside every phase (the python between ranges), so the shares do not sum to 1.
CPU_PHASES = {
    0: {"data": (0, 100), "forward": (100, 400), "backward": (400, 800), "optimizer": (800, 950)},
    1: {"data": (0, 150), "forward": (150, 400), "backward": (400, 800), "optimizer": (800, 900)},
}
# Compute kernels (both ranks): forward on stream 7; backward B1 and B2 on stream 7 with a
# side-stream kernel inside B1 (a compute union, not a sum); the optimizer's kernel. Their
# union per step: 250 + 150 + 150 + 80 = 630 us.
COMPUTE_KERNELS = [
    ("implicit_convolve_sgemm", COMPUTE_STREAM, 150, 400, "forward", 110),
    ("wgrad_alg0_engine", COMPUTE_STREAM, 450, 600, "backward", 410),
    ("elementwise_kernel", SIDE_STREAM, 500, 560, "backward", 415),
    ("dgrad_engine", COMPUTE_STREAM, 650, 800, "backward", 420),
    ("multi_tensor_apply_kernel", COMPUTE_STREAM, 820, 900, "optimizer", 810),
]
# Not kernels: the input copy (data) and a device-to-device copy in B1..B2's gap, which runs
# while the all-reduce does: neither tool may count it as compute hiding the communication.
MEMCPYS = [
    ("Memcpy HtoD (Pinned -> Device)", COMPUTE_STREAM, 20, 60, "data", 10),
    ("Memcpy DtoD (Device -> Device)", COMPUTE_STREAM, 600, 650, "backward", 425),
]
NCCL = "ncclDevKernel_AllReduce_Sum_f32_RING_LL(ncclDevKernelArgsStorage<4096ul>)"
# rank 0: one all-reduce 550-750, hidden by B1 550-600 and B2 650-750: 150 of 200 us = 0.75.
# rank 1: two all-reduces on two streams, 500-700 and 650-750 (union 500-750, 250 us),
#         hidden by B1 500-600 and B2 650-750: 200 of 250 us = 0.8.
NCCL_KERNELS = {
    0: [(NCCL, NCCL_STREAM, 550, 750, "backward", 430)],
    1: [
        (NCCL, NCCL_STREAM, 500, 700, "backward", 430),
        (NCCL, NCCL_STREAM_2, 650, 750, "backward", 435),
    ],
}
# gpu_user_annotation per step (stream 7): first to last GPU event of the range on it
GPU_PHASES = {
    "data": (20, 60),
    "forward": (150, 400),
    "backward": (450, 800),
    "optimizer": (820, 900),
}

# Hand-computed expectations.
EXPECTED_SHARES = {
    0: {"data": 0.10, "forward": 0.30, "backward": 0.40, "optimizer": 0.15},
    1: {"data": 0.15, "forward": 0.25, "backward": 0.40, "optimizer": 0.10},
}
EXPECTED_OVERLAP = {0: 150 / 200, 1: 200 / 250}
EXPECTED_COMM_US_PER_STEP = {0: 200.0, 1: 250.0}
EXPECTED_COMPUTE_US_PER_STEP = 630.0
# both ranks together: steps are equally long, so shares average; the overlap is weighted
# by communication time: (150 + 200) / (200 + 250) = 7/9
EXPECTED_SHARES_ALL = {p: (EXPECTED_SHARES[0][p] + EXPECTED_SHARES[1][p]) / 2 for p in PHASES}
EXPECTED_OVERLAP_ALL = 350 / 450


# CUDA correlation ids count every runtime call of the process, so in a real trace they are
# large (57541 and up in HTA's own NCCL test trace). Small ids trip HTA 0.5 on pandas 3: see
# test_hta_small_correlation_ids_on_pandas3.
FIRST_CORRELATION = 57_530


def _x(name, cat, ts, dur, pid, tid, **args):
    """A complete event ('ph': 'X'); `args` as torch writes them ("External id", ...)."""
    return dict(ph="X", cat=cat, name=name, pid=pid, tid=tid, ts=ts, dur=dur, args=args)


def _flow(start: bool, corr: int, pid, tid, ts) -> dict:
    """The CPU-launch -> GPU-kernel flow arrows torch writes (category ac2g)."""
    event = dict(ph="s" if start else "f", id=corr, pid=pid, tid=tid, ts=ts, cat="ac2g")
    return {**event, "name": "ac2g"} if start else {**event, "name": "ac2g", "bp": "e"}


def planted_trace(rank: int, first_correlation: int = FIRST_CORRELATION) -> dict:
    """One rank's trace, as torch.profiler (Kineto) writes a CUDA + NCCL DDP step."""
    # epoch-sized microsecond timestamps with a quarter-microsecond fraction, like Kineto's
    # nanosecond-resolution ones, but exact in float64 (multiples of 2**-10 at this size)
    base = 4_458_676_416_788.25 + 3.5 * rank
    events: list[dict] = []
    ext = 0
    corr = first_correlation - 1

    def annotation(name: str, cat: str, ts: float, dur: float, pid=PID, tid=TID) -> None:
        nonlocal ext
        ext += 1
        events.append(_x(name, cat, ts, dur, pid, tid, **{"External id": ext}))

    def launch(t0: float, cpu_at: float, name, cat, stream, start, end, **kernel_args) -> None:
        """The CPU-side runtime call, the GPU event it launched, and the flow between them."""
        nonlocal ext, corr
        ext += 1
        corr += 1
        runtime = "cudaLaunchKernel" if cat == "kernel" else "cudaMemcpyAsync"
        ids = {"External id": ext, "correlation": corr}
        events.append(_x(runtime, "cuda_runtime", t0 + cpu_at, 4.0, PID, TID, cbid=211, **ids))
        events.append(_flow(True, corr, PID, TID, t0 + cpu_at))
        device = dict(queued=0, device=0, context=1, stream=stream, **kernel_args)
        events.append(_x(name, cat, t0 + start, float(end - start), 0, stream, **ids, **device))
        events.append(_flow(False, corr, 0, stream, t0 + start))

    for k in range(STEPS):
        t0 = base + k * (STEP_US + STEP_GAP_US)
        annotation(f"ProfilerStep#{k + 2}", "user_annotation", t0, STEP_US)
        for phase, (s, e) in CPU_PHASES[rank].items():
            annotation(phase, "user_annotation", t0 + s, float(e - s))
            s, e = GPU_PHASES[phase]
            annotation(phase, "gpu_user_annotation", t0 + s, float(e - s), 0, COMPUTE_STREAM)
        # an operator, and the DDP gradient hook's CPU side (a collective op and its user
        # annotation): with GPU kernels in the trace both tools take communication from the
        # device, so these must change nothing
        annotation("aten::convolution", "cpu_op", t0 + CPU_PHASES[rank]["forward"][0] + 5, 20.0)
        annotation("nccl:all_reduce", "user_annotation", t0 + 428, 10.0)
        annotation("c10d::allreduce_", "cpu_op", t0 + 429, 8.0)
        for name, stream, s, e, _phase, cpu_at in COMPUTE_KERNELS:
            launch(t0, cpu_at, name, "kernel", stream, s, e)
        for name, stream, s, e, _phase, cpu_at in MEMCPYS:
            launch(t0, cpu_at, name, "gpu_memcpy", stream, s, e, bytes=1 << 20)
        collective = {"Collective name": "allreduce", "Group size": 2, "dtype": "Float"}
        for name, stream, s, e, _phase, cpu_at in NCCL_KERNELS[rank]:
            launch(t0, cpu_at, name, "kernel", stream, s, e, **collective)
    meta = [
        dict(name="process_name", ph="M", ts=base, pid=PID, tid=0, args={"name": "python"}),
        dict(name="process_labels", ph="M", ts=base, pid=0, tid=0, args={"labels": "GPU 0"}),
        dict(name="thread_name", ph="M", ts=base, pid=0, tid=7, args={"name": "stream 7 "}),
        _x("PyTorch Profiler (0)", "Trace", base - 50, STEPS * 1100.0, "Spans", "PyTorch Profiler"),
    ]
    return {
        "schemaVersion": 1,
        "deviceProperties": [{"id": 0, "name": "NVIDIA H100", "computeMajor": 9}],
        "distributedInfo": {"backend": "nccl", "rank": rank, "world_size": 2},
        "record_shapes": 1,
        "displayTimeUnit": "ms",
        "baseTimeNanoseconds": 1_700_000_000_000_000_000,
        "traceEvents": meta + events,
        "traceName": f"rank{rank}.pt.trace.json",
    }


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> Path:
    """traces/rank<R>.<pid>.<ns>.pt.trace.json for ranks 0 and 1, as run_profile names them."""
    folder = tmp_path_factory.mktemp("planted") / "traces"
    folder.mkdir()
    for rank in (0, 1):
        (folder / f"rank{rank}.{PID}.{rank + 1}.pt.trace.json").write_text(
            json.dumps(planted_trace(rank))
        )
    return folder


def _hta(folder: Path):
    """HTA on every trace in `folder`: no microsecond rounding, the last step kept."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HTA_DISABLE_NS_ROUNDING", "1")  # read while parsing (forks inherit it)
        return TraceAnalysis(trace_dir=str(folder), include_last_profiler_step=True)


def _hta_annotation_sums(analysis, gpu: bool) -> dict[int, dict[str, float]]:
    """{rank: {annotation name: total us}} from HTA's user-annotation breakdown."""
    df = analysis.get_gpu_user_annotation_breakdown(use_gpu_annotation=gpu, visualize=False)
    sums: dict[int, dict[str, float]] = {}
    for rank, name, total in zip(df["rank"], df["name"], df["sum (us)"], strict=True):
        sums.setdefault(int(rank), {})[name] = float(total)
    return sums


def _hta_shares(sums: dict[str, float]) -> dict[str, float]:
    """Phase shares of the profiler-step time, from HTA's per-annotation totals."""
    step = sum(v for k, v in sums.items() if k.startswith("ProfilerStep#"))
    return {p: sums.get(p, 0.0) / step for p in PHASES}


@pytest.fixture(scope="module")
def planted_hta(planted):
    return _hta(planted)


def test_planted_traces_read_as_torch_profiler_traces(planted, planted_hta):
    files = trace_files(planted)
    assert len(files) == 2
    assert [load_trace(f)["distributedInfo"]["rank"] for f in files] == [0, 1]
    assert sorted(planted_hta.t.get_ranks()) == [0, 1]
    assert [int(i) for i in planted_hta.get_profiler_steps()] == [2, 3, 4]


def test_phase_shares_match_hta_and_hand(planted, planted_hta):
    traces = {r: load_trace(f) for r, f in enumerate(trace_files(planted))}
    cpu_sums = _hta_annotation_sums(planted_hta, gpu=False)
    gpu_sums = _hta_annotation_sums(planted_hta, gpu=True)
    for rank, trace in traces.items():
        table, summary = phase_summary([trace])
        rows = table.set_index("phase")
        hta_shares = _hta_shares(cpu_sums[rank])
        assert summary["profiled_steps"] == STEPS
        for p in PHASES:
            ours = rows.loc[p, "share_of_step"]
            assert ours == pytest.approx(EXPECTED_SHARES[rank][p], rel=REL), (rank, p)
            assert ours == pytest.approx(hta_shares[p], rel=REL), (rank, p)
            # the milliseconds behind the shares: CPU side and GPU side (gpu_user_annotation)
            s, e = CPU_PHASES[rank][p]
            assert rows.loc[p, "cpu_ms_per_step"] * STEPS * 1e3 == pytest.approx(
                cpu_sums[rank][p], rel=REL
            )
            assert rows.loc[p, "cpu_ms_per_step"] == pytest.approx((e - s) / 1e3, rel=REL)
            s, e = GPU_PHASES[p]
            assert rows.loc[p, "gpu_ms_per_step"] * STEPS * 1e3 == pytest.approx(
                gpu_sums[rank][p], rel=REL
            )
            assert rows.loc[p, "gpu_ms_per_step"] == pytest.approx((e - s) / 1e3, rel=REL)
        assert summary["step_ms"] == pytest.approx(STEP_US / 1e3, rel=REL)
        assert summary["data_share"] == pytest.approx(EXPECTED_SHARES[rank]["data"], rel=REL)
        compute = sum(EXPECTED_SHARES[rank][p] for p in ("forward", "backward", "optimizer"))
        assert summary["compute_share"] == pytest.approx(compute, rel=REL)

    # both ranks in one summary (what `lungbench profile` reports under a launcher)
    table, summary = phase_summary(list(traces.values()))
    rows = table.set_index("phase")
    assert summary["profiled_steps"] == 2 * STEPS
    both = {p: sum(cpu_sums[r][p] for r in (0, 1)) for p in PHASES}
    step_both = sum(v for r in (0, 1) for k, v in cpu_sums[r].items() if k.startswith("Prof"))
    for p in PHASES:
        assert rows.loc[p, "share_of_step"] == pytest.approx(EXPECTED_SHARES_ALL[p], rel=REL)
        assert rows.loc[p, "share_of_step"] == pytest.approx(both[p] / step_both, rel=REL)


def test_communication_overlap_matches_hta_and_hand(planted, planted_hta):
    traces = {r: load_trace(f) for r, f in enumerate(trace_files(planted))}
    hta = planted_hta.get_comm_comp_overlap(visualize=False).set_index("rank")
    hta_fraction = {int(r): v / 100 for r, v in hta["comp_comm_overlap_pctg"].items()}
    for rank, trace in traces.items():
        table, summary = phase_summary([trace])
        ours = summary["communication_overlap_fraction"]
        assert ours == pytest.approx(EXPECTED_OVERLAP[rank], rel=REL), rank
        assert ours == pytest.approx(hta_fraction[rank], abs=OVERLAP_ABS), rank
        comm_ms = table.set_index("phase").loc["communication", "cpu_ms_per_step"]
        assert comm_ms == pytest.approx(EXPECTED_COMM_US_PER_STEP[rank] / 1e3, rel=REL)
    _, summary = phase_summary(list(traces.values()))
    assert summary["communication_overlap_fraction"] == pytest.approx(EXPECTED_OVERLAP_ALL, rel=REL)
    # HTA reports per rank; weighted by communication time they give the same total
    weighted = sum(hta_fraction[r] * EXPECTED_COMM_US_PER_STEP[r] for r in (0, 1)) / sum(
        EXPECTED_COMM_US_PER_STEP.values()
    )
    assert summary["communication_overlap_fraction"] == pytest.approx(weighted, abs=OVERLAP_ABS)


def test_compute_kernels_are_the_ones_hta_counts(planted, planted_hta):
    """The overlap is only as good as the compute set: the same kernels as HTA's COMPUTATION
    (NCCL kernels and memcpys out, concurrent streams merged), checked through HTA's
    temporal breakdown (compute time = union of its compute kernels)."""
    hta = planted_hta.get_temporal_breakdown(visualize=False).set_index("rank")
    for rank, f in enumerate(trace_files(planted)):
        comm, compute = communication_spans(load_trace(f)["traceEvents"])
        assert {c[4] for c in comm} == {NCCL}
        assert not any("Memcpy" in c[4] for c in compute)
        ours = union_length((s, e) for s, e, *_ in compute)
        assert ours == pytest.approx(STEPS * EXPECTED_COMPUTE_US_PER_STEP, rel=REL)
        assert ours == pytest.approx(hta.loc[rank, "compute_time(us)"], rel=REL)


# --- (b) a real torch.profiler CPU trace, written by lungbench's profile_steps -------------


def test_real_cpu_trace_phase_shares_match_hta(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    host = torch.randn(16, 64)

    def step() -> None:  # the ranges lungbench.harness.profiler cuts every step into
        with phase_range("data"):
            x = host.clone()
        with phase_range("forward"):
            loss = model(x).square().mean()
        with phase_range("backward"):
            loss.backward()
        with phase_range("optimizer"):
            optimizer.step()
            optimizer.zero_grad()

    folder = tmp_path / "traces"
    folder.mkdir()
    schedule = ProfileSchedule(wait=0, warmup=1, active=3)
    profile_steps(step, schedule.steps, schedule, ["cpu"], folder)
    files = trace_files(folder)
    assert len(files) == 1
    table, summary = phase_summary([load_trace(files[0])])
    rows = table.set_index("phase")
    assert summary["profiled_steps"] == 3

    analysis = _hta(folder)  # no distributedInfo in a single-process trace: HTA says rank 0
    sums = _hta_annotation_sums(analysis, gpu=False)[0]
    assert len([k for k in sums if k.startswith("ProfilerStep#")]) == 3
    hta_shares = _hta_shares(sums)
    # A share's rounding: |a/s - b/t| <= |a - b| / s + (b/t) |s - t| / s, with a, b (a phase)
    # and s, t (the steps) each within 3 events' rounding: 6 events' worth over the step (a
    # fixed 1e-6 failed on a fast CI machine, whose shorter steps weigh the rounding more).
    step_us = sum(v for k, v in sums.items() if k.startswith("ProfilerStep#"))
    share_abs = 6 * REAL_US_PER_EVENT / step_us
    for p in PHASES:
        ours_us = rows.loc[p, "cpu_ms_per_step"] * 3e3
        assert ours_us > 0, p
        assert ours_us == pytest.approx(sums[p], abs=3 * REAL_US_PER_EVENT), p
        share = rows.loc[p, "share_of_step"]
        assert share == pytest.approx(hta_shares[p], abs=share_abs), p
    # no communication on one CPU process: lungbench says 0; HTA's overlap needs GPU kernels
    assert summary["communication_ms"] == 0 and summary["communication_overlap_fraction"] == 0


@pytest.mark.xfail(
    int(pd.__version__.split(".")[0]) >= 3,
    raises=TypeError,
    strict=True,
    reason="HTA 0.5 (and 0.6.1) downcasts `correlation` to int8/int16 and then writes row "
    "indices into a column of that dtype; pandas 3 raises instead of upcasting",
)
def test_hta_small_correlation_ids_on_pandas3(tmp_path):
    """A canary, not a comparison: small CUDA correlation ids (a trace of a fresh process)
    break HTA's parser on pandas 3 (hta/common/trace.py, transform_correlation_to_index).
    When HTA fixes it this XPASSes and fails, and FIRST_CORRELATION can go back to 1."""
    (tmp_path / "rank0.pt.trace.json").write_text(json.dumps(planted_trace(0, 1)))
    _hta(tmp_path)
