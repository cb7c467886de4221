"""The margin loss (Wu et al. 2017), with PML's optionally learnable boundary β."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from ..batch import Batch
from ..distances import BaseDistance
from ..functional import losses as fl
from ..functional.margin import margin_loss, triplet_pair_weights
from ..functional.masks import PairWeights, tuple_to_pair_weights
from ..functional.reduction import DivisorReducer, Reducer
from ..functional.triplets import sample_triplets
from ..regularizers import BaseRegularizer
from ..validation import check_positive_int, check_triplets_per_anchor
from .base import LOSSES, BaseMetricLossFunction


@LOSSES.register()
class MarginLoss(BaseMetricLossFunction):
    """Margin loss: for each triplet, ``[d_ap − β + α]₊ + [β − d_an + α]₊``, so positives fall
    inside the boundary β and negatives outside it, each by the margin α.

    β is one value, or one per class with ``num_classes`` (indexed by the anchor's label, so
    labels must then be class indices 0 … num_classes − 1); with ``learn_beta`` it is the
    parameter ``beta`` (PML's name and shape: (1,) or (num_classes,)), penalised by ``ν·β``
    (per class: ``ν·β`` of each triplet's anchor class, averaged with the terms). A run gives
    the loss its ``num_classes``, so trained from a config β is per class unless the options
    set ``num_classes: null``.

    Args:
        margin: α.
        nu: ν, the weight of the penalty on a learnt β.
        beta: β's initial (or fixed) value.
        triplets_per_anchor: ``"all"``, or a number of random triplets per anchor.
        learn_beta: Train β.
        num_classes: One β per class; None (or 1) for one β.
        distance: Default ``LpDistance()``.
        reducer: Default ``DivisorReducer()``: the sum of every triplet's two hinge terms over
            the number of non-zero ones. Any reducer sees the hinge terms one by one (see
            :func:`~dmlkit.functional.margin.margin_loss`; PML's sees per-triplet sums, the same
            under ``DivisorReducer`` and ``SumReducer``).
        embedding_regularizer: Regulariser of the embeddings, or None (see
            :class:`~dmlkit.losses.base.BaseMetricLossFunction`).
        embedding_reg_weight: Its weight.
    """

    beta: Tensor

    def __init__(
        self,
        margin: float = 0.2,
        nu: float = 0,
        beta: float = 1.2,
        triplets_per_anchor: int | Literal["all"] = "all",
        learn_beta: bool = False,
        num_classes: int | None = None,
        distance: BaseDistance | None = None,
        reducer: Reducer | None = None,
        embedding_regularizer: BaseRegularizer | None = None,
        embedding_reg_weight: float = 1,
    ) -> None:
        super().__init__(distance, reducer, embedding_regularizer, embedding_reg_weight)
        self.triplets_per_anchor = check_triplets_per_anchor(triplets_per_anchor)
        if num_classes is not None:
            num_classes = check_positive_int(num_classes, "num_classes (or None)")
        self.margin = margin
        self.nu = nu
        self.learn_beta = learn_beta
        initial = torch.full((num_classes or 1,), float(beta))
        if learn_beta:
            self.beta = nn.Parameter(initial)
        else:
            # A fixed β is not state: PML keeps it out of the state_dict too.
            self.register_buffer("beta", initial, persistent=False)

    @property
    def num_classes(self) -> int | None:
        """Number of per-class β values, or None for one β."""
        return self.beta.numel() if self.beta.numel() > 1 else None

    def label_classes(self) -> int | None:
        return self.num_classes

    @staticmethod
    def default_reducer() -> Reducer:
        return DivisorReducer()

    def compute_loss(self, batch: Batch) -> Tensor:
        mat = batch.matrix(self.distance)
        triplets = self._triplets(batch)
        beta = self.beta.to(mat.dtype)
        penalty = None
        if self.num_classes is not None:
            beta = beta[batch.class_indices("MarginLoss with a β per class", self.num_classes)]
            penalty = self.nu * beta if self.learn_beta else None
            beta = beta.unsqueeze(1)
        loss = margin_loss(
            mat,
            triplets,
            beta,
            self.margin,
            self.distance.is_inverted,
            reducer=self.reducer,
            anchor_penalty=penalty,
        )
        if self.learn_beta and self.num_classes is None:
            loss = loss + self.nu * beta.sum()
        # PML's zero, its β penalty included, when no triplet has a positive pair.
        return fl.zero_unless(triplets.pos.any(), loss, mat)

    def _triplets(self, batch: Batch) -> PairWeights:
        """How many of the loss's triplets hold each positive and each negative pair."""
        indices = batch.indices_tuple
        if indices is None and self.triplets_per_anchor != "all":
            indices = sample_triplets(*batch.label_weights(), int(self.triplets_per_anchor))
        device, dtype = batch.embeddings.device, batch.embeddings.dtype
        if indices is not None and len(indices) == 3:
            return tuple_to_pair_weights(indices, batch.shape, device, dtype)
        return triplet_pair_weights(batch.pair_weights())

    def extra_repr(self) -> str:
        return (
            f"margin={self.margin}, nu={self.nu}, learn_beta={self.learn_beta}, "
            f"triplets_per_anchor={self.triplets_per_anchor!r}, {super().extra_repr()}"
        )
