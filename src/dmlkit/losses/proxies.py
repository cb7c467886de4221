"""Losses against class representatives: NCA, and the proxy losses holding one learned
representative per class (ProxyNCA, ProxyAnchor) or several (SoftTriple).

The proxy losses take ``num_classes`` and ``embedding_size`` (a run gives both) and labels that
are class indices in [0, num_classes); their parameters have PML's names, shapes and initial
distributions, so PML's ``state_dict`` loads into them and theirs into PML. For a call they are
cast to the embeddings' compute dtype (PML converts them in place). A mined tuple weighs items
(PML's rule, see :mod:`dmlkit.functional.proxies`); ``ref_emb`` is not supported, as in PML.

Where PML's value is an artefact, dmlkit computes the loss: PML's NCA losses drop an item whose
positive probability underflows to 0 (ProxyNCA with a large ``softmax_scale`` in float32), and
give NaN when no item has a positive (dmlkit: 0); PML's NCALoss also returns 0 for any single
query, with or without ``ref_emb`` (its ProxyNCALoss never does).
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn

from ..batch import Batch
from ..distances import BaseDistance, CosineSimilarity, LpDistance
from ..functional import proxies as fp
from ..functional.classification import weighted_cross_entropy
from ..functional.masks import tuple_element_weights
from ..functional.reduction import DivisorReducer, Reducer
from ..regularizers import BaseRegularizer, SparseCentersRegularizer
from ..validation import check_positive_int, check_positive_number
from .base import LOSSES, BaseMetricLossFunction, ClassParametersLoss, WeightInit


def _nca_logits(
    distance: BaseDistance, query: Tensor, reference: Tensor | None, softmax_scale: float
) -> Tensor:
    """NCA's logits up to a constant per row, which its softmax ignores.

    The default distance, the squared distance of unit vectors, is 2 − 2 cos: its logits are
    ``2·softmax_scale·cos``, one matrix product with no (N, M) temporaries; any other distance
    gives ``∓softmax_scale·distance``.
    """
    if (
        type(distance) is LpDistance
        and distance.normalize_embeddings
        and distance.p == 2
        and distance.power == 2
    ):
        q = F.normalize(query, dim=1)
        r = q if reference is None else F.normalize(reference, dim=1)
        return q @ (r * (2.0 * softmax_scale)).T
    return fp.nca_logits(distance(query, reference), softmax_scale, distance.is_inverted)


@LOSSES.register()
class NCALoss(BaseMetricLossFunction):
    """Neighbourhood components analysis (Goldberger et al. 2004): each item's probability of
    picking a same-label reference in a softmax over all its references (itself excluded),
    ``−log`` of it averaged over the items that have one.

    With a mined tuple each item's loss is weighted by its count in the tuple over the largest
    count (anchors only with a separate reference set), as in PML.

    Args:
        softmax_scale: Multiplies the logits (negated distances, or similarities).
        distance: Default ``LpDistance(power=2)`` (squared distance of unit vectors).
        reducer: Default ``MeanReducer()`` over the items having a positive.
        embedding_regularizer: Regulariser of the embeddings, or None (see
            :class:`~dmlkit.losses.base.BaseMetricLossFunction`).
        embedding_reg_weight: Its weight.
    """

    labels_required = True
    tuple_weighs_items = True

    def __init__(
        self,
        softmax_scale: float = 1,
        distance: BaseDistance | None = None,
        reducer: Reducer | None = None,
        embedding_regularizer: BaseRegularizer | None = None,
        embedding_reg_weight: float = 1,
    ) -> None:
        super().__init__(distance, reducer, embedding_regularizer, embedding_reg_weight)
        self.softmax_scale = softmax_scale

    @staticmethod
    def default_distance() -> BaseDistance:
        return LpDistance(power=2)

    def compute_loss(self, batch: Batch) -> Tensor:
        logits = _nca_logits(self.distance, batch.embeddings, batch.ref_emb, self.softmax_scale)
        pos, neg = batch.label_weights()
        n, n_refs = batch.shape[0], None if batch.ref_emb is None else batch.shape[1]
        ref_items = fp.reference_items(n, n_refs, batch.anchor_in_ref, logits.device)
        weights = fp.nca_sample_weights(batch.indices_tuple, n, logits, ref_items)
        return fp.nca_loss(logits, pos, neg, weights, self.reducer)


class ProxyLoss(ClassParametersLoss):
    """What ProxyNCA and ProxyAnchor share: one proxy per class, the (C, D) parameter
    ``proxies``, and PML's ``get_logits``.

    Args:
        num_classes: C; labels must lie in [0, C).
        embedding_size: D.
        distance, reducer, embedding_regularizer, embedding_reg_weight, weight_regularizer,
            weight_reg_weight, weight_init_func: As
            :class:`~dmlkit.losses.base.ClassParametersLoss`.
        default_init: PML's initialisation of the loss's proxies.
    """

    weight_name = "proxies"
    weight_layout = "rows"
    proxies: nn.Parameter

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        distance: BaseDistance | None,
        reducer: Reducer | None,
        embedding_regularizer: BaseRegularizer | None,
        embedding_reg_weight: float,
        weight_regularizer: BaseRegularizer | None,
        weight_reg_weight: float,
        weight_init_func: WeightInit | None,
        default_init: WeightInit,
    ) -> None:
        super().__init__(
            num_classes,
            embedding_size,
            1,
            distance,
            reducer,
            embedding_regularizer,
            embedding_reg_weight,
            weight_regularizer,
            weight_reg_weight,
            weight_init_func,
            default_init,
        )

    def get_logits(self, embeddings: Tensor) -> Tensor:
        """The (N, C) distances (or similarities) to the proxies, as PML's ``get_logits``."""
        return self.distance(embeddings, self.weight_as(embeddings))


@LOSSES.register()
class ProxyNCALoss(ProxyLoss):
    """ProxyNCA (Movshovitz-Attias et al. 2017): NCA against one learned proxy per class, i.e.
    the cross-entropy of ``softmax_scale`` times the negated distances to the proxies.

    With a mined tuple each item's loss is weighted by its count among the tuple's anchors over
    the largest count, as in PML.

    Args:
        num_classes: C.
        embedding_size: D.
        softmax_scale: Multiplies the logits.
        distance: Default ``LpDistance(power=2)``.
        reducer: Default ``MeanReducer()``.
        embedding_regularizer: Regulariser of the embeddings, or None.
        embedding_reg_weight: Its weight.
        weight_regularizer: Regulariser of the proxies' rows, or None.
        weight_reg_weight: Its weight.
        weight_init_func: Initialises ``proxies`` in place; default ``nn.init.normal_``.

    Attributes:
        proxies: (C, D) parameter.
    """

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        softmax_scale: float = 1,
        distance: BaseDistance | None = None,
        reducer: Reducer | None = None,
        embedding_regularizer: BaseRegularizer | None = None,
        embedding_reg_weight: float = 1,
        weight_regularizer: BaseRegularizer | None = None,
        weight_reg_weight: float = 1,
        weight_init_func: WeightInit | None = None,
    ) -> None:
        super().__init__(
            num_classes,
            embedding_size,
            distance,
            reducer,
            embedding_regularizer,
            embedding_reg_weight,
            weight_regularizer,
            weight_reg_weight,
            weight_init_func,
            nn.init.normal_,
        )
        self.softmax_scale = softmax_scale

    @staticmethod
    def default_distance() -> BaseDistance:
        return LpDistance(power=2)

    def compute_loss(self, batch: Batch) -> Tensor:
        labels = self.labels_of(batch)
        emb = batch.embeddings
        proxies = self.weight_as(emb)
        weights = fp.nca_sample_weights(batch.indices_tuple, len(emb), emb, None)
        logits = _nca_logits(self.distance, emb, proxies, self.softmax_scale)
        loss = weighted_cross_entropy(logits, labels, weights, self.reducer)
        return self.add_weight_regularization(loss, proxies)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, softmax_scale={self.softmax_scale}"


@LOSSES.register()
class ProxyAnchorLoss(ProxyLoss):
    """Proxy-Anchor loss (Kim et al. 2020): each proxy pulls its class's items within
    ``margin`` and pushes the others beyond ``−margin``, through log-sum-exps over the batch
    scaled by ``alpha``.

    With a mined tuple, each item's terms are multiplied by ``e^{w − 1}``, w its count in the
    tuple over the largest count (PML's rule; items the tuple never names still count, by
    ``e^{−1}``).

    Args:
        num_classes: C.
        embedding_size: D.
        margin: δ.
        alpha: α.
        distance: Default ``CosineSimilarity()``.
        reducer: Default ``DivisorReducer()``: the positive terms over the number of proxies
            with a positive, plus the negative ones over C. Another reducer reduces each
            side's C terms and the two are summed, as in PML.
        embedding_regularizer: Regulariser of the embeddings, or None.
        embedding_reg_weight: Its weight.
        weight_regularizer: Regulariser of the proxies' rows, or None.
        weight_reg_weight: Its weight.
        weight_init_func: Initialises ``proxies`` in place; default
            ``nn.init.kaiming_normal_(mode="fan_out")``.

    Attributes:
        proxies: (C, D) parameter.
    """

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        margin: float = 0.1,
        alpha: float = 32,
        distance: BaseDistance | None = None,
        reducer: Reducer | None = None,
        embedding_regularizer: BaseRegularizer | None = None,
        embedding_reg_weight: float = 1,
        weight_regularizer: BaseRegularizer | None = None,
        weight_reg_weight: float = 1,
        weight_init_func: WeightInit | None = None,
    ) -> None:
        super().__init__(
            num_classes,
            embedding_size,
            distance,
            reducer,
            embedding_regularizer,
            embedding_reg_weight,
            weight_regularizer,
            weight_reg_weight,
            weight_init_func,
            lambda w: nn.init.kaiming_normal_(w, mode="fan_out"),
        )
        self.margin = margin
        self.alpha = alpha

    @staticmethod
    def default_distance() -> BaseDistance:
        return CosineSimilarity()

    @staticmethod
    def default_reducer() -> Reducer:
        return DivisorReducer()

    def compute_loss(self, batch: Batch) -> Tensor:
        labels = self.labels_of(batch)
        emb = batch.embeddings
        proxies = self.weight_as(emb)
        indices = batch.indices_tuple
        loss = fp.proxy_anchor_loss(
            self.distance(emb, proxies),
            labels,
            self.margin,
            self.alpha,
            self.distance.is_inverted,
            None if indices is None else tuple_element_weights(indices, len(emb), emb),
            self.reducer,
        )
        return self.add_weight_regularization(loss, proxies)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, margin={self.margin}, alpha={self.alpha}"


@LOSSES.register()
class SoftTripleLoss(ClassParametersLoss):
    """SoftTriple loss (Qian et al. 2019): ``centers_per_class`` centres per class; an item's
    similarity to a class is the softmax(s/γ)-weighted mean of its similarities to the class's
    centres, and the loss is the cross-entropy of ``la`` times those, the target's lowered by
    ``margin``.

    The paper's regulariser merging unneeded centres is
    ``weight_regularizer=SparseCentersRegularizer(num_classes, centers_per_class)``, applied to
    the centres as rows (``fc.t()``), as in PML; one built for other values is refused at
    construction. With a mined tuple each item's loss is weighted by its count in the tuple over
    the largest count (PML's rule).

    Args:
        num_classes: C.
        embedding_size: D.
        centers_per_class: K.
        la: λ, the scale of the logits.
        gamma: γ, the temperature of the softmax over a class's centres (stored as given; PML
            stores 1/γ under this name).
        margin: δ.
        distance: A similarity; default ``CosineSimilarity()``.
        reducer: Default ``MeanReducer()``.
        embedding_regularizer: Regulariser of the embeddings, or None.
        embedding_reg_weight: Its weight.
        weight_regularizer: Regulariser of the centres' rows, or None; a
            ``SparseCentersRegularizer`` must have this loss's ``num_classes`` and
            ``centers_per_class``.
        weight_reg_weight: Its weight.
        weight_init_func: Initialises ``fc`` in place; default
            ``nn.init.kaiming_uniform_(a=√5)``.

    Attributes:
        fc: (D, C·K) parameter, class c's centres being columns cK … cK + K − 1.
    """

    requires_similarity = True
    weight_name = "fc"
    fc: nn.Parameter

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        centers_per_class: int = 10,
        la: float = 20,
        gamma: float = 0.1,
        margin: float = 0.01,
        distance: BaseDistance | None = None,
        reducer: Reducer | None = None,
        embedding_regularizer: BaseRegularizer | None = None,
        embedding_reg_weight: float = 1,
        weight_regularizer: BaseRegularizer | None = None,
        weight_reg_weight: float = 1,
        weight_init_func: WeightInit | None = None,
    ) -> None:
        centers_per_class = check_positive_int(centers_per_class, "centers_per_class")
        _check_sparse_centers(weight_regularizer, num_classes, centers_per_class)
        super().__init__(
            num_classes,
            embedding_size,
            centers_per_class,
            distance,
            reducer,
            embedding_regularizer,
            embedding_reg_weight,
            weight_regularizer,
            weight_reg_weight,
            weight_init_func,
            lambda w: nn.init.kaiming_uniform_(w, a=math.sqrt(5)),
        )
        self.centers_per_class = centers_per_class
        self.la = la
        self.gamma = check_positive_number(gamma, "gamma")
        self.margin = margin

    @staticmethod
    def default_distance() -> BaseDistance:
        return CosineSimilarity()

    def get_logits(self, embeddings: Tensor) -> Tensor:
        """The (N, C) class similarities, as PML's ``get_logits``."""
        return self._logits(embeddings, self.weight_as(embeddings))

    def _logits(self, embeddings: Tensor, fc: Tensor) -> Tensor:
        return fp.soft_triple_logits(
            self.distance(embeddings, fc.t()), self.num_classes, self.centers_per_class, self.gamma
        )

    def compute_loss(self, batch: Batch) -> Tensor:
        labels = self.labels_of(batch)
        emb = batch.embeddings
        fc = self.weight_as(emb)
        loss = fp.soft_triple_loss(
            self._logits(emb, fc),
            labels,
            self.la,
            self.margin,
            tuple_element_weights(batch.indices_tuple, len(emb), emb),
            self.reducer,
        )
        return self.add_weight_regularization(loss, self.weight_rows(fc))

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, centers_per_class={self.centers_per_class}, la={self.la}, "
            f"gamma={self.gamma}, margin={self.margin}"
        )


def _check_sparse_centers(
    regularizer: BaseRegularizer | None, num_classes: int, centers_per_class: int
) -> None:
    """Raises ``ValueError`` when a ``SparseCentersRegularizer`` of SoftTriple's centres was
    built for another number of classes or centres per class (it would fail at the first
    call, or pair centres of different classes)."""
    if not isinstance(regularizer, SparseCentersRegularizer):
        return
    if (regularizer.num_classes, regularizer.centers_per_class) != (
        num_classes,
        centers_per_class,
    ):
        raise ValueError(
            "SoftTripleLoss has num_classes="
            f"{num_classes} and centers_per_class={centers_per_class}, but its "
            "weight_regularizer SparseCentersRegularizer has num_classes="
            f"{regularizer.num_classes} and centers_per_class={regularizer.centers_per_class}; "
            "give the regulariser the loss's values"
        )
