"""Reducers for the ``reducer=`` slot of every loss (PML's names and meanings), and their
registry.

The reducers are plain dataclasses of :mod:`dmlkit.functional.reduction`, the pure maths; they
are registered here, beside the distances, where the loss floor publishes its parts.
"""

from .functional.reduction import (
    AvgNonZeroReducer,
    DivisorReducer,
    MeanReducer,
    Reducer,
    SumReducer,
    ThresholdReducer,
)
from .registry import Registry

REDUCERS = Registry("reducer", Reducer)

for _reducer in (AvgNonZeroReducer, DivisorReducer, MeanReducer, SumReducer, ThresholdReducer):
    REDUCERS.add(_reducer)

__all__ = [
    "REDUCERS",
    "AvgNonZeroReducer",
    "DivisorReducer",
    "MeanReducer",
    "Reducer",
    "SumReducer",
    "ThresholdReducer",
]
