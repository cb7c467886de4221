"""The picture of a hyperparameter sweep: final metrics and training curves against the value."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .curves import log_series, read_log
from .smoothing import auto_window, moving_average

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.colors import Colormap, Normalize
    from matplotlib.figure import Figure

    from ..protocol.sweep import SweepResult

# Values spanning more than this ratio (two decades) get a logarithmic axis.
_LOG_SPAN = 100.0


def _mean_curve(run_dirs: Sequence[Path], log: str, column: str) -> tuple[np.ndarray, np.ndarray]:
    """A column of the runs' CSV logs averaged over the runs, on the steps all of them logged."""
    series = (log_series(read_log(run_dir / log), column) for run_dir in run_dirs)
    curves = [dict(zip(steps, values, strict=True)) for steps, values in series if steps]
    if not curves:
        return np.array([]), np.array([])
    steps = sorted(set.intersection(*(set(curve) for curve in curves)))
    values = np.mean([[curve[step] for step in steps] for curve in curves], axis=0)
    return np.array(steps), values


def _is_numeric(values: Sequence[Any]) -> bool:
    return all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)


def _metrics_panel(axis: Axes, result: SweepResult, positions: list[float], numeric: bool) -> None:
    from ..protocol.sweep import BEST_VALIDATION

    with_spread = len(result.seeds) > 1
    for metric in result.metrics():
        intervals = result.intervals(metric)
        means = [math.nan if i is None else i.mean for i in intervals]
        spreads = [math.nan if i is None else i.half_width for i in intervals]
        validation = metric == BEST_VALIDATION
        axis.errorbar(
            positions,
            means,
            yerr=spreads if with_spread else None,
            label=result.metric_label(metric),
            marker="s" if validation else "o",
            markersize=4,
            linewidth=1.2,
            capsize=3,
            # Categories have no order between them for a line to follow.
            linestyle=("--" if validation else "-") if numeric else "none",
        )
    spread = f"mean ± 95% CI over {len(result.seeds)} seeds" if with_spread else "one seed"
    axis.set_title(f"final metrics ({spread})", fontsize=10)
    axis.set_xlabel(result.key, fontsize=8)
    axis.set_ylabel("test classes (best checkpoint)", fontsize=8)
    axis.legend(fontsize=7)


# A value's curve: its index among the sweep's values, the steps and the seed-averaged values.
_Curve = tuple[int, np.ndarray, np.ndarray]


def _value_curves(result: SweepResult, log: str, column: str, window: int | None) -> list[_Curve]:
    """Each value's curve of a logged column, averaged over its seeds and smoothed over
    ``window`` points (None: chosen from the curve's length); values whose runs did not log
    the column are left out."""
    curves = []
    for index, value in enumerate(result.values):
        run_dirs = [run.run_dir for run in result.runs_of(value)]
        steps, values = _mean_curve(run_dirs, log, column)
        if len(steps):
            curves.append((index, steps, moving_average(values, window or auto_window(len(steps)))))
    return curves


def _colours(
    positions: list[float], log_axis: bool
) -> tuple[list[tuple[float, float, float, float]], Normalize, Colormap]:
    """Each value's colour along a sequential colormap, with the norm and map of its colour bar."""
    from matplotlib import colormaps
    from matplotlib.colors import LogNorm, Normalize

    cmap = colormaps["viridis"]
    norm = (LogNorm if log_axis else Normalize)(min(positions), max(positions))
    return [cmap(float(norm(position))) for position in positions], norm, cmap


def plot_sweep(
    result: SweepResult, path: str | Path | None = None, *, smoothing: int | None = None
) -> Path:
    """Plot a sweep: the final test metrics against the value, and each value's training-loss
    curve (and validation curve, when the runs were validated), averaged over the seeds.

    Numeric values lie on a numeric axis (logarithmic when they are positive and span more
    than two decades) and colour the curves along a colormap shown as a colour bar; other
    values are categories, named in the curves' legend.

    Args:
        result: The sweep (:func:`dmlkit.protocol.sweep.run_sweep` or ``load_sweep``).
        path: The PNG to write (its folder is created); ``<sweep folder>/sweep.png`` when None.
        smoothing: Moving-average window of the training-loss curves; None chooses one from
            the curve's length (:func:`dmlkit.viz.smoothing.auto_window`).

    Returns:
        The PNG's path.

    Raises:
        ValueError: ``smoothing`` below 1.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.cm import ScalarMappable

    if smoothing is not None and smoothing < 1:
        raise ValueError(f"smoothing must be a window of at least 1 point, got {smoothing}")
    numeric = _is_numeric(result.values)
    positive = numeric and all(value > 0 for value in result.values)
    log_axis = positive and max(result.values) / min(result.values) > _LOG_SPAN
    positions = [
        float(value) if numeric else float(index) for index, value in enumerate(result.values)
    ]
    colours, norm, cmap = _colours(positions, log_axis)

    selection = result.config.validation.metric
    panels = [
        ("training loss (mean over seeds, smoothed)", "train.csv", "loss", smoothing),
        (f"validation {selection} (mean over seeds)", "validation.csv", selection, 1),
    ]
    drawn = [
        (title, _value_curves(result, log, column, window)) for title, log, column, window in panels
    ]
    drawn = [(title, curves) for title, curves in drawn if curves]

    figure: Figure
    figure, axes = plt.subplots(
        1, 1 + len(drawn), figsize=(5.3 * (1 + len(drawn)), 4.2), squeeze=False
    )
    metrics_axis = axes[0][0]
    _metrics_panel(metrics_axis, result, positions, numeric)
    if log_axis:
        metrics_axis.set_xscale("log")
    if not numeric:
        metrics_axis.set_xticks(positions, result.labels(), rotation=30, ha="right")
    labels = result.labels()
    for axis, (title, curves) in zip(axes[0][1:], drawn, strict=True):
        for index, steps, values in curves:
            axis.plot(steps, values, color=colours[index], label=labels[index], linewidth=1.2)
        axis.set_title(title, fontsize=10)
        axis.set_xlabel("step", fontsize=8)
        if numeric:
            colour_bar = figure.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=axis)
            colour_bar.set_label(result.key, fontsize=8)
        else:
            axis.legend(fontsize=7, title=result.key, title_fontsize=7)
    for axis in axes[0]:
        axis.tick_params(labelsize=8)
        axis.grid(alpha=0.3)
    figure.suptitle(f"Sweep of {result.key}", fontsize=11)
    figure.tight_layout()
    path = Path(path) if path is not None else result.out / "sweep.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
