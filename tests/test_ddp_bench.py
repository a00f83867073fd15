"""`lungbench bench` under torchrun and mpiexec (2 CPU processes, Gloo), a rank killed mid-run,
and the scaling tables checked against hand-worked numbers."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
import torch
from launchenv import clean_env
from planted import held_after, wait_for_marker

from lungbench.core.errors import DataError, UsageError
from lungbench.core.runs import read_json, read_records
from lungbench.distributed.group import DistContext, DistributedError
from lungbench.distributed.launch import slurm_port
from lungbench.harness.ddp import parse_scaling, platform_label, split_batch
from lungbench.report.scaling import (
    breakdown_table,
    combine_runs,
    format_breakdown,
    format_scaling_markdown,
    scaling_notes,
    scaling_table,
    write_scaling_outputs,
)

# One thread per process: the 1-process baseline then does not depend on how busy the
# (shared, 2-core) CI machine is, and two ranks fit on two cores.
TINY = ["--preset", "dey2018", "--filters", "2", "--warmup", "1", "--threads", "1"]
VENV_BIN = Path(sys.executable).parent


def free_slurm_job_id() -> str:
    """A SLURM job id whose derived rendezvous port is free on this host right now."""
    for job_id in range(os.getpid() % 20000 + 7, os.getpid() % 20000 + 2007):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", slurm_port(job_id)))
            except OSError:
                continue
            return str(job_id)
    pytest.skip("no free port in the SLURM port range")


def bench_argv(tmp_path: Path, store: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "lungbench",
        "bench",
        *TINY,
        "--store",
        str(store),
        "--out",
        str(tmp_path / "out"),
        "--run-id",
        "ddp",
        *extra,
    ]


def check_two_rank_records(records, launcher: str) -> None:
    """World size 2 and both ranks' gathered timings in every DDP record; same weights."""
    ddp = [r for r in records if r["world_size"] == 2]
    assert ddp and all(r["status"] == "ok" for r in ddp)
    for r in ddp:
        assert (r["launcher"], r["backend"], r["nodes"]) == (launcher, "gloo", 1)
        assert [k["rank"] for k in r["ranks"]] == [0, 1]
        assert all(k["step_s_median"] > 0 and len(k["samples_s"]["step"]) == 2 for k in r["ranks"])
        digests = {k["param_digest"] for k in r["ranks"]}
        assert len(digests) == 1 and r["params_identical"] is True
        assert r["step_s_median"] == max(k["step_s_median"] for k in r["ranks"])
        assert r["allreduce_s_median"] > 0 and r["allreduce_bytes"] > 0 and r["buckets"] >= 1
        assert r["platform"].startswith("cpu x2 (DDP, gloo")
        # the alpha-beta fit from single all-reduces at three sizes (None: too noisy to fit)
        assert len(r["allreduce_probe_bytes"]) == len(r["allreduce_probe_s"]) == 3
        if "allreduce_model_s" in r:
            assert r["allreduce_alpha_s"] >= 0 and r["allreduce_beta_bytes_per_s"] > 0


# ---------------------------------------------------------------------------- real launchers


@pytest.mark.timeout(480)  # above its own subprocess limits, which say what hung
@pytest.mark.distributed
def test_bench_under_torchrun(tmp_path, tiny_store):
    """Baseline + weak + strong with an epoch: one run folder, rank 0 prints once."""
    argv = bench_argv(
        tmp_path,
        tiny_store,
        "--batch",
        "2",
        "--repeats",
        "2",
        "--epoch-samples",
        "8",
        "--dist-timeout",
        "120",
    )
    at = argv.index("--threads")
    del argv[at : at + 2]  # each rank takes its share of the cores; rank 0 alone takes all
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            *argv[1:],
        ],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("results: ") == 1 and proc.stdout.count("Scaling (speed-up") == 1
    assert [p.name for p in (tmp_path / "out").iterdir() if p.is_dir()] == ["ddp"]
    run = tmp_path / "out" / "ddp"
    assert read_json(run / "run.json")["status"] == "complete"
    assert read_json(run / "config.json")["distributed"]["world_size"] == 2
    records = read_records(run)
    # On a machine with more cores than one rank's share, rank 0 also measures one process
    # with every core: labelled "whole machine", never the reference of the efficiency.
    whole = [r for r in records if r.get("reference") == "whole machine"]
    cores = len(os.sched_getaffinity(0))
    assert len(whole) == (1 if cores > cores // 2 >= 1 else 0)
    for r in whole:
        assert r["threads_used"] == len(os.sched_getaffinity(0)) and r["world_size"] == 1
    records = [r for r in records if r not in whole]
    assert [(r["world_size"], r["scaling"]) for r in records] == [
        (1, "none"),
        (2, "weak"),
        (2, "strong"),
    ]
    assert records[0]["reference"] == "rank threads"
    assert records[0]["threads_used"] == max(1, cores // 2)
    check_two_rank_records(records, "torchrun")
    weak, strong = records[1], records[2]
    for field in ("dtype_used", "memory_format_used", "optimizer_used"):  # same switches
        assert weak[field] == strong[field] == records[0][field]
    # Telemetry of rank 0 beside every measurement, baseline and DDP alike.
    for r in records:
        assert r["telemetry_rss_peak_bytes"] > 0 and (run / r["telemetry_csv"]).exists()
    assert weak["telemetry_energy_per_sample_j"] is None  # rank 0 sees its own device only
    assert isinstance(weak["data_bound"], bool) and weak["epoch_data_wait_s"] >= 0
    assert (weak["per_rank_batch"], weak["global_batch"]) == (2, 4)
    assert (strong["per_rank_batch"], strong["global_batch"]) == (1, 2)
    assert weak["epoch_samples"] == 8 and weak["epoch_steps"] == 2  # 4 samples per rank
    scaling = pd.read_csv(run / "tables" / "scaling.csv")
    if whole:
        assert (scaling.loc[scaling["reference"] == "whole machine", "world_size"] == 1).all()
        assert scaling.loc[scaling["world_size"] == 2, "vs_whole_machine"].notna().all()
        scaling = scaling[scaling["reference"] != "whole machine"]
    assert sorted(zip(scaling["scaling"], scaling["world_size"], strict=True)) == [
        ("strong", 1),
        ("strong", 2),
        ("weak", 1),
        ("weak", 2),
    ]
    assert (scaling.loc[scaling["world_size"] == 1, "efficiency"] == 1.0).all()
    speedup = pd.read_csv(run / "tables" / "speedup_b2.csv", index_col=0)
    assert list(speedup.index) == [
        records[0]["platform"],
        *[r["platform"] for r in whole],  # e.g. "cpu (2 threads)": one process, every core
        "cpu x2 (DDP, gloo)",
        "cpu x2 (DDP, gloo, strong)",
    ]
    assert (run / "plots" / "scaling.png").stat().st_size > 1000
    assert "compute" in (run / "tables" / "breakdown.txt").read_text()


@pytest.mark.distributed
@pytest.mark.skipif(
    not (VENV_BIN / "mpiexec").exists() and shutil.which("mpiexec") is None,
    reason="no mpiexec (pip install 'lungbench[mpi]')",
)
@pytest.mark.timeout(480)  # above its own subprocess limits, which say what hung
def test_bench_under_mpiexec(tmp_path, tiny_store):
    pytest.importorskip("mpi4py")
    mpiexec = str(VENV_BIN / "mpiexec") if (VENV_BIN / "mpiexec").exists() else "mpiexec"
    argv = bench_argv(
        tmp_path,
        tiny_store,
        "--batch",
        "2",
        "--repeats",
        "2",
        "--no-epoch",
        "--scaling",
        "weak",
        "--no-baseline",
        "--dist-timeout",
        "120",
    )
    proc = subprocess.run(
        [mpiexec, "-n", "2", *argv], env=clean_env(), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "out" / "ddp"
    records = read_records(run)
    assert [(r["world_size"], r["scaling"]) for r in records] == [(2, "weak")]
    check_two_rank_records(records, "mpi")
    assert read_json(run / "environment.json")["distributed"]["hosts"] == [socket.gethostname()] * 2


@pytest.mark.timeout(420)  # above its own subprocess limits, which say what hung
@pytest.mark.distributed
def test_killed_rank_ends_the_job_with_an_error(tmp_path, tiny_store):
    """srun-style ranks (no launcher that kills the others): SIGKILL rank 1 after the first
    record (rank 1 is held there: a planted point, so rank 0 cannot finish first); rank 0
    must stop within the timeout with one line and keep what it measured."""
    timeout = 20
    argv = bench_argv(
        tmp_path,
        tiny_store,
        "--batch",
        "2",
        "4",
        "8",
        "--repeats",
        "5",
        "--no-epoch",
        "--no-baseline",
        "--dist-timeout",
        str(timeout),
    )
    job_id = free_slurm_job_id()
    marker = tmp_path / "rank1-after-first-record"
    held = held_after("lungbench.harness.ddp:ddp_record", marker, argv[3:])
    procs = [
        subprocess.Popen(
            held if rank == 1 else argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=clean_env(
                SLURM_PROCID=str(rank),
                SLURM_NTASKS="2",
                SLURM_LOCALID=str(rank),
                SLURM_NNODES="1",
                SLURM_JOB_NODELIST="localhost",
                SLURM_JOB_ID=job_id,
            ),
        )
        for rank in range(2)
    ]
    records = tmp_path / "out" / "ddp" / "records.jsonl"
    try:
        wait_for_marker(marker, procs[1])
        deadline = time.monotonic() + 60  # rank 0 writes the record the ranks just gathered
        while not records.exists() and procs[0].poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert records.exists(), procs[0].communicate(timeout=5)[1][-2000:]
        procs[1].send_signal(signal.SIGKILL)
        killed = time.monotonic()
        _, err = procs[0].communicate(timeout=timeout + 60)
        elapsed = time.monotonic() - killed
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert procs[0].returncode == DistributedError.exit_code, err[-2000:]
    assert elapsed < timeout + 40, "ended by the --dist-timeout at the latest, not a hang"
    last = err.strip().splitlines()[-1]
    # Which collective notices first (a DDP step's all-reduce, or a barrier between the
    # measurements) depends on when the kill lands; the message names it and the cause.
    assert last.startswith("lungbench bench: error: rank 0 of 2 (slurm, gloo): ")
    assert "failed: another rank died or did not answer" in last
    run = tmp_path / "out" / "ddp"
    assert read_json(run / "run.json")["status"] == "failed"
    kept = read_records(run)
    assert kept and kept[0]["world_size"] == 2 and kept[0]["status"] == "ok"


# ---------------------------------------------------------------------------- pure parts


def test_scaling_options():
    assert parse_scaling("both") == ("weak", "strong")
    assert parse_scaling("weak") == ("weak",)
    with pytest.raises(UsageError, match="unknown --scaling 'wek'"):
        parse_scaling("wek")
    assert split_batch("weak", 2, 4) == (2, None)
    assert split_batch("strong", 8, 4) == (2, None)
    per_rank, why = split_batch("strong", 2, 4)
    assert per_rank is None and "does not split evenly over 4 ranks" in why
    multi = DistContext(rank=0, world_size=8, nodes=2, backend="nccl")
    assert platform_label(multi, "weak") == "cpu x8 (2 nodes, DDP, nccl)"
    assert (
        platform_label(DistContext(world_size=2, backend="gloo"), "strong")
        == "cpu x2 (DDP, gloo, strong)"
    )


def _record(world: int, scaling: str, batch: int, step: float, **kw):
    per_rank = batch if scaling in ("weak", "none") else batch // world
    global_batch = batch * world if scaling == "weak" else batch
    return {
        "model": "dualpath3d",
        "preset": "dey2018",
        "filters": 8,
        "dtype": "fp32",
        "device": "cpu",
        "batch_size": batch,
        "status": "ok",
        "world_size": world,
        "scaling": scaling,
        "per_rank_batch": per_rank,
        "global_batch": global_batch,
        "step_s_median": step,
        "platform": f"p{world}{scaling}",
        **kw,
    }


def test_scaling_table_hand_worked():
    """1 process: batch 4 in 0.2 s (20 samples/s). Weak x2: 2 x 4 samples in 0.25 s = 32/s,
    speed-up 1.6, efficiency 80%. Strong x2: 4 samples in 0.125 s = 32/s, same ratios.
    Epoch: 10 s -> 6.25 s is x1.6."""
    base = _record(1, "none", 4, 0.2, epoch_s=10.0, epoch_data_wait_s=1.0)
    weak = _record(
        2,
        "weak",
        4,
        0.25,
        compute_s_median=0.2,
        comm_overhead_s=0.05,
        allreduce_s_median=0.01,
        epoch_s=6.25,
        epoch_data_wait_s=0.25,
        epoch_steps=5,
    )
    strong = _record(
        2, "strong", 4, 0.125, compute_s_median=0.1, comm_overhead_s=0.025, allreduce_s_median=0.01
    )
    table = scaling_table([base, weak, strong]).set_index(["scaling", "world_size"])
    assert table.loc[("weak", 2), "samples_per_s"] == pytest.approx(32.0)
    assert table.loc[("weak", 2), "speedup"] == pytest.approx(1.6)
    assert table.loc[("weak", 2), "efficiency"] == pytest.approx(0.8)
    assert table.loc[("weak", 2), "epoch_speedup"] == pytest.approx(1.6)
    assert table.loc[("strong", 2), "efficiency"] == pytest.approx(0.8)
    assert table.loc[("weak", 1), "efficiency"] == pytest.approx(1.0)
    parts = breakdown_table([base, weak]).set_index("world_size")
    # epoch 6.25 s: data 0.25 s, communication 5 steps x 0.05 s, compute the rest (5.75 s)
    assert parts.loc[2, "epoch_comm_s"] == pytest.approx(0.25)
    assert parts.loc[2, "epoch_compute_s"] == pytest.approx(5.75)
    assert parts.loc[1, "step_comm_s"] == 0.0
    text = format_breakdown([base, weak])
    assert "p2weak, filters 8, batch 4: step 250.0 ms = compute 200.0 ms (80%)" in text
    assert scaling_notes(scaling_table([base, weak, strong])) == []


def test_superlinear_scaling_is_flagged():
    """A 2-process step as fast as the 1-process one at twice the samples: 200% efficiency,
    which on one machine means the reference was disturbed; the note says so."""
    base = {**_record(1, "none", 4, 0.4), "threads_used": 2}
    weak = {**_record(2, "weak", 4, 0.1), "threads_used": 1}
    (note,) = scaling_notes(scaling_table([base, weak]))
    assert "weak scaling, world size 2" in note and "efficiency 400% is superlinear" in note
    assert "threads: reference 2, each rank 1" in note


def test_runs_combine_into_one_table(tmp_path):
    """A 1-process run and a 2-process run (without its own baseline) make one table."""
    one, two = tmp_path / "one", tmp_path / "two"
    for run, records in (
        (
            one,
            [
                {
                    k: v
                    for k, v in _record(1, "none", 4, 0.2).items()
                    if k not in ("world_size", "scaling")
                }
            ],
        ),
        (two, [_record(2, "weak", 4, 0.25)]),
    ):
        (run / "tables").mkdir(parents=True)
        (run / "plots").mkdir()
        (run / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    records = combine_runs([one, two])
    text = write_scaling_outputs(two, records)
    assert "| weak | 2 | 8 | 4 / 8 |" in text and "x1.60 | 80% |" in text
    assert (two / "tables" / "scaling.csv").exists()
    assert (two / "plots" / "scaling.png").stat().st_size > 1000
    with pytest.raises(DataError, match="no records.jsonl"):
        combine_runs([tmp_path / "absent"])


BUCKETS_SCRIPT = """
import os, torch, torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from lungbench.harness.ddp import bucket_numels
from lungbench.models import create_model
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ["PORT"])
dist.init_process_group("gloo", rank=0, world_size=1)
model = create_model("dualpath3d", filters=16)
ddp = DistributedDataParallel(model, bucket_cap_mb=1)
x = [torch.rand(2, 1, 32, 32, 32), torch.rand(2, 1, 32, 32, 32)]
for _ in range(2):
    ddp(*x).sum().backward()
print(sum(p.numel() for p in model.parameters()), *bucket_numels(ddp, model))
dist.destroy_process_group()
"""


@pytest.mark.slow  # the fast tier starts no process and trains nothing
def test_bucket_sizes_are_the_buckets_ddp_runs():
    """A 1 MB cap splits dualpath3d's 2.4 MB of gradients into several buckets: the isolated
    all-reduce must time those, not the construction-time layout (one bucket)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    out = subprocess.run(
        [sys.executable, "-c", BUCKETS_SCRIPT],
        env=clean_env(PORT=str(port)),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    total, *buckets = (int(v) for v in out.stdout.split())
    assert len(buckets) >= 2 and sum(buckets) == total
    assert max(buckets) * 4 <= 1.5 * 2**20  # each about the 1 MB cap (fp32 gradients)


def test_the_why_column_names_each_measured_loss():
    """Weak x2 at 57%: of a 0.35 s step, 0.10 s is exposed all-reduce (29%), the compute
    (0.25 s) is 1.25x the 1-process step at the same threads (0.2 s: shared cores), the
    slowest rank waited 10% of its epoch for data and ran 20% behind the fastest."""
    from lungbench.report.scaling import explain

    base = _record(1, "none", 4, 0.2, threads_used=1)
    weak = _record(
        2,
        "weak",
        4,
        0.35,
        compute_s_median=0.25,
        comm_overhead_s=0.10,
        epoch_s=10.0,
        epoch_data_wait_s=1.0,
        step_imbalance=0.2,
        threads_used=1,
    )
    why = explain(weak, "weak", base)
    assert why == (
        "exposed all-reduce 29% of the step; compute 1.25x slower than one process alone "
        "(shared cores); data waits 10% of the epoch; slowest rank 20% behind the fastest"
    )
    table = scaling_table([base, weak])
    assert table.loc[table["world_size"] == 2, "why"].item() == why
    assert "| Why |" in format_scaling_markdown(table)
    # strong scaling: the ideal compute per rank is the reference step / world size
    strong = _record(2, "strong", 4, 0.15, compute_s_median=0.1, comm_overhead_s=0.05)
    assert explain(strong, "strong", base).startswith("exposed all-reduce 33% of the step")


def test_the_whole_machine_row_is_labelled_and_compared_not_the_reference():
    """Rank threads: batch 4 in 0.2 s (20/s); whole machine (2 threads): 0.125 s (32/s).
    Weak x2 at 0.25 s = 32/s: speed-up x1.6 (80%) against the reference, x1.0 against the
    whole machine; strong x2 at 0.2 s = 20/s: one process with every core is 1.6x faster."""
    from lungbench.report.scaling import explain

    base = _record(1, "none", 4, 0.2, threads_used=1, reference="rank threads")
    whole = _record(1, "none", 4, 0.125, threads_used=2, reference="whole machine")
    whole["platform"] = "p1whole"
    weak = _record(2, "weak", 4, 0.25, compute_s_median=0.2, comm_overhead_s=0.05)
    strong = _record(2, "strong", 4, 0.2, compute_s_median=0.15, comm_overhead_s=0.05)
    table = scaling_table([base, whole, weak, strong])
    rows = table.set_index(["scaling", "world_size", "reference"], drop=False)
    assert rows.loc[("weak", 2, None), "efficiency"].item() == pytest.approx(0.8)
    assert rows.loc[("weak", 2, None), "vs_whole_machine"].item() == pytest.approx(1.0)
    assert rows.loc[("strong", 2, None), "vs_whole_machine"].item() == pytest.approx(0.625)
    assert rows.loc[("weak", 1, "rank threads"), "efficiency"].item() == pytest.approx(1.0)
    assert pd.isna(rows.loc[("weak", 1, "whole machine"), "efficiency"].item())
    text = format_scaling_markdown(table)
    assert "| weak | 1 (whole machine, 2 threads) |" in text
    assert "one process with every core is 1.60x faster" in explain(strong, "strong", base, 0.625)
    assert "every core" not in explain(weak, "weak", base, 1.0)


def test_the_why_column_sets_the_alpha_beta_model_beside_the_measured_all_reduce():
    base = _record(1, "none", 4, 0.2)
    weak = _record(
        2,
        "weak",
        4,
        0.25,
        compute_s_median=0.2,
        comm_overhead_s=0.05,
        allreduce_s_median=0.004,
        allreduce_model_s=0.003,
        allreduce_alpha_s=50e-6,
        allreduce_beta_bytes_per_s=2e9,
    )
    why = explain_of(weak, base)
    assert "all-reduce 4.0 ms measured vs 3.0 ms alpha-beta (latency 50 us, 2000 MB/s)" in why
    table = scaling_table([base, weak])
    assert table.loc[table["world_size"] == 2, "allreduce_model_s"].item() == 0.003


def explain_of(record, ref):
    from lungbench.report.scaling import explain

    return explain(record, record["scaling"], ref)


def test_ring_allreduce_hand_worked():
    """N = 4, alpha = 10 us, beta = 1 GB/s, 1 MB: 2(N-1) = 6 messages of latency (60 us)
    and 2(N-1)/N = 1.5 x 1 MB at 1 GB/s (1.5 ms): 1.56 ms."""
    from lungbench.measure.allreduce import AlphaBeta

    model = AlphaBeta(10e-6, 1e9)
    assert model.allreduce_s(1e6, 4) == pytest.approx(1.56e-3)
    assert model.allreduce_s(1e6, 1) == 0.0
    assert model.buckets_s([0.5e6, 0.5e6], 4) == pytest.approx(2 * (60e-6 + 0.75e-3))


def test_alpha_beta_fit_recovers_the_planted_values_and_refuses_nonsense():
    from lungbench.measure.allreduce import AlphaBeta, fit_alpha_beta

    planted = AlphaBeta(25e-6, 3e9)
    sizes = [1e3, 2.5e5, 1e6]
    fit = fit_alpha_beta(sizes, [planted.allreduce_s(n, 2) for n in sizes], 2)
    assert fit.alpha_s == pytest.approx(25e-6) and fit.beta_bytes_per_s == pytest.approx(3e9)
    assert fit_alpha_beta([1e3, 1e6], [2e-3, 1e-3], 2) is None  # larger was faster: noise
    assert fit_alpha_beta([1e3, 1e3], [1e-3, 1e-3], 2) is None  # one size: no slope
    assert fit_alpha_beta(sizes, [1e-3] * 3, 1) is None


@pytest.mark.timeout(480)
@pytest.mark.distributed
def test_ranks_run_the_choice_one_process_tuned_on_rank_0s_host(tmp_path, tiny_store, monkeypatch):
    """A 1-process tuning pass cached a choice for one rank's workload (planted: channels-
    last, which the device's table never picks on a CPU): every rank of the DDP step runs it,
    and the record says where it came from; --no-tune keeps the table."""
    from lungbench.core.cache import write_cache
    from lungbench.data.store import read_info
    from lungbench.harness import tuning
    from lungbench.measure.workload import Workload
    from lungbench.switches import eager_fp32

    cache = tmp_path / "cache"
    shapes = list(read_info(tiny_store).inputs.values())
    rank = Workload(preset="dey2018", filters=2, batch_size=2, threads=1)
    chosen = replace(eager_fp32(), memory_format="channels_last_3d")
    entry = {"choice": "+channels_last_3d", "switches": vars(chosen), "alternatives": []}
    monkeypatch.setenv("LUNGBENCH_CACHE_DIR", str(cache))  # this test's own cache
    key = tuning.cache_key(rank, torch.device("cpu"), shapes=shapes)  # whatever threads run here
    write_cache(tuning.CACHE_FILE, {key: entry})
    launch = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
    ]
    for extra, run_id in (([], "tuned"), (["--no-tune"], "table")):
        argv = bench_argv(tmp_path, tiny_store, "--batch", "2", "--repeats", "2", "--no-epoch")
        argv[argv.index("ddp")] = run_id
        argv += ["--scaling", "weak", "--no-baseline", *extra]
        proc = subprocess.run(
            [*launch, *argv[1:]], env=clean_env(LUNGBENCH_CACHE_DIR=str(cache)),
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        (record,) = read_records(tmp_path / "out" / run_id)
        assert record["world_size"] == 2
        if extra:
            assert record["memory_format_used"] == "contiguous"
            assert record["tuning_source"] == "table" and "--no-tune" in record["tuning_note"]
        else:
            assert record["memory_format_used"] == "channels_last_3d"
            assert (record["tuning_choice"], record["tuning_source"]) == (
                "+channels_last_3d",
                "cache, rank 0",
            )
