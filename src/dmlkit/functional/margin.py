"""The margin loss (Wu et al. 2017) on dense per-pair triplet counts.

Its terms are per pair, not per triplet: a triplet (a, p, n) contributes
``[d_ap − β + α]₊`` and ``[β − d_an + α]₊``, so the loss over any set of triplets is a sum
over (anchor, reference) pairs weighted by how many of the triplets hold each pair. All the
triplets of a batch then cost an (N, M) matrix, not N·P·Q triplets.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .masks import PairWeights
from .reduction import Reducer, row_blocks


def triplet_pair_weights(pairs: PairWeights) -> PairWeights:
    """The triplets formed by joining every positive pair with every negative pair of the same
    anchor (PML's conversion of pairs to triplets), as per-pair triplet counts.

    Args:
        pairs: Positive and negative pair counts.

    Returns:
        ``pos[a, p]·Σ_n neg[a, n]`` and ``neg[a, n]·Σ_p pos[a, p]``: how many of the triplets
        hold each positive and each negative pair.
    """
    return PairWeights(
        pairs.pos * pairs.neg.sum(dim=1, keepdim=True),
        pairs.neg * pairs.pos.sum(dim=1, keepdim=True),
    )


def margin_loss(
    mat: Tensor,
    triplets: PairWeights,
    beta: Tensor,
    margin: float,
    is_inverted: bool,
    *,
    reducer: Reducer,
    anchor_penalty: Tensor | None = None,
) -> Tensor:
    """Margin loss: ``[margin(d_ap, β) + α]₊`` and ``[margin(β, d_an) + α]₊`` for each
    triplet.

    The reducer gets all 2·T hinge terms, weighted by their triplet counts, and as divisor
    the number of non-zero ones (PML's): its ``DivisorReducer`` and ``SumReducer`` then give
    PML's values, whereas a mean-type reducer averages terms, not PML's per-triplet sums.

    Args:
        mat: (N, M) distances or similarities.
        triplets: Triplet counts of each positive and negative pair
            (:func:`triplet_pair_weights`, or a mined tuple's counts).
        beta: The boundary β: (1,) for all anchors, or (N, 1) per anchor.
        margin: α.
        is_inverted: Whether ``mat`` holds similarities.
        reducer: Reduces the terms.
        anchor_penalty: (N,) penalty of each triplet of each anchor (PML's per-class ``ν·β``),
            reduced on its own by ``reducer`` with the same divisor, as PML's sub-losses are.

    Returns:
        Scalar loss.
    """
    sign = -1.0 if is_inverted else 1.0
    if reducer.fusable:
        loss, divisor = _FusedMarginLoss.apply(
            mat, beta, triplets.pos, triplets.neg, reducer, margin, sign
        )
    else:
        terms = torch.stack(_hinges(mat, beta, margin, sign))
        weights = torch.stack([triplets.pos, triplets.neg])
        with torch.no_grad():
            divisor = (weights * (terms > 0)).sum()
        loss = reducer(terms, weights, divisor=divisor)
    if anchor_penalty is not None:
        loss = loss + reducer(anchor_penalty, triplets.pos.sum(dim=1), divisor=divisor)
    return loss


def _hinges(mat: Tensor, beta: Tensor, margin: float, sign: float) -> tuple[Tensor, Tensor]:
    """The positive pairs' terms ``[margin(d, β) + α]₊`` and the negative pairs'
    ``[margin(β, d) + α]₊`` of every entry, with ``margin(x, y) = sign·(x − y)``."""
    gap = torch.sub(mat, beta).mul_(sign)
    return torch.add(gap, margin).relu_(), gap.neg_().add_(margin).relu_()


class _FusedMarginLoss(torch.autograd.Function):
    """:func:`margin_loss` under a fusable reducer, over row blocks: forward keeps only the
    reducer's total and count and the divisor; backward recomputes each block's terms, whose
    slopes are ±sign where they are positive. Returns the loss and the divisor (no gradient).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        mat: Tensor,
        beta: Tensor,
        pos: Tensor,
        neg: Tensor,
        reducer: Reducer,
        margin: float,
        sign: float,
    ) -> tuple[Tensor, Tensor]:
        total, count, divisor = mat.new_zeros(()), mat.new_zeros(()), mat.new_zeros(())
        for rows in row_blocks(*mat.shape):
            terms = _hinges(mat[rows], _beta_rows(beta, rows), margin, sign)
            for values, weights in zip(terms, (pos[rows], neg[rows]), strict=True):
                w = reducer.effective_weights(values, weights)
                assert w is not None  # the pair weights are given
                total += torch.dot(values.flatten(), w.flatten())
                count += w.sum()
                # The divisor counts the triplets of the non-zero terms, before the reducer's
                # own selection (PML's).
                divisor += torch.dot(values.sign().flatten(), weights.flatten())
        # The reduction is linear in its total: its scale is the reducer's value of a total of 1.
        ctx.scale = reducer.finish(torch.ones_like(count), count, divisor)
        ctx.save_for_backward(mat, beta, pos, neg)
        ctx.reducer, ctx.margin, ctx.sign = reducer, margin, sign
        ctx.mark_non_differentiable(divisor)
        return total * ctx.scale, divisor

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: Tensor, _grad_divisor: Tensor) -> tuple[Tensor | None, ...]:
        mat, beta, pos, neg = ctx.saved_tensors
        grad_mat = torch.empty_like(mat)
        row_sums = mat.new_empty(mat.shape[0]) if ctx.needs_input_grad[1] else None
        step = grad_out * ctx.scale * ctx.sign
        for rows in row_blocks(*mat.shape):
            pos_terms, neg_terms = _hinges(mat[rows], _beta_rows(beta, rows), ctx.margin, ctx.sign)
            pos_w = ctx.reducer.effective_weights(pos_terms, pos[rows])
            neg_w = ctx.reducer.effective_weights(neg_terms, neg[rows])
            slope = pos_terms.sign_().mul_(pos_w).sub_(neg_terms.sign_().mul_(neg_w))
            torch.mul(slope, step, out=grad_mat[rows])
            if row_sums is not None:
                torch.sum(grad_mat[rows], 1, out=row_sums[rows])
        grad_beta = None
        if row_sums is not None:
            # Each term's slope in β is minus its slope in the entry.
            grad_beta = row_sums.neg_().view(-1, 1) if beta.ndim == 2 else -row_sums.sum(0, True)
        return grad_mat, grad_beta, None, None, None, None, None


def _beta_rows(beta: Tensor, rows: slice) -> Tensor:
    """β for a row block: the one β, or the block's rows of the per-anchor (N, 1) β."""
    return beta if beta.ndim == 1 else beta[rows]


__all__ = ["margin_loss", "triplet_pair_weights"]
