"""Reducers: how per-element losses become one scalar.

A reducer is a selection rule (which elements count) and a choice of dividing by their count or
not. Losses hand it dense per-element values with weights (a pair that a mined tuple repeats
counts as many times), so the reduction is a weighted sum: no index lists, no Python loops.

An empty selection gives a zero that keeps the autograd graph, never a Python number or NaN.
"""

from __future__ import annotations

import math
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

    def __call__(
        self, losses: Tensor, weights: Tensor | None = None, divisor: Tensor | int | None = None
    ) -> Tensor:
        """Reduces ``losses`` (any shape) with optional same-shaped ``weights``.

        Args:
            losses: Per-element losses; entries with zero weight must be finite.
            weights: Bool mask or float counts; None weighs every element once.
            divisor: The count a loss divides these losses by under PML's ``DivisorReducer``
                (ProxyAnchorLoss's number of proxies with a positive, say); only
                :class:`DivisorReducer` reads it, every other reducer ignores it, as in PML.

        Returns:
            A scalar tensor attached to the graph of ``losses``.
        """
        with torch.no_grad():
            w = self.effective_weights(losses, weights)
        if w is None:
            total, count = losses.sum(), torch.tensor(float(losses.numel()), device=losses.device)
        else:
            # Multiplying by the weights is one fast pass; losses are finite everywhere by
            # construction, so unselected entries contribute exact zeros.
            total, count = (losses * w).sum(), w.sum()
        return self.finish(total, count, divisor)

    def effective_weights(self, losses: Tensor, weights: Tensor | None) -> Tensor | None:
        """The given weights times this reducer's selection, in the losses' dtype."""
        kept = self.keep(losses)
        if weights is None:
            return kept
        w = weights.to(losses.dtype)
        return w if kept is None else kept.mul_(w)

    def reduce_elementwise(self, x: Tensor, fn: ValueAndSlope, weights: Tensor | None) -> Tensor:
        """Reduces ``fn(x)`` elementwise in a fused kernel (first-order gradients only).

        Equivalent to ``self(fn(x)[0], weights)``, but computed in row blocks without autograd:
        forward keeps no intermediate, backward recomputes the slopes block by block.

        Args:
            x: Input of any shape (typically the (N, M) distance matrix).
            fn: Returns ``(f(x), f'(x))``, both finite everywhere, as new tensors.
            weights: Bool mask or float counts of the same shape, or None.

        Returns:
            Scalar tensor attached to ``x``'s graph.
        """
        return reduce_elementwise_terms(x, [ElementwiseTerm(fn, weights, self)])

    def finish(self, total: Tensor, count: Tensor, divisor: Tensor | int | None = None) -> Tensor:
        """The reduced value from the selected elements' weighted ``total`` and their ``count``.

        Every path of a reducer ends here (the plain call, the fused elementwise kernels, the
        blockwise triplet sums), so a reducer's rule holds on all of them.

        Args:
            total: The weighted sum of the selected losses.
            count: The selected weight.
            divisor: The loss's own count, as for :meth:`__call__`; read only by
                :class:`DivisorReducer`.

        Returns:
            ``total / count`` when averaging (``total``, a zero, for an empty selection), else
            ``total``.
        """
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
class DivisorReducer(Reducer):
    """The weighted sum divided by a count the loss supplies (PML's ``DivisorReducer``), or
    zero when that count is zero.

    Only a call given ``divisor`` has that count: any other path (a call without one, the fused
    :meth:`reduce_elementwise` and :func:`reduce_elementwise_terms` kernels, a blockwise sum
    ending in :meth:`finish`) raises ``ValueError`` rather than return the plain sum (PML:
    ``KeyError``). ProxyAnchorLoss, MarginLoss and SparseCentersRegularizer supply a divisor.
    """

    average: bool = False

    def finish(self, total: Tensor, count: Tensor, divisor: Tensor | int | None = None) -> Tensor:
        if divisor is None:
            raise ValueError(
                "DivisorReducer divides by a count the loss supplies, and this loss supplies none "
                "(ProxyAnchorLoss and MarginLoss do); use another reducer, e.g. SumReducer() "
                "or MeanReducer()"
            )
        n = torch.as_tensor(divisor, dtype=total.dtype, device=total.device)
        return torch.where(n > 0, total / torch.where(n > 0, n, 1.0), total * 0.0)


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


BLOCK_ELEMENTS = 1 << 18  # 1 MiB float32 temporaries: cache-resident and reused by malloc


def row_blocks(n_rows: int, n_cols: int) -> list[slice]:
    """Row slices of about ``BLOCK_ELEMENTS`` entries each, for blockwise kernels."""
    step = max(1, BLOCK_ELEMENTS // max(1, n_cols))
    return [slice(start, min(start + step, n_rows)) for start in range(0, n_rows, step)]


@dataclass(frozen=True)
class ElementwiseTerm:
    """One reduced elementwise term of a loss: ``reducer(fn(x)[0], weights)``.

    Attributes:
        fn: Returns ``(f(x), f'(x))`` as new tensors, finite everywhere.
        weights: Bool mask or float counts shaped like x, or None.
        reducer: Selection and averaging of the term.
    """

    fn: ValueAndSlope
    weights: Tensor | None
    reducer: Reducer

    def weights_for(self, rows: slice, values: Tensor, weights: Tensor | None) -> Tensor | None:
        """The block's effective weights: the given ones times the reducer's selection."""
        return self.reducer.effective_weights(values, None if weights is None else weights[rows])


def reduce_elementwise_terms(x: Tensor, terms: list[ElementwiseTerm]) -> Tensor:
    """Sum of several reduced elementwise terms of the same input, in one fused kernel.

    Forward runs over row blocks and keeps nothing but scalars; backward recomputes each block's
    slopes and writes the gradient once. Only the gradient is ever a full-size tensor.

    Args:
        x: Input of any shape (typically the (N, M) distance matrix).
        terms: The terms; each is reduced by its own reducer.

    Returns:
        Scalar tensor attached to ``x``'s graph (first-order gradients only).
    """
    result: Tensor = _ElementwiseReduce.apply(x, terms)
    return result


def _as_rows(t: Tensor) -> Tensor:
    return t.reshape(-1, 1) if t.ndim < 2 else t.reshape(t.shape[0], math.prod(t.shape[1:]))


class _ElementwiseReduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, terms: list[ElementwiseTerm]) -> Tensor:  # type: ignore[override]
        rows_x = _as_rows(x)
        weights = [None if t.weights is None else _as_rows(t.weights) for t in terms]
        totals = [rows_x.new_zeros(()) for _ in terms]
        counts = [rows_x.new_zeros(()) for _ in terms]
        for block in row_blocks(*rows_x.shape):
            for i, term in enumerate(terms):
                values, _ = term.fn(rows_x[block])
                w = term.weights_for(block, values, weights[i])
                if w is None:
                    totals[i] += values.sum()
                    counts[i] += values.numel()
                else:
                    totals[i] += torch.dot(values.flatten(), w.flatten())
                    counts[i] += w.sum()
        # Each reduction is linear in its total: its scale is the reducer's value of a total
        # of 1 (a reducer that needs a divisor, which no elementwise term has, refuses here).
        scales = [
            t.reducer.finish(torch.ones_like(c), c) for t, c in zip(terms, counts, strict=True)
        ]
        ctx.save_for_backward(x)
        ctx.terms, ctx.weights, ctx.scales = terms, weights, scales
        return sum(
            (total * scale for total, scale in zip(totals, scales, strict=True)),
            rows_x.new_zeros(()),
        )

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        (x,) = ctx.saved_tensors
        rows_x = _as_rows(x)
        grad = torch.zeros_like(rows_x)
        for block in row_blocks(*rows_x.shape):
            for term, weights, scale in zip(ctx.terms, ctx.weights, ctx.scales, strict=True):
                values, slopes = term.fn(rows_x[block])
                w = term.weights_for(block, values, weights)
                if w is not None:
                    slopes.mul_(w)
                grad[block].add_(slopes, alpha=float(scale))
        return grad.mul_(grad_out).reshape(x.shape), None
