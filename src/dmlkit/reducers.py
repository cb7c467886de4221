"""Reducers for the ``reducer=`` slot of every loss (PML's names and meanings)."""

from .functional.reduction import (
    AvgNonZeroReducer,
    MeanReducer,
    Reducer,
    SumReducer,
    ThresholdReducer,
)

__all__ = ["AvgNonZeroReducer", "MeanReducer", "Reducer", "SumReducer", "ThresholdReducer"]
