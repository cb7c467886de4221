"""FastAP (Cakir et al. 2019): each anchor's average precision, from soft histograms of its
distances to its positives and to every other item."""

from __future__ import annotations

import torch
from torch import Tensor

from .losses import zero_unless
from .reduction import Reducer


def soft_histograms(
    dist: Tensor, weights: list[Tensor], num_bins: int, histogram_max: float
) -> list[Tensor]:
    """Per-row histograms of ``dist`` with triangular bins, one per weight matrix.

    Bin k is centred at ``k·Δ`` (Δ = ``histogram_max / num_bins``, k = 0 … num_bins) and
    gives a distance d the weight ``max(0, 1 − |d − k·Δ| / Δ)``. A distance falls in at most
    two neighbouring bins, so each histogram is two scatter-adds over the (N, M) entries, not
    a (num_bins + 1, N, M) tensor of bin memberships.

    Args:
        dist: (N, M) distances in [0, ``histogram_max``].
        weights: (N, M) weights of the entries, one matrix per histogram.
        num_bins: Number of intervals between the bin centres.
        histogram_max: The last bin's centre.

    Returns:
        One (N, num_bins + 1) histogram per weight matrix, differentiable in ``dist``.
    """
    scaled = dist * (num_bins / histogram_max)
    # A distance a rounding error past histogram_max falls in the last bin and an extra one,
    # dropped below, as its triangular weight says.
    lower = scaled.detach().floor().clamp_(0, num_bins)
    upper_share = scaled - lower
    lower_bin = lower.long()
    histograms = []
    for w in weights:
        h = dist.new_zeros(dist.shape[0], num_bins + 2)
        h = h.scatter_add(1, lower_bin, w * (1 - upper_share))
        h = h.scatter_add(1, lower_bin + 1, w * upper_share)
        histograms.append(h[:, : num_bins + 1])
    return histograms


def fastap_loss(
    dist: Tensor,
    pos: Tensor,
    neg: Tensor,
    anchor_weights: Tensor,
    num_bins: int,
    histogram_max: float,
    *,
    reducer: Reducer,
) -> Tensor:
    """FastAP loss: ``(1 − AP_i) · w_i`` for every anchor with a positive, reduced.

    With ``h⁺`` and ``h`` an anchor's soft histograms of its positives' and of all its pairs'
    distances, and ``H⁺``, ``H`` their cumulative sums,
    ``AP_i = Σ_k h⁺_k H⁺_k / H_k / N⁺_i`` over the bins where ``h⁺_k H⁺_k > 0`` and ``H_k > 0``.

    Args:
        dist: (N, N) distances in [0, ``histogram_max``].
        pos: (N, N) 0/1 positive pairs.
        neg: (N, N) 0/1 negative pairs.
        anchor_weights: (N,) weight of each anchor's term
            (:func:`~dmlkit.functional.masks.tuple_element_weights`).
        num_bins: Number of histogram intervals.
        histogram_max: Largest possible distance.
        reducer: Reduces the anchors' terms.

    Returns:
        Scalar loss; a zero keeping the graph when no anchor has a positive.
    """
    num_pos = pos.sum(dim=1)
    has_pos = num_pos > 0
    h_pos, h_neg = soft_histograms(dist, [pos, neg], num_bins, histogram_max)
    product = h_pos * h_pos.cumsum(dim=1)
    total = (h_pos + h_neg).cumsum(dim=1)
    safe = (product > 0) & (total > 0)
    # Unsafe bins divide by 1 rather than 0, so their (discarded) gradients stay finite.
    precision = torch.where(safe, product / torch.where(safe, total, 1.0), 0.0).sum(dim=1)
    ap = precision / num_pos.clamp_min(1.0)
    loss = reducer((1 - ap) * anchor_weights, has_pos)
    # PML's rule: no anchor with a positive, or no usable bin anywhere, gives zero.
    return zero_unless(has_pos.any() & safe.any(), loss, dist)


__all__ = ["fastap_loss", "soft_histograms"]
