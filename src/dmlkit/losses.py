"""Metric learning losses with PML's call contract.

Every loss is called as ``loss(embeddings, labels, indices_tuple=None, ref_emb=None,
ref_labels=None, anchor_in_ref=None)`` and returns a scalar tensor. Class names, constructor
parameters and defaults are PML 2.9's, so switching is a change of import; ``distance=`` takes a
:mod:`dmlkit.distances` object and ``reducer=`` a :mod:`dmlkit.reducers` object, and
``loss.distance`` and ``loss.reducer`` are the objects in use, defaults included.

Differences from PML, all deliberate:

* Self-pairs are excluded by index, never by value or object identity. Without ``ref_emb`` they
  are the diagonal. With ``ref_emb``, the reference set is distinct items unless
  ``anchor_in_ref`` says which row of it each anchor is (−1 for none), as a cross-batch memory
  or a gathered distributed batch knows; those (anchor, itself) pairs are then left out of the
  labelled pairs and of any ``indices_tuple``, as PML's ``CrossBatchMemory`` removes them. PML
  decides by object identity (``ref_emb is embeddings``).
* A loss over a single positive and a single negative pair is computed, not returned as 0.
* Half-precision inputs are computed in float32 and the result cast back.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from torch import Tensor, nn

from .batch import Batch
from .distances import (
    BaseDistance,
    CosineSimilarity,
    DotProductSimilarity,
    LpDistance,
    SimilarityRequirement,
    check_distance,
)
from .functional import losses as fl
from .functional.masks import first_pair_per_label, first_two_per_label, tuple_to_pair_weights
from .functional.reduction import AvgNonZeroReducer, MeanReducer, Reducer
from .functional.triplets import DEFAULT_CHUNK_ELEMENTS, all_triplets_margin_loss
from .registry import Registry


class BaseMetricLossFunction(nn.Module):
    """Shared call contract: checks inputs, computes, casts back to the input dtype.

    Attributes:
        labels_required: The loss needs labels even with an ``indices_tuple``.
        supports_ref: The loss accepts ``ref_emb``.
        requires_similarity: What ``distance`` must be: False for anything, True for any
            similarity, or the one similarity class the formula is written for.

    Args:
        distance: The distance or similarity; None for ``default_distance()`` (PML's).
        reducer: How per-element losses become a scalar; None for ``default_reducer()``
            (PML's).
    """

    labels_required: ClassVar[bool] = False
    supports_ref: ClassVar[bool] = True
    requires_similarity: ClassVar[SimilarityRequirement] = False

    def __init__(
        self, distance: BaseDistance | None = None, reducer: Reducer | None = None
    ) -> None:
        super().__init__()
        self.distance = self.default_distance() if distance is None else distance
        self.reducer = self.default_reducer() if reducer is None else reducer
        check_distance(type(self).__name__, self.distance, self.requires_similarity)

    @staticmethod
    def default_distance() -> BaseDistance:
        """The distance used when none is given."""
        return LpDistance()

    @staticmethod
    def default_reducer() -> Reducer:
        """The reducer used when none is given."""
        return MeanReducer()

    def forward(
        self,
        embeddings: Tensor,
        labels: Tensor | None = None,
        indices_tuple: tuple[Tensor, ...] | None = None,
        ref_emb: Tensor | None = None,
        ref_labels: Tensor | None = None,
        anchor_in_ref: Tensor | None = None,
    ) -> Tensor:
        """Computes the loss.

        Args:
            embeddings: (N, D) embeddings.
            labels: (N,) integer labels; optional when ``indices_tuple`` is given.
            indices_tuple: Mined triplets (a, p, n) or pairs (a1, p, a2, n); None uses every
                valid pair or triplet of the batch.
            ref_emb: (M, D) reference embeddings: anchors come from ``embeddings``, positives
                and negatives from ``ref_emb``.
            ref_labels: (M,) labels of ``ref_emb``.
            anchor_in_ref: (N,) integer row of ``ref_emb`` holding each anchor itself, or −1
                where the anchor is not in the reference set; those (anchor, itself) pairs are
                left out, from the labelled pairs and from ``indices_tuple``.

        Returns:
            Scalar loss, in the dtype of ``embeddings``; a zero that keeps the graph when
            nothing qualifies.
        """
        if ref_emb is not None and not self.supports_ref:
            raise ValueError(f"{type(self).__name__} does not support ref_emb")
        batch = Batch.from_call(
            embeddings,
            labels,
            indices_tuple,
            ref_emb,
            ref_labels,
            anchor_in_ref,
            labels_required=self.labels_required,
        )
        return self.compute_loss(batch).to(embeddings.dtype)

    def compute_loss(self, batch: Batch) -> Tensor:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"distance={self.distance!r}, reducer={self.reducer!r}"


LOSSES = Registry("loss", BaseMetricLossFunction)


@LOSSES.register()
class ContrastiveLoss(BaseMetricLossFunction):
    """Contrastive loss: positives pulled within ``pos_margin``, negatives pushed beyond
    ``neg_margin``; each side averaged over its non-zero terms, then summed.

    Args:
        pos_margin: Positive margin.
        neg_margin: Negative margin.
        distance: Default ``LpDistance()`` (normalised Euclidean).
        reducer: Default ``AvgNonZeroReducer()``, applied to each side.
    """

    def __init__(
        self,
        pos_margin: float = 0,
        neg_margin: float = 1,
        distance: BaseDistance | None = None,
        reducer: Reducer | None = None,
    ) -> None:
        super().__init__(distance, reducer)
        self.pos_margin = pos_margin
        self.neg_margin = neg_margin

    @staticmethod
    def default_reducer() -> Reducer:
        return AvgNonZeroReducer()

    def compute_loss(self, batch: Batch) -> Tensor:
        return fl.contrastive_loss(
            batch.matrix(self.distance),
            batch.pairs(),
            self.pos_margin,
            self.neg_margin,
            self.distance.is_inverted,
            reducer=self.reducer,
        )


@LOSSES.register()
class TripletMarginLoss(BaseMetricLossFunction):
    """Triplet margin loss ``[d_ap − d_an + margin]₊`` averaged over non-zero triplets.

    With no ``indices_tuple`` and ``triplets_per_anchor="all"`` every triplet of the batch is
    used, computed in blocks (memory bounded by ``chunk_elements``; no per-triplet index
    tensor); gradients are then first-order only.

    Args:
        margin: The margin.
        swap: Use the positive-negative distance when it is smaller than the anchor-negative one.
        smooth_loss: ``softplus`` instead of the hinge.
        triplets_per_anchor: ``"all"``, or a number of random triplets per anchor.
        distance: Default ``LpDistance()``.
        reducer: Default ``AvgNonZeroReducer()``.
        chunk_elements: Upper bound on temporaries of the all-triplets path.
    """

    def __init__(
        self,
        margin: float = 0.05,
        swap: bool = False,
        smooth_loss: bool = False,
        triplets_per_anchor: int | Literal["all"] = "all",
        distance: BaseDistance | None = None,
        reducer: Reducer | None = None,
        chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    ) -> None:
        super().__init__(distance, reducer)
        if triplets_per_anchor != "all" and not (
            isinstance(triplets_per_anchor, int) and triplets_per_anchor > 0
        ):
            raise ValueError(
                f"triplets_per_anchor must be 'all' or a positive int, got {triplets_per_anchor!r}"
            )
        self.margin = margin
        self.swap = swap
        self.smooth_loss = smooth_loss
        self.triplets_per_anchor = triplets_per_anchor
        self.chunk_elements = chunk_elements

    @staticmethod
    def default_reducer() -> Reducer:
        return AvgNonZeroReducer()

    def _distance_like(self, batch: Batch) -> tuple[Tensor, Tensor | None]:
        mat = batch.matrix(self.distance)
        dist = -mat if self.distance.is_inverted else mat
        if not self.swap:
            return dist, None
        if batch.ref_emb is None:
            return dist, dist
        ref_mat = self.distance(batch.ref_emb)
        return dist, -ref_mat if self.distance.is_inverted else ref_mat

    def compute_loss(self, batch: Batch) -> Tensor:
        dist, swap_dist = self._distance_like(batch)
        indices = batch.indices_tuple
        if indices is None and self.triplets_per_anchor != "all":
            indices = _sample_triplets(*batch.label_weights(), int(self.triplets_per_anchor))
        if indices is not None and len(indices) == 3:
            a, p, n = indices
            d_an = dist[a, n]
            if swap_dist is not None:
                d_an = torch.minimum(d_an, swap_dist[p, n])
            violation = dist[a, p] - d_an + self.margin
            losses = nn.functional.softplus(violation) if self.smooth_loss else violation.relu()
            return self.reducer(losses) if a.numel() else fl.zero_loss(dist)
        if indices is None:
            pos, neg_weights = batch.label_weights()
            anchors, positives = pos.nonzero(as_tuple=True)
        else:
            anchors, positives = indices[0], indices[1]
            neg_weights = tuple_to_pair_weights(indices, batch.shape, dist.device, dist.dtype).neg
        return all_triplets_margin_loss(
            dist,
            anchors,
            positives,
            neg_weights,
            self.margin,
            self.reducer,
            smooth=self.smooth_loss,
            swap_dist=swap_dist,
            chunk_elements=self.chunk_elements,
        )


def _sample_triplets(pos: Tensor, neg: Tensor, per_anchor: int) -> tuple[Tensor, Tensor, Tensor]:
    """``per_anchor`` random triplets for every anchor having a positive and a negative: each
    draws a positive and a negative uniformly, with replacement."""
    anchors = torch.nonzero(pos.sum(1) * neg.sum(1)).squeeze(1)
    if anchors.numel() == 0:
        empty = torch.empty(0, dtype=torch.long, device=pos.device)
        return empty, empty.clone(), empty.clone()
    p = torch.multinomial(pos[anchors].float(), per_anchor, replacement=True)
    n = torch.multinomial(neg[anchors].float(), per_anchor, replacement=True)
    return anchors.repeat_interleave(per_anchor), p.flatten(), n.flatten()


@LOSSES.register()
class NPairsLoss(BaseMetricLossFunction):
    """N-pair loss: one (anchor, positive) pair per label; each anchor's positive must win a
    softmax over all the positives. ``ref_emb`` is not supported.

    Args:
        distance: Default ``DotProductSimilarity()`` (normalising, as in PML).
        reducer: Default ``MeanReducer()``.
    """

    labels_required = True
    supports_ref = False

    def __init__(
        self, distance: BaseDistance | None = None, reducer: Reducer | None = None
    ) -> None:
        super().__init__(distance, reducer)

    @staticmethod
    def default_distance() -> BaseDistance:
        return DotProductSimilarity()

    def compute_loss(self, batch: Batch) -> Tensor:
        assert batch.labels is not None
        if batch.indices_tuple is None:
            anchors, positives = first_two_per_label(batch.labels)
        else:
            anchors, positives = first_pair_per_label(
                batch.indices_tuple[0], batch.indices_tuple[1], batch.labels
            )
        if anchors.numel() == 0:
            return fl.zero_loss(batch.embeddings)
        mat = self.distance(batch.embeddings[anchors], batch.embeddings[positives])
        return fl.npairs_loss(mat, self.distance.is_inverted, reducer=self.reducer)


@LOSSES.register()
class CircleLoss(BaseMetricLossFunction):
    """Circle loss for pair labels (Sun et al. 2020).

    Args:
        m: Relaxation margin.
        gamma: Scale.
        distance: Must be ``CosineSimilarity()`` (the default).
        reducer: Default ``AvgNonZeroReducer()``.
    """

    requires_similarity = CosineSimilarity

    def __init__(
        self,
        m: float = 0.4,
        gamma: float = 80,
        distance: BaseDistance | None = None,
        reducer: Reducer | None = None,
    ) -> None:
        super().__init__(distance, reducer)
        self.m = m
        self.gamma = gamma

    @staticmethod
    def default_distance() -> BaseDistance:
        return CosineSimilarity()

    @staticmethod
    def default_reducer() -> Reducer:
        return AvgNonZeroReducer()

    def compute_loss(self, batch: Batch) -> Tensor:
        return fl.circle_loss(
            batch.matrix(self.distance),
            batch.pair_weights(binary=True),
            self.m,
            self.gamma,
            reducer=self.reducer,
        )


@LOSSES.register()
class MultiSimilarityLoss(BaseMetricLossFunction):
    """Multi-similarity loss (Wang et al. 2019). ``alpha`` scales positives, ``beta`` negatives.

    Args:
        alpha: Positive scale.
        beta: Negative scale.
        base: Centre of the scaled similarities.
        distance: Default ``CosineSimilarity()``.
        reducer: Default ``MeanReducer()`` over all anchors.
    """

    def __init__(
        self,
        alpha: float = 2,
        beta: float = 50,
        base: float = 0.5,
        distance: BaseDistance | None = None,
        reducer: Reducer | None = None,
    ) -> None:
        super().__init__(distance, reducer)
        self.alpha = alpha
        self.beta = beta
        self.base = base

    @staticmethod
    def default_distance() -> BaseDistance:
        return CosineSimilarity()

    def compute_loss(self, batch: Batch) -> Tensor:
        return fl.multi_similarity_loss(
            batch.matrix(self.distance),
            batch.pair_weights(binary=True),
            self.alpha,
            self.beta,
            self.base,
            self.distance.is_inverted,
            reducer=self.reducer,
        )


@LOSSES.register()
class LiftedStructureLoss(BaseMetricLossFunction):
    """Lifted structure loss (Oh Song et al. 2016), per positive pair.

    Args:
        neg_margin: Negative margin.
        pos_margin: Positive margin.
        distance: Default ``LpDistance()``.
        reducer: Default ``MeanReducer()`` over positive pairs.
    """

    def __init__(
        self,
        neg_margin: float = 1,
        pos_margin: float = 0,
        distance: BaseDistance | None = None,
        reducer: Reducer | None = None,
    ) -> None:
        super().__init__(distance, reducer)
        self.neg_margin = neg_margin
        self.pos_margin = pos_margin

    def compute_loss(self, batch: Batch) -> Tensor:
        return fl.lifted_structure_loss(
            batch.matrix(self.distance),
            batch.pair_weights(),
            self.neg_margin,
            self.pos_margin,
            self.distance.is_inverted,
            reducer=self.reducer,
        )


@LOSSES.register()
class GeneralizedLiftedStructureLoss(LiftedStructureLoss):
    """Generalised lifted structure loss (Hermans et al. 2017), per anchor.

    Args:
        neg_margin: Negative margin.
        pos_margin: Positive margin.
        distance: Default ``LpDistance()``.
        reducer: Default ``MeanReducer()`` over all anchors.
    """

    def compute_loss(self, batch: Batch) -> Tensor:
        return fl.generalized_lifted_structure_loss(
            batch.matrix(self.distance),
            batch.pair_weights(binary=True),
            self.neg_margin,
            self.pos_margin,
            self.distance.is_inverted,
            reducer=self.reducer,
        )


@LOSSES.register()
class NTXentLoss(BaseMetricLossFunction):
    """NT-Xent (InfoNCE) loss over positive pairs.

    Args:
        temperature: τ.
        distance: Default ``CosineSimilarity()``.
        reducer: Default ``MeanReducer()`` over positive pairs.
    """

    def __init__(
        self,
        temperature: float = 0.07,
        distance: BaseDistance | None = None,
        reducer: Reducer | None = None,
    ) -> None:
        super().__init__(distance, reducer)
        self.temperature = temperature

    @staticmethod
    def default_distance() -> BaseDistance:
        return CosineSimilarity()

    def compute_loss(self, batch: Batch) -> Tensor:
        return fl.ntxent_loss(
            batch.matrix(self.distance),
            batch.pair_weights(),
            self.temperature,
            self.distance.is_inverted,
            reducer=self.reducer,
        )


@LOSSES.register()
class SupConLoss(NTXentLoss):
    """Supervised contrastive loss (Khosla et al. 2020), per anchor.

    Args:
        temperature: τ.
        distance: Default ``CosineSimilarity()``.
        reducer: Default ``AvgNonZeroReducer()`` over anchors.
    """

    def __init__(
        self,
        temperature: float = 0.1,
        distance: BaseDistance | None = None,
        reducer: Reducer | None = None,
    ) -> None:
        super().__init__(temperature, distance, reducer)

    @staticmethod
    def default_reducer() -> Reducer:
        return AvgNonZeroReducer()

    def compute_loss(self, batch: Batch) -> Tensor:
        return fl.supcon_loss(
            batch.matrix(self.distance),
            batch.pair_weights(binary=True),
            self.temperature,
            self.distance.is_inverted,
            reducer=self.reducer,
        )


@LOSSES.register()
class SoftContrastiveLoss(BaseMetricLossFunction):
    """DDTAS's Soft Contrastive loss (docs/ddtas.md §4), by default with the released
    reduction.

    Per anchor with mined positives and negatives:
    ``(2/β)·mean_P softplus(−β(S − λ)) + (2/α)·mean_N softplus(α(S − λ))``, and 0 for the
    other anchors; the default ``MeanReducer()`` averages over all anchors, skipped ones
    included, as released. Pass the pairs of ``ATASMSMiner`` or ``ASMSMiner`` as
    ``indices_tuple``; without one, every pair is used.

    Parameters are named by role. The DDTAS paper's letters are swapped relative to the MS
    loss: its ``alpha`` is the *negative* scale (``neg_scale``), its ``beta`` the *positive*
    scale (``pos_scale``), its ``lam`` the threshold. Those letters are accepted as
    keyword-only aliases.

    Args:
        pos_scale: β, scale of the positive term (released value 2).
        neg_scale: α, scale of the negative term (released value 40).
        threshold: λ (released value 0.7).
        alpha: Alias of ``neg_scale``.
        beta: Alias of ``pos_scale``.
        lam: Alias of ``threshold``.
        distance: A similarity; default ``CosineSimilarity()``.
        reducer: Over anchors; default ``MeanReducer()``.
    """

    requires_similarity = True

    def __init__(
        self,
        pos_scale: float = 2.0,
        neg_scale: float = 40.0,
        threshold: float = 0.7,
        *,
        alpha: float | None = None,
        beta: float | None = None,
        lam: float | None = None,
        distance: BaseDistance | None = None,
        reducer: Reducer | None = None,
    ) -> None:
        super().__init__(distance, reducer)
        self.pos_scale = _alias(pos_scale, 2.0, beta, "pos_scale", "beta")
        self.neg_scale = _alias(neg_scale, 40.0, alpha, "neg_scale", "alpha")
        self.threshold = _alias(threshold, 0.7, lam, "threshold", "lam")
        if self.pos_scale <= 0 or self.neg_scale <= 0:
            raise ValueError("pos_scale (beta) and neg_scale (alpha) must be positive")

    @staticmethod
    def default_distance() -> BaseDistance:
        return CosineSimilarity()

    def compute_loss(self, batch: Batch) -> Tensor:
        return fl.soft_contrastive_loss(
            batch.matrix(self.distance),
            batch.pairs(),
            self.pos_scale,
            self.neg_scale,
            self.threshold,
            reducer=self.reducer,
        )


def _alias(value: float, default: float, alias: float | None, name: str, alias_name: str) -> float:
    if alias is None:
        return float(value)
    if value != default:
        raise ValueError(f"give either {name} or its alias {alias_name}, not both")
    return float(alias)


@LOSSES.register()
class SoftWeightedTripletLoss(BaseMetricLossFunction):
    """fast-reid's soft-weighted batch triplet loss.

    Each anchor's positive distance is the softmax-weighted mean of its positives' distances
    (far ones weigh most), its negative distance the softmax(−d)-weighted mean of its
    negatives' (near ones weigh most); loss ``[d̄_ap − d̄_an + margin]₊``, or
    ``softplus(d̄_ap − d̄_an)`` when ``margin ≤ 0``. Unlike fast-reid, an anchor is not its own
    positive (self-pairs are excluded by index).

    Args:
        margin: fast-reid's default 0.3; ≤ 0 selects the soft margin.
        distance: Default ``LpDistance(normalize_embeddings=False)`` (fast-reid's raw features).
        reducer: Default ``MeanReducer()`` over anchors having a positive and a negative.
    """

    def __init__(
        self,
        margin: float = 0.3,
        distance: BaseDistance | None = None,
        reducer: Reducer | None = None,
    ) -> None:
        super().__init__(distance, reducer)
        self.margin = margin

    @staticmethod
    def default_distance() -> BaseDistance:
        return LpDistance(normalize_embeddings=False)

    def compute_loss(self, batch: Batch) -> Tensor:
        pairs = batch.pair_weights()
        return fl.soft_weighted_triplet_loss(
            batch.matrix(self.distance),
            pairs.pos > 0,
            pairs.neg > 0,
            self.margin,
            self.distance.is_inverted,
            reducer=self.reducer,
        )


__all__ = [
    "LOSSES",
    "BaseMetricLossFunction",
    "CircleLoss",
    "ContrastiveLoss",
    "GeneralizedLiftedStructureLoss",
    "LiftedStructureLoss",
    "MultiSimilarityLoss",
    "NPairsLoss",
    "NTXentLoss",
    "SoftContrastiveLoss",
    "SoftWeightedTripletLoss",
    "SupConLoss",
    "TripletMarginLoss",
]
