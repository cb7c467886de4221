"""FastAP (Cakir et al. 2019): each anchor's average precision, from soft histograms of its
distances to its positives and to every other item."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from .losses import zero_unless
from .reduction import Reducer, row_blocks


def soft_histograms(
    dist: Tensor, weights: list[Tensor], num_bins: int, histogram_max: float
) -> list[Tensor]:
    """Per-row histograms of ``dist`` with triangular bins, one per weight matrix.

    Bin k is centred at ``k·Δ`` (Δ = ``histogram_max / num_bins``, k = 0 … num_bins) and
    gives a distance d the weight ``max(0, 1 − |d − k·Δ| / Δ)``. A distance falls in at most
    two neighbouring bins, so each histogram is two scatter-adds over the (N, M) entries, not
    a (num_bins + 1, N, M) tensor of bin memberships; they run over row blocks, and backward
    recomputes each block's bins, so nothing full-size is kept but the inputs.

    Args:
        dist: (N, M) distances in [0, ``histogram_max``].
        weights: (N, M) weights of the entries, one matrix per histogram (constants: they get
            no gradient).
        num_bins: Number of intervals between the bin centres.
        histogram_max: The last bin's centre.

    Returns:
        One (N, num_bins + 1) histogram per weight matrix, differentiable in ``dist``.
    """
    return list(_SoftHistograms.apply(dist, num_bins / histogram_max, num_bins, *weights))


def _bins(dist: Tensor, scale: float, num_bins: int) -> tuple[Tensor, Tensor]:
    """Each entry's lower bin (long) and its share of the next bin up."""
    scaled = dist * scale
    # A distance a rounding error past histogram_max falls in the last bin and an extra one,
    # dropped by the caller, as its triangular weight says.
    lower = scaled.floor().clamp_(0, num_bins)
    return lower.long(), scaled.sub_(lower)


class _SoftHistograms(torch.autograd.Function):
    """:func:`soft_histograms` over row blocks. The derivative of an entry's contribution
    ``w·((1 − u)·[bin k] + u·[bin k+1])`` with respect to its distance is
    ``w·scale·(g_{k+1} − g_k)``, g being the histogram's incoming gradient."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, dist: Tensor, scale: float, num_bins: int, *weights: Tensor
    ) -> tuple[Tensor, ...]:
        ctx.save_for_backward(dist, *weights)
        ctx.scale, ctx.num_bins = scale, num_bins
        # One extra bin on the right, for the entries at the last centre.
        histograms = [dist.new_zeros(dist.shape[0], num_bins + 2) for _ in weights]
        for rows in row_blocks(*dist.shape):
            lower, upper_share = _bins(dist[rows], scale, num_bins)
            upper = lower + 1
            for h, w in zip(histograms, weights, strict=True):
                upper_part = w[rows] * upper_share
                h[rows].scatter_add_(1, lower, w[rows] - upper_part)
                h[rows].scatter_add_(1, upper, upper_part)
        return tuple(h[:, : num_bins + 1] for h in histograms)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, *grads: Tensor) -> tuple[Tensor | None, ...]:
        dist, *weights = ctx.saved_tensors
        # Per row and lower bin k: scale·(g_{k+1} − g_k), with g = 0 on the dropped extra bin.
        slopes = [F.pad(g, (0, 1)).diff(dim=1).mul_(ctx.scale) for g in grads]
        grad_dist = torch.zeros_like(dist)
        for rows in row_blocks(*dist.shape):
            lower, _ = _bins(dist[rows], ctx.scale, ctx.num_bins)
            for slope, w in zip(slopes, weights, strict=True):
                grad_dist[rows].addcmul_(slope[rows].gather(1, lower), w[rows])
        return (grad_dist, None, None, *(None for _ in weights))


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
