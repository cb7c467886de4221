"""Optimisation-history plots of a hyperparameter search (an Optuna study)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any


def plot_study_history(study: Any, path: str | Path) -> Path:
    """Plot each finished trial's objective and the best value so far, as a PNG.

    Args:
        study: An ``optuna.Study`` (maximising the mean validation MAP@R).
        path: The PNG to write; its folder is created.

    Returns:
        ``path``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.figure
    import matplotlib.pyplot as plt
    from optuna.exceptions import ExperimentalWarning
    from optuna.visualization.matplotlib import plot_optimization_history

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        axes = plot_optimization_history(study, target_name="mean validation MAP@R")
    axes.set_title(f"{study.study_name}: optimisation history")
    figure = axes.figure
    assert isinstance(figure, matplotlib.figure.Figure)
    figure.set_size_inches(7, 4)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
