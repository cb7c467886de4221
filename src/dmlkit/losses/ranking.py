"""Losses on each anchor's ranking of the batch: FastAP."""

from __future__ import annotations

from torch import Tensor

from ..batch import Batch
from ..distances import BaseDistance, LpDistance
from ..functional.masks import tuple_element_weights
from ..functional.ranking import fastap_loss
from ..functional.reduction import Reducer
from ..regularizers import BaseRegularizer
from ..validation import check_positive_int
from .base import LOSSES, BaseMetricLossFunction


@LOSSES.register()
class FastAPLoss(BaseMetricLossFunction):
    """FastAP (Cakir et al. 2019): one minus each anchor's average precision, estimated from
    soft histograms of its distances to its positives and to every other item.

    Positives and negatives always come from the labels; an ``indices_tuple`` only weighs
    each anchor's term by how often the anchor appears in it, over the largest such count
    (PML's rule; an empty one weighs every anchor 1, as none does). ``ref_emb`` is not
    supported.

    Args:
        num_bins: Number of histogram intervals over [0, the largest distance].
        distance: An ``LpDistance`` with p = 2 and normalised embeddings, whose distances are
            bounded by ``2 ** power``; default ``LpDistance(power=2)`` (squared distances).
        reducer: Default ``MeanReducer()`` over the anchors having a positive.
        embedding_regularizer: Regulariser of the embeddings, or None (see
            :class:`~dmlkit.losses.base.BaseMetricLossFunction`).
        embedding_reg_weight: Its weight.
    """

    labels_required = True
    supports_ref = False
    requires_similarity = LpDistance
    tuple_weighs_items = True

    def __init__(
        self,
        num_bins: int = 10,
        distance: BaseDistance | None = None,
        reducer: Reducer | None = None,
        embedding_regularizer: BaseRegularizer | None = None,
        embedding_reg_weight: float = 1,
    ) -> None:
        super().__init__(distance, reducer, embedding_regularizer, embedding_reg_weight)
        if not (self.distance.normalize_embeddings and self.distance.p == 2):
            raise ValueError(
                "FastAPLoss needs LpDistance with p=2 and normalize_embeddings=True (its "
                f"histogram spans the distances between unit vectors), got {self.distance!r}"
            )
        self.num_bins = check_positive_int(num_bins, "num_bins")

    @staticmethod
    def default_distance() -> BaseDistance:
        return LpDistance(power=2)

    def compute_loss(self, batch: Batch) -> Tensor:
        dist = batch.matrix(self.distance)
        pos, neg = batch.label_weights()
        return fastap_loss(
            dist,
            pos,
            neg,
            tuple_element_weights(batch.indices_tuple, batch.shape[0], dist),
            self.num_bins,
            2.0**self.distance.power,
            reducer=self.reducer,
        )
