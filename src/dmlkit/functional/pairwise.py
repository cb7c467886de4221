"""Pairwise similarity and distance matrices between a batch and itself or a reference set."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _reference(x: Tensor, y: Tensor | None) -> Tensor:
    return x if y is None else y


def dot_product_matrix(x: Tensor, y: Tensor | None = None) -> Tensor:
    """Dot products ``S[i, j] = x_i · y_j``.

    Args:
        x: (N, D) query embeddings.
        y: (M, D) reference embeddings; ``x`` itself when None.

    Returns:
        (N, M) matrix.
    """
    return x @ _reference(x, y).T


def cosine_similarity_matrix(x: Tensor, y: Tensor | None = None) -> Tensor:
    """Cosine similarities ``S[i, j] = x_i · y_j / (‖x_i‖ ‖y_j‖)``.

    Args:
        x: (N, D) query embeddings.
        y: (M, D) reference embeddings; ``x`` itself when None.

    Returns:
        (N, M) matrix with entries in [-1, 1].
    """
    xn = F.normalize(x, dim=1)
    return xn @ (xn if y is None else F.normalize(y, dim=1)).T


def squared_euclidean_distance_matrix(x: Tensor, y: Tensor | None = None) -> Tensor:
    """Squared Euclidean distances ``D[i, j] = ‖x_i − y_j‖²``, computed with one matrix product.

    The self-distances of ``x`` with itself are exactly zero (set by index, not by value).

    Args:
        x: (N, D) query embeddings.
        y: (M, D) reference embeddings; ``x`` itself when None.

    Returns:
        (N, M) non-negative matrix.
    """
    ref = _reference(x, y)
    x_sq = x.pow(2).sum(1, keepdim=True)
    ref_sq = x_sq if y is None else ref.pow(2).sum(1, keepdim=True)
    sq = torch.addmm(x_sq + ref_sq.T, x, ref.T, alpha=-2.0)
    if y is None:
        sq = sq.fill_diagonal_(0.0)
    return sq.clamp_min(0.0)


def safe_sqrt(sq: Tensor) -> Tensor:
    """Square root whose gradient at 0 is 0 instead of Inf, so masked-out zero distances stay
    harmless in the backward pass."""
    positive = sq > 0
    return torch.where(positive, torch.sqrt(torch.where(positive, sq, 1.0)), 0.0)


def euclidean_distance_matrix(x: Tensor, y: Tensor | None = None) -> Tensor:
    """Euclidean distances ``D[i, j] = ‖x_i − y_j‖₂``.

    Args:
        x: (N, D) query embeddings.
        y: (M, D) reference embeddings; ``x`` itself when None.

    Returns:
        (N, M) non-negative matrix; its gradient is finite everywhere (0 at zero distance).
    """
    return safe_sqrt(squared_euclidean_distance_matrix(x, y))


def lp_distance_matrix(x: Tensor, y: Tensor | None = None, p: float = 2.0) -> Tensor:
    """Minkowski distances ``D[i, j] = ‖x_i − y_j‖_p``.

    Args:
        x: (N, D) query embeddings.
        y: (M, D) reference embeddings; ``x`` itself when None.
        p: The norm's order; p = 2 takes the fast matrix-product path.

    Returns:
        (N, M) non-negative matrix.
    """
    if p == 2:
        return euclidean_distance_matrix(x, y)
    return torch.cdist(x, _reference(x, y), p=p)
