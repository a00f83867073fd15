"""`lungbench reproduce`: twins run one after another, killed and resumed, one report."""

from __future__ import annotations

import json
import os
import signal

import pandas as pd
import pytest

from lungbench.cli import main
from lungbench.core.options import replaced
from lungbench.experiments import mosmed, reproduce, speedup


@pytest.fixture
def tiny_twins(monkeypatch):
    """speedup and mosmed at a size that runs in seconds: one bench configuration without
    an epoch, two MosMed variants of one epoch on 12 small volumes."""

    def tiny_request(quick, device, out, run_id):
        return speedup.BenchRequest(
            filters=(4,),
            batch_sizes=(2,),
            repeats=2,
            warmup=1,
            epoch=False,
            synth_n=8,
            tune=False,
            telemetry_interval=0.0,
            dtype="fp32",
            out=out,
            run_id=run_id,
        )

    monkeypatch.setattr(reproduce, "_speedup_request", tiny_request)
    monkeypatch.setattr(
        speedup, "measure_peaks", lambda devices, dtype="auto": {d: {"fp32": 1e10} for d in devices}
    )
    tiny = {
        "variants": ("baseline", "dense100"),
        "synth_n": 12,
        "grid": (16, 16, 16),
        "filters": (4, 4, 8, 8),
        "dense": 16,
        "epochs": 1,
        "telemetry_interval": 0.0,
        "progress": False,
    }
    monkeypatch.setattr(mosmed, "QUICK", replaced(mosmed.QUICK, tiny))


def _state(run):
    return json.loads((run / reproduce.STATE_FILE).read_text())["twins"]


@pytest.mark.slow  # the fast tier starts no process and trains nothing
def test_killed_after_the_first_twin_then_resumed(tmp_path, tiny_twins, monkeypatch, capsys):
    """SIGTERM during the second twin's second variant: the first twin stays complete, the
    second is interrupted with the table of its finished variant; --resume skips the first
    twin and trains only the missing variant; one report lists both twins."""
    trained, killed = [], []
    real = mosmed.train_variant

    def variant(cfg, name, *args, **kwargs):
        if name == "dense100" and not killed:
            killed.append(name)
            os.kill(os.getpid(), signal.SIGTERM)  # like a scheduler's time limit
        trained.append(name)
        return real(cfg, name, *args, **kwargs)

    monkeypatch.setattr(mosmed, "train_variant", variant)
    argv = ["reproduce", "--quick", "--only", "mosmed", "speedup", "--out", str(tmp_path)]
    assert main([*argv, "--run-id", "r"]) == 128 + signal.SIGTERM
    run = tmp_path / "r"
    out = capsys.readouterr().out
    assert "| speedup |" in out and "| mosmed |" in out  # the estimate, printed first
    state = _state(run)
    assert state["speedup"]["status"] == "complete"
    assert state["mosmed"]["status"] == "interrupted"
    assert json.loads((run / "run.json").read_text())["status"] == "interrupted"
    twin = run / state["mosmed"]["run_dir"]
    assert json.loads((twin / "run.json").read_text())["status"] == "interrupted"
    table = pd.read_csv(twin / "tables" / "variants.csv")
    assert list(table["variant"]) == ["baseline"]  # the variant that finished
    assert (run / "report.html").exists()  # a report of what finished
    bench_records = (run / "speedup" / "records.jsonl").read_text()

    trained.clear()
    assert main(["reproduce", "--resume", str(run)]) == 0
    assert trained == ["dense100"]  # baseline was done; speedup not run again
    assert (run / "speedup" / "records.jsonl").read_text() == bench_records
    state = _state(run)
    assert {s["status"] for s in state.values()} == {"complete"}
    assert state["mosmed"]["run_dir"] == "mosmed"  # continued in its folder
    table = pd.read_csv(run / "mosmed" / "tables" / "variants.csv")
    assert list(table["variant"]) == ["baseline", "dense100"]
    assert json.loads((run / "run.json").read_text())["status"] == "complete"
    twins = pd.read_csv(run / "tables" / "twins.csv")
    assert list(twins["twin"]) == ["speedup", "mosmed"]  # TWINS order
    assert twins["published tables beside ours"].str.contains("of").all()
    html = (run / "report.html").read_text()
    assert 'id="speedup"' in html and 'id="mosmed"' in html
    assert "seed002_variants.csv" in html and "seed000_speedup_b2.csv" in html
    assert "## mosmed: seed 002" in (run / "report.md").read_text()


def test_unknown_twin_is_one_line_listing_the_known_ones(tmp_path, capsys):
    assert main(["reproduce", "--quick", "--only", "nodul2d", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "'nodul2d' (did you mean 'nodule2d'?)" in err[0]
    assert "speedup, lidc-pretrain, lungx-cv, mosmed, chestxray, nodule2d" in err[0]
    assert not list(tmp_path.iterdir())  # nothing written


def test_estimate_prints_the_plan_and_runs_nothing(tmp_path, capsys):
    assert main(["reproduce", "--estimate", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for name in reproduce.TWINS:
        assert f"| {name} |" in out
    assert "| total |" in out and "GFLOP/s" in out
    assert not list(tmp_path.iterdir())


def test_estimates_use_this_hosts_own_times_once_measured(tmp_path, monkeypatch):
    monkeypatch.setenv("LUNGBENCH_CACHE_DIR", str(tmp_path))
    first = reproduce.estimate("nodule2d", quick=True, device="cpu")
    assert first.seconds == reproduce.QUICK_SECONDS["nodule2d"]
    full = reproduce.estimate("nodule2d", quick=False, device="cpu")
    assert full.seconds > first.seconds and "GFLOP/s" in full.how
    assert "none measured here" in first.how
    reproduce.remember_time("nodule2d", True, "cpu", 42.0)
    again = reproduce.estimate("nodule2d", quick=True, device="cpu")
    assert again.seconds == 42.0 and again.how.startswith("measured here once")
    for seconds in (50.0, 46.0, 58.0, 44.0, 48.0):  # six runs: the first falls out of five
        reproduce.remember_time("nodule2d", True, "cpu", seconds)
    sure = reproduce.estimate("nodule2d", quick=True, device="cpu")
    assert sure.seconds == 48.0, "the median of the last five"
    assert "median of 5 runs, 44 s to 58 s (+-15%)" in sure.how
    assert reproduce.duration(42) == "42 s" and reproduce.duration(3725) == "1 h 02 min"


@pytest.mark.slow  # the fast tier trains nothing
def test_one_failing_twin_does_not_stop_the_others(tmp_path, tiny_twins, monkeypatch, capsys):
    """The first twin fails (planted): the second still runs to the end, the failure is
    reported in its state, its table row and on stderr, and the command exits 1."""
    from dataclasses import replace

    def failing(ctx):
        raise RuntimeError("planted failure in the bench twin")

    monkeypatch.setitem(
        reproduce.TWINS, "speedup", replace(reproduce.TWINS["speedup"], run=failing)
    )
    argv = ["reproduce", "--quick", "--only", "speedup", "mosmed", "--out", str(tmp_path)]
    assert main([*argv, "--run-id", "f"]) == 1
    err = capsys.readouterr().err
    assert "error: twin(s) failed: speedup" in err
    run = tmp_path / "f"
    state = _state(run)
    assert state["speedup"]["status"] == "failed"
    assert state["speedup"]["error"] == "planted failure in the bench twin"
    assert state["mosmed"]["status"] == "complete"  # ran after the failure, to the end
    assert list(pd.read_csv(run / "mosmed" / "tables" / "variants.csv")["variant"]) == [
        "baseline",
        "dense100",
    ]
    twins = pd.read_csv(run / "tables" / "twins.csv").set_index("twin")
    assert "failed" in str(twins.loc["speedup"].to_dict())
    assert (run / "report.html").exists()
