"""Per-pair training losses and threshold normalisation for DDTAS's Online Threshold Generator.

The OTG (docs/ddtas.md §5) differentiates the training loss with respect to one variable per
mined pair, and through a virtual parameter step, so everything here is plain,
twice-differentiable autograd on 1-D per-pair values (no fused first-order kernels).

A mined pair k is described by its anchor ``anchors[k]`` and whether it is positive
(``is_pos[k]``); its value ``values[k]`` is λ_k·S_k in the multiplier reading of the OTG (λ = 1
gives the plain loss) or S_k in the additive reading, where ``thresholds`` varies per pair.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from .losses import otg_multi_similarity_per_anchor, soft_contrastive_per_anchor
from .reduction import MeanReducer

PairLossForm = Literal["soft_contrastive", "multi_similarity"]
Normalization = Literal["joint", "separate"]


def pair_loss(
    values: Tensor,
    anchors: Tensor,
    is_pos: Tensor,
    n_anchors: int,
    form: PairLossForm = "soft_contrastive",
    pos_scale: float = 2.0,
    neg_scale: float = 40.0,
    thresholds: float | Tensor = 0.7,
    term_weights: Tensor | None = None,
) -> Tensor:
    """DDTAS's training loss L^t on per-pair values, reduced as the released code does.

    With β = ``pos_scale``, α = ``neg_scale`` and t the threshold, for every anchor i having at
    least one positive and one negative pair:

    - ``soft_contrastive`` (docs/ddtas.md §4; :func:`soft_contrastive_per_anchor`):
      ``(2/β)·mean_P softplus(−β(x − t)) + (2/α)·mean_N softplus(α(x − t))``;
    - ``multi_similarity`` (the MS form of the released OTG, §5.1 step 4, t = b;
      :func:`otg_multi_similarity_per_anchor`):
      ``(2/β)·log(1 + Σ_P exp(−β(x − t))) + (2/α)·log(1 + Σ_N exp(α(x − t)))``;

    averaged over all ``n_anchors`` anchors, skipped ones counting 0 (``MeanReducer``).

    Args:
        values: (K,) per-pair values x_k.
        anchors: (K,) anchor index of each pair.
        is_pos: (K,) bool, True for positive pairs.
        n_anchors: B, the batch size the sum is divided by.
        form: ``soft_contrastive`` or ``multi_similarity``.
        pos_scale: β.
        neg_scale: α.
        thresholds: t, a number or one per pair (the OTG's additive reading).
        term_weights: (K,) per-pair weights of the loss terms (the loss-weights reading).

    Returns:
        Scalar loss; a zero that keeps the graph of ``values`` when no anchor counts.
    """
    if form not in ("soft_contrastive", "multi_similarity"):
        raise ValueError(f"form must be 'soft_contrastive' or 'multi_similarity', got {form!r}")
    per_anchor = (
        soft_contrastive_per_anchor
        if form == "soft_contrastive"
        else otg_multi_similarity_per_anchor
    )(values, anchors, is_pos, n_anchors, pos_scale, neg_scale, thresholds, term_weights)
    return MeanReducer()(per_anchor)


def pair_loss_slopes(
    anchors: Tensor,
    is_pos: Tensor,
    n_anchors: int,
    form: PairLossForm = "soft_contrastive",
    pos_scale: float = 2.0,
    neg_scale: float = 40.0,
    threshold: float = 0.7,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """c_k = ∂L^t/∂x_k at x = 0 (docs/ddtas.md §5.3), the factor of the OTG's closed form.

    Computed by autograd on :func:`pair_loss`, so it holds for either form and reduction.

    Returns:
        (K,) slopes: negative for positive pairs, positive for negative pairs, 0 for the pairs
        of skipped anchors.
    """
    zeros = torch.zeros(anchors.shape[0], dtype=dtype, device=anchors.device, requires_grad=True)
    with torch.enable_grad():
        loss = pair_loss(zeros, anchors, is_pos, n_anchors, form, pos_scale, neg_scale, threshold)
        (slopes,) = torch.autograd.grad(loss, zeros, allow_unused=True, materialize_grads=True)
    return slopes


def normalize_thresholds(
    scores: Tensor, is_pos: Tensor | None = None, normalization: Normalization = "joint"
) -> Tensor | None:
    """The OTG's weights λ* = relu(u) / max relu(u) (docs/ddtas.md §5.1 step 8, §5.5).

    With ``normalization="separate"`` (a deviation, §5.4) positive and negative pairs are each
    divided by their own maximum; otherwise the released joint maximum, which a positive pair
    nearly always sets, leaves negative pairs with weights near 1e-8.

    Args:
        scores: (K,) u = −∂L^m/∂λ.
        is_pos: (K,) bool, needed for ``separate``.
        normalization: ``joint`` or ``separate``.

    Returns:
        (K,) weights in [0, 1], or None when they are undefined: some score is not finite, or
        every score of a normalised group (all pairs, or one non-empty side) is ≤ 0, which
        would be 0/0. The caller decides what to do (DDTAS skips the step or raises).
    """
    if normalization not in ("joint", "separate"):
        raise ValueError(f"normalization must be 'joint' or 'separate', got {normalization!r}")
    if scores.numel() == 0:
        return scores.clone()
    if not bool(torch.isfinite(scores).all()):
        return None
    positive = scores.clamp_min(0.0)
    if normalization == "joint":
        peak = positive.max()
        return positive / peak if peak > 0 else None
    if is_pos is None:
        raise ValueError("separate normalisation needs is_pos")
    weights = torch.zeros_like(positive)
    for side in (is_pos, ~is_pos):
        if bool(side.any()):
            peak = positive[side].max()
            if not peak > 0:
                return None
            weights[side] = positive[side] / peak
    return weights
