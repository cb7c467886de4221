"""Masked log-sum-exp that stays finite, and NaN-free in backward, in every dtype.

Written with plain float arithmetic on 0/1 weights and without special values: on CPU,
``log(0)``, ``exp(−inf)`` and exponentials that underflow into denormal numbers are each several
times slower than ordinary arithmetic, and boolean masking is slower than multiplication. Work runs
over row blocks with small temporaries; forward keeps per-row scalars only and backward recomputes
each block's softmax, so the gradient is the only full-size tensor.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .reduction import row_blocks


def _block_terms(
    x: Tensor, weights: Tensor, scale: float, offset: float, row_max: Tensor
) -> Tensor:
    """``w · exp(clamp(scale·x + offset − row_max))`` for one block of rows (a new tensor)."""
    lowest_exponent = math.log(torch.finfo(x.dtype).tiny)
    terms = torch.mul(x, scale).add_(offset).sub_(row_max)
    return terms.clamp_(lowest_exponent, 0.0).exp_().mul_(weights)


class _MaskedLogSumExp(torch.autograd.Function):
    """Forward keeps only per-row scalars; backward recomputes each block's softmax, so no
    full-size tensor exists but the gradient."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: Tensor, weights: Tensor, add_one: bool, scale: float, offset: float
    ) -> tuple[Tensor, Tensor]:
        finfo = torch.finfo(x.dtype)
        lse = x.new_zeros(x.shape[0], 1)
        nonempty = x.new_zeros(x.shape[0], 1)
        row_maxes = x.new_empty(x.shape[0], 1)
        denominators = x.new_empty(x.shape[0], 1)
        for block in row_blocks(*x.shape) if x.shape[1] else []:  # no columns: every row empty
            w = weights[block].to(x.dtype)
            # Unselected entries are pushed far below every selected one, only to find the max.
            buffer = torch.gt(w, 0.0, out=torch.empty_like(w))
            has_any = buffer.amax(1, keepdim=True)
            buffer.sub_(1.0).mul_(-finfo.min / 2).add_(torch.mul(x[block], scale).add_(offset))
            row_max = buffer.amax(1, keepdim=True).mul_(has_any)
            if add_one:
                row_max.clamp_min_(0.0)
            total = _block_terms(x[block], w, scale, offset, row_max).sum(1, keepdim=True)
            if add_one:
                extra = torch.exp(-row_max)
                # log1p keeps log(1 + tiny) accurate where every term is far below 1.
                lse[block] = torch.where(
                    row_max > 0, row_max + torch.log(total + extra), torch.log1p(total)
                )
                denominators[block] = total + extra
            else:
                denominators[block] = total + (1.0 - has_any)
                lse[block] = (row_max + torch.log(denominators[block])).mul_(has_any)
            row_maxes[block] = row_max
            nonempty[block] = has_any
        ctx.save_for_backward(x, weights, row_maxes, denominators)
        ctx.scale, ctx.offset = scale, offset
        ctx.mark_non_differentiable(nonempty)
        return lse, nonempty

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_lse: Tensor, _grad_nonempty: Tensor) -> tuple[Tensor | None, ...]:
        x, weights, row_maxes, denominators = ctx.saved_tensors
        grad = torch.empty_like(x)
        row_factor = grad_lse * ctx.scale / denominators
        for block in row_blocks(*x.shape):
            w = weights[block].to(x.dtype)
            terms = _block_terms(x[block], w, ctx.scale, ctx.offset, row_maxes[block])
            torch.mul(terms, row_factor[block], out=grad[block])
        return grad, None, None, None, None


def masked_logsumexp(
    x: Tensor,
    weights: Tensor,
    add_one: bool = False,
    scale: float = 1.0,
    offset: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """Row-wise (over dim 1) ``log(Σ_j w_ij · exp(z_ij))``, or ``log(1 + Σ_j w_ij · exp(z_ij))``,
    of ``z = scale·x + offset`` (the affine map is applied inside, saving two passes).

    Rows with no selected entry give 0 in both forms (PML's convention), with a zero gradient.
    Entries with zero weight may hold any finite value; they never reach the result. Terms
    smaller than the dtype's smallest normal number times the row's largest term are rounded
    up to it (they are far below its precision). First-order differentiable.

    Args:
        x: (N, M) values, any floating dtype.
        weights: (N, M) non-negative weights (0/1 or counts; float or bool).
        add_one: Include an implicit extra entry ``exp(0) = 1`` (MS-style ``log(1 + Σ)``).
        scale: Multiplies ``x``.
        offset: Added after scaling.

    Returns:
        (lse, nonempty): (N, 1) lse, and the (N, 1) 0/1 float indicator of non-empty rows.
    """
    lse, nonempty = _MaskedLogSumExp.apply(x, weights, add_one, scale, offset)
    return lse, nonempty
