"""Triplet margins over every (anchor, positive, negative) combination without N³ tensors.

A triplet (a, p, n) is a positive pair (a, p) and a negative reference n of the same anchor.
Instead of listing triplets, the work runs over blocks of positive pairs against all M references
at once, with the negative weights of each block's anchors as the mask. Memory is bounded by
``chunk_elements`` whatever the batch size; no index tensor ever has one entry per triplet.

The loss's gradient with respect to the distance matrix is accumulated block by block in the
forward pass, so backward is a single scaling: no per-block graph is kept.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from .reduction import Reducer

DEFAULT_CHUNK_ELEMENTS = 1 << 20  # 4 MiB float32 temporaries: measured fastest on CPU


def _blocks(n_pairs: int, n_refs: int, chunk_elements: int) -> Iterator[slice]:
    step = max(1, chunk_elements // max(1, n_refs))
    for start in range(0, n_pairs, step):
        yield slice(start, min(start + step, n_pairs))


def _violations(
    dist: Tensor,
    swap_dist: Tensor | None,
    anchors: Tensor,
    positives: Tensor,
    margin: float,
) -> tuple[Tensor, Tensor | None]:
    """For a block of positive pairs, ``d_ap − d_an + margin`` against every reference n,
    where ``dist`` is distance-like (larger is farther). With ``swap_dist`` the anchor-negative
    distance is replaced by the positive-negative one where that is smaller.

    Returns:
        (violations, anchor_side): the (block, M) violations (a new tensor), and with swap the
        0/1 float indicator of entries where the anchor-negative distance was used.
    """
    d_ap = dist[anchors, positives][:, None] + margin
    d_an = dist[anchors]
    if swap_dist is None:
        return d_an.neg_().add_(d_ap), None
    d_pn = swap_dist[positives]
    anchor_side = torch.empty_like(d_an)
    torch.le(d_an, d_pn, out=anchor_side)
    return torch.minimum(d_an, d_pn, out=d_pn).neg_().add_(d_ap), anchor_side


class _AllTriplets(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        dist: Tensor,
        swap_dist: Tensor | None,
        anchors: Tensor,
        positives: Tensor,
        neg_weights: Tensor,
        margin: float,
        smooth: bool,
        reducer: Reducer,
        chunk_elements: int,
    ) -> tuple[Tensor, Tensor]:
        grad = torch.zeros_like(dist)
        swap_grad = torch.zeros_like(swap_dist) if swap_dist is not None else None
        total = dist.new_zeros(())
        count = dist.new_zeros(())
        for block in _blocks(anchors.numel(), dist.shape[1], chunk_elements):
            a, p = anchors[block], positives[block]
            v, anchor_side = _violations(dist, swap_dist, a, p, margin)
            if smooth:
                losses = F.softplus(v)
                slope = v.sigmoid_()
            else:
                losses = v.relu_()
                slope = None  # the hinge's slope is 1 exactly where the loss is positive
            weights = neg_weights[a].to(dist.dtype)
            kept = reducer.keep(losses)
            if kept is not None:
                weights.mul_(kept)
            total += torch.dot(losses.flatten(), weights.flatten())
            count += weights.sum()
            coef = losses.sign_() if slope is None else slope
            coef.mul_(weights)
            grad.index_put_((a, p), coef.sum(1), accumulate=True)
            if anchor_side is None:
                grad.index_add_(0, a, coef, alpha=-1.0)
            else:
                assert swap_grad is not None
                anchor_part = anchor_side.mul_(coef)
                grad.index_add_(0, a, anchor_part, alpha=-1.0)
                swap_grad.index_add_(0, p, coef.sub_(anchor_part), alpha=-1.0)
        ctx.save_for_backward(grad, swap_grad)
        ctx.mark_non_differentiable(count)
        return total, count

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_total: Tensor, _grad_count: Tensor) -> tuple[Tensor | None, ...]:
        grad, swap_grad = ctx.saved_tensors
        swap_out = None if swap_grad is None else grad_total * swap_grad
        return (grad_total * grad, swap_out, None, None, None, None, None, None, None)


def all_triplets_margin_loss(
    dist: Tensor,
    anchors: Tensor,
    positives: Tensor,
    neg_weights: Tensor,
    margin: float,
    reducer: Reducer,
    smooth: bool = False,
    swap_dist: Tensor | None = None,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> Tensor:
    """Triplet margin loss over every positive pair combined with every weighted negative.

    Each triplet (a, p, n) weighs ``neg_weights[a, n]`` and has loss ``[d_ap − d_an + margin]₊``
    (``softplus`` when ``smooth``). Gradients are first-order only.

    Args:
        dist: (N, M) distance-like matrix (negate similarities before calling).
        anchors: (P,) anchor index of each positive pair.
        positives: (P,) reference index of each positive pair.
        neg_weights: (N, M) bool mask or counts of negatives per anchor.
        margin: The margin.
        reducer: Selection and averaging of the triplet losses.
        smooth: Use ``softplus`` instead of the hinge.
        swap_dist: (M, M) reference-to-reference distances for the "swap" variant, or None.
        chunk_elements: Upper bound on the elements of each block's temporaries.

    Returns:
        Scalar loss.

    Raises:
        ValueError: For a reducer that reduces the losses themselves (not
            ``reducer.fusable``): the kernel keeps only a total and a count.
    """
    if not reducer.fusable:
        raise ValueError(
            f"{type(reducer).__name__} reduces the losses themselves; TripletMarginLoss over all "
            "triplets keeps only their total and count: give it a plain reducer, or "
            "triplets_per_anchor / a mined indices_tuple"
        )
    total, count = _AllTriplets.apply(
        dist, swap_dist, anchors, positives, neg_weights, margin, smooth, reducer, chunk_elements
    )
    return reducer.finish(total, count)


class _ListedTriplets(torch.autograd.Function):
    """Losses of listed triplets in one pass over the triplets each way: distances gathered
    from the flattened matrices; backward scatters the slopes into one dense gradient with
    1-D ``index_add`` (several times faster than the accumulating ``index_put`` behind
    ``dist[a, p]``'s backward, and no autograd node per elementwise step)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        dist: Tensor,
        swap_dist: Tensor | None,
        a: Tensor,
        p: Tensor,
        n: Tensor,
        margin: float,
        smooth: bool,
    ) -> Tensor:
        flat = dist.reshape(-1)
        width = dist.shape[1]
        ap, an = torch.add(p, a, alpha=width), torch.add(n, a, alpha=width)
        d_an = flat.index_select(0, an)
        pn = anchor_share = None
        if swap_dist is not None:
            pn = torch.add(n, p, alpha=swap_dist.shape[1])
            d_pn = swap_dist.reshape(-1).index_select(0, pn)
            # The anchor-negative side's share of the gradient; ties split it, as
            # torch.minimum's backward does.
            anchor_share = torch.lt(d_an, d_pn).to(d_an.dtype).add_(d_an == d_pn, alpha=0.5)
            d_an = torch.minimum(d_an, d_pn, out=d_pn)
        v = flat.index_select(0, ap).sub_(d_an).add_(margin)
        if smooth:
            losses = F.softplus(v)
            slope = v.sigmoid_()
        else:
            losses = v.relu_()
            slope = torch.sign(losses)  # the hinge's slope: 1 where the loss is positive
        ctx.save_for_backward(ap, an, pn, anchor_share, slope)
        ctx.shapes = dist.shape, None if swap_dist is None else swap_dist.shape
        return losses

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_losses: Tensor) -> tuple[Tensor | None, ...]:
        ap, an, pn, anchor_share, slope = ctx.saved_tensors
        shape, swap_shape = ctx.shapes
        # Out of place: the saved tensors serve again in a second backward (retain_graph=True).
        coef = slope * grad_losses
        grad = coef.new_zeros(shape)
        grad.view(-1).index_add_(0, ap, coef)
        swap_grad = None
        if pn is not None:
            swap_grad = coef.new_zeros(swap_shape)
            swap_grad.view(-1).index_add_(0, pn, coef * (anchor_share - 1.0))
            coef = anchor_share * coef
        grad.view(-1).index_add_(0, an, coef, alpha=-1.0)
        return grad, swap_grad, None, None, None, None, None


def listed_triplet_losses(
    dist: Tensor,
    a: Tensor,
    p: Tensor,
    n: Tensor,
    margin: float,
    smooth: bool = False,
    swap_dist: Tensor | None = None,
) -> Tensor:
    """Triplet margin losses ``[d_ap − d_an + margin]₊`` (``softplus`` when ``smooth``) of
    listed triplets.

    Args:
        dist: (N, M) distance-like matrix.
        a: (T,) anchor indices (rows of ``dist``).
        p: (T,) positive indices (columns).
        n: (T,) negative indices (columns).
        margin: The margin.
        smooth: Use ``softplus`` instead of the hinge.
        swap_dist: (M, M) reference-to-reference distances for the "swap" variant (the
            anchor-negative distance is replaced by the positive-negative one where that is
            smaller), or None.

    Returns:
        (T,) losses; first-order differentiable.
    """
    losses: Tensor = _ListedTriplets.apply(dist, swap_dist, a, p, n, margin, smooth)
    return losses


def sample_triplets(pos: Tensor, neg: Tensor, per_anchor: int) -> tuple[Tensor, Tensor, Tensor]:
    """``per_anchor`` random triplets for every anchor having a positive and a negative: each
    draws a positive and a negative uniformly, with replacement (PML's ``triplets_per_anchor``).

    Args:
        pos: (N, M) positive pair weights (bool or 0/1).
        neg: (N, M) negative pair weights (bool or 0/1).
        per_anchor: Triplets drawn for each such anchor.

    Returns:
        (a, p, n) index tensors, ``per_anchor`` consecutive triplets per anchor, anchors in
        increasing order.
    """
    anchors = torch.nonzero(pos.sum(1) * neg.sum(1)).squeeze(1)
    if anchors.numel() == 0:
        empty = torch.empty(0, dtype=torch.long, device=pos.device)
        return empty, empty.clone(), empty.clone()
    p = torch.multinomial(pos[anchors].float(), per_anchor, replacement=True)
    n = torch.multinomial(neg[anchors].float(), per_anchor, replacement=True)
    return anchors.repeat_interleave(per_anchor), p.flatten(), n.flatten()


def mine_triplets(
    dist: Tensor,
    anchors: Tensor,
    positives: Tensor,
    neg_mask: Tensor,
    low: float | None,
    high: float | None,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> tuple[Tensor, Tensor, Tensor]:
    """Lists the triplets whose margin ``t = d_an − d_ap`` lies in ``(low, high]``, in blocks
    of positive pairs with one host read (:func:`list_triplets_blockwise`).

    Args:
        dist: (N, M) distance-like matrix.
        anchors: (P,) anchor index of each positive pair, in the order wanted.
        positives: (P,) reference index of each positive pair.
        neg_mask: (N, M) 0/1 negatives (float or bool).
        low: Exclusive lower bound on t, or None.
        high: Inclusive upper bound on t, or None.
        chunk_elements: Upper bound on the elements of each block's temporaries.

    Returns:
        (a, p, n) index tensors, ordered by positive pair, then by n.
    """
    # NaN fails every comparison: non-negatives drop out of the test itself, with no mask
    # gathered per positive pair.
    negatives_only = torch.where(neg_mask > 0, dist, torch.nan)

    def select(block: slice) -> Tensor:
        a = anchors[block]
        t = negatives_only[a].sub_(dist[a, positives[block]][:, None])
        if low is None:
            # Every negative when unbounded: only NaN differs from itself.
            return t <= high if high is not None else t == t
        out = t > low
        return out.logical_and_(t <= high) if high is not None else out

    return list_triplets_blockwise(select, anchors, positives, dist.shape[1], chunk_elements)


def list_triplets_blockwise(
    select: Callable[[slice], Tensor],
    anchors: Tensor,
    positives: Tensor,
    n_refs: int,
    chunk_elements: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """The triplets of a (positive pair × reference) selection made by blocks of positive
    pairs, listed with one host read and memory bounded by the blocks and the output.

    A first pass counts each block's triplets on the device; the host reads every count at
    once; a second pass lists each block with ``nonzero_static`` of its known size. The price
    of not keeping the whole (P, M) selection (a byte per candidate, 520 MB at batch 4096 with
    32 items per class) is computing each block's selection twice.

    Args:
        select: Returns the (rows, n_refs) bool selection of a block (slice) of positive pairs.
        anchors: (P,) anchor index of each positive pair.
        positives: (P,) reference index of each positive pair.
        n_refs: Number of references.
        chunk_elements: Upper bound on the elements of each block.

    Returns:
        (a, p, n) index tensors, ordered by positive pair, then by n.
    """
    blocks = list(_blocks(anchors.numel(), n_refs, chunk_elements))
    if not blocks:
        return anchors[:0], positives[:0], positives[:0].clone()
    # The one host read: each block's number of triplets, the sizes of the lists.
    sizes = torch.stack([select(block).sum() for block in blocks]).tolist()
    parts = [anchors[:0]], [positives[:0]], [positives[:0]]
    for block, size in zip(blocks, sizes, strict=True):
        if size:
            rows, n = select(block).nonzero_static(size=size).unbind(1)
            parts[0].append(anchors[block][rows])
            parts[1].append(positives[block][rows])
            parts[2].append(n)
    a, p, n = (torch.cat(part) for part in parts)
    return a, p, n
