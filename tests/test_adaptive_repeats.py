"""Adaptive repeats (issue 15, item 3): time until the median is known to +-target, or a
repeat limit or time budget ends, and say which."""

from __future__ import annotations

import itertools
import json
import time

import pytest

from lungbench.cli import main
from lungbench.core.runs import read_records
from lungbench.experiments.speedup import ADAPTIVE_MIN_REPEATS, BenchRequest
from lungbench.measure.stats import median_ci, median_ci_relative
from lungbench.measure.timing import STEP, STOPS, StopRule, run_until


class FakeTimer:
    """A PhaseTimer whose steps take the given seconds (no clock involved)."""

    def __init__(self, seconds):
        self.seconds = iter(seconds)

    def start(self):
        pass

    def finish(self):
        return {STEP: next(self.seconds)}


def no_op(timer):
    pass


def test_the_median_interval_is_the_binomial_order_statistics():
    # Hand-worked: for n = 10 at 95%, P(X <= 1) = 11/1024 for X ~ Binomial(10, 1/2), so
    # [x(2), x(9)] covers 97.9% and [x(3), x(8)] only 89%; for n = 20, [x(6), x(15)].
    assert median_ci(list(range(1, 11))) == (2.0, 9.0)
    assert median_ci(list(range(1, 21))) == (6.0, 15.0)
    assert median_ci_relative(list(range(1, 11))) == pytest.approx((9 - 2) / 2 / 5.5)
    assert median_ci_relative([1.0, 1.0, 1.0]) != median_ci_relative([1.0, 1.0, 1.0])  # nan


def test_fixed_repeats_are_exact():
    samples, stop = run_until(no_op, FakeTimer(itertools.repeat(1.0)), warmup=2, repeats=7)
    assert len(samples[STEP]) == 7 and stop == "fixed"


def test_a_steady_step_stops_at_the_minimum_once_the_interval_is_narrow():
    rule = StopRule(ci_target=0.03)
    samples, stop = run_until(no_op, FakeTimer(itertools.repeat(0.01)), 1, 10, until=rule)
    assert len(samples[STEP]) == 10 and stop == "ci"


def test_a_noisy_step_goes_on_until_the_interval_is_narrow():
    # Alternating 1 and 2 s: the median's interval spans both until enough equal values
    # stand on each side; with a wide target it stops early, with a tight one at the limit.
    times = itertools.cycle([1.0, 2.0, 1.5])
    samples, stop = run_until(no_op, FakeTimer(times), 0, 6, until=StopRule(0.5, 80))
    assert stop == "ci" and 6 <= len(samples[STEP]) < 80
    samples, stop = run_until(no_op, FakeTimer(times), 0, 6, until=StopRule(0.001, 40))
    assert stop == "max" and len(samples[STEP]) == 40


def test_the_time_budget_ends_a_slow_noisy_measurement():
    def slow(timer):
        time.sleep(0.02)

    noisy = itertools.cycle([1.0, 3.0])
    samples, stop = run_until(slow, FakeTimer(noisy), 0, 3, until=StopRule(0.001, 1000, 0.2))
    assert stop == "budget" and 3 <= len(samples[STEP]) < 30
    assert set(STOPS) == {"fixed", "ci", "max", "budget"}


def test_bench_request_is_adaptive_by_default_and_exact_with_repeats():
    adaptive = BenchRequest().protocol()
    assert adaptive.ci_target == pytest.approx(0.03)
    assert adaptive.repeats == ADAPTIVE_MIN_REPEATS and adaptive.max_repeats == 100
    exact = BenchRequest(repeats=4).protocol()
    assert exact.ci_target is None and exact.repeats == 4


@pytest.mark.slow  # the fast tier starts no process and trains nothing
def test_bench_records_how_the_repeats_ended(tmp_path, capsys, tiny_store):
    common = ["bench", "--store", str(tiny_store), "--out", str(tmp_path), "--no-tune"]
    tiny = ["--preset", "dey2018", "--filters", "2", "--batch", "2", "--no-epoch"]
    assert main([*common, *tiny, "--run-id", "exact", "--repeats", "3"]) == 0
    (exact,) = read_records(tmp_path / "exact")
    assert exact["repeats_used"] == 3 and exact["repeats_stop"] == "fixed"
    assert exact["ci_target"] is None
    assert exact["page_faults_per_step"] >= 0  # the timed steps' median (core.allocator)
    budget = ["--ci-target", "0.01", "--max-repeats", "12", "--time-budget", "60"]
    assert main([*common, *tiny, "--run-id", "adaptive", *budget]) == 0
    out = capsys.readouterr().out
    (adaptive,) = read_records(tmp_path / "adaptive")
    assert adaptive["ci_target"] == pytest.approx(0.0001)
    assert adaptive["repeats_stop"] in ("ci", "max")
    assert ADAPTIVE_MIN_REPEATS <= adaptive["repeats_used"] <= 12
    low, high = adaptive["step_s_ci_low"], adaptive["step_s_ci_high"]
    assert low <= adaptive["step_s_median"] <= high
    if adaptive["repeats_stop"] == "max":  # a +-0.01% interval is rarely reached: said so
        assert "less certain than asked" in out and "stopped by the repeat limit" in out
    assert json.loads(out.strip().splitlines()[-1])["failed"] == 0
    # --time-budget ends a real run: a +-0.001% interval and 100000 steps cannot be had in 1 s
    ended = ["--ci-target", "0.001", "--max-repeats", "100000", "--time-budget", "1"]
    assert main([*common, *tiny, "--run-id", "budget", *ended]) == 0
    (budget,) = read_records(tmp_path / "budget")
    assert budget["repeats_stop"] == "budget"
    assert ADAPTIVE_MIN_REPEATS <= budget["repeats_used"] < 100000
