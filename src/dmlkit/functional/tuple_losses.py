"""Formulas of the losses over an anchor's pairs taken together (PML's tuple-based losses):
the angular loss, the tuplet margin loss, the intra-pair variance loss and the instance loss.

Each takes precomputed matrices and index lists, holds no state and leaves input checks to the
classes in :mod:`dmlkit.losses.tuple_based`. The angular loss compares every positive pair with
every negative of its anchor, a triplet-sized set of terms; it is computed in blocks of pairs,
with forward keeping one value per pair and backward recomputing each block's softmax, so no
(pairs × references) tensor outlives its block.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from .logsumexp import masked_logsumexp
from .masks import PairIndices, PairWeights, dense_ranks
from .reduction import (
    ElementwiseTerm,
    Reducer,
    ValueAndSlope,
    reduce_elementwise_terms,
    row_blocks,
)


def _take(mat: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """``mat[rows, cols]`` as one 1-D gather (its backward is an ``index_add``, several times
    faster than the accumulating ``index_put`` of advanced indexing)."""
    return mat.reshape(-1).index_select(0, rows * mat.shape[1] + cols)


def _pair_blocks(n_pairs: int, n_refs: int) -> list[slice]:
    return row_blocks(n_pairs, n_refs) if n_refs else []


def _block_logits(
    anchor_ref: Tensor,
    positive_ref: Tensor,
    offsets: Tensor,
    anchors: Tensor,
    positives: Tensor,
    scale: float,
) -> Tensor:
    """A block's (pairs × references) ``scale·(A[a] + B[p]) + offset`` (a new tensor)."""
    logits = anchor_ref.index_select(0, anchors).add_(positive_ref.index_select(0, positives))
    return logits.mul_(scale).add_(offsets[:, None])


def _shifted_exp(logits: Tensor, shift: Tensor, weights: Tensor) -> Tensor:
    """``w · exp(clamp(logits − shift, log(tiny), 0))``, in place of ``logits``. Selected terms
    never exceed their row's shift; the clamp keeps unselected ones finite and skips denormals."""
    lowest = math.log(torch.finfo(logits.dtype).tiny)
    return logits.sub_(shift[:, None]).clamp_(lowest, 0.0).exp_().mul_(weights)


class _AngularPairLogSumExp(torch.autograd.Function):
    """Per pair k = (a_k, p_k): ``log(1 + Σ_n w[a_k, n]·exp(s·(A[a_k, n] + B[p_k, n]) + o_k))``,
    0 where the anchor has no selected n.

    Forward keeps one value per pair; backward recomputes each block's softmax (its terms over
    ``1 + Σ``, i.e. shifted by the pair's own loss) and scatters it into the rows of A (by
    anchor) and B (by positive).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        anchor_ref: Tensor,
        positive_ref: Tensor,
        offsets: Tensor,
        anchors: Tensor,
        positives: Tensor,
        weights: Tensor,
        scale: float,
    ) -> Tensor:
        losses = offsets.new_zeros(anchors.shape[0])
        lowest = torch.finfo(offsets.dtype).min
        for block in _pair_blocks(anchors.shape[0], weights.shape[1]):
            a, p = anchors[block], positives[block]
            logits = _block_logits(anchor_ref, positive_ref, offsets[block], a, p, scale)
            w = weights.index_select(0, a).to(logits.dtype)
            # The implicit 1 of log(1 + Σ) makes 0 the floor of the shift.
            shift = torch.where(w > 0, logits, lowest).amax(1).clamp_min_(0.0)
            total = _shifted_exp(logits, shift, w).sum(1)
            # log1p keeps log(1 + tiny) accurate where every term is far below 1.
            losses[block] = torch.where(
                shift > 0, shift + torch.log(total + torch.exp(-shift)), torch.log1p(total)
            )
        ctx.save_for_backward(
            anchor_ref, positive_ref, offsets, anchors, positives, weights, losses
        )
        ctx.scale = scale
        ctx.shared = positive_ref is anchor_ref
        return losses

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_losses: Tensor) -> tuple[Tensor | None, ...]:
        anchor_ref, positive_ref, offsets, anchors, positives, weights, losses = ctx.saved_tensors
        grad_anchor_ref = torch.zeros_like(anchor_ref)
        grad_positive_ref = grad_anchor_ref if ctx.shared else torch.zeros_like(positive_ref)
        grad_offsets = torch.zeros_like(offsets)
        for block in _pair_blocks(anchors.shape[0], weights.shape[1]):
            a, p = anchors[block], positives[block]
            logits = _block_logits(anchor_ref, positive_ref, offsets[block], a, p, ctx.scale)
            w = weights.index_select(0, a).to(logits.dtype)
            share = _shifted_exp(logits, losses[block], w).mul_(grad_losses[block, None])
            grad_offsets[block] = share.sum(1)
            share.mul_(ctx.scale)
            grad_anchor_ref.index_add_(0, a, share)
            grad_positive_ref.index_add_(0, p, share)
        positive_grad = None if ctx.shared else grad_positive_ref
        return grad_anchor_ref, positive_grad, grad_offsets, None, None, None, None


def angular_loss(
    anchors_unit: Tensor,
    refs: Tensor,
    refs_unit: Tensor,
    anchors: Tensor,
    positives: Tensor,
    neg_weights: Tensor,
    alpha: float = 40.0,
    *,
    reducer: Reducer,
    refs_are_anchors: bool = False,
) -> Tensor:
    """Angular loss (Wang et al. 2017) in its N-pair form, as PML computes it, per positive pair
    (a, p) with unit vectors â and p̂:
    ``log(1 + Σ_{n ∈ N_a} exp(4·tan²α·(â + p̂)·r_n − 2·(1 + tan²α)·â·p̂))``,
    0 for an anchor without negatives.

    The negatives ``r_n`` are the reference rows as given, not normalised (PML's formula).
    ``(â + p̂)·r_n`` is read from two matrix products, ``Â·Rᵀ`` and ``R̂·Rᵀ``, so each pair costs
    one pass over the references, done in blocks of pairs (first-order gradients only).

    Args:
        anchors_unit: (N, D) L2-normalised anchors.
        refs: (M, D) references as given (the negatives).
        refs_unit: (M, D) L2-normalised references (the positives).
        anchors: (P,) anchor index of each positive pair (repeats each count).
        positives: (P,) reference index of each positive pair.
        neg_weights: (N, M) 0/1 weights of each anchor's negatives.
        alpha: The angle bound α, in degrees.
        reducer: Over positive pairs.
        refs_are_anchors: Whether the references are the anchors themselves (no separate
            reference set): then ``Â·Rᵀ`` and ``R̂·Rᵀ`` are one product.

    Returns:
        Scalar loss.
    """
    sq_tan = math.tan(math.radians(alpha)) ** 2
    anchor_ref = anchors_unit @ refs.T
    positive_ref = anchor_ref if refs_are_anchors else refs_unit @ refs.T
    # â·p̂ = (â·p)/‖p‖ is read off Â·Rᵀ: no third product and no (P, D) gathered rows. The norm
    # is floored as F.normalize floors it.
    norms = torch.linalg.vector_norm(refs, dim=1).clamp_min(1e-12)
    anchor_positive = _take(anchor_ref, anchors, positives) / norms.index_select(0, positives)
    losses: Tensor = _AngularPairLogSumExp.apply(
        anchor_ref,
        positive_ref,
        anchor_positive * (-2.0 * (1.0 + sq_tan)),
        anchors,
        positives,
        neg_weights,
        4.0 * sq_tan,
    )
    return reducer(losses)


def shifted_cosine(cosine: Tensor, margin: float) -> Tensor:
    """``cos(θ − margin)`` for ``θ = arccos(cosine)``, as ``cosine·cos m + sin θ·sin m``.

    ``sin θ`` is floored at √ε (ε the dtype's machine epsilon), with no gradient below the
    floor: the slope of ``sin(arccos c)`` is infinite at c = ±1, where the cosine's own gradient
    vanishes, and float rounding of c is of that order there anyway.

    Args:
        cosine: Cosines, any shape (values rounded past ±1 are harmless).
        margin: The margin m in radians.
    """
    floor = torch.finfo(cosine.dtype).eps
    sine = (1.0 - cosine * cosine).clamp_min(floor).sqrt()
    return cosine * math.cos(margin) + sine * math.sin(margin)


def tuplet_margin_loss(
    cosine: Tensor,
    anchors: Tensor,
    positives: Tensor,
    neg_weights: Tensor,
    margin: float = 5.73,
    scale: float = 64.0,
    *,
    reducer: Reducer,
) -> Tensor:
    """Tuplet margin loss (Yu and Tao 2019), per positive pair (a, p):
    ``log(1 + Σ_{n ∈ N_a} exp(s·(cos θ_an − cos(θ_ap − m))))``, 0 for an anchor without
    negatives.

    The sum over the anchor's negatives does not depend on p, so it is one log-sum-exp per
    anchor, ``L_a``, and each pair's loss is ``softplus(L_a − s·cos(θ_ap − m))``: no
    (positive pairs × negative pairs) matrix.

    Args:
        cosine: (N, M) cosine similarities.
        anchors: (P,) anchor index of each positive pair (repeats counted).
        positives: (P,) reference index of each positive pair.
        neg_weights: (N, M) negative pairs, counts of repeats.
        margin: m, in degrees.
        scale: s.
        reducer: Over positive pairs.

    Returns:
        Scalar loss.
    """
    neg_lse, has_neg = masked_logsumexp(cosine, neg_weights, scale=scale)
    pos = shifted_cosine(_take(cosine, anchors, positives), math.radians(margin))
    losses = F.softplus(neg_lse[anchors, 0] - scale * pos) * has_neg[anchors, 0]
    return reducer(losses)


def _squared_hinge(sign: float) -> ValueAndSlope:
    """``u ↦ ([sign·u]₊², 2·sign·[sign·u]₊)``."""

    def value_and_slope(u: Tensor) -> tuple[Tensor, Tensor]:
        excess = torch.mul(u, sign).relu_()
        return excess.square(), excess.mul_(2.0 * sign)

    return value_and_slope


def _variance_term(
    values: Tensor, weights: Tensor, eps: float, increase: bool, reducer: Reducer
) -> Tensor:
    """One side of the intra-pair variance loss (PML's ``variance_with_eps``): the squared
    excess of each pair beyond ``(1 ∓ eps)·mean``, pushed up (``increase``) or down, reduced.

    The mean is a differentiable scalar; with ``u = value − (1 ∓ eps)·mean`` the term is
    elementwise in u, so it runs in the fused elementwise kernel (a few passes, no graph of
    full-size temporaries).
    """
    flat_values, flat_weights = values.reshape(-1), weights.reshape(-1).to(values.dtype)
    mean = torch.dot(flat_values, flat_weights) / flat_weights.sum().clamp_min(1.0)
    bound = (1.0 - eps if increase else 1.0 + eps) * mean
    # Adding the negated bound: the scalar's gradient is then one sum of the incoming
    # gradient, where subtracting it would also negate that full-size gradient.
    return reduce_elementwise_terms(
        values + (-bound),
        [ElementwiseTerm(_squared_hinge(-1.0 if increase else 1.0), weights, reducer)],
    )


def intra_pair_variance_loss(
    mat: Tensor,
    pairs: PairWeights | PairIndices,
    pos_eps: float = 0.01,
    neg_eps: float = 0.01,
    is_inverted: bool = True,
    *,
    reducer: Reducer,
) -> Tensor:
    """Intra-pair variance loss (Yu and Tao 2019): each pair's squared excess beyond its side's
    mean, the mean relaxed by ε and differentiated through.

    For similarities, positives below ``(1 − ε₊)·mean₊`` give ``[(1 − ε₊)·mean₊ − s]₊²`` and
    negatives above ``(1 + ε₋)·mean₋`` give ``[s − (1 + ε₋)·mean₋]₊²``; for distances the
    roles of the two bounds swap. Each side is reduced on its own, then the two are summed.

    Args:
        mat: (N, M) similarities (or distances).
        pairs: Dense pair weights, or mined index lists; repeated pairs count as often as they
            occur.
        pos_eps: ε₊.
        neg_eps: ε₋.
        is_inverted: Whether ``mat`` holds similarities.
        reducer: Applied to each side separately.

    Returns:
        Scalar loss (first-order differentiable).
    """
    if isinstance(pairs, PairIndices):
        values = pairs.take(mat)
        pos_w = pairs.is_pos.to(values.dtype)
        neg_w = 1.0 - pos_w
    else:
        values, pos_w, neg_w = mat, pairs.pos, pairs.neg
    return _variance_term(values, pos_w, pos_eps, is_inverted, reducer) + _variance_term(
        values, neg_w, neg_eps, not is_inverted, reducer
    )


def instance_loss(sim: Tensor, labels: Tensor, gamma: float = 64.0, *, reducer: Reducer) -> Tensor:
    """Instance loss as PML computes it: cross-entropy of the scaled similarities ``γ·S[i, :]``
    (one logit per batch item) with target column ``rank(y_i)``, the rank of the item's label
    among the batch's distinct labels.

    With one distinct label per item, ranked as the items are ordered (``labels = arange(N)``),
    each item's target is itself (Zheng et al.'s instance classification within the batch).

    Args:
        sim: (N, N) similarities of the batch with itself.
        labels: (N,) labels.
        gamma: The scale γ.
        reducer: Over items.

    Returns:
        Scalar loss.
    """
    targets = dense_ranks(labels)
    return reducer(F.cross_entropy(sim * gamma, targets, reduction="none"))


__all__ = [
    "angular_loss",
    "instance_loss",
    "intra_pair_variance_loss",
    "shifted_cosine",
    "tuplet_margin_loss",
]
