"""Regularisers for the ``embedding_regularizer=`` slot of every loss and the
``weight_regularizer=`` slot of losses with weights (PML's names, defaults and meanings), and
their registry.

A regulariser maps a (N, D) tensor (the call's embeddings, or a loss's weight rows, one per
class or centre) to per-row or per-pair terms (:mod:`dmlkit.functional.regularizers`) and
reduces them with its reducer (``MeanReducer()`` unless said otherwise) to a scalar; the loss
adds that scalar times its ``*_reg_weight``. Regularisers are modules without parameters, so a
loss's ``state_dict`` is the same with or without them, as in PML.
"""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor, nn

from .distances import (
    BaseDistance,
    CosineSimilarity,
    LpDistance,
    SimilarityRequirement,
    check_distance,
)
from .functional import regularizers as fr
from .functional.reduction import DivisorReducer, MeanReducer, Reducer
from .registry import Registry
from .validation import check_positive_int


class BaseRegularizer(nn.Module):
    """A regulariser: terms of its input, reduced to a scalar.

    Attributes:
        requires_similarity: What ``distance`` must be, as for losses.

    Args:
        distance: The distance or similarity, for the regularisers that compare rows; None for
            ``default_distance()`` (PML's ``LpDistance()``).
        reducer: How the terms become a scalar; None for ``default_reducer()``.
    """

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

    def forward(self, x: Tensor) -> Tensor:
        """The reduced regulariser of ``x``, a (N, D) tensor.

        Returns:
            A scalar tensor attached to the graph of ``x``.
        """
        return self.reducer(self.terms(x))

    def terms(self, x: Tensor) -> Tensor:
        """The per-row or per-pair terms the reducer reduces."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"distance={self.distance!r}, reducer={self.reducer!r}"


REGULARIZERS = Registry("regularizer", BaseRegularizer)


@REGULARIZERS.register()
class LpRegularizer(BaseRegularizer):
    """Penalises large rows: ``‖x_i‖_p ** power`` per row.

    Args:
        p: Order of the norm.
        power: Exponent of the norm.
        distance: Unused by the formula (PML's constructor has it).
        reducer: Default ``MeanReducer()``.
    """

    def __init__(
        self,
        p: float = 2,
        power: float = 1,
        distance: BaseDistance | None = None,
        reducer: Reducer | None = None,
    ) -> None:
        super().__init__(distance, reducer)
        self.p = p
        self.power = power

    def terms(self, x: Tensor) -> Tensor:
        return fr.lp_norm_terms(x, self.p, self.power)


@REGULARIZERS.register()
class ZeroMeanRegularizer(BaseRegularizer):
    """Pushes each row's entries to sum to zero: ``|Σ_d x_id|`` per row (the regulariser of
    Yuan et al.'s signal-to-noise-ratio loss).

    Args:
        distance: Unused by the formula (PML's constructor has it).
        reducer: Default ``MeanReducer()``.
    """

    def terms(self, x: Tensor) -> Tensor:
        return fr.zero_mean_terms(x)


@REGULARIZERS.register()
class CenterInvariantRegularizer(BaseRegularizer):
    """Pushes weight rows to equal norms: ``(‖w_i‖² − mean ‖w‖²)² / 4`` per row (Wu et al.
    2018).

    Args:
        distance: Must be an ``LpDistance`` with ``power=1`` and ``normalize_embeddings=False``
            (the default); its ``p`` is the norm's order.
        reducer: Default ``MeanReducer()``.
    """

    requires_similarity: ClassVar[SimilarityRequirement] = LpDistance

    def __init__(
        self, distance: BaseDistance | None = None, reducer: Reducer | None = None
    ) -> None:
        super().__init__(distance, reducer)
        if self.distance.power != 1 or self.distance.normalize_embeddings:
            raise ValueError(
                "CenterInvariantRegularizer needs LpDistance(power=1, "
                f"normalize_embeddings=False), got {self.distance!r}"
            )

    @staticmethod
    def default_distance() -> BaseDistance:
        return LpDistance(normalize_embeddings=False)

    def terms(self, x: Tensor) -> Tensor:
        return fr.center_invariant_terms(x, self.distance.p)


@REGULARIZERS.register()
class RegularFaceRegularizer(BaseRegularizer):
    """Pushes weight rows apart: each row's similarity to its most similar other row
    (RegularFace, Zhao et al. 2019).

    Args:
        distance: A similarity; default ``CosineSimilarity()``.
        reducer: Default ``MeanReducer()``.
    """

    requires_similarity: ClassVar[SimilarityRequirement] = True

    @staticmethod
    def default_distance() -> BaseDistance:
        return CosineSimilarity()

    def terms(self, x: Tensor) -> Tensor:
        return fr.nearest_similarity_terms(self.distance(x))


@REGULARIZERS.register()
class SparseCentersRegularizer(BaseRegularizer):
    """Pulls the centres of one class together, so that unneeded ones merge (SoftTriple, Qian et
    al. 2019): the chord distance between the unit centres of each same-class pair. The input
    is the (C·K, D) centres, class c's being rows c·K … c·K + K − 1. The similarities are
    computed class by class, (C, K, K), never as a (C·K, C·K) matrix: C·K² memory.

    Args:
        num_classes: C.
        centers_per_class: K, at least 2.
        distance: Must be ``CosineSimilarity()`` (the default).
        reducer: Default ``DivisorReducer()``, given twice the number of pairs as divisor
            (SoftTriple's normalisation, PML's value).
    """

    requires_similarity: ClassVar[SimilarityRequirement] = CosineSimilarity

    def __init__(
        self,
        num_classes: int,
        centers_per_class: int,
        distance: BaseDistance | None = None,
        reducer: Reducer | None = None,
    ) -> None:
        super().__init__(distance, reducer)
        self.num_classes = check_positive_int(num_classes, "num_classes")
        self.centers_per_class = check_positive_int(centers_per_class, "centers_per_class")
        if centers_per_class < 2:
            raise ValueError(
                f"SparseCentersRegularizer needs centers_per_class >= 2, got {centers_per_class}"
            )

    @staticmethod
    def default_distance() -> BaseDistance:
        return CosineSimilarity()

    @staticmethod
    def default_reducer() -> Reducer:
        return DivisorReducer()

    def forward(self, x: Tensor) -> Tensor:
        terms = self.terms(x)
        return self.reducer(terms, divisor=2 * terms.numel())

    def terms(self, x: Tensor) -> Tensor:
        expected = self.num_classes * self.centers_per_class
        if x.shape[0] != expected:
            raise ValueError(
                f"SparseCentersRegularizer expects {expected} centres "
                f"(num_classes × centers_per_class), got {x.shape[0]} rows"
            )
        # Only same-class pairs count: the similarities are computed class by class.
        sim = fr.same_class_center_similarities(x, self.num_classes, self.centers_per_class)
        if self.distance.power != 1:
            sim = sim**self.distance.power
        return fr.sparse_centers_terms(sim)

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, centers_per_class={self.centers_per_class}, "
            f"{super().extra_repr()}"
        )


__all__ = [
    "REGULARIZERS",
    "BaseRegularizer",
    "CenterInvariantRegularizer",
    "LpRegularizer",
    "RegularFaceRegularizer",
    "SparseCentersRegularizer",
    "ZeroMeanRegularizer",
]
