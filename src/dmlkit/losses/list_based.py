"""Losses on each anchor's whole list of the batch: the Histogram loss, the Ranked List loss, and
the smoothed-rank losses PNP and Smooth-AP. None of them takes ``ref_emb``, as in PML."""

from __future__ import annotations

import math
import numbers
import warnings
from typing import ClassVar

import torch
from torch import Tensor

from ..batch import Batch
from ..distances import BaseDistance, CosineSimilarity, DotProductSimilarity
from ..functional import list_losses as fll
from ..functional.losses import zero_loss
from ..functional.masks import tuple_element_weights
from ..functional.reduction import Reducer
from ..functional.triplets import DEFAULT_CHUNK_ELEMENTS
from ..regularizers import BaseRegularizer
from ..validation import (
    check_finite_number,
    check_positive_int,
    check_positive_number,
    finite_checks_enabled,
)
from .base import LOSSES, BaseMetricLossFunction


def _histogram_delta(n_bins: int | None, delta: float | None) -> float:
    """The node spacing from ``n_bins`` and ``delta`` (PML's rule: ``delta = 2 / n_bins``,
    100 bins when neither is given), refusing a spacing whose nodes stop short of 1 (PML fails
    with an index error on the similarities beyond its last node)."""
    if n_bins is not None:
        check_positive_int(n_bins, "n_bins")
    if delta is not None:
        check_positive_number(delta, "delta")
        if n_bins is not None and not math.isclose(delta, 2 / n_bins):
            raise ValueError(
                f"delta and n_bins must satisfy delta = 2 / n_bins, got delta={delta} and "
                f"n_bins={n_bins}"
            )
    spacing = float(delta) if delta is not None else 2 / (100 if n_bins is None else n_bins)
    last_node = (fll.histogram_node_count(spacing) - 1) * spacing - 1
    if last_node < 1 - 1e-9:
        raise ValueError(
            f"delta={delta} puts the last histogram node at {last_node:.4g}, short of 1: "
            "use delta = 2 / n_bins for an integer n_bins, or give n_bins"
        )
    return spacing


def _unit_dot_products(distance: BaseDistance) -> bool:
    """Whether the similarities are dot products of unit vectors, in [-1, 1] up to rounding."""
    return (
        type(distance) in (CosineSimilarity, DotProductSimilarity)
        and distance.normalize_embeddings
        and distance.p == 2
        and distance.power == 1
    )


@LOSSES.register()
class HistogramLoss(BaseMetricLossFunction):
    """Histogram loss (Ustinova & Lempitsky 2016): the estimated probability that a negative
    pair is more similar than a positive pair, from linear-interpolation histograms of the
    similarities on nodes −1, −1 + δ, …, 1.

    The pairs are PML's: the (anchor, positive) and (anchor, negative) pairs of every triplet
    of the labels or of ``indices_tuple`` (triplets, or pairs joined on their anchors), each
    unordered pair once; computed from (N, N) masks, never by listing triplets.

    Differences from PML: a similarity of exactly 1 (identical directions) or a rounding error
    beyond ±1 falls on the end nodes (PML: index error); similarities beyond [-1, 1] by more
    than rounding (checked unless the similarity is a dot product of unit vectors or
    :func:`~dmlkit.validation.set_finite_checks` has turned value checks off), and a
    ``delta`` whose nodes stop short of 1, raise ``ValueError`` (PML: index
    error on the uncovered values); a distance that is not a similarity is refused at
    construction (PML reads any matrix as similarities in [-1, 1]).

    Args:
        n_bins: Number of intervals over [-1, 1]; ``delta = 2 / n_bins``.
        delta: Node spacing; with ``n_bins`` too, they must agree. Neither: 100 bins.
        distance: A similarity with values in [-1, 1]; default ``CosineSimilarity()``.
        reducer: Default ``MeanReducer()``. PML reduces this loss itself and ignores its
            reducer; here the reduced value is the reducer's one element, so
            ``MeanReducer``, ``SumReducer`` and ``AvgNonZeroReducer`` give PML's value (the
            loss is never negative), a ``ThresholdReducer`` keeps or drops it, and
            ``DivisorReducer`` is refused, as by every loss that supplies no divisor.
        embedding_regularizer: Regulariser of the embeddings, or None (see
            :class:`~dmlkit.losses.base.BaseMetricLossFunction`).
        embedding_reg_weight: Its weight.
    """

    supports_ref = False
    requires_similarity = True

    def __init__(
        self,
        n_bins: int | None = None,
        delta: float | None = None,
        distance: BaseDistance | None = None,
        reducer: Reducer | None = None,
        embedding_regularizer: BaseRegularizer | None = None,
        embedding_reg_weight: float = 1,
    ) -> None:
        super().__init__(distance, reducer, embedding_regularizer, embedding_reg_weight)
        self.delta = _histogram_delta(n_bins, delta)

    @staticmethod
    def default_distance() -> BaseDistance:
        return CosineSimilarity()

    def compute_loss(self, batch: Batch) -> Tensor:
        pairs = batch.pair_weights(binary=True)
        pos, neg = fll.histogram_pair_selection(pairs.pos > 0, pairs.neg > 0)
        loss = fll.histogram_loss(
            batch.matrix(self.distance),
            pos,
            neg,
            self.delta,
            check_range=finite_checks_enabled() and not _unit_dot_products(self.distance),
        )
        return self.reducer(loss.reshape(1))

    def extra_repr(self) -> str:
        return f"delta={self.delta}, {super().extra_repr()}"


@LOSSES.register()
class RankedListLoss(BaseMetricLossFunction):
    """Ranked List loss (Wang et al. 2019; PML's defaults are its RLL-Simpler): each anchor's
    positives farther than ``alpha − margin`` and negatives closer than ``alpha`` are
    penalised by how far they are past that boundary, weighted by ``exp(Tp · gap)`` and
    ``exp(Tn · gap)``; the two sides are mixed by ``imbalance``.

    Labels are required; ``indices_tuple`` and ``ref_emb`` are refused, as in PML.

    Args:
        margin: Gap between the positive boundary and ``alpha``.
        Tn: Temperature of the negative weights.
        imbalance: Weight of the negative side, in [0, 1].
        alpha: The negative boundary; None for ``1 + margin / 2``.
        Tp: Temperature of the positive weights.
        distance: Default ``LpDistance()``.
        reducer: Default ``MeanReducer()`` over all anchors.
        embedding_regularizer: Regulariser of the embeddings, or None (see
            :class:`~dmlkit.losses.base.BaseMetricLossFunction`).
        embedding_reg_weight: Its weight.
    """

    labels_required = True
    supports_ref = False
    supports_indices_tuple = False

    def __init__(
        self,
        margin: float,
        Tn: float,  # noqa: N803 (PML's name)
        imbalance: float = 0.5,
        alpha: float | None = None,
        Tp: float = 0,  # noqa: N803 (PML's name)
        distance: BaseDistance | None = None,
        reducer: Reducer | None = None,
        embedding_regularizer: BaseRegularizer | None = None,
        embedding_reg_weight: float = 1,
    ) -> None:
        super().__init__(distance, reducer, embedding_regularizer, embedding_reg_weight)
        margin, Tn, imbalance, Tp = (  # noqa: N806 (PML's parameter names)
            check_finite_number(value, name)
            for value, name in (
                (margin, "margin"),
                (Tn, "Tn"),
                (imbalance, "imbalance"),
                (Tp, "Tp"),
            )
        )
        if alpha is not None:
            alpha = check_finite_number(alpha, "alpha")
        if not (isinstance(imbalance, numbers.Real) and 0 <= imbalance <= 1):
            raise ValueError(f"imbalance must be between 0 and 1, got {imbalance!r}")
        if Tp > 5 or Tn > 5:
            warnings.warn(
                "Values of Tp or Tn are too high. Too large temperature values may lead to "
                "overflow.",
                stacklevel=2,
            )
        self.margin: float = margin
        self.imbalance: float = imbalance
        self.alpha: float = 1 + margin / 2 if alpha is None else alpha
        self.Tp: float = Tp
        self.Tn: float = Tn

    def compute_loss(self, batch: Batch) -> Tensor:
        pos, neg = batch.label_weights()
        return fll.ranked_list_loss(
            batch.matrix(self.distance),
            pos,
            neg,
            self.margin,
            self.alpha,
            self.imbalance,
            self.Tp,
            self.Tn,
            reducer=self.reducer,
        )

    def extra_repr(self) -> str:
        return (
            f"margin={self.margin}, Tn={self.Tn}, imbalance={self.imbalance}, "
            f"alpha={self.alpha}, Tp={self.Tp}, {super().extra_repr()}"
        )


@LOSSES.register()
class PNPLoss(BaseMetricLossFunction):
    """PNP loss (Li et al. 2022, "Rethinking the Optimization of Average Precision"): for each
    anchor with a positive, a function of each positive's soft count of negatives ranked above
    it (``Σ_n σ((s_an − s_ap) / anneal)``, the positive being the anchor itself too), averaged
    over its positives, then over those anchors.

    Variants (PML's names): ``"O"``: the count itself; ``"Ds"``: log(1 + r); ``"Dq"``:
    one minus the mean of (1 + r)^−alpha; ``"Iu"``: (1 + r) log(1 + r); ``"Ib"``:
    (b r − log(1 + b r)) / b². Computed in anchor blocks: memory is bounded by
    ``chunk_elements`` plus one (N, N) matrix, never PML's (N, N, N) tensors; first-order
    gradients only.

    Labels are required; ``indices_tuple`` and ``ref_emb`` are refused, as in PML.

    Args:
        b: Scale of the ``"Ib"`` variant (must be positive for it).
        alpha: Exponent of the ``"Dq"`` variant.
        anneal: Temperature of the soft ranks.
        variant: One of ``"Ds"``, ``"Dq"``, ``"Iu"``, ``"Ib"``, ``"O"``.
        distance: Must be ``CosineSimilarity()`` (the default), as in PML.
        reducer: Default ``MeanReducer()``. PML reduces this loss itself and ignores its
            reducer; here the reduced value is the reducer's one element, so
            ``MeanReducer``, ``SumReducer`` and ``AvgNonZeroReducer`` give PML's value (the
            loss is never negative), a ``ThresholdReducer`` keeps or drops it, and
            ``DivisorReducer`` is refused, as by every loss that supplies no divisor.
        embedding_regularizer: Regulariser of the embeddings, or None (see
            :class:`~dmlkit.losses.base.BaseMetricLossFunction`).
        embedding_reg_weight: Its weight.
        chunk_elements: Upper bound on the elements of each block's temporaries.
    """

    VARIANTS: ClassVar[list[str]] = list(fll.PNP_VARIANTS)
    labels_required = True
    supports_ref = False
    supports_indices_tuple = False
    requires_similarity = CosineSimilarity

    def __init__(
        self,
        b: float = 2,
        alpha: float = 1,
        anneal: float = 0.01,
        variant: fll.PNPVariant = "O",
        distance: BaseDistance | None = None,
        reducer: Reducer | None = None,
        embedding_regularizer: BaseRegularizer | None = None,
        embedding_reg_weight: float = 1,
        chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    ) -> None:
        super().__init__(distance, reducer, embedding_regularizer, embedding_reg_weight)
        if variant not in fll.PNP_VARIANTS:
            raise ValueError(f"variant={variant!r} but must be one of {self.VARIANTS}")
        if variant == "Ib":
            check_positive_number(b, "b")
        self.b = check_finite_number(b, "b")
        self.alpha = check_finite_number(alpha, "alpha")
        self.anneal = check_positive_number(anneal, "anneal")
        self.variant: fll.PNPVariant = variant
        self.chunk_elements = check_positive_int(chunk_elements, "chunk_elements")

    @staticmethod
    def default_distance() -> BaseDistance:
        return CosineSimilarity()

    def compute_loss(self, batch: Batch) -> Tensor:
        pos, neg = batch.label_weights()
        loss = fll.pnp_loss(
            batch.matrix(self.distance),
            pos,
            neg,
            self.variant,
            self.anneal,
            self.b,
            self.alpha,
            self.chunk_elements,
        )
        return self.reducer(loss.reshape(1))

    def extra_repr(self) -> str:
        return (
            f"b={self.b}, alpha={self.alpha}, anneal={self.anneal}, variant={self.variant!r}, "
            f"{super().extra_repr()}"
        )


@LOSSES.register()
class SmoothAPLoss(BaseMetricLossFunction):
    """Smooth-AP (Brown et al. 2020): one minus each anchor's average precision, its ranks
    smoothed with ``σ(Δs / temperature)``; each anchor's positives include itself and its
    list is the whole batch, as in the paper's code and PML.

    As in PML every class of the batch must have the same number of items (a batch from
    ``MPerClassSampler``), else ``ValueError``; ``ref_emb`` is refused. An ``indices_tuple``
    only weighs each anchor's term by how often it appears in the tuple, over the largest such
    count (PML's rule). Computed in anchor blocks against each anchor's K positives: memory is
    bounded by ``chunk_elements`` plus one (N, N) matrix, and the work is N·K·N rather than
    PML's N³; first-order gradients only.

    Differences from PML, whose code reads the positives of an anchor off contiguous blocks of
    the batch whose size is the number of classes (not the class size), which is right only for
    batches sorted by label with as many classes as items per class: here the positives are the
    items with the anchor's label, wherever they are and whatever the class size. With one item
    per class every anchor's loss is 0 (as PML's). With ``CosineSimilarity(power=p)``, p ≠ 1,
    PML ranks positives among positives by unpowered similarities; here by the powered ones.

    Args:
        temperature: Temperature of the soft ranks.
        distance: Must be ``CosineSimilarity()`` (the default), as in PML.
        reducer: Default ``MeanReducer()`` over all anchors.
        embedding_regularizer: Regulariser of the embeddings, or None (see
            :class:`~dmlkit.losses.base.BaseMetricLossFunction`).
        embedding_reg_weight: Its weight.
        chunk_elements: Upper bound on the elements of each block's temporaries.
    """

    labels_required = True
    supports_ref = False
    requires_similarity = CosineSimilarity
    tuple_weighs_items = True
    needs_class_labels = True

    def __init__(
        self,
        temperature: float = 0.01,
        distance: BaseDistance | None = None,
        reducer: Reducer | None = None,
        embedding_regularizer: BaseRegularizer | None = None,
        embedding_reg_weight: float = 1,
        chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    ) -> None:
        super().__init__(distance, reducer, embedding_regularizer, embedding_reg_weight)
        self.temperature = check_positive_number(temperature, "temperature")
        self.chunk_elements = check_positive_int(chunk_elements, "chunk_elements")

    @staticmethod
    def default_distance() -> BaseDistance:
        return CosineSimilarity()

    def compute_loss(self, batch: Batch) -> Tensor:
        labels = batch.class_labels(type(self).__name__)
        same = labels[:, None] == labels[None, :]
        sizes = same.sum(dim=1)  # each item's class size
        # The one host read: the class size, a tensor shape below; -1 when sizes differ.
        size = 1
        if len(labels):
            size = int(torch.where(sizes.amin() == sizes.amax(), sizes.amax(), -1))
        if size < 0:
            raise ValueError(
                "SmoothAPLoss needs the same number of items in every class of the batch, got "
                f"class sizes {sorted(set(sizes.tolist()))}; sample batches with "
                "samplers.MPerClassSampler (batch_size a multiple of m)"
            )
        sim = batch.matrix(self.distance)
        if size == 1:
            return zero_loss(sim)
        losses = fll.smooth_ap_loss(sim, same, self.temperature, self.chunk_elements, size)
        weights = tuple_element_weights(batch.indices_tuple, len(labels), losses)
        return self.reducer(losses * weights)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, {super().extra_repr()}"


__all__ = ["HistogramLoss", "PNPLoss", "RankedListLoss", "SmoothAPLoss"]
