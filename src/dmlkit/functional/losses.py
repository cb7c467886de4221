"""Loss formulas on dense (N, M) similarity or distance matrices.

Every function takes the matrix ``mat`` between anchors (rows) and references (columns), the pair
weights to use, and ``is_similarity`` (True when larger means closer: cosine or dot product). In
PML's terms ``margin(x, y)`` is ``x − y`` for distances and ``y − x`` for similarities, which lets
one formula serve both.

All formulas are written so that entries outside the selected pairs never produce Inf or NaN,
in forward or backward, and an empty selection gives a zero that keeps the graph.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from .logsumexp import masked_logsumexp
from .masks import PairIndices, PairWeights
from .reduction import (
    AvgNonZeroReducer,
    ElementwiseTerm,
    MeanReducer,
    Reducer,
    SumReducer,
    reduce_elementwise_terms,
)


def margin(x: Tensor | float, y: Tensor | float, is_similarity: bool) -> Tensor:
    """How far ``x`` is beyond ``y`` in the "farther apart" direction: x − y for distances,
    y − x for similarities."""
    out = y - x if is_similarity else x - y
    assert isinstance(out, Tensor)
    return out


def zero_loss(mat: Tensor) -> Tensor:
    """A zero that keeps the graph of ``mat`` (so backward works and gives zero gradients)."""
    return mat.sum() * 0.0


def _lacks_a_side(pairs: PairWeights) -> bool:
    """No positive pair or no negative pair at all: PML's rule for losses that need both."""
    return not (bool(pairs.pos.any()) and bool(pairs.neg.any()))


def contrastive_loss(
    mat: Tensor,
    pairs: PairWeights | PairIndices,
    pos_margin: float = 0.0,
    neg_margin: float = 1.0,
    is_similarity: bool = False,
    reducer: Reducer | None = None,
) -> Tensor:
    """Contrastive loss: ``[margin(d, pos_margin)]₊`` on positive pairs plus
    ``[margin(neg_margin, d)]₊`` on negative pairs, each side reduced on its own, then summed.

    Args:
        mat: (N, M) distances or similarities.
        pairs: Dense pair weights, or mined index lists (gathered: cost scales with the pairs).
        pos_margin: Positive pairs farther than this are penalised.
        neg_margin: Negative pairs closer than this are penalised.
        is_similarity: Whether ``mat`` holds similarities.
        reducer: Applied to each side separately; default ``AvgNonZeroReducer``.

    Returns:
        Scalar loss.
    """
    reducer = reducer or AvgNonZeroReducer()
    sign = -1.0 if is_similarity else 1.0
    pos_fn, neg_fn = _hinge(sign, -sign * pos_margin), _hinge(-sign, sign * neg_margin)
    if isinstance(pairs, PairIndices):
        values, pos_w, neg_w = pairs.gather(mat)
    else:
        values, pos_w, neg_w = mat, pairs.pos, pairs.neg
    return reduce_elementwise_terms(
        values, [ElementwiseTerm(pos_fn, pos_w, reducer), ElementwiseTerm(neg_fn, neg_w, reducer)]
    )


def _hinge(slope: float, offset: float) -> Callable[[Tensor], tuple[Tensor, Tensor]]:
    """``x ↦ ([slope·x + offset]₊, slope·1[value > 0])``."""

    def value_and_slope(x: Tensor) -> tuple[Tensor, Tensor]:
        value = torch.add(x, offset / slope).mul_(slope).relu_()
        return value, torch.sign(value).mul_(slope)

    return value_and_slope


def _softplus(scale: float, offset: float) -> Callable[[Tensor], tuple[Tensor, Tensor]]:
    """``x ↦ (softplus(scale·x + offset), scale·σ(scale·x + offset))``."""

    def value_and_slope(x: Tensor) -> tuple[Tensor, Tensor]:
        z = torch.mul(x, scale).add_(offset)
        return F.softplus(z), z.sigmoid_().mul_(scale)

    return value_and_slope


def multi_similarity_loss(
    mat: Tensor,
    pairs: PairWeights,
    alpha: float = 2.0,
    beta: float = 50.0,
    base: float = 0.5,
    is_similarity: bool = True,
    reducer: Reducer | None = None,
) -> Tensor:
    """Multi-similarity loss (Wang et al. 2019), per anchor i:
    ``(1/α)·log(1 + Σ_P exp(α·margin(S, base))) + (1/β)·log(1 + Σ_N exp(β·margin(base, S)))``.

    ``alpha`` scales positives and ``beta`` negatives (PML's letters).

    Args:
        mat: (N, M) similarities (or distances).
        pairs: Pair weights; repeated pairs count once.
        alpha: Positive scale.
        beta: Negative scale.
        base: The similarity the scales are centred on.
        is_similarity: Whether ``mat`` holds similarities.
        reducer: Over anchors; default ``MeanReducer`` (every anchor counts).

    Returns:
        Scalar loss.
    """
    reducer = reducer or MeanReducer()
    sign = -1.0 if is_similarity else 1.0  # margin(x, y) = sign·(x − y)
    pos_lse, _ = masked_logsumexp(
        mat, pairs.pos_indicator(), add_one=True, scale=alpha * sign, offset=-alpha * sign * base
    )
    neg_lse, _ = masked_logsumexp(
        mat, pairs.neg_indicator(), add_one=True, scale=-beta * sign, offset=beta * sign * base
    )
    return reducer((pos_lse / alpha + neg_lse / beta).squeeze(1))


def circle_loss(
    sim: Tensor,
    pairs: PairWeights,
    m: float = 0.4,
    gamma: float = 80.0,
    reducer: Reducer | None = None,
) -> Tensor:
    """Circle loss (Sun et al. 2020) for pair labels, per anchor:
    ``softplus(LSE_P(−γ·[1 + m − s]₊·(s − 1 + m)) + LSE_N(γ·[s + m]₊·(s − m)))``;
    the weights ``[·]₊`` are constants; anchors lacking a positive or a negative give 0.

    Args:
        sim: (N, M) cosine similarities.
        pairs: Pair weights; repeated pairs count once.
        m: Relaxation margin.
        gamma: Scale.
        reducer: Over anchors; default ``AvgNonZeroReducer``.

    Returns:
        Scalar loss.
    """
    reducer = reducer or AvgNonZeroReducer()
    detached = sim.detach()
    pos_logits = -gamma * F.relu(1.0 + m - detached) * (sim - (1.0 - m))
    neg_logits = gamma * F.relu(detached + m) * (sim - m)
    pos_lse, has_pos = masked_logsumexp(pos_logits, pairs.pos_indicator())
    neg_lse, has_neg = masked_logsumexp(neg_logits, pairs.neg_indicator())
    losses = F.softplus(pos_lse + neg_lse) * (has_pos * has_neg)
    return reducer(losses.squeeze(1))


def ntxent_loss(
    mat: Tensor,
    pairs: PairWeights,
    temperature: float = 0.07,
    is_similarity: bool = True,
    reducer: Reducer | None = None,
) -> Tensor:
    """NT-Xent / InfoNCE, per positive pair (a, p):
    ``−log(e^{s_ap/τ} / (e^{s_ap/τ} + Σ_{n ∈ N_a} e^{s_an/τ}))``, negative distances for distances.

    Args:
        mat: (N, M) similarities (or distances).
        pairs: Pair weights; repeated pairs count as often as they occur.
        temperature: τ.
        is_similarity: Whether ``mat`` holds similarities.
        reducer: Over positive pairs; default ``MeanReducer``.

    Returns:
        Scalar loss.
    """
    reducer = reducer or MeanReducer()
    if _lacks_a_side(pairs):
        return zero_loss(mat)
    sign = 1.0 if is_similarity else -1.0
    logits = mat * (sign / temperature)
    neg_lse, has_neg = masked_logsumexp(mat, pairs.neg, scale=sign / temperature)
    losses = F.softplus(neg_lse - logits) * has_neg
    return reducer(losses, pairs.pos)


def supcon_loss(
    mat: Tensor,
    pairs: PairWeights,
    temperature: float = 0.1,
    is_similarity: bool = True,
    reducer: Reducer | None = None,
) -> Tensor:
    """Supervised contrastive loss (Khosla et al. 2020), per anchor i:
    ``−mean_{p ∈ P_i} [s_ip/τ − log Σ_{j ∈ P_i ∪ N_i} e^{s_ij/τ}]``.

    Args:
        mat: (N, M) similarities (or distances).
        pairs: Pair weights; repeated pairs count once.
        temperature: τ.
        is_similarity: Whether ``mat`` holds similarities.
        reducer: Over anchors; default ``AvgNonZeroReducer``.

    Returns:
        Scalar loss.
    """
    reducer = reducer or AvgNonZeroReducer()
    if _lacks_a_side(pairs):
        return zero_loss(mat)
    pos, neg = pairs.pos_indicator(), pairs.neg_indicator()
    logits = (mat if is_similarity else -mat) / temperature
    denominator, _ = masked_logsumexp(logits, (pos + neg).clamp_max_(1.0))
    # mean_p (logit_ip − lse_i) = (Σ_p logit_ip)/|P_i| − lse_i, without an N × M log-prob matrix.
    n_pos = pos.sum(1, keepdim=True)
    mean_pos_logit = (logits * pos).sum(1, keepdim=True) / n_pos.clamp_min(1.0)
    losses = (denominator - mean_pos_logit) * (n_pos > 0)
    return reducer(losses.squeeze(1))


def lifted_structure_loss(
    mat: Tensor,
    pairs: PairWeights,
    neg_margin: float = 1.0,
    pos_margin: float = 0.0,
    is_similarity: bool = False,
    reducer: Reducer | None = None,
) -> Tensor:
    """Lifted structure loss (Oh Song et al. 2016), per positive pair (a, p):
    ``½·[LSE_{n ∈ N_a ∪ N_p} margin(neg_margin, d_n) + margin(d_ap, pos_margin)]₊²``.

    ``N_a`` and ``N_p`` are the negative pairs whose anchor is a or p. As in PML, p is looked up
    among the anchors' indices, so with a separate reference set only ``N_a`` (and the anchor
    that happens to share p's index) contributes.

    Args:
        mat: (N, M) distances (or similarities).
        pairs: Pair weights; repeated pairs count as often as they occur.
        neg_margin: Negatives closer than this are penalised.
        pos_margin: Positives farther than this are penalised.
        is_similarity: Whether ``mat`` holds similarities.
        reducer: Over positive pairs; default ``MeanReducer``.

    Returns:
        Scalar loss.
    """
    reducer = reducer or MeanReducer()
    if _lacks_a_side(pairs):
        return zero_loss(mat)
    n_rows, n_cols = mat.shape
    sign = -1.0 if is_similarity else 1.0
    row_lse, has_neg = masked_logsumexp(mat, pairs.neg, scale=-sign, offset=sign * neg_margin)
    lowest = torch.finfo(row_lse.dtype).min
    anchor_lse = torch.where(has_neg > 0, row_lse, lowest)  # (N, 1)
    k = min(n_rows, n_cols)
    # The positive's own negatives: p is looked up among the anchors (PML's convention).
    col_lse = torch.full((1, n_cols), lowest, dtype=row_lse.dtype, device=mat.device)
    col_lse = torch.cat([anchor_lse[:k, 0], col_lse[0, k:]])[None, :]
    col_has_neg = torch.zeros((1, n_cols), dtype=row_lse.dtype, device=mat.device)
    col_has_neg[0, :k] = has_neg[:k, 0]
    combined = torch.logaddexp(anchor_lse, col_lse)
    # A pair (a, a) exists only between a batch and a separate reference set; its union of
    # negatives is N_a once, not twice.
    same_index = torch.arange(k, device=mat.device)
    combined = combined.index_put((same_index, same_index), anchor_lse[:k, 0])
    combined = combined * torch.clamp_max(has_neg + col_has_neg, 1.0)
    losses = F.relu(combined + margin(mat, pos_margin, is_similarity)).pow(2) / 2
    return reducer(losses, pairs.pos)


def generalized_lifted_structure_loss(
    mat: Tensor,
    pairs: PairWeights,
    neg_margin: float = 1.0,
    pos_margin: float = 0.0,
    is_similarity: bool = False,
    reducer: Reducer | None = None,
) -> Tensor:
    """Generalised lifted structure loss (Hermans et al. 2017), per anchor:
    ``[LSE_P margin(d, pos_margin) + LSE_N margin(neg_margin, d)]₊``.

    Args:
        mat: (N, M) distances (or similarities).
        pairs: Pair weights; repeated pairs count once.
        neg_margin: Negative margin.
        pos_margin: Positive margin.
        is_similarity: Whether ``mat`` holds similarities.
        reducer: Over anchors; default ``MeanReducer``.

    Returns:
        Scalar loss.
    """
    reducer = reducer or MeanReducer()
    sign = -1.0 if is_similarity else 1.0
    pos_lse, _ = masked_logsumexp(mat, pairs.pos_indicator(), scale=sign, offset=-sign * pos_margin)
    neg_lse, _ = masked_logsumexp(mat, pairs.neg_indicator(), scale=-sign, offset=sign * neg_margin)
    return reducer(F.relu(pos_lse + neg_lse).squeeze(1))


def npairs_loss(mat: Tensor, is_similarity: bool = True, reducer: Reducer | None = None) -> Tensor:
    """N-pair loss (Sohn 2016): cross-entropy of each anchor against all positives.

    Args:
        mat: (P, P) similarities between P anchors (one per class) and their positives.
        is_similarity: Whether ``mat`` holds similarities.
        reducer: Over anchors; default ``MeanReducer``.

    Returns:
        Scalar loss.
    """
    reducer = reducer or MeanReducer()
    logits = mat if is_similarity else -mat
    losses = torch.logsumexp(logits, dim=1) - logits.diagonal()
    return reducer(losses)


def soft_contrastive_loss(
    sim: Tensor,
    pairs: PairWeights | PairIndices,
    pos_scale: float = 2.0,
    neg_scale: float = 40.0,
    threshold: float = 0.7,
) -> Tensor:
    """DDTAS's Soft Contrastive loss with its released reduction (ddtas.md §4):

    ``L = (1/B)·Σ_{i: P_i ≠ ∅, N_i ≠ ∅} [(2/β)·mean_{P_i} softplus(−β(S − λ))
    + (2/α)·mean_{N_i} softplus(α(S − λ))]`` with β = ``pos_scale``, α = ``neg_scale``,
    λ = ``threshold`` and B the number of anchors, skipped ones included.

    Args:
        sim: (B, M) similarities.
        pairs: Mined pairs, as index lists (gathered: cost scales with the pairs) or dense
            weights; repeated pairs count as often as they occur.
        pos_scale: β, the positive scale.
        neg_scale: α, the negative scale.
        threshold: λ.

    Returns:
        Scalar loss (zero with a graph when every anchor is skipped).
    """
    n_anchors = sim.shape[0]
    pos_fn = _softplus(-pos_scale, pos_scale * threshold)
    neg_fn = _softplus(neg_scale, -neg_scale * threshold)
    total = SumReducer()
    with torch.no_grad():
        if isinstance(pairs, PairIndices):
            n_pos = torch.bincount(pairs.a1, minlength=n_anchors).to(sim.dtype)
            n_neg = torch.bincount(pairs.a2, minlength=n_anchors).to(sim.dtype)
        else:
            n_pos, n_neg = pairs.pos.to(sim.dtype).sum(1), pairs.neg.to(sim.dtype).sum(1)
        valid = ((n_pos > 0) & (n_neg > 0)).to(sim.dtype) / n_anchors
        pos_per_anchor = valid * (2.0 / pos_scale) / n_pos.clamp_min(1.0)
        neg_per_anchor = valid * (2.0 / neg_scale) / n_neg.clamp_min(1.0)
    if isinstance(pairs, PairIndices):
        values, is_pos, is_neg = pairs.gather(sim)
        anchors = torch.cat([pairs.a1, pairs.a2])
        pos_w, neg_w = is_pos * pos_per_anchor[anchors], is_neg * neg_per_anchor[anchors]
    else:
        values = sim
        pos_w = pairs.pos.to(sim.dtype) * pos_per_anchor[:, None]
        neg_w = pairs.neg.to(sim.dtype) * neg_per_anchor[:, None]
    return reduce_elementwise_terms(
        values, [ElementwiseTerm(pos_fn, pos_w, total), ElementwiseTerm(neg_fn, neg_w, total)]
    )


def soft_weighted_triplet_loss(
    mat: Tensor,
    pos_mask: Tensor,
    neg_mask: Tensor,
    margin_value: float = 0.3,
    is_similarity: bool = False,
    reducer: Reducer | None = None,
) -> Tensor:
    """fast-reid's soft-weighted batch triplet loss: for each anchor, the positive distance is
    averaged with softmax weights over its positives' distances (the farthest weigh most) and
    the negative distance with softmax weights over minus its negatives' distances (the nearest
    weigh most); then ``[d̄_ap − d̄_an + margin]₊``, or ``softplus(d̄_ap − d̄_an)`` when
    ``margin ≤ 0``. The weights carry gradient, as in fast-reid.

    Args:
        mat: (N, M) distances (or similarities, read as negative distances).
        pos_mask: Bool (N, M) positives.
        neg_mask: Bool (N, M) negatives.
        margin_value: The margin; ≤ 0 selects the soft margin.
        is_similarity: Whether ``mat`` holds similarities.
        reducer: Over anchors having both a positive and a negative; default ``MeanReducer``.

    Returns:
        Scalar loss.
    """
    reducer = reducer or MeanReducer()
    dist = -mat if is_similarity else mat
    lowest = torch.finfo(dist.dtype).min
    valid = pos_mask.any(1) & neg_mask.any(1)
    pos_w = torch.softmax(torch.where(pos_mask, dist, lowest), dim=1)
    neg_w = torch.softmax(torch.where(neg_mask, -dist, lowest), dim=1)
    d_ap = torch.where(pos_mask, pos_w * dist, 0.0).sum(1)
    d_an = torch.where(neg_mask, neg_w * dist, 0.0).sum(1)
    violation = d_ap - d_an
    losses = F.relu(violation + margin_value) if margin_value > 0 else F.softplus(violation)
    return reducer(losses, valid)
