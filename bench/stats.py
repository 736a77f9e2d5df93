"""Numbers from samples: percentiles of one run, and the spread of repeated runs.

A run gives samples (call times, rates); its figure is a percentile of them.
A row of the table gives the median of that figure over repeated runs, with
the lowest and the highest, so that one noisy run on a shared machine shows
as a wide spread instead of passing for the truth.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any


def percentile(values: Sequence[float], fraction: float) -> float:
    """The `fraction` quantile (0..1), interpolating between the closest ranks."""
    if not values:
        return math.nan
    ordered = sorted(values)
    position = fraction * (len(ordered) - 1)
    below = math.floor(position)
    above = min(below + 1, len(ordered) - 1)
    weight = position - below
    return ordered[below] * (1 - weight) + ordered[above] * weight


def summarize(samples: Sequence[float]) -> dict[str, float]:
    """Count, mean and the usual percentiles of one run's samples."""
    if not samples:
        return {"n": 0}
    return {
        "n": len(samples),
        "mean": statistics.fmean(samples),
        "min": min(samples),
        "p50": percentile(samples, 0.50),
        "p90": percentile(samples, 0.90),
        "p99": percentile(samples, 0.99),
        "max": max(samples),
    }


@dataclass(frozen=True)
class Spread:
    """One figure over repeated runs: the median, the lowest, the highest."""

    median: float
    low: float
    high: float
    runs: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        finite = [value for value in values if not math.isnan(value)]
        if not finite:
            return cls(math.nan, math.nan, math.nan, 0)
        return cls(statistics.median(finite), min(finite), max(finite), len(finite))

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)
