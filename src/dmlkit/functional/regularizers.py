"""Per-row and per-pair terms of the regularisers (PML's formulas), before reduction.

Each function returns the elements the regulariser's reducer averages: one per row of its
input (embeddings, or weight rows of a loss: one per class or centre), or one per pair of rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
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


def same_class_center_similarities(
    centres: Tensor, num_classes: int, centers_per_class: int
) -> Tensor:
    """The cosine similarities of the centres within each class, class by class: (C, K, K), not
    the (C·K, C·K) matrix of all pairs (C·K²·D work and C·K² memory).

    Args:
        centres: (C·K, D) centres, class c's being rows c·K … c·K + K − 1 (SoftTriple's layout).
        num_classes: C.
        centers_per_class: K.
    """
    unit = F.normalize(centres, dim=1).reshape(num_classes, centers_per_class, -1)
    return torch.bmm(unit, unit.transpose(1, 2))


def sparse_centers_terms(sim: Tensor) -> Tensor:
    """The chord distance ``√(2 + δ − 2 s_ij)`` between the unit centres of every pair i < j of
    one class (SoftTriple's regulariser; δ, the dtype's smallest normal number, keeps the square
    root differentiable at coinciding centres). SoftTriple divides their sum by
    ``C K (K − 1)``, twice the number of pairs.

    Args:
        sim: (C, K, K) cosine similarities of each class's centres
            (:func:`same_class_center_similarities`).

    Returns:
        (C·K(K − 1)/2,) terms, class by class, each class's pairs in row-major order (PML's
        order: that of its (C·K, C·K) block-diagonal mask).
    """
    k = sim.shape[-1]
    first, second = torch.triu_indices(k, k, offset=1, device=sim.device)
    twice = (2.0 * sim[:, first, second]).clamp(max=2.0).flatten()
    return torch.sqrt(2.0 + torch.finfo(sim.dtype).tiny - twice)


__all__ = [
    "center_invariant_terms",
    "lp_norm_terms",
    "nearest_similarity_terms",
    "same_class_center_similarities",
    "sparse_centers_terms",
    "zero_mean_terms",
]
