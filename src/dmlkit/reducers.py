"""Reducers for the ``reducer=`` slot of every loss (PML's names and meanings).

The reducers are plain dataclasses of :mod:`dmlkit.functional.reduction` (the ground floor, which
knows no registry); they are registered here, where the loss floor publishes them.
"""

from .functional.reduction import (
    AvgNonZeroReducer,
    MeanReducer,
    Reducer,
    SumReducer,
    ThresholdReducer,
)
from .registry import REDUCERS

for _reducer in (AvgNonZeroReducer, MeanReducer, SumReducer, ThresholdReducer):
    REDUCERS.add(_reducer)

__all__ = ["AvgNonZeroReducer", "MeanReducer", "Reducer", "SumReducer", "ThresholdReducer"]
