"""Offline (whole-set) mining: the nearest classes by centroid, and hard or semi-hard triplets
over a whole embedded training set, in blocks of anchors so no N × N matrix is formed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from ..validation import check_embeddings, check_labels

TripletKind = Literal["hard", "semihard"]


def nearest_classes(embeddings: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Every class's other classes, nearest centroid first (cosine similarity of the centroids
    of the L2-normalised embeddings; equal similarities: lower class first).

    Args:
        embeddings: (N, D) embeddings of the whole set.
        labels: (N,) integer labels.

    Returns:
        (classes, order): the (C,) sorted class labels, and (C, C − 1) positions into
        ``classes`` of each class's other classes, nearest first.
    """
    emb = F.normalize(check_embeddings(embeddings).float(), dim=1)
    labels = check_labels(labels, emb.shape[0], emb.device)
    classes, inverse = torch.unique(labels, return_inverse=True)
    if len(classes) < 2:
        raise ValueError(f"nearest classes need at least 2 classes, got {len(classes)}")
    sums = torch.zeros(len(classes), emb.shape[1], device=emb.device).index_add_(0, inverse, emb)
    centroids = F.normalize(sums, dim=1)
    similarity = (centroids @ centroids.T).double()
    similarity.fill_diagonal_(-torch.inf)
    # A stable sort of −similarity: ties keep class order.
    order = torch.sort(-similarity, dim=1, stable=True).indices[:, :-1]
    return classes, order


@dataclass(frozen=True)
class OfflineTriplets:
    """Triplets mined over a whole set.

    Attributes:
        triplets: (T, 3) int64 item indices (anchor, positive, negative).
        margins: (T,) t = d(a, n) − d(a, p) of each triplet (Euclidean distances of the
            L2-normalised embeddings).
        anchors_without: Anchors none of whose drawn positives had a qualifying negative.
    """

    triplets: Tensor
    margins: Tensor
    anchors_without: int


def mine_offline_triplets(
    embeddings: Tensor,
    labels: Tensor,
    kind: TripletKind = "semihard",
    margin: float = 0.1,
    *,
    per_anchor: int = 1,
    seed: int = 0,
    block_size: int = 256,
) -> OfflineTriplets:
    """Hard or semi-hard triplets over a whole set, up to ``per_anchor`` per anchor.

    With t = d(a, n) − d(a, p) on the L2-normalised embeddings (PML's ``TripletMarginMiner``
    definitions): ``hard`` t ≤ 0, ``semihard`` 0 < t ≤ ``margin``. For each of ``per_anchor``
    draws, an anchor takes a random positive of its class and a random negative qualifying
    against it (none when no negative qualifies). Anchors are processed in blocks of
    ``block_size``: memory is about 14 bytes × ``block_size`` × N, never N × N. The draws depend
    on ``seed`` and ``block_size``.

    Args:
        embeddings: (N, D) embeddings.
        labels: (N,) integer labels.
        kind: ``hard`` or ``semihard``.
        margin: The semi-hard margin.
        per_anchor: Draws per anchor.
        seed: Seeds the random positives and negatives.
        block_size: Anchors per block.

    Returns:
        The triplets, their margins and the count of anchors without one.
    """
    if kind not in ("hard", "semihard"):
        raise ValueError(f"kind must be 'hard' or 'semihard', got {kind!r}")
    if per_anchor < 1 or block_size < 1:
        raise ValueError(
            f"per_anchor and block_size must be positive, got {per_anchor} and {block_size}"
        )
    if not margin > 0:
        raise ValueError(f"margin must be positive, got {margin}")
    emb = F.normalize(check_embeddings(embeddings).float(), dim=1)
    labels = check_labels(labels, emb.shape[0], emb.device)
    n = emb.shape[0]
    generator = torch.Generator().manual_seed(seed)
    found: list[Tensor] = []
    margins: list[Tensor] = []
    without = 0
    for start in range(0, n, block_size):
        rows = torch.arange(start, min(start + block_size, n), device=emb.device)
        local = torch.arange(len(rows), device=emb.device)
        distance = torch.cdist(emb[rows], emb)  # (b, N)
        same = labels[rows, None] == labels[None, :]
        same[local, rows] = False
        negative = ~same
        negative[local, rows] = False
        has_positive = same.any(1)
        got_one = torch.zeros(len(rows), dtype=torch.bool, device=emb.device)
        for _ in range(per_anchor):
            # Random choices as the largest of uniform keys over the allowed entries.
            keys = torch.rand(distance.shape, generator=generator).to(emb.device)
            positive = torch.where(same, keys, -1.0).argmax(1)
            t = distance - distance.gather(1, positive[:, None])
            qualifies = negative & ((t <= 0) if kind == "hard" else (t > 0) & (t <= margin))
            qualifies &= has_positive[:, None]
            keep = qualifies.any(1)
            keys = torch.rand(distance.shape, generator=generator).to(emb.device)
            chosen = torch.where(qualifies, keys, -1.0).argmax(1)
            got_one |= keep
            found.append(torch.stack([rows, positive, chosen], dim=1)[keep])
            margins.append(t.gather(1, chosen[:, None])[:, 0][keep])
        without += int((~got_one).sum())
    triplets = torch.cat(found).long().cpu() if found else torch.zeros(0, 3, dtype=torch.long)
    values = torch.cat(margins).cpu() if margins else torch.zeros(0)
    return OfflineTriplets(triplets, values, without)


__all__ = ["OfflineTriplets", "TripletKind", "mine_offline_triplets", "nearest_classes"]
