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


def label_weights(
    labels: Tensor, ref_labels: Tensor | None = None, dtype: torch.dtype = torch.float32
) -> tuple[Tensor, Tensor]:
    """``label_masks`` as 0/1 floating-point weights (the form the loss kernels use: float
    arithmetic is several times faster than boolean masking on CPU).

    Args:
        labels: (N,) labels of the anchors.
        ref_labels: (M,) labels of a separate reference set, or None (self-pairs excluded).
        dtype: Floating dtype of the result.

    Returns:
        (pos, neg) float (N, M) weights.
    """
    ref = labels if ref_labels is None else ref_labels
    pos = torch.empty(labels.shape[0], ref.shape[0], dtype=dtype, device=labels.device)
    query, key = _comparable(labels, ref)
    torch.eq(query[:, None], key[None, :], out=pos)
    neg = torch.ne(query[:, None], key[None, :], out=torch.empty_like(pos))
    if ref_labels is None:
        pos.fill_diagonal_(0.0)
    return pos, neg


def _comparable(labels: Tensor, ref_labels: Tensor) -> tuple[Tensor, Tensor]:
    """The labels in the fastest dtype that compares them exactly: float32 below 2^24, float64
    below 2^53, else the integers themselves (integer broadcasting comparisons are ~15× slower
    than float ones on CPU)."""
    both = labels if ref_labels is labels else torch.cat([labels, ref_labels])
    largest = int(both.abs().max()) if both.numel() else 0
    for dtype, exact in ((torch.float32, 2**24), (torch.float64, 2**53)):
        if largest < exact:
            return labels.to(dtype), ref_labels.to(dtype)
    return labels, ref_labels


@dataclass(frozen=True)
class PairWeights:
    """Which (anchor, reference) pairs a loss uses, as dense (N, M) float weights.

    Attributes:
        pos: Positive pairs: 0/1, or counts when a mined tuple repeats pairs.
        neg: Negative pairs, in the same form.
        binary: Whether both hold only 0 and 1 (no repeats).
    """

    pos: Tensor
    neg: Tensor
    binary: bool = False

    def pos_indicator(self) -> Tensor:
        """0/1 weights of the positive pairs, repeats counted once."""
        return self.pos if self.binary else self.pos.clamp_max(1.0)

    def neg_indicator(self) -> Tensor:
        """0/1 weights of the negative pairs, repeats counted once."""
        return self.neg if self.binary else self.neg.clamp_max(1.0)


@dataclass(frozen=True)
class PairIndices:
    """Mined pairs as index lists (repeats allowed, each counted), for per-pair losses whose
    cost should scale with the number of mined pairs rather than with N × M.

    Attributes:
        a1: Anchor of each positive pair.
        p: Reference index of each positive pair.
        a2: Anchor of each negative pair.
        n: Reference index of each negative pair.
    """

    a1: Tensor
    p: Tensor
    a2: Tensor
    n: Tensor

    def gather(self, mat: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Both sides' entries of ``mat`` in one gather, with 0/1 indicators of each side.

        Returns:
            (values, is_pos, is_neg): the positive pairs' entries followed by the negative
            pairs', and float indicators of which are which.
        """
        values = mat[torch.cat([self.a1, self.a2]), torch.cat([self.p, self.n])]
        is_pos = torch.zeros_like(values.detach())
        is_pos[: self.a1.numel()] = 1.0
        return values, is_pos, 1.0 - is_pos

    @classmethod
    def from_tuple(cls, indices_tuple: IndicesTuple) -> PairIndices:
        """Pairs of a mined tuple; triplets (a, p, n) give (a, p) and (a, n), as in PML."""
        if len(indices_tuple) == 3:
            a, p, n = indices_tuple
            return cls(a, p, a, n)
        return cls(*indices_tuple)


def _counts(
    rows: Tensor,
    cols: Tensor,
    shape: tuple[int, int],
    device: torch.device,
    dtype: torch.dtype,
    binary: bool,
) -> Tensor:
    counts = torch.zeros(shape, device=device, dtype=dtype)
    if rows.numel():
        ones = torch.ones_like(rows, dtype=counts.dtype)
        counts.index_put_((rows, cols), ones, accumulate=not binary)
    return counts


def tuple_to_pair_weights(
    indices_tuple: IndicesTuple,
    shape: tuple[int, int],
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    binary: bool = False,
) -> PairWeights:
    """Converts a mined tuple into dense pair counts (or 0/1 indicators).

    Triplets (a, p, n) become the pairs (a, p) and (a, n), one of each per triplet, as PML does.

    Args:
        indices_tuple: (a, p, n) or (a1, p, a2, n).
        shape: (N, M): number of anchors and of references.
        device: Device of the result.
        dtype: Floating dtype of the result.
        binary: Count repeated pairs once.

    Returns:
        Counts (or indicators) of each positive and negative pair.
    """
    pairs = PairIndices.from_tuple(indices_tuple)
    return PairWeights(
        _counts(pairs.a1, pairs.p, shape, device, dtype, binary),
        _counts(pairs.a2, pairs.n, shape, device, dtype, binary),
        binary,
    )


def batch_pair_weights(
    labels: Tensor | None,
    ref_labels: Tensor | None,
    indices_tuple: IndicesTuple | None,
    shape: tuple[int, int],
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    binary: bool = False,
) -> PairWeights:
    """The pairs a pair-based loss uses: the mined ones if given, else every labelled pair.

    ``binary`` counts repeated mined pairs once (for losses over pair sets per anchor).
    """
    if indices_tuple is not None:
        return tuple_to_pair_weights(indices_tuple, shape, device, dtype, binary)
    if labels is None:
        raise ValueError("labels are required when no indices_tuple is given")
    return PairWeights(*label_weights(labels, ref_labels, dtype), binary=True)


def first_pair_per_label(
    anchors: Tensor, positives: Tensor, labels: Tensor
) -> tuple[Tensor, Tensor]:
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


def first_two_per_label(labels: Tensor) -> tuple[Tensor, Tensor]:
    """For each label with at least two items, its first item and its second (index order),
    ordered by label: the pair PML's N-pairs loss takes from a batch, without an N × N mask.

    Args:
        labels: (N,) labels.

    Returns:
        (anchors, positives) index tensors.
    """
    order = torch.argsort(labels, stable=True)
    sorted_labels = labels[order]
    starts = torch.ones_like(sorted_labels, dtype=torch.bool)
    starts[1:] = sorted_labels[1:] != sorted_labels[:-1]
    first = torch.nonzero(starts).squeeze(1)
    has_second = first + 1 < labels.numel()
    has_second[has_second.clone()] = ~starts[first[has_second] + 1]
    first = first[has_second]
    return order[first], order[first + 1]
