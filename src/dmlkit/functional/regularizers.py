"""Per-row and per-pair terms of the regularisers (PML's formulas), before reduction.

Each function returns the elements the regulariser's reducer averages: one per row of its
input (embeddings, or weight rows of a loss: one per class or centre), or one per pair of rows.
"""

from __future__ import annotations

import torch
from torch import Tensor


def lp_norm_terms(x: Tensor, p: float = 2, power: float = 1) -> Tensor:
    """``‖x_i‖_p ** power`` for every row."""
    norms = torch.linalg.vector_norm(x, ord=p, dim=1)
    return norms if power == 1 else norms**power


def zero_mean_terms(x: Tensor) -> Tensor:
    """``|Σ_d x_id|`` for every row: zero when a row's entries average to zero."""
    return x.sum(dim=1).abs()


def center_invariant_terms(x: Tensor, p: float = 2) -> Tensor:
    """``(‖x_i‖² − mean_j ‖x_j‖²)² / 4`` for every row (Wu et al. 2018): rows of equal norm
    give zero."""
    squared_norms = torch.linalg.vector_norm(x, ord=p, dim=1) ** 2
    return (squared_norms - squared_norms.mean()) ** 2 / 4


def nearest_similarity_terms(sim: Tensor) -> Tensor:
    """Each row's similarity to its most similar other row (RegularFace, Zhao et al. 2019).

    Args:
        sim: (C, C) similarities of the rows to each other.
    """
    with torch.no_grad():
        others = sim.clone().fill_diagonal_(float("-inf"))
        nearest = others.argmax(dim=1, keepdim=True)
    return sim.gather(1, nearest).squeeze(1)


def same_class_center_pairs(num_classes: int, centers_per_class: int) -> Tensor:
    """Bool (C·K, C·K) mask of the pairs (i < j) of centres of the same class, the centres of
    class c being rows c·K … c·K + K − 1 (SoftTriple's layout)."""
    block = torch.ones(centers_per_class, centers_per_class).triu(diagonal=1)
    return torch.block_diag(*[block] * num_classes).bool()


def sparse_centers_terms(sim: Tensor, pairs: Tensor) -> Tensor:
    """The chord distance ``√(2 + δ − 2 s_ij)`` between the unit centres of every selected
    pair (SoftTriple's regulariser; δ, the dtype's smallest normal number, keeps the square
    root differentiable at coinciding centres). SoftTriple divides their sum by
    ``C K (K − 1)``, twice the number of pairs.

    Args:
        sim: (C·K, C·K) cosine similarities of the centres.
        pairs: Bool mask of the pairs to use (:func:`same_class_center_pairs`).
    """
    twice = (2.0 * sim[pairs]).clamp(max=2.0)
    return torch.sqrt(2.0 + torch.finfo(sim.dtype).tiny - twice)


__all__ = [
    "center_invariant_terms",
    "lp_norm_terms",
    "nearest_similarity_terms",
    "same_class_center_pairs",
    "sparse_centers_terms",
    "zero_mean_terms",
]
