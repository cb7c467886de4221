"""Pictures of runs and benchmarks. Plots read run folders (logs, results); nothing below this
floor imports it."""

from .curves import plot_training_log

__all__ = ["plot_training_log"]
