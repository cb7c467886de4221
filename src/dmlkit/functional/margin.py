"""The margin loss (Wu et al. 2017) on dense per-pair triplet counts.

Its terms are per pair, not per triplet: a triplet (a, p, n) contributes
``[d_ap − β + α]₊`` and ``[β − d_an + α]₊``, so the loss over any set of triplets is a sum
over (anchor, reference) pairs weighted by how many of the triplets hold each pair. All the
triplets of a batch then cost an (N, M) matrix, not N·P·Q triplets.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .losses import margin as margin_between
from .masks import PairWeights
from .reduction import Reducer


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
    terms = F.relu(
        torch.stack(
            [margin_between(mat, beta, is_inverted), margin_between(beta, mat, is_inverted)]
        )
        + margin
    )
    weights = torch.stack([triplets.pos, triplets.neg])
    with torch.no_grad():
        divisor = (weights * (terms > 0)).sum()
    loss = reducer(terms, weights, divisor=divisor)
    if anchor_penalty is not None:
        loss = loss + reducer(anchor_penalty, triplets.pos.sum(dim=1), divisor=divisor)
    return loss


__all__ = ["margin_loss", "triplet_pair_weights"]
