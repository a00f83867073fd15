"""The ablation: a cumulative ladder, interleaved timings, speed-ups and accuracy checks."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from lungbench.cli import main
from lungbench.core.runs import read_json, read_records
from lungbench.harness.ablation import (
    AblationConfig,
    ablation_table,
    attach_peaks,
    ladder,
    run_ablation,
)
from lungbench.measure.workload import Workload
from lungbench.switches import bf16_supported, eager_fp32, fused_adam_on_cpu

CPU = torch.device("cpu")
TINY = AblationConfig(
    Workload(preset="default", filters=2, batch_size=2),
    warmup=0,
    rounds=3,
    accuracy_steps=2,
    compile_rung="off",
)


def test_cpu_ladder_adds_one_switch_at_a_time():
    variants = ladder(CPU, "off")
    assert variants[0].switches == eager_fp32() and variants[0].name == "eager_fp32"
    names = [v.name for v in variants]
    adam = "+fused" if fused_adam_on_cpu() else "+foreach"  # the faster Adam this torch has
    assert names[:3] == ["eager_fp32", "+channels_last_3d", adam]
    assert ("+bf16" in names) == bf16_supported(CPU)
    for before, after in zip(variants, variants[1:], strict=False):
        changed = [
            k
            for k in vars(before.switches)
            if getattr(before.switches, k) != getattr(after.switches, k)
        ]
        assert len(changed) == 1, (before.name, after.name, changed)
    assert all(v.switches.compile == "off" for v in variants)


def test_compile_rung_is_last_when_asked():
    variants = ladder(CPU, "max-autotune")
    if variants[-1].switches.compile != "off":  # a compiler exists
        assert variants[-1].name == "+compile-max-autotune"


@pytest.fixture(scope="module")
def records():
    return run_ablation(TINY)


def test_every_variant_is_timed_in_every_round_and_passes_accuracy(records):
    assert [r["variant"] for r in records] == [v.name for v in ladder(CPU, "off")]
    base = records[0]
    assert base["speedup"] == pytest.approx(1.0) and base["loss_delta"] == 0.0
    for r in records:
        assert len(r["samples_s"]["step"]) == TINY.rounds
        assert r["step_s_median"] > 0 and r["speedup"] > 0 and r["flops_per_step"] > 0
        assert r["accuracy_ok"] and r["loss_delta"] <= r["tolerance"]
        assert r["dtype_used"] in ("fp32", "bf16") and r["switch_fallbacks"] == []
        assert r["loss_fp32"] == base["loss_after_n"]
        assert r["loss_initial"] == base["loss_initial"] != base["loss_after_n"]
    assert records[1]["memory_format_used"] == "channels_last_3d"


def test_table_and_peaks(records):
    attach_peaks(records, {"fp32": 1e11, "bf16": 2e11})
    table = ablation_table(records)
    assert list(table.index) == [r["variant"] for r in records]
    assert {"speed-up", "IQR ms", "% peak", "|Δ loss|", "tolerance", "accuracy"} <= set(table)
    assert set(table["accuracy"]) == {"ok"}
    bf16 = [r for r in records if r["dtype_used"] == "bf16"]
    assert all(r["peak_dtype"] == "bf16" for r in bf16)
    assert records[0]["peak_fraction"] == pytest.approx(records[0]["achieved_flops"] / 1e11)


@pytest.mark.slow  # the fast tier starts no process and trains nothing
def test_cli_ablation_writes_its_table(tmp_path, capsys):
    code = main(
        [
            "bench",
            "--ablation",
            "--preset",
            "dey2018",
            "--filters",
            "2",
            "--batch",
            "2",
            "--repeats",
            "2",
            "--warmup",
            "0",
            "--accuracy-steps",
            "1",
            "--compile",
            "off",
            "--out",
            str(tmp_path),
            "--run-id",
            "abl",
        ]
    )
    out, err = capsys.readouterr()
    assert code == 0, err
    run = tmp_path / "abl"
    assert read_json(run / "run.json")["status"] == "complete"
    table = pd.read_csv(run / "tables" / "ablation.csv", index_col=0)
    assert table.index[0] == "eager_fp32" and table["speed-up"].iloc[0] == pytest.approx(1.0)
    assert len(read_records(run)) == len(table)
    assert "| eager_fp32 |" in out and "peak_flops" in read_json(run / "environment.json")
    if bf16_supported(CPU):
        # dey2018's depth 5 pools to 2: the known-bad CPU bf16 kernel; the run says so.
        bf16 = [r for r in read_records(run) if r["variant"] == "+bf16"][0]
        assert bf16["dtype"] == "bf16" and bf16["dtype_used"] == "fp32"
        assert "garbage" in bf16["switch_fallbacks"][0] and bf16["accuracy_ok"]


@pytest.mark.parametrize(
    "option", [["--dtype", "bf16"], ["--eager-fp32"], ["--memory-format", "contiguous"]]
)
def test_cli_ablation_refuses_switch_options_it_would_ignore(option, tmp_path, capsys):
    assert main(["bench", "--ablation", *option, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"drop {option[0]}" in err[0]
    assert not any(tmp_path.iterdir())


def test_cli_eager_fp32_conflicts_and_forced_switches_fail(tmp_path, capsys):
    assert main(["bench", "--eager-fp32", "--dtype", "bf16", "--out", str(tmp_path)]) == 2
    assert "--eager-fp32" in capsys.readouterr().err
    assert main(["bench", "--dtype", "fp16", "--out", str(tmp_path)]) == 2
    assert "--dtype fp16" in capsys.readouterr().err
    # Messages name the option users type (the field is `optimizer`, the option not).
    assert (
        main(["bench", "--eager-fp32", "--optimizer-impl", "foreach", "--out", str(tmp_path)]) == 2
    )
    assert "drop --optimizer-impl" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # bad input leaves nothing behind


@pytest.mark.parametrize("option", ["--ablation", "--loader"])
def test_single_process_measurements_refuse_a_launcher(option, tmp_path, capsys, monkeypatch):
    # Under torchrun every rank would measure and write its own run folder: refused, and
    # nothing is written.
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("LUNGBENCH_LAUNCHER", raising=False)
    assert main(["bench", option, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{option}: runs in one process; torchrun started 2" in err[0]
    assert list(tmp_path.iterdir()) == []


def test_a_compiled_variant_says_its_one_off_cost_and_when_it_pays_off():
    """Planted records: the compile is paid in the first steps; the gain is counted against
    the same switches without compile (else eager FP32); a slower compiled step never pays."""
    from lungbench.harness.ablation import ablation_table, attach_one_off_costs

    def record(variant, step_s, first_s, **switches):
        sw = {"dtype": "fp32", "memory_format": "contiguous", "optimizer": "default"}
        sw |= {"tf32": False, "cudnn_benchmark": False, "compile": "off"} | switches
        return {"variant": variant, "step_s_median": step_s, "first_steps_s": first_s, **sw}

    records = [
        record("eager_fp32", 0.030, 0.2),
        record("+bf16", 0.024, 0.2, dtype="bf16"),
        record("+compile-default", 0.022, 20.0, dtype="bf16", compile="default"),
        record("compile", 0.031, 12.0, compile="default"),  # a single: against eager
    ]
    attach_one_off_costs(records, first_steps=3)
    ladder, single = records[2], records[3]
    assert ladder["one_off_s"] == pytest.approx(20.0 - 3 * 0.022)
    assert (ladder["gain_against"], ladder["gain_per_step_s"]) == ("+bf16", pytest.approx(0.002))
    assert ladder["pays_off_after_steps"] == math.ceil((20.0 - 3 * 0.022) / 0.002)
    assert single["gain_against"] == "eager_fp32" and single["pays_off_after_steps"] is None
    assert "one_off_s" not in records[1], "only compiled variants have a one-off cost"
    for r in records:  # the table's other columns
        r |= {"added": "", "step_s_iqr": 0.001, "speedup": 1.0, "step_s_min": r["step_s_median"]}
        r |= {"speedup_best": 1.0, "speedup_round_median": 1.0, "speedup_round_iqr": 0.0}
        r |= {"samples_per_s": 1.0, "achieved_flops": 1e9, "loss_after_n": 0.5}
        r |= {"loss_delta": 0.0, "tolerance": 0.01, "accuracy_ok": True}
    words = ablation_table(records)["one-off s (compile)"]
    after = f"{ladder['pays_off_after_steps']:,}"
    assert words["+compile-default"] == f"19.9 (pays off after {after} steps vs +bf16)"
    assert words["compile"] == "11.9 (never pays off (no faster) vs eager_fp32)"
    assert words["eager_fp32"] == ""
