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

from .masks import index_counts
from .pairwise import squared_euclidean_distance_matrix
from .triplets import DEFAULT_CHUNK_ELEMENTS, list_triplets_blockwise

NegativeRule = Literal["code", "figure"]
EasyHardStrategy = Literal["hard", "semihard", "easy", "all"]


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
    gamma_pos: float | Tensor,
    gamma_neg: float | Tensor,
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
        gamma_pos: Positive tolerance (a number or a 0-dim tensor).
        gamma_neg: Negative tolerance (likewise).
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

    @classmethod
    def from_values(cls, values: list[float]) -> AdaptiveTolerances:
        """From the six values of :func:`adaptive_tolerance_values`, read to the host."""
        g_pos, g_neg, ratio, tau, n_neg, n_pos = values
        return cls(g_pos, g_neg, None if math.isnan(ratio) else ratio, tau, int(n_neg), int(n_pos))


def adaptive_tolerance_values(
    sim: Tensor,
    pos: Tensor,
    neg: Tensor,
    gamma_pos: float,
    gamma_neg: float,
    count_tolerance: float,
    k: float = 0.5,
) -> Tensor:
    """AT-ASMS tolerance update (see :func:`adaptive_tolerances`) left on the device: nothing
    is read, so a miner can read these values with its mined sizes in one synchronisation.

    Returns:
        (6,) float64: γ̂_pos, γ̂_neg, r (NaN when the batch has no positive pair), τ, n_neg and
        N_pos.
    """
    pos, neg = pos.to(sim.dtype), neg.to(sim.dtype)
    buffer = torch.empty_like(sim)
    min_pos = _extreme_selected(sim, pos, largest=False, buffer=buffer)
    shifted = torch.add(sim, count_tolerance, out=buffer)
    n_neg = _select(neg, shifted, min_pos, above=True, buffer=buffer).sum(dtype=torch.float64)
    n_pos = pos.sum(dtype=torch.float64)
    ratio = torch.where(n_pos > 0, n_neg / n_pos, torch.nan)
    g_pos, g_neg, tau = _updated_tolerances(ratio, gamma_pos, gamma_neg, k)
    return torch.stack([g_pos, g_neg, ratio, tau, n_neg, n_pos])


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
        The tolerances and the counts behind them (one read from the device).
    """
    values = adaptive_tolerance_values(sim, pos, neg, gamma_pos, gamma_neg, count_tolerance, k)
    return AdaptiveTolerances.from_values(values.tolist())


def _updated_tolerances(
    ratio: Tensor, gamma_pos: float, gamma_neg: float, k: float
) -> tuple[Tensor, Tensor, Tensor]:
    """(γ̂_pos, γ̂_neg, τ) as 0-dim float64 tensors: strictly r > 1 adapts (NaN does not)."""
    tau = torch.where(ratio > 1, k / (1.0 + torch.exp(-ratio)), 0.0)
    return gamma_pos * (1.0 + tau), gamma_neg * (1.0 - tau), tau


def tolerances_from_ratio(
    ratio: float | None, gamma_pos: float, gamma_neg: float, k: float = 0.5
) -> tuple[float, float, float]:
    """AT-ASMS's update rule: (γ̂_pos, γ̂_neg, τ) for the ratio r (docs/ddtas.md §3 table).

    Strictly r > 1 adapts, with τ = k·σ(r); r ≤ 1, or no ratio at all (no positive pair),
    keeps the static tolerances.
    """
    r = torch.tensor(math.nan if ratio is None else ratio, dtype=torch.float64)
    g_pos, g_neg, tau = (float(t) for t in _updated_tolerances(r, gamma_pos, gamma_neg, k))
    return g_pos, g_neg, tau


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


def read_sizes(*values: Tensor) -> list[float]:
    """Reads device values (counts, tolerances, flags) to the host in one synchronisation:
    a miner's data-dependent sizes are all gathered into this one read.

    Args:
        *values: Tensors of any shape and dtype; counts must be below 2^53 (read as float64).

    Returns:
        Their values, flattened and in order.
    """
    stacked = torch.cat([v.to(torch.float64).reshape(-1) for v in values])
    read: list[float] = stacked.tolist()
    return read


def nonzero_lists(
    masks: list[Tensor], *extra: Tensor
) -> tuple[list[tuple[Tensor, ...]], list[float]]:
    """The non-zero entries of each mask as index columns, all sized by one read from the
    device (:func:`read_sizes`), which also reads ``extra``.

    Args:
        masks: Tensors of any shape and dtype; non-zero (positive, for weights) entries are
            listed in row-major order.
        *extra: Tensors to read in the same synchronisation.

    Returns:
        (lists, extra values): for each mask, one index tensor per dimension.
    """
    flags = [m if m.dtype == torch.bool else m > 0 for m in masks]
    read = read_sizes(*(f.sum() for f in flags), *extra)
    lists = [
        torch.nonzero_static(f, size=int(size)).unbind(1)
        for f, size in zip(flags, read, strict=False)
    ]
    return lists, read[len(flags) :]


def pairs_from_masks(keep_pos: Tensor, keep_neg: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(a1, p, a2, n) index tensors of the selected (non-zero) positive and negative pairs,
    with one read from the device for both sizes (see :func:`nonzero_lists`)."""
    ((a1, p), (a2, n)), _ = nonzero_lists([keep_pos, keep_neg])
    return a1, p, a2, n


def _empty_indices(device: torch.device, count: int) -> tuple[Tensor, ...]:
    return tuple(torch.empty(0, dtype=torch.long, device=device) for _ in range(count))


def _uniform(
    shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device
) -> Tensor:
    """Float64 draws from [0, 1) on ``device``, from ``generator`` (on its own device, which
    may differ from the data's) or from the global generator of ``device``."""
    source = device if generator is None else generator.device
    draws = torch.rand(shape, generator=generator, device=source, dtype=torch.float64)
    return draws.to(device)


def angular_triplets(
    query: Tensor,
    ref: Tensor,
    pos: Tensor,
    neg: Tensor,
    angle: float,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> tuple[Tensor, Tensor, Tensor]:
    """Triplets whose angle at the negative exceeds ``angle`` (Wang et al. 2017): with
    c = (a + p)/2, the angle is ``atan(‖a − p‖ / (2‖n − c‖))``, measured between the
    embeddings as given.

    Works in blocks of positive pairs against every reference, so temporaries stay bounded
    by ``chunk_elements``, and lists them with one host read
    (:func:`.triplets.list_triplets_blockwise`).

    Args:
        query: (N, D) anchor embeddings.
        ref: (M, D) reference embeddings (``query`` itself for a batch against itself).
        pos: 0/1 (N, M) positive pairs.
        neg: 0/1 (N, M) negative pairs.
        angle: Threshold in radians (strict).
        chunk_elements: Upper bound on the elements of each block's temporaries.

    Returns:
        (a, p, n) index tensors, ordered by anchor, then positive, then negative.
    """
    anchors, positives = pos.nonzero(as_tuple=True)
    if anchors.numel() == 0 or ref.shape[0] == 0:
        return _empty_indices(query.device, 3)  # type: ignore[return-value]
    ap = (query[anchors] - ref[positives]).norm(dim=1)

    def select(block: slice) -> Tensor:
        a = anchors[block]
        centres = (query[a] + ref[positives[block]]) / 2
        nc = squared_euclidean_distance_matrix(centres, ref).sqrt_()
        angles = torch.atan(ap[block, None] / nc.mul_(2))
        return (angles > angle).logical_and_(neg[a] > 0)

    return list_triplets_blockwise(select, anchors, positives, ref.shape[0], chunk_elements)


def _extreme_per_row(
    sim: Tensor, candidates: Tensor, largest: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """Each row's largest (or smallest) candidate: (values, columns, found), with ∓inf values
    where a row has no candidate."""
    if sim.shape[1] == 0:
        fill = sim.new_full((sim.shape[0],), -math.inf if largest else math.inf)
        return (
            fill,
            torch.zeros_like(fill, dtype=torch.long),
            torch.zeros_like(fill, dtype=torch.bool),
        )
    masked = sim.masked_fill(~candidates, -math.inf if largest else math.inf)
    values, columns = masked.max(1) if largest else masked.min(1)
    return values, columns, candidates.any(1)


def easy_hard_pairs(
    sim: Tensor,
    pos: Tensor,
    neg: Tensor,
    pos_strategy: EasyHardStrategy,
    neg_strategy: EasyHardStrategy,
    pos_range: tuple[float, float] | None = None,
    neg_range: tuple[float, float] | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """PML's ``BatchEasyHardMiner`` rule: per anchor, one positive and one negative chosen by
    strategy, or every pair of a side whose strategy is ``"all"``.

    On the similarity-like matrix: a ``"hard"`` positive is the least similar, an ``"easy"``
    one the most similar; a ``"hard"`` negative is the most similar, an ``"easy"`` one the
    least similar. ``"semihard"`` is the hard choice among the pairs on the right side of the
    other side's choice: positives strictly more similar than the chosen negative, or
    negatives strictly less similar than the chosen positive. A range keeps only the pairs
    with ``low ≤ sim ≤ high``.

    Args:
        sim: (N, M) similarity-like matrix.
        pos: 0/1 (N, M) positive pairs.
        neg: 0/1 (N, M) negative pairs.
        pos_strategy: ``"hard"``, ``"semihard"``, ``"easy"`` or ``"all"``.
        neg_strategy: Likewise; ``"semihard"`` on both sides, or with ``"all"``, is undefined.
        pos_range: (low, high) allowed similarities of the positives, or None.
        neg_range: (low, high) allowed similarities of the negatives, or None.

    Returns:
        (a1, p, a2, n): with no ``"all"`` side, one (positive, negative) per anchor that has
        both, as (a, p, a, n); an ``"all"`` side lists every pair of that side.
    """
    pos_candidates, neg_candidates = pos > 0, neg > 0
    for candidates, allowed in ((pos_candidates, pos_range), (neg_candidates, neg_range)):
        if allowed is not None:
            candidates &= (sim >= allowed[0]) & (sim <= allowed[1])

    def pick_positive(threshold: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        candidates = (
            pos_candidates if threshold is None else pos_candidates & (sim > threshold[:, None])
        )
        return _extreme_per_row(sim, candidates, largest=pos_strategy == "easy")

    def pick_negative(threshold: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        candidates = (
            neg_candidates if threshold is None else neg_candidates & (sim < threshold[:, None])
        )
        return _extreme_per_row(sim, candidates, largest=neg_strategy != "easy")

    pos_pick: tuple[Tensor, Tensor, Tensor] | None = None
    neg_pick: tuple[Tensor, Tensor, Tensor] | None = None
    if pos_strategy == "semihard":
        neg_pick = pick_negative(None)
        pos_pick = pick_positive(neg_pick[0])
    elif neg_strategy == "semihard":
        pos_pick = pick_positive(None)
        neg_pick = pick_negative(pos_pick[0])
    else:
        pos_pick = None if pos_strategy == "all" else pick_positive(None)
        neg_pick = None if neg_strategy == "all" else pick_negative(None)
    if pos_pick is None or neg_pick is None:
        # An "all" side lists its candidates, a chosen side the rows where it found one.
        sides = [(pos_candidates, pos_pick), (neg_candidates, neg_pick)]
        masks = [candidates if pick is None else pick[2] for candidates, pick in sides]
        listed, _ = nonzero_lists(masks)
        pairs: list[Tensor] = []
        for found, (_, pick) in zip(listed, sides, strict=True):
            pairs += [found[0], found[1] if pick is None else pick[1][found[0]]]
        a1, p, a2, n = pairs
        return a1, p, a2, n
    anchors = (pos_pick[2] & neg_pick[2]).nonzero().squeeze(1)
    return anchors, pos_pick[1][anchors], anchors.clone(), neg_pick[1][anchors]


def hardest_fraction(values: Tensor, fraction: float, largest: bool) -> Tensor:
    """Positions of the ``ceil(fraction · len(values))`` largest (or smallest) values: HDC's
    filter (Yuan et al. 2017), over one side's pairs of the whole batch.

    Args:
        values: (K,) similarity-like values of one side's candidate pairs.
        fraction: Share of the pairs to keep, in (0, 1].
        largest: Keep the most similar (negatives) rather than the least similar (positives).

    Returns:
        (k,) positions into ``values``, in no particular order.
    """
    k = math.ceil(fraction * values.numel())
    return torch.topk(values, k, largest=largest, sorted=False).indices


def _linspace(low: Tensor, high: Tensor, steps: int) -> Tensor:
    """``torch.linspace(low[k], high[k], steps)`` for each k, left on the device:
    ``torch.linspace`` reads tensor endpoints to the host. Same arithmetic: the step in the
    endpoints' dtype, each point a fused multiply-add from the nearer endpoint.

    Args:
        low: (K,) first points.
        high: (K,) last points.
        steps: Number of points, at least 2.

    Returns:
        (K, steps) points.
    """
    low, high = low[:, None], high[:, None]
    step = (high - low) / (steps - 1)
    index = torch.arange(steps, dtype=low.dtype, device=low.device)
    from_low = torch.addcmul(low, step, index)
    from_high = torch.addcmul(high, step, index - (steps - 1))
    return torch.where(index < steps // 2, from_low, from_high)


def _histogram_bins(
    values: Tensor, group: Tensor, n_groups: int, num_bins: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Each value's bin among its group's PML edges (see :func:`histogram_bins`), reading
    nothing from the device.

    The bin is estimated arithmetically and stepped once onto the edges' own bin, which is
    exact when the estimate misses by at most a bin: when the step between edges exceeds
    twice the rounding of the values and edges, as the flag returned checks.

    Args:
        values: (K,) values.
        group: (K,) long group of each value, in [0, n_groups).
        n_groups: Number of groups.
        num_bins: Number of bins per group.

    Returns:
        (edges, bins, inexact): (n_groups, num_bins + 1) edges, (K,) bins (exact unless the
        group's flag is set) and (n_groups,) bool flags of the groups whose range is too
        narrow for the estimate (a few units in the last place wide).
    """
    empty = values.new_full((n_groups,), math.inf)
    low = empty.scatter_reduce(0, group, values, "amin")
    high = empty.neg().scatter_reduce(0, group, values, "amax")
    edges = _linspace(low, high, num_bins + 1)
    span = high - low
    step = span / num_bins
    # A group of one value (span 0) falls in the last bin, as PML's closed last bin has it.
    bins = (values - low[group]).div_(step[group]).nan_to_num_(num_bins - 1.0, num_bins - 1.0)
    bins = bins.long().clamp_(0, num_bins - 1)
    flat = edges.view(-1)
    at = group * (num_bins + 1) + bins
    below = values < flat[at]
    above = (values >= flat[at + 1]).logical_and_(bins < num_bins - 1)
    bins.sub_(below.long()).add_(above.long())
    magnitude = torch.maximum(low.abs(), high.abs())
    ulp = torch.nextafter(magnitude, magnitude.new_full((), math.inf)) - magnitude
    inexact = (span > 0) & (4 * ulp >= step) | (num_bins * torch.finfo(values.dtype).eps > 0.25)
    return edges, bins, inexact


def _searched_bins(values: Tensor, edges: Tensor) -> Tensor:
    # Exact whatever the range, but several times slower than the arithmetic estimate.
    return torch.searchsorted(edges[1:-1].contiguous(), values, right=True)


def histogram_bins(values: Tensor, num_bins: int) -> Tensor:
    """The bin of each value among ``num_bins`` equal-width bins spanning [min, max]: bin b
    holds ``edge_b ≤ v < edge_{b+1}``, the last bin also its upper edge.

    The edges are ``torch.linspace(min, max, num_bins + 1)`` in the values' dtype, as PML's
    ``UniformHistogramMiner`` draws them, so a value on an edge, or in a range too narrow for
    the dtype, falls in PML's bin.

    Args:
        values: (K,) non-empty values.
        num_bins: Number of bins.

    Returns:
        (K,) bin indices in [0, num_bins).
    """
    group = torch.zeros_like(values, dtype=torch.long)
    edges, bins, inexact = _histogram_bins(values, group, 1, num_bins)
    return _searched_bins(values, edges[0]) if bool(inexact) else bins


def uniform_histogram_pairs(
    values: Tensor,
    sides: list[Tensor],
    num_bins: int,
    per_bin: list[int],
    generator: torch.Generator | None = None,
) -> list[Tensor]:
    """For each side (a set of the values), ``per_bin`` draws from every non-empty bin of
    :func:`histogram_bins` over that side's values, uniformly among the bin's values and
    with replacement: samples whose values spread evenly over their range. One read from the
    device sizes them all (two when a side's range is a few units in the last place wide).

    Args:
        values: (K,) values.
        sides: Disjoint (K,) bool masks, one per side.
        num_bins: Number of equal-width bins per side.
        per_bin: Draws from each non-empty bin, one number per side.
        generator: Source of randomness; the global one when None.

    Returns:
        For each side, (per_bin · non-empty bins,) positions into ``values``, bin by bin in
        increasing order.
    """
    if values.numel() == 0:
        return list(_empty_indices(values.device, len(sides)))
    n_sides = len(sides)
    # Values of no side form one more group, binned and counted but never drawn.
    group = torch.full_like(values, n_sides, dtype=torch.long)
    for s, side in enumerate(sides):
        group.masked_fill_(side, s)
    edges, bins, inexact = _histogram_bins(values, group, n_sides + 1, num_bins)
    keys = group.mul_(num_bins).add_(bins)
    n_keys = n_sides * num_bins

    def filled_bins(keys: Tensor) -> tuple[Tensor, Tensor]:
        counts = index_counts(keys, n_keys + num_bins)[:n_keys]
        return counts, counts.view(n_sides, num_bins) > 0

    counts, filled = filled_bins(keys)
    read = read_sizes(filled.sum(1), inexact[:n_sides])
    if any(read[n_sides:]):
        for s, side in enumerate(sides):
            if read[n_sides + s]:
                searched = _searched_bins(values, edges[s]) + s * num_bins
                keys = torch.where(side, searched, keys)
        counts, filled = filled_bins(keys)
        read = read_sizes(filled.sum(1))
    # Sorting narrow integers is several times faster than sorting int64.
    narrow = torch.int16 if n_keys + num_bins <= torch.iinfo(torch.int16).max else torch.int32
    by_key = torch.argsort(keys.to(narrow), stable=True)
    starts = counts.cumsum(0) - counts
    sampled: list[Tensor] = []
    for s, draws_per_bin in enumerate(per_bin):
        bins = torch.nonzero_static(filled[s], size=int(read[s])).squeeze(1) + s * num_bins
        size = counts[bins, None]
        draws = _uniform((bins.numel(), draws_per_bin), generator, values.device)
        offsets = torch.minimum(draws.mul_(size).long(), size - 1)
        sampled.append(by_key[(starts[bins, None] + offsets).flatten()])
    return sampled


def uniform_histogram_sample(
    values: Tensor, num_bins: int, per_bin: int, generator: torch.Generator | None = None
) -> Tensor:
    """``per_bin`` draws from every non-empty bin of :func:`histogram_bins`, uniformly among the
    bin's values and with replacement: a sample whose values spread evenly over their range.

    Args:
        values: (K,) values of one side's candidate pairs.
        num_bins: Number of equal-width bins.
        per_bin: Draws from each non-empty bin.
        generator: Source of randomness; the global one when None.

    Returns:
        (per_bin · non-empty bins,) positions into ``values``, bin by bin in increasing order.
    """
    every = torch.ones_like(values, dtype=torch.bool)
    (sample,) = uniform_histogram_pairs(values, [every], num_bins, [per_bin], generator)
    return sample


def distance_weighted_negative_weights(
    dist: Tensor,
    neg: Tensor,
    dim: int,
    cutoff: float = 0.5,
    nonzero_loss_cutoff: float = 1.4,
) -> Tensor:
    """Distance-weighted sampling weights of the negatives (Wu et al. 2017, §4): on the unit
    sphere in ``dim`` dimensions pairwise distances have density
    q(d) ∝ d^(dim−2) (1 − d²/4)^((dim−3)/2); a negative is drawn with probability ∝ 1/q(d),
    with d clamped below at ``cutoff``, and never at d ≥ ``nonzero_loss_cutoff``.

    Each row is scaled so its largest weight is 1 (a row with no usable negative is all
    zero), so no row underflows whatever its distances.

    Args:
        dist: (N, M) Euclidean distances between unit vectors.
        neg: 0/1 (N, M) negative pairs.
        dim: The embeddings' dimension.
        cutoff: Lower clamp of the distances.
        nonzero_loss_cutoff: Distances at or beyond it get weight 0.

    Returns:
        (N, M) non-negative weights, 0 outside the negatives; not normalised.
    """
    if dist.shape[1] == 0:
        return torch.zeros_like(dist)
    d = dist.clamp_min(cutoff)
    log_w = (2.0 - dim) * d.log() - ((dim - 3.0) / 2.0) * torch.log1p(-0.25 * d.square())
    usable = (neg > 0) & (d < nonzero_loss_cutoff) & log_w.isfinite()
    log_w.masked_fill_(~usable, -math.inf)
    row_max = log_w.amax(1, keepdim=True)
    return torch.where(usable, (log_w - row_max).exp_(), 0.0)


def random_triplets(
    pos: Tensor,
    neg_weights: Tensor,
    per_anchor: Tensor,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``per_anchor[i]`` random triplets for each anchor i with a positive and a non-zero
    negative weight: each draws its positive uniformly among the anchor's positives and its
    negative with probability ∝ ``neg_weights[i]``, with replacement.

    Args:
        pos: 0/1 (N, M) positive pairs.
        neg_weights: (N, M) non-negative weights of the negatives (0 elsewhere).
        per_anchor: (N,) integer number of triplets wanted per anchor.
        generator: Source of randomness; the global one when None.

    Returns:
        (a, p, n) index tensors, anchors in increasing order, each anchor's triplets together.
    """
    device = pos.device
    positive = pos > 0
    n_pos = positive.sum(1)
    drawn = ((n_pos > 0) & (neg_weights.sum(1) > 0)) * per_anchor.clamp_min(0)
    # Every size in one read: the anchors drawing, the most triplets of one, and in all.
    widest = drawn.max() if drawn.numel() else drawn.new_zeros(())
    n_rows, width, total = (int(x) for x in read_sizes((drawn > 0).sum(), widest, drawn.sum()))
    if n_rows == 0:
        return _empty_indices(device, 3)  # type: ignore[return-value]
    rows = torch.nonzero_static(drawn, size=n_rows).squeeze(1)
    count = drawn[rows]
    draws = _uniform((2, n_rows, width), generator, device)
    # The j-th positive of a row is the first column where the running count of positives
    # passes j; a negative is the first column where the running weight passes a uniform draw.
    j = torch.minimum((draws[0] * n_pos[rows, None]).long(), n_pos[rows, None] - 1)
    p = torch.searchsorted(positive[rows].long().cumsum(1), j, right=True)
    cdf = neg_weights[rows].double().cumsum(1)
    n = torch.searchsorted(cdf.div_(cdf[:, -1:]), draws[1], right=True)
    kept = torch.arange(width, device=device) < count[:, None]
    kept = torch.nonzero_static(kept.view(-1), size=total).squeeze(1)
    a = rows.repeat_interleave(count, output_size=total)
    return a, p.view(-1)[kept], n.view(-1)[kept]


def packaged_triplets(n: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """The triplets (3k, 3k + 1, 3k + 2) of a batch laid out as consecutive triplets.

    Args:
        n: Batch size, a multiple of 3.
        device: Device of the indices.

    Returns:
        (a, p, n) index tensors.
    """
    anchors = torch.arange(0, n, 3, device=device)
    return anchors, anchors + 1, anchors + 2


__all__ = [
    "AdaptiveTolerances",
    "EasyHardStrategy",
    "adaptive_tolerance_values",
    "adaptive_tolerances",
    "angular_triplets",
    "asymmetric_mining_masks",
    "batch_hard_triplets",
    "distance_weighted_negative_weights",
    "easy_hard_pairs",
    "hardest_fraction",
    "histogram_bins",
    "nonzero_lists",
    "packaged_triplets",
    "pairs_from_masks",
    "random_triplets",
    "read_sizes",
    "tolerances_from_ratio",
    "uniform_histogram_pairs",
    "uniform_histogram_sample",
]
