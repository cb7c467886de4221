"""Losses over tuples of the batch: the angular loss, the tuplet margin loss, the intra-pair
variance loss and the instance loss (PML 2.9's classes)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from ..batch import Batch
from ..distances import BaseDistance, CosineSimilarity, LpDistance
from ..functional import losses as fl
from ..functional import tuple_losses as ft
from ..functional.masks import PairIndices
from ..functional.reduction import Reducer
from ..regularizers import BaseRegularizer
from ..validation import check_finite_number, check_positive_number
from .base import LOSSES, BaseMetricLossFunction


def _fraction(value: object, name: str) -> float:
    """A constructor option in [0, 1), as a ``float``."""
    number = check_finite_number(value, name)
    if not 0 <= number < 1:
        raise ValueError(f"{name} must lie in [0, 1), got {value!r}")
    return number


def _zero(batch: Batch) -> Tensor:
    """A zero keeping the graph of the embeddings and of the reference set, if any."""
    zero = fl.zero_loss(batch.embeddings)
    return zero if batch.ref_emb is None else zero + fl.zero_loss(batch.ref_emb)


@LOSSES.register()
class AngularLoss(BaseMetricLossFunction):
    """Angular loss (Wang et al. 2017), as PML computes it: for every positive pair (a, p),
    ``log(1 + Σ_n exp(4·tan²α·(â + p̂)·r_n − 2·(1 + tan²α)·â·p̂))`` over the references n whose
    label differs from a's; averaged over the positive pairs.

    As in PML: the anchors and positives are L2-normalised but the references in the negative
    term are not; the negatives are every differently labelled reference, also with an
    ``indices_tuple`` (whose positive pairs, or triplets' (a, p) pairs, are used, and which
    gives 0 when it holds no negative pair or triplet); labels are required.

    Computed in blocks of positive pairs (no pair-by-reference tensor is kept); gradients are
    first-order only.

    Args:
        alpha: The angle α in degrees, in (0, 90) (PML accepts any number); ``self.alpha``
            keeps it in degrees, as given, where PML's holds a tensor in radians.
        distance: Must be ``LpDistance(p=2, power=1, normalize_embeddings=True)`` (the
            default), as in PML; it is used only to normalise.
        reducer: Over the positive pairs; default ``MeanReducer()``.
        embedding_regularizer: Regulariser of the embeddings, or None (see
            :class:`~dmlkit.losses.base.BaseMetricLossFunction`).
        embedding_reg_weight: Its weight.
    """

    labels_required = True
    requires_similarity = LpDistance

    def __init__(
        self,
        alpha: float = 40,
        distance: BaseDistance | None = None,
        reducer: Reducer | None = None,
        embedding_regularizer: BaseRegularizer | None = None,
        embedding_reg_weight: float = 1,
    ) -> None:
        super().__init__(distance, reducer, embedding_regularizer, embedding_reg_weight)
        if not (
            self.distance.p == 2 and self.distance.power == 1 and self.distance.normalize_embeddings
        ):
            raise ValueError(
                "AngularLoss requires LpDistance(p=2, power=1, normalize_embeddings=True), "
                f"got {self.distance!r}"
            )
        self.alpha = check_finite_number(alpha, "alpha")
        if not 0 < self.alpha < 90:
            raise ValueError(f"alpha must be an angle in degrees in (0, 90), got {alpha!r}")

    def compute_loss(self, batch: Batch) -> Tensor:
        pos, neg = batch.label_weights()
        if batch.indices_tuple is None:
            anchors, positives = pos.nonzero(as_tuple=True)
        else:
            pairs = PairIndices.from_tuple(batch.indices_tuple)
            if pairs.num_pos == len(pairs):  # no negative pair or triplet: PML's zero
                return _zero(batch)
            anchors, positives = pairs.a1, pairs.p
        if anchors.numel() == 0:
            return _zero(batch)
        unit = F.normalize(batch.embeddings, dim=1)
        refs = batch.embeddings if batch.ref_emb is None else batch.ref_emb
        return ft.angular_loss(
            unit,
            refs,
            unit if batch.ref_emb is None else F.normalize(refs, dim=1),
            anchors,
            positives,
            neg,
            self.alpha,
            reducer=self.reducer,
            refs_are_anchors=batch.ref_emb is None,
        )

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, {super().extra_repr()}"


@LOSSES.register()
class TupletMarginLoss(BaseMetricLossFunction):
    """Tuplet margin loss (Yu & Tao 2019): per positive pair (a, p),
    ``log(1 + Σ_{n ∈ N_a} exp(s·(cos θ_an − cos(θ_ap − m))))``; averaged over positive pairs.

    The negatives of a pair are its anchor's negative pairs (with an ``indices_tuple``, the
    tuple's, each repeat a term); an anchor without any gives 0. Unlike PML, a positive cosine
    of exactly 1 gets a finite gradient (PML's arccos gives NaN).

    Args:
        margin: The angular margin m in degrees; ``self.margin`` keeps it in degrees, as
            given, where PML's holds it in radians.
        scale: s, positive.
        distance: Must be ``CosineSimilarity()`` (the default).
        reducer: Over the positive pairs; default ``MeanReducer()``.
        embedding_regularizer: Regulariser of the embeddings, or None (see
            :class:`~dmlkit.losses.base.BaseMetricLossFunction`).
        embedding_reg_weight: Its weight.
    """

    requires_similarity = CosineSimilarity

    def __init__(
        self,
        margin: float = 5.73,
        scale: float = 64,
        distance: BaseDistance | None = None,
        reducer: Reducer | None = None,
        embedding_regularizer: BaseRegularizer | None = None,
        embedding_reg_weight: float = 1,
    ) -> None:
        super().__init__(distance, reducer, embedding_regularizer, embedding_reg_weight)
        self.margin = check_finite_number(margin, "margin")
        self.scale = check_positive_number(scale, "scale")

    @staticmethod
    def default_distance() -> BaseDistance:
        return CosineSimilarity()

    def compute_loss(self, batch: Batch) -> Tensor:
        pairs = batch.pair_weights()
        if batch.indices_tuple is None:
            anchors, positives = pairs.pos.nonzero(as_tuple=True)
        else:
            mined = PairIndices.from_tuple(batch.indices_tuple)
            anchors, positives = mined.a1, mined.p
        return ft.tuplet_margin_loss(
            batch.matrix(self.distance),
            anchors,
            positives,
            pairs.neg,
            self.margin,
            self.scale,
            reducer=self.reducer,
        )

    def extra_repr(self) -> str:
        return f"margin={self.margin}, scale={self.scale}, {super().extra_repr()}"


@LOSSES.register()
class IntraPairVarianceLoss(BaseMetricLossFunction):
    """Intra-pair variance loss (Yu & Tao 2019): positive pairs less similar than
    ``(1 − pos_eps)`` times the positives' mean, and negative pairs more similar than
    ``(1 + neg_eps)`` times the negatives' mean, are penalised by the squared excess; each side
    averaged over its pairs, then summed. With a distance the directions swap, as in PML.

    Args:
        pos_eps: ε⁺, in [0, 1).
        neg_eps: ε⁻, in [0, 1).
        distance: Default ``CosineSimilarity()``.
        reducer: Applied to each side; default ``MeanReducer()``.
        embedding_regularizer: Regulariser of the embeddings, or None (see
            :class:`~dmlkit.losses.base.BaseMetricLossFunction`).
        embedding_reg_weight: Its weight.
    """

    def __init__(
        self,
        pos_eps: float = 0.01,
        neg_eps: float = 0.01,
        distance: BaseDistance | None = None,
        reducer: Reducer | None = None,
        embedding_regularizer: BaseRegularizer | None = None,
        embedding_reg_weight: float = 1,
    ) -> None:
        super().__init__(distance, reducer, embedding_regularizer, embedding_reg_weight)
        self.pos_eps = _fraction(pos_eps, "pos_eps")
        self.neg_eps = _fraction(neg_eps, "neg_eps")

    @staticmethod
    def default_distance() -> BaseDistance:
        return CosineSimilarity()

    def compute_loss(self, batch: Batch) -> Tensor:
        return ft.intra_pair_variance_loss(
            batch.matrix(self.distance),
            batch.pairs(),
            self.pos_eps,
            self.neg_eps,
            self.distance.is_inverted,
            reducer=self.reducer,
        )

    def extra_repr(self) -> str:
        return f"pos_eps={self.pos_eps}, neg_eps={self.neg_eps}, {super().extra_repr()}"


@LOSSES.register()
class InstanceLoss(BaseMetricLossFunction):
    """Instance loss (Zheng et al. 2020) as PML computes it: the softmax cross-entropy of each
    item's cosine similarities to the batch (itself included) times ``gamma``, the target being
    the batch position equal to the rank of its label among the batch's distinct labels.

    With labels 0 … N − 1 in batch order (every image its own class, as in the paper) each
    item's target is itself. ``indices_tuple`` and ``ref_emb`` are refused, as in PML.

    Args:
        gamma: Logit scale, positive.
        distance: Must be ``CosineSimilarity()`` (the default).
        reducer: Over the items; default ``MeanReducer()``.
        embedding_regularizer: Regulariser of the embeddings, or None (see
            :class:`~dmlkit.losses.base.BaseMetricLossFunction`).
        embedding_reg_weight: Its weight.
    """

    labels_required = True
    supports_ref = False
    supports_indices_tuple = False
    needs_class_labels = True
    requires_similarity = CosineSimilarity

    def __init__(
        self,
        gamma: float = 64,
        distance: BaseDistance | None = None,
        reducer: Reducer | None = None,
        embedding_regularizer: BaseRegularizer | None = None,
        embedding_reg_weight: float = 1,
    ) -> None:
        super().__init__(distance, reducer, embedding_regularizer, embedding_reg_weight)
        self.gamma = check_positive_number(gamma, "gamma")

    @staticmethod
    def default_distance() -> BaseDistance:
        return CosineSimilarity()

    def compute_loss(self, batch: Batch) -> Tensor:
        labels = batch.class_labels("InstanceLoss")
        return ft.instance_loss(
            batch.matrix(self.distance), labels, self.gamma, reducer=self.reducer
        )

    def extra_repr(self) -> str:
        return f"gamma={self.gamma}, {super().extra_repr()}"


__all__ = ["AngularLoss", "InstanceLoss", "IntraPairVarianceLoss", "TupletMarginLoss"]
