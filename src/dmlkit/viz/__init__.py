"""Pictures of runs and benchmarks. Plots read run folders (logs, results); nothing below this
floor imports it."""

from .curves import plot_training_log
from .history import plot_study_history

__all__ = ["plot_study_history", "plot_training_log"]
