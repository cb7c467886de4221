"""Verification: deciding "same class or not" by a similarity threshold, with known error rates.

A pair is accepted when its score is at least the threshold. With the genuine pairs (same class)
and the impostor pairs (different classes):

- TPR (true positive rate) = accepted genuine / genuine; FNMR (false non-match rate) = 1 − TPR;
- FPR (false positive rate) = FMR (false match rate) = accepted impostors / impostors;
- precision = accepted genuine / accepted.

The curves list every distinct score as a threshold, highest first, as scikit-learn's
``roc_curve(drop_intermediate=False)`` does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..validation import check_embeddings, check_labels

DEFAULT_FMRS = (1e-2, 1e-3)


@dataclass(frozen=True)
class Curves:
    """Error rates at every distinct threshold, highest threshold first.

    Attributes:
        thresholds: (T,) descending scores; a pair is accepted at ``score >= threshold``.
        tpr: (T,) true positive rate at each threshold.
        fpr: (T,) false positive (false match) rate.
        precision: (T,) precision (1 where nothing is accepted).
        genuine_pairs: How many pairs are genuine.
        impostor_pairs: How many are impostors.
    """

    thresholds: Tensor
    tpr: Tensor
    fpr: Tensor
    precision: Tensor
    genuine_pairs: int
    impostor_pairs: int

    def tpr_at_fpr(self, fpr: float) -> float:
        """The highest TPR of a threshold whose FPR (FMR) is at most ``fpr`` (0 if none is)."""
        allowed = self.fpr <= fpr
        return float(self.tpr[allowed].max()) if bool(allowed.any()) else 0.0

    def best_f1(self) -> tuple[float, float]:
        """(threshold, F1) of the threshold with the best F1 score."""
        f1 = 2 * self.precision * self.tpr / (self.precision + self.tpr).clamp_min(1e-300)
        best = int(torch.argmax(f1))
        return float(self.thresholds[best]), float(f1[best])

    def threshold(
        self, *, target_fmr: float | None = None, target_precision: float | None = None
    ) -> float:
        """The lowest threshold (most pairs accepted) meeting the target; see :func:`calibrate`."""
        if (target_fmr is None) == (target_precision is None):
            raise ValueError("give exactly one of target_fmr and target_precision")
        target = target_fmr if target_fmr is not None else target_precision
        assert target is not None
        if not 0 <= target <= 1:
            raise ValueError(f"the target must be in [0, 1], got {target}")
        meets = self.fpr <= target if target_fmr is not None else self.precision >= target
        if not bool(meets.any()):
            return math.inf
        # Thresholds descend: the last one meeting the target accepts the most pairs.
        return float(self.thresholds[torch.nonzero(meets).max()])

    def summary(self, fmrs: tuple[float, ...] = DEFAULT_FMRS) -> dict[str, float]:
        """The numbers a report shows; see :func:`summary`."""
        threshold, f1 = self.best_f1()
        out = {
            "genuine_pairs": float(self.genuine_pairs),
            "impostor_pairs": float(self.impostor_pairs),
            "best_f1": f1,
            "best_f1_threshold": threshold,
        }
        for fmr in fmrs:
            out[f"fnmr_at_fmr_{fmr:g}"] = 1.0 - self.tpr_at_fpr(fmr)
            out[f"threshold_at_fmr_{fmr:g}"] = self.threshold(target_fmr=fmr)
        return out


def _checked_pairs(scores: object, same: object) -> tuple[Tensor, Tensor]:
    if not isinstance(scores, Tensor) or not isinstance(same, Tensor):
        raise TypeError("scores and same must be tensors")
    if scores.ndim != 1 or same.shape != scores.shape:
        raise ValueError(
            f"scores and same must be 1-D of one length, got {tuple(scores.shape)} and "
            f"{tuple(same.shape)}"
        )
    if not scores.is_floating_point() or not bool(torch.isfinite(scores).all()):
        raise ValueError("scores must be finite floating-point values")
    same = same.bool()
    if not bool(same.any()) or bool(same.all()):
        raise ValueError("verification needs both genuine (same) and impostor (different) pairs")
    return scores.double(), same


def curves(scores: Tensor, same: Tensor) -> Curves:
    """TPR, FPR and precision at every distinct threshold.

    Args:
        scores: (P,) similarity of each pair (higher: more alike).
        same: (P,) bool: the pair is genuine.
    """
    scores, same = _checked_pairs(scores, same)
    order = torch.argsort(scores, descending=True, stable=True)
    ranked, genuine = scores[order], same[order].double()
    accepted_genuine = torch.cumsum(genuine, 0)
    accepted = torch.arange(1, len(ranked) + 1, dtype=torch.float64)
    # The last of each run of equal scores: a threshold accepts the whole run.
    last = torch.ones_like(ranked, dtype=torch.bool)
    last[:-1] = ranked[1:] != ranked[:-1]
    tp, n = accepted_genuine[last], accepted[last]
    positives, negatives = genuine.sum(), len(genuine) - genuine.sum()
    return Curves(
        thresholds=ranked[last],
        tpr=tp / positives,
        fpr=(n - tp) / negatives,
        precision=tp / n,
        genuine_pairs=int(positives),
        impostor_pairs=int(negatives),
    )


def tpr_at_fpr(scores: Tensor, same: Tensor, fpr: float) -> float:
    """The highest TPR of a threshold whose FPR (FMR) is at most ``fpr`` (0 if none is)."""
    return curves(scores, same).tpr_at_fpr(fpr)


def fnmr_at_fmr(scores: Tensor, same: Tensor, fmr: float) -> float:
    """FNMR at FMR ≤ ``fmr``: 1 − :func:`tpr_at_fpr`."""
    return 1.0 - tpr_at_fpr(scores, same, fmr)


def best_f1(scores: Tensor, same: Tensor) -> tuple[float, float]:
    """(threshold, F1) of the threshold with the best F1 score."""
    return curves(scores, same).best_f1()


def calibrate(
    scores: Tensor,
    same: Tensor,
    *,
    target_fmr: float | None = None,
    target_precision: float | None = None,
) -> float:
    """The lowest threshold (most pairs accepted) that meets the target on these pairs.

    Args:
        scores: (P,) calibration pair scores.
        same: (P,) bool: genuine pairs.
        target_fmr: The largest false match rate allowed.
        target_precision: The smallest precision allowed.

    Returns:
        The threshold; ``inf`` when no threshold meets the target (accept nothing).

    Raises:
        ValueError: Unless exactly one target in [0, 1] is given.
    """
    return curves(scores, same).threshold(target_fmr=target_fmr, target_precision=target_precision)


def summary(
    scores: Tensor, same: Tensor, fmrs: tuple[float, ...] = DEFAULT_FMRS
) -> dict[str, float]:
    """The verification numbers a report shows: FNMR at each FMR and the threshold that
    reaches it, the best F1 and its threshold, and the pair counts.

    Args:
        scores: (P,) pair scores.
        same: (P,) bool: genuine pairs.
        fmrs: The false match rates to report.
    """
    return curves(scores, same).summary(fmrs)


def pair_scores(a: Tensor, b: Tensor, metric: str = "cosine") -> Tensor:
    """Row-wise scores of the pairs (a[i], b[i]), higher is more alike.

    Args:
        a: (P, D) embeddings.
        b: (P, D) embeddings.
        metric: ``"cosine"`` similarity, ``"euclidean"`` (minus the distance) or ``"dot"``.

    Returns:
        (P,) float32 scores.
    """
    a, b = check_embeddings(a, "a").float(), check_embeddings(b, "b").float()
    if a.shape != b.shape:
        raise ValueError(f"a and b must have one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if metric == "cosine":
        return (F.normalize(a, dim=1) * F.normalize(b, dim=1)).sum(1)
    if metric == "euclidean":
        return -(a - b).norm(dim=1)
    if metric == "dot":
        return (a * b).sum(1)
    raise ValueError(f"metric must be 'cosine', 'euclidean' or 'dot', got {metric!r}")


def match(a: Tensor, b: Tensor, threshold: float, metric: str = "cosine") -> Tensor:
    """(P,) bool: whether each pair (a[i], b[i]) is the same class at ``threshold``.

    Args:
        a: (P, D) embeddings.
        b: (P, D) embeddings.
        threshold: Accept pairs scoring at least this, e.g. from :func:`calibrate`.
        metric: As :func:`pair_scores`.
    """
    if (
        isinstance(threshold, bool)
        or not isinstance(threshold, int | float)
        or math.isnan(threshold)
    ):
        raise ValueError(f"threshold must be a number, got {threshold!r}")
    return pair_scores(a, b, metric) >= threshold


MAX_PAIRS = 20_000_000
"""The most item pairs :func:`item_pairs` forms; larger sets are sampled. Forming the pairs and
their :func:`summary` peak at about 90 bytes per pair (N×N score and mask matrices, then the
sorted float64 curves): about 1.8 GB at this default."""


def pairs_description(n: int, max_pairs: int = MAX_PAIRS) -> str:
    """Which items :func:`item_pairs` pairs, in words ("the 100 items", or a random subset)."""
    kept = items_for_pairs(n, max_pairs)
    if kept == n:
        return f"the {n} items"
    return f"a random {kept} of the {n} items (at most {max_pairs:,} pairs)"


def items_for_pairs(n: int, max_pairs: int = MAX_PAIRS) -> int:
    """How many of ``n`` items :func:`item_pairs` keeps: all, or as many as give at most
    ``max_pairs`` pairs."""
    if n * (n - 1) // 2 <= max_pairs:
        return n
    return int((1 + math.isqrt(1 + 8 * max_pairs)) // 2)


def item_pairs(
    embeddings: Tensor,
    labels: Tensor,
    metric: str = "cosine",
    max_pairs: int = MAX_PAIRS,
    seed: int = 0,
) -> tuple[Tensor, Tensor]:
    """Every pair of distinct items of a labelled set: (scores, same); above ``max_pairs`` pairs,
    every pair of a seeded random subset of :func:`items_for_pairs` items.

    Args:
        embeddings: (N, D) embeddings.
        labels: (N,) integer labels.
        metric: ``"cosine"`` similarity or ``"euclidean"`` (scored as minus the distance).
        max_pairs: The most pairs formed.
        seed: Seeds the subset.
    """
    emb = check_embeddings(embeddings).float()
    labels = check_labels(labels, emb.shape[0], emb.device)
    if metric not in ("cosine", "euclidean"):
        raise ValueError(f"metric must be 'cosine' or 'euclidean', got {metric!r}")
    kept = items_for_pairs(len(emb), max_pairs)
    if kept < len(emb):
        generator = torch.Generator().manual_seed(seed)
        chosen = torch.randperm(len(emb), generator=generator)[:kept].sort().values
        emb, labels = emb[chosen.to(emb.device)], labels[chosen.to(labels.device)]
    if metric == "cosine":
        unit = F.normalize(emb, dim=1)
        matrix = unit @ unit.T
    else:
        matrix = -torch.cdist(emb, emb)
    keep = torch.ones_like(matrix, dtype=torch.bool).triu_(diagonal=1)
    same = labels[:, None] == labels[None, :]
    return matrix[keep], same[keep]


__all__ = [
    "Curves",
    "best_f1",
    "calibrate",
    "curves",
    "fnmr_at_fmr",
    "item_pairs",
    "items_for_pairs",
    "match",
    "pair_scores",
    "pairs_description",
    "summary",
    "tpr_at_fpr",
]
