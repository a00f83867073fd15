"""Layer 6 (measure): Summary statistics of repeated timings: small, pure and checked by hand in tests.

Percentiles use linear interpolation between order statistics (numpy's default, "type 7"),
so for samples [1, 2, 3, 4] the median is 2.5, Q1 1.75, Q3 3.25, IQR 1.5 and p90 3.7.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

# A spread above this (IQR / median) makes the measurement noisy enough to warn about.
NOISY_IQR_FRACTION = 0.10


@dataclass(frozen=True)
class Stats:
    """Summary of n samples (same unit as the samples)."""

    n: int
    mean: float
    std: float  # sample standard deviation (ddof=1); 0 for n == 1
    min: float
    max: float
    median: float
    q1: float
    q3: float
    iqr: float
    p90: float
    p95: float

    @property
    def relative_iqr(self) -> float:
        """IQR as a fraction of the median (0 when the median is 0)."""
        return self.iqr / self.median if self.median else 0.0

    @property
    def noisy(self) -> bool:
        return self.relative_iqr > NOISY_IQR_FRACTION

    def scaled(self, factor: float) -> Stats:
        """The same statistics in another unit (e.g. seconds -> milliseconds)."""
        values = {k: (v * factor if k != "n" else v) for k, v in asdict(self).items()}
        return Stats(**values)

    def as_dict(self, prefix: str = "") -> dict[str, float]:
        return {f"{prefix}{k}": v for k, v in asdict(self).items()}


def summarize(samples: Sequence[float]) -> Stats:
    """Statistics of `samples`; ValueError on an empty sequence or a non-finite value."""
    x = np.asarray(samples, dtype=np.float64)
    if x.size == 0:
        raise ValueError("cannot summarize zero samples")
    if not np.all(np.isfinite(x)):
        raise ValueError("samples contain NaN or Inf")
    q1, median, q3, p90, p95 = np.percentile(x, [25, 50, 75, 90, 95])
    return Stats(
        n=int(x.size),
        mean=float(x.mean()),
        std=float(x.std(ddof=1)) if x.size > 1 else 0.0,
        min=float(x.min()),
        max=float(x.max()),
        median=float(median),
        q1=float(q1),
        q3=float(q3),
        iqr=float(q3 - q1),
        p90=float(p90),
        p95=float(p95),
    )


CONFIDENCE = 0.95


def median_ci(samples: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float]:
    """The distribution-free confidence interval of the median (order statistics, by
    scipy.stats.quantile_test): (nan, nan) when there are too few samples for it (< 6 at 95%)."""
    from scipy.stats import quantile_test

    x = np.asarray(samples, dtype=np.float64)
    if x.size < 2:
        return math.nan, math.nan
    ci = quantile_test(x, q=float(np.median(x)), p=0.5).confidence_interval(confidence)
    return float(ci.low), float(ci.high)


def median_ci_relative(samples: Sequence[float], confidence: float = CONFIDENCE) -> float:
    """Half the width of the median's confidence interval over the median (0.03 = +-3%);
    nan with too few samples."""
    low, high = median_ci(samples, confidence)
    median = float(np.median(np.asarray(samples, dtype=np.float64)))
    if math.isnan(low) or math.isnan(high) or median <= 0:
        return math.nan
    return (high - low) / 2 / median


def ratio_of_medians(a: Sequence[float], b: Sequence[float]) -> float:
    """median(b) / median(a): > 1 means b is slower than a."""
    return float(np.median(np.asarray(b)) / np.median(np.asarray(a)))


def format_seconds(seconds: float) -> str:
    """Human-readable duration: 812 us, 12.3 ms, 1.53 s, 2.1 min."""
    if math.isnan(seconds):
        return "n/a"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} us"
    if seconds < 1.0:
        return f"{seconds * 1e3:.1f} ms"
    if seconds < 120:
        return f"{seconds:.2f} s"
    return f"{seconds / 60:.1f} min"
