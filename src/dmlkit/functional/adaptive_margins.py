"""Formulas of the losses whose margins adapt to the data: the dynamic soft margin (a running
histogram of triplet differences weighs each triplet by its CDF), the manifold loss (random-walk
similarities of items and proxies) and the threshold-consistent margin terms.

The dynamic soft margin's histogram interpolates linearly between ``num_bins`` knots
``min_val + k·δ`` (k = 0 … num_bins − 1); a difference ``d`` sits at position
``(d − min_val) / δ``. Positions outside the knots are clamped to the first or last knot (PML
indexes past its histogram there). The histogram is a statistic: no gradient flows through it,
so a triplet's weight is a constant of the backward pass, as in the paper's code.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from .losses import zero_unless
from .masks import PairWeights
from .reduction import Reducer, row_blocks

# --------------------------------------------------------------------- dynamic soft margin


def soft_margin_positions(diffs: Tensor, min_val: float, delta: float, num_bins: int) -> Tensor:
    """Each difference's position among the histogram's knots, ``(d − min_val) / δ`` clamped to
    ``[0, num_bins − 1]``.

    Args:
        diffs: Differences ``d_ap − d_an`` (any shape).
        min_val: The first knot.
        delta: The spacing of the knots.
        num_bins: The number of knots.
    """
    return ((diffs - min_val) / delta).clamp_(0, num_bins - 1)


def soft_margin_histogram(positions: Tensor, weights: Tensor | None, num_bins: int) -> Tensor:
    """The linearly interpolated histogram of ``positions``: each splits its weight between the
    knots below and above it in proportion to its distance from them.

    Args:
        positions: Knot positions (:func:`soft_margin_positions`), any shape.
        weights: Each position's weight (a count), same shape; None for 1 each.
        num_bins: The number of knots.

    Returns:
        (num_bins,) unnormalised counts in the positions' dtype.
    """
    # Positions are non-negative: truncation is the knot below, and frac the share above it.
    index = positions.long().flatten()
    above = positions.frac().flatten()
    if weights is not None:
        above.mul_(weights.flatten())
    # One spare knot receives the zero weights of positions clamped onto the last knot; the
    # share above each knot goes to the next one through the view shifted by one.
    counts = positions.new_zeros(num_bins + 1)
    if weights is None:
        counts.index_add_(0, index, positions.new_ones(()).expand_as(above))
    else:
        counts.index_add_(0, index, weights.flatten().to(positions.dtype))
    counts.index_add_(0, index, above, alpha=-1.0)
    counts[1:].index_add_(0, index, above)
    return counts[:num_bins]


def update_soft_margin_histogram(hist: Tensor, counts: Tensor, momentum: float) -> Tensor:
    """PML's running histogram: ``(1 − m)·hist + m·counts``, renormalised to sum 1, where
    ``counts`` are the batch's unnormalised counts (so each triplet adds ``m``) and ``m`` is
    1 while ``hist`` is still all zeros (the first batch).

    Args:
        hist: (num_bins,) current histogram (zeros before the first batch).
        counts: (num_bins,) the batch's counts (:func:`soft_margin_histogram`).
        momentum: m.
    """
    m = hist.new_full((), momentum).where(hist.sum() != 0, 1.0)
    mixed = (1 - m) * hist + m * counts
    return mixed / mixed.sum()


def soft_margin_weights(positions: Tensor, hist: Tensor) -> Tensor:
    """Each position's weight: the histogram's CDF at the knot at or below it."""
    return hist.cumsum(0)[positions.long()]


def dynamic_soft_margin_loss(
    diffs: Tensor,
    hist: Tensor,
    min_val: float,
    delta: float,
    momentum: float,
    reducer: Reducer,
) -> tuple[Tensor, Tensor]:
    """The dynamic soft margin loss of listed differences ``d = d_ap − d_an``: the histogram is
    updated with them, then each is weighed by the updated CDF at its knot and the products are
    reduced.

    Args:
        diffs: (T,) differences, attached to the graph.
        hist: (num_bins,) running histogram, in ``diffs``' dtype and device.
        min_val: The first knot.
        delta: The spacing of the knots.
        momentum: The running histogram's momentum.
        reducer: Reduces the T weighted differences.

    Returns:
        (loss, updated histogram); with no difference, a zero keeping the graph and ``hist``.
    """
    if diffs.numel() == 0:
        return diffs.sum() * 0.0, hist
    num_bins = hist.numel()
    with torch.no_grad():
        positions = soft_margin_positions(diffs.detach(), min_val, delta, num_bins)
        hist = update_soft_margin_histogram(
            hist, soft_margin_histogram(positions, None, num_bins), momentum
        )
        weights = soft_margin_weights(positions, hist)
    return reducer(weights * diffs), hist


def _triplet_differences(dist: Tensor, anchors: Tensor, positives: Tensor) -> Tensor:
    """For a block of positive pairs, ``d_ap − d_an`` against every reference n (a new
    tensor)."""
    return dist[anchors].neg_().add_(dist[anchors, positives][:, None])


class _AllTripletsSoftMargin(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        dist: Tensor,
        anchors: Tensor,
        positives: Tensor,
        neg_weights: Tensor,
        hist: Tensor,
        min_val: float,
        delta: float,
        reducer: Reducer,
    ) -> tuple[Tensor, Tensor]:
        grad = torch.zeros_like(dist)
        total = dist.new_zeros(())
        count = dist.new_zeros(())
        for block in row_blocks(anchors.numel(), dist.shape[1]):
            a, p = anchors[block], positives[block]
            diffs = _triplet_differences(dist, a, p)
            coef = soft_margin_weights(
                soft_margin_positions(diffs, min_val, delta, hist.numel()), hist
            )
            losses = diffs.mul_(coef)
            weights = neg_weights[a].to(dist.dtype)
            kept = reducer.keep(losses)
            if kept is not None:
                weights.mul_(kept)
            total += torch.dot(losses.flatten(), weights.flatten())
            count += weights.sum()
            coef.mul_(weights)
            grad.index_put_((a, p), coef.sum(1), accumulate=True)
            grad.index_add_(0, a, coef, alpha=-1.0)
        ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(count)
        return total, count

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_total: Tensor, _grad_count: Tensor) -> tuple[Tensor | None, ...]:
        (grad,) = ctx.saved_tensors
        return (grad_total * grad, None, None, None, None, None, None, None)


def all_triplets_dynamic_soft_margin_loss(
    dist: Tensor,
    anchors: Tensor,
    positives: Tensor,
    neg_weights: Tensor,
    hist: Tensor,
    min_val: float,
    delta: float,
    momentum: float,
    reducer: Reducer,
) -> tuple[Tensor, Tensor]:
    """:func:`dynamic_soft_margin_loss` over every positive pair combined with every weighted
    negative of its anchor, without listing the triplets.

    Two passes over blocks of positive pairs against all M references: the first builds the
    batch's histogram, the second weighs the differences by the updated CDF and accumulates the
    gradient (first-order only). Memory is bounded by the block size, whatever the batch size.

    Args:
        dist: (N, M) distances.
        anchors: (P,) anchor of each positive pair (repeats count).
        positives: (P,) reference index of each positive pair.
        neg_weights: (N, M) 0/1 negatives or counts of each (anchor, negative) pair.
        hist: (num_bins,) running histogram, in ``dist``'s dtype and device.
        min_val: The first knot.
        delta: The spacing of the knots.
        momentum: The running histogram's momentum.
        reducer: Selection and averaging of the triplets' weighted differences.

    Returns:
        (loss, updated histogram); with no triplet, a zero keeping the graph and ``hist``.
    """
    num_bins = hist.numel()
    counts = hist.new_zeros(num_bins)
    with torch.no_grad():
        for block in row_blocks(anchors.numel(), dist.shape[1]):
            a, p = anchors[block], positives[block]
            positions = soft_margin_positions(
                _triplet_differences(dist.detach(), a, p), min_val, delta, num_bins
            )
            counts += soft_margin_histogram(positions, neg_weights[a], num_bins)
    # Selected on the device, not read: with no triplet, the histogram stays as it was (the
    # update would divide 0 by 0) and the loss is a zero.
    any_triplet = counts.sum() > 0
    hist = torch.where(any_triplet, update_soft_margin_histogram(hist, counts, momentum), hist)
    total, count = _AllTripletsSoftMargin.apply(
        dist, anchors, positives, neg_weights, hist, min_val, delta, reducer
    )
    return zero_unless(any_triplet, reducer.finish(total, count), dist), hist


def hardest_negative_differences(dist: Tensor) -> Tensor:
    """PML's label-free triplets: reference i is the positive of anchor i, and the negative is
    the closest of anchor i's other references and reference i's other anchors.

    Args:
        dist: (N, M) distances between anchors and references.

    Returns:
        (min(N, M),) differences ``d_ii − d_neg``; empty when no pair has a negative.
    """
    n, m = dist.shape
    if max(n, m) < 2:
        return dist.new_zeros(0)
    k = min(n, m)
    itself = torch.eye(n, m, dtype=torch.bool, device=dist.device)
    others = dist.masked_fill(itself, math.inf)
    closest = torch.minimum(others.min(dim=1).values[:k], others.min(dim=0).values[:k])
    return dist.diagonal() - closest


# --------------------------------------------------------------------------- manifold loss


def random_meta_classes(n_items: int, n_proxies: int) -> Tensor:
    """PML's random meta-classes: every proxy once, the rest uniform, shuffled; drawn from
    torch's default CPU generator in PML's order, so a seeded call draws PML's classes.

    Args:
        n_items: N ≥ ``n_proxies``.
        n_proxies: K.

    Returns:
        (N,) proxy indices on the CPU.
    """
    extra = torch.randint(0, n_proxies, (n_items - n_proxies,))
    return torch.cat((torch.arange(n_proxies), extra))[torch.randperm(n_items)]


def random_walk_affinities(sim: Tensor, alpha: float) -> Tensor:
    """The random walk's converged affinities ``F = (1 − α)(I − α S̄)⁻¹``.

    ``S`` is ``exp(2·max(sim, 0))`` without its diagonal and ``S̄ = D^{-1/2} S D^{-1/2}`` its
    symmetric normalisation (D: the row sums), as in the paper's code.

    Args:
        sim: (n, n) similarities of the graph's nodes (items and proxies).
        alpha: α in (0, 1): the share of similarity each node passes to its neighbours.

    Returns:
        (n, n) affinities.
    """
    n = sim.shape[0]
    eye = torch.eye(n, dtype=sim.dtype, device=sim.device)
    weights = torch.exp(sim.clamp_min(0) / 0.5) * (1 - eye)
    scale = weights.sum(dim=1).rsqrt()
    normalised = scale[:, None] * weights * scale[None, :]
    return (1 - alpha) * torch.linalg.inv(eye - alpha * normalised)


def _proxy_violations(scores: Tensor, meta_classes: Tensor, margin: float) -> Tensor:
    """``log(1 + Σ_j exp(v_j))`` per item over the proxies j other than its own with
    ``v_j = scores_j − scores_own + margin ≥ 0``."""
    own = scores.gather(1, meta_classes[:, None])
    violation = scores - own + margin
    others = torch.ones_like(violation, dtype=torch.bool).scatter_(1, meta_classes[:, None], False)
    counted = others & (violation >= 0)
    return torch.log(1 + torch.where(counted, violation.exp(), 0.0).sum(dim=1))


def manifold_losses(
    affinities: Tensor, meta_classes: Tensor, margin: float, lambda_c: float
) -> Tensor:
    """Each item's manifold loss: the intrinsic term (its affinities to the proxies) plus
    ``lambda_c`` times the context term (the cosines of its affinity row with the proxies'),
    each a soft count of the proxies that beat the item's own by more than ``−margin``.

    Args:
        affinities: (N + K, N + K) affinities (:func:`random_walk_affinities`), the N items
            first, then the K proxies.
        meta_classes: (N,) each item's proxy, in [0, K).
        margin: Added to each violation.
        lambda_c: The context term's weight; ``inf`` for the context term alone.

    Returns:
        (N,) losses.
    """
    n = meta_classes.numel()
    items, proxies = affinities[:n], affinities[n:]
    context = _proxy_violations(
        F.normalize(items, dim=1) @ F.normalize(proxies, dim=1).T, meta_classes, margin
    )
    if math.isinf(lambda_c):
        return context
    return _proxy_violations(items[:, n:], meta_classes, margin) + lambda_c * context


# ------------------------------------------------------------ threshold-consistent margin


def threshold_consistent_margin_loss(
    sim: Tensor,
    pairs: PairWeights,
    lambda_plus: float,
    lambda_minus: float,
    margin_plus: float,
    margin_minus: float,
    reducer: Reducer,
) -> Tensor:
    """TCM: ``margin_plus − s`` over the positive pairs with ``s ≤ margin_plus`` and
    ``s − margin_minus`` over the negative pairs with ``s ≥ margin_minus``, each side reduced
    over its selected pairs (mean: PML's), weighted and summed.

    Args:
        sim: (N, M) cosine similarities.
        pairs: Pair weights (counts, when a mined tuple repeats pairs).
        lambda_plus: The positive side's weight.
        lambda_minus: The negative side's weight.
        margin_plus: Positive pairs at or below this similarity count.
        margin_minus: Negative pairs at or above this similarity count.
        reducer: Reduces each side's terms over its selected pairs.

    Returns:
        Scalar loss; a zero keeping the graph when no pair is selected.
    """
    pos = reducer(margin_plus - sim, pairs.pos * (sim <= margin_plus))
    neg = reducer(sim - margin_minus, pairs.neg * (sim >= margin_minus))
    return lambda_plus * pos + lambda_minus * neg


__all__ = [
    "all_triplets_dynamic_soft_margin_loss",
    "dynamic_soft_margin_loss",
    "hardest_negative_differences",
    "manifold_losses",
    "random_meta_classes",
    "random_walk_affinities",
    "soft_margin_histogram",
    "soft_margin_positions",
    "soft_margin_weights",
    "threshold_consistent_margin_loss",
    "update_soft_margin_histogram",
]
