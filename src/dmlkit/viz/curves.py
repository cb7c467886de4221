"""Training curves from a run folder's CSV logs."""

from __future__ import annotations

import csv
import math
from pathlib import Path

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
)


def _read(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with path.open(newline="") as file:
        return list(csv.DictReader(file))


def _series(rows: list[dict[str, str]], column: str) -> tuple[list[float], list[float]]:
    steps, values = [], []
    for row in rows:
        text = row.get(column, "")
        if text not in ("", None):
            value = float(text)
            if math.isfinite(value):
                steps.append(float(row["step"]))
                values.append(value)
    return steps, values


def plot_training_log(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Plot a run's training log: loss, mined pairs and, when logged, DDTAS's thresholds
    (AT-ASMS tolerances, ratio, OTG weights), plus the validation metrics.

    Args:
        run_dir: A run folder holding ``train.csv`` (and ``validation.csv`` when validated).
        out: The PNG to write; ``<run_dir>/training.png`` when None.

    Returns:
        The PNG's path.

    Raises:
        FileNotFoundError: The run folder has no ``train.csv``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    rows = _read(run_dir / "train.csv")
    if not rows:
        raise FileNotFoundError(f"{run_dir / 'train.csv'} is missing or empty: nothing to plot")
    panels = []
    for title, columns, log_scale in _PANELS:
        lines = {c: _series(rows, c) for c in columns}
        lines = {c: line for c, line in lines.items() if line[0]}
        if title.startswith("mined") and len(lines) > 1:
            lines.pop("mined", None)  # the total repeats the two sides
        if lines:
            panels.append((title, lines, log_scale))
    validation = _read(run_dir / "validation.csv")
    if validation:
        metrics = [k for k in validation[0] if k not in ("step", "epoch")]
        panels.append(("validation", {m: _series(validation, m) for m in metrics}, False))
    n_rows = math.ceil(len(panels) / 2)
    figure, axes = plt.subplots(n_rows, 2, figsize=(11, 3.0 * n_rows), squeeze=False)
    for axis, (title, lines, log_scale) in zip(axes.flat, panels, strict=False):
        for name, (steps, values) in lines.items():
            axis.plot(steps, values, label=name, linewidth=1.2)
        if log_scale and any(v > 0 for _, values in lines.values() for v in values):
            axis.set_yscale("log", nonpositive="mask")  # zero weights leave gaps
        axis.set_title(title, fontsize=10)
        axis.set_xlabel("step", fontsize=8)
        axis.tick_params(labelsize=8)
        axis.legend(fontsize=7)
        axis.grid(alpha=0.3)
    for axis in list(axes.flat)[len(panels) :]:
        axis.set_visible(False)
    figure.suptitle(run_dir.name, fontsize=11)
    figure.tight_layout()
    path = Path(out) if out is not None else run_dir / "training.png"
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
