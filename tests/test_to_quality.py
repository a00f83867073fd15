"""`lungbench bench --to-quality`: interleaving, the MLPerf-style table, and bad input."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest

from lungbench.core.errors import UsageError
from lungbench.experiments import to_quality
from lungbench.experiments.to_quality import (
    QualityRequest,
    interleaved,
    olympic_mean,
    quality_table,
)


def test_interleaved_alternates_which_variant_runs_first():
    order = interleaved(["a", "b"], [0, 1, 2])
    assert order == [("a", 0), ("b", 0), ("b", 1), ("a", 1), ("a", 2), ("b", 2)]


def test_olympic_mean_drops_the_fastest_and_the_slowest():
    assert olympic_mean([1.0, 2.0, 3.0, 100.0]) == 2.5
    assert olympic_mean([4.0, 6.0]) == 5.0
    assert math.isnan(olympic_mean([]))


def _rec(variant, seed, wall, reached=True, epochs=3, samples=48):
    return {
        "variant": variant,
        "seed": seed,
        "target": "loss<=0.67",
        "reached": reached,
        "wall_s": wall,
        "epochs": epochs,
        "samples": samples,
    }


def test_quality_table_reports_median_spread_and_speedup_over_reached_runs():
    records = [
        _rec("eager_fp32", 0, 10.0),
        _rec("tuned", 0, 6.0),
        _rec("tuned", 1, 4.0, epochs=2, samples=32),
        _rec("eager_fp32", 1, 14.0),
        _rec("eager_fp32", 2, 12.0),
        _rec("tuned", 2, 99.0, reached=False, epochs=15, samples=240),
    ]
    t = quality_table(records)
    assert list(t.index) == ["eager_fp32", "tuned"]
    eager, tuned = t.loc["eager_fp32"], t.loc["tuned"]
    assert (eager["runs"], eager["reached"], eager["median s"]) == (3, 3, 12.0)
    assert (eager["min s"], eager["max s"], eager["olympic mean s"]) == (10.0, 14.0, 12.0)
    # the run that did not reach the target is counted, not timed
    assert (tuned["runs"], tuned["reached"], tuned["median s"]) == (3, 2, 5.0)
    assert tuned["median epochs"] == 2.5 and tuned["median samples"] == 40.0
    assert tuned["speed-up to quality"] == pytest.approx(12.0 / 5.0)
    # paired per seed, over the seeds both reached: 10/6 and 14/4
    assert tuned["paired speed-up (median, min-max)"] == "2.583 (1.667-3.500, 2 seeds)"
    assert eager["paired speed-up (median, min-max)"] == "1.000 (1.000-1.000, 3 seeds)"


def test_request_check_refuses_bad_values():
    with pytest.raises(UsageError, match="auc, accuracy, loss"):
        QualityRequest(target="speed=1").check()
    with pytest.raises(UsageError, match="--quality-seeds"):
        QualityRequest(seeds=0).check()


@pytest.mark.slow
@pytest.mark.parametrize(
    "args, says",
    [
        (["--target", "f1=0.9"], "auc, accuracy, loss"),
        (["--quality-seeds", "0"], "--quality-seeds"),
    ],
)
def test_cli_bad_input_is_one_line_exit_2(args, says, tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "lungbench", "bench", "--to-quality", "--out", str(tmp_path), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert says in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert not any(tmp_path.iterdir())  # nothing written


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_run_to_quality_end_to_end_with_a_planted_tuning(tmp_path, monkeypatch):
    from lungbench.switches import Switches

    # the tuning pass is lungbench.harness.tuning's (tested there); here a planted choice
    monkeypatch.setattr(
        to_quality,
        "tuned_switches",
        lambda request, shapes: (Switches(), {"tuning_choice": "planted"}),
    )
    request = QualityRequest(
        target="loss=100", seeds=2, max_epochs=2, filters=2, synth_n=12, out=tmp_path
    )
    done = to_quality.run_to_quality(request)
    assert [(r["variant"], r["seed"]) for r in done.records] == interleaved(
        to_quality.VARIANTS, [0, 1]
    )
    assert all(r["reached"] and r["epochs"] == 1 for r in done.records)
    assert done.records[1]["tuning_choice"] == "planted"
    assert (done.run_dir / "tables" / "time_to_quality.csv").exists()
    assert (done.run_dir / "fits" / "tuned-seed1" / "mlperf.log").exists()
    assert list(done.table["reached"]) == [2, 2]


def test_the_tuning_pass_measures_the_model_that_is_trained(monkeypatch):
    """Depth, filters, batch and threads of the trained model reach the tuner (not the
    bench's depth-4 default), and each run builds its model from the same description."""
    from lungbench.harness import tuning
    from lungbench.switches import Switches

    seen = []

    def planted(workload, device, options, shapes):
        seen.append((workload, shapes))
        return tuning.Tuning("planted", Switches(), "measured", (), "")

    monkeypatch.setattr(tuning, "tune", planted)
    request = QualityRequest(filters=2, depth=3, batch_size=4, threads=1, preset="dey2018")
    to_quality.tuned_switches(request, [(1, 5, 50, 50)] * 2)
    ((workload, shapes),) = seen
    assert (workload.depth, workload.filters, workload.batch_size, workload.threads) == (3, 2, 4, 1)
    assert shapes == [(1, 5, 50, 50)] * 2
    assert to_quality.trained_workload(request).model_kwargs()["depth"] == 3
