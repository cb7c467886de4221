"""Label masks, and the two forms in which a loss receives its (anchor, reference) pairs.

Index tuples in PML's formats, triplets (a, p, n) and pairs (a1, p, a2, n), are converted at the
boundary into one of two types, kept apart on purpose:

* :class:`PairWeights`: dense (N, M) weights, 0/1 or counts of repeats. Formulas over each
  anchor's whole row (log-sum-exps, per-anchor means, the fused elementwise kernels) run on it
  in a few passes over the matrix with no index arithmetic: the fast path when all or most
  pairs count, which is every call without a miner.
* :class:`PairIndices`: one flat list of K pairs, positives first. Per-pair formulas whose cost
  should scale with the mined pairs (K ≪ N·M), and DDTAS's Online Threshold Generator (one
  variable per mined pair), use it.

One type for both would cost either an N × M scatter and N × M work for every mined list, or
two 8-byte indices per pair (and gathers and scatters) for every labelled pair.

Losses over items rather than pairs (the classification, proxy and ranking losses) take a mined
tuple as per-item weights instead (:func:`tuple_element_weights`, PML's rule).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

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
    labels: Tensor,
    ref_labels: Tensor | None = None,
    dtype: torch.dtype = torch.float32,
    anchor_in_ref: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """``label_masks`` as 0/1 floating-point weights (the form the loss kernels use: float
    arithmetic is several times faster than boolean masking on CPU).

    Args:
        labels: (N,) labels of the anchors.
        ref_labels: (M,) labels of a separate reference set, or None (self-pairs excluded).
        dtype: Floating dtype of the result.
        anchor_in_ref: (N,) row of the reference set holding each anchor itself, or −1: those
            (anchor, itself) pairs are excluded from both sides, as the diagonal is for a
            batch against itself.

    Returns:
        (pos, neg) float (N, M) weights.
    """
    ref = labels if ref_labels is None else ref_labels
    pos = torch.empty(labels.shape[0], ref.shape[0], dtype=dtype, device=labels.device)
    query, key = _comparable(labels, ref)
    torch.eq(query[:, None], key[None, :], out=pos)
    neg = torch.ne(query[:, None], key[None, :], out=torch.empty_like(pos))
    exclude_self_pairs_(pos, neg, ref_labels is None, anchor_in_ref)
    return pos, neg


def exclude_self_pairs_(
    pos: Tensor, neg: Tensor, against_itself: bool, anchor_in_ref: Tensor | None
) -> None:
    """Zeroes each anchor's pair with itself in (N, M) pair weights, in place: the diagonal
    for a batch against itself, and the rows ``anchor_in_ref`` names.

    Args:
        pos: Positive pair weights.
        neg: Negative pair weights.
        against_itself: Whether the references are the anchors themselves.
        anchor_in_ref: (N,) row of the reference set holding each anchor itself, or −1.
    """
    if against_itself:
        pos.fill_diagonal_(0.0)
        neg.fill_diagonal_(0.0)
    if anchor_in_ref is not None and pos.shape[1]:
        # Every row's entry is rewritten, times 0 where the anchor is in the reference set and
        # times 1 elsewhere (column 0 standing in for −1): no list of the anchors that are.
        flat = torch.arange(pos.shape[0], device=pos.device) * pos.shape[1]
        flat += anchor_in_ref.clamp_min(0)
        absent = (anchor_in_ref < 0).to(pos.dtype)
        for weights in (pos, neg):
            entries = weights.view(-1)
            entries.index_copy_(0, flat, entries.index_select(0, flat).mul_(absent))


def drop_self_pairs(indices_tuple: IndicesTuple, anchor_in_ref: Tensor) -> IndicesTuple:
    """A mined tuple without the entries that pair an anchor with itself in the reference set.

    Args:
        indices_tuple: (a, p, n) or (a1, p, a2, n), references indexing the reference set.
        anchor_in_ref: (N,) row of the reference set holding each anchor itself, or −1.

    Returns:
        The tuple without the triplets whose positive or negative is the anchor itself, or
        without the pairs (of either side) whose reference is the anchor itself.
    """
    if len(indices_tuple) == 3:
        a, p, n = indices_tuple
        itself = anchor_in_ref[a]
        keep = (p != itself) & (n != itself)
        return a[keep], p[keep], n[keep]
    a1, p, a2, n = indices_tuple
    keep_pos, keep_neg = p != anchor_in_ref[a1], n != anchor_in_ref[a2]
    return a1[keep_pos], p[keep_pos], a2[keep_neg], n[keep_neg]


def _comparable(labels: Tensor, ref_labels: Tensor) -> tuple[Tensor, Tensor]:
    """The labels as float32 values that compare as the labels do: their ranks among the
    distinct labels of both (:func:`dense_ranks`), exact in float32 below 2^24 labels; integer
    broadcasting comparisons are ~15× slower than float ones on CPU."""
    both = labels if ref_labels is labels else torch.cat([labels, ref_labels])
    if both.numel() >= 2**24:
        return labels, ref_labels
    ranks = dense_ranks(both, torch.float32)
    if ref_labels is labels:
        return ranks, ranks
    return ranks[: labels.numel()], ranks[labels.numel() :]


def dense_ranks(values: Tensor, dtype: torch.dtype = torch.long) -> Tensor:
    """Each value's rank among the distinct values (0 for the smallest): ``torch.unique``'s
    inverse indices, from a sort, so that the host reads nothing (``unique``'s output size
    depends on the data).

    Args:
        values: 1-D tensor.
        dtype: Dtype of the ranks (float32 is exact below 2^24 values).
    """
    ordered, order = torch.sort(values)
    rank_in_order = torch.zeros(values.shape, dtype=dtype, device=values.device)
    torch.cumsum(ordered[1:] != ordered[:-1], 0, dtype=dtype, out=rank_in_order[1:])
    return torch.empty_like(rank_in_order).scatter_(0, order, rank_in_order)


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
    """Pairs as one flat index list, positives first, then negatives; repeats allowed, each
    counted.

    Attributes:
        anchors: (K,) anchor of each pair.
        references: (K,) reference index of each pair.
        num_pos: How many of the pairs, from the start, are positive.
    """

    anchors: Tensor
    references: Tensor
    num_pos: int

    @classmethod
    def from_lists(cls, a1: Tensor, p: Tensor, a2: Tensor, n: Tensor) -> PairIndices:
        """Positive pairs (a1, p) and negative pairs (a2, n)."""
        return cls(torch.cat([a1, a2]), torch.cat([p, n]), a1.numel())

    @classmethod
    def from_tuple(cls, indices_tuple: IndicesTuple) -> PairIndices:
        """Pairs of a mined tuple; triplets (a, p, n) give (a, p) and (a, n), as in PML."""
        return cls.from_lists(*pair_lists(indices_tuple))

    @classmethod
    def from_masks(cls, pos: Tensor, neg: Tensor) -> PairIndices:
        """The non-zero entries of (N, M) positive and negative masks, in row-major order."""
        a1, p = pos.nonzero(as_tuple=True)
        a2, n = neg.nonzero(as_tuple=True)
        return cls.from_lists(a1, p, a2, n)

    def __len__(self) -> int:
        return int(self.anchors.shape[0])

    @cached_property
    def is_pos(self) -> Tensor:
        """(K,) bool, True for the positive pairs."""
        return torch.arange(len(self), device=self.anchors.device) < self.num_pos

    @property
    def a1(self) -> Tensor:
        """Anchor of each positive pair."""
        return self.anchors[: self.num_pos]

    @property
    def p(self) -> Tensor:
        """Reference of each positive pair."""
        return self.references[: self.num_pos]

    @property
    def a2(self) -> Tensor:
        """Anchor of each negative pair."""
        return self.anchors[self.num_pos :]

    @property
    def n(self) -> Tensor:
        """Reference of each negative pair."""
        return self.references[self.num_pos :]

    def take(self, mat: Tensor) -> Tensor:
        """(K,) entries of an (N, M) matrix at the pairs, in one gather."""
        # A 1-D index_select, whose backward is an index_add: several times faster than
        # mat[anchors, references], whose backward is an accumulating index_put.
        flat = self.anchors * mat.shape[1] + self.references
        return mat.reshape(-1).index_select(0, flat)


def pair_lists(indices_tuple: IndicesTuple) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """A mined tuple as pair lists (a1, p, a2, n); triplets (a, p, n) give (a, p) and (a, n),
    as in PML."""
    if len(indices_tuple) == 3:
        a, p, n = indices_tuple
        return a, p, a, n
    return indices_tuple


def side_groups(anchors: Tensor, is_pos: Tensor) -> Tensor:
    """(K,) index of each pair's (anchor, side) group: 2·anchor for a positive pair,
    2·anchor + 1 for a negative one (per-anchor, per-side sums without boolean indexing).

    Args:
        anchors: (K,) anchor of each pair.
        is_pos: (K,) bool, True for positive pairs.
    """
    return (2 * anchors).add_(~is_pos)


def index_counts(index: Tensor, size: int) -> Tensor:
    """(size,) int64 number of occurrences of each value of ``index``, as
    ``torch.bincount(index, minlength=size)`` but without its host read: CUDA's bincount reads
    the input's min and max to the host whatever ``minlength``.

    Args:
        index: Integer indices, all in [0, size).
        size: Length of the result.
    """
    ones = torch.ones_like(index, dtype=torch.long)
    return torch.zeros(size, dtype=torch.long, device=index.device).index_add_(0, index, ones)


def pairs_per_anchor(anchors: Tensor, is_pos: Tensor, n_anchors: int) -> tuple[Tensor, Tensor]:
    """(n_anchors,) numbers of positive and of negative pairs of each anchor.

    Args:
        anchors: (K,) anchor of each pair.
        is_pos: (K,) bool, True for positive pairs.
        n_anchors: Number of anchors.
    """
    counts = index_counts(side_groups(anchors, is_pos), 2 * n_anchors)
    return counts[0::2], counts[1::2]


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
    # The lists themselves, not a PairIndices: its one concatenated list costs two copies.
    a1, p, a2, n = pair_lists(indices_tuple)
    return PairWeights(
        _counts(a1, p, shape, device, dtype, binary),
        _counts(a2, n, shape, device, dtype, binary),
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
    anchor_in_ref: Tensor | None = None,
) -> PairWeights:
    """The pairs a pair-based loss uses: the mined ones if given, else every labelled pair.

    ``binary`` counts repeated mined pairs once (for losses over pair sets per anchor);
    ``anchor_in_ref`` leaves each anchor's pairs with itself out of the labelled pairs (see
    :func:`label_weights`; a mined tuple is filtered with :func:`drop_self_pairs`).
    """
    if indices_tuple is not None:
        return tuple_to_pair_weights(indices_tuple, shape, device, dtype, binary)
    if labels is None:
        raise ValueError("labels are required when no indices_tuple is given")
    return PairWeights(*label_weights(labels, ref_labels, dtype, anchor_in_ref), binary=True)


def tuple_element_weights(indices_tuple: Sequence[Tensor] | None, n: int, like: Tensor) -> Tensor:
    """PML's weight of each batch element from a mined tuple: how often it appears in any
    position, over the largest such count; all ones without a tuple or with an empty one.

    Args:
        indices_tuple: Mined (a, p, n) or (a1, p, a2, n) (any index tensors), or None.
        n: Number of batch elements.
        like: Tensor whose dtype and device the weights take.
    """
    if indices_tuple is None or all(t.numel() == 0 for t in indices_tuple):
        return like.new_ones(n)
    counts = index_counts(torch.cat(list(indices_tuple)), n).to(like.dtype)
    return counts / counts.max()


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
    order, starts = _label_runs(labels[anchors])
    # The one host read: the number of distinct anchor labels, the size of the result. A
    # stable sort puts each label's first pair in the given order at the start of its run.
    first = order[torch.nonzero(starts).squeeze(1)]
    return anchors[first], positives[first]


def _label_runs(labels: Tensor) -> tuple[Tensor, Tensor]:
    """The stable order that sorts ``labels`` and, in that order, where each label's run of
    items starts (bool), without ``torch.unique``'s host read."""
    order = torch.argsort(labels, stable=True)
    sorted_labels = labels[order]
    starts = torch.ones_like(sorted_labels, dtype=torch.bool)
    starts[1:] = sorted_labels[1:] != sorted_labels[:-1]
    return order, starts


def first_two_per_label(labels: Tensor) -> tuple[Tensor, Tensor]:
    """For each label with at least two items, its first item and its second (index order),
    ordered by label: the pair PML's N-pairs loss takes from a batch, without an N × N mask.

    Args:
        labels: (N,) labels.

    Returns:
        (anchors, positives) index tensors.
    """
    order, starts = _label_runs(labels)
    # A label's first item has a second when the next item in label order is no label's first.
    first_of_two = starts.clone()
    first_of_two[:-1] &= ~starts[1:]
    first_of_two[-1:].fill_(False)
    # The one host read: how many labels have two items, the size of the result.
    first = torch.nonzero(first_of_two).squeeze(1)
    return order[first], order[first + 1]
