"""Reducers: how per-element losses become one scalar.

A reducer is a selection rule (which elements count) and a choice of dividing by their count or
not. Losses hand it dense per-element values with weights (a pair that a mined tuple repeats
counts as many times), so the reduction is a weighted sum: no index lists, no Python loops.

An empty selection gives a zero that keeps the autograd graph, never a Python number or NaN.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

ValueAndSlope = Callable[[Tensor], tuple[Tensor, Tensor]]


@dataclass(frozen=True)
class Reducer:
    """Base reducer: averages every weighted element (PML's ``MeanReducer``).

    Attributes:
        average: Divide by the selected weight (True) or return the plain sum (False).
    """

    average: bool = True

    def keep(self, losses: Tensor) -> Tensor | None:
        """0/1 weights (in the losses' dtype) of the elements that count, or None for all."""
        return None

    def __call__(self, losses: Tensor, weights: Tensor | None = None) -> Tensor:
        """Reduces ``losses`` (any shape) with optional same-shaped ``weights``.

        Args:
            losses: Per-element losses; entries with zero weight must be finite.
            weights: Bool mask or float counts; None weighs every element once.

        Returns:
            A scalar tensor attached to the graph of ``losses``.
        """
        with torch.no_grad():
            w = self._weights(losses, weights)
        if w is None:
            total, count = losses.sum(), torch.tensor(float(losses.numel()), device=losses.device)
        else:
            # Multiplying by the weights is one fast pass; losses are finite everywhere by
            # construction, so unselected entries contribute exact zeros.
            total, count = (losses * w).sum(), w.sum()
        return self.finish(total, count)

    def _weights(self, losses: Tensor, weights: Tensor | None) -> Tensor | None:
        kept = self.keep(losses)
        if weights is None:
            return kept
        w = weights.to(losses.dtype)
        return w if kept is None else kept.mul_(w)

    def reduce_elementwise(self, x: Tensor, fn: ValueAndSlope, weights: Tensor | None) -> Tensor:
        """Reduces ``fn(x)`` elementwise in one fused pass (first-order gradients only).

        Equivalent to ``self(value, weights)`` with ``value = fn(x)[0]``, but the values and
        slopes are computed once without autograd and backward is a single product: no
        intermediate tensor is kept per elementwise step.

        Args:
            x: Input of any shape (typically the (N, M) distance matrix).
            fn: Returns ``(f(x), f'(x))``, both finite everywhere.
            weights: Bool mask or float counts of the same shape, or None.

        Returns:
            Scalar tensor attached to ``x``'s graph.
        """
        result: Tensor = _ElementwiseReduce.apply(x, fn, weights, self)
        return result

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
        kept = torch.empty_like(losses)
        if self.low is not None:
            torch.gt(losses, self.low, out=kept)
            if self.high is not None:
                kept.mul_(losses < self.high)
        elif self.high is not None:
            torch.lt(losses, self.high, out=kept)
        return kept


@dataclass(frozen=True)
class AvgNonZeroReducer(ThresholdReducer):
    """Mean over the strictly positive elements: the denominator shrinks as training succeeds."""

    low: float | None = 0.0


class _ElementwiseReduce(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: Tensor, fn: ValueAndSlope, weights: Tensor | None, reducer: Reducer
    ) -> Tensor:
        values, slopes = fn(x)
        w = reducer._weights(values, weights)
        if w is None:
            w = torch.ones_like(values)
        elif w is weights:
            w = w.clone()
        total = torch.dot(values.flatten(), w.flatten())
        count = w.sum()
        scale = 1.0 / count.clamp_min(1.0) if reducer.average else torch.ones_like(count)
        ctx.save_for_backward(slopes.mul_(w).mul_(scale))
        return total * scale

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        (grad,) = ctx.saved_tensors
        return grad_out * grad, None, None, None
