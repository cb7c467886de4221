"""Losses on pairs and triplets of the batch: contrastive, triplet, N-pairs, circle,
multi-similarity, lifted structure, NT-Xent, SupCon, DDTAS's Soft Contrastive and fast-reid's
soft-weighted triplet loss, and the signal-to-noise-ratio contrastive loss."""

from __future__ import annotations

from typing import Literal

from torch import Tensor

from ..batch import Batch
from ..distances import (
    BaseDistance,
    CosineSimilarity,
    DotProductSimilarity,
    LpDistance,
    SNRDistance,
)
from ..functional import losses as fl
from ..functional.masks import first_pair_per_label, first_two_per_label, tuple_to_pair_weights
from ..functional.reduction import AvgNonZeroReducer, Reducer, labels_for_reducers
from ..functional.triplets import (
    DEFAULT_CHUNK_ELEMENTS,
    all_triplets_margin_loss,
    listed_triplet_losses,
    mine_triplets,
    sample_triplets,
)
from ..regularizers import BaseRegularizer
from ..validation import check_triplets_per_anchor
from .base import LOSSES, BaseMetricLossFunction


@LOSSES.register()
class ContrastiveLoss(BaseMetricLossFunction):
    """Contrastive loss: positives pulled within ``pos_margin``, negatives pushed beyond
    ``neg_margin``; each side averaged over its non-zero terms, then summed.

    Args:
        pos_margin: Positive margin.
        neg_margin: Negative margin.
        distance: Default ``LpDistance()`` (normalised Euclidean).
        reducer: Default ``AvgNonZeroReducer()``, applied to each side.
        embedding_regularizer: Regulariser of the embeddings, or None (see
            :class:`~dmlkit.losses.base.BaseMetricLossFunction`).
        embedding_reg_weight: Its weight.
    """

    def __init__(
        self,
        pos_margin: float = 0,
        neg_margin: float = 1,
        distance: BaseDistance | None = None,
        reducer: Reducer | None = None,
        embedding_regularizer: BaseRegularizer | None = None,
        embedding_reg_weight: float = 1,
    ) -> None:
        super().__init__(distance, reducer, embedding_regularizer, embedding_reg_weight)
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
        embedding_regularizer: Regulariser of the embeddings, or None (see
            :class:`~dmlkit.losses.base.BaseMetricLossFunction`).
        embedding_reg_weight: Its weight.
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
        embedding_regularizer: BaseRegularizer | None = None,
        embedding_reg_weight: float = 1,
        chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    ) -> None:
        super().__init__(distance, reducer, embedding_regularizer, embedding_reg_weight)
        self.triplets_per_anchor = check_triplets_per_anchor(triplets_per_anchor)
        self.margin = margin
        self.swap = swap
        self.smooth_loss = smooth_loss
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
            indices = sample_triplets(*batch.label_weights(), int(self.triplets_per_anchor))
        if not self.reducer.fusable and (indices is None or len(indices) == 4):
            # A reducer that reduces the losses themselves gets them listed, as PML lists them.
            if indices is None:
                pos, neg = batch.label_weights()
                anchors, positives = pos.nonzero(as_tuple=True)
            else:
                anchors, positives = indices[0], indices[1]
                neg = tuple_to_pair_weights(indices, batch.shape, dist.device, dist.dtype).neg
            indices = mine_triplets(dist, anchors, positives, neg, None, None, self.chunk_elements)
        if indices is not None and len(indices) == 3:
            a, p, n = indices
            if not a.numel():
                return fl.zero_loss(dist)
            losses = listed_triplet_losses(dist, a, p, n, self.margin, self.smooth_loss, swap_dist)
            if self.reducer.fusable:  # a weighted total: no class is read
                return self.reducer(losses)
            # Each triplet's class is its anchor's, for a reducer that weighs by class.
            with labels_for_reducers(None if batch.labels is None else batch.labels[a]):
                return self.reducer(losses)
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


@LOSSES.register()
class NPairsLoss(BaseMetricLossFunction):
    """N-pair loss: one (anchor, positive) pair per label; each anchor's positive must win a
    softmax over all the positives. ``ref_emb`` is not supported.

    Args:
        distance: Default ``DotProductSimilarity()`` (normalising, as in PML).
        reducer: Default ``MeanReducer()``.
        embedding_regularizer: Regulariser of the embeddings, or None (see
            :class:`~dmlkit.losses.base.BaseMetricLossFunction`).
        embedding_reg_weight: Its weight.
    """

    labels_required = True
    supports_ref = False

    needs_class_labels = True

    def __init__(
        self,
        distance: BaseDistance | None = None,
        reducer: Reducer | None = None,
        embedding_regularizer: BaseRegularizer | None = None,
        embedding_reg_weight: float = 1,
    ) -> None:
        super().__init__(distance, reducer, embedding_regularizer, embedding_reg_weight)

    @staticmethod
    def default_distance() -> BaseDistance:
        return DotProductSimilarity()

    def compute_loss(self, batch: Batch) -> Tensor:
        labels = batch.class_labels(type(self).__name__)
        if batch.indices_tuple is None:
            anchors, positives = first_two_per_label(labels)
        else:
            anchors, positives = first_pair_per_label(
                batch.indices_tuple[0], batch.indices_tuple[1], labels
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
        embedding_regularizer: Regulariser of the embeddings, or None (see
            :class:`~dmlkit.losses.base.BaseMetricLossFunction`).
        embedding_reg_weight: Its weight.
    """

    requires_similarity = CosineSimilarity

    def __init__(
        self,
        m: float = 0.4,
        gamma: float = 80,
        distance: BaseDistance | None = None,
        reducer: Reducer | None = None,
        embedding_regularizer: BaseRegularizer | None = None,
        embedding_reg_weight: float = 1,
    ) -> None:
        super().__init__(distance, reducer, embedding_regularizer, embedding_reg_weight)
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
        embedding_regularizer: Regulariser of the embeddings, or None (see
            :class:`~dmlkit.losses.base.BaseMetricLossFunction`).
        embedding_reg_weight: Its weight.
    """

    def __init__(
        self,
        alpha: float = 2,
        beta: float = 50,
        base: float = 0.5,
        distance: BaseDistance | None = None,
        reducer: Reducer | None = None,
        embedding_regularizer: BaseRegularizer | None = None,
        embedding_reg_weight: float = 1,
    ) -> None:
        super().__init__(distance, reducer, embedding_regularizer, embedding_reg_weight)
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
        embedding_regularizer: Regulariser of the embeddings, or None (see
            :class:`~dmlkit.losses.base.BaseMetricLossFunction`).
        embedding_reg_weight: Its weight.
    """

    def __init__(
        self,
        neg_margin: float = 1,
        pos_margin: float = 0,
        distance: BaseDistance | None = None,
        reducer: Reducer | None = None,
        embedding_regularizer: BaseRegularizer | None = None,
        embedding_reg_weight: float = 1,
    ) -> None:
        super().__init__(distance, reducer, embedding_regularizer, embedding_reg_weight)
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
        embedding_regularizer: Regulariser of the embeddings, or None (see
            :class:`~dmlkit.losses.base.BaseMetricLossFunction`).
        embedding_reg_weight: Its weight.
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
        embedding_regularizer: Regulariser of the embeddings, or None (see
            :class:`~dmlkit.losses.base.BaseMetricLossFunction`).
        embedding_reg_weight: Its weight.
    """

    def __init__(
        self,
        temperature: float = 0.07,
        distance: BaseDistance | None = None,
        reducer: Reducer | None = None,
        embedding_regularizer: BaseRegularizer | None = None,
        embedding_reg_weight: float = 1,
    ) -> None:
        super().__init__(distance, reducer, embedding_regularizer, embedding_reg_weight)
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
        embedding_regularizer: Regulariser of the embeddings, or None (see
            :class:`~dmlkit.losses.base.BaseMetricLossFunction`).
        embedding_reg_weight: Its weight.
    """

    def __init__(
        self,
        temperature: float = 0.1,
        distance: BaseDistance | None = None,
        reducer: Reducer | None = None,
        embedding_regularizer: BaseRegularizer | None = None,
        embedding_reg_weight: float = 1,
    ) -> None:
        super().__init__(
            temperature, distance, reducer, embedding_regularizer, embedding_reg_weight
        )

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
        embedding_regularizer: Regulariser of the embeddings, or None (see
            :class:`~dmlkit.losses.base.BaseMetricLossFunction`).
        embedding_reg_weight: Its weight.
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
        embedding_regularizer: BaseRegularizer | None = None,
        embedding_reg_weight: float = 1,
    ) -> None:
        super().__init__(distance, reducer, embedding_regularizer, embedding_reg_weight)
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
        embedding_regularizer: Regulariser of the embeddings, or None (see
            :class:`~dmlkit.losses.base.BaseMetricLossFunction`).
        embedding_reg_weight: Its weight.
    """

    def __init__(
        self,
        margin: float = 0.3,
        distance: BaseDistance | None = None,
        reducer: Reducer | None = None,
        embedding_regularizer: BaseRegularizer | None = None,
        embedding_reg_weight: float = 1,
    ) -> None:
        super().__init__(distance, reducer, embedding_regularizer, embedding_reg_weight)
        self.margin = margin

    @staticmethod
    def default_distance() -> BaseDistance:
        return LpDistance(normalize_embeddings=False)

    def compute_loss(self, batch: Batch) -> Tensor:
        pairs = batch.pair_weights()
        return fl.soft_weighted_triplet_loss(
            batch.matrix(self.distance),
            pairs.pos,
            pairs.neg,
            self.margin,
            self.distance.is_inverted,
            reducer=self.reducer,
        )


@LOSSES.register()
class SignalToNoiseRatioContrastiveLoss(ContrastiveLoss):
    """The contrastive loss on signal-to-noise-ratio distances (Yuan et al. 2019).

    The Reality Check (Musgrave et al. 2020) trains it with
    ``embedding_regularizer=ZeroMeanRegularizer()`` and a tuned ``embedding_reg_weight``
    (the paper's zero-mean regularisation of the embeddings); PML's defaults, kept here, have
    no regulariser.

    Args:
        pos_margin: Positive margin.
        neg_margin: Negative margin.
        distance: Must be an ``SNRDistance`` (default ``SNRDistance()``).
        reducer: Default ``AvgNonZeroReducer()``, applied to each side.
        embedding_regularizer: Regulariser of the embeddings, or None (see
            :class:`~dmlkit.losses.base.BaseMetricLossFunction`).
        embedding_reg_weight: Its weight.
    """

    requires_similarity = SNRDistance

    @staticmethod
    def default_distance() -> BaseDistance:
        return SNRDistance()
