"""Pairwise similarity and distance matrices between a batch and itself or a reference set."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from .reduction import row_blocks


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

    Written with plain differentiable ops (no fused kernel), so forward-mode and second-order
    differentiation work: DDTAS's Online Threshold Generator relies on both.

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
    if torch.is_grad_enabled() and (x.requires_grad or ref.requires_grad):
        sq = torch.addmm(x_sq + ref_sq.T, x, ref.T, alpha=-2.0)
    else:  # in place: no full-size temporaries
        sq = torch.mm(x, ref.T).mul_(-2.0).add_(x_sq).add_(ref_sq.T)
    if y is None:
        sq = sq.fill_diagonal_(0.0)
    return sq.clamp_min_(0.0) if not sq.requires_grad else sq.clamp_min(0.0)


class _EuclideanDistance(torch.autograd.Function):
    """‖x_i − y_j‖ with one allocation forward and two matrix products backward.

    Pairs whose squared distance rounds to zero (self-pairs, duplicates) get a zero gradient,
    as ``torch.cdist`` gives, rather than an infinite one.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, y: Tensor | None) -> Tensor:  # type: ignore[override]
        ref = x if y is None else y
        dist = squared_euclidean_distance_matrix(x, y)
        dist.clamp_min_(torch.finfo(x.dtype).tiny).sqrt_()
        ctx.save_for_backward(x, ref, dist)
        ctx.same = y is None
        return dist

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:
        x, ref, dist = ctx.saved_tensors
        # ∂d_ij/∂x_i = (x_i − y_j) / d_ij; pairs clamped at zero distance get no gradient.
        floor = torch.finfo(dist.dtype).tiny ** 0.5
        g = torch.empty_like(dist)
        for block in row_blocks(*dist.shape):
            d = dist[block]
            torch.gt(d, floor, out=g[block])
            g[block].div_(d).mul_(grad[block])
        if ctx.same:
            grad_x = (g.sum(1) + g.sum(0))[:, None] * x - g @ x - g.T @ x
            return grad_x, None
        grad_x = g.sum(1)[:, None] * x - g @ ref
        grad_y = g.sum(0)[:, None] * ref - g.T @ x
        return grad_x, grad_y


def euclidean_distance_matrix(x: Tensor, y: Tensor | None = None) -> Tensor:
    """Euclidean distances ``D[i, j] = ‖x_i − y_j‖₂``.

    First-order differentiable (a fused kernel); pairs at zero distance get a zero gradient.

    Args:
        x: (N, D) query embeddings.
        y: (M, D) reference embeddings; ``x`` itself when None.

    Returns:
        (N, M) non-negative matrix.
    """
    result: Tensor = _EuclideanDistance.apply(x, y)
    return result


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


def snr_distance_matrix(x: Tensor, y: Tensor | None = None) -> Tensor:
    """Signal-to-noise-ratio distances ``D[i, j] = var(x_i − y_j) / var(x_i)`` (Yuan et al.
    2019; unbiased variances over the embedding dimension, as ``torch.var``).

    Computed without the (N, M, D) differences: with rows centred on their own means,
    ``var(x_i − y_j) = ‖x̃_i − ỹ_j‖² / (D − 1)``, one squared-distance matrix.

    Args:
        x: (N, D) query embeddings, D ≥ 2.
        y: (M, D) reference embeddings; ``x`` itself when None.

    Returns:
        (N, M) non-negative matrix, not symmetric (each row is scaled by its own variance).
    """
    xc = x - x.mean(dim=1, keepdim=True)
    yc = None if y is None else y - y.mean(dim=1, keepdim=True)
    noise = squared_euclidean_distance_matrix(xc, yc)
    return noise / xc.pow(2).sum(dim=1, keepdim=True)
