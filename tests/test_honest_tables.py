"""Results that describe themselves: long-form timings, provenance, partial epochs named."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pandas as pd
import pytest

from lungbench.cli import main
from lungbench.core.runs import read_json, read_records


@pytest.fixture(scope="module")
def partial_run(tmp_path_factory, tiny_store):
    """One tiny sweep with a partial epoch (6 samples), read by every test here: the run
    folder and what it printed."""
    out = tmp_path_factory.mktemp("honest")
    argv = ["bench", "--preset", "dey2018", "--filters", "2", "--batch", "2", "4"]
    argv += ["--repeats", "3", "--warmup", "1", "--store", str(tiny_store), "--no-tune"]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main([*argv, "--out", str(out), "--run-id", "h", "--epoch-samples", "6"])
    assert code == 0
    return out / "h", printed.getvalue()


def test_long_form_measurements_round_trip_through_pandas(partial_run):
    run, _ = partial_run
    records = {r["key"]: r for r in read_records(run)}
    long = pd.read_csv(run / "tables" / "measurements.csv")
    assert set(long["unit"]) == {"s"}
    assert {"forward", "backward", "optimizer", "step", "epoch"} <= set(long["phase"])
    steps = long[long["phase"] == "step"]
    assert len(steps) == 3 * len(records)  # one row per configuration x repeat
    for key, rows in steps.groupby("key"):
        assert np.allclose(rows.sort_values("repeat")["value"], records[key]["samples_s"]["step"])
        assert rows["value"].median() == records[key]["step_s_median"]
    wide = pd.read_csv(run / "tables" / "configurations.csv")
    assert len(wide) == len(records)


def test_records_carry_provenance_and_partial_epochs_say_so(partial_run):
    run, out = partial_run
    env = read_json(run / "environment.json")
    for r in read_records(run):
        assert r["environment_file"] == "environment.json"
        assert r["lungbench_version"] and r["measured_utc"].endswith("+00:00")
        assert r["git_commit"] == (env["git"] or {}).get("commit")
        assert r["epoch_partial"] is True and r["epoch_samples"] == 6
        assert r["epoch_split_samples"] > 6
    assert "PARTIAL training epoch (6 of" in out


def test_the_checkout_commit_is_found():
    """The environment record finds the checkout's commit (the tests run from one)."""
    from pathlib import Path

    from lungbench.core.environment import git_info

    assert (Path(__file__).resolve().parents[1] / ".git").exists()
    assert len(git_info()["commit"]) == 40
