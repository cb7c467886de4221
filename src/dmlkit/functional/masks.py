"""Label masks and conversions between index tuples and dense pair weights.

Internally dmlkit works on dense (N, M) matrices: a pair (i, j) is selected by a mask or weighted
by how many times it occurs in a mined tuple. Index tuples in PML's formats, triplets (a, p, n)
and pairs (a1, p, a2, n), are converted at the boundary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..validation import IndicesTuple


def label_masks(labels: Tensor, ref_labels: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Positive and negative pair masks.

    Args:
        labels: (N,) labels of the anchors.
        ref_labels: (M,) labels of a separate reference set. When None the reference set is the
            batch itself and each item's pair with itself is excluded by index (the diagonal),
            never by value.

    Returns:
        (pos, neg): boolean (N, M) masks; ``pos[i, j]`` when the labels match (and j ≠ i for a
        batch against itself), ``neg[i, j]`` when they differ.
    """
    ref = labels if ref_labels is None else ref_labels
    same = labels[:, None] == ref[None, :]
    neg = ~same
    if ref_labels is None:
        same.fill_diagonal_(False)
    return same, neg


@dataclass(frozen=True)
class PairWeights:
    """Which (anchor, reference) pairs a loss uses, as dense (N, M) weights.

    Attributes:
        pos: Positive pairs: a bool mask, or float counts when a mined tuple repeats pairs.
        neg: Negative pairs, in the same form.
    """

    pos: Tensor
    neg: Tensor

    def pos_mask(self) -> Tensor:
        return self.pos if self.pos.dtype == torch.bool else self.pos > 0

    def neg_mask(self) -> Tensor:
        return self.neg if self.neg.dtype == torch.bool else self.neg > 0


def _counts(rows: Tensor, cols: Tensor, shape: tuple[int, int], device: torch.device) -> Tensor:
    counts = torch.zeros(shape, device=device)
    if rows.numel():
        counts.index_put_((rows, cols), torch.ones_like(rows, dtype=counts.dtype), accumulate=True)
    return counts


def tuple_to_pair_weights(
    indices_tuple: IndicesTuple, shape: tuple[int, int], device: torch.device
) -> PairWeights:
    """Converts a mined tuple into dense pair counts.

    Triplets (a, p, n) become the pairs (a, p) and (a, n), one of each per triplet, as PML does.

    Args:
        indices_tuple: (a, p, n) or (a1, p, a2, n).
        shape: (N, M): number of anchors and of references.
        device: Device of the result.

    Returns:
        Float counts of each positive and negative pair.
    """
    if len(indices_tuple) == 3:
        a, p, n = indices_tuple
        a1, a2 = a, a
    else:
        a1, p, a2, n = indices_tuple
    return PairWeights(_counts(a1, p, shape, device), _counts(a2, n, shape, device))


def batch_pair_weights(
    labels: Tensor | None,
    ref_labels: Tensor | None,
    indices_tuple: IndicesTuple | None,
    shape: tuple[int, int],
    device: torch.device,
) -> PairWeights:
    """The pairs a pair-based loss uses: the mined ones if given, else every labelled pair."""
    if indices_tuple is not None:
        return tuple_to_pair_weights(indices_tuple, shape, device)
    if labels is None:
        raise ValueError("labels are required when no indices_tuple is given")
    pos, neg = label_masks(labels, ref_labels)
    return PairWeights(pos, neg)


def first_pair_per_label(anchors: Tensor, positives: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Keeps, for each anchor label, the first (anchor, positive) pair in the given order.

    Args:
        anchors: (P,) anchor indices in the order given.
        positives: (P,) positive indices.
        labels: Labels of the anchors' set.

    Returns:
        (anchors, positives) restricted to one pair per distinct anchor label, ordered by label.
    """
    if anchors.numel() == 0:
        return anchors, positives
    _, group = torch.unique(labels[anchors], return_inverse=True)
    order = torch.arange(anchors.numel(), device=anchors.device)
    first = torch.full((int(group.max()) + 1,), anchors.numel(), device=anchors.device)
    first = first.scatter_reduce(0, group, order, reduce="amin")
    return anchors[first], positives[first]
