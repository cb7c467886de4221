"""Distance and similarity objects for the ``distance=`` slot of losses and miners.

They mirror PML's classes and defaults (``LpDistance`` L2-normalises by default, so its
"Euclidean" distances live on the unit sphere), but compute with one matrix product.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from .functional import pairwise
from .registry import Registry


class BaseDistance:
    """A pairwise distance (``is_inverted`` False) or similarity (``is_inverted`` True).

    Attributes:
        normalize_embeddings: L2-normalise the inputs first.
        p: Order of the norm used for normalisation and by ``LpDistance``.
        power: Exponent applied to every entry.
        is_inverted: True when larger values mean closer (similarities).
    """

    is_inverted: bool = False

    def __init__(self, normalize_embeddings: bool = True, p: float = 2, power: float = 1) -> None:
        self.normalize_embeddings = normalize_embeddings
        self.p = p
        self.power = power

    def __call__(self, query_emb: Tensor, ref_emb: Tensor | None = None) -> Tensor:
        """The (N, M) matrix between ``query_emb`` and ``ref_emb`` (itself when None)."""
        query = self._maybe_normalize(query_emb)
        ref = None if ref_emb is None else self._maybe_normalize(ref_emb)
        return self.compute_powered_mat(query, ref)

    def compute_powered_mat(self, query: Tensor, ref: Tensor | None) -> Tensor:
        """``compute_mat`` raised to ``power``."""
        mat = self.compute_mat(query, ref)
        return mat if self.power == 1 else mat**self.power

    def compute_mat(self, query: Tensor, ref: Tensor | None) -> Tensor:
        raise NotImplementedError

    def pairwise_distance(self, query_emb: Tensor, ref_emb: Tensor) -> Tensor:
        """Row-wise values between ``query_emb[i]`` and ``ref_emb[i]``."""
        raise NotImplementedError

    def _maybe_normalize(self, emb: Tensor) -> Tensor:
        return F.normalize(emb, p=self.p, dim=1) if self.normalize_embeddings else emb

    def margin(self, x: Tensor | float, y: Tensor | float) -> Tensor | float:
        """How far x is beyond y in the "farther apart" direction."""
        return y - x if self.is_inverted else x - y

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(normalize_embeddings={self.normalize_embeddings}, "
            f"p={self.p}, power={self.power})"
        )


DISTANCES = Registry("distance", BaseDistance)


@DISTANCES.register()
class LpDistance(BaseDistance):
    """Minkowski distance ``‖x − y‖_p`` (p = 2: Euclidean, via one matrix product).

    With ``power=2`` and p = 2 the squared Euclidean distance is computed directly.
    """

    def compute_mat(self, query: Tensor, ref: Tensor | None) -> Tensor:
        return pairwise.lp_distance_matrix(query, ref, self.p)

    def compute_powered_mat(self, query: Tensor, ref: Tensor | None) -> Tensor:
        if self.p == 2 and self.power == 2:
            return pairwise.squared_euclidean_distance_matrix(query, ref)
        return super().compute_powered_mat(query, ref)

    def pairwise_distance(self, query_emb: Tensor, ref_emb: Tensor) -> Tensor:
        diff = self._maybe_normalize(query_emb) - self._maybe_normalize(ref_emb)
        return diff.norm(p=self.p, dim=1) ** self.power


@DISTANCES.register()
class DotProductSimilarity(BaseDistance):
    """Dot product ``x · y``; like PML it L2-normalises by default, which makes it cosine."""

    is_inverted = True

    def compute_mat(self, query: Tensor, ref: Tensor | None) -> Tensor:
        return pairwise.dot_product_matrix(query, ref)

    def pairwise_distance(self, query_emb: Tensor, ref_emb: Tensor) -> Tensor:
        q, r = self._maybe_normalize(query_emb), self._maybe_normalize(ref_emb)
        return (q * r).sum(1) ** self.power


@DISTANCES.register()
class CosineSimilarity(DotProductSimilarity):
    """Cosine similarity: always normalised."""

    def __init__(self, power: float = 1) -> None:
        super().__init__(normalize_embeddings=True, p=2, power=power)


@DISTANCES.register()
class SNRDistance(BaseDistance):
    """Signal-to-noise ratio ``var(x − y) / var(x)`` (Yuan et al. 2019): the noise the
    difference adds, relative to the anchor's signal. Not symmetric; like PML it normalises
    the embeddings first by default."""

    def compute_mat(self, query: Tensor, ref: Tensor | None) -> Tensor:
        return pairwise.snr_distance_matrix(query, ref)

    def pairwise_distance(self, query_emb: Tensor, ref_emb: Tensor) -> Tensor:
        q, r = self._maybe_normalize(query_emb), self._maybe_normalize(ref_emb)
        return ((q - r).var(dim=1) / q.var(dim=1)) ** self.power


# A loss's or miner's ``requires_similarity``: False for any distance, True for any similarity
# (``is_inverted``), or the one similarity class its formula is written for.
SimilarityRequirement = bool | type[BaseDistance]


def check_distance(owner: str, distance: BaseDistance, requirement: SimilarityRequirement) -> None:
    """Raises ``ValueError`` unless ``distance`` meets ``requirement``.

    Args:
        owner: The loss or miner, for the message.
        distance: Its distance.
        requirement: Its ``requires_similarity``.
    """
    if isinstance(requirement, type):
        if not isinstance(distance, requirement):
            raise ValueError(
                f"{owner} requires {requirement.__name__}, got {type(distance).__name__}"
            )
    elif requirement and not distance.is_inverted:
        raise ValueError(
            f"{owner} needs a similarity (a distance with is_inverted=True, such as "
            f"CosineSimilarity or DotProductSimilarity), got {type(distance).__name__}"
        )


__all__ = [
    "DISTANCES",
    "BaseDistance",
    "CosineSimilarity",
    "DotProductSimilarity",
    "LpDistance",
    "SNRDistance",
    "SimilarityRequirement",
    "check_distance",
]
