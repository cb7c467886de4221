"""Distance and similarity objects for the ``distance=`` slot of losses and miners.

They mirror PML's classes and defaults (``LpDistance`` L2-normalises by default, so its
"Euclidean" distances live on the unit sphere), but compute with one matrix product.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch.nn.functional as F
from torch import Tensor

from .functional import pairwise
from .registry import Registry
from .validation import check_embeddings, check_positive_int


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
    r"""Minkowski distance ``‖x − y‖_p`` (p = 2: Euclidean, via one matrix product).

    For (by default L2-normalised) embeddings $x, y \in \mathbb{R}^D$, each entry is
    $\left(\sum_{i=1}^{D} |x_i - y_i|^p\right)^{\text{power}/p}$. With ``power=2`` and p = 2 the
    squared Euclidean distance is computed directly.
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


class BatchedDistance:
    """Computes a distance's matrix one block of query rows at a time and hands each block to
    ``iter_fn`` instead of returning it: for reference sets too large for the full (N, M)
    matrix (nearest-neighbour search over a whole dataset, say).

    The call ``batched(query_emb, ref_emb=None)`` runs ``iter_fn(mat, s, e)`` for
    s = 0, batch_size, 2·batch_size, …, where ``mat`` is the (rows, M) matrix of
    ``query_emb[s:e]`` against ``ref_emb`` (``query_emb`` itself when None) and
    e = s + batch_size, as in PML: on the last block e may pass N, and ``mat`` has only the
    rows left. It returns None. Every other attribute (``is_inverted``, ``p``…) is the
    wrapped distance's. Not a ``distance=`` for losses or miners, which need the matrix.

    Args:
        distance: The distance or similarity to compute.
        iter_fn: Called with each block; may also be set later, before the call.
        batch_size: Query rows per block.
    """

    def __init__(
        self,
        distance: BaseDistance,
        iter_fn: Callable[[Tensor, int, int], object] | None = None,
        batch_size: int = 32,
    ) -> None:
        if not isinstance(distance, BaseDistance):
            raise ValueError(f"BatchedDistance wraps a BaseDistance, got {type(distance).__name__}")
        if iter_fn is not None and not callable(iter_fn):
            raise ValueError(f"iter_fn must be callable, got {type(iter_fn).__name__}")
        self.distance = distance
        self.iter_fn = iter_fn
        self.batch_size = check_positive_int(batch_size, "batch_size")

    def __call__(self, query_emb: Tensor, ref_emb: Tensor | None = None) -> None:
        """Hands ``iter_fn`` the matrix of each block of ``query_emb`` rows against ``ref_emb``."""
        if self.iter_fn is None:
            raise ValueError("BatchedDistance needs an iter_fn to hand each block to")
        query = check_embeddings(query_emb, "query_emb")
        ref = query if ref_emb is None else check_embeddings(ref_emb, "ref_emb")
        if ref.shape[1] != query.shape[1]:
            raise ValueError(
                f"ref_emb has embedding size {ref.shape[1]} but query_emb has {query.shape[1]}"
            )
        for start in range(0, query.shape[0], self.batch_size):
            end = start + self.batch_size
            self.iter_fn(self.distance(query[start:end], ref), start, end)

    def __getattr__(self, name: str) -> Any:
        # Only reached for attributes this object lacks; "distance" itself is looked up
        # directly so an unpickled, half-built object cannot recurse.
        if name == "distance":
            raise AttributeError(name)
        return getattr(self.distance, name)

    def __repr__(self) -> str:
        return f"BatchedDistance({self.distance!r}, batch_size={self.batch_size})"


__all__ = [
    "DISTANCES",
    "BaseDistance",
    "BatchedDistance",
    "CosineSimilarity",
    "DotProductSimilarity",
    "LpDistance",
    "SNRDistance",
    "SimilarityRequirement",
    "check_distance",
]
