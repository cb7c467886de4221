"""Retrieval metrics of each query from its ranked neighbour list: pure functions on tensors.

Notation, for one query: its neighbours are ranked 1, 2, … (nearest first, self excluded);
``c_i`` is 1 when the neighbour at rank i shares the query's label, else 0; ``R`` is the number of
references that share the query's label (the query itself not counted); ``P(i) = (c_1 + … + c_i)
/ i`` is the precision at rank i. Every function takes ``correct``, the (B, k) matrix of ``c_i``
for a block of B queries over their first k ranks, and returns one float64 value per query.
Definitions follow pytorch-metric-learning's ``AccuracyCalculator`` (2.9.0) and, for Recall@K,
the DDTAS authors' evaluation code: a query is a hit at K when fewer than K other-label
references score strictly above its best same-label reference, so ties count in its favour.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def _ranks(correct: Tensor) -> Tensor:
    return torch.arange(1, correct.shape[1] + 1, device=correct.device, dtype=torch.float64)


def precision_at_k(correct: Tensor, k: int) -> Tensor:
    """Precision at k: ``(c_1 + … + c_k) / k``.

    Args:
        correct: (B, ≥k) 0/1 relevance of the ranked neighbours.
        k: Cut-off rank.

    Returns:
        (B,) float64 values.
    """
    return correct[:, :k].sum(1, dtype=torch.float64) / k


def r_precision(correct: Tensor, num_relevant: Tensor) -> Tensor:
    """R-Precision: ``(c_1 + … + c_R) / R``.

    When the lists are shorter than R (PML's ``k`` below the largest class), both sums stop at
    the list length m: ``(c_1 + … + c_m) / m``, which is what PML returns.

    Args:
        correct: (B, k) 0/1 relevance of the ranked neighbours.
        num_relevant: (B,) R of each query, at least 1.

    Returns:
        (B,) float64 values.
    """
    depth = num_relevant.clamp_max(correct.shape[1])
    within = _ranks(correct) <= depth[:, None]
    return (correct * within).sum(1, dtype=torch.float64) / depth


def _precisions(correct: Tensor) -> Tensor:
    """``P(i) · c_i`` for every rank i."""
    as_float = correct.to(torch.float64)
    return as_float.cumsum(1).mul_(as_float).div_(_ranks(correct))


def mean_average_precision_at_r(correct: Tensor, num_relevant: Tensor) -> Tensor:
    """MAP@R of each query: ``(1/R) · Σ_{i ≤ R} P(i) · c_i``.

    Lists shorter than R sum over the ranks they have and still divide by R, as PML does.

    Args:
        correct: (B, k) 0/1 relevance of the ranked neighbours.
        num_relevant: (B,) R of each query, at least 1.

    Returns:
        (B,) float64 values.
    """
    within = _ranks(correct) <= num_relevant[:, None]
    return (_precisions(correct) * within).sum(1) / num_relevant


def average_precision_at_k(correct: Tensor, num_relevant: Tensor, k: int) -> Tensor:
    """Average precision at k (PML's ``mean_average_precision``): ``(1/R) · Σ_{i ≤ k} P(i) · c_i``.

    Divided by R, not by min(k, R), so it is below 1 whenever k < R; with k at least the largest
    rank of a relevant item it is the full average precision.

    Args:
        correct: (B, ≥k) 0/1 relevance of the ranked neighbours.
        num_relevant: (B,) R of each query, at least 1.
        k: Cut-off rank.

    Returns:
        (B,) float64 values.
    """
    return _precisions(correct[:, :k]).sum(1) / num_relevant


def reciprocal_rank(correct: Tensor, k: int) -> Tensor:
    """Reciprocal rank within k: ``1 / min{i ≤ k : c_i = 1}``, or 0 when no c_i is 1.

    Args:
        correct: (B, ≥k) 0/1 relevance of the ranked neighbours.
        k: Cut-off rank.

    Returns:
        (B,) float64 values.
    """
    head = correct[:, :k].to(torch.float64)
    first = torch.argmax(head, dim=1).to(torch.float64) + 1.0
    return torch.where(head.amax(1) > 0, 1.0 / first, 0.0)


def count_above_best_positive(
    scores: Tensor, correct: Tensor, best_positive: Tensor | None
) -> Tensor:
    """Per query, ``c``: how many other-label references score strictly above ``s⁺``.

    ``s⁺`` is the query's best score to a same-label reference. ``c`` is read off the list: when
    ``s⁺`` is at least the list's last score, every reference scoring above ``s⁺`` is listed;
    otherwise every listed score exceeds ``s⁺``, and the returned k (the list length) means
    "at least k".

    Args:
        scores: (B, k) neighbour scores, higher nearer, in list order.
        correct: (B, k) 0/1 relevance of the ranked neighbours.
        best_positive: (B,) ``s⁺`` where the search tracked it (exact when ≥ ``scores[:, -1]``);
            None to take it from the first relevant item in the list.

    Returns:
        (B,) int64 counts, capped at k.
    """
    if best_positive is None:
        has_positive = correct.any(1)
        first = torch.argmax(correct.to(torch.uint8), dim=1, keepdim=True)
        best_positive = torch.where(has_positive, scores.gather(1, first).squeeze(1), -torch.inf)
    return (scores > best_positive[:, None]).sum(1)


def recall_at_k(above: Tensor, ks: Sequence[int]) -> Tensor:
    """Recall@K as DML papers compute it, with ties in the query's favour.

    With ``s⁺`` the query's best score to any same-label reference and ``c`` the number of
    other-label references scoring strictly above ``s⁺``, the query is a hit at K when
    ``c < K``. Without ties this is "a same-label item among the K nearest".

    Args:
        above: (B,) ``c`` of each query (:func:`count_above_best_positive`, exact below each K).
        ks: The cut-offs K.

    Returns:
        (B, len(ks)) float64 0/1 hits.
    """
    cutoffs = torch.as_tensor(list(ks), device=above.device)
    return (above[:, None] < cutoffs).to(torch.float64)
