"""`lungbench compare`: a planted 20% slowdown is flagged, a 0% change is not."""

from __future__ import annotations

import copy

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lungbench.cli import main
from lungbench.core.runs import append_record, create_run_dir, finish_run, write_json
from lungbench.report.compare import bootstrap_ratio_ci, compare_records, verdict
from lungbench.report.labels import config_label

KEYS = [f"dualpath3d|dey2018|f{f}|b{b}|cpu|t2|fp32|contiguous|off" for f in (8, 16) for b in (2, 4)]
ENV = {
    "host": "node1",
    "python": "3.11.7",
    "platform": "Linux",
    "libraries": {"torch": "2.13.0", "numpy": "2.4.6"},
    "torch": {"version": "2.13.0", "cuda_version": None, "cudnn_version": None},
    "cpu": {
        "model": "AMD EPYC",
        "logical_cores": 2,
        "affinity_cores": 2,
        "torch_threads": 2,
        "omp_num_threads": None,
    },
    "gpus": [],
}


def _records(
    factor: float, seed: int, n: int = 10, noise: float = 0.02, epoch: bool = True
) -> list[dict]:
    """One ok record per key: `n` step times around factor x base with relative noise."""
    rng = np.random.default_rng(seed)
    out = []
    for i, key in enumerate(KEYS):
        base = 0.05 * (i + 1) * factor
        steps = (base * (1 + rng.normal(0, noise, n))).tolist()
        record = {
            "key": key,
            "status": "ok",
            "samples_s": {"step": steps},
            "step_s_median": float(np.median(steps)),
        }
        if epoch:
            record["epoch_s"] = 30 * base * (1 + rng.normal(0, noise))
        out.append(record)
    return out


def _run(tmp_path, name: str, records: list[dict], env: dict | None = None):
    run = create_run_dir(tmp_path, "bench", name)
    write_json(run / "environment.json", env or ENV)
    for record in records:
        append_record(run, record)
    finish_run(run)
    return run


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_planted_20_percent_slowdown_is_flagged_and_0_percent_is_not(seed):
    a = _records(1.0, seed)
    slower = compare_records(a, _records(1.2, seed + 100))
    same = compare_records(a, _records(1.0, seed + 100))
    assert [c.verdict for c in slower.changes if c.metric == "step"] == ["slower"] * 4
    assert [c.verdict for c in same.changes if c.metric == "step"] == ["same"] * 4
    steps = [c for c in slower.changes if c.metric == "step"]
    assert len(steps) == 4
    for c in steps:
        assert c.ci_low < 1.2 < c.ci_high and c.ci_low > 1.0
        assert c.change_pct == pytest.approx(20, abs=4)
    # one epoch each: a ratio, but no verdict without a spread to judge it by
    assert slower.counts("epoch") == {"faster": 0, "slower": 0, "same": 0, "unreliable": 4}
    assert {c.why for c in slower.changes if c.metric == "epoch"} == {"one epoch each"}
    assert slower.regressions(10) and not slower.regressions(30) and not same.regressions(0)


def test_no_verdict_on_a_busy_machine_epochs_of_other_sizes_or_one_sample():
    a, b = _records(1.0, 0), _records(1.5, 1)
    b[0]["busy"] = True  # measured while other processes used the cores
    for r in a:
        r["epoch_samples"] = 64
    for r in b:
        r["epoch_samples"] = 604
    b[1]["samples_s"] = {"step": b[1]["samples_s"]["step"][:1]}  # a single step
    result = compare_records(a, b)
    step = {c.key: c for c in result.changes if c.metric == "step"}
    assert (step[KEYS[0]].verdict, step[KEYS[0]].why) == ("unreliable", "busy machine")
    assert (step[KEYS[1]].verdict, step[KEYS[1]].why) == ("unreliable", "one sample")
    assert step[KEYS[2]].verdict == "slower"
    epochs = [c for c in result.changes if c.metric == "epoch"]
    assert {c.verdict for c in epochs} == {"not comparable"}
    assert epochs[0].why == "epochs of 64 and 604 samples"
    assert {c.key for c in result.regressions(10)} == set(KEYS[2:])  # busy: not gated


def test_compare_warns_about_an_incomplete_or_busy_run(tmp_path, capsys):
    a = _run(tmp_path, "a", _records(1.0, 0))
    busy = _records(1.0, 1)
    busy[0]["busy"] = True
    b = _run(tmp_path, "b", busy)
    (b / "run.json").write_text((b / "run.json").read_text().replace('"complete"', '"running"'))
    assert main(["compare", str(a), str(b)]) == 0
    captured = capsys.readouterr()
    text = captured.out + captured.err
    assert "is 'running', not complete" in text
    assert "measured on a busy machine: no verdict on them" in text
    assert "unreliable (busy machine)" in text


def test_faster_only_in_one_run_and_failed_records():
    a = _records(1.0, 0)
    b = _records(0.7, 1)[:3]
    b[0] = {**b[0], "status": "oom"}
    result = compare_records(
        a, b + [{"key": "new|config", "status": "ok", "samples_s": {"step": [0.1, 0.1]}}]
    )
    steps = {c.key: c.verdict for c in result.changes if c.metric == "step"}
    assert steps == {KEYS[1]: "faster", KEYS[2]: "faster"}
    assert result.only_a == [KEYS[0], KEYS[3]] and result.only_b == ["new|config"]
    assert result.lost_in_b == {KEYS[0]: "oom", KEYS[3]: "missing"}


def test_fail_above_catches_failed_or_missing_configurations_in_b(tmp_path, capsys):
    """A CI gate must not pass because B's configurations failed instead of getting slower."""
    a = _run(tmp_path, "a", _records(1.0, 0))
    broken = [{**r, "status": "error", "error": "boom"} for r in _records(1.0, 7)]
    b = _run(tmp_path, "b", broken[:2])
    assert main(["compare", str(a), str(b), "--fail-above", "10"]) == 1
    out, err = capsys.readouterr()
    named = [config_label({"key": k}) for k in KEYS]  # in words: lungbench.report.labels
    assert f"{named[0]} (error)" in out and "measured in A, not in B" in err
    assert f"{named[3]} (missing)" in err
    assert main(["compare", str(a), str(b)]) == 0  # without the gate: a report, exit 0
    capsys.readouterr()


def test_fail_above_below_the_same_threshold_still_gates(tmp_path, capsys):
    a = _run(tmp_path, "a", _records(1.0, 0, n=30, noise=0.002))
    b = _run(tmp_path, "b", _records(1.04, 7, n=30, noise=0.002))  # 4% slower, tight CI
    assert main(["compare", str(a), str(b)]) == 0
    assert '"same": 4' in capsys.readouterr().out  # within the 5% "same" threshold
    assert main(["compare", str(a), str(b), "--fail-above", "2"]) == 1
    assert "regression above 2%" in capsys.readouterr().err


def test_verdict_rules():
    assert verdict(1.5, 0.9, 2.0, 0.05) == "same"  # the interval contains 1
    assert verdict(1.04, 1.01, 1.06, 0.05) == "same"  # within the threshold
    assert verdict(1.2, 1.1, 1.3, 0.05) == "slower"
    assert verdict(0.8, 0.7, 0.9, 0.05) == "faster"
    assert verdict(1.2, None, None, 0.05) == "slower"  # one epoch: threshold only


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(0.001, 10), min_size=1, max_size=12), st.floats(0.1, 10))
def test_bootstrap_interval_brackets_the_ratio(samples, factor):
    a = np.asarray(samples)
    low, high = bootstrap_ratio_ci(a, a * factor, n_boot=200)
    same_low, same_high = bootstrap_ratio_ci(a, a, n_boot=200)
    assert 0 < low <= high
    # Scaling B scales the interval (same resamples): the interval is of the ratio itself.
    assert low == pytest.approx(factor * same_low) and high == pytest.approx(factor * same_high)
    assert same_low <= 1.0 + 1e-12 and same_high >= 1.0 - 1e-12


def test_cli_fail_above_and_environment_warning(tmp_path, capsys):
    a = _run(tmp_path, "a", _records(1.0, 0))
    same = _run(tmp_path, "same", _records(1.0, 7))
    env = copy.deepcopy(ENV)
    env["libraries"]["torch"] = "2.14.0"
    env["cpu"]["torch_threads"] = 1
    slow = _run(tmp_path, "slow", _records(1.2, 7), env)

    assert main(["compare", str(a), str(same), "--fail-above", "10"]) == 0
    out, err = capsys.readouterr()
    assert "slower" not in out.split("\n{")[0].split("verdict |")[1] and "warning" not in err
    assert '"same": 4' in out

    code = main(["compare", str(a), str(slow), "--fail-above", "10", "--out", str(tmp_path / "ab")])
    out, err = capsys.readouterr()
    assert code == 1
    assert "regression above 10%" in err and "torch differs: 2.13.0 vs 2.14.0" in err
    assert "torch threads differs: 2 vs 1" in err
    assert (tmp_path / "ab" / "compare.csv").exists()
    assert main(["compare", str(a), str(slow), "--fail-above", "30"]) == 0
    capsys.readouterr()
    assert main(["compare", str(a), str(tmp_path / "nope")]) == 2
    assert "not a run folder" in capsys.readouterr().err


def test_runs_that_ran_other_switches_are_not_compared():
    """Keys say "auto"; when the switches that ran differ (tuned here, the table there), the
    times measure two recipes: no verdict, and no CI gate."""
    a, b = _records(1.0, 0), _records(1.5, 1)
    for r in a:
        r["dtype_used"] = "bf16"
    for r in b:
        r["dtype_used"] = "fp32"
    result = compare_records(a, b)
    assert {c.verdict for c in result.changes} == {"not comparable"}
    assert "other switches ran (dtype bf16 vs fp32)" in {c.why for c in result.changes}
    assert result.regressions(10) == []


def test_runs_of_different_kinds_are_refused_in_one_line(tmp_path, capsys):
    bench = _run(tmp_path, "bench", _records(1.0, 0))
    train = create_run_dir(tmp_path, "train-lidc-pretrain", "train")
    finish_run(train)
    argv = ["compare", str(bench), str(train), "--fail-above", "5"]
    assert main(argv) == 2  # not 0: a comparison of nothing must not pass a gate
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is a bench run and" in err[0] and "same kind" in err[0]


@pytest.mark.parametrize(
    ("field", "value"),
    [("step_s_median", "fast"), ("batch_size", 2.5), ("key", 3), ("epoch_s", -1.0)],
)
def test_a_record_read_back_with_a_wrong_field_is_one_line(tmp_path, capsys, field, value):
    good = _run(tmp_path, "a", _records(1.0, 0))
    records = _records(1.0, 1)
    records[1][field] = value
    bad = _run(tmp_path, "b", records)
    for argv in (["compare", str(good), str(bad)], ["report", str(bad)]):
        assert main(argv) != 0
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"records.jsonl: line 2: field {field!r}" in err[0], err
