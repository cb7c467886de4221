"""Losses on each anchor's whole list of the batch: the Histogram loss, the Ranked List loss, and
the smoothed-rank losses PNP and Smooth-AP.

PNP and Smooth-AP rank each positive k of an anchor a among the anchor's references l with
``σ((s_al − s_ak) / τ)``, a soft "l comes before k". Written out that is an (N, K, N) tensor
(anchors × positives × references); here it is computed in blocks of anchors, each block's
gradient with respect to its rows of the similarity matrix accumulated during the forward pass
(every anchor's term depends on its own row only), so memory stays bounded by
``chunk_elements`` plus the (N, N) gradient, and backward is one scaling.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .losses import zero_unless
from .reduction import Reducer, row_blocks
from .triplets import DEFAULT_CHUNK_ELEMENTS

PNPVariant = Literal["Ds", "Dq", "Iu", "Ib", "O"]
PNP_VARIANTS: tuple[PNPVariant, ...] = ("Ds", "Dq", "Iu", "Ib", "O")

# Similarities further than this beyond [-1, 1] are not rounding errors of unit vectors.
_HISTOGRAM_RANGE_SLACK = 1e-3


def histogram_node_count(delta: float) -> int:
    """Number of histogram nodes for step ``delta`` over [-1, 1]: PML's ``round(1 + 2/δ)``."""
    return round(1 + 2 / delta)


def histogram_pair_selection(pos: Tensor, neg: Tensor) -> tuple[Tensor, Tensor]:
    """The pairs the Histogram loss estimates its two distributions from, as PML picks them:
    the (anchor, positive) and (anchor, negative) pairs of every triplet, each unordered pair
    once.

    A positive pair belongs to a triplet when its anchor has a negative, a negative pair when
    its anchor has a positive.

    Args:
        pos: (N, N) bool ordered positive pairs (anchor, reference), from labels or a tuple.
        neg: (N, N) bool ordered negative pairs.

    Returns:
        (pos, neg) bool (N, N) selections on and above the diagonal.
    """
    pos_kept = pos & neg.any(dim=1, keepdim=True)
    neg_kept = neg & pos.any(dim=1, keepdim=True)
    return (pos_kept | pos_kept.T).triu(), (neg_kept | neg_kept.T).triu()


def node_density(
    values: Tensor, delta: float, n_nodes: int, weights: Tensor | None = None
) -> Tensor:
    """Linear-interpolation density of ``values`` on the nodes −1, −1 + δ, …: each value
    splits its unit weight between the two nodes around it; the weights are averaged.

    Args:
        values: Similarities in [-1, 1], any shape.
        delta: Node spacing.
        n_nodes: Number of nodes (:func:`histogram_node_count`).
        weights: 0/1 selection of the values, shaped like them (any finite values outside
            it; none selected gives a zero density); None selects all (at least one).

    Returns:
        (n_nodes,) density, differentiable in ``values``.
    """
    return _selected_density(_node_shares(values, delta, n_nodes), n_nodes, weights)


def _node_shares(values: Tensor, delta: float, n_nodes: int) -> tuple[Tensor, Tensor, Tensor]:
    """Each value's node below, flattened, and the shares of its weight that go to that node
    and to the next one."""
    # The node below is found in float32, as PML does, so that a value at a node (a kink of
    # the density) takes PML's one-sided gradient; clamping keeps a similarity of exactly 1
    # (or a rounding error beyond ±1) on the last (first) interval.
    lower = ((values.detach().float() + 1) / delta).floor().clamp_(0, n_nodes - 2).long()
    start = lower.to(values.dtype) * delta
    upper_share = (values + 1 - start) / delta
    lower_share = (start + delta - 1 - values) / delta
    return lower.reshape(-1), lower_share.reshape(-1), upper_share.reshape(-1)


def _selected_density(
    shares: tuple[Tensor, Tensor, Tensor], n_nodes: int, weights: Tensor | None
) -> Tensor:
    lower, lower_share, upper_share = shares
    count: Tensor | int = lower.numel()
    if weights is not None:
        # Unselected values add exact zeros, in place: the sums are those of the selection.
        w = weights.reshape(-1)
        lower_share, upper_share = lower_share * w, upper_share * w
        count = w.sum().clamp_min(1.0)
    density = upper_share.new_zeros(n_nodes)
    density = density.scatter_add(0, lower + 1, upper_share)
    density = density.scatter_add(0, lower, lower_share)
    return density / count


def histogram_loss(
    sim: Tensor, pos_pairs: Tensor, neg_pairs: Tensor, delta: float, check_range: bool = True
) -> Tensor:
    """Histogram loss (Ustinova & Lempitsky 2016): the probability that a negative pair is
    more similar than a positive one, from the node densities of the two sets,
    ``Σ_r p⁻_r Σ_{q ≤ r} p⁺_q``.

    Args:
        sim: (N, N) similarities in [-1, 1].
        pos_pairs: (N, N) bool selection of the positive pairs, on and above the diagonal
            (:func:`histogram_pair_selection`).
        neg_pairs: (N, N) bool selection of the negative pairs, on and above the diagonal.
        delta: Node spacing.
        check_range: Check the selected similarities to lie in [-1, 1] (the host reads their
            largest magnitude); needless for unit vectors' dot products.

    Returns:
        Scalar loss; a zero keeping the graph when there is no pair of one kind.

    Raises:
        ValueError: If a selected similarity lies outside [-1, 1] beyond rounding.
    """
    if check_range:
        selected = pos_pairs | neg_pairs
        largest = float((sim.detach().abs() * selected).max()) if selected.numel() else 0.0
        if largest > 1 + _HISTOGRAM_RANGE_SLACK:
            raise ValueError(
                f"HistogramLoss needs similarities in [-1, 1], got one of magnitude "
                f"{largest:.4g}; use CosineSimilarity or a normalising DotProductSimilarity"
            )
    n_nodes = histogram_node_count(delta)
    # The selections lie on and above the diagonal: only those entries are read, in row-major
    # order as boolean indexing would list them.
    rows, cols = torch.triu_indices(*sim.shape, device=sim.device)
    entries = rows * sim.shape[1] + cols
    values = sim.reshape(-1).index_select(0, entries)
    pos_weights, neg_weights = (
        pairs.reshape(-1).index_select(0, entries).to(sim.dtype) for pairs in (pos_pairs, neg_pairs)
    )
    shares = _node_shares(values, delta, n_nodes)
    # An empty side has a zero density (and the loss is PML's zero below).
    p_pos = _selected_density(shares, n_nodes, pos_weights)
    p_neg = _selected_density(shares, n_nodes, neg_weights)
    loss = (p_neg * p_pos.cumsum(0)).sum()
    return zero_unless(pos_pairs.any() & neg_pairs.any(), loss, sim)


def _weighted_side(
    gap: Tensor, kept: Tensor, temperature: float, smoothing: float
) -> tuple[Tensor, Tensor]:
    """One side of the Ranked List loss for a block of anchors: ``Σ w·gap / (Σ w + smoothing)``
    with ``w = exp(temperature · gap)`` on the kept entries, and its slope in each gap.

    Args:
        gap: (B, M) distances past the boundary; overwritten.
        kept: (B, M) bool, the entries that count.
        temperature: The weights' temperature.
        smoothing: Added to each row's total weight.

    Returns:
        (B,) losses and (B, M) slopes ``w (1 + T (gap − loss)) / (Σ w + smoothing)``.
    """
    gap.mul_(kept)
    weights = kept.to(gap.dtype)
    if temperature != 0:
        weights.mul_(torch.exp(gap * temperature))
    total = weights.sum(dim=1).add_(smoothing)
    loss = (weights * gap).sum(dim=1).div_(total)
    if temperature != 0:
        weights.mul_(gap.sub_(loss[:, None]).mul_(temperature).add_(1))
    return loss, weights.div_(total[:, None])


class _RankedList(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        mat: Tensor,
        pos: Tensor,
        neg: Tensor,
        boundary: float,
        alpha: float,
        imbalance: float,
        tp: float,
        tn: float,
    ) -> Tensor:
        losses = mat.new_empty(mat.shape[0])
        grad = torch.empty_like(mat)
        smoothing = 1e-5 * mat.shape[1]
        for block in row_blocks(*mat.shape):
            m = mat[block]
            positive = m > 0
            pos_kept = (pos[block] > 0) & (m > boundary) & positive
            neg_kept = (neg[block] > 0) & (m < alpha) & positive
            loss_p, slope_p = _weighted_side(m - boundary, pos_kept, tp, smoothing)
            loss_n, slope_n = _weighted_side(alpha - m, neg_kept, tn, smoothing)
            losses[block] = loss_p.mul_(1 - imbalance).add_(loss_n, alpha=imbalance)
            # The positive gap grows with the distance, the negative one shrinks.
            grad[block] = slope_p.mul_(1 - imbalance).sub_(slope_n, alpha=imbalance)
        ctx.save_for_backward(grad)
        return losses

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_losses: Tensor) -> tuple[Tensor | None, ...]:
        (grad,) = ctx.saved_tensors
        return (grad * grad_losses[:, None], None, None, None, None, None, None, None)


def ranked_list_loss(
    mat: Tensor,
    pos: Tensor,
    neg: Tensor,
    margin: float,
    alpha: float,
    imbalance: float,
    tp: float,
    tn: float,
    *,
    reducer: Reducer,
) -> Tensor:
    """Ranked List loss (Wang et al. 2019), per anchor, as PML computes it.

    Positives farther than ``alpha − margin`` and negatives closer than ``alpha`` (both at a
    positive distance) are penalised by their distance beyond the boundary, weighted by
    ``exp(Tp · gap)`` and ``exp(Tn · gap)``; each side is a weighted mean (its weights plus
    ``1e-5`` per reference in the denominator), the sides mixed by ``imbalance``. Computed in
    row blocks with the gradient formed on the way (first-order only): no (N, M) temporaries
    beyond the gradient.

    Args:
        mat: (N, M) distances.
        pos: (N, M) 0/1 positive pairs (self-pairs excluded).
        neg: (N, M) 0/1 negative pairs.
        margin: Gap between the positive and negative boundaries.
        alpha: The negative boundary.
        imbalance: Weight of the negative side; the positive side has ``1 − imbalance``.
        tp: Temperature of the positive weights.
        tn: Temperature of the negative weights.
        reducer: Reduces the N per-anchor losses.

    Returns:
        Scalar loss.
    """
    losses: Tensor = _RankedList.apply(mat, pos, neg, alpha - margin, alpha, imbalance, tp, tn)
    return reducer(losses)


def positive_lists(targets: Tensor, width: int | None = None) -> tuple[Tensor, Tensor]:
    """Each row's selected columns as a padded index matrix.

    Args:
        targets: (N, M) bool; row i selects K_i columns.
        width: max K_i when the caller knows it; None reads it from the device (it is a
            shape).

    Returns:
        (index, valid): (N, max K_i) long column indices, row i's first K_i valid (in column
        order) and the rest padding (a valid column index with ``valid`` False).
    """
    counts = targets.sum(dim=1)
    if width is None:
        width = int(counts.max()) if counts.numel() else 0
    # Each selected column goes to its slot (the number of selected columns up to it); the
    # others to a spare last column, dropped: no list of the selected entries.
    slot = torch.where(targets, targets.cumsum(dim=1) - 1, width)
    columns = torch.arange(targets.shape[1], device=targets.device).expand_as(slot)
    index = torch.zeros(targets.shape[0], width + 1, dtype=torch.long, device=targets.device)
    index = index.scatter_(1, slot, columns)[:, :width]
    valid = torch.arange(width, device=targets.device) < counts[:, None]
    return index, valid


# A block rule: given the anchors' slice, their (B, K) positive indices and the soft
# precedences σ((s_al − s_ak)/τ) as a (B, K, N) tensor it may overwrite, returns the block's
# (B,) values and ∂value/∂(s_al − s_ak) as a (B, K, N) tensor.
BlockRule = Callable[[slice, Tensor, Tensor], tuple[Tensor, Tensor]]


class _SoftRankTerms(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        sim: Tensor,
        positives: Tensor,
        temperature: float,
        rule: BlockRule,
        chunk_elements: int,
    ) -> Tensor:
        n, k = positives.shape
        values = sim.new_empty(n)
        grad = torch.empty_like(sim)
        step = max(1, chunk_elements // max(1, k * sim.shape[1]))
        for start in range(0, n, step):
            block = slice(start, min(start + step, n))
            rows, index = sim[block], positives[block]
            soft = (rows[:, None, :] - rows.gather(1, index)[:, :, None]).div_(temperature)
            values[block], slopes = rule(block, index, soft.sigmoid_())
            # s_al enters every precedence of l positively, s_ak each of k's negatively.
            row_grad = slopes.sum(dim=1)
            row_grad.scatter_add_(1, index, slopes.sum(dim=2).neg_())
            grad[block] = row_grad
        ctx.save_for_backward(grad)
        return values

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_values: Tensor) -> tuple[Tensor | None, ...]:
        (grad,) = ctx.saved_tensors
        return grad * grad_values[:, None], None, None, None, None


def soft_rank_terms(
    sim: Tensor,
    positives: Tensor,
    temperature: float,
    rule: BlockRule,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> Tensor:
    """Per-anchor terms of the soft precedences ``σ((s_al − s_ak)/τ)`` of every reference l
    over each listed positive k, computed in anchor blocks (first-order gradients only).

    Args:
        sim: (N, M) similarities, one row per anchor.
        positives: (N, K) column indices of each anchor's positives.
        temperature: τ.
        rule: Turns a block's precedences into its values and their slopes (:data:`BlockRule`).
        chunk_elements: Upper bound on each block's (B, K, M) temporaries.

    Returns:
        (N,) values, differentiable in ``sim``.
    """
    values: Tensor = _SoftRankTerms.apply(sim, positives, temperature, rule, chunk_elements)
    return values


def _sigmoid_slopes_(soft: Tensor, temperature: float) -> Tensor:
    """σ'(x)/τ from σ(x), in place: the slope of σ((s_al − s_ak)/τ) in s_al − s_ak."""
    return soft.addcmul_(soft, soft, value=-1.0).div_(temperature)


def pnp_rank_transform(
    rank: Tensor, variant: PNPVariant, b: float, alpha: float
) -> tuple[Tensor, Tensor]:
    """PNP's function of a positive's soft count of negatives ranked before it, and its slope.

    Args:
        rank: Soft counts r ≥ 0.
        variant: ``"O"``: r; ``"Ds"``: log(1 + r); ``"Dq"``: (1 + r)^−α (the loss is then one
            minus its mean); ``"Iu"``: (1 + r) log(1 + r); ``"Ib"``: (b r − log(1 + b r)) / b².
        b: The ``"Ib"`` variant's scale.
        alpha: The ``"Dq"`` variant's exponent.

    Returns:
        (f(r), f'(r)).
    """
    if variant == "O":
        return rank, torch.ones_like(rank)
    if variant == "Ds":
        return torch.log1p(rank), 1 / (1 + rank)
    if variant == "Dq":
        value = (1 + rank).pow(-alpha)
        return value, -alpha * value / (1 + rank)
    if variant == "Iu":
        log = torch.log1p(rank)
        return (1 + rank) * log, log + 1
    if variant == "Ib":
        scaled = b * rank
        return (scaled - torch.log1p(scaled)) / b**2, rank / (1 + scaled)
    raise ValueError(f"variant must be one of {PNP_VARIANTS}, got {variant!r}")


def pnp_loss(
    sim: Tensor,
    pos: Tensor,
    neg: Tensor,
    variant: PNPVariant,
    anneal: float,
    b: float,
    alpha: float,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> Tensor:
    """PNP loss (Li et al. 2022): for every anchor with a positive, the mean over its positives
    (itself included) of f(soft count of its negatives ranked before the positive), averaged
    over those anchors; one minus that for ``"Dq"``.

    Args:
        sim: (N, N) similarities.
        pos: (N, N) 0/1 positive pairs (self-pairs excluded).
        neg: (N, N) 0/1 negative pairs.
        variant: See :func:`pnp_rank_transform`.
        anneal: Temperature of the soft precedences.
        b: The ``"Ib"`` scale.
        alpha: The ``"Dq"`` exponent.
        chunk_elements: Upper bound on each block's temporaries.

    Returns:
        Scalar loss (already averaged); a zero keeping the graph when no anchor has a positive.
    """
    has_pos = pos.any(dim=1)
    itself = torch.eye(sim.shape[0], dtype=torch.bool, device=sim.device)
    positives, valid = positive_lists((pos > 0) | itself)
    neg_weights = neg.to(sim.dtype)
    valid_weights = valid.to(sim.dtype) / valid.sum(dim=1, keepdim=True)

    def rule(block: slice, index: Tensor, soft: Tensor) -> tuple[Tensor, Tensor]:
        soft.mul_(neg_weights[block, None, :])
        value, slope = pnp_rank_transform(soft.sum(dim=2), variant, b, alpha)
        weights = valid_weights[block]
        slopes = _sigmoid_slopes_(soft, anneal).mul_((slope * weights)[:, :, None])
        return (value * weights).sum(dim=1), slopes

    per_anchor = soft_rank_terms(sim, positives, anneal, rule, chunk_elements)
    n_anchors = has_pos.sum()
    loss = (per_anchor * has_pos).sum() / n_anchors.clamp_min(1)
    return zero_unless(n_anchors > 0, 1 - loss if variant == "Dq" else loss, sim)


def smooth_ap_loss(
    sim: Tensor,
    same: Tensor,
    temperature: float,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    class_size: int | None = None,
) -> Tensor:
    """Smooth-AP (Brown et al. 2020): each anchor's one minus its smoothed average precision,
    ``1 − (1/K) Σ_k (1 + Σ_{l∈P, l≠k} σ_kl) / (1 + Σ_{l≠k} σ_kl)`` over its K positives P
    (itself included), with ``σ_kl = σ((s_al − s_ak)/τ)`` and l over the whole batch.

    Args:
        sim: (N, N) similarities.
        same: (N, N) bool, True where the labels match (the diagonal included); every row must
            select the same number K ≥ 2 of columns.
        temperature: τ.
        chunk_elements: Upper bound on each block's temporaries.
        class_size: K, when the caller knows it; None reads it from the device.

    Returns:
        (N,) per-anchor losses, differentiable in ``sim``.
    """
    positives, _ = positive_lists(same, class_size)
    k = positives.shape[1]
    pos_slots = positives[:, None, :]

    def rule(block: slice, index: Tensor, soft: Tensor) -> tuple[Tensor, Tensor]:
        slots = pos_slots[block].expand(-1, k, -1)
        soft.scatter_(2, index[:, :, None], 0.0)  # a positive does not precede itself
        rank_all = soft.sum(dim=2).add_(1)
        rank_pos = soft.gather(2, slots).sum(dim=2).add_(1)
        ratio = rank_pos / rank_all
        # d(1 − AP)/dσ_kl = (Q_k/R_k² − [l ∈ P]/R_k)/K
        slopes = _sigmoid_slopes_(soft, temperature)
        pos_slopes = slopes.gather(2, slots)
        slopes.mul_((ratio / rank_all / k)[:, :, None])
        slopes.scatter_add_(2, slots, pos_slopes.mul_((-1 / (k * rank_all))[:, :, None]))
        return 1 - ratio.sum(dim=1) / k, slopes

    return soft_rank_terms(sim, positives, temperature, rule, chunk_elements)


__all__ = [
    "PNP_VARIANTS",
    "BlockRule",
    "PNPVariant",
    "histogram_loss",
    "histogram_node_count",
    "histogram_pair_selection",
    "node_density",
    "pnp_loss",
    "pnp_rank_transform",
    "positive_lists",
    "ranked_list_loss",
    "smooth_ap_loss",
    "soft_rank_terms",
]
