"""The base of every loss (PML's call contract), the bases of the losses holding weights
(:class:`WeightRegularizedLoss`, :class:`ClassParametersLoss`) and the loss registry."""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar, Literal

import torch
from torch import Tensor, nn

from ..batch import Batch
from ..distances import (
    BaseDistance,
    LpDistance,
    SimilarityRequirement,
    check_distance,
)
from ..functional.reduction import MeanReducer, Reducer, labels_for_reducers
from ..registry import Registry
from ..regularizers import BaseRegularizer
from ..validation import check_positive_int


class BaseMetricLossFunction(nn.Module):
    """Shared call contract: checks inputs, computes, casts back to the input dtype.

    Attributes:
        labels_required: The loss needs labels even with an ``indices_tuple``.
        supports_ref: The loss accepts ``ref_emb``.
        requires_similarity: What ``distance`` must be: False for anything, True for any
            similarity, or the one similarity class the formula is written for.
        supports_indices_tuple: The loss takes a mined ``indices_tuple`` (pairs or triplets).
        needs_class_labels: The loss needs one integer class per item, not multi-hot labels
            or a label relation (:mod:`dmlkit.relations`).
        tuple_weighs_items: An ``indices_tuple`` weighs items rather than selecting pairs or
            triplets (PML's rule for losses over items: each item's count in the tuple over the
            largest count; an empty tuple weighs every item 1, as no tuple does).

    Args:
        distance: The distance or similarity; None for ``default_distance()`` (PML's).
        reducer: How per-element losses become a scalar; None for ``default_reducer()``
            (PML's).
        embedding_regularizer: A regulariser of the call's ``embeddings`` (never ``ref_emb``),
            as PML's: its value, already reduced by its own reducer, times
            ``embedding_reg_weight`` is added to the loss on every call, also when the loss
            itself is zero.
        embedding_reg_weight: The regulariser's weight.
    """

    labels_required: ClassVar[bool] = False
    supports_ref: ClassVar[bool] = True
    requires_similarity: ClassVar[SimilarityRequirement] = False
    supports_indices_tuple: ClassVar[bool] = True
    needs_class_labels: ClassVar[bool] = False
    tuple_weighs_items: ClassVar[bool] = False

    def __init__(
        self,
        distance: BaseDistance | None = None,
        reducer: Reducer | None = None,
        embedding_regularizer: BaseRegularizer | None = None,
        embedding_reg_weight: float = 1,
    ) -> None:
        super().__init__()
        self.distance = self.default_distance() if distance is None else distance
        self.reducer = self.default_reducer() if reducer is None else reducer
        self.embedding_regularizer = embedding_regularizer
        self.embedding_reg_weight = embedding_reg_weight
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
        if indices_tuple is not None and not self.supports_indices_tuple:
            raise ValueError(f"{type(self).__name__} does not support indices_tuple")
        batch = Batch.from_call(
            embeddings,
            labels,
            indices_tuple,
            ref_emb,
            ref_labels,
            anchor_in_ref,
            labels_required=self.labels_required,
            num_classes=self.label_classes(),
        )
        return self.loss_of_batch(batch, embeddings.dtype)

    def label_classes(self) -> int | None:
        """The class count C of the loss's per-class parameters, whose indices integer labels
        must be: :meth:`forward` checks labels to lie in [0, C) with its other inputs; None
        (the default) for no such parameters."""
        return None

    def loss_of_batch(self, batch: Batch, dtype: torch.dtype) -> Tensor:
        """The loss of a checked batch plus the embedding regulariser, in ``dtype``: the end
        of :meth:`forward`, for a subclass whose forward builds its batch otherwise."""
        # Losses compute in the batch's dtype (float32 for half inputs), as autocast computes
        # its own losses; under a caller's autocast, products would come back in half.
        with (
            torch.autocast(batch.embeddings.device.type, enabled=False),
            labels_for_reducers(batch.labels),
        ):
            loss = add_regularization(
                self.compute_loss(batch),
                self.embedding_regularizer,
                self.embedding_reg_weight,
                batch.embeddings,
            )
        return loss.to(dtype)

    def compute_loss(self, batch: Batch) -> Tensor:
        raise NotImplementedError

    def extra_repr(self) -> str:
        text = f"distance={self.distance!r}, reducer={self.reducer!r}"
        if self.embedding_regularizer is not None:
            text += f", embedding_reg_weight={self.embedding_reg_weight}"
        return text


class WeightRegularizedLoss(BaseMetricLossFunction):
    """Base of the losses holding a weight matrix (proxies, class centres, classifier weights):
    PML's ``WeightRegularizerMixin``, with its parameter names and meaning.

    A subclass calls :meth:`add_weight_regularization` on its loss with its weights as (C, D)
    rows, one per class or centre, wherever PML's loss adds its ``weight_reg_loss`` (PML passes
    ``W.t()`` for a (D, C) ``W``): ``weight_reg_weight`` times the regulariser's reduced value
    of those rows is added. The embedding regulariser still comes from the base class.

    Args:
        distance: As :class:`BaseMetricLossFunction`.
        reducer: As :class:`BaseMetricLossFunction`.
        embedding_regularizer: As :class:`BaseMetricLossFunction`.
        embedding_reg_weight: As :class:`BaseMetricLossFunction`.
        weight_regularizer: A regulariser of the weight rows, or None.
        weight_reg_weight: Its weight.
    """

    def __init__(
        self,
        distance: BaseDistance | None = None,
        reducer: Reducer | None = None,
        embedding_regularizer: BaseRegularizer | None = None,
        embedding_reg_weight: float = 1,
        weight_regularizer: BaseRegularizer | None = None,
        weight_reg_weight: float = 1,
    ) -> None:
        super().__init__(distance, reducer, embedding_regularizer, embedding_reg_weight)
        self.weight_regularizer = weight_regularizer
        self.weight_reg_weight = weight_reg_weight

    def add_weight_regularization(self, loss: Tensor, weights: Tensor) -> Tensor:
        """``loss`` plus the weighted regulariser of ``weights`` ((C, D) rows), if any."""
        return add_regularization(loss, self.weight_regularizer, self.weight_reg_weight, weights)


WeightInit = Callable[[Tensor], object]
"""Initialises a weight in place (PML's ``weight_init_func``, e.g. ``nn.init.xavier_normal_``)."""


class ClassParametersLoss(WeightRegularizedLoss):
    """Base of the losses holding one weight tensor of per-class parameters (classifier weights,
    proxies, class centres): the class count and embedding size (checked positive integers),
    the parameter itself with PML's name, layout and ``weight_init_func``, labels checked to be
    class indices, and the repr. Labels are required, ``ref_emb`` is refused and a mined tuple
    weighs items, as in PML.

    Attributes:
        weight_name: The parameter's attribute name (PML's: ``W``, ``proxies``, ``fc``, ...).
        weight_layout: ``"columns"``: a (D, C·K) parameter, one column per class or centre
            (class c's are columns cK … cK + K − 1); ``"rows"``: a (C·K, D) one.

    Args:
        num_classes: C; labels must lie in [0, C).
        embedding_size: D.
        centers_per_class: K, the parameter's columns (or rows) per class.
        distance: As :class:`WeightRegularizedLoss`.
        reducer: As :class:`WeightRegularizedLoss`.
        embedding_regularizer: As :class:`WeightRegularizedLoss`.
        embedding_reg_weight: As :class:`WeightRegularizedLoss`.
        weight_regularizer: As :class:`WeightRegularizedLoss`.
        weight_reg_weight: As :class:`WeightRegularizedLoss`.
        weight_init_func: Initialises the parameter in place (outside autograd); None for
            ``default_init``.
        default_init: The loss's default initialisation (PML's).
    """

    labels_required = True
    supports_ref = False
    needs_class_labels = True
    tuple_weighs_items = True
    weight_name: ClassVar[str] = "W"
    weight_layout: ClassVar[Literal["columns", "rows"]] = "columns"

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        centers_per_class: int,
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
            distance,
            reducer,
            embedding_regularizer,
            embedding_reg_weight,
            weight_regularizer,
            weight_reg_weight,
        )
        self.num_classes = check_positive_int(num_classes, "num_classes")
        self.embedding_size = check_positive_int(embedding_size, "embedding_size")
        count = self.num_classes * check_positive_int(centers_per_class, "centers_per_class")
        shape = (count, embedding_size) if self.weight_layout == "rows" else (embedding_size, count)
        weight = nn.Parameter(torch.empty(shape))
        with torch.no_grad():
            (default_init if weight_init_func is None else weight_init_func)(weight)
        self.register_parameter(self.weight_name, weight)

    def weight_as(self, like: Tensor) -> Tensor:
        """The parameter in ``like``'s dtype, the call's compute dtype (differentiably: its
        gradient reaches the parameter in the parameter's own dtype, where PML converts the
        parameter itself)."""
        weight: Tensor = getattr(self, self.weight_name)
        return weight.to(like.dtype)

    def weight_rows(self, weight: Tensor) -> Tensor:
        """``weight`` (the parameter, or :meth:`weight_as` of it) as (C·K, D) rows, one per class
        or centre: what a weight regulariser sees (PML passes it ``W.t()`` for a (D, C) ``W``)."""
        return weight if self.weight_layout == "rows" else weight.t()

    def label_classes(self) -> int:
        return self.num_classes

    def labels_of(self, batch: Batch) -> Tensor:
        """The call's labels, checked to be class indices, as ``torch.long``."""
        return batch.class_indices(type(self).__name__, self.num_classes)

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, embedding_size={self.embedding_size}, "
            f"{super().extra_repr()}"
        )


def add_regularization(
    loss: Tensor, regularizer: BaseRegularizer | None, weight: float, x: Tensor
) -> Tensor:
    """``loss + regularizer(x) * weight``, or ``loss`` when there is no regulariser."""
    if regularizer is None:
        return loss
    return loss + regularizer(x) * weight


LOSSES = Registry("loss", BaseMetricLossFunction)
