"""`lungbench profile`: traces that parse, the operator and phase tables, bad input, and the
pure trace analysis (interval unions, communication overlap) on hand-made events."""

from __future__ import annotations

import contextlib
import io
import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pandas as pd
import pytest
import torch

from lungbench.cli import main
from lungbench.core.errors import DataError
from lungbench.core.runs import read_json
from lungbench.harness.profiler import ProfileConfig, _batches
from lungbench.measure.trace import (
    communication_spans,
    overlap_fraction,
    phase_summary,
    union_length,
)
from lungbench.measure.workload import Workload

SMALL = [
    "--preset",
    "dey2018",
    "--filters",
    "2",
    "--batch",
    "2",
    "--wait",
    "0",
    "--warmup",
    "1",
    "--active",
    "2",
]


@pytest.fixture(scope="module")
def profile_run(tmp_path_factory):
    """One small CPU profile run shared by the tests below: (run folder, stdout)."""
    out = io.StringIO()
    root = tmp_path_factory.mktemp("profile")
    with contextlib.redirect_stdout(out):
        code = main(["profile", *SMALL, "--out", str(root), "--run-id", "p"])
    assert code == 0
    return root / "p", out.getvalue()


def test_cpu_profile_writes_traces_and_tables(profile_run):
    run, out = profile_run
    assert read_json(run / "run.json")["status"] == "complete"
    traces = sorted((run / "traces").glob("*.pt.trace.json"))
    assert len(traces) == 1
    trace = json.loads(traces[0].read_text())  # Chrome-trace JSON (Perfetto, chrome://tracing)
    events = trace["traceEvents"]
    ranges = [e["name"] for e in events if e.get("cat") == "user_annotation"]
    for name in ("data", "forward", "backward", "optimizer"):
        assert ranges.count(name) == 2, name  # one per active step
    assert sum(n.startswith("ProfilerStep#") for n in ranges) == 2
    assert any(e.get("cat") == "cpu_op" and "convolution" in e["name"] for e in events)

    ops = pd.read_csv(run / "tables" / "operators.csv")
    assert len(ops) > 0 and ops["self_cpu_ms"].is_monotonic_decreasing
    assert ops["operator"].str.startswith("aten::").any()
    assert not ops["operator"].isin(["forward", "backward", "data", "optimizer"]).any()
    phases = pd.read_csv(run / "tables" / "phases.csv").set_index("phase")
    assert phases.loc["forward", "cpu_ms_per_step"] > 0
    assert phases.loc["communication", "cpu_ms_per_step"] == 0
    summary = read_json(run / "profile.json")
    assert summary["profiled_steps"] == 2 and summary["communication_overlap_fraction"] == 0.0
    assert 0.5 < summary["compute_share"] <= 1.0
    assert "tensorboard --logdir" in out and "| aten::" in out


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--steps", "2"], "--steps 2: the schedule needs (wait 0 + warmup 1 + active 2) x repeat"),
        (["--activities", "cpu,gpu"], "unknown --activities entry 'gpu'"),
        (["--activities", "cuda"], "--activities cuda: no CUDA device on this machine"),
        (["--model", "dualpath"], "unknown --model 'dualpath' (did you mean 'dualpath3d'?)"),
    ],
)
def test_bad_input_is_one_line(tmp_path, capsys, monkeypatch, argv, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a GPU node too: planted
    code = main(["profile", *SMALL, *argv, "--out", str(tmp_path / "out")])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2
    assert len(err) == 1 and expected in err[0], err
    assert not (tmp_path / "out").exists(), "nothing written for bad input"


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        # the tiny store holds 24 samples on the dey2018 grid
        (["--batch", "32"], "24 samples < --batch 32"),
        (["--preset", "default"], "do not fit --preset default"),
        (["--preset", "iso64"], "use --preset dey2018"),
    ],
)
def test_store_that_does_not_fit_is_one_line(tmp_path, capsys, tiny_store, argv, expected):
    code = main(["profile", *SMALL, "--store", str(tiny_store), *argv, "--out", str(tmp_path)])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2
    assert len(err) == 1 and expected in err[0], err
    assert list(tmp_path.iterdir()) == [], "nothing written for bad input"


def test_store_batches_never_spin_on_an_empty_loader(tiny_store):
    # Past validate(): a loader that drops its only, partial batch ends in an error, not a hang.
    cfg = ProfileConfig(Workload(preset="dey2018", batch_size=32), store=tiny_store)
    with pytest.raises(DataError, match="24 samples < --batch 32"):
        next(_batches(cfg, torch.device("cpu")))


def test_profile_reads_batches_from_a_store(tmp_path, capsys, tiny_store):
    argv = [*SMALL, "--store", str(tiny_store), "--out", str(tmp_path), "--run-id", "s"]
    assert main(["profile", *argv]) == 0
    assert read_json(tmp_path / "s" / "profile.json")["profiled_steps"] == 2


def test_unwritable_trace_folder(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    code = main(["profile", *SMALL, "--out", str(blocker / "runs")])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2
    assert len(err) == 1 and "cannot write the trace folder" in err[0]


def test_interval_arithmetic():
    assert union_length([(0, 10), (5, 15), (20, 25)]) == 20
    assert union_length([]) == 0
    # comm 0-10 and 20-30; compute 5-25 covers 5 of each: half the communication is hidden
    assert overlap_fraction([(0, 10), (20, 30)], [(5, 25)]) == pytest.approx(0.5)
    assert overlap_fraction([(0, 10)], [(0, 4), (2, 6), (8, 20)]) == pytest.approx(0.8)
    assert overlap_fraction([], [(0, 5)]) == 0.0


def _x(name, ts, dur, cat, tid=1):
    return {"ph": "X", "name": name, "ts": ts, "dur": dur, "cat": cat, "pid": 0, "tid": tid}


def test_gpu_trace_overlap_and_phases():
    events = [
        _x("ProfilerStep#1", 0, 100, "user_annotation"),
        _x("data", 0, 10, "user_annotation"),
        _x("forward", 10, 30, "user_annotation"),
        _x("backward", 40, 50, "user_annotation"),
        _x("optimizer", 90, 10, "user_annotation"),
        _x("forward", 12, 30, "gpu_user_annotation", tid=7),
        _x("implicit_convolve_sgemm", 40, 40, "kernel", tid=7),
        _x("ncclDevKernel_AllReduce_Sum_f32", 60, 40, "kernel", tid=20),  # half hidden
    ]
    comm, compute = communication_spans(events)
    assert [c[4] for c in comm] == ["ncclDevKernel_AllReduce_Sum_f32"] and len(compute) == 1
    table, summary = phase_summary([{"traceEvents": events}])
    assert summary["profiled_steps"] == 1 and summary["step_ms"] == pytest.approx(0.1)
    assert summary["communication_overlap_fraction"] == pytest.approx(0.5)
    assert summary["data_share"] == pytest.approx(0.1)
    assert summary["compute_share"] == pytest.approx(0.9)
    rows = table.set_index("phase")
    assert rows.loc["forward", "gpu_ms_per_step"] == pytest.approx(0.03)
    assert rows.loc["communication", "cpu_ms_per_step"] == pytest.approx(0.04)


def test_cpu_trace_communication_ignores_its_own_children():
    events = [
        _x("aten::convolution", 0, 50, "cpu_op", tid=1),
        _x("c10d::allreduce_", 40, 20, "cpu_op", tid=2),
        _x("aten::copy_", 45, 5, "cpu_op", tid=2),  # inside the collective: not compute
    ]
    comm, compute = communication_spans(events)
    assert [c[4] for c in comm] == ["c10d::allreduce_"]
    assert [c[4] for c in compute] == ["aten::convolution"]
    _, summary = phase_summary([{"traceEvents": events}])
    assert summary["communication_overlap_fraction"] == pytest.approx(0.5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get_json(url: str):
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


@pytest.mark.timeout(270)  # above its own subprocess limits, which say what hung
@pytest.mark.slow
def test_tensorboard_plugin_lists_the_run(profile_run):
    """TensorBoard with torch-tb-profiler loads the trace folder and lists the run."""
    pytest.importorskip("torch_tb_profiler")
    tensorboard = Path(sys.executable).parent / "tensorboard"
    if not tensorboard.exists():
        pytest.skip("no tensorboard executable next to this Python")
    run, _ = profile_run
    port = _free_port()
    base = f"http://127.0.0.1:{port}/data/plugin/pytorch_profiler"
    proc = subprocess.Popen(
        [str(tensorboard), "--logdir", str(run), "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        runs: dict = {}
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                runs = _get_json(f"{base}/runs")
                if runs.get("runs") and not runs.get("loading"):
                    break
            except OSError:
                pass  # not listening yet
            time.sleep(1)
        assert runs.get("runs") == ["traces"], runs
        workers = _get_json(f"{base}/workers?run=traces&view=Overview")
        assert len(workers) == 1
        spans = _get_json(f"{base}/spans?run=traces&worker={workers[0]}")
        overview = _get_json(f"{base}/overview?run=traces&worker={workers[0]}&span={spans[0]}")
        assert overview["steps"]["rows"], "the plugin parsed the profiled steps"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.timeout(420)  # above its own subprocess limits, which say what hung
@pytest.mark.distributed
def test_profile_under_torchrun_profiles_the_ddp_step(tmp_path):
    """2 Gloo ranks: one run folder (rank 0's), a trace per rank, and a summary with the
    gradient all-reduce in it (the overlap share is DDP's, not a hand-made trace's). Its
    switches are the choice a 1-process tuning pass cached for one rank's workload, as
    `lungbench bench` under a launcher takes it (planted: channels-last, which the device's
    table never picks on a CPU), so the step profiled is the step timed. No --threads: each
    rank takes its share of the cores, as bench's ranks do, and the choice cached for it."""
    from dataclasses import replace

    from launchenv import clean_env

    from lungbench.core.cache import write_cache
    from lungbench.distributed.group import DistContext
    from lungbench.harness import tuning
    from lungbench.harness.ddp import rank_threads
    from lungbench.switches import eager_fp32

    cache = tmp_path / "cache"
    threads = rank_threads(Workload(), DistContext(world_size=2, local_world_size=2))
    rank = Workload(preset="dey2018", filters=4, batch_size=2, threads=threads)
    chosen = replace(eager_fp32(), memory_format="channels_last_3d")
    entry = {"choice": "+channels_last_3d", "switches": vars(chosen), "alternatives": []}
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LUNGBENCH_CACHE_DIR", str(cache))
        write_cache(tuning.CACHE_FILE, {tuning.cache_key(rank, torch.device("cpu")): entry})
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
        + ["-m", "lungbench", "profile", "--preset", "dey2018"]
        + ["--filters", "4", "--wait", "0", "--warmup", "1", "--active", "2"]
        + ["--out", str(out), "--run-id", "ddp", "--dist-timeout", "120"],
        env=clean_env(LUNGBENCH_CACHE_DIR=str(cache)),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("results: ") == 1, "rank 0 alone prints"
    assert [p.name for p in out.iterdir()] == ["ddp"]
    run = out / "ddp"
    traces = sorted(p.name.split(".")[0] for p in (run / "traces").iterdir())
    assert traces == ["rank0", "rank1"]
    summary = read_json(run / "profile.json")
    assert summary["world_size"] == 2 and summary["profiled_steps"] == 4  # 2 per rank
    assert summary["communication_ms"] > 0 and 0 <= summary["communication_overlap_fraction"] <= 1
    assert summary["memory_format_used"] == "channels_last_3d"
    assert (summary["tuning_choice"], summary["tuning_source"]) == (
        "+channels_last_3d",
        "cache, rank 0",
    )
    config = read_json(run / "config.json")
    assert config["distributed"]["world_size"] == 2 and config["threads_used"] == threads
    assert read_json(run / "run.json")["status"] == "complete"
