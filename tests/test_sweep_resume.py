"""Sweeps that survive: kill and resume, planted out-of-memory, errors, SIGTERM and Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from planted import held_after, signalled_at, wait_for_marker
from torch import nn

from lungbench.cli import main
from lungbench.core.errors import UsageError
from lungbench.core.runs import RECORDS_FILE, read_json, read_records
from lungbench.experiments.speedup import BenchRequest, run_bench
from lungbench.harness.sweep import BenchConfig
from lungbench.harness.sweep_state import (
    SweepState,
    family_key,
    merge_request,
    open_for_resume,
    repair_records,
)
from lungbench.measure.workload import Workload
from lungbench.models import registry

REPO = Path(__file__).resolve().parents[1]
FAST = ["--preset", "dey2018", "--repeats", "2", "--warmup", "0", "--no-epoch"]


class Probe(nn.Module):
    """A tiny two-input model whose forward misbehaves at chosen batch sizes."""

    def __init__(self, action, filters: int = 2) -> None:
        super().__init__()
        self.head = nn.Linear(2, 1)
        self.action = action
        self.filters = filters

    def forward(self, context: torch.Tensor, zoom: torch.Tensor) -> torch.Tensor:
        self.action(context.shape[0], self.filters)
        feats = torch.stack([context.mean(dim=(1, 2, 3, 4)), zoom.mean(dim=(1, 2, 3, 4))], 1)
        return self.head(feats)


def _oom_above_2(batch: int, filters: int) -> None:
    if batch > 2:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def _cpu_oom_above_2(batch: int, filters: int) -> None:
    if batch > 2:  # what torch's CPU allocator raises (checked on torch 2.13)
        raise RuntimeError(
            "[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate "
            "memory: you tried to allocate 68719476736 bytes. Error code 12"
        )


def _error_at_filters_4(batch: int, filters: int) -> None:
    if filters == 4 and batch == 2:
        raise ValueError("planted failure")


SIGNALS_SENT: list[int] = []


def _signal_once_at_batch_2(signum: int):
    def action(batch: int, filters: int) -> None:
        if batch == 2 and not SIGNALS_SENT:
            SIGNALS_SENT.append(signum)
            # raise(3): to this thread, at this point; os.kill(pid) let the kernel pick any
            # thread of the process, and one run in 5 of the fast tier lost the Ctrl-C
            signal.raise_signal(signum)
            time.sleep(1)  # the handler runs in this thread at the next bytecode

    return action


@pytest.fixture(autouse=True)
def _no_peak_measurement(monkeypatch):
    # The matmul peak takes seconds on 2 loaded cores and is not what these tests check.
    monkeypatch.setattr(
        "lungbench.experiments.speedup.measure_peaks",
        lambda devices, dtype="auto": {d: {"fp32": 1e10} for d in devices},
    )


@pytest.fixture
def probe_model():
    """Register a Probe under a name for the test, and remove it afterwards."""
    names = []

    def register(name: str, action) -> str:
        def builder(preset: str = "default", filters: int = 2) -> nn.Module:
            return Probe(action, filters)

        builder.__name__ = name
        registry.register_model(builder)
        names.append(name)
        return name

    SIGNALS_SENT.clear()
    yield register
    for name in names:
        registry._MODELS.pop(name, None)
        registry._EXAMPLE_INPUTS.pop(name, None)


def _request(tmp_path, store, model, run_id, **kw) -> BenchRequest:
    values = dict(
        model=model,
        preset="dey2018",
        filters=(2, 4),
        batch_sizes=(1, 2, 4, 8),
        warmup=0,
        repeats=2,
        epoch=False,
        store=store,
        out=tmp_path,
        run_id=run_id,
    )
    values.update(kw)
    return BenchRequest(**values)


def _keys(run: Path) -> list[str]:
    return [r["key"] for r in read_records(run)]


@pytest.mark.parametrize("planted", [_oom_above_2, _cpu_oom_above_2], ids=["cuda", "cpu"])
def test_planted_oom_is_recorded_and_larger_batches_skipped(
    tmp_path, tiny_store, probe_model, planted
):
    model = probe_model(f"oom_probe3d_{planted.__name__}", planted)
    result = run_bench(_request(tmp_path, tiny_store, model, "oom"))
    status = {(r["filters"], r["batch_size"]): r["status"] for r in result.records}
    assert status == {
        (2, 1): "ok",
        (2, 2): "ok",
        (2, 4): "oom",
        (2, 8): "skipped",
        (4, 1): "ok",
        (4, 2): "ok",
        (4, 4): "oom",
        (4, 8): "skipped",
    }
    by_key = {(r["filters"], r["batch_size"]): r for r in result.records}
    assert "memory" in by_key[(2, 4)]["error"]
    assert "batch 4 of the same configuration ran out of memory" in by_key[(2, 8)]["error"]
    assert read_json(result.run_dir / "run.json")["status"] == "complete"
    assert (result.run_dir / "tables" / "speedup_b2.csv").exists()
    assert len(_keys(result.run_dir)) == 8


def test_other_errors_are_recorded_and_the_sweep_goes_on(tmp_path, tiny_store, probe_model):
    model = probe_model("error_probe3d", _error_at_filters_4)
    result = run_bench(_request(tmp_path, tiny_store, model, "err", batch_sizes=(1, 2)))
    failed = [r for r in result.records if r["status"] != "ok"]
    assert [(r["filters"], r["batch_size"], r["status"]) for r in failed] == [(4, 2, "error")]
    assert failed[0]["error"] == "ValueError: planted failure"
    assert len(result.records) == 4


# SIGINT (Ctrl-C) is tested on a real child process below: raised inside this process's
# forward it was lost in some full-suite runs (an open bug of its own, see the closing note).
@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143)])
def test_signal_ends_cleanly_and_resume_finishes(
    tmp_path, tiny_store, probe_model, capsys, signum, code
):
    model = probe_model(f"signal{signum}_probe3d", _signal_once_at_batch_2(signum))
    argv = [
        "bench",
        "--model",
        model,
        "--no-tune",
        *FAST,
        "--filters",
        "2",
        "4",
        "--batch",
        "1",
        "2",
        "--store",
        str(tiny_store),
        "--out",
        str(tmp_path),
        "--run-id",
        "sig",
    ]
    assert main(argv) == code
    run = tmp_path / "sig"
    info = read_json(run / "run.json")
    assert info["status"] == "interrupted"
    saved = read_records(run)
    assert [(r["filters"], r["batch_size"], r["status"]) for r in saved] == [(2, 1, "ok")]
    assert (run / "tables" / "summary.csv").exists(), "tables rebuilt from the records"
    assert f"--resume {run}" in capsys.readouterr().err

    assert main(["bench", "--resume", str(run)]) == 0
    keys = _keys(run)
    assert len(keys) == len(set(keys)) == 4
    assert read_json(run / "run.json")["status"] == "complete"
    assert len(read_json(run / "run.json")["resumed_utc"]) == 1


def test_resume_refuses_conflicting_options(tmp_path, tiny_store, probe_model, capsys):
    model = probe_model("plain_probe3d", lambda batch, filters: None)
    argv = [
        "bench",
        "--model",
        model,
        *FAST,
        "--filters",
        "2",
        "--batch",
        "1",
        "--store",
        str(tiny_store),
        "--out",
        str(tmp_path),
        "--run-id",
        "done",
    ]
    assert main(argv) == 0
    capsys.readouterr()
    assert main(["bench", "--resume", "done", "--out", str(tmp_path), "--repeats", "5"]) == 2
    err = capsys.readouterr().err
    assert "repeats=5 (the run has 2)" in err and len(err.strip().splitlines()) == 1
    assert main(["bench", "--resume", str(tmp_path / "absent")]) == 2
    assert "no run folder there" in capsys.readouterr().err
    # A finished run resumes to a no-op: nothing measured twice.
    assert main(["bench", "--resume", str(tmp_path / "done")]) == 0
    assert len(_keys(tmp_path / "done")) == 1


@pytest.mark.slow  # a real process
@pytest.mark.timeout(420)  # above its own subprocess limits, which say what hung
def test_ctrl_c_between_configurations_ends_cleanly_and_resume_finishes(tmp_path, tiny_store):
    """Ctrl-C (SIGINT) to a real `lungbench bench` held at a planted point, while it writes
    its first record: the record is kept whole, the run ends interrupted with exit 130, and
    --resume measures only the rest."""
    options = [*FAST, "--no-tune", "--filters", "2", "--batch", "1", "2", "--store",
               str(tiny_store), "--out", str(tmp_path), "--threads", "1"]  # fmt: skip
    marker = tmp_path / "first-record"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    argv = ["bench", *options, "--run-id", "c"]
    target = "lungbench.core.runs:append_record"
    code, err = signalled_at(target, marker, argv, signal.SIGINT, tmp_path, env)
    assert code == 130, err[-800:]
    run = tmp_path / "c"
    assert read_json(run / "run.json")["status"] == "interrupted"
    assert [r["batch_size"] for r in read_records(run)] == [1]
    assert f"--resume {run}" in err
    assert main(["bench", "--resume", str(run)]) == 0
    assert sorted(r["batch_size"] for r in read_records(run)) == [1, 2]


@pytest.mark.slow  # a real process
@pytest.mark.timeout(420)  # above its own subprocess limits, which say what hung
def test_killed_sweep_resumes_to_the_same_keys(tmp_path, tiny_store):
    """SIGKILL after the first record (held there: a planted point), a torn line, then
    --resume: every key exactly once."""
    options = [
        *FAST,
        "--filters",
        "2",
        "4",
        "--batch",
        "1",
        "2",
        "3",
        "--store",
        str(tiny_store),
        "--out",
        str(tmp_path),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    marker = tmp_path / "first-record-written"
    argv = ["bench", *options, "--run-id", "killed", "--threads", "1"]
    job = subprocess.Popen(
        held_after("lungbench.core.runs:append_record", marker, argv),
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    records = tmp_path / "killed" / RECORDS_FILE
    try:
        wait_for_marker(marker, job)
        job.send_signal(signal.SIGKILL)
    finally:
        job.kill()
        job.wait(timeout=30)
    run = tmp_path / "killed"
    before = _keys(run)
    assert len(before) == 1 and read_json(run / "run.json")["status"] == "running"
    with open(records, "a") as f:  # what a kill in the middle of a write leaves
        f.write('{"key": "torn-by-a-kill", "status": "o')

    assert main(["bench", "--resume", str(run)]) == 0
    resumed = _keys(run)
    assert Counter(resumed) == Counter(set(resumed)), "no key twice"
    assert resumed[: len(before)] == before, "what was measured is kept, not redone"
    assert main(["bench", *options, "--threads", "1", "--run-id", "straight"]) == 0
    assert sorted(resumed) == sorted(_keys(tmp_path / "straight"))
    assert read_json(run / "run.json")["status"] == "complete"


# --------------------------------------------------------------------- the pieces, fast


def test_sweep_state_skips_larger_batches_of_the_same_kind_only():
    def config(**workload):
        return BenchConfig(Workload(**workload))

    oom = {"key": "k", "status": "oom", **config(filters=8, batch_size=4).record_fields()}
    state = SweepState.from_records([oom])
    assert state.skip_record(config(filters=8, batch_size=8))["status"] == "skipped"
    assert state.skip_record(config(filters=8, batch_size=2)) is None
    assert state.skip_record(config(filters=16, batch_size=8)) is None
    assert state.skip_record(config(filters=8, batch_size=8, device="cuda:1")) is None
    assert family_key(config(batch_size=2)) == family_key(config(batch_size=64))
    assert state.pending([config(filters=8, batch_size=4)]) == [
        config(filters=8, batch_size=4)
    ]  # its key is "k" here, not the config's


def test_repair_records_cuts_only_a_torn_tail(tmp_path):
    (tmp_path / RECORDS_FILE).write_text('{"a": 1}\n{"b": 2}\n{"c": ')
    assert repair_records(tmp_path) == len('{"c": ')
    assert (tmp_path / RECORDS_FILE).read_text() == '{"a": 1}\n{"b": 2}\n'
    assert repair_records(tmp_path) == 0


def test_merge_request_keeps_saved_values_and_rejects_changes():
    saved = json.loads(
        json.dumps({**BenchRequest(filters=(2,)).__dict__, "out": "results", "store": None})
    )
    merged = merge_request(saved, BenchRequest(), BenchRequest())
    assert merged["filters"] == [2]
    with pytest.raises(UsageError, match=r"filters=\[4\] \(the run has \[2\]\)"):
        merge_request(saved, BenchRequest(filters=(4,)), BenchRequest())
    merge_request(saved, BenchRequest(filters=(2,)), BenchRequest())  # same value: fine


def test_open_for_resume_rejects_other_kinds(tmp_path):
    run = tmp_path / "t"
    run.mkdir()
    (run / "run.json").write_text('{"kind": "train", "status": "running"}')
    (run / "config.json").write_text("{}")
    with pytest.raises(UsageError, match="only 'bench' runs"):
        open_for_resume(run)


# --------------------------------------------------------------------- training (issue 6)


def _train_cli_available() -> bool:
    try:
        from lungbench.experiments import lidc_pretrain  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.timeout(420)  # above its own subprocess limits, which say what hung
@pytest.mark.slow  # about 20 s of CPU: three short training runs through the CLI
@pytest.mark.skipif(not _train_cli_available(), reason="lungbench train lidc-pretrain missing")
def test_training_stopped_by_sigterm_and_resumed_matches_uninterrupted(tmp_path, tiny_store):
    """What SLURM sends before a time limit, through the CLI: exit 143, then --resume."""
    import pandas as pd

    base = [
        "train",
        "lidc-pretrain",
        "--quick",
        "--store",
        str(tiny_store),
        "--epochs",
        "2",
        "--batch",
        "4",
        "--out",
        str(tmp_path),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONPATH": str(REPO)}
    marker = tmp_path / "first-epoch-written"  # held there: the signal lands in epoch 2
    argv = [*base, "--run-id", "cut"]
    target = "lungbench.train.engine:_write_epoch"
    code, err = signalled_at(target, marker, argv, signal.SIGTERM, tmp_path, env)
    assert code == 143, err[-500:]
    checkpoint = tmp_path / "cut" / "checkpoint_last.pt"
    # the message names the run folder (a run folder continues in place); a checkpoint
    # file is still accepted, into a new run folder, as below
    assert checkpoint.exists() and f"--resume {tmp_path / 'cut'}`" in err

    assert main([*base, "--run-id", "resumed", "--resume", str(checkpoint)]) == 0
    assert main([*base, "--run-id", "straight"]) == 0
    columns = ["epoch", "train_loss", "val_loss", "val_auc"]
    resumed = pd.read_csv(tmp_path / "resumed" / "metrics.csv")[columns]
    straight = pd.read_csv(tmp_path / "straight" / "metrics.csv")[columns]
    pd.testing.assert_frame_equal(
        resumed.tail(len(straight)).reset_index(drop=True), straight, rtol=1e-5
    )


def test_resume_of_an_older_run_with_forced_switches_given_again():
    """A run made before strict_switches named the forced switches saved a bool; giving the
    same --dtype again on --resume (a requeued job's options) is no conflict."""
    from dataclasses import asdict

    from lungbench.experiments.speedup import BenchRequest
    from lungbench.harness.sweep_state import merge_request

    saved = {**asdict(BenchRequest(dtype="bf16")), "strict_switches": True}
    saved = {k: (list(v) if isinstance(v, tuple) else v) for k, v in saved.items()}
    saved = {k: (str(v) if isinstance(v, Path) else v) for k, v in saved.items()}
    given = BenchRequest(dtype="bf16", strict_switches=("dtype",))
    merged = merge_request(saved, given, BenchRequest())
    assert merged["dtype"] == "bf16" and merged["strict_switches"] is True


def test_resume_of_a_folder_whose_run_json_is_not_an_object_is_one_line(tmp_path):
    from lungbench.core.errors import DataError

    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text("[]")
    (run / "config.json").write_text("{}")
    with pytest.raises(DataError, match="run.json / config.json is not a JSON object"):
        open_for_resume(run, tmp_path)
    (run / "run.json").write_text("{not json")
    with pytest.raises(DataError, match="cannot read run.json / config.json"):
        open_for_resume(run, tmp_path)
