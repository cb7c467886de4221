"""Self-supervised losses on two views of a batch: VICReg (Bardes, Ponce and LeCun, 2022).

Row ``i`` of ``embeddings`` and row ``i`` of ``ref_emb`` are two views (augmentations) of one
input; there are no labels.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from .reduction import Reducer


class VICRegStatistics(NamedTuple):
    """The batch statistics VICReg's terms are made of.

    Attributes:
        invariance: (N,) mean over the columns of ``(z_i − z′_i)²``, for each row pair.
        variances: (2, D) unbiased variance of each column over the batch, for each view.
        off_diagonal: (2,) ``Σ_{d≠e} (XᵀX)_de²`` of each view's centred (N, D) matrix ``X``:
            ``(N − 1)²`` times the sum of its squared off-diagonal covariances.
    """

    invariance: Tensor
    variances: Tensor
    off_diagonal: Tensor


def vicreg_statistics(embeddings: Tensor, ref_emb: Tensor) -> VICRegStatistics:
    """VICReg's batch statistics of two (N, D) views, N ≥ 2, differentiably.

    The (N, D) work is done once, in a fused forward and backward (first-order gradients only):
    the off-diagonal sum through the smaller product, ``XᵀX`` (D × D) when D ≤ 2N, else
    ``XXᵀ`` (N × N), whose squared Frobenius norm is the same, less the squared diagonal
    ``Σ_d (Σ_n X_nd²)²``. That subtraction's rounding error is machine epsilon times
    ``‖XᵀX‖²``, not times the off-diagonal part; but with D > 2N, ``XᵀX`` has rank below D / 2,
    so columns of equal variance (what VICReg's variance term drives towards) cannot be
    decorrelated: the off-diagonal part is then at least half of ``‖XᵀX‖²`` and at most about
    one bit is lost. Backward is one batched product and two elementwise passes; as centred
    columns sum to zero, the centring's own gradient term vanishes and is not computed.

    Args:
        embeddings: (N, D) first views.
        ref_emb: (N, D) second views (``embeddings`` itself is allowed).

    Returns:
        The statistics, attached to both inputs' graphs.
    """
    return VICRegStatistics(*_VICRegStatistics.apply(embeddings, ref_emb))


class _VICRegStatistics(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, embeddings: Tensor, ref_emb: Tensor) -> tuple[Tensor, Tensor, Tensor]:  # type: ignore[override]
        n, d = embeddings.shape
        centred = embeddings.new_empty((2, n, d))
        torch.sub(embeddings, embeddings.mean(dim=0), out=centred[0])
        torch.sub(ref_emb, ref_emb.mean(dim=0), out=centred[1])
        diff = embeddings - ref_emb
        invariance = torch.linalg.vector_norm(diff, dim=1).square_().div_(d)
        if d <= 2 * n:
            gram = centred.transpose(1, 2) @ centred
            diagonal = gram.diagonal(dim1=1, dim2=2)
            squares = diagonal.clone()
            diagonal.zero_()
            off_diagonal = torch.linalg.vector_norm(gram, dim=(1, 2)).square_()
            ctx.save_for_backward(centred, diff, gram, None)
        else:
            squares = torch.linalg.vector_norm(centred, dim=1).square_()
            gram = centred @ centred.transpose(1, 2)
            off_diagonal = torch.linalg.vector_norm(gram, dim=(1, 2)).square_()
            off_diagonal -= squares.square().sum(dim=1)
            ctx.save_for_backward(centred, diff, gram, squares)
        return invariance, squares / (n - 1), off_diagonal

    @staticmethod
    @once_differentiable
    def backward(  # type: ignore[override]
        ctx: Any, grad_invariance: Tensor, grad_variances: Tensor, grad_off_diagonal: Tensor
    ) -> tuple[Tensor, Tensor]:
        centred, diff, gram, squares = ctx.saved_tensors
        n, d = diff.shape
        column_scale = grad_variances * (2 / (n - 1))
        weighted_gram = gram * (4 * grad_off_diagonal)[:, None, None]
        if squares is None:
            # d/dX Σ_{d≠e} (XᵀX)_de² = 4·X·(XᵀX − diag)
            grad = torch.baddbmm(centred * column_scale[:, None, :], centred, weighted_gram)
        else:
            # the same through XXᵀ: 4·(XXᵀ·X − X·diag)
            column_scale = column_scale - (4 * grad_off_diagonal)[:, None] * squares
            grad = torch.baddbmm(centred * column_scale[:, None, :], weighted_gram, centred)
        step = diff * (grad_invariance * (2 / d))[:, None]
        return grad[0].add_(step), grad[1].sub_(step)


def vicreg_loss(
    embeddings: Tensor,
    ref_emb: Tensor,
    invariance_lambda: float,
    variance_mu: float,
    covariance_v: float,
    eps: float,
    reducer: Reducer,
) -> Tensor:
    """VICReg's ``λ·s(Z, Z′) + μ·[v(Z) + v(Z′)] + ν·[c(Z) + c(Z′)]``, in PML's form.

    * Invariance: ``λ·mean_d (z_id − z′_id)²`` for each row ``i``, reduced by ``reducer``.
    * Variance: ``μ·relu(1 − √(Var_d + eps)) / 2`` for each column ``d`` of each view (unbiased
      variance over the batch), each view reduced by ``reducer`` on its own.
    * Covariance: ``ν·Σ_{d≠e} Cov_de² / D`` of each view (unbiased covariance), summed as it
      is: no reducer, as PML's "already reduced" term.

    The three reduced terms and the covariance are summed.

    Args:
        embeddings: (N, D) first views, N ≥ 2.
        ref_emb: (N, D) second views.
        invariance_lambda: λ.
        variance_mu: μ.
        covariance_v: ν.
        eps: Added to each variance before the square root.
        reducer: Reduces each per-row and per-column term.

    Returns:
        Scalar loss.
    """
    n, d = embeddings.shape
    stats = vicreg_statistics(embeddings, ref_emb)
    hinge = F.relu(1 - torch.sqrt(stats.variances + eps)) * (variance_mu / 2)
    covariance = stats.off_diagonal.sum() / ((n - 1) ** 2 * d)
    return (
        reducer(stats.invariance * invariance_lambda)
        + reducer(hinge[0])
        + reducer(hinge[1])
        + covariance_v * covariance
    )


__all__ = ["VICRegStatistics", "vicreg_loss", "vicreg_statistics"]
