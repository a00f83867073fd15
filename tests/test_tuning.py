"""The tuning pass: "auto" switches chosen by measurement on the device where the run happens."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from torch import nn

from lungbench.cli import main
from lungbench.core.cache import VERSION, cache_dir, write_cache
from lungbench.core.runs import read_records
from lungbench.harness import tuning
from lungbench.harness.tuning import TuningOptions, candidates, combine, pick, tune
from lungbench.measure.workload import Workload
from lungbench.switches import eager_fp32

CPU = torch.device("cpu")
TINY = Workload(preset="dey2018", filters=2, batch_size=2)


def _record(name, ms, ok=True, **switches):
    """An ablation record of `ms` per step in each of 5 rounds."""
    record = {"variant": name, "step_s_median": ms / 1e3, "accuracy_ok": ok, "loss_delta": 0.0}
    record["samples_s"] = {"step": [ms / 1e3] * 5}
    base = {**vars(eager_fp32()), **switches}
    record.update({f"{k}_used": v for k, v in base.items()})
    return record


def test_pick_takes_the_fastest_accurate_candidate():
    eager, slow = _record("eager_fp32", 30), _record("+slow", 60)  # planted: made slow
    fast_wrong = _record("+bf16", 10, ok=False, dtype="bf16")  # fastest, fails its check
    fast = _record("+foreach", 25, optimizer="foreach")
    assert pick([eager, slow])["variant"] == "eager_fp32"
    assert pick([eager, slow, fast_wrong, fast])["variant"] == "+foreach"
    assert pick([eager, fast_wrong])["variant"] == "eager_fp32"  # never a failed check


def _rounds(name, ms_per_round, **switches):
    """A record with its per-round step times (ms), as the ablation keeps them."""
    record = _record(name, sorted(ms_per_round)[len(ms_per_round) // 2], **switches)
    record["samples_s"] = {"step": [ms / 1e3 for ms in ms_per_round]}
    return record


def test_a_gain_within_the_noise_or_in_too_few_rounds_keeps_eager():
    eager = _rounds("eager_fp32", [30, 31, 29, 30, 32])
    slight = _rounds("+foreach", [29.5, 30.5, 28.6, 29.5, 31.5], optimizer="foreach")  # 1-2%
    lucky = _rounds("+fused", [25, 25, 31, 31, 25], optimizer="fused")  # 3 of 5 rounds
    clear = _rounds("+channels_last_3d", [27, 28, 28, 27, 29], memory_format="channels_last")
    assert pick([eager, slight])["variant"] == "eager_fp32"
    assert pick([eager, lucky])["variant"] == "eager_fp32"
    assert pick([eager, slight, lucky, clear])["variant"] == "+channels_last_3d"
    # the margin is what the rule says: just under it fails, at it passes
    at = _rounds("+at", [30 / (1 + tuning.MIN_GAIN)] * 5)
    under = _rounds("+under", [30 / (1 + 0.9 * tuning.MIN_GAIN)] * 5)
    flat = _rounds("eager_fp32", [30] * 5)
    assert tuning.clear_gain(at, flat) and not tuning.clear_gain(under, flat)


def test_a_single_winner_must_win_again_in_a_second_pass(monkeypatch):
    passes = []

    def planted(config, variants, label="ablation"):
        passes.append([v.name for v in variants])
        second = len(passes) == 2  # foreach's first-pass gain does not show again
        times = {"eager_fp32": 30, "+foreach": 30.2 if second else 27}
        return [
            _rounds(v.name, [times.get(v.name, 40)] * 5, optimizer=v.switches.optimizer)
            for v in variants
        ]

    monkeypatch.setattr(tuning, "run_ablation", planted)
    monkeypatch.setattr(tuning, "bf16_supported", lambda device: False)
    monkeypatch.setattr(tuning, "adam_implementations", lambda device: ("foreach",))
    chosen = tune(replace(TINY, filters=5), CPU)
    assert passes[1] == ["eager_fp32", "+foreach"]  # eager and the one winner, again
    assert chosen.choice == "eager_fp32" and chosen.switches == eager_fp32()
    assert [r["pass"] for r in chosen.alternatives].count(2) == 2


def test_tune_chooses_by_measurement_combines_winners_and_caches(monkeypatch):
    passes = []

    def planted(config, variants, label="ablation"):
        # bf16, foreach and fused Adam each beat eager; foreach beats fused (one Adam is
        # combined: the faster); foreach + bf16 are fastest; channels_last is slow
        times = {
            "eager_fp32": 30,
            "+channels_last_3d": 45,
            "+foreach": 28,
            "+fused": 29,
            "+bf16": 24,
        }
        passes.append([v.name for v in variants])
        out = []
        for v in variants:
            ms = times.get(v.name, 20)  # the combination
            out.append(
                _record(
                    v.name,
                    ms,
                    **{k: getattr(v.switches, k) for k in ("dtype", "optimizer", "memory_format")},
                )
            )
        return out

    monkeypatch.setattr(tuning, "run_ablation", planted)
    monkeypatch.setattr(tuning, "bf16_supported", lambda device: True)
    monkeypatch.setattr(tuning, "adam_implementations", lambda device: ("foreach", "fused"))
    workload = Workload(preset="dey2018", filters=3, batch_size=3)
    first = tune(workload, CPU)
    assert first.source == "measured" and first.choice == "+foreach+bf16"
    assert (first.switches.dtype, first.switches.optimizer) == ("bf16", "foreach")
    assert len(passes) == 2 and passes[1] == ["eager_fp32", "+bf16", "+foreach+bf16"]
    names = [r["name"] for r in first.alternatives]
    assert {"eager_fp32", "+channels_last_3d", "+foreach", "+fused", "+bf16"} <= set(names)
    assert "+foreach+bf16" in names
    again = tune(workload, CPU)
    assert again.source == "cache" and again.switches == first.switches and len(passes) == 2
    retuned = tune(workload, CPU, TuningOptions(retune=True))
    assert retuned.source == "measured" and len(passes) == 4


def test_a_corrupt_cache_is_replaced_not_fatal(caplog):
    path = cache_dir() / "tuning.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("{not json")
    result = tune(TINY, CPU, TuningOptions(rounds=2, accuracy_steps=2))
    assert result.source == "measured"
    assert "unreadable" in caplog.text
    assert json.loads(path.read_text())["version"] == VERSION


def test_a_choice_made_with_another_torch_is_not_used(caplog):
    import logging

    caplog.set_level(logging.INFO, logger="lungbench")
    key = tuning.cache_key(TINY, CPU)
    host, where, _, rest = key.split("|", 3)
    other = f"{host}|{where}|torch 0.0.1|{rest}"
    entry = {"choice": "+bf16", "switches": vars(eager_fp32()), "alternatives": []}
    write_cache(tuning.CACHE_FILE, {other: entry})
    result = tune(Workload(preset="dey2018", filters=2, batch_size=2), CPU, TuningOptions(rounds=2))
    assert result.source == "measured"
    assert "tuned here with torch 0.0.1" in caplog.text


def test_candidates_start_with_eager_and_differ_by_one_switch():
    found = candidates(CPU, 5)
    assert found[0].name == "eager_fp32" and found[0].switches == eager_fp32()
    for variant in found[1:]:
        changed = [k for k, v in vars(variant.switches).items() if v != getattr(eager_fp32(), k)]
        assert len(changed) == 1, variant.name
    both = combine(found[1:3])
    assert both.name == f"+{found[1].name[1:]}+{found[2].name[1:]}"


@pytest.mark.parametrize("extra", [[], ["--no-tune"]])
def test_bench_records_say_how_auto_was_chosen(tmp_path, capsys, tiny_store, extra):
    argv = ["bench", "--preset", "dey2018", "--filters", "2", "--batch", "2", "--repeats", "2"]
    argv += ["--no-epoch", "--store", str(tiny_store), "--out", str(tmp_path), "--run-id", "t"]
    assert main([*argv, *extra]) == 0
    (record,) = read_records(tmp_path / "t")
    if extra:
        assert record["tuning_source"] == "table"
    else:
        assert record["tuning_source"] in ("measured", "cache")
        assert record["tuning_alternatives"][0]["name"] == "eager_fp32"
        chosen = {r["name"]: r for r in record["tuning_alternatives"]}[record["tuning_choice"]]
        assert chosen["accuracy_ok"]
        # never slower than eager: against its own eager alternative of the deciding pass
        (eager,) = [r for r in record["tuning_alternatives"]
                    if r["name"] == "eager_fp32" and r["pass"] == chosen["pass"]]  # fmt: skip
        assert chosen["step_ms"] <= eager["step_ms"] and chosen["speedup_vs_eager"] >= 1.0


def test_no_tune_with_retune_is_a_usage_error(tmp_path, capsys):
    assert main(["bench", "--no-tune", "--retune", "--out", str(tmp_path)]) == 2
    assert "--no-tune skips the tuning pass; drop --retune" in capsys.readouterr().err


def test_the_key_names_the_workloads_threads_not_the_callers():
    """A launcher's rank (torchrun sets one thread) looks up what a 1-process pass at the
    same workload threads cached, whatever threads the caller runs."""
    one = Workload(preset="dey2018", filters=2, batch_size=2, threads=1)
    keys = set()
    for running in (1, 2):
        torch.set_num_threads(running)
        keys.add(tuning.cache_key(one, CPU))
    assert len(keys) == 1 and "x1|" in keys.pop()
    assert tuning.cache_key(replace(one, threads=2), CPU) != tuning.cache_key(one, CPU)


def test_a_depth_is_tuned_on_its_own_model_and_cached_under_its_own_key(monkeypatch):
    """bench --to-quality trains depth 3: its choice is measured on that model (the
    ablation's runners build it) and never taken for the bench's default depth."""
    built = []

    def planted(config, variants, label="ablation"):
        convs = [m for m in config.workload.build_model(CPU).modules() if isinstance(m, nn.Conv3d)]
        built.append(len(convs))
        return [_record(v.name, 30 if v.name == "eager_fp32" else 40) for v in variants]

    monkeypatch.setattr(tuning, "run_ablation", planted)
    three = replace(TINY, depth=3)
    tune(three, CPU)
    assert built == [2 * 3]  # two paths of three conv levels
    assert tuning.cache_key(three, CPU) != tuning.cache_key(TINY, CPU)
    assert "|f2|d3|b2|" in tuning.cache_key(three, CPU)
    assert "|d" not in tuning.cache_key(TINY, CPU).split("|f2", 1)[1]  # the default: as before
    with pytest.raises(ValueError, match="takes no depth"):
        replace(TINY, model="resnet18", depth=3).model_kwargs()
