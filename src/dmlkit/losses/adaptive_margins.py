"""Losses whose margins adapt to the data: the dynamic soft margin (Zhang & Rusinkiewicz 2019),
the manifold loss with hard proxies (Aziere & Todorovic 2019) and the threshold-consistent
margin (Zhang et al. 2023).

Each takes PML's constructor parameters and defaults. PML returns each of them already reduced
(a mean) and ignores its ``reducer``; here the reducer reduces the per-element terms PML
averages, so the default ``MeanReducer()`` gives PML's value and another reducer is applied,
not ignored.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import torch
from torch import Tensor, nn

from ..batch import Batch
from ..distances import BaseDistance, CosineSimilarity, LpDistance
from ..functional import adaptive_margins as fam
from ..functional.masks import tuple_to_pair_weights
from ..functional.reduction import Reducer, labels_for_reducers
from ..functional.triplets import mine_triplets
from ..regularizers import BaseRegularizer
from ..validation import (
    check_anchor_in_ref,
    check_batch,
    check_class_labels,
    check_finite_number,
    check_labels,
    check_positive_int,
)
from .base import LOSSES, BaseMetricLossFunction

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _unlabelled_batch(
    embeddings: object,
    ref_emb: object | None,
    ref_labels: object | None,
    anchor_in_ref: object | None,
) -> Batch:
    """The batch of a call without labels or tuple (PML's label-free calls), checked as
    :meth:`~dmlkit.batch.Batch.from_call` checks a call, in the compute dtype. Such a call pairs
    rows by index, so ``ref_labels`` and ``anchor_in_ref`` are refused."""
    emb, _, ref, ref_lab = check_batch(embeddings, None, ref_emb, ref_labels, labels_required=False)
    if anchor_in_ref is not None:
        check_anchor_in_ref(
            anchor_in_ref, emb.shape[0], None if ref is None else ref.shape[0], emb.device
        )
    if ref_lab is not None or anchor_in_ref is not None:
        raise ValueError(
            "without labels or an indices_tuple, rows are paired by index: ref_labels and "
            "anchor_in_ref are not used; pass labels too, or neither"
        )
    if emb.dtype in _LOW_PRECISION:
        emb = emb.float()
        ref = None if ref is None else ref.float()
    return Batch(emb, None, ref, None, None)


def _check_unit_interval(value: float, name: str, *, open_ends: bool) -> float:
    """A real ``value`` in [0, 1] (in (0, 1) with ``open_ends``), as a float."""
    real = isinstance(value, (int, float)) and not isinstance(value, bool)
    inside = real and (0 < value < 1 if open_ends else 0 <= value <= 1)
    if not inside:
        interval = "(0, 1)" if open_ends else "[0, 1]"
        raise ValueError(f"{name} must be a number in {interval}, got {value!r}")
    return float(value)


@LOSSES.register()
class DynamicSoftMarginLoss(BaseMetricLossFunction):
    """Dynamic soft margin loss (Zhang & Rusinkiewicz 2019): each triplet's difference
    ``d = d_ap − d_an`` weighted by the CDF, at ``d``, of a running histogram of the differences
    seen so far, so the margin adapts to the distribution of the differences; the weighted
    differences are averaged.

    The triplets are every (anchor, positive, negative) of the labels, or those of a mined tuple
    (pairs combine into every triplet sharing an anchor, as in PML). Without labels and tuple
    (PML's label-free mode), row i of ``ref_emb`` is the positive of row i of ``embeddings``
    and the negative is the closest of the anchor's other references and the positive's other
    anchors.

    The histogram has ``num_bins`` knots ``min_val + kδ``, ``δ = 2|min_val| / num_bins``. Each
    call first adds its triplets, each splitting a weight ``momentum`` between its two nearest
    knots, to ``(1 − momentum)`` times the histogram (the first call replaces the empty
    histogram), renormalises, then weighs its triplets: all as PML does (the batch's share is
    thus ``m·T / (1 − m + m·T)`` for T triplets). The histogram is the buffer ``hist_`` (PML's
    name), saved by ``state_dict``; it follows the embeddings' device and compute dtype, and
    every call updates it, in training or evaluation.

    Differences from PML, all deliberate:

    * No gradient flows through the histogram (the paper's code detaches it). PML's keeps the
      graph of the batch that updated it, so its gradient holds an extra term and the second
      backward pass fails (PML issue #731).
    * A difference beyond the last knot (``d ≥ min_val + (num_bins − 1)δ``, e.g. 1.6 with the
      defaults) or below ``min_val`` is placed on the nearest knot; PML indexes past its
      histogram there and raises.
    * Label-free: only the ``min(N, M)`` matched pairs count; PML pads to ``max(N, M)`` with
      zero differences, which enter its mean and its histogram. ``ref_emb`` is required (PML
      then pairs each item with itself), and a given ``indices_tuple`` is used even without
      labels (PML then ignores it). PML's label-free backward pass fails (an in-place write).

    Args:
        min_val: The first knot; negative (the knots span ``[min_val, −min_val)``).
        num_bins: The number of knots.
        momentum: The weight of each new triplet in the running histogram, in [0, 1].
        distance: An ``LpDistance`` with ``normalize_embeddings=True`` and ``p=2`` (default
            ``LpDistance()``), as PML requires.
        reducer: Reduces the weighted differences; default ``MeanReducer()`` (PML's mean).
        embedding_regularizer: Regulariser of the embeddings, or None (see
            :class:`~dmlkit.losses.base.BaseMetricLossFunction`).
        embedding_reg_weight: Its weight.

    Attributes:
        hist_: (num_bins,) buffer, the running histogram (zeros before the first call).
    """

    requires_similarity = LpDistance
    hist_: Tensor

    def __init__(
        self,
        min_val: float = -2.0,
        num_bins: int = 10,
        momentum: float = 0.01,
        distance: BaseDistance | None = None,
        reducer: Reducer | None = None,
        embedding_regularizer: BaseRegularizer | None = None,
        embedding_reg_weight: float = 1,
    ) -> None:
        super().__init__(distance, reducer, embedding_regularizer, embedding_reg_weight)
        if not (self.distance.normalize_embeddings and self.distance.p == 2):
            raise ValueError(
                "DynamicSoftMarginLoss requires LpDistance with normalize_embeddings=True and "
                f"p=2, got {self.distance!r}"
            )
        if isinstance(min_val, bool) or not isinstance(min_val, (int, float)) or not min_val < 0:
            raise ValueError(f"min_val must be a negative number, got {min_val!r}")
        self.min_val = float(min_val)
        self.num_bins = check_positive_int(num_bins, "num_bins")
        self.momentum = _check_unit_interval(momentum, "momentum", open_ends=False)
        self.delta = 2 * abs(self.min_val) / self.num_bins
        self.register_buffer("hist_", torch.zeros(self.num_bins))

    def forward(
        self,
        embeddings: Tensor,
        labels: Tensor | None = None,
        indices_tuple: tuple[Tensor, ...] | None = None,
        ref_emb: Tensor | None = None,
        ref_labels: Tensor | None = None,
        anchor_in_ref: Tensor | None = None,
    ) -> Tensor:
        """Computes the loss and updates the histogram; see
        :meth:`~dmlkit.losses.base.BaseMetricLossFunction.forward`. Without ``labels`` and
        ``indices_tuple``, row i of ``ref_emb`` is the positive of row i of ``embeddings``."""
        if labels is not None or indices_tuple is not None:
            return super().forward(
                embeddings, labels, indices_tuple, ref_emb, ref_labels, anchor_in_ref
            )
        if ref_emb is None:
            raise ValueError(
                "DynamicSoftMarginLoss needs labels, an indices_tuple, or ref_emb whose row i "
                "is the positive of row i of embeddings"
            )
        batch = _unlabelled_batch(embeddings, ref_emb, ref_labels, anchor_in_ref)
        return self.loss_of_batch(batch, embeddings.dtype)

    def compute_loss(self, batch: Batch) -> Tensor:
        dist = batch.matrix(self.distance)
        hist = self.hist_.to(dist)
        settings = (self.min_val, self.delta, self.momentum, self.reducer)
        indices = batch.indices_tuple
        if indices is None and batch.labels is None and batch.relation is None:
            loss, hist = fam.dynamic_soft_margin_loss(
                fam.hardest_negative_differences(dist), hist, *settings
            )
        elif indices is not None and len(indices) == 3:
            a, p, n = indices
            loss, hist = fam.dynamic_soft_margin_loss(dist[a, p] - dist[a, n], hist, *settings)
        else:
            if indices is None:
                pos, neg = batch.label_weights()
                anchors, positives = pos.nonzero(as_tuple=True)
            else:
                anchors, positives = indices[0], indices[1]
                neg = tuple_to_pair_weights(indices, batch.shape, dist.device, dist.dtype).neg
            if self.reducer.fusable:
                loss, hist = fam.all_triplets_dynamic_soft_margin_loss(
                    dist, anchors, positives, neg, hist, *settings
                )
            else:  # a reducer that reduces the losses themselves gets them listed, as in PML
                a, p, n = mine_triplets(dist, anchors, positives, neg, None, None)
                with labels_for_reducers(None if batch.labels is None else batch.labels[a]):
                    loss, hist = fam.dynamic_soft_margin_loss(
                        dist[a, p] - dist[a, n], hist, *settings
                    )
        self.hist_ = hist
        return loss

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, min_val={self.min_val}, num_bins={self.num_bins}, "
            f"momentum={self.momentum}"
        )


@LOSSES.register()
class ManifoldLoss(BaseMetricLossFunction):
    """Manifold loss with hard proxies (Aziere & Todorovic 2019): the items and K learned
    proxies form a graph whose random walk converges to manifold affinities; each item has a
    meta-class (its proxy), and the loss softly counts the proxies that beat the item's own by
    more than ``−margin``, in the affinities (intrinsic term) and in the cosines of the items'
    and proxies' affinity rows (context term, weighted by ``lambdaC``).

    The meta-classes are, as in PML, a (N,) tensor of proxy indices given as ``indices_tuple``,
    or else drawn at random (every proxy once, so N ≥ K; torch's default generator, as PML
    draws them); or, unlike PML, which refuses labels, the ``labels`` (then in [0, K)), which
    lets a run train the loss. A mined tuple of pairs or triplets, and ``ref_emb``, are refused.

    Differences from PML, all deliberate: ``labels`` are meta-classes (above); ``lambdaC=inf``
    uses the context term alone, as PML documents (PML's value is then ``inf`` or NaN); the
    graph is solved in the compute dtype (PML solves it in float32, which limits its float64
    results to float32 accuracy); ``distance`` must be a similarity (PML takes any distance as
    the graph's similarities); the reducer reduces the per-item losses.

    Args:
        l: The embedding size (PML's name); ``embedding_size`` is an alternative.
        K: The number of proxies.
        lambdaC: The context term's weight, ≥ 0; ``float("inf")`` for the context term alone.
        alpha: α in (0, 1), the share of similarity each node passes on in the random walk.
        margin: Added to each proxy's violation.
        distance: A similarity; default ``CosineSimilarity()``.
        reducer: Reduces the per-item losses; default ``MeanReducer()`` (PML's mean).
        embedding_regularizer: Regulariser of the embeddings, or None (see
            :class:`~dmlkit.losses.base.BaseMetricLossFunction`).
        embedding_reg_weight: Its weight.
        embedding_size: The embedding size under the name a run gives every loss.

    Attributes:
        proxies: (K, l) parameter (PML's name and shape; initialised ``torch.randn``, as PML).
    """

    requires_similarity = True
    supports_ref = False
    needs_class_labels = True
    supports_indices_tuple = False  # of pairs or triplets: a (N,) tensor gives meta-classes
    proxies: nn.Parameter

    def __init__(
        self,
        l: int | None = None,  # noqa: E741
        K: int = 50,  # noqa: N803
        lambdaC: float = 1.0,  # noqa: N803
        alpha: float = 0.8,
        margin: float = 5e-4,
        distance: BaseDistance | None = None,
        reducer: Reducer | None = None,
        embedding_regularizer: BaseRegularizer | None = None,
        embedding_reg_weight: float = 1,
        *,
        embedding_size: int | None = None,
    ) -> None:
        super().__init__(distance, reducer, embedding_regularizer, embedding_reg_weight)
        if l is None:
            l = embedding_size  # noqa: E741
        elif embedding_size is not None and embedding_size != l:
            raise ValueError(f"l={l} and embedding_size={embedding_size} differ")
        if l is None:
            raise ValueError("ManifoldLoss needs l (or embedding_size), the embedding size")
        if isinstance(lambdaC, bool) or not isinstance(lambdaC, (int, float)) or not lambdaC >= 0:
            raise ValueError(f"lambdaC must be a non-negative number (or inf), got {lambdaC!r}")
        self.l = check_positive_int(l, "l")
        self.K = check_positive_int(K, "K")
        self.lambdaC = float(lambdaC)
        self.alpha = _check_unit_interval(alpha, "alpha", open_ends=True)
        self.margin = check_finite_number(margin, "margin")
        self.proxies = nn.Parameter(torch.randn(self.K, self.l))

    @staticmethod
    def default_distance() -> BaseDistance:
        return CosineSimilarity()

    def forward(
        self,
        embeddings: Tensor,
        labels: Tensor | None = None,
        indices_tuple: Tensor | tuple[Tensor, ...] | None = None,
        ref_emb: Tensor | None = None,
        ref_labels: Tensor | None = None,
        anchor_in_ref: Tensor | None = None,
    ) -> Tensor:
        """Computes the loss; see
        :meth:`~dmlkit.losses.base.BaseMetricLossFunction.forward`.

        Args:
            embeddings: (N, l) embeddings.
            labels: (N,) meta-classes in [0, K), or None.
            indices_tuple: (N,) meta-classes in [0, K) (PML's way to give them), or None; a
                tuple of pairs or triplets is refused.
            ref_emb: Not supported.
            ref_labels: Not supported.
            anchor_in_ref: Not supported.
        """
        name = type(self).__name__
        if ref_emb is not None:
            raise ValueError(f"{name} does not support ref_emb")
        if isinstance(indices_tuple, Tensor) or (labels is None and indices_tuple is None):
            if labels is not None:
                raise ValueError(
                    f"{name} takes meta-classes as labels or as indices_tuple, not both"
                )
            batch = _unlabelled_batch(embeddings, None, ref_labels, anchor_in_ref)
            n = batch.embeddings.shape[0]
            if indices_tuple is None:
                if n < self.K:
                    raise ValueError(
                        f"{name} draws random meta-classes covering all K={self.K} proxies, "
                        f"which needs at least {self.K} embeddings, got {n}; give the "
                        "meta-classes as labels or indices_tuple"
                    )
                # Drawn in [0, K): no range check needed.
                meta = fam.random_meta_classes(n, self.K)
                drawn = self.K
            else:
                meta = check_labels(
                    indices_tuple, n, batch.embeddings.device, "indices_tuple (meta-classes)"
                )
                drawn = None
            batch = dataclasses.replace(
                batch, labels=meta.to(batch.embeddings.device), num_classes=drawn
            )
        else:
            if indices_tuple is not None:
                raise ValueError(
                    f"{name} does not support indices_tuple of pairs or triplets; give each "
                    "embedding's meta-class (proxy index) as a (N,) tensor, or as labels"
                )
            batch = Batch.from_call(
                embeddings,
                labels,
                None,
                None,
                ref_labels,
                anchor_in_ref,
                num_classes=self.K,
                class_error=self._meta_class_error,
            )
        return self.loss_of_batch(batch, embeddings.dtype)

    def compute_loss(self, batch: Batch) -> Tensor:
        labels = batch.class_labels("ManifoldLoss")
        emb = batch.embeddings
        if emb.shape[1] != self.l:
            raise ValueError(
                f"embeddings have size {emb.shape[1]} but ManifoldLoss was built with l={self.l}"
            )
        if batch.num_classes != self.K:
            check_class_labels(labels, self.K, message=partial(self._meta_class_error, labels))
        meta = labels.long()
        nodes = torch.cat([emb, self.proxies.to(emb.dtype)])
        affinities = fam.random_walk_affinities(self.distance(nodes), self.alpha)
        return self.reducer(fam.manifold_losses(affinities, meta, self.margin, self.lambdaC))

    def _meta_class_error(self, meta: Tensor) -> str:
        return (
            f"ManifoldLoss's meta-classes must be proxy indices in [0, K={self.K}), got "
            f"values in [{int(meta.min())}, {int(meta.max())}]"
        )

    def extra_repr(self) -> str:
        return (
            f"l={self.l}, K={self.K}, lambdaC={self.lambdaC}, alpha={self.alpha}, "
            f"margin={self.margin}, {super().extra_repr()}"
        )


@LOSSES.register()
class ThresholdConsistentMarginLoss(BaseMetricLossFunction):
    """Threshold-consistent margin loss (TCM, Zhang et al. 2023): positive pairs less similar
    than ``margin_plus`` are pulled up to it and negative pairs more similar than
    ``margin_minus`` pushed down to it; each side is averaged over its offending pairs only, so
    its strength does not fade as most pairs comply.

    Pairs are every labelled pair, or a mined tuple's (triplets give their two pairs, repeats
    count), as in PML. With ``ref_emb`` positives and negatives come from the reference set;
    PML looks those indices up in ``embeddings`` instead (a wrong value, or an IndexError).

    Args:
        lambda_plus: The positive side's weight.
        lambda_minus: The negative side's weight.
        margin_plus: Similarity that positive pairs should reach.
        margin_minus: Similarity that negative pairs should not exceed.
        distance: Must be ``CosineSimilarity()`` (the default), as in PML; its ``power`` is
            applied (PML uses the plain cosine whatever the power).
        reducer: Reduces each side over its offending pairs; default ``MeanReducer()``
            (PML's mean).
        embedding_regularizer: Regulariser of the embeddings, or None (see
            :class:`~dmlkit.losses.base.BaseMetricLossFunction`).
        embedding_reg_weight: Its weight.
    """

    requires_similarity = CosineSimilarity

    def __init__(
        self,
        lambda_plus: float = 1.0,
        lambda_minus: float = 1.0,
        margin_plus: float = 0.9,
        margin_minus: float = 0.5,
        distance: BaseDistance | None = None,
        reducer: Reducer | None = None,
        embedding_regularizer: BaseRegularizer | None = None,
        embedding_reg_weight: float = 1,
    ) -> None:
        super().__init__(distance, reducer, embedding_regularizer, embedding_reg_weight)
        self.lambda_plus = check_finite_number(lambda_plus, "lambda_plus")
        self.lambda_minus = check_finite_number(lambda_minus, "lambda_minus")
        self.margin_plus = check_finite_number(margin_plus, "margin_plus")
        self.margin_minus = check_finite_number(margin_minus, "margin_minus")

    @staticmethod
    def default_distance() -> BaseDistance:
        return CosineSimilarity()

    def compute_loss(self, batch: Batch) -> Tensor:
        return fam.threshold_consistent_margin_loss(
            batch.matrix(self.distance),
            batch.pair_weights(),
            self.lambda_plus,
            self.lambda_minus,
            self.margin_plus,
            self.margin_minus,
            self.reducer,
        )

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, lambda_plus={self.lambda_plus}, "
            f"lambda_minus={self.lambda_minus}, margin_plus={self.margin_plus}, "
            f"margin_minus={self.margin_minus}"
        )


__all__ = ["DynamicSoftMarginLoss", "ManifoldLoss", "ThresholdConsistentMarginLoss"]
