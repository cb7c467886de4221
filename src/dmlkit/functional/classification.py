"""Classification losses with a weight matrix: the softmax cross-entropy with per-sample miner
weights, the target-logit margins of the large-margin family (L-Softmax, SphereFace, ArcFace,
CosFace, sub-centre ArcFace), NormalizedSoftmax's temperature logits and P2SGrad's squared
cosine error.

Weights are (D, C) matrices, one column per class (or per sub-centre), as in PML.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from .masks import index_counts
from .reduction import Reducer


def weighted_cross_entropy(
    logits: Tensor, labels: Tensor, sample_weights: Tensor, reducer: Reducer
) -> Tensor:
    """Softmax cross-entropy of each sample, times its weight, reduced.

    As in PML, the weights scale the per-sample losses before the reducer sees them: a
    ``MeanReducer`` divides by the batch size, not by the total weight.

    Args:
        logits: (N, C) logits.
        labels: (N,) class indices.
        sample_weights: (N,) weights (a mined tuple's:
            :func:`~dmlkit.functional.masks.tuple_element_weights`).
        reducer: Reduces the (N,) weighted losses.

    Returns:
        The scalar loss.
    """
    losses = F.cross_entropy(logits, labels, reduction="none")
    return reducer(losses * sample_weights)


def _angles(cosine: Tensor) -> Tensor:
    """θ = arccos(cosine), cosines rounded past ±1 clamped; used only to choose branches."""
    return torch.acos(cosine.detach().clamp(-1, 1))


def multiplicative_angular_margin(cosine: Tensor, margin: int) -> Tensor:
    """L-Softmax's and SphereFace's ψ(θ) = (−1)^k cos(mθ) − 2k, k = ⌊mθ/π⌋: a monotonically
    decreasing extension of cos(mθ) over [0, π].

    cos(mθ) is the polynomial in cos θ of the L-Softmax paper's Eq. 7,
    Σₙ (−1)ⁿ C(m, 2n) cos^(m−2n) θ (1 − cos² θ)ⁿ, so its gradient needs no arccos; k is a
    constant of the gradient.

    Args:
        cosine: Cosines of the targets.
        margin: The integer angle multiplier m ≥ 1.
    """
    sin_squared = 1 - cosine * cosine
    cos_m_theta = torch.zeros_like(cosine)
    for n in range(margin // 2 + 1):
        coefficient = (-1) ** n * math.comb(margin, 2 * n)
        cos_m_theta = cos_m_theta + coefficient * cosine ** (margin - 2 * n) * sin_squared**n
    k = torch.floor(_angles(cosine) * (margin / math.pi))
    sign = 1 - 2 * torch.remainder(k, 2)
    return sign * cos_m_theta - 2 * k


def additive_angular_margin(cosine: Tensor, margin: float) -> Tensor:
    """ArcFace's cos(θ + m) while θ + m ≤ π, else cos θ − m·sin m (which keeps the logit
    decreasing in θ).

    cos(θ + m) is expanded as cos θ cos m − sin θ sin m; sin θ is floored at the smallest
    normal number, so a cosine of exactly ±1 gets a finite gradient rather than NaN.

    Args:
        cosine: Cosines of the targets (values rounded past ±1 are clamped).
        margin: The angle m in radians.
    """
    cos_theta = cosine.clamp(-1, 1)
    sin_theta = (1 - cos_theta * cos_theta).clamp_min(torch.finfo(cosine.dtype).tiny).sqrt()
    shifted = cos_theta * math.cos(margin) - sin_theta * math.sin(margin)
    return torch.where(
        _angles(cosine) <= math.pi - margin, shifted, cos_theta - margin * math.sin(margin)
    )


def additive_cosine_margin(cosine: Tensor, margin: float) -> Tensor:
    """CosFace's cos θ − m.

    Args:
        cosine: Cosines of the targets.
        margin: The margin m.
    """
    return cosine - margin


TargetMargin = Callable[[Tensor, Tensor], Tensor]
"""Maps the (N,) target logits and their (N,) magnitudes (logit = magnitude · cosine) to the
margin-penalised target logits."""


class _ReplaceTargets(torch.autograd.Function):
    """One copy of the logits forward and one of the gradient backward; the margin's own
    (N,)-sized graph is built in forward and differentiated in backward. First-order only
    (no double backward), and not a ``torch.func`` transform target."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, logits: Tensor, labels: Tensor, margin: TargetMargin, magnitudes: Tensor
    ) -> Tensor:
        index = labels.unsqueeze(1)
        with torch.enable_grad():
            inputs = (
                logits.detach().gather(1, index).squeeze(1).requires_grad_(),
                magnitudes.detach().requires_grad_(),
            )
            margined = margin(*inputs)
        ctx.margin_graph = (margined, inputs)
        ctx.save_for_backward(index)
        return logits.scatter(1, index, margined.detach().to(logits.dtype).unsqueeze(1))

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        (index,) = ctx.saved_tensors
        margined, inputs = ctx.margin_graph
        # retain_graph: the (N,)-sized graph lives as long as this node, as other nodes' do.
        target_grad, magnitude_grad = torch.autograd.grad(
            margined,
            inputs,
            grad.gather(1, index).squeeze(1),
            retain_graph=True,
            allow_unused=True,
        )
        target_grad = target_grad.to(grad.dtype).unsqueeze(1)
        return grad.scatter(1, index, target_grad), None, None, magnitude_grad


def with_target_margin(
    logits: Tensor, labels: Tensor, margin: TargetMargin, magnitudes: Tensor
) -> Tensor:
    """The (N, C) ``logits`` with each sample's target-class entry t replaced by
    ``margin(t, m)``: where the large-margin losses put their margin.

    The logits come from one margin-free product and only the N targets are recomputed, where
    PML applies the margin to the whole cosine matrix and rescales it: the same values and
    gradients with two (N, C) passes instead of several. First-order differentiable in
    ``logits`` and ``magnitudes``.

    Args:
        logits: (N, C) margin-free logits.
        labels: (N,) target classes.
        margin: The target logits' penalty (:data:`TargetMargin`).
        magnitudes: (N,) what each target's cosine is multiplied by in its logit.
    """
    replaced: Tensor = _ReplaceTargets.apply(logits, labels, margin, magnitudes)
    return replaced


def sub_center_cosine(cosine: Tensor, num_classes: int, sub_centers: int) -> Tensor:
    """Each class's cosine: the largest over its sub-centres.

    Args:
        cosine: (N, C·K) cosines to every sub-centre; class c's are columns cK … cK + K − 1.
        num_classes: C.
        sub_centers: K.

    Returns:
        (N, C) cosines.
    """
    # max, not amax: a tie's gradient goes to one sub-centre (the first), as in PML.
    return cosine.view(-1, num_classes, sub_centers).max(dim=2).values


def sub_center_outliers(
    cosine: Tensor, labels: Tensor, num_classes: int, sub_centers: int, cos_threshold: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Sub-centre ArcFace's outliers: samples far from their class's dominant sub-centre.

    A class's dominant sub-centre is the one nearest to most of its samples (ties: the lower
    index); a sample is an outlier when its cosine to it is below ``cos_threshold``.

    Args:
        cosine: (N, C·K) cosines to every sub-centre (class-major, as in
            :func:`sub_center_cosine`).
        labels: (N,) classes in [0, C).
        num_classes: C.
        sub_centers: K.
        cos_threshold: The cosine below which a sample is an outlier.

    Returns:
        (outliers, dominant, present): the outliers' batch indices ordered by class, then by
        index; each class's dominant sub-centre (C,) in [0, K); which classes have samples.
    """
    rows = torch.arange(len(labels), device=labels.device)
    own = cosine.view(-1, num_classes, sub_centers)[rows, labels]
    nearest = own.argmax(dim=1)
    votes = index_counts(labels * sub_centers + nearest, num_classes * sub_centers)
    votes = votes.view(num_classes, sub_centers)
    dominant = votes.argmax(dim=1)
    to_dominant = own.gather(1, dominant[labels].unsqueeze(1)).squeeze(1)
    by_class = torch.argsort(labels, stable=True)
    outliers = by_class[to_dominant[by_class] < cos_threshold]
    return outliers, dominant, votes.sum(dim=1) > 0


def temperature_logits(mat: Tensor, temperature: float, is_inverted: bool) -> Tensor:
    """NormalizedSoftmax's logits: similarities over the temperature (distances negated).

    Args:
        mat: (N, C) similarities or distances to the normalised class weights.
        temperature: The softmax temperature.
        is_inverted: True when ``mat`` holds similarities.
    """
    logits = mat / temperature
    return logits if is_inverted else -logits


def project_to_unit_columns_(weight: Tensor) -> None:
    """Rescales every column of ``weight`` to unit L2 norm, in place and outside autograd:
    P2SGrad's projection of its class weights before each step."""
    # Through .data, whose version counter is its own: a graph that still holds the weight
    # from an earlier call (two calls before one backward) stays valid, as in PML.
    data = weight.data
    data.div_(torch.linalg.vector_norm(data, dim=0, keepdim=True).clamp_min(1e-12))


def p2sgrad_loss(embeddings: Tensor, weight: Tensor, labels: Tensor, reducer: Reducer) -> Tensor:
    """P2SGrad: the squared error between each sample's cosines to the classes and its one-hot
    label, reduced over all N × C entries (a ``MeanReducer`` gives PML's MSE).

    The weight columns are taken to be unit vectors (see :func:`project_to_unit_columns_`);
    they are not normalised inside the graph, so their gradient is P2SGrad's, unprojected.

    Args:
        embeddings: (N, D) embeddings.
        weight: (D, C) unit-column class weights.
        labels: (N,) class indices.
        reducer: Reduces the (N, C) squared errors.
    """
    unit = F.normalize(embeddings, dim=1)
    cosine = unit @ weight
    if reducer.fusable and type(reducer).keep is Reducer.keep:
        # Every entry counts: Σ (cos − onehot)² = Σ cos² − 2 Σᵢ cos(xᵢ, W_yᵢ) + N, one pass
        # over the (N, C) cosines each way instead of four. The clamp to [-1, 1] is left out:
        # unit vectors' cosines pass ±1 by rounding only.
        targets = cosine.gather(1, labels.unsqueeze(1))
        total = cosine.square().sum() - 2 * targets.sum() + labels.numel()
        return reducer.finish(total, torch.full((), float(cosine.numel()), device=cosine.device))
    one_hot = F.one_hot(labels, weight.shape[1]).to(cosine.dtype)
    return reducer((cosine.clamp(-1, 1) - one_hot).square())


__all__ = [
    "TargetMargin",
    "additive_angular_margin",
    "additive_cosine_margin",
    "multiplicative_angular_margin",
    "p2sgrad_loss",
    "project_to_unit_columns_",
    "sub_center_cosine",
    "sub_center_outliers",
    "temperature_logits",
    "weighted_cross_entropy",
    "with_target_margin",
]
