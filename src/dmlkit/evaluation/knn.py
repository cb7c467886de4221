"""k-nearest-neighbour search for retrieval evaluation: exact and streaming in torch, or faiss.

Both backends yield the neighbour lists one block of queries at a time (:class:`NeighbourBlock`),
so metrics can be computed and the lists dropped without ever holding an N×N matrix.

**Ranking.** Neighbours are ranked by a score, higher is nearer: minus half the squared Euclidean
distance (``"euclidean"``, the ranking of PML's default faiss ``IndexFlatL2``), cosine similarity
(``"cosine"``) or the dot product (``"dot"``). Equal scores are broken by the lower reference index,
so the lists are deterministic and independent of block sizes.

**Self-exclusion.** When the reference set includes the queries, query ``i`` is reference ``i``
and is removed by index, never by value: a duplicate of the query stays a neighbour.

**The exact torch search** computes the score matrix in tiles of ``block_size × block_size``. Each
tile is reduced to the maxima of small groups of columns; only groups whose maximum can still enter
a query's current top k are gathered, so the selection costs far less than a sort. When the
queries are their own references, each tile above the diagonal serves both its rows and, transposed,
its columns, halving the matrix products.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

Metric = Literal["euclidean", "cosine", "dot"]
METRICS: tuple[Metric, ...] = ("euclidean", "cosine", "dot")
IndexKind = Literal["flat", "ivf", "hnsw"]

_LOW32 = 0xFFFFFFFF
# The top-k lists of all queries are kept whole (symmetric search) only below this size.
_MAX_LIST_BYTES = 1 << 30
_LOWEST_FLOAT = torch.finfo(torch.float32).min
# Columns per group of the maxima filter for lists already full: coarse enough that the filter
# reads a small mask, fine enough that a group with a hit gathers few scores.
_FILTER_GROUP = 16


@dataclass(frozen=True)
class NeighbourBlock:
    """The nearest references of a contiguous block of queries, nearest first.

    Attributes:
        start: Index of the block's first query.
        indices: (B, k) int64 reference indices.
        scores: (B, k) float32 scores, higher is nearer (see the module docstring).
        best_positive: (B,) float32 score of each query's best same-label reference, when the
            search tracked it (labels given to the torch backend), else None. It is exact whenever
            it is at least ``scores[:, -1]``; otherwise it is only known to be below that.
    """

    start: int
    indices: Tensor
    scores: Tensor
    best_positive: Tensor | None


def _check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")


def _prepared(x: Tensor, metric: Metric) -> tuple[Tensor, Tensor]:
    """Float32 embeddings and the per-row offset h with score(i, j) = x_i · x_j − h_i − h_j."""
    x = x.float()
    if metric == "cosine":
        x = F.normalize(x, dim=1)
    # The largest score magnitude is at most max ‖x‖²; it must stay finite in float32.
    half_sq = x.pow(2).sum(1).mul_(0.5)
    if x.shape[0] and not bool(torch.isfinite(half_sq.max() * 2)):
        raise ValueError(
            "embeddings are too large for float32 scores (a squared norm overflows); "
            "rescale them (retrieval by Euclidean or cosine ranking does not depend on scale)"
        )
    return x, half_sq if metric == "euclidean" else x.new_zeros(x.shape[0])


def _encode(scores: Tensor, indices: Tensor) -> Tensor:
    """One int64 per entry that orders by score descending, then by index ascending.

    The float's bits are mapped to an int32 with the same order (negative floats flip their
    magnitude bits) and put above the complemented index, so one ``topk`` on the keys gives the
    exact tie-broken order. ``+ 0.0`` turns −0.0 into +0.0, which compare equal as floats.
    """
    bits = (scores + 0.0).view(torch.int32)
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    return (ordered.to(torch.int64) << 32) | (_LOW32 - indices)


def _decode_scores(keys: Tensor) -> Tensor:
    ordered = (keys >> 32).to(torch.int32)
    return (ordered ^ ((ordered >> 31) & 0x7FFFFFFF)).view(torch.float32)


def _decode_indices(keys: Tensor) -> Tensor:
    return _LOW32 - (keys & _LOW32)


class _TopK:
    """Running exact top-k lists of a set of query rows, fed one score tile at a time."""

    def __init__(
        self,
        n_rows: int,
        k: int,
        device: torch.device,
        query_labels: Tensor | None,
        ref_labels: Tensor | None,
        ref_index: Tensor | None = None,
    ) -> None:
        """Empty lists for ``n_rows`` queries.

        Args:
            n_rows: Number of query rows.
            k: List length.
            device: Device of the lists.
            query_labels: Labels of the rows, to track the best same-label score; or None.
            ref_labels: Labels of the tile columns' references; or None.
            ref_index: Reference index of each column position, when the references were
                reordered (the lists and their tie order use these indices); None for identity.
        """
        # The lowest key a real entry can beat: score −inf and an index no reference has.
        self._empty_key = _encode(
            torch.full((1,), -math.inf, device=device), torch.full((1,), _LOW32, device=device)
        )
        self.keys = self._empty_key.expand(n_rows, k).clone()
        self.k = k
        # Scores below a row's floor cannot enter its list; it only rises.
        self.floor = torch.full((n_rows,), -math.inf, device=device)
        self.query_labels = query_labels
        self.ref_labels = ref_labels
        self.ref_index = ref_index
        self.best_positive = (
            torch.full((n_rows,), -math.inf, device=device) if ref_labels is not None else None
        )

    def update(self, tile: Tensor, transposed: bool, row0: int, n_rows: int, col0: int) -> None:
        """Merges one tile of scores into the lists.

        Args:
            tile: A contiguous (rows, cols) score tile.
            transposed: Whether the lists' rows are the tile's columns.
            row0: List row of the tile's first row (or column, when transposed).
            n_rows: How many of those rows are real queries (the rest is padding).
            col0: Reference index of the tile's first column (or row, when transposed).
        """
        view = tile.T if transposed else tile
        n_cols = view.shape[1]
        # Finite floors keep out −inf scores: self-matches and padding, never needed since
        # k is at most the number of real references.
        floor = self.floor[row0 : row0 + n_rows]
        if bool(torch.isfinite(floor).all()):
            # Full lists take few scores of a tile: coarse groups filter them fastest.
            found = self._candidates(tile, transposed, n_rows, floor, _filter_group(n_cols), 0)
        else:
            # Lists still filling need fine groups for a bound on the tile's k-th score (the
            # lists of one tile's rows have seen the same tiles, so they fill together).
            found = self._candidates(tile, transposed, n_rows, floor, *_group_sizes(n_cols, self.k))
        rows, cols, values = found
        if rows.shape[0] == 0:
            return
        cols = cols + col0
        if self.best_positive is not None:
            assert self.query_labels is not None and self.ref_labels is not None
            positive = self.ref_labels[cols] == self.query_labels[rows + row0]
            self.best_positive.scatter_reduce_(0, rows[positive] + row0, values[positive], "amax")
        indices = cols if self.ref_index is None else self.ref_index[cols]
        self._merge(rows + row0, _encode(values, indices))

    def _candidates(
        self, tile: Tensor, transposed: bool, n_rows: int, floor: Tensor, group: int, merge: int
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The (row, column, score) entries of a tile that may enter the lists, rows ascending.

        Args:
            tile: A contiguous score tile.
            transposed: Whether the lists' rows are the tile's columns.
            n_rows: Real query rows (the rest is padding).
            floor: (n_rows,) the lowest score each list can still take (−inf while filling).
            group: Columns per group of the maxima filter.
            merge: Groups per coarse group for the bound on filling lists; 0 for no bound.
        """
        view = tile.T if transposed else tile
        scores = view[:n_rows]
        n_cols = scores.shape[1]
        floor = floor.clamp_min(_LOWEST_FLOAT)
        n_groups = n_cols // group
        # Group g holds columns g, g + n_groups, g + 2·n_groups, …: interleaved, so each group
        # maximum is an elementwise maximum of contiguous slabs, the fast reduction.
        if transposed:
            group_max = tile.view(group, n_groups, tile.shape[1]).amax(0).T[:n_rows]
        else:
            group_max = scores.view(n_rows, group, n_groups).amax(1)
        if merge and n_groups >= self.k:
            # Lists still filling would take every score of the tile. But any k group maxima
            # are k scores of the tile, so the k-th largest maximum of coarser groups
            # (``merge`` groups each) bounds the tile's k-th score from below.
            coarse = group_max.view(n_rows, merge, n_groups // merge).amax(1)
            bound = coarse.topk(self.k, dim=1, sorted=False).values.amin(1)
            floor = torch.maximum(floor, bound)
        hits = (group_max >= floor[:, None]).nonzero()
        hit_rows = hits[:, 0]
        cols = hits[:, 1:] + torch.arange(0, n_cols, n_groups, device=tile.device)
        values = torch.take(tile, hit_rows[:, None] * view.stride(0) + cols * view.stride(1))
        keep = (values >= floor[hit_rows][:, None]).flatten().nonzero().squeeze(1)
        return hit_rows[keep // group], cols.flatten()[keep], values.flatten()[keep]

    def _merge(self, rows: Tensor, keys: Tensor) -> None:
        """Merges candidate keys into the lists of ``rows`` (sorted ascending, repeats allowed)."""
        unique_rows, counts = torch.unique_consecutive(rows, return_counts=True)
        starts = torch.cumsum(counts, 0) - counts
        slot = torch.arange(rows.shape[0], device=rows.device) - torch.repeat_interleave(
            starts, counts
        )
        which = torch.repeat_interleave(
            torch.arange(unique_rows.shape[0], device=rows.device), counts
        )
        padded = self._empty_key.expand(unique_rows.shape[0], int(counts.max())).clone()
        padded[which, slot] = keys
        merged = torch.cat([self.keys[unique_rows], padded], 1).topk(self.k, dim=1).values
        self.keys[unique_rows] = merged
        self.floor[unique_rows] = _decode_scores(merged[:, -1])

    def block(self, rows: slice | Tensor, start: int) -> NeighbourBlock:
        """The lists of ``rows`` (positions in these lists) as the block of queries at ``start``."""
        keys = self.keys[rows]
        best = None if self.best_positive is None else self.best_positive[rows]
        return NeighbourBlock(start, _decode_indices(keys), _decode_scores(keys), best)


def _filter_group(n_cols: int) -> int:
    """Columns per group for lists already full: the largest power of two up to
    :data:`_FILTER_GROUP` that divides the row."""
    group = _FILTER_GROUP
    while n_cols % group:
        group //= 2
    return group


def _group_sizes(n_cols: int, k: int) -> tuple[int, int]:
    """Columns per group, and groups per coarse group for the tile's lower bound.

    Groups are small enough that k of them (what a list that is still filling gathers) are a
    small part of a row, and coarse groups number at least 2k where possible.
    """
    group = 64
    while group > 1 and (group * k * 8 > n_cols or n_cols % group):
        group //= 2
    n_groups = n_cols // group
    merge = 1
    while n_groups % (2 * merge) == 0 and n_groups // (2 * merge) >= 2 * k:
        merge *= 2
    return group, merge


def _padded(x: Tensor, offset: Tensor, size: int) -> tuple[Tensor, Tensor]:
    """Pads rows to ``size`` with zero embeddings whose offset +inf gives them score −inf."""
    n = x.shape[0]
    if n == size:
        return x, offset
    xp = x.new_zeros(size, x.shape[1])
    xp[:n] = x
    hp = offset.new_full((size,), math.inf)
    hp[:n] = offset
    return xp, hp


def _score_tile(out: Tensor, q: Tensor, hq: Tensor, r: Tensor, hr: Tensor) -> Tensor:
    torch.addmm(hr.neg().unsqueeze(0), q, r.T, out=out)
    return out.sub_(hq.unsqueeze(1))


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


class TorchKNN:
    """Exact k-nearest neighbours in torch, streamed over tiles; runs where the embeddings are.

    Memory is bounded by a few ``block_size × block_size`` float32 tiles (64 MiB each at the
    default 4096) plus the k-neighbour lists, whatever the number of items.

    Args:
        metric: ``"euclidean"`` (default, as PML's faiss ``IndexFlatL2``), ``"cosine"`` or
            ``"dot"``.
        block_size: Side of the score tiles, in queries and references.
    """

    exact = True

    def __init__(self, metric: Metric = "euclidean", block_size: int = 4096) -> None:
        _check_metric(metric)
        if not isinstance(block_size, int) or block_size < 8:
            raise ValueError(f"block_size must be an integer of at least 8, got {block_size!r}")
        self.metric: Metric = metric
        self.block_size = block_size

    @property
    def description(self) -> str:
        return f"exact kNN in torch ({self.metric})"

    def search(
        self,
        query: Tensor,
        k: int,
        reference: Tensor | None = None,
        *,
        ref_includes_query: bool = False,
        query_labels: Tensor | None = None,
        reference_labels: Tensor | None = None,
    ) -> Iterator[NeighbourBlock]:
        """Yields the k nearest references of every query, in blocks of consecutive queries.

        Args:
            query: (Q, D) query embeddings.
            k: Number of neighbours (at most the number of references, minus one when the
                reference set includes the queries).
            reference: (R, D) reference embeddings; the queries themselves when None, in which
                case each query's own index is excluded.
            ref_includes_query: With an explicit reference, whether its first Q rows are the
                queries (each query's own index is then excluded).
            query_labels: Optional (Q,) labels; with ``reference_labels``, the search also tracks
                each query's best same-label score (``NeighbourBlock.best_positive``).
            reference_labels: Optional (R,) labels of the references.

        Yields:
            One :class:`NeighbourBlock` per block of queries, in query order.
        """
        exclude_self = reference is None or ref_includes_query
        symmetric = reference is None
        ref = query if reference is None else reference
        available = ref.shape[0] - int(exclude_self)
        if not isinstance(k, int) or not 1 <= k <= available:
            raise ValueError(f"k must be an integer in [1, {available}] here, got {k!r}")
        if reference is None:
            reference_labels = query_labels
        track = query_labels is not None and reference_labels is not None
        q_labels = query_labels if track else None
        r_labels = reference_labels if track else None
        n_ref = ref.shape[0]
        if k * 16 > n_ref:
            yield from self._dense(query, ref, k, exclude_self, q_labels, r_labels)
        elif symmetric and query.shape[0] * k * 8 <= _MAX_LIST_BYTES:
            yield from self._symmetric(query, k, q_labels)
        else:
            yield from self._streamed(query, ref, k, exclude_self, q_labels, r_labels)

    def _tile_size(self, n: int) -> int:
        """At most ``block_size``, a multiple of 64 (8 for small blocks), near-equal tiles."""
        align = 64 if self.block_size >= 64 else 8
        block = self.block_size // align * align
        n_tiles = -(-n // block)
        return _round_up(-(-n // n_tiles), align)

    def _symmetric(self, x: Tensor, k: int, labels: Tensor | None) -> Iterator[NeighbourBlock]:
        n = x.shape[0]
        tile_size = self._tile_size(n)
        size = _round_up(n, tile_size)
        # Sorted by label, a class sits in one or two tiles; visiting the diagonal tiles first
        # then fills each list with most of its class, a high floor that lets later tiles pass
        # few candidates. Keys keep the original indices, so the order changes no result.
        order = None
        if labels is not None:
            order = torch.argsort(labels, stable=True)
            x, labels = x[order], labels[order]
        emb, offset = _padded(*_prepared(x, self.metric), size)
        lists = _TopK(size, k, emb.device, labels, labels, ref_index=order)
        tile = emb.new_empty(tile_size, tile_size)
        starts = range(0, size, tile_size)
        pairs = [(i, i) for i in starts] + [(i, j) for i in starts for j in starts if j > i]
        for i, j in pairs:
            rows_i = max(0, min(tile_size, n - i))
            rows_j = max(0, min(tile_size, n - j))
            _score_tile(
                tile,
                emb[i : i + tile_size],
                offset[i : i + tile_size],
                emb[j : j + tile_size],
                offset[j : j + tile_size],
            )
            if i == j:
                tile.fill_diagonal_(-math.inf)
            if rows_i:
                lists.update(tile, False, i, rows_i, j)
            if i != j and rows_j:
                lists.update(tile, True, j, rows_j, i)
        position: Tensor | None = None  # where each query's list sits
        if order is not None:
            position = torch.empty_like(order)
            position[order] = torch.arange(n, device=order.device)
        for start in range(0, n, tile_size):
            stop = min(n, start + tile_size)
            rows = slice(start, stop) if position is None else position[start:stop]
            yield lists.block(rows, start)

    def count_above_best_positive(
        self,
        query: Tensor,
        query_labels: Tensor,
        reference: Tensor,
        reference_labels: Tensor,
        self_index: Tensor | None = None,
    ) -> Tensor:
        """Per query, how many references score strictly above its best same-label reference.

        Two streamed passes over the references (the best same-label score, then the count),
        for the few queries whose neighbour lists are too short to tell (Recall@K for large K).

        Args:
            query: (Q, D) query embeddings.
            query_labels: (Q,) labels.
            reference: (R, D) references.
            reference_labels: (R,) their labels.
            self_index: (Q,) each query's own reference index, excluded; None for none.

        Returns:
            (Q,) int64 counts (all references when a query has no same-label reference).
        """
        q_emb, q_offset = _prepared(query, self.metric)
        r_emb, r_offset = _prepared(reference, self.metric)
        tile_size = self._tile_size(max(query.shape[0], reference.shape[0]))
        best = torch.full((query.shape[0],), -math.inf, device=query.device)
        count = torch.zeros(query.shape[0], dtype=torch.long, device=query.device)
        for counting in (False, True):
            for i in range(0, query.shape[0], tile_size):
                rows = slice(i, i + tile_size)
                for j in range(0, reference.shape[0], tile_size):
                    cols = slice(j, j + tile_size)
                    scores = _score_tile(
                        q_emb.new_empty(q_emb[rows].shape[0], r_emb[cols].shape[0]),
                        q_emb[rows], q_offset[rows], r_emb[cols], r_offset[cols],
                    )  # fmt: skip
                    if self_index is not None:
                        local = self_index[rows] - j
                        own = ((local >= 0) & (local < scores.shape[1])).nonzero().squeeze(1)
                        scores[own, local[own]] = -math.inf
                    if counting:
                        count[rows] += (scores > best[rows, None]).sum(1)
                    else:
                        same = reference_labels[None, cols] == query_labels[rows, None]
                        best[rows] = torch.maximum(
                            best[rows], scores.masked_fill(~same, -math.inf).amax(1)
                        )
        return count

    def _streamed(
        self,
        query: Tensor,
        ref: Tensor,
        k: int,
        exclude_self: bool,
        query_labels: Tensor | None,
        ref_labels: Tensor | None,
    ) -> Iterator[NeighbourBlock]:
        n_query, n_ref = query.shape[0], ref.shape[0]
        tile_size = self._tile_size(max(n_query, n_ref))
        q_emb, q_offset = _prepared(query, self.metric)
        r_emb, r_offset = _padded(*_prepared(ref, self.metric), _round_up(n_ref, tile_size))
        tile = q_emb.new_empty(tile_size, tile_size)
        for i in range(0, n_query, tile_size):
            rows = min(tile_size, n_query - i)
            labels = None if query_labels is None else query_labels[i : i + rows]
            lists = _TopK(rows, k, q_emb.device, labels, ref_labels)
            for j in range(0, r_emb.shape[0], tile_size):
                scores = _score_tile(
                    tile[:rows], q_emb[i : i + rows], q_offset[i : i + rows],
                    r_emb[j : j + tile_size], r_offset[j : j + tile_size],
                )  # fmt: skip
                if exclude_self:
                    scores.diagonal(i - j).fill_(-math.inf)
                lists.update(scores, False, 0, rows, j)
            yield lists.block(slice(0, rows), i)

    def _dense(
        self,
        query: Tensor,
        ref: Tensor,
        k: int,
        exclude_self: bool,
        query_labels: Tensor | None,
        ref_labels: Tensor | None,
    ) -> Iterator[NeighbourBlock]:
        """Whole rows at a time, for lists that are a large part of the reference set."""
        q_emb, q_offset = _prepared(query, self.metric)
        r_emb, r_offset = _prepared(ref, self.metric)
        n_ref = ref.shape[0]
        rows_per_block = max(1, self.block_size * self.block_size // (4 * max(n_ref, 1)))
        ref_index = torch.arange(n_ref, device=ref.device)
        for i in range(0, query.shape[0], rows_per_block):
            rows = min(rows_per_block, query.shape[0] - i)
            scores = _score_tile(
                q_emb.new_empty(rows, n_ref), q_emb[i : i + rows], q_offset[i : i + rows],
                r_emb, r_offset,
            )  # fmt: skip
            if exclude_self:
                scores.diagonal(i).fill_(-math.inf)
            keys = _encode(scores, ref_index.expand(rows, n_ref)).topk(k, dim=1).values
            best = None
            if query_labels is not None and ref_labels is not None:
                same = ref_labels[None, :] == query_labels[i : i + rows, None]
                best = scores.masked_fill(~same, -math.inf).amax(1)
            yield NeighbourBlock(i, _decode_indices(keys), _decode_scores(keys), best)


class FaissKNN:
    """k-nearest neighbours with faiss (optional dependency ``faiss-cpu``), exact or approximate.

    Queries are searched in blocks, so only the k-neighbour lists of one block are held. Exact
    search (``index="flat"``) uses ``IndexFlatL2`` or ``IndexFlatIP``; ``"ivf"`` (inverted lists
    over k-means cells) and ``"hnsw"`` (a navigable small-world graph) are approximate and
    meant for millions of items. Their results say so (``exact`` is False).

    Equal scores are ordered as faiss returns them. Recall@K reads the lists for K up to their
    length and counts exactly (with :class:`TorchKNN`'s scores) for the queries whose lists hold
    no same-label item; with an approximate index, Recall@K therefore mixes both.

    Args:
        metric: ``"euclidean"``, ``"cosine"`` or ``"dot"``.
        index: ``"flat"`` (exact), ``"ivf"`` or ``"hnsw"``.
        nlist: IVF cells; default about 4·√N.
        nprobe: IVF cells visited per query.
        hnsw_m: HNSW graph degree.
        ef_search: HNSW search breadth (raised to at least k + 1).
        block_size: Queries per search call.
    """

    def __init__(
        self,
        metric: Metric = "euclidean",
        index: IndexKind = "flat",
        *,
        nlist: int | None = None,
        nprobe: int = 16,
        hnsw_m: int = 32,
        ef_search: int = 128,
        block_size: int = 16384,
    ) -> None:
        _check_metric(metric)
        if index not in ("flat", "ivf", "hnsw"):
            raise ValueError(f"unknown faiss index {index!r}; choose flat, ivf or hnsw")
        self.metric: Metric = metric
        self.index = index
        self.nlist = nlist
        self.nprobe = nprobe
        self.hnsw_m = hnsw_m
        self.ef_search = ef_search
        self.block_size = block_size
        self.exact = index == "flat"
        import_faiss()

    @property
    def description(self) -> str:
        detail = {
            "flat": "exact",
            "ivf": f"approximate IVF, nprobe {self.nprobe}",
            "hnsw": f"approximate HNSW, M {self.hnsw_m}, efSearch {self.ef_search}",
        }[self.index]
        return f"faiss {self.index} ({detail}, {self.metric})"

    def build(self, reference: Tensor) -> Any:
        """A faiss index filled with ``reference``, to search many times with :meth:`search_index`.

        Args:
            reference: (N, D) embeddings.

        Returns:
            The faiss index (``faiss.write_index`` saves it; ``faiss.read_index`` reads it back).
        """
        faiss = import_faiss()
        ref = np.ascontiguousarray(_prepared(reference.detach(), self.metric)[0].cpu().numpy())
        dim = ref.shape[1]
        inner = self.metric != "euclidean"
        measure = faiss.METRIC_INNER_PRODUCT if inner else faiss.METRIC_L2
        if self.index == "flat":
            index = faiss.IndexFlatIP(dim) if inner else faiss.IndexFlatL2(dim)
        elif self.index == "ivf":
            nlist = self.nlist or max(1, min(ref.shape[0] // 39, int(4 * math.sqrt(ref.shape[0]))))
            # faiss's Python wrapper keeps the quantizer alive as long as the index.
            quantizer = faiss.IndexFlatIP(dim) if inner else faiss.IndexFlatL2(dim)
            index = faiss.IndexIVFFlat(quantizer, dim, nlist, measure)
            index.train(ref)
        else:
            index = faiss.IndexHNSWFlat(dim, self.hnsw_m, measure)
        index.add(ref)
        return index

    def search(
        self,
        query: Tensor,
        k: int,
        reference: Tensor | None = None,
        *,
        ref_includes_query: bool = False,
        query_labels: Tensor | None = None,
        reference_labels: Tensor | None = None,
    ) -> Iterator[NeighbourBlock]:
        """Yields the k nearest references of every query; arguments as :meth:`TorchKNN.search`.

        Builds the index for this one search; :meth:`build` and :meth:`search_index` keep it.
        Same-label scores are not tracked (``best_positive`` is None).
        """
        del query_labels, reference_labels
        index = self.build(query if reference is None else reference)
        exclude_self = reference is None or ref_includes_query
        yield from self.search_index(index, query, k, exclude_self=exclude_self)

    def search_index(
        self, index: Any, query: Tensor, k: int, *, exclude_self: bool = False
    ) -> Iterator[NeighbourBlock]:
        """Yields the k nearest items of a built index for every query, in query blocks.

        Args:
            index: From :meth:`build` (or ``faiss.read_index``) with this metric.
            query: (Q, D) embeddings.
            k: Neighbours per query.
            exclude_self: Query i is item i of the index; leave it out of its own list.
        """
        self._set_search_breadth(index, k)
        device = query.device
        q_np = np.ascontiguousarray(_prepared(query.detach(), self.metric)[0].cpu().numpy())
        wanted = k + int(exclude_self)
        for i in range(0, q_np.shape[0], self.block_size):
            raw_scores, raw_indices = index.search(q_np[i : i + self.block_size], wanted)
            scores = torch.from_numpy(raw_scores)
            indices = torch.from_numpy(raw_indices)
            if self.metric == "euclidean":
                scores = scores.mul_(-0.5)
            if exclude_self:
                scores, indices = _drop_self(scores, indices, i)
            yield NeighbourBlock(i, indices.to(device), scores.to(device), None)

    def _set_search_breadth(self, index: Any, k: int) -> None:
        if self.index == "ivf":
            index.nprobe = min(self.nprobe, index.nlist)
        elif self.index == "hnsw":
            index.hnsw.efSearch = max(self.ef_search, k + 1)


def _drop_self(scores: Tensor, indices: Tensor, start: int) -> tuple[Tensor, Tensor]:
    """Removes each query's own index from its k + 1 list, or the last entry if it is absent."""
    own = torch.arange(start, start + indices.shape[0])
    is_self = indices == own[:, None]
    is_self[~is_self.any(1), -1] = True
    keep = ~is_self
    shape = (indices.shape[0], indices.shape[1] - 1)
    return scores[keep].view(shape), indices[keep].view(shape)


def import_faiss() -> ModuleType:
    """The faiss module, or an ImportError saying how to install it."""
    try:
        import faiss
    except ImportError as error:
        raise ImportError(
            "FaissKNN needs faiss: pip install faiss-cpu (or faiss-gpu); "
            "TorchKNN is the exact default and needs nothing more"
        ) from error
    return faiss


def faiss_available() -> bool:
    """Whether faiss can be imported."""
    try:
        import_faiss()
    except ImportError:
        return False
    return True
