"""Smoothing of noisy per-step curves (training losses, mined-pair counts) for plots."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# A curve gets about one window per this many points (see auto_window).
_POINTS_PER_WINDOW = 25


def moving_average(values: Sequence[float] | np.ndarray, window: int) -> np.ndarray:
    """Centred moving average that stays unbiased at the edges and skips non-finite values.

    Point i averages the values at ``i - (window - 1) // 2`` to ``i + window // 2`` that lie
    inside the series and are finite: a normalised convolution, the sum of those values divided
    by their count. Near the edges the window is therefore shorter rather than padded with
    zeros, so a constant series stays constant to its ends and a linear one is unchanged
    wherever the whole window fits.

    Args:
        values: A 1-D series.
        window: Number of points averaged, at least 1; it may exceed the series' length.

    Returns:
        A float64 array of the series' length. A point whose window holds no finite value is
        NaN; ``window=1`` returns the values unchanged.

    Raises:
        ValueError: ``window`` is not an integer of at least 1, or ``values`` is not 1-D.
    """
    if isinstance(window, bool) or not isinstance(window, int | np.integer) or window < 1:
        raise ValueError(f"window must be an integer of at least 1, got {window!r}")
    series = np.array(values, dtype=np.float64)
    if series.ndim != 1:
        raise ValueError(f"values must be 1-D, got {series.ndim}-D shape {series.shape}")
    if window == 1 or series.size == 0:
        return series
    finite = np.isfinite(series)
    if not finite.any():
        return np.full_like(series, np.nan)
    # Differences of cumulative sums lose the precision of a large common offset; summing
    # deviations from the median instead keeps a constant series exactly constant.
    centre = float(np.median(series[finite]))
    deviations = np.where(finite, series - centre, 0.0)
    sums = np.concatenate(([0.0], np.cumsum(deviations)))
    counts = np.concatenate(([0], np.cumsum(finite)))
    positions = np.arange(series.size)
    first = np.clip(positions - (window - 1) // 2, 0, series.size)
    stop = np.clip(positions + window // 2 + 1, 0, series.size)
    window_sums = sums[stop] - sums[first]
    window_counts = counts[stop] - counts[first]
    averaged = np.full_like(series, np.nan)
    has_values = window_counts > 0
    averaged[has_values] = centre + window_sums[has_values] / window_counts[has_values]
    return averaged


def auto_window(n: int) -> int:
    """The default moving-average window for a curve of ``n`` points.

    The rule: ``n // 25``, raised to the next odd number (so the window is centred on its
    point), and at least 1. Curves of fewer than 50 points are drawn raw (window 1); 100 points
    get 5, 1,000 points get 41.

    Args:
        n: Number of points in the curve, at least 0.

    Returns:
        An odd window of at least 1.

    Raises:
        ValueError: ``n`` is negative.
    """
    if n < 0:
        raise ValueError(f"n must be a number of points (at least 0), got {n}")
    return (n // _POINTS_PER_WINDOW) | 1
