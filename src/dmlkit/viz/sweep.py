"""The picture of a hyperparameter sweep: final metrics and training curves against the value."""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..display import metric_label
from .curves import log_series, read_log
from .smoothing import auto_window, moving_average

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.colors import Colormap, Normalize
    from matplotlib.figure import Figure

    from ..protocol.sweep_results import SweepResult

# Values spanning this ratio (two decades: 1e-4, 1e-3, 1e-2) or more get a logarithmic axis.
_LOG_SPAN = 100.0
# Curves spanning more than this factor get a log axis.
_LOSS_LOG_SPAN = 1e3
# The metric whose value before training marks, in the final-metrics panel, an untrained network.
_UNTRAINED_METRIC = "mean_average_precision_at_r"
# How far the final-metrics axis may reach beyond [0, 1], so that points at 0 or 1 show whole.
_METRIC_MARGIN = 0.03
# Characters per line of a note drawn in a panel (a panel is about 5 inches wide).
_NOTE_WIDTH = 55


def _mean_curve(run_dirs: Sequence[Path], log: str, column: str) -> tuple[np.ndarray, np.ndarray]:
    """A column of the runs' CSV logs averaged over the runs, on the steps all of them logged."""
    series = (log_series(read_log(run_dir / log), column) for run_dir in run_dirs)
    curves = [dict(zip(steps, values, strict=True)) for steps, values in series if steps]
    if not curves:
        return np.array([]), np.array([])
    steps = sorted(set.intersection(*(set(curve) for curve in curves)))
    values = np.mean([[curve[step] for step in steps] for curve in curves], axis=0)
    return np.array(steps), values


def _note_text(lines: Sequence[str]) -> str:
    return "\n".join(textwrap.fill(line, _NOTE_WIDTH) for line in lines)


def _note(axis: Axes, lines: Sequence[str], *, empty: bool) -> None:
    """Say in the panel what it does not show (a curve or point that is silently missing reads
    as a value that was never swept): centred in a panel left empty, else in its lower left
    corner. A panel with a legend says it in the legend's title instead, where it cannot hide
    behind the legend."""
    x, y, horizontal, vertical = (
        (0.5, 0.5, "center", "center") if empty else (0.02, 0.02, "left", "bottom")
    )
    axis.text(
        x,
        y,
        _note_text(lines),
        transform=axis.transAxes,
        ha=horizontal,
        va=vertical,
        fontsize=8 if empty else 7,
        color="dimgray",
        bbox={"facecolor": "white", "edgecolor": "lightgray", "alpha": 0.9},
    )
    if empty:
        axis.set_xticks([])
        axis.set_yticks([])


def _plotted_metrics(result: SweepResult) -> list[str]:
    """The final-metrics panel's metrics: Recall@1 equals P@1 by definition, so beside it its
    line would hide exactly behind P@1's."""
    metrics = result.metrics()
    if "precision_at_1" in metrics:
        return [metric for metric in metrics if metric != "recall_at_1"]
    return metrics


def _metrics_panel(
    axis: Axes, result: SweepResult, positions: list[float], order: list[int], numeric: bool
) -> None:
    from ..protocol.sweep_results import BEST_VALIDATION

    with_spread = len(result.seeds) > 1
    labels = result.labels()
    undrawn: dict[int, None] = {}
    for metric in _plotted_metrics(result):
        per_value = result.intervals(metric)
        intervals = [per_value[index] for index in order]
        means = [math.nan if i is None else i.mean for i in intervals]
        spreads = [math.nan if i is None else i.half_width for i in intervals]
        undrawn.update(
            dict.fromkeys(
                index for index, mean in zip(order, means, strict=True) if math.isnan(mean)
            )
        )
        validation = metric == BEST_VALIDATION
        axis.errorbar(
            [positions[index] for index in order],
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
    before = [(run.summary.get("before") or {}).get(_UNTRAINED_METRIC) for run in result.runs]
    untrained = [float(v) for v in before if isinstance(v, float) and math.isfinite(v)]
    if untrained and len(untrained) == len(before):
        # Where a value leaves the network untrained (a loss that is zero from the start), its
        # metrics sit on this line.
        axis.axhline(
            float(np.mean(untrained)),
            color="0.4",
            linestyle=":",
            linewidth=1.2,
            label=f"{metric_label(_UNTRAINED_METRIC)} before training",
        )
    # Every metric lies in [0, 1]; the interval of two seeds (t = 12.7) can reach far beyond and
    # would squash the means into a sliver of the panel.
    low, high = axis.get_ylim()
    axis.set_ylim(max(low, -_METRIC_MARGIN), min(high, 1 + _METRIC_MARGIN))
    spread = f"mean ± 95% CI over {len(result.seeds)} seeds" if with_spread else "one seed"
    axis.set_title(f"final metrics ({spread})", fontsize=10)
    axis.set_xlabel(result.key, fontsize=8)
    axis.set_ylabel(textwrap.fill(f"test classes, {result.tested_model()}", 45), fontsize=8)
    note = None
    if undrawn:
        missing = ", ".join(labels[index] for index in sorted(undrawn))
        note = _note_text([f"not drawn for {missing}: a metric missing or not finite"])
    axis.legend(fontsize=7, title=note, title_fontsize=7)


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


def _why_no_curve(result: SweepResult, value: Any, log: str, column: str) -> str:
    """Why a value's runs give no curve of a logged column."""
    runs = result.runs_of(value)
    if not all(run.run_dir.is_dir() for run in runs):
        return "run folders missing"
    if log == "validation.csv" and all(run.summary.get("best_step") is None for run in runs):
        return "not validated"
    logs = [read_log(run.run_dir / log) for run in runs]
    if not any(logs):
        steps = max((run.summary.get("steps", 0) for run in runs), default=0)
        log_every = value if result.key == "logging.log_every" else result.config.logging.log_every
        if log == "train.csv" and log_every > steps:
            return (
                f"no training log rows: logging.log_every={log_every} exceeds the runs' steps "
                f"({steps})"
            )
        return f"no rows in {log}"
    if not any(log_series(rows, column)[0] for rows in logs):
        return f"no finite {column} logged"
    return "its seeds logged no step in common"


def _curves_panel(
    axis: Axes,
    result: SweepResult,
    curves: list[_Curve],
    colours: list[tuple[float, float, float, float]],
    log: str,
    column: str,
) -> list[str]:
    """Draw each value's curve; say in the panel why a value has none.

    Returns:
        The lines of the note naming the values without a curve, when some have one (where the
        note goes depends on the panel's legend); a panel without any curve says it at once.
    """
    labels = result.labels()
    for index, steps, values in curves:
        axis.plot(steps, values, color=colours[index], label=labels[index], linewidth=1.2)
    finite = [values[np.isfinite(values)] for _, _, values in curves]
    low = min((float(v.min()) for v in finite if v.size), default=0.0)
    high = max((float(v.max()) for v in finite if v.size), default=0.0)
    if low > 0 and high > _LOSS_LOG_SPAN * low:
        # Losses of different values can differ by tens of decades (a loss that vanishes from
        # the start); on a linear axis those curves would all lie flat on zero.
        axis.set_yscale("log")
    drawn = {index for index, _, _ in curves}
    reasons: dict[str, list[str]] = {}
    for index, value in enumerate(result.values):
        if index not in drawn:
            reasons.setdefault(_why_no_curve(result, value, log, column), []).append(labels[index])
    if not curves:
        lines = (
            list(reasons)
            if len(reasons) == 1
            else [f"{', '.join(missing)}: {reason}" for reason, missing in reasons.items()]
        )
        _note(axis, lines, empty=True)
        return []
    return [f"no curve for {', '.join(missing)}: {reason}" for reason, missing in reasons.items()]


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
    values are categories, named in the curves' legend. Recall@1 is left out of the final
    metrics beside P@1, which it equals. A value without a curve (its run folders deleted,
    or no training-log rows because ``logging.log_every`` exceeds the runs' steps) or without
    a finite final metric is named in a note in its panel.

    Args:
        result: The sweep (:func:`dmlkit.protocol.run_sweep` or :func:`dmlkit.protocol.load_sweep`).
        path: The PNG to write (its folder is created); ``<sweep folder>/sweep.png`` when None.
        smoothing: Moving-average window of the training-loss curves; None chooses one from
            the curve's length (:func:`dmlkit.viz.smoothing.auto_window`).

    Returns:
        The PNG's path.

    Raises:
        ValueError: ``smoothing`` is not None or an integer of at least 1.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.cm import ScalarMappable

    from ..protocol.sweep_results import BEST_VALIDATION
    from ..protocol.sweep_values import is_number

    if smoothing is not None and (
        isinstance(smoothing, bool) or not isinstance(smoothing, int) or smoothing < 1
    ):
        raise ValueError(f"smoothing must be a window of at least 1 point, got {smoothing!r}")
    numeric = all(is_number(v) for v in result.values)
    positive = numeric and all(value > 0 for value in result.values)
    log_axis = positive and max(result.values) / min(result.values) >= _LOG_SPAN
    positions = [
        float(value) if numeric else float(index) for index, value in enumerate(result.values)
    ]
    # Numeric values given out of order still draw their lines from left to right.
    order = sorted(range(len(positions)), key=positions.__getitem__)
    colours, norm, cmap = _colours(positions, log_axis)

    selection = result.config.validation.metric
    panels = [("training loss (mean over seeds, smoothed)", "train.csv", "loss", smoothing)]
    if BEST_VALIDATION in result.metrics():
        title = f"validation {result.metric_label(selection)} (mean over seeds)"
        panels.append((title, "validation.csv", selection, 1))

    figure: Figure
    figure, axes = plt.subplots(
        1, 1 + len(panels), figsize=(5.3 * (1 + len(panels)), 4.2), squeeze=False
    )
    metrics_axis = axes[0][0]
    _metrics_panel(metrics_axis, result, positions, order, numeric)
    if log_axis:
        metrics_axis.set_xscale("log")
    if not numeric:
        metrics_axis.set_xticks(positions, result.labels(), rotation=30, ha="right")
    for axis, (title, log, column, window) in zip(axes[0][1:], panels, strict=True):
        curves = _value_curves(result, log, column, window)
        missing = _curves_panel(axis, result, curves, colours, log, column)
        axis.set_title(title, fontsize=10)
        axis.set_xlabel("step", fontsize=8)
        if numeric and curves:
            colour_bar = figure.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=axis)
            colour_bar.set_label(result.key, fontsize=8)
            if missing:
                _note(axis, missing, empty=False)
        elif curves:
            legend_title = _note_text([result.key, *missing])
            axis.legend(fontsize=7, title=legend_title, title_fontsize=7)
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
