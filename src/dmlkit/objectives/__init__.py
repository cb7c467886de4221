"""Training objectives: what one training step optimises (the standard miner → loss step, DDTAS).

A user's own objective subclasses :class:`Objective` and is passed to
``Trainer(config, objective=...)`` or named in a config (``objective: {name:
"my_package.module:MyObjective", options: {...}}``).
"""

from .base import OBJECTIVES, BatchSource, BatchStream, Objective, StepOutput
from .ddtas import DDTASObjective
from .metric_loss import MetricLossObjective

__all__ = [
    "OBJECTIVES",
    "BatchSource",
    "BatchStream",
    "DDTASObjective",
    "MetricLossObjective",
    "Objective",
    "StepOutput",
]
