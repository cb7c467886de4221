"""Smoothing of noisy per-step curves (training losses, mined-pair counts) for plots."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# A curve gets about one window per this many points (see auto_window).
_POINTS_PER_WINDOW = 25


def moving_average(values: Sequence[float] | np.ndarray, window: int) -> np.ndarray:
    """Centred moving average whose edges follow the curve's trend, skipping non-finite values.

    Away from the edges, point i averages the values at ``i - (window - 1) // 2`` to
    ``i + window // 2``. Near an edge the window shrinks symmetrically, to as many points on each
    side as the nearer edge leaves (the first and last points are their own average). A plain
    convolution would pad with zeros and drag both ends towards 0; a window cut on one side only
    would bias the ends towards the interior, flattening the steep start of a loss curve. With
    the symmetric shrink and an odd window a linear series is unchanged everywhere (an even
    window centres half a step to the right, except near the edges). Non-finite values are left
    out:
    each point is the sum of its window's finite values divided by their count.

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
    to_edge = np.minimum(positions, series.size - 1 - positions)
    first = positions - np.minimum((window - 1) // 2, to_edge)
    stop = positions + np.minimum(window // 2, to_edge) + 1
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
