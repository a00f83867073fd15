"""Statistics against hand-worked numbers (numpy's linear-interpolation percentiles)."""

from __future__ import annotations

import math

import pytest

from lungbench.measure.stats import format_seconds, ratio_of_medians, summarize


def test_four_samples_by_hand():
    # sorted [1, 2, 3, 4]: position p*(n-1): q1 at 0.75 -> 1.75; q3 at 2.25 -> 3.25;
    # p90 at 2.7 -> 3.7; p95 at 2.85 -> 3.85; std = sqrt(((1.5^2+0.5^2)*2)/3) = sqrt(5/3)
    s = summarize([4, 1, 3, 2])
    assert (s.n, s.min, s.max, s.mean, s.median) == (4, 1, 4, 2.5, 2.5)
    assert s.q1 == pytest.approx(1.75)
    assert s.q3 == pytest.approx(3.25)
    assert s.iqr == pytest.approx(1.5)
    assert s.p90 == pytest.approx(3.7)
    assert s.p95 == pytest.approx(3.85)
    assert s.std == pytest.approx(math.sqrt(5 / 3))


def test_odd_count_and_outlier():
    # sorted [10, 10, 11, 12, 100]: median 11; q1 = 10 (pos 1); q3 = 12 (pos 3);
    # p90 at pos 3.6 -> 12 + 0.6 * 88 = 64.8; the mean is dragged to 28.6, the median is not.
    s = summarize([10, 12, 11, 100, 10])
    assert s.median == 11
    assert (s.q1, s.q3, s.iqr) == (10, 12, 2)
    assert s.p90 == pytest.approx(64.8)
    assert s.mean == pytest.approx(28.6)
    assert s.relative_iqr == pytest.approx(2 / 11)
    assert s.noisy


def test_single_sample_and_scaling():
    s = summarize([0.002])
    assert s.std == 0 and s.iqr == 0 and not s.noisy
    ms = s.scaled(1e3)
    assert ms.median == pytest.approx(2.0) and ms.n == 1


@pytest.mark.parametrize("bad", [[], [1.0, float("nan")], [float("inf")]])
def test_rejects_bad_samples(bad):
    with pytest.raises(ValueError):
        summarize(bad)


def test_ratio_and_format():
    assert ratio_of_medians([1, 2, 3], [2, 4, 6]) == 2.0
    assert format_seconds(0.0123) == "12.3 ms"
    assert format_seconds(1.5) == "1.50 s"
    assert format_seconds(5e-4) == "500 us"
