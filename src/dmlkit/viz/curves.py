"""Training curves from a run folder's CSV logs."""

from __future__ import annotations

import csv
import math
from pathlib import Path

from ..display import metric_label
from .smoothing import auto_window, moving_average

# How visible the raw curve stays behind its moving average.
_RAW_ALPHA = 0.25

_Lines = dict[str, tuple[list[float], list[float]]]

# (title, columns, log scale): a panel is drawn when at least one of its columns has values.
_PANELS: tuple[tuple[str, tuple[str, ...], bool], ...] = (
    ("training loss", ("loss",), False),
    ("mined pairs per batch", ("num_pos_pairs", "num_neg_pairs", "mined"), True),
    ("mining tolerances (γ̂)", ("gamma_pos", "gamma_neg"), False),
    ("AT-ASMS ratio r", ("ratio",), False),
    ("mean similarity of mined pairs", ("pos_similarity", "neg_similarity"), False),
    ("OTG weight / threshold (mean)", ("otg_pos_mean", "otg_neg_mean", "otg_neg_max"), True),
    ("OTG zero weights (fraction)", ("otg_pos_zero", "otg_neg_zero"), False),
    ("OTG steps skipped (cumulative)", ("skipped_steps",), False),
    ("OTG meta loss", ("meta_loss",), False),
    ("online threshold λ", ("online_threshold_pos", "online_threshold_neg"), False),
    ("meta memory (embeddings)", ("memory_items",), False),
)


# validation.csv's loss columns (see ValidationConfig.loss_batches) and their legend labels.
_VALIDATION_LOSSES = {
    "val_loss": "validation loss (as in training)",
    "val_loss_all_pairs": "validation loss (every pair/triplet)",
}


def read_log(path: Path) -> list[dict[str, str]]:
    """The rows of a run's CSV log (``train.csv``, ``validation.csv``); none when it is absent."""
    if not path.is_file():
        return []
    with path.open(newline="") as file:
        return list(csv.DictReader(file))


def log_series(rows: list[dict[str, str]], column: str) -> tuple[list[float], list[float]]:
    """The steps and finite values of one column of a log; empty cells and NaN are left out."""
    steps, values = [], []
    for row in rows:
        text = row.get(column, "")
        if text not in ("", None):
            value = float(text)
            if math.isfinite(value):
                steps.append(float(row["step"]))
                values.append(value)
    return steps, values


def plot_training_log(
    run_dir: str | Path, out: str | Path | None = None, *, smoothing: int | None = None
) -> Path:
    """Plot a run's training log: loss, mined pairs and, when logged, DDTAS's thresholds
    (AT-ASMS tolerances, ratio, OTG weights), plus the validation metrics.

    Per-step training curves are noisy: each is drawn as a centred moving average
    (:func:`~dmlkit.viz.smoothing.moving_average`) over its raw values, drawn faint in the same
    colour. The validation metrics, a few points, are drawn raw with markers.

    Args:
        run_dir: A run folder holding ``train.csv`` (and ``validation.csv`` when validated).
        out: The PNG to write; ``<run_dir>/training.png`` when None.
        smoothing: Moving-average window, in logged steps; 1 draws the raw curves only; None
            picks :func:`~dmlkit.viz.smoothing.auto_window` of the number of logged steps.

    Returns:
        The PNG's path.

    Raises:
        FileNotFoundError: The run folder has no ``train.csv``.
        ValueError: ``smoothing`` is not None or an integer of at least 1.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if smoothing is not None and (
        isinstance(smoothing, bool) or not isinstance(smoothing, int) or smoothing < 1
    ):
        raise ValueError(f"smoothing must be None or an integer of at least 1, got {smoothing!r}")
    run_dir = Path(run_dir)
    rows = read_log(run_dir / "train.csv")
    if not rows:
        raise FileNotFoundError(f"{run_dir / 'train.csv'} is missing or empty: nothing to plot")
    window = smoothing if smoothing is not None else auto_window(len(rows))
    # (title, lines, log scale, moving-average window or None for raw with markers)
    panels: list[tuple[str, _Lines, bool, int | None]] = []
    for title, columns, log_scale in _PANELS:
        lines = {c: log_series(rows, c) for c in columns}
        lines = {c: line for c, line in lines.items() if line[0]}
        if title.startswith("mined") and len(lines) > 1:
            lines.pop("mined", None)  # the total repeats the two sides
        if lines:
            panels.append((title, lines, log_scale, window))
    validation = read_log(run_dir / "validation.csv")
    # The validation loss beside the training loss, smoothed by the same rule over its points.
    validation_losses = {
        label: log_series(validation, column)
        for column, label in _VALIDATION_LOSSES.items()
        if validation and log_series(validation, column)[0]
    }
    if validation:
        metrics = [
            k for k in validation[0] if k not in ("step", "epoch", *_VALIDATION_LOSSES, "val_mined")
        ]
        lines = {metric_label(m): log_series(validation, m) for m in metrics}
        if any(line[0] for line in lines.values()):
            panels.append(("validation", lines, False, None))
    n_rows = math.ceil(len(panels) / 2)
    figure, axes = plt.subplots(n_rows, 2, figsize=(11, 3.0 * n_rows), squeeze=False)
    for axis, (title, lines, log_scale, panel_window) in zip(axes.flat, panels, strict=False):
        for name, (steps, values) in lines.items():
            if panel_window is None:
                axis.plot(steps, values, label=name, linewidth=1.2, marker="o", markersize=3)
            elif panel_window == 1:
                axis.plot(steps, values, label=name, linewidth=1.2)
            else:
                (raw,) = axis.plot(steps, values, linewidth=0.8, alpha=_RAW_ALPHA)
                smoothed = moving_average(values, panel_window)
                axis.plot(steps, smoothed, label=name, linewidth=1.2, color=raw.get_color())
        if title == "training loss":
            for name, (steps, values) in validation_losses.items():
                points = smoothing if smoothing is not None else auto_window(len(values))
                (raw,) = axis.plot(steps, values, linewidth=0.8, alpha=_RAW_ALPHA, marker="o",
                                   markersize=2)  # fmt: skip
                axis.plot(steps, moving_average(values, points), label=name, linewidth=1.2,
                          linestyle="--", color=raw.get_color())  # fmt: skip
        if log_scale and any(v > 0 for _, values in lines.values() for v in values):
            axis.set_yscale("log", nonpositive="mask")  # zero weights leave gaps
        axis.set_title(title, fontsize=10)
        axis.set_xlabel("step", fontsize=8)
        axis.tick_params(labelsize=8)
        axis.legend(fontsize=7)
        axis.grid(alpha=0.3)
    for axis in list(axes.flat)[len(panels) :]:
        axis.set_visible(False)
    smoothed_note = (
        f" (training curves: moving average of {window} logged steps, raw values faint)"
        if window > 1
        else ""
    )
    figure.suptitle(run_dir.name + smoothed_note, fontsize=11)
    figure.tight_layout()
    path = Path(out) if out is not None else run_dir / "training.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
