"""Masked log-sum-exp that stays finite, and NaN-free in backward, in every dtype."""

from __future__ import annotations

import torch
from torch import Tensor


def masked_logsumexp(
    x: Tensor, weights: Tensor, dim: int = 1, add_one: bool = False
) -> tuple[Tensor, Tensor]:
    """Row-wise ``log(Σ_j w_ij · exp(x_ij))``, optionally ``log(1 + Σ_j w_ij · exp(x_ij))``.

    Rows with no selected entry give 0 in both forms (PML's convention), with a zero gradient.
    Entries with zero weight may hold any finite value; they never reach the result.

    Args:
        x: Values, any floating dtype.
        weights: Same shape; a bool mask or non-negative counts.
        dim: The dimension reduced.
        add_one: Include an implicit extra entry ``exp(0) = 1`` (MS-style ``log(1 + Σ)``).

    Returns:
        (lse, nonempty): lse with ``dim`` kept as size 1, and the bool mask of non-empty rows.
    """
    mask = weights if weights.dtype == torch.bool else weights > 0
    nonempty = mask.any(dim, keepdim=True)
    lowest = torch.finfo(x.dtype).min
    row_max = torch.where(mask, x, lowest).amax(dim, keepdim=True).detach()
    if add_one:
        row_max = row_max.clamp_min(0.0)
    else:
        row_max = torch.where(nonempty, row_max, 0.0)
    shifted = torch.where(mask, x - row_max, float("-inf"))
    terms = shifted.exp()
    if weights.dtype != torch.bool:
        terms = terms * weights.to(x.dtype)
    total = terms.sum(dim, keepdim=True)
    if add_one:
        # log1p keeps log(1 + tiny) accurate where every term is far below 1.
        lse = torch.where(
            row_max > 0, row_max + torch.log(total + torch.exp(-row_max)), torch.log1p(total)
        )
        return lse, nonempty
    total = torch.where(nonempty, total, 1.0)
    return torch.where(nonempty, row_max + torch.log(total), 0.0), nonempty
