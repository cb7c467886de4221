"""Confidence intervals of repeated measurements."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from scipy import stats as scipy_stats


@dataclass(frozen=True)
class Interval:
    """A mean with the half-width of its confidence interval.

    Attributes:
        mean: The sample mean.
        half_width: ``t · s / √n``; NaN for fewer than two values (no spread to estimate).
        n: Number of values.
    """

    mean: float
    half_width: float
    n: int

    def __str__(self) -> str:
        if math.isnan(self.half_width):
            return f"{self.mean:.4f}"
        return f"{self.mean:.4f} ± {self.half_width:.4f}"


def confidence_interval(values: Sequence[float], level: float = 0.95) -> Interval:
    """The Student-t confidence interval of the mean of independent measurements.

    Args:
        values: The measurements (for example one test metric per re-run); at least one.
        level: Coverage of the interval, in (0, 1).

    Returns:
        The mean and half-width: the interval is ``mean ± half_width``.

    Raises:
        ValueError: No values, a non-finite value, or a level outside (0, 1).
    """
    if not values:
        raise ValueError("confidence_interval needs at least one value")
    if not all(math.isfinite(value) for value in values):
        raise ValueError(f"confidence_interval: non-finite value in {list(values)}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    mean = statistics.fmean(values)
    if len(values) < 2:
        return Interval(mean, math.nan, 1)
    t = float(scipy_stats.t.ppf(0.5 + level / 2, len(values) - 1))
    return Interval(mean, t * statistics.stdev(values) / math.sqrt(len(values)), len(values))
