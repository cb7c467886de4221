"""Losses against class representatives: NCA (against the batch or a reference set), and the
proxy losses, whose representatives are learned proxies (ProxyNCA, ProxyAnchor) or centres
(SoftTriple).

ProxyNCA is NCA against the proxies: the same logits, the same per-item weights from a mined
tuple; with a single positive (its class's proxy) NCA's loss is the cross-entropy. Per-class
terms are gathered and scattered by label (O(N) work), never built from (N, C) masks.

Mined tuples weigh items as PML does (a tuple selects no pairs here): each item's count in the
tuple over the largest count (:func:`~dmlkit.functional.masks.tuple_element_weights`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from ..validation import IndicesTuple
from .classification import weighted_cross_entropy
from .logsumexp import masked_logsumexp
from .masks import index_counts, tuple_element_weights
from .reduction import Reducer, row_blocks


def nca_logits(mat: Tensor, softmax_scale: float, is_inverted: bool) -> Tensor:
    """NCA's softmax logits: ``softmax_scale`` times the similarities, or the negated distances.

    Args:
        mat: (N, M) similarities or distances to the references (batch items or proxies).
        softmax_scale: The softmax's scale.
        is_inverted: True when ``mat`` holds similarities.
    """
    return mat * (softmax_scale if is_inverted else -softmax_scale)


def reference_items(
    n_items: int, n_refs: int | None, anchor_in_ref: Tensor | None, device: torch.device
) -> Tensor | None:
    """Each reference row's batch item, when every reference is a batch item; else None.

    PML counts a tuple's positives and negatives as items only when the reference set is the
    batch itself (its ``query is reference``); here that is known by index: no separate
    reference set, or ``anchor_in_ref`` placing an anchor in every reference row.

    Args:
        n_items: N, the batch size.
        n_refs: M, the number of reference rows, or None for the batch against itself.
        anchor_in_ref: (N,) reference row of each anchor, or −1; None if unknown.
        device: Where the result lives.
    """
    if n_refs is None:
        return torch.arange(n_items, device=device)
    if anchor_in_ref is None:
        return None
    present = torch.nonzero(anchor_in_ref >= 0).squeeze(1)
    items = torch.full((n_refs,), -1, dtype=torch.long, device=device)
    items[anchor_in_ref[present]] = present
    return items if bool((items >= 0).all()) else None


def nca_sample_weights(
    indices_tuple: IndicesTuple | None, n_items: int, like: Tensor, ref_items: Tensor | None
) -> Tensor:
    """NCA's per-item weights from a mined tuple (PML's rule): the anchors count, and the
    positives and negatives too where they are batch items.

    Args:
        indices_tuple: (a, p, n) or (a1, p, a2, n), references indexing the reference set; or
            None.
        n_items: N, the batch size.
        like: Tensor whose dtype and device the weights take.
        ref_items: Each reference row's batch item (:func:`reference_items`), or None when
            the references are other items (proxies, a memory): then only anchors count.

    Returns:
        (N,) weights; ones without a tuple or with an empty one.
    """
    if indices_tuple is None:
        return like.new_ones(n_items)
    anchors: tuple[Tensor, ...]
    refs: tuple[Tensor, ...]
    if len(indices_tuple) == 3:
        anchors, refs = indices_tuple[:1], indices_tuple[1:]
    else:
        anchors, refs = indices_tuple[0::2], indices_tuple[1::2]
    named = anchors if ref_items is None else (*anchors, *(ref_items[r] for r in refs))
    return tuple_element_weights(named, n_items, like)


def nca_loss(
    logits: Tensor, pos: Tensor, neg: Tensor, sample_weights: Tensor, reducer: Reducer
) -> Tensor:
    """NCA (Goldberger et al. 2004) per item i: ``−log Σ_{p ∈ P_i} softmax_i(p)`` over i's
    candidates P_i ∪ N_i, i.e. ``softplus(lse_N − lse_P)``, times i's weight, reduced over the
    items with a positive (an item without one is left out, as PML leaves it out).

    Args:
        logits: (N, M) logits (:func:`nca_logits`).
        pos: (N, M) 0/1 positive-candidate weights.
        neg: (N, M) 0/1 negative-candidate weights (an item is neither of its own).
        sample_weights: (N,) weights (:func:`nca_sample_weights`).
        reducer: Over the items with a positive.
    """
    pos_lse, has_pos = masked_logsumexp(logits, pos)
    neg_lse, has_neg = masked_logsumexp(logits, neg)
    losses = (F.softplus(neg_lse - pos_lse) * has_neg).squeeze(1)
    return reducer(losses * sample_weights, has_pos.squeeze(1))


def _log1p(top: Tensor, total: Tensor) -> Tensor:
    """``log(e^{−top} + total) + top``, i.e. ``log(1 + Σ e^z)`` from ``top`` (≥ 0, the largest
    exponent or the 1's) and ``total = Σ e^{z − top}``; log1p keeps tiny sums (a reducer counting
    non-zero terms sees them)."""
    return torch.where(top > 0, top + torch.log(torch.exp(-top) + total), torch.log1p(total))


def _log1p_sum_exp_by_class(x: Tensor, classes: Tensor, num_classes: int) -> Tensor:
    """``log(1 + Σ_{i: classes_i = c} exp(x_i))`` for every class c (0 for a class without
    items)."""
    top = x.new_zeros(num_classes).scatter_reduce(0, classes, x.detach(), "amax")
    total = x.new_zeros(num_classes).index_add(0, classes, torch.exp(x - top[classes]))
    return _log1p(top, total)


def _column_exponents(
    x: Tensor, rows: slice, scale: float, offset: float, row_offsets: Tensor | None, own: Tensor
) -> Tensor:
    """``scale·x + offset + row_offsets`` for a block of rows (a new tensor), −∞ at each row's
    own column."""
    z = torch.mul(x[rows], scale).add_(offset)
    if row_offsets is not None:
        z.add_(row_offsets[rows].unsqueeze(1))
    return z.scatter_(1, own[rows].unsqueeze(1), float("-inf"))


class _ColumnLog1pSumExp(torch.autograd.Function):
    """Forward runs over row blocks with a running maximum per column and keeps per-column
    scalars only; backward recomputes each block's terms and writes the gradient once."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        scale: float,
        offset: float,
        row_offsets: Tensor | None,
        own: Tensor,
    ) -> Tensor:
        top = x.new_zeros(x.shape[1])  # the exponent of the 1 inside log(1 + Σ)
        total = x.new_zeros(x.shape[1])
        for rows in row_blocks(*x.shape):
            z = _column_exponents(x, rows, scale, offset, row_offsets, own)
            new_top = torch.maximum(top, z.amax(dim=0))
            total.mul_(torch.exp(top - new_top)).add_(z.sub_(new_top).exp_().sum(dim=0))
            top = new_top
        result = _log1p(top, total)
        ctx.save_for_backward(x, result, row_offsets, own)
        ctx.scale, ctx.offset = scale, offset
        return result

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_result: Tensor) -> tuple[Tensor | None, ...]:
        x, result, row_offsets, own = ctx.saved_tensors
        grad = torch.empty_like(x)
        column_factor = grad_result * ctx.scale
        for rows in row_blocks(*x.shape):
            z = _column_exponents(x, rows, ctx.scale, ctx.offset, row_offsets, own)
            torch.mul(z.sub_(result).exp_(), column_factor, out=grad[rows])
        return grad, None, None, None, None


def column_log1p_sum_exp(
    x: Tensor, scale: float, offset: float, row_offsets: Tensor | None, own: Tensor
) -> Tensor:
    """``log(1 + Σ_{i: own_i ≠ c} exp(scale·x_ic + offset + row_offsets_i))`` for every column
    c: each row leaves out its own column (a proxy's negatives are the other classes' items).

    Computed in row blocks; first-order differentiable in ``x``. A column with no term gives 0.

    Args:
        x: (N, C) values.
        scale: Multiplies ``x``.
        offset: Added after scaling.
        row_offsets: (N,) added to each row's exponents, or None.
        own: (N,) the column each row leaves out.

    Returns:
        (C,) values.
    """
    result: Tensor = _ColumnLog1pSumExp.apply(x.contiguous(), scale, offset, row_offsets, own)
    return result


def proxy_anchor_loss(
    mat: Tensor,
    labels: Tensor,
    margin: float,
    alpha: float,
    is_inverted: bool,
    sample_weights: Tensor | None,
    reducer: Reducer,
) -> Tensor:
    """Proxy-Anchor (Kim et al. 2020), per proxy c:
    ``log(1 + Σ_{i ∈ P_c} e^{α(δ − s_ic)})`` and ``log(1 + Σ_{i ∉ P_c} e^{α(s_ic + δ)})``
    (distances: ``α(d_ic − δ)`` and ``α(−δ − d_ic)``), each term of item i multiplied by
    ``e^{w_i − 1}`` for its tuple weight w_i (PML's rule). The positive terms are reduced with
    the number of proxies having a positive as divisor, the negative ones with the number of
    proxies, and the two summed (PML's ``DivisorReducer`` and ``MultipleReducers``).

    Args:
        mat: (N, C) similarities (or distances) to the proxies.
        labels: (N,) class indices.
        margin: δ.
        alpha: α.
        is_inverted: True when ``mat`` holds similarities.
        sample_weights: (N,) tuple weights, or None without a tuple (all ones).
        reducer: Applied to each side's (C,) terms.
    """
    num_classes = mat.shape[1]
    scale = alpha if is_inverted else -alpha
    offsets = None if sample_weights is None else sample_weights - 1
    pos_logits = (margin - mat.gather(1, labels.unsqueeze(1)).squeeze(1)) * scale
    if offsets is not None:
        pos_logits = pos_logits + offsets
    pos_terms = _log1p_sum_exp_by_class(pos_logits, labels, num_classes)
    neg_terms = column_log1p_sum_exp(mat, scale, margin * scale, offsets, labels)
    with_pos = index_counts(labels, num_classes).count_nonzero()
    return reducer(pos_terms, divisor=with_pos) + reducer(neg_terms, divisor=num_classes)


class _SoftTripleLogits(torch.autograd.Function):
    """Row blocks of the (N, C, K) similarities: forward keeps only per-class values, backward
    recomputes each block's softmax weights and writes the gradient once. The softmax over K is
    written out: ``torch.softmax`` over a last dimension of ~10 is several times slower."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, sim: Tensor, num_classes: int, centers_per_class: int, gamma: float
    ) -> Tensor:
        per_class = sim.view(-1, num_classes, centers_per_class)
        logits = sim.new_empty(per_class.shape[:2])
        tops = sim.new_empty(per_class.shape[:2])
        totals = sim.new_empty(per_class.shape[:2])
        for rows in row_blocks(*sim.shape):
            s = per_class[rows]
            z = s * (1.0 / gamma)
            torch.amax(z, dim=2, out=tops[rows])
            weights = z.sub_(tops[rows].unsqueeze(2)).exp_()  # unnormalised softmax weights
            torch.sum(weights, dim=2, out=totals[rows])
            torch.sum(weights.mul_(s), dim=2, out=logits[rows])
        logits.div_(totals)
        ctx.save_for_backward(sim, logits, tops, totals)
        ctx.shape, ctx.gamma = per_class.shape, gamma
        return logits

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_logits: Tensor) -> tuple[Tensor | None, ...]:
        sim, logits, tops, totals = ctx.saved_tensors
        per_class = sim.view(ctx.shape)
        grad = torch.empty_like(per_class)
        factor = (grad_logits / totals).unsqueeze(2)
        for rows in row_blocks(*sim.shape):
            s = per_class[rows]
            weights = torch.mul(s, 1.0 / ctx.gamma).sub_(tops[rows].unsqueeze(2)).exp_()
            # ∂(Σ_k p_k s_k)/∂s_j = p_j (1 + (s_j − S)/γ), S the class's similarity.
            slope = torch.sub(s, logits[rows].unsqueeze(2)).mul_(1.0 / ctx.gamma).add_(1.0)
            torch.mul(slope.mul_(weights), factor[rows], out=grad[rows])
        return grad.view(sim.shape), None, None, None


def soft_triple_logits(
    sim: Tensor, num_classes: int, centers_per_class: int, gamma: float
) -> Tensor:
    """SoftTriple's similarity to each class (Qian et al. 2019): the softmax(s/γ)-weighted mean
    of the similarities to its centres. First-order differentiable; computed in row blocks, so
    no (N, C·K) temporary exists but the gradient.

    Args:
        sim: (N, C·K) similarities to the centres, class c's being columns cK … cK + K − 1.
        num_classes: C.
        centers_per_class: K.
        gamma: γ, the softmax's temperature.

    Returns:
        (N, C) similarities.
    """
    logits: Tensor = _SoftTripleLogits.apply(
        sim.contiguous(), num_classes, centers_per_class, gamma
    )
    return logits


def soft_triple_loss(
    logits: Tensor,
    labels: Tensor,
    la: float,
    margin: float,
    sample_weights: Tensor,
    reducer: Reducer,
) -> Tensor:
    """SoftTriple's loss per item: the cross-entropy of ``λ (S − δ·onehot)``, times its tuple
    weight, reduced over the items.

    Args:
        logits: (N, C) class similarities (:func:`soft_triple_logits`).
        labels: (N,) class indices.
        la: λ, the scale.
        margin: δ, subtracted from the target class's similarity.
        sample_weights: (N,) tuple weights.
        reducer: Over the items.
    """
    rows = torch.arange(logits.shape[0], device=logits.device)
    scaled = logits * la
    scaled[rows, labels] -= la * margin
    return weighted_cross_entropy(scaled, labels, sample_weights, reducer)


__all__ = [
    "nca_logits",
    "nca_loss",
    "nca_sample_weights",
    "proxy_anchor_loss",
    "reference_items",
    "soft_triple_logits",
    "soft_triple_loss",
]
