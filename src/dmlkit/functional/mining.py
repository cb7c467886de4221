"""Mining rules on dense matrices: which pairs or triplets a loss should see.

The rules are written on a *similarity-like* matrix ``sim`` (larger means closer). Callers holding
distances pass ``-dist``; negation is exact in floating point, so the selected pairs are bit-for-bit
those of the mirrored distance rule. Mining never carries gradient: call these under
``torch.no_grad()`` (the miner modules do).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

NegativeRule = Literal["code", "figure"]


def _extreme_selected(
    sim: Tensor, selected: Tensor, largest: bool, buffer: Tensor | None = None
) -> Tensor:
    """(N, 1) row max (``largest``) or min of ``sim`` over the selected entries; ∓max float
    where a row selects nothing. Float arithmetic only (boolean masking is slow on CPU)."""
    big = torch.finfo(sim.dtype).max
    if sim.shape[1] == 0:  # no references: nothing is selected in any row
        return sim.new_full((sim.shape[0], 1), -big if largest else big)
    buffer = torch.sub(1.0, selected, out=buffer)
    buffer.mul_(-big if largest else big).add_(sim)
    return buffer.amax(1, keepdim=True) if largest else buffer.amin(1, keepdim=True)


def _select(
    pairs: Tensor, values: Tensor, threshold: Tensor, above: bool, buffer: Tensor | None = None
) -> Tensor:
    """0/1 float ``pairs · [values > threshold]`` (or ``<``), written into ``buffer``."""
    out = torch.empty_like(values) if buffer is None else buffer
    (torch.gt if above else torch.lt)(values, threshold, out=out)
    return out.mul_(pairs)


def asymmetric_mining_masks(
    sim: Tensor,
    pos: Tensor,
    neg: Tensor,
    gamma_pos: float,
    gamma_neg: float,
    negative_rule: NegativeRule = "code",
) -> tuple[Tensor, Tensor]:
    """ASMS (docs/ddtas.md §2), of which multi-similarity mining is the case γ_pos = γ_neg = ε:

    ``P*_i = {j ∈ P_i : S_ij − γ_pos < maxN_i}`` and ``N*_i = {j ∈ N_i : S_ij + γ_neg > minP_i}``,
    both strict. The ``"figure"`` negative rule is the framework figure's variant
    ``S_ij > minP_i + γ_neg``.

    Args:
        sim: (N, M) similarity-like matrix.
        pos: 0/1 (N, M) positive pairs (float, as ``label_weights`` gives, or bool).
        neg: 0/1 (N, M) negative pairs.
        gamma_pos: Positive tolerance.
        gamma_neg: Negative tolerance.
        negative_rule: ``"code"`` (the released code) or ``"figure"``.

    Returns:
        (keep_pos, keep_neg): 0/1 float (N, M) indicators.
    """
    if negative_rule not in ("code", "figure"):
        raise ValueError(f"negative_rule must be 'code' or 'figure', got {negative_rule!r}")
    pos, neg = pos.to(sim.dtype), neg.to(sim.dtype)
    buffer = torch.empty_like(sim)
    min_pos = _extreme_selected(sim, pos, largest=False, buffer=buffer)
    max_neg = _extreme_selected(sim, neg, largest=True, buffer=buffer)
    keep_pos = _select(pos, torch.sub(sim, gamma_pos, out=buffer), max_neg, above=False)
    shift = gamma_neg if negative_rule == "code" else -gamma_neg
    keep_neg = _select(neg, torch.add(sim, shift, out=buffer), min_pos, above=True, buffer=buffer)
    return keep_pos, keep_neg


@dataclass(frozen=True)
class AdaptiveTolerances:
    """The tolerances AT-ASMS chose for one batch (docs/ddtas.md §3).

    Attributes:
        gamma_pos: γ̂_pos used for re-mining.
        gamma_neg: γ̂_neg used for re-mining.
        ratio: r = n_neg / N_pos, or None when the batch has no positive pair.
        tau: τ = k·σ(r) when r > 1, else 0.
        num_mined_negatives: n_neg, counted over ordered (anchor, pair) entries.
        num_all_positives: N_pos, counted over ordered entries.
    """

    gamma_pos: float
    gamma_neg: float
    ratio: float | None
    tau: float
    num_mined_negatives: int
    num_all_positives: int


def adaptive_tolerances(
    sim: Tensor,
    pos: Tensor,
    neg: Tensor,
    gamma_pos: float,
    gamma_neg: float,
    count_tolerance: float,
    k: float = 0.5,
) -> AdaptiveTolerances:
    """AT-ASMS tolerance update; stateless, recomputed from scratch for every batch.

    Counts the negatives that symmetric mining at ``count_tolerance`` keeps (n_neg) and all
    positive pairs (N_pos); with r = n_neg / N_pos, when r > 1, τ = k·σ(r),
    γ̂_pos = γ_pos·(1 + τ) and γ̂_neg = γ_neg·(1 − τ); otherwise the static tolerances.

    Args:
        sim: (N, M) similarity-like matrix.
        pos: 0/1 (N, M) positive pairs (all of them, before mining).
        neg: 0/1 (N, M) negative pairs.
        gamma_pos: Static positive tolerance.
        gamma_neg: Static negative tolerance.
        count_tolerance: ε of the counting pass.
        k: Scale of the update.

    Returns:
        The tolerances and the counts behind them.
    """
    pos, neg = pos.to(sim.dtype), neg.to(sim.dtype)
    buffer = torch.empty_like(sim)
    min_pos = _extreme_selected(sim, pos, largest=False, buffer=buffer)
    shifted = torch.add(sim, count_tolerance, out=buffer)
    n_neg = int(_select(neg, shifted, min_pos, above=True, buffer=buffer).sum())
    n_pos = int(pos.sum())
    ratio = n_neg / n_pos if n_pos else None
    g_pos, g_neg, tau = tolerances_from_ratio(ratio, gamma_pos, gamma_neg, k)
    return AdaptiveTolerances(g_pos, g_neg, ratio, tau, n_neg, n_pos)


def tolerances_from_ratio(
    ratio: float | None, gamma_pos: float, gamma_neg: float, k: float = 0.5
) -> tuple[float, float, float]:
    """AT-ASMS's update rule: (γ̂_pos, γ̂_neg, τ) for the ratio r (docs/ddtas.md §3 table).

    Strictly r > 1 adapts, with τ = k·σ(r); r ≤ 1, or no ratio at all (no positive pair),
    keeps the static tolerances.
    """
    if ratio is None or not ratio > 1:
        return gamma_pos, gamma_neg, 0.0
    tau = k / (1.0 + math.exp(-ratio))
    return gamma_pos * (1.0 + tau), gamma_neg * (1.0 - tau), tau


def batch_hard_triplets(sim: Tensor, pos: Tensor, neg: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """One triplet per anchor: its least similar positive and most similar negative.

    Anchors lacking a positive or a negative are dropped.

    Args:
        sim: (N, M) similarity-like matrix.
        pos: 0/1 (N, M) positive pairs.
        neg: 0/1 (N, M) negative pairs.

    Returns:
        (a, p, n) index tensors.
    """
    pos, neg = pos.to(sim.dtype), neg.to(sim.dtype)
    if sim.shape[1] == 0:
        empty = torch.empty(0, dtype=torch.long, device=sim.device)
        return empty, empty.clone(), empty.clone()
    big = torch.finfo(sim.dtype).max
    p = torch.sub(1.0, pos).mul_(big).add_(sim).min(1).indices
    n = torch.sub(1.0, neg).mul_(-big).add_(sim).max(1).indices
    anchors = torch.nonzero(pos.amax(1) * neg.amax(1)).squeeze(1)
    return anchors, p[anchors], n[anchors]


def pairs_from_masks(keep_pos: Tensor, keep_neg: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(a1, p, a2, n) index tensors of the selected (non-zero) positive and negative pairs."""
    a1, p = keep_pos.nonzero(as_tuple=True)
    a2, n = keep_neg.nonzero(as_tuple=True)
    return a1, p, a2, n
