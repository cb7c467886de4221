"""Loss formulas on (N, M) similarity or distance matrices.

Every loss function takes the matrix ``mat`` between anchors (rows) and references (columns), the
pairs to use, ``is_inverted`` (True when larger means closer: cosine or dot product, PML's name)
and the reducer, which the caller always gives. In PML's terms ``margin(x, y)`` is ``x − y`` for
distances and ``y − x`` for similarities, which lets one formula serve both. DDTAS's losses are
written once on per-pair values (``*_per_anchor``), which its Online Threshold Generator also
differentiates.

All formulas are written so that entries outside the selected pairs never produce Inf or NaN,
in forward or backward, and an empty selection gives a zero that keeps the graph.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from .logsumexp import masked_logsumexp
from .masks import PairIndices, PairWeights, index_counts, side_groups
from .reduction import ElementwiseTerm, Reducer, reduce_elementwise_terms, row_blocks


def margin(x: Tensor | float, y: Tensor | float, is_inverted: bool) -> Tensor:
    """How far ``x`` is beyond ``y`` in the "farther apart" direction: x − y for distances,
    y − x for similarities."""
    out = y - x if is_inverted else x - y
    assert isinstance(out, Tensor)
    return out


def zero_loss(mat: Tensor) -> Tensor:
    """A zero that keeps the graph of ``mat`` (so backward works and gives zero gradients)."""
    return mat.sum() * 0.0


def zero_unless(condition: Tensor, loss: Tensor, mat: Tensor) -> Tensor:
    """``loss`` where ``condition`` holds, else PML's zero (one that keeps the graph), for a
    loss that PML skips under a condition on the data.

    A scalar loss (every :class:`Reducer`'s) is selected on the device, so the host never
    reads the condition; the loss must then be finite, value and gradient, when the condition
    fails. Unreduced losses (a reducer returning the elements) become the scalar zero, as in
    PML, which needs the host to read the condition (their selection already read several
    values).

    Args:
        condition: 0-d bool tensor.
        loss: The loss where the condition holds.
        mat: A tensor the zero stays attached to.
    """
    if loss.ndim == 0:
        return torch.where(condition, loss, 0.0)
    return loss if bool(condition) else zero_loss(mat)


def _has_both_sides(pairs: PairWeights) -> Tensor:
    """Whether there is a positive and a negative pair (0-d bool): PML computes the losses
    that need both only then."""
    return pairs.pos.any() & pairs.neg.any()


def contrastive_loss(
    mat: Tensor,
    pairs: PairWeights | PairIndices,
    pos_margin: float = 0.0,
    neg_margin: float = 1.0,
    is_inverted: bool = False,
    *,
    reducer: Reducer,
) -> Tensor:
    """Contrastive loss: ``[margin(d, pos_margin)]₊`` on positive pairs plus
    ``[margin(neg_margin, d)]₊`` on negative pairs, each side reduced on its own, then summed.

    Args:
        mat: (N, M) distances or similarities.
        pairs: Dense pair weights, or mined index lists (gathered: cost scales with the pairs).
        pos_margin: Positive pairs farther than this are penalised.
        neg_margin: Negative pairs closer than this are penalised.
        is_inverted: Whether ``mat`` holds similarities.
        reducer: Applied to each side separately.

    Returns:
        Scalar loss.
    """
    sign = -1.0 if is_inverted else 1.0
    pos_fn, neg_fn = _hinge(sign, -sign * pos_margin), _hinge(-sign, sign * neg_margin)
    if isinstance(pairs, PairIndices):
        values = pairs.take(mat)
        pos_w = pairs.is_pos.to(values.dtype)
        neg_w = 1.0 - pos_w
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


def multi_similarity_loss(
    mat: Tensor,
    pairs: PairWeights,
    alpha: float = 2.0,
    beta: float = 50.0,
    base: float = 0.5,
    is_inverted: bool = True,
    *,
    reducer: Reducer,
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
        is_inverted: Whether ``mat`` holds similarities.
        reducer: Over anchors.

    Returns:
        Scalar loss.
    """
    sign = -1.0 if is_inverted else 1.0  # margin(x, y) = sign·(x − y)
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
    *,
    reducer: Reducer,
) -> Tensor:
    """Circle loss (Sun et al. 2020) for pair labels, per anchor:
    ``softplus(LSE_P(−γ·[1 + m − s]₊·(s − 1 + m)) + LSE_N(γ·[s + m]₊·(s − m)))``;
    the weights ``[·]₊`` are constants; anchors lacking a positive or a negative give 0.

    Args:
        sim: (N, M) cosine similarities.
        pairs: Pair weights; repeated pairs count once.
        m: Relaxation margin.
        gamma: Scale.
        reducer: Over anchors.

    Returns:
        Scalar loss.
    """
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
    is_inverted: bool = True,
    *,
    reducer: Reducer,
) -> Tensor:
    """NT-Xent / InfoNCE, per positive pair (a, p):
    ``−log(e^{s_ap/τ} / (e^{s_ap/τ} + Σ_{n ∈ N_a} e^{s_an/τ}))``, negative distances for distances.

    Args:
        mat: (N, M) similarities (or distances).
        pairs: Pair weights; repeated pairs count as often as they occur.
        temperature: τ.
        is_inverted: Whether ``mat`` holds similarities.
        reducer: Over positive pairs.

    Returns:
        Scalar loss.
    """
    sign = 1.0 if is_inverted else -1.0
    logits = mat * (sign / temperature)
    neg_lse, has_neg = masked_logsumexp(mat, pairs.neg, scale=sign / temperature)
    losses = F.softplus(neg_lse - logits) * has_neg
    return zero_unless(_has_both_sides(pairs), reducer(losses, pairs.pos), mat)


def supcon_loss(
    mat: Tensor,
    pairs: PairWeights,
    temperature: float = 0.1,
    is_inverted: bool = True,
    *,
    reducer: Reducer,
) -> Tensor:
    """Supervised contrastive loss (Khosla et al. 2020), per anchor i:
    ``−mean_{p ∈ P_i} [s_ip/τ − log Σ_{j ∈ P_i ∪ N_i} e^{s_ij/τ}]``.

    Args:
        mat: (N, M) similarities (or distances).
        pairs: Pair weights; repeated pairs count once.
        temperature: τ.
        is_inverted: Whether ``mat`` holds similarities.
        reducer: Over anchors.

    Returns:
        Scalar loss.
    """
    pos, neg = pairs.pos_indicator(), pairs.neg_indicator()
    logits = (mat if is_inverted else -mat) / temperature
    denominator, _ = masked_logsumexp(logits, (pos + neg).clamp_max_(1.0))
    # mean_p (logit_ip − lse_i) = (Σ_p logit_ip)/|P_i| − lse_i, without an N × M log-prob matrix.
    n_pos = pos.sum(1, keepdim=True)
    mean_pos_logit = (logits * pos).sum(1, keepdim=True) / n_pos.clamp_min(1.0)
    losses = (denominator - mean_pos_logit) * (n_pos > 0)
    return zero_unless(_has_both_sides(pairs), reducer(losses.squeeze(1)), mat)


def lifted_structure_loss(
    mat: Tensor,
    pairs: PairWeights,
    neg_margin: float = 1.0,
    pos_margin: float = 0.0,
    is_inverted: bool = False,
    *,
    reducer: Reducer,
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
        is_inverted: Whether ``mat`` holds similarities.
        reducer: Over positive pairs.

    Returns:
        Scalar loss.
    """
    sign = -1.0 if is_inverted else 1.0
    row_lse, has_neg = masked_logsumexp(mat, pairs.neg, scale=-sign, offset=sign * neg_margin)
    anchor_lse = torch.where(has_neg > 0, row_lse, torch.finfo(row_lse.dtype).min)  # (N, 1)
    constants = (has_neg, sign, pos_margin)
    if reducer.fusable:
        loss = _LiftedPairLosses.apply(mat, anchor_lse, pairs.pos, reducer, *constants)
    else:
        losses = _LiftedPairLosses.apply(mat, anchor_lse, None, None, *constants)
        loss = reducer(losses, pairs.pos)
    both_sides = pairs.pos.any() & has_neg.any()
    return zero_unless(both_sides, loss, mat)


def _lifted_block(
    mat: Tensor,
    anchor_lse: Tensor,
    has_neg: Tensor,
    rows: slice,
    sign: float,
    pos_margin: float,
    slopes: bool = False,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """One row block of the lifted structure losses, from the anchors' negative log-sum-exps.

    Returns:
        (losses, hinge, d_anchor, d_column): ``½·hinge²``; the hinge; with ``slopes``, the
        derivatives of each entry's combined log-sum-exp with respect to its row's and its
        column's ``anchor_lse`` (zero where neither side has negatives), else None.
    """
    n_rows, n_cols = mat.shape
    k = min(n_rows, n_cols)
    a = anchor_lse[rows]  # (B, 1)
    # The positive's own negatives: p is looked up among the anchors (PML's convention).
    lowest = torch.finfo(anchor_lse.dtype).min
    c = torch.cat([anchor_lse[:k, 0], anchor_lse.new_full((n_cols - k,), lowest)])
    c_has = torch.cat([has_neg[:k, 0], has_neg.new_zeros(n_cols - k)])
    gap = a - c
    # logaddexp(a, c) = max(a, c) − log σ(|a − c|): σ(|a − c|) lies in [½, 1], so its log is
    # exact and cheap (log1p and logaddexp are several times slower on CPU).
    combined = torch.maximum(a, c).sub_(torch.abs(gap).sigmoid_().log_())
    # A pair (a, a) exists only between a batch and a separate reference set; its union of
    # negatives is N_a once, not twice.
    diagonal = combined.diagonal(rows.start)
    diagonal.copy_(a[: diagonal.numel(), 0])
    # Where neither side has a negative the union is empty: PML's log-sum-exp of it is 0.
    either = torch.maximum(has_neg[rows], c_has)
    hinge = combined.mul_(either).add_(mat[rows], alpha=sign).sub_(sign * pos_margin).relu_()
    losses = hinge.square().mul_(0.5)
    if not slopes:
        return losses, hinge, None, None
    d_anchor = gap.sigmoid_()
    d_column = torch.sub(1.0, d_anchor).mul_(either)
    d_anchor.mul_(either)
    d_anchor.diagonal(rows.start).copy_(either.diagonal(rows.start))
    d_column.diagonal(rows.start).fill_(0.0)
    return losses, hinge, d_anchor, d_column


class _LiftedPairLosses(torch.autograd.Function):
    """The lifted structure losses of all pairs, over row blocks.

    Given a fusable reducer, forward keeps only its total and count and returns the reduced
    loss; given none, it returns the (N, M) losses. Backward recomputes each block, so nothing
    full-size exists but the gradient and those losses (the plain formula costs some twenty
    full-size passes).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        mat: Tensor,
        anchor_lse: Tensor,
        weights: Tensor | None,
        reducer: Reducer | None,
        has_neg: Tensor,
        sign: float,
        pos_margin: float,
    ) -> Tensor:
        ctx.save_for_backward(mat, anchor_lse, has_neg, weights)
        ctx.reducer, ctx.sign, ctx.pos_margin = reducer, sign, pos_margin
        losses = torch.empty_like(mat) if reducer is None else None
        total, count = mat.new_zeros(()), mat.new_zeros(())
        for rows in row_blocks(*mat.shape):
            values = _lifted_block(mat, anchor_lse, has_neg, rows, sign, pos_margin)[0]
            if losses is not None:
                losses[rows] = values
                continue
            assert reducer is not None and weights is not None
            w = reducer.effective_weights(values, weights[rows])
            assert w is not None  # the pair weights are given
            total += torch.dot(values.flatten(), w.flatten())
            count += w.sum()
        if losses is not None:
            return losses
        assert reducer is not None
        # The reduction is linear in its total: its scale is the reducer's value of a total of 1.
        ctx.scale = reducer.finish(torch.ones_like(count), count)
        return total * ctx.scale

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        mat, anchor_lse, has_neg, weights = ctx.saved_tensors
        grad_mat = torch.empty_like(mat)
        grad_rows = torch.empty_like(anchor_lse)
        grad_columns = mat.new_zeros(mat.shape[1])
        for rows in row_blocks(*mat.shape):
            values, hinge, d_anchor, d_column = _lifted_block(
                mat, anchor_lse, has_neg, rows, ctx.sign, ctx.pos_margin, slopes=True
            )
            assert d_anchor is not None and d_column is not None
            if ctx.reducer is None:
                upstream = hinge.mul_(grad_out[rows])
            else:
                w = ctx.reducer.effective_weights(values, weights[rows])
                upstream = hinge.mul_(w).mul_(grad_out * ctx.scale)
            torch.mul(upstream, ctx.sign, out=grad_mat[rows])
            grad_rows[rows] = (upstream * d_anchor).sum(1, keepdim=True)
            grad_columns += (upstream * d_column).sum(0)
        k = min(mat.shape)
        grad_rows[:k, 0] += grad_columns[:k]
        return grad_mat, grad_rows, None, None, None, None, None


def generalized_lifted_structure_loss(
    mat: Tensor,
    pairs: PairWeights,
    neg_margin: float = 1.0,
    pos_margin: float = 0.0,
    is_inverted: bool = False,
    *,
    reducer: Reducer,
) -> Tensor:
    """Generalised lifted structure loss (Hermans et al. 2017), per anchor:
    ``[LSE_P margin(d, pos_margin) + LSE_N margin(neg_margin, d)]₊``.

    Args:
        mat: (N, M) distances (or similarities).
        pairs: Pair weights; repeated pairs count once.
        neg_margin: Negative margin.
        pos_margin: Positive margin.
        is_inverted: Whether ``mat`` holds similarities.
        reducer: Over anchors.

    Returns:
        Scalar loss.
    """
    sign = -1.0 if is_inverted else 1.0
    pos_lse, _ = masked_logsumexp(mat, pairs.pos_indicator(), scale=sign, offset=-sign * pos_margin)
    neg_lse, _ = masked_logsumexp(mat, pairs.neg_indicator(), scale=-sign, offset=sign * neg_margin)
    return reducer(F.relu(pos_lse + neg_lse).squeeze(1))


def npairs_loss(mat: Tensor, is_inverted: bool = True, *, reducer: Reducer) -> Tensor:
    """N-pair loss (Sohn 2016): cross-entropy of each anchor against all positives.

    Args:
        mat: (P, P) similarities between P anchors (one per class) and their positives.
        is_inverted: Whether ``mat`` holds similarities.
        reducer: Over anchors.

    Returns:
        Scalar loss.
    """
    logits = mat if is_inverted else -mat
    losses = torch.logsumexp(logits, dim=1) - logits.diagonal()
    return reducer(losses)


def _ddtas_sides(
    values: Tensor,
    anchors: Tensor,
    is_pos: Tensor,
    n_anchors: int,
    pos_scale: float,
    neg_scale: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The constants DDTAS's per-pair losses share, without gradient.

    Returns:
        (group, sizes, side_weight, slope): each pair's (anchor, side) group (see
        :func:`side_groups`); the (n_anchors, 2) number of pairs of each group; the
        (n_anchors, 2) side scales 2/β and 2/α, zeroed for anchors lacking a side (skipped);
        and each pair's slope, −β for positive pairs and α for negative ones.
    """
    with torch.no_grad():
        group = side_groups(anchors, is_pos)
        sizes = index_counts(group, 2 * n_anchors).view(n_anchors, 2)
        side_weight = _side_weights(sizes, pos_scale, neg_scale, values)
        slope = torch.where(is_pos, values.new_full((), -pos_scale), values.new_full((), neg_scale))
    return group, sizes, side_weight, slope


def soft_contrastive_per_anchor(
    values: Tensor,
    anchors: Tensor,
    is_pos: Tensor,
    n_anchors: int,
    pos_scale: float = 2.0,
    neg_scale: float = 40.0,
    thresholds: float | Tensor = 0.7,
    term_weights: Tensor | None = None,
) -> Tensor:
    """DDTAS's Soft Contrastive loss of each anchor (docs/ddtas.md §4), from per-pair values.

    For an anchor i with at least one positive and one negative pair,
    ``ℓ_i = (2/β)·mean_{P_i} softplus(−β(x − t)) + (2/α)·mean_{N_i} softplus(α(x − t))`` with
    β = ``pos_scale``, α = ``neg_scale`` and t the threshold; every other anchor has ℓ_i = 0.
    The released reduction is the mean over all anchors, skipped ones included.

    Plain autograd on the K pair values: twice differentiable, as the Online Threshold
    Generator needs, and its cost scales with the pairs.

    Args:
        values: (K,) per-pair values x_k (similarities, or similarities times per-pair weights).
        anchors: (K,) anchor index of each pair, in any order; repeats count as often as they
            occur.
        is_pos: (K,) bool, True for positive pairs.
        n_anchors: Number of anchors.
        pos_scale: β, the positive scale.
        neg_scale: α, the negative scale.
        thresholds: t, a number or one per pair.
        term_weights: (K,) w_k multiplying each pair's softplus term (the OTG's loss-weights
            reading); None for 1. The means still divide by the pair counts.

    Returns:
        (n_anchors,) losses; a graph to ``values`` even when every anchor is skipped.
    """
    group, sizes, _, slope = _ddtas_sides(values, anchors, is_pos, n_anchors, pos_scale, neg_scale)
    terms = F.softplus(slope * (values - thresholds))
    if term_weights is not None:
        terms = terms * term_weights
    side_sums = values.new_zeros(2 * n_anchors).index_add(0, group, terms).view(n_anchors, 2)
    return _soft_contrastive_combine(side_sums, sizes, pos_scale, neg_scale)


def _soft_contrastive_combine(
    side_sums: Tensor, sizes: Tensor, pos_scale: float, neg_scale: float
) -> Tensor:
    """ℓ_i from each anchor's (positive, negative) sums of softplus terms and pair counts, both
    (N, 2): the one place the Soft Contrastive loss's per-anchor form is written, whichever way
    the pairs are held (index lists or dense weights)."""
    with torch.no_grad():
        scale = _side_weights(sizes, pos_scale, neg_scale, side_sums) / sizes.clamp_min(1)
    return (side_sums * scale).sum(1)


def _side_weights(sizes: Tensor, pos_scale: float, neg_scale: float, like: Tensor) -> Tensor:
    """(N, 2) side scales 2/β and 2/α, zeroed for anchors lacking a side (they are skipped)."""
    counted = (sizes > 0).all(1, keepdim=True)
    # Constants in the values' dtype (a float32 0.05 is off by 1.5e-8 in float64), filled on
    # the device (a tensor built from a Python list is a blocking host→device copy).
    scales = (like.new_full((), 2.0 / pos_scale), like.new_full((), 2.0 / neg_scale))
    return counted * torch.stack(scales)


def _soft_contrastive_dense(
    sim: Tensor, pairs: PairWeights, pos_scale: float, neg_scale: float, threshold: float
) -> Tensor:
    """:func:`soft_contrastive_per_anchor` over dense pair weights: row sums instead of index
    lists, so using every labelled pair costs no N × M ``nonzero``."""
    shifted = sim - threshold
    pos_sums = (F.softplus(shifted * -pos_scale) * pairs.pos).sum(1)
    neg_sums = (F.softplus(shifted * neg_scale) * pairs.neg).sum(1)
    with torch.no_grad():
        sizes = torch.stack([pairs.pos.sum(1), pairs.neg.sum(1)], dim=1)
    return _soft_contrastive_combine(
        torch.stack([pos_sums, neg_sums], dim=1), sizes, pos_scale, neg_scale
    )


def otg_multi_similarity_per_anchor(
    values: Tensor,
    anchors: Tensor,
    is_pos: Tensor,
    n_anchors: int,
    pos_scale: float = 2.0,
    neg_scale: float = 40.0,
    thresholds: float | Tensor = 0.7,
    term_weights: Tensor | None = None,
) -> Tensor:
    """The multi-similarity form of DDTAS's released OTG loss (docs/ddtas.md §5.1 step 4), per
    anchor, from per-pair values.

    For an anchor i with at least one positive and one negative pair,
    ``ℓ_i = (2/β)·log(1 + Σ_{P_i} exp(−β(x − t))) + (2/α)·log(1 + Σ_{N_i} exp(α(x − t)))``;
    every other anchor has ℓ_i = 0. Each log(1 + Σ exp) is the softplus of a per-group
    log-sum-exp, stable for large exponents. Plain autograd, twice differentiable.

    Args:
        values: (K,) per-pair values x_k.
        anchors: (K,) anchor index of each pair, in any order.
        is_pos: (K,) bool, True for positive pairs.
        n_anchors: Number of anchors.
        pos_scale: β, the positive scale.
        neg_scale: α, the negative scale.
        thresholds: t (the base b of the MS loss), a number or one per pair.
        term_weights: (K,) w_k multiplying each pair's exponential term; None for 1.

    Returns:
        (n_anchors,) losses; a graph to ``values`` even when every anchor is skipped.
    """
    group, _, side_weight, slope = _ddtas_sides(
        values, anchors, is_pos, n_anchors, pos_scale, neg_scale
    )
    exponent = slope * (values - thresholds)
    with torch.no_grad():
        peak = values.new_full((2 * n_anchors,), float("-inf"))
        peak = peak.scatter_reduce(0, group, exponent.detach(), "amax")
        present = torch.isfinite(peak)
        peak = torch.where(present, peak, 0.0)
    terms = torch.exp(exponent - peak[group])
    if term_weights is not None:
        terms = terms * term_weights
    sums = values.new_zeros(2 * n_anchors).index_add(0, group, terms)
    # A side whose terms are all weighted 0 sums to 0: its log(1 + 0) is 0, and log(0) must
    # not enter the graph (its gradient would be NaN).
    present = present & (sums.detach() > 0)
    lse = torch.where(present, peak + torch.log(torch.where(present, sums, 1.0)), -torch.inf)
    return (F.softplus(lse).view(n_anchors, 2) * side_weight).sum(1)


def soft_contrastive_loss(
    sim: Tensor,
    pairs: PairIndices | PairWeights,
    pos_scale: float = 2.0,
    neg_scale: float = 40.0,
    threshold: float = 0.7,
    *,
    reducer: Reducer,
) -> Tensor:
    """DDTAS's Soft Contrastive loss (docs/ddtas.md §4): :func:`soft_contrastive_per_anchor` on
    the pairs' similarities, reduced over anchors. ``MeanReducer`` gives the released reduction:

    ``L = (1/B)·Σ_{i: P_i ≠ ∅, N_i ≠ ∅} [(2/β)·mean_{P_i} softplus(−β(S − λ))
    + (2/α)·mean_{N_i} softplus(α(S − λ))]`` with B the number of anchors, skipped ones
    included.

    Args:
        sim: (B, M) similarities.
        pairs: The pairs, as index lists (mined: cost scales with the pairs) or dense weights
            (every labelled pair); repeated pairs count as often as they occur.
        pos_scale: β, the positive scale.
        neg_scale: α, the negative scale.
        threshold: λ.
        reducer: Over anchors (skipped anchors hold 0).

    Returns:
        Scalar loss (zero with a graph when every anchor is skipped).
    """
    if isinstance(pairs, PairWeights):
        return reducer(_soft_contrastive_dense(sim, pairs, pos_scale, neg_scale, threshold))
    per_anchor = soft_contrastive_per_anchor(
        pairs.take(sim), pairs.anchors, pairs.is_pos, sim.shape[0], pos_scale, neg_scale, threshold
    )
    return reducer(per_anchor)


def soft_weighted_triplet_loss(
    mat: Tensor,
    pos_mask: Tensor,
    neg_mask: Tensor,
    margin_value: float = 0.3,
    is_inverted: bool = False,
    *,
    reducer: Reducer,
) -> Tensor:
    """fast-reid's soft-weighted batch triplet loss: for each anchor, the positive distance is
    averaged with softmax weights over its positives' distances (the farthest weigh most) and
    the negative distance with softmax weights over minus its negatives' distances (the nearest
    weigh most); then ``[d̄_ap − d̄_an + margin]₊``, or ``softplus(d̄_ap − d̄_an)`` when
    ``margin ≤ 0``. The weights carry gradient, as in fast-reid.

    Args:
        mat: (N, M) distances (or similarities, read as negative distances).
        pos_mask: (N, M) positives: bool, or weights where non-zero selects.
        neg_mask: (N, M) negatives, in the same form.
        margin_value: The margin; ≤ 0 selects the soft margin.
        is_inverted: Whether ``mat`` holds similarities.
        reducer: Over anchors having both a positive and a negative.

    Returns:
        Scalar loss.
    """
    d_ap, d_an, valid = _SoftWeightedMeans.apply(
        mat, pos_mask, neg_mask, -1.0 if is_inverted else 1.0
    )
    violation = d_ap - d_an
    losses = F.relu(violation + margin_value) if margin_value > 0 else F.softplus(violation)
    return reducer(losses, valid)


def _softmax_mean(
    dist: Tensor, selected: Tensor, nearest: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Each row's softmax-weighted mean of ``dist`` over its selected entries: softmax(d), or
    softmax(−d) when ``nearest``.

    Returns:
        (exps, total, mean, nonempty): the unnormalised weights, 0 outside the selection; their
        (B, 1) row sums, 1 for a row selecting nothing (whose mean is then 0); the (B, 1)
        means; (B, 1) bool, whether the row selects anything.
    """
    fill = torch.inf if nearest else -torch.inf
    exps = torch.where(selected, dist, fill)
    if exps.shape[1] == 0:  # no reference: the reductions below need one column
        peak = exps.new_full((exps.shape[0], 1), fill)
    else:
        peak = exps.amin(1, keepdim=True) if nearest else exps.amax(1, keepdim=True)
    nonempty = peak != fill
    peak = torch.where(nonempty, peak, 0.0)
    exps = torch.sub(peak, exps, out=exps) if nearest else exps.sub_(peak)
    exps.exp_()
    # The largest weight is exp(0) = 1, so the clamp changes only the empty rows' sums.
    total = exps.sum(1, keepdim=True).clamp_min_(1.0)
    mean = torch.linalg.vecdot(exps, dist).unsqueeze(1).div_(total)
    return exps, total, mean, nonempty


def _soft_weighted_block(
    mat: Tensor, pos: Tensor, neg: Tensor, rows: slice, sign: float
) -> tuple[Tensor, tuple[Tensor, ...], tuple[Tensor, ...]]:
    """One row block of the soft-weighted means: the block's distances and, for the positives
    and the negatives, :func:`_softmax_mean`'s results."""
    dist = mat[rows] if sign > 0 else mat[rows] * sign
    pos_side = _softmax_mean(dist, pos[rows] != 0, nearest=False)
    neg_side = _softmax_mean(dist, neg[rows] != 0, nearest=True)
    return dist, pos_side, neg_side


class _SoftWeightedMeans(torch.autograd.Function):
    """Each row's softmax(d)-weighted mean d̄_ap of its positives' distances d and
    softmax(−d)-weighted mean d̄_an of its negatives', over row blocks, and whether the row has
    both sides.

    Backward recomputes each block, so nothing full-size exists but the gradient (the plain
    formula costs some twenty full-size passes). With p a row's positive softmax weights,
    ``∂d̄_ap/∂d_j = p_j·(1 + d_j − d̄_ap)``; with q its negative ones,
    ``∂d̄_an/∂d_j = q_j·(1 − d_j + d̄_an)``.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, mat: Tensor, pos: Tensor, neg: Tensor, sign: float
    ) -> tuple[Tensor, Tensor, Tensor]:
        ctx.save_for_backward(mat, pos, neg)
        ctx.sign = sign
        d_ap, d_an = mat.new_empty(mat.shape[0], 1), mat.new_empty(mat.shape[0], 1)
        valid = torch.empty(mat.shape[0], 1, dtype=torch.bool, device=mat.device)
        for rows in row_blocks(*mat.shape):
            _, pos_side, neg_side = _soft_weighted_block(mat, pos, neg, rows, sign)
            d_ap[rows], d_an[rows] = pos_side[2], neg_side[2]
            torch.logical_and(pos_side[3], neg_side[3], out=valid[rows])
        ctx.mark_non_differentiable(valid)
        return d_ap.squeeze(1), d_an.squeeze(1), valid.squeeze(1)

    @staticmethod
    @once_differentiable
    def backward(
        ctx: Any, grad_ap: Tensor, grad_an: Tensor, _grad_valid: Tensor | None
    ) -> tuple[Tensor | None, ...]:
        mat, pos, neg = ctx.saved_tensors
        grad_mat = torch.empty_like(mat)
        for rows in row_blocks(*mat.shape):
            dist, (pos_exps, pos_total, d_ap, _), (neg_exps, neg_total, d_an, _) = (
                _soft_weighted_block(mat, pos, neg, rows, ctx.sign)
            )
            pos_part = torch.sub(dist, d_ap.sub_(1.0)).mul_(pos_exps)
            pos_part.mul_(grad_ap[rows, None].mul(ctx.sign).div_(pos_total))
            neg_part = torch.sub(d_an.add_(1.0), dist).mul_(neg_exps)
            neg_part.mul_(grad_an[rows, None].mul(ctx.sign).div_(neg_total))
            torch.add(pos_part, neg_part, out=grad_mat[rows])
        return grad_mat, None, None, None
