"""Reducers: how per-element losses become one scalar.

A reducer is a selection rule (which elements count) and a choice of dividing by their count or
not. Losses hand it dense per-element values with weights (a pair that a mined tuple repeats
counts as many times), so the reduction is a weighted sum: no index lists, no Python loops.

An empty selection gives a zero that keeps the autograd graph, never a Python number or NaN.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Reducer:
    """Base reducer: averages every weighted element (PML's ``MeanReducer``).

    Attributes:
        average: Divide by the selected weight (True) or return the plain sum (False).
    """

    average: bool = True

    def keep(self, losses: Tensor) -> Tensor | None:
        """Elements that count towards the result, or None for all of them."""
        return None

    def __call__(self, losses: Tensor, weights: Tensor | None = None) -> Tensor:
        """Reduces ``losses`` (any shape) with optional same-shaped ``weights``.

        Args:
            losses: Per-element losses; entries with zero weight must be finite.
            weights: Bool mask or float counts; None weighs every element once.

        Returns:
            A scalar tensor attached to the graph of ``losses``.
        """
        total, count = self.sum_and_count(losses, weights)
        return self.finish(total, count)

    def sum_and_count(self, losses: Tensor, weights: Tensor | None) -> tuple[Tensor, Tensor]:
        """The selected weighted sum and the selected weight (a constant, no graph)."""
        kept = self.keep(losses.detach())
        if weights is None:
            w = kept
        elif kept is None:
            w = weights
        else:
            w = weights & kept if weights.dtype == torch.bool else weights * kept
        if w is None:
            return losses.sum(), torch.tensor(float(losses.numel()), device=losses.device)
        if w.dtype == torch.bool:
            return torch.where(w, losses, 0.0).sum(), w.sum().to(losses.dtype)
        w = w.to(losses.dtype)
        return torch.where(w != 0, losses * w, 0.0).sum(), w.sum()

    def finish(self, total: Tensor, count: Tensor) -> Tensor:
        """Divides by the count when averaging; an empty selection gives ``total`` (a zero)."""
        if not self.average:
            return total
        return total / count.clamp_min(1.0)


@dataclass(frozen=True)
class MeanReducer(Reducer):
    """Mean over all weighted elements."""


@dataclass(frozen=True)
class SumReducer(Reducer):
    """Sum over all weighted elements."""

    average: bool = False


@dataclass(frozen=True)
class ThresholdReducer(Reducer):
    """Mean over the elements whose loss lies strictly inside (low, high).

    Attributes:
        low: Lower bound (exclusive), or None.
        high: Upper bound (exclusive), or None.
    """

    low: float | None = None
    high: float | None = None

    def __post_init__(self) -> None:
        if self.low is None and self.high is None:
            raise ValueError("ThresholdReducer needs low, high or both")

    def keep(self, losses: Tensor) -> Tensor | None:
        kept = torch.ones_like(losses, dtype=torch.bool)
        if self.low is not None:
            kept &= losses > self.low
        if self.high is not None:
            kept &= losses < self.high
        return kept


@dataclass(frozen=True)
class AvgNonZeroReducer(ThresholdReducer):
    """Mean over the strictly positive elements: the denominator shrinks as training succeeds."""

    low: float | None = 0.0
