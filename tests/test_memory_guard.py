"""Impossible work refused before it starts (issue 17, item 4): the step's memory estimate,
the device's limit, and what bench, profile and the ablation do with a step that cannot fit."""

from __future__ import annotations

import json

import pytest
import torch

from lungbench.cli import main
from lungbench.core.errors import UsageError
from lungbench.core.runs import read_records
from lungbench.measure import memory
from lungbench.measure.workload import Workload

TINY = Workload(preset="dey2018", filters=2, batch_size=2)
DEY_SHAPES = [(1, 5, 50, 50), (1, 5, 50, 50)]


def test_estimate_grows_linearly_with_the_batch_and_counts_adam_state():
    need = memory.step_memory(TINY, DEY_SHAPES)
    est = need.estimate
    params = sum(p.numel() for p in TINY.build_model(torch.device("cpu")).parameters())
    assert est.weights == est.gradients == 4 * params
    assert est.optimizer == 2 * est.gradients  # Adam's two moments
    # The per-sample activations: at least the first conv's output, fp32, per path.
    assert est.per_sample >= 2 * 4 * 2 * 5 * 50 * 50
    step = need.bytes(11) - need.bytes(10)
    assert step == pytest.approx(memory.ACTIVATION_FACTOR * est.per_sample, abs=1)
    assert need.bytes(1) > memory.RUNTIME_OVERHEAD + est.static


@pytest.mark.parametrize("limit_mib", [300, 1024, 64 * 1024])
def test_largest_batch_is_the_last_that_fits(limit_mib):
    need = memory.step_memory(TINY, DEY_SHAPES)
    limit = limit_mib * memory.MIB
    largest = need.largest_batch(limit)
    assert largest >= 1
    assert need.bytes(largest) <= memory.HEADROOM * limit < need.bytes(largest + 1)


def test_nothing_fits_below_the_runtime_overhead():
    assert memory.step_memory(TINY, DEY_SHAPES).largest_batch(100 * memory.MIB) == 0


@pytest.mark.parametrize(
    ("text", "expected"),
    [("1234", 1234), ("512MiB", 512 * 1024**2), ("1.5 GiB", int(1.5 * 1024**3)), ("2G", 2 << 30)],
)
def test_sizes_parse(text, expected):
    assert memory.parse_size(text) == expected


def test_a_bad_size_is_a_usage_error_naming_the_variable():
    with pytest.raises(UsageError, match="LUNGBENCH_MEMORY_LIMIT='lots'"):
        memory.parse_size("lots")


def test_the_planted_limit_replaces_the_device_figure(monkeypatch):
    monkeypatch.setenv(memory.LIMIT_VARIABLE, "3GiB")
    assert memory.memory_limit(torch.device("cpu")) == (3 << 30, memory.LIMIT_VARIABLE)
    monkeypatch.delenv(memory.LIMIT_VARIABLE)
    free, source = memory.memory_limit(torch.device("cpu"))
    assert free > 0 and "memory" in source


def test_cgroup_allowance(tmp_path):
    assert memory._cgroup_allowance(tmp_path) is None  # no cgroup files: no limit
    (tmp_path / "memory.max").write_text("max\n")
    (tmp_path / "memory.current").write_text("100\n")
    assert memory._cgroup_allowance(tmp_path) is None
    (tmp_path / "memory.max").write_text(str(8 << 30))
    (tmp_path / "memory.current").write_text(str(1 << 30))
    assert memory._cgroup_allowance(tmp_path) == 7 << 30


def test_refusal_names_estimate_limit_and_largest_batch(monkeypatch):
    monkeypatch.setenv(memory.LIMIT_VARIABLE, "1GiB")
    assert memory.refusal(TINY, DEY_SHAPES) is None
    huge = Workload(preset="dey2018", filters=2, batch_size=100_000)
    why = memory.refusal(huge, DEY_SHAPES)
    largest = memory.step_memory(TINY, DEY_SHAPES).largest_batch(1 << 30)
    assert why.startswith("batch 100000 needs about ")
    assert "1.0 GiB (LUNGBENCH_MEMORY_LIMIT)" in why
    assert f"the largest batch that fits is {largest}" in why


def test_bench_records_oom_for_what_cannot_fit_and_measures_the_rest(
    tmp_path, capsys, tiny_store, monkeypatch
):
    need = memory.step_memory(TINY, DEY_SHAPES)
    monkeypatch.setenv(memory.LIMIT_VARIABLE, str(int(need.bytes(3) / memory.HEADROOM) + 1))
    argv = ["bench", "--store", str(tiny_store), "--out", str(tmp_path), "--run-id", "guard"]
    tiny = ["--preset", "dey2018", "--filters", "2", "--repeats", "1", "--warmup", "0"]
    code = main([*argv, *tiny, "--batch", "2", "1000", "--epoch-samples", "4", "--no-tune"])
    out, err = capsys.readouterr()
    assert code == 0, err
    records = {r["batch_size"]: r for r in read_records(tmp_path / "guard")}
    assert records[2]["status"] == "ok"
    refused = records[1000]
    assert refused["status"] == "oom" and refused["memory_refused"] is True
    assert "the largest batch that fits is 3" in refused["error"]
    assert "step_s_median" not in refused  # nothing ran
    assert "not measured (n/a above):" in out and "b1000" in out
    assert "not measured: batch 1000 needs about" in err
    assert json.loads(out.strip().splitlines()[-1]) == {"configs": 2, "failed": 1}


def test_bench_exits_non_zero_when_every_configuration_failed(
    tmp_path, capsys, tiny_store, monkeypatch
):
    monkeypatch.setenv(memory.LIMIT_VARIABLE, "1MiB")
    code = main(
        ["bench", "--store", str(tiny_store), "--out", str(tmp_path), "--preset", "dey2018"]
        + ["--filters", "2", "--batch", "2", "--repeats", "1", "--no-tune"]
    )
    out, err = capsys.readouterr()
    assert code == 1
    assert "every configuration failed" in out
    assert "error: every configuration failed" in err


def test_profile_refuses_a_batch_that_cannot_fit(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv(memory.LIMIT_VARIABLE, "300MiB")
    argv = ["profile", "--preset", "dey2018", "--filters", "2", "--batch", "100000"]
    code = main([*argv, "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "--batch 100000: batch 100000 needs about" in err
    assert not any(tmp_path.iterdir())  # refused before any file was written


def test_the_ablation_refuses_a_batch_that_cannot_fit(monkeypatch):
    from lungbench.harness.ablation import AblationConfig, run_ablation

    monkeypatch.setenv(memory.LIMIT_VARIABLE, "300MiB")
    huge = Workload(preset="dey2018", filters=2, batch_size=100_000)
    with pytest.raises(UsageError, match="--batch 100000: batch 100000 needs about"):
        run_ablation(AblationConfig(huge, rounds=1))
