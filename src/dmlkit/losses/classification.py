"""Classification losses with a weight matrix (PML 2.9's classes, parameters and weight names):
large-margin softmax and its family (SphereFace, ArcFace, sub-centre ArcFace, CosFace),
NormalizedSoftmax and P2SGrad.

Each holds one column of weights per class (per sub-centre for sub-centre ArcFace), ``W``
(``weight`` for P2SGrad) of shape (embedding_size, num_classes), so PML's ``state_dict`` loads
into these classes and back. Labels are class indices in [0, num_classes), of any integer
dtype. The softmax losses' ``get_logits(embeddings)`` gives the (N, num_classes) logits without
margins, so a trained loss doubles as a classifier head (P2SGradLoss, a regression on cosines,
has none, as in PML).
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal, overload

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..batch import Batch
from ..distances import BaseDistance, CosineSimilarity, DotProductSimilarity, SimilarityRequirement
from ..functional import classification as fc
from ..functional.masks import tuple_element_weights
from ..functional.reduction import Reducer
from ..regularizers import BaseRegularizer
from ..validation import (
    check_batch,
    check_finite_number,
    check_positive_int,
    check_positive_number,
    class_labels,
)
from .base import LOSSES, ClassParametersLoss, WeightInit


class _SoftmaxClassifierLoss(ClassParametersLoss):
    """Shared by the softmax losses: miner weights, the cross-entropy with its reduction and the
    weight regulariser of ``W``'s columns; PML's default init, standard normal.

    Subclasses give :meth:`training_logits` (with margins) and :meth:`get_logits`.
    """

    W: nn.Parameter

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
    ) -> None:
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
            nn.init.normal_,
        )

    def training_logits(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """(N, num_classes) logits the cross-entropy sees, margins included."""
        raise NotImplementedError

    def get_logits(self, embeddings: Tensor) -> Tensor:
        """(N, num_classes) class logits of ``embeddings``, without margins."""
        raise NotImplementedError

    def compute_loss(self, batch: Batch) -> Tensor:
        labels = self.labels_of(batch)
        emb = batch.embeddings
        weights = tuple_element_weights(batch.indices_tuple, len(emb), emb)
        logits = self.training_logits(emb, labels)
        loss = fc.weighted_cross_entropy(logits, labels, weights, self.reducer)
        return self.add_weight_regularization(loss, self.weight_rows(self.weight_as(emb)))


@LOSSES.register()
class LargeMarginSoftmaxLoss(_SoftmaxClassifierLoss):
    """Large-margin softmax (L-Softmax, Liu et al. 2016): the target class's angle is
    multiplied by ``margin`` (ψ(θ) = (−1)^k cos(mθ) − 2k), and logits are inner products
    ‖x‖‖W_j‖ times ``scale``.

    Args:
        num_classes: Number of classes (labels in [0, num_classes)).
        embedding_size: Embedding dimension.
        margin: The integer angle multiplier m ≥ 1 (PML truncates other values; dmlkit
            refuses them).
        scale: Logit scale, positive.
        distance: Must be ``CosineSimilarity()`` with power 1 (the default).
        reducer: Reduces the per-sample losses; default ``MeanReducer()``.
        embedding_regularizer: As :class:`BaseMetricLossFunction`.
        embedding_reg_weight: As :class:`BaseMetricLossFunction`.
        weight_regularizer: Regulariser of the class weights (rows of ``W.t()``), as PML's.
        weight_reg_weight: Its weight.
        weight_init_func: Initialises ``W`` in place; default ``nn.init.normal_`` (PML's).
    """

    requires_similarity: ClassVar[SimilarityRequirement] = CosineSimilarity

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        margin: float = 4,
        scale: float = 1,
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
            self.centers_per_class(),
            distance,
            reducer,
            embedding_regularizer,
            embedding_reg_weight,
            weight_regularizer,
            weight_reg_weight,
            weight_init_func,
        )
        if type(self.distance) is not CosineSimilarity or self.distance.power != 1:
            raise ValueError(
                f"{type(self).__name__} computes cosines itself: distance must be "
                f"CosineSimilarity() with power 1, got {self.distance!r}"
            )
        self.margin = self.checked_margin(margin)
        self.scale = check_positive_number(scale, "scale")

    @staticmethod
    def default_distance() -> BaseDistance:
        return CosineSimilarity()

    def centers_per_class(self) -> int:
        """Columns of ``W`` per class."""
        return 1

    @staticmethod
    def checked_margin(margin: float) -> float:
        """The margin as this loss uses it; raises ``ValueError`` for a meaningless one."""
        if isinstance(margin, bool) or margin != int(margin) or margin < 1:
            raise ValueError(f"margin must be an integer angle multiplier >= 1, got {margin!r}")
        return int(margin)

    def get_cosine(self, embeddings: Tensor) -> Tensor:
        """(N, num_classes) cosines between embeddings and class weights."""
        return self.distance(embeddings, self.weight_as(embeddings).t())

    def modify_cosine_of_target_classes(self, cosine: Tensor) -> Tensor:
        """The target cosines with the margin applied."""
        return fc.multiplicative_angular_margin(cosine, int(self.margin))

    def get_logits(self, embeddings: Tensor) -> Tensor:
        # ‖x‖‖W_j‖ cos θ_j is the inner product: one product, no (N, C) rescaling.
        return (embeddings * self.scale) @ self.weight_as(embeddings)

    def target_magnitudes(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """(N,) what turns each target's cosine into its logit: ‖x‖‖W_y‖ · scale."""
        column_norms = torch.linalg.vector_norm(self.weight_as(embeddings), dim=0)
        return torch.linalg.vector_norm(embeddings, dim=1) * column_norms[labels] * self.scale

    def margined_target_logits(self, logits: Tensor, magnitudes: Tensor) -> Tensor:
        """The target logits with the margin applied to their cosines (logit / magnitude)."""
        magnitudes = magnitudes.clamp_min(torch.finfo(magnitudes.dtype).tiny)
        return self.modify_cosine_of_target_classes(logits / magnitudes) * magnitudes

    def training_logits(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        return fc.with_target_margin(
            self.get_logits(embeddings),
            labels,
            self.margined_target_logits,
            self.target_magnitudes(embeddings, labels),
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, margin={self.margin}, scale={self.scale}"


@LOSSES.register()
class SphereFaceLoss(LargeMarginSoftmaxLoss):
    """SphereFace (A-Softmax, Liu et al. 2017): L-Softmax's multiplicative angular margin with
    logits ‖x‖ cos, the class weights' norms left out. Arguments as
    :class:`LargeMarginSoftmaxLoss`."""

    def get_logits(self, embeddings: Tensor) -> Tensor:
        unit_classes = F.normalize(self.weight_as(embeddings), dim=0)
        return (embeddings * self.scale) @ unit_classes

    def target_magnitudes(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        return torch.linalg.vector_norm(embeddings, dim=1) * self.scale


class _ScaledCosineLoss(LargeMarginSoftmaxLoss):
    """Shared by ArcFace and CosFace (and sub-centre ArcFace): logits are cosines times
    ``scale``."""

    def get_logits(self, embeddings: Tensor) -> Tensor:
        unit_classes = F.normalize(self.weight_as(embeddings), dim=0)
        return (F.normalize(embeddings, dim=1) * self.scale) @ unit_classes

    def target_magnitudes(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        return embeddings.new_full(labels.shape, self.scale)


@LOSSES.register()
class ArcFaceLoss(_ScaledCosineLoss):
    """ArcFace (Deng et al. 2019): an additive angular margin, cos(θ + m) for the target class,
    on cosine logits times ``scale``.

    Args:
        num_classes: Number of classes (labels in [0, num_classes)).
        embedding_size: Embedding dimension.
        margin: The angular margin in degrees; ``self.margin`` keeps it in degrees, as given,
            where PML's ``margin`` attribute holds it converted to radians.
        scale: Logit scale, positive.
        distance: Must be ``CosineSimilarity()`` with power 1 (the default).
        reducer: Reduces the per-sample losses; default ``MeanReducer()``.
        embedding_regularizer: As :class:`BaseMetricLossFunction`.
        embedding_reg_weight: As :class:`BaseMetricLossFunction`.
        weight_regularizer: Regulariser of the class weights, as PML's.
        weight_reg_weight: Its weight.
        weight_init_func: Initialises ``W`` in place; default ``nn.init.normal_`` (PML's).
    """

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        margin: float = 28.6,
        scale: float = 64,
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
            margin,
            scale,
            distance,
            reducer,
            embedding_regularizer,
            embedding_reg_weight,
            weight_regularizer,
            weight_reg_weight,
            weight_init_func,
        )

    @staticmethod
    def checked_margin(margin: float) -> float:
        return check_finite_number(margin, "margin")

    def modify_cosine_of_target_classes(self, cosine: Tensor) -> Tensor:
        return fc.additive_angular_margin(cosine, math.radians(self.margin))


@LOSSES.register()
class SubCenterArcFaceLoss(ArcFaceLoss):
    """Sub-centre ArcFace (Deng et al. 2020): ``sub_centers`` weight columns per class, a class's
    cosine the largest of its sub-centres', then ArcFace.

    ``W`` is (embedding_size, num_classes · sub_centers), class c's sub-centres in columns
    c·sub_centers … (c + 1)·sub_centers − 1, as in PML.

    Args:
        num_classes: Number of classes (labels in [0, num_classes)).
        embedding_size: Embedding dimension.
        margin: The angular margin in degrees; ``self.margin`` keeps it in degrees, as given,
            where PML's ``margin`` attribute holds it converted to radians.
        scale: Logit scale, positive.
        sub_centers: Sub-centres per class.
        distance: Must be ``CosineSimilarity()`` with power 1 (the default).
        reducer: Reduces the per-sample losses; default ``MeanReducer()``.
        embedding_regularizer: As :class:`BaseMetricLossFunction`.
        embedding_reg_weight: As :class:`BaseMetricLossFunction`.
        weight_regularizer: Regulariser of the sub-centres (rows of ``W.t()``), as PML's.
        weight_reg_weight: Its weight.
        weight_init_func: Initialises ``W`` in place; default ``nn.init.normal_`` (PML's).
    """

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        margin: float = 28.6,
        scale: float = 64,
        sub_centers: int = 3,
        distance: BaseDistance | None = None,
        reducer: Reducer | None = None,
        embedding_regularizer: BaseRegularizer | None = None,
        embedding_reg_weight: float = 1,
        weight_regularizer: BaseRegularizer | None = None,
        weight_reg_weight: float = 1,
        weight_init_func: WeightInit | None = None,
    ) -> None:
        # Read by centers_per_class() while the base constructor sizes W.
        self.sub_centers = check_positive_int(sub_centers, "sub_centers")
        super().__init__(
            num_classes,
            embedding_size,
            margin,
            scale,
            distance,
            reducer,
            embedding_regularizer,
            embedding_reg_weight,
            weight_regularizer,
            weight_reg_weight,
            weight_init_func,
        )

    def centers_per_class(self) -> int:
        return self.sub_centers

    def get_cosine(self, embeddings: Tensor) -> Tensor:
        return fc.sub_center_cosine(
            super().get_cosine(embeddings), self.num_classes, self.sub_centers
        )

    def get_logits(self, embeddings: Tensor) -> Tensor:
        # The scale is positive, so the largest scaled cosine is the scaled largest cosine.
        return fc.sub_center_cosine(
            super().get_logits(embeddings), self.num_classes, self.sub_centers
        )

    @overload
    def get_outliers(
        self,
        embeddings: Tensor,
        labels: Tensor,
        threshold: float = 75,
        return_dominant_centers: Literal[True] = True,
    ) -> tuple[Tensor, Tensor]: ...

    @overload
    def get_outliers(
        self,
        embeddings: Tensor,
        labels: Tensor,
        threshold: float = 75,
        return_dominant_centers: bool = True,
    ) -> Tensor | tuple[Tensor, Tensor]: ...

    def get_outliers(
        self,
        embeddings: Tensor,
        labels: Tensor,
        threshold: float = 75,
        return_dominant_centers: bool = True,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Samples farther than ``threshold`` degrees from their class's dominant sub-centre
        (the one nearest to most of the class's samples), to clean a dataset of outliers.

        Args:
            embeddings: (N, D) embeddings, typically of a whole dataset.
            labels: (N,) class indices in [0, num_classes).
            threshold: Angle in degrees.
            return_dominant_centers: Also return the dominant sub-centres.

        Returns:
            The outliers' indices (ordered by class, then index), and, with
            ``return_dominant_centers``, the (D, num_classes) dominant sub-centres (NaN
            columns for classes without samples, which have none; PML leaves them
            uninitialised, and returns the pair even when asked not to).
        """
        emb, lab, _, _ = check_batch(embeddings, labels, None, None, labels_required=True)
        assert lab is not None
        lab = class_labels(lab, self.num_classes)
        with torch.no_grad():
            weight = self.weight_as(emb)
            outliers, dominant, present = fc.sub_center_outliers(
                self.distance(emb, weight.t()),
                lab,
                self.num_classes,
                self.sub_centers,
                math.cos(math.radians(threshold)),
            )
        if not return_dominant_centers:
            return outliers
        classes = torch.arange(self.num_classes, device=emb.device)
        centers = weight.detach().view(-1, self.num_classes, self.sub_centers)[:, classes, dominant]
        return outliers, centers.masked_fill(~present, math.nan)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, sub_centers={self.sub_centers}"


@LOSSES.register()
class CosFaceLoss(_ScaledCosineLoss):
    """CosFace (large margin cosine loss, Wang et al. 2018): cos θ − m for the target class, on
    cosine logits times ``scale``.

    Args:
        num_classes: Number of classes (labels in [0, num_classes)).
        embedding_size: Embedding dimension.
        margin: The cosine margin m.
        scale: Logit scale, positive.
        distance: Must be ``CosineSimilarity()`` with power 1 (the default).
        reducer: Reduces the per-sample losses; default ``MeanReducer()``.
        embedding_regularizer: As :class:`BaseMetricLossFunction`.
        embedding_reg_weight: As :class:`BaseMetricLossFunction`.
        weight_regularizer: Regulariser of the class weights, as PML's.
        weight_reg_weight: Its weight.
        weight_init_func: Initialises ``W`` in place; default ``nn.init.normal_`` (PML's).
    """

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        margin: float = 0.35,
        scale: float = 64,
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
            margin,
            scale,
            distance,
            reducer,
            embedding_regularizer,
            embedding_reg_weight,
            weight_regularizer,
            weight_reg_weight,
            weight_init_func,
        )

    @staticmethod
    def checked_margin(margin: float) -> float:
        return check_finite_number(margin, "margin")

    def modify_cosine_of_target_classes(self, cosine: Tensor) -> Tensor:
        return fc.additive_cosine_margin(cosine, self.margin)


@LOSSES.register()
class NormalizedSoftmaxLoss(_SoftmaxClassifierLoss):
    """NormalizedSoftmax (Zhai & Wu 2019): softmax over the similarities to the L2-normalised
    class weights, divided by ``temperature``.

    Args:
        num_classes: Number of classes (labels in [0, num_classes)).
        embedding_size: Embedding dimension.
        temperature: Softmax temperature.
        distance: Default ``DotProductSimilarity()`` (normalising: cosine); any distance
            works, its values negated when it is not a similarity.
        reducer: Reduces the per-sample losses; default ``MeanReducer()``.
        embedding_regularizer: As :class:`BaseMetricLossFunction`.
        embedding_reg_weight: As :class:`BaseMetricLossFunction`.
        weight_regularizer: Regulariser of the class weights, as PML's.
        weight_reg_weight: Its weight.
        weight_init_func: Initialises ``W`` in place; default ``nn.init.normal_`` (PML's).
    """

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        temperature: float = 0.05,
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
            1,
            distance,
            reducer,
            embedding_regularizer,
            embedding_reg_weight,
            weight_regularizer,
            weight_reg_weight,
            weight_init_func,
        )
        self.temperature = check_positive_number(temperature, "temperature")

    @staticmethod
    def default_distance() -> BaseDistance:
        return DotProductSimilarity()

    def get_logits(self, embeddings: Tensor) -> Tensor:
        # The class weights are normalised in the distance's own norm, whatever its
        # normalize_embeddings says, as in PML.
        classes = F.normalize(self.weight_as(embeddings), p=self.distance.p, dim=0)
        distance = self.distance
        if type(distance) in (DotProductSimilarity, CosineSimilarity) and distance.power == 1:
            # The temperature divides the (N, D) embeddings, not the (N, C) logits.
            query = (
                F.normalize(embeddings, p=distance.p, dim=1)
                if distance.normalize_embeddings
                else embeddings
            )
            return (query / self.temperature) @ classes
        return fc.temperature_logits(
            distance(embeddings, classes.t()), self.temperature, distance.is_inverted
        )

    def training_logits(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        return self.get_logits(embeddings)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, temperature={self.temperature}"


def _p2sgrad_init(weight: Tensor) -> None:
    """PML's init of P2SGrad's weight: uniform in [-1, 1], columns rescaled to unit norm."""
    fc.project_to_unit_columns_(weight.uniform_(-1, 1))


@LOSSES.register()
class P2SGradLoss(ClassParametersLoss):
    """P2SGrad (Zhang et al. 2019): the squared error between the cosines to the classes and the
    one-hot labels, whose gradient is the paper's refined gradient.

    Before each call the class weights are rescaled to unit columns in place (outside
    autograd), as in PML, so their gradient is the plain, unprojected one. ``indices_tuple`` is
    not supported, nor is a weight regulariser (PML's has neither).

    Args:
        descriptors_dim: Embedding dimension (PML's name).
        num_classes: Number of classes (labels in [0, num_classes)).
        reducer: Reduces the N × num_classes squared errors; default ``MeanReducer()``, PML's
            mean squared error (PML ignores any other reducer).
        embedding_regularizer: As :class:`BaseMetricLossFunction`.
        embedding_reg_weight: As :class:`BaseMetricLossFunction`.
        embedding_size: The embedding dimension under the name the trainer gives every loss;
            an alternative to ``descriptors_dim``.
    """

    supports_indices_tuple = False
    tuple_weighs_items = False
    weight_name = "weight"
    weight: nn.Parameter

    def __init__(
        self,
        descriptors_dim: int | None = None,
        num_classes: int | None = None,
        reducer: Reducer | None = None,
        embedding_regularizer: BaseRegularizer | None = None,
        embedding_reg_weight: float = 1,
        *,
        embedding_size: int | None = None,
    ) -> None:
        if descriptors_dim is None:
            descriptors_dim = embedding_size
        elif embedding_size is not None and embedding_size != descriptors_dim:
            raise ValueError(
                f"descriptors_dim={descriptors_dim} and embedding_size={embedding_size} differ"
            )
        if descriptors_dim is None or num_classes is None:
            raise ValueError(
                "P2SGradLoss needs descriptors_dim (or embedding_size) and num_classes"
            )
        super().__init__(
            num_classes,
            check_positive_int(descriptors_dim, "descriptors_dim"),
            1,
            None,
            reducer,
            embedding_regularizer,
            embedding_reg_weight,
            None,
            1,
            None,
            _p2sgrad_init,
        )
        self.descriptors_dim = self.embedding_size

    def compute_loss(self, batch: Batch) -> Tensor:
        labels = self.labels_of(batch)
        fc.project_to_unit_columns_(self.weight)
        emb = batch.embeddings
        return fc.p2sgrad_loss(emb, self.weight_as(emb), labels, self.reducer)

    def extra_repr(self) -> str:
        return (
            f"descriptors_dim={self.descriptors_dim}, num_classes={self.num_classes}, "
            f"reducer={self.reducer!r}"
        )


__all__ = [
    "ArcFaceLoss",
    "CosFaceLoss",
    "LargeMarginSoftmaxLoss",
    "NormalizedSoftmaxLoss",
    "P2SGradLoss",
    "SphereFaceLoss",
    "SubCenterArcFaceLoss",
]
