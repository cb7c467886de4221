"""Retrieval evaluation on held-out classes: :func:`evaluate` and its typed result.

Each query retrieves from the reference set (by default the queries themselves, each query's
own index excluded). The neighbour lists are produced and consumed one block of queries at a
time, so the memory stays bounded however many items there are.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal, Protocol

import numpy as np
import torch
from torch import Tensor

from ..relations import PairRule, checked_masks
from ..validation import check_embeddings, check_labels
from . import metrics as M
from .clustering import KMeansFunction, clustering_scores
from .knn import (
    Metric,
    NeighbourBlock,
    TorchKNN,
    _decode_indices,
    _decode_scores,
    _encode,
    _prepared,
)

KNN_METRICS = (
    "precision_at_1",
    "precision_at_k",
    "recall_at_k",
    "r_precision",
    "mean_average_precision_at_r",
    "mean_average_precision",
    "mean_reciprocal_rank",
)
CLUSTERING_METRICS = ("NMI", "AMI")
ALL_METRICS = KNN_METRICS + CLUSTERING_METRICS
DEFAULT_METRICS = ("precision_at_1", "recall_at_k", "r_precision", "mean_average_precision_at_r")
# Recall@K cut-offs up to this are read off the neighbour lists; larger ones are counted for the
# queries whose lists are too short to tell.
_LISTED_RECALL = 32
_ABOVE = "_above"  # per-query values key of the Recall@K counts
_RELATION_BLOCK_ELEMENTS = 1 << 24  # scores per query block under a relation: 64 MiB
# From this many references on, the default Recall@K cut-offs are SOP's rather than CUB's.
LARGE_REFERENCE_SET = 10_000
Average = Literal["query", "class"]


class KNNBackend(Protocol):
    """What :func:`evaluate` needs of a neighbour search (:class:`TorchKNN`, :class:`FaissKNN`)."""

    exact: bool
    metric: Metric  # the ranking; Recall@K recounts with it where lists are too short

    @property
    def description(self) -> str: ...

    def search(
        self,
        query: Tensor,
        k: int,
        reference: Tensor | None = None,
        *,
        ref_includes_query: bool = False,
        query_labels: Tensor | None = None,
        reference_labels: Tensor | None = None,
    ) -> Iterator[NeighbourBlock]: ...


@dataclass(frozen=True)
class Requests:
    """Which per-query values to compute, and the list depths they need.

    Attributes:
        precision_at: Cut-offs k of precision at k (1 gives ``precision_at_1``).
        recall_at: Cut-offs K of Recall@K.
        r_precision: Whether to compute R-Precision.
        map_at_r: Whether to compute MAP@R.
        map_at: Cut-off of average precision at k (``mean_average_precision``); None for none.
        mrr_at: Cut-off of the reciprocal rank; None for none.
        r_cap: Longest list the R-based metrics may read (PML's ``k``); None for no cap.
    """

    precision_at: tuple[int, ...] = ()
    recall_at: tuple[int, ...] = ()
    r_precision: bool = False
    map_at_r: bool = False
    map_at: int | None = None
    mrr_at: int | None = None
    r_cap: int | None = None

    def depth(self, max_relevant: int) -> int:
        """The list length that serves every request."""
        r_depth = max_relevant if self.r_precision or self.map_at_r else 0
        if self.r_cap is not None:
            r_depth = min(r_depth, self.r_cap)
        listed_recall = [k for k in self.recall_at if k <= _LISTED_RECALL]
        cutoffs = (*self.precision_at, *listed_recall, self.map_at or 0, self.mrr_at or 0)
        return max(r_depth, *cutoffs, 1)


@dataclass(frozen=True)
class PerQuery:
    """Per-query metric values and what is needed to average them.

    Attributes:
        values: Metric name → (Q,) float64 values (meaningless at lone queries).
        labels: (Q,) query labels; None under a label relation (no classes).
        lone: (Q,) True where the query's label has no other item among the references.
        depth: Length of the neighbour lists that were searched.
    """

    values: dict[str, Tensor]
    labels: Tensor | None
    lone: Tensor
    depth: int


def _as_tensor(value: object, name: str) -> Tensor:
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value)
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or numpy array, got {type(value).__name__}")
    return value


def _checked_labels(
    labels: object, length: int, device: torch.device, name: str, any_shape: bool
) -> Tensor:
    """1-D integer labels, or (with ``any_shape``, for a label relation) one row per item."""
    tensor = _as_tensor(labels, name)
    if not any_shape:
        return check_labels(tensor, length, device, name)
    if tensor.ndim == 0 or tensor.shape[0] != length:
        raise ValueError(f"{name} must have one row per item ({length}), got shape "
                         f"{tuple(tensor.shape)}")  # fmt: skip
    return tensor.to(device)


def checked_inputs(
    query: object,
    query_labels: object,
    reference: object | None,
    reference_labels: object | None,
    ref_includes_query: bool,
    any_label_shape: bool = False,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
    """Validates the retrieval inputs; returns query, its labels, reference and its labels.

    The reference is None when the queries are their own references. Labels are 1-D integers,
    or of any shape with one row per item when ``any_label_shape`` (a label relation reads
    them).
    """
    q = check_embeddings(_as_tensor(query, "query"), "query").detach()
    if q.shape[0] == 0:
        raise ValueError("query is empty: there is nothing to evaluate")
    q_labels = _checked_labels(query_labels, q.shape[0], q.device, "query_labels",
                               any_label_shape)  # fmt: skip
    if reference is None:
        if reference_labels is not None:
            raise ValueError("reference_labels was given without reference")
        return q, q_labels, None, q_labels
    ref = check_embeddings(_as_tensor(reference, "reference"), "reference").detach().to(q.device)
    if ref.shape[0] == 0:
        raise ValueError("reference is empty: the queries have nothing to retrieve")
    if reference_labels is None:
        raise ValueError("reference was given without reference_labels")
    r_labels = _checked_labels(reference_labels, ref.shape[0], q.device, "reference_labels",
                               any_label_shape)  # fmt: skip
    if ref.shape[1] != q.shape[1]:
        raise ValueError(
            f"query has dimension {q.shape[1]} but reference has dimension {ref.shape[1]}; "
            "they must match"
        )
    if ref_includes_query:
        n = q.shape[0]
        if ref.shape[0] < n or not (
            torch.allclose(q.float(), ref[:n].float()) and torch.equal(q_labels, r_labels[:n])
        ):
            raise ValueError(
                "ref_includes_query=True needs the first len(query) rows of reference and "
                "reference_labels to be the queries and their labels"
            )
    return q, q_labels, ref, r_labels


def relevant_counts(query_labels: Tensor, reference_labels: Tensor, exclude_self: bool) -> Tensor:
    """R of each query: the references sharing its label, itself not counted."""
    both = torch.cat([query_labels, reference_labels])
    _, ids = torch.unique(both, return_inverse=True)
    n_query = query_labels.shape[0]
    counts = torch.bincount(ids[n_query:], minlength=int(ids.max()) + 1 if ids.numel() else 0)
    return counts[ids[:n_query]] - int(exclude_self)


def per_query_values(
    query: Tensor,
    query_labels: Tensor,
    reference: Tensor | None,
    reference_labels: Tensor,
    ref_includes_query: bool,
    num_relevant: Tensor,
    knn: KNNBackend,
    requests: Requests,
    depth: int,
) -> PerQuery:
    """Searches the neighbour lists block by block and computes the requested values per query.

    Args:
        query: (Q, D) checked query embeddings.
        query_labels: (Q,) labels.
        reference: (R, D) references, or None for the queries themselves.
        reference_labels: (R,) labels of the references (the query labels when None).
        ref_includes_query: Whether the first Q references are the queries.
        num_relevant: (Q,) R of each query (:func:`relevant_counts`).
        knn: The neighbour search.
        requests: The values to compute.
        depth: List length; at least ``requests.depth(max R)``.

    Returns:
        The per-query values.
    """
    values: dict[str, list[Tensor]] = {}
    blocks = knn.search(
        query,
        depth,
        reference,
        ref_includes_query=ref_includes_query,
        query_labels=query_labels,
        reference_labels=reference_labels,
    )
    for block in blocks:
        rows = slice(block.start, block.start + block.indices.shape[0])
        listed = block.indices.clamp_min(0)  # faiss marks missing neighbours with −1
        correct = (reference_labels[listed] == query_labels[rows, None]) & (block.indices >= 0)
        relevant = num_relevant[rows].clamp_min(1).to(torch.float64)
        for name, value in _block_values(block, correct, relevant, requests).items():
            values.setdefault(name, []).append(value)
    per_query = {name: torch.cat(parts) for name, parts in values.items()}
    lone = num_relevant <= 0
    if requests.recall_at:
        above = per_query.pop(_ABOVE)
        if max(requests.recall_at) > depth:
            _count_beyond_lists(above, depth, lone, query, query_labels, reference,
                                reference_labels, ref_includes_query, knn)  # fmt: skip
        hits = M.recall_at_k(above, requests.recall_at)
        for column, k in enumerate(requests.recall_at):
            per_query[f"recall_at_{k}"] = hits[:, column]
    return PerQuery(per_query, query_labels, lone, depth)


def _count_beyond_lists(
    above: Tensor,
    depth: int,
    lone: Tensor,
    query: Tensor,
    query_labels: Tensor,
    reference: Tensor | None,
    reference_labels: Tensor,
    ref_includes_query: bool,
    knn: KNNBackend,
) -> None:
    """Replaces the capped Recall@K counts of queries whose best positive is below their list."""
    undecided = ((above >= depth) & ~lone).nonzero().squeeze(1)
    if undecided.numel() == 0:
        return
    counter = knn if isinstance(knn, TorchKNN) else TorchKNN(knn.metric)
    exclude_self = reference is None or ref_includes_query
    above[undecided] = counter.count_above_best_positive(
        query[undecided],
        query_labels[undecided],
        query if reference is None else reference,
        reference_labels,
        self_index=undecided if exclude_self else None,
    )


def _relation_blocks(
    query_labels: Tensor, reference_labels: Tensor, exclude_self: bool, rule: PairRule
) -> Iterator[tuple[slice, Tensor, Tensor]]:
    """The relation's (B, R) positive and negative masks for blocks of queries, each query's
    own index excluded when the references include the queries."""
    n_query, n_ref = query_labels.shape[0], reference_labels.shape[0]
    step = max(1, _RELATION_BLOCK_ELEMENTS // max(1, n_ref))
    for start in range(0, n_query, step):
        rows = slice(start, min(start + step, n_query))
        pos, neg = rule(query_labels[rows], reference_labels)
        shape = (rows.stop - start, n_ref)
        pos, neg = (m.clone() for m in checked_masks(pos, neg, shape, "label_relation's masks"))
        if exclude_self:
            local = torch.arange(shape[0], device=pos.device)
            pos[local, local + start] = False
            neg[local, local + start] = False
        yield rows, pos, neg


def relation_query_values(
    query: Tensor,
    query_labels: Tensor,
    reference: Tensor | None,
    reference_labels: Tensor,
    ref_includes_query: bool,
    rule: PairRule,
    metric: Metric,
    requests: Requests,
) -> PerQuery:
    """:func:`per_query_values` under a label relation: a reference is relevant when ``rule``
    calls the pair positive, irrelevant when negative, and left out of the ranking when
    neither, as training leaves such pairs out.

    Exact: each block of queries is scored against every reference (the relation must see
    every pair to count a query's relevant references), ranks by ``metric``'s score with ties
    broken by the lower index, as :class:`TorchKNN` ranks.
    """
    refs = query if reference is None else reference
    exclude_self = reference is None or ref_includes_query
    x_q, h_q = _prepared(query, metric)
    x_r, h_r = (x_q, h_q) if reference is None else _prepared(refs, metric)
    counts = [
        (pos.sum(1), (pos | neg).sum(1))
        for _, pos, neg in _relation_blocks(query_labels, reference_labels, exclude_self, rule)
    ]
    num_relevant = torch.cat([relevant for relevant, _ in counts])
    judged = int(torch.cat([both for _, both in counts]).max())
    depth = max(1, min(requests.depth(int(num_relevant.max())), judged))
    listed_requests = replace(requests, recall_at=())
    values: dict[str, list[Tensor]] = {}
    for rows, pos, neg in _relation_blocks(query_labels, reference_labels, exclude_self, rule):
        pos, neg = pos.to(query.device), neg.to(query.device)
        scores = x_q[rows] @ x_r.T - h_q[rows, None] - h_r[None, :]
        ranked = scores.masked_fill(~(pos | neg), -math.inf)
        order = torch.arange(refs.shape[0], device=query.device).expand_as(ranked)
        keys = _encode(ranked, order).topk(depth, dim=1).values
        listed, listed_scores = _decode_indices(keys), _decode_scores(keys)
        judged_listed = listed_scores > -math.inf
        correct = pos.gather(1, listed) & judged_listed
        block = NeighbourBlock(
            rows.start, torch.where(judged_listed, listed, -1), listed_scores, None
        )
        relevant = pos.sum(1).clamp_min(1).to(torch.float64)
        for name, value in _block_values(block, correct, relevant, listed_requests).items():
            values.setdefault(name, []).append(value)
        if requests.recall_at:
            best = scores.masked_fill(~pos, -math.inf).amax(1)
            hits = M.recall_at_k(((scores > best[:, None]) & neg).sum(1), requests.recall_at)
            for column, k in enumerate(requests.recall_at):
                values.setdefault(f"recall_at_{k}", []).append(hits[:, column])
    per_query = {name: torch.cat(parts) for name, parts in values.items()}
    return PerQuery(per_query, None, num_relevant <= 0, depth)


def _block_values(
    block: NeighbourBlock, correct: Tensor, relevant: Tensor, requests: Requests
) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for k in requests.precision_at:
        out[_precision_key(k)] = M.precision_at_k(correct, k)
    if requests.recall_at:
        out[_ABOVE] = M.count_above_best_positive(block.scores, correct, block.best_positive)
    r_correct = correct if requests.r_cap is None else correct[:, : requests.r_cap]
    if requests.r_precision:
        out["r_precision"] = M.r_precision(r_correct, relevant)
    if requests.map_at_r:
        out["mean_average_precision_at_r"] = M.mean_average_precision_at_r(r_correct, relevant)
    if requests.map_at is not None:
        out["mean_average_precision"] = M.average_precision_at_k(correct, relevant, requests.map_at)
    if requests.mrr_at is not None:
        out["mean_reciprocal_rank"] = M.reciprocal_rank(correct, requests.mrr_at)
    return out


def averaged(
    values: Tensor, labels: Tensor | None, keep: Tensor, average: Average
) -> tuple[float, dict[int, float]]:
    """The mean over kept queries (``"query"``) or of the per-class means (``"class"``);
    without labels (a label relation), the mean over kept queries and no per-class means.

    Returns:
        The average (NaN when nothing is kept) and the per-class means, by label.
    """
    kept_values = values[keep]
    if kept_values.numel() == 0:
        return math.nan, {}
    if labels is None:
        return float(kept_values.mean()), {}
    kept_labels = labels[keep]
    classes, ids = torch.unique(kept_labels, return_inverse=True)
    sums = torch.zeros(classes.shape[0], dtype=torch.float64, device=values.device)
    sums.index_add_(0, ids, kept_values)
    per_class = sums / torch.bincount(ids, minlength=classes.shape[0])
    overall = per_class.mean() if average == "class" else kept_values.mean()
    return float(overall), dict(zip(classes.tolist(), per_class.tolist(), strict=True))


@dataclass(frozen=True)
class RetrievalResult:
    """The metrics of one evaluation, and how they were obtained. Prints as a table.

    Attributes:
        metrics: Metric name → value (kNN metrics averaged over non-lone queries).
        num_queries: Number of queries.
        num_references: Number of references (the queries themselves by default).
        num_lone_queries: Queries left out of the kNN metrics because no other reference shares
            their label.
        neighbours: Length of the neighbour lists searched.
        search: The neighbour search used (and whether it is approximate).
        exact: False when an approximate index produced the lists.
        average: ``"query"`` (mean over queries) or ``"class"`` (mean of per-class means).
        per_class: Metric name → {label: value}, when requested.
    """

    metrics: dict[str, float]
    num_queries: int
    num_references: int
    num_lone_queries: int
    neighbours: int
    search: str
    exact: bool
    average: Average = "query"
    per_class: dict[str, dict[int, float]] | None = field(default=None, repr=False)

    def __getitem__(self, name: str) -> float:
        return self.metrics[name]

    def __str__(self) -> str:
        lone = f", {self.num_lone_queries} lone left out" if self.num_lone_queries else ""
        averaging = "mean over classes" if self.average == "class" else "mean over queries"
        header = [
            f"Retrieval: {self.num_queries} queries{lone}, {self.num_references} references",
            f"{self.search}, {self.neighbours} neighbours, {averaging}",
        ]
        if not self.exact:
            header.append("approximate: the neighbour lists may miss true neighbours")
        width = max(len(name) for name in self.metrics) if self.metrics else 6
        rows = [f"{'metric':<{width}}  value", f"{'-' * width}  ------"]
        rows += [f"{name:<{width}}  {value:.4f}" for name, value in self.metrics.items()]
        return "\n".join(header + rows)


def _known(metrics: Sequence[str]) -> list[str]:
    if isinstance(metrics, str):
        raise ValueError(f"metrics must be a sequence of names, e.g. ({metrics!r},), not a string")
    names = list(metrics)
    unknown = [name for name in names if name not in ALL_METRICS]
    if unknown:
        raise ValueError(
            f"unknown metric(s) {', '.join(map(repr, unknown))}; known metrics: "
            + ", ".join(ALL_METRICS)
        )
    return names


def _cutoffs(values: Sequence[int], available: int, name: str) -> tuple[int, ...]:
    out = tuple(values)
    for k in out:
        if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
            raise ValueError(f"{name} must hold positive integers, got {k!r}")
        if k > available:
            raise ValueError(
                f"{name} asks for {k} neighbours but the reference set has only {available} "
                "candidates per query"
            )
    return out


def _precision_key(k: int) -> str:
    return "precision_at_1" if k == 1 else f"precision_at_{k}"


def _in_request_order(
    results: dict[str, float],
    names: Sequence[str],
    precision: Sequence[int],
    recall: Sequence[int],
) -> dict[str, float]:
    """The results in the order of ``metrics``, each cut-off family expanded in place."""
    keys: list[str] = []
    for name in names:
        if name == "precision_at_k":
            keys += [_precision_key(k) for k in precision]
        elif name == "recall_at_k":
            keys += [f"recall_at_{k}" for k in recall]
        else:
            keys.append(name)
    keys += [key for key in results if key not in keys]
    return {key: results[key] for key in dict.fromkeys(keys) if key in results}


def default_recall_at(available: int, num_references: int) -> tuple[int, ...]:
    """DML papers' Recall@K cut-offs: 1, 2, 4, 8 (CUB, Cars) or 1, 10, 100, 1000 (SOP-sized)."""
    ks = (1, 10, 100, 1000) if num_references >= LARGE_REFERENCE_SET else (1, 2, 4, 8)
    return tuple(k for k in ks if k <= available)


def warn_if_empty(name: str, value: float) -> None:
    if math.isnan(value):
        warnings.warn(
            f"{name} is NaN: no query has another item of its label among the references",
            RuntimeWarning,
            stacklevel=3,
        )


def _check_relation_options(
    rule: object,
    names: Sequence[str],
    average: str,
    return_per_class: bool,
    knn: KNNBackend | None,
) -> None:
    if not callable(rule):
        raise ValueError(f"label_relation must be a callable rule, got {rule!r}")
    if average != "query" or return_per_class:
        raise ValueError("with a label_relation there are no classes to average over: "
                         "use average='query' and return_per_class=False")  # fmt: skip
    clustering = [name for name in names if name in CLUSTERING_METRICS]
    if clustering:
        raise ValueError(f"{', '.join(clustering)} need integer labels, not a label_relation")
    if knn is not None and not isinstance(knn, TorchKNN):
        raise ValueError("evaluation under a label_relation is exact: knn must be None or a "
                         "TorchKNN (whose metric ranks)")  # fmt: skip


def evaluate(
    query: Tensor | np.ndarray,
    query_labels: Tensor | np.ndarray,
    reference: Tensor | np.ndarray | None = None,
    reference_labels: Tensor | np.ndarray | None = None,
    *,
    ref_includes_query: bool = False,
    metrics: Sequence[str] = DEFAULT_METRICS,
    recall_at: Sequence[int] | None = None,
    precision_at: Sequence[int] = (),
    k: int | None = None,
    average: Average = "query",
    return_per_class: bool = False,
    knn: KNNBackend | None = None,
    kmeans: KMeansFunction | None = None,
    n_clusters: int | None = None,
    label_relation: PairRule | None = None,
) -> RetrievalResult:
    """Retrieval metrics of query embeddings against a reference set, exact and streaming.

    With R the number of other references sharing a query's label and ``c_i`` = 1 when the
    neighbour at rank i does (``P(i)`` the precision at rank i), per query:

    - ``precision_at_1`` = c_1; ``precision_at_{k}`` = (c_1 + … + c_k) / k;
    - ``recall_at_{K}`` = 1 when fewer than K other-label references score strictly above the
      query's best same-label reference (ties count in the query's favour, as in DML papers);
    - ``r_precision`` = (c_1 + … + c_R) / R;
    - ``mean_average_precision_at_r`` = (1/R) Σ_{i ≤ R} P(i) c_i;
    - ``mean_average_precision`` = (1/R) Σ_{i ≤ k} P(i) c_i (full average precision when k is
      None);
    - ``mean_reciprocal_rank`` = 1 / (rank of the first c_i = 1 within k), else 0;
    - ``NMI``, ``AMI``: k-means of the query embeddings (k = number of query labels) against
      the labels.

    Ranks follow the kNN backend's score, ties broken by the lower reference index. Queries
    whose label has no other reference are left out of the kNN metrics and counted; a metric
    over no query is NaN, with a warning. R-based metrics always read the full R.

    Args:
        query: (Q, D) query embeddings (torch or numpy; a CUDA tensor is searched on its GPU).
        query_labels: (Q,) integer labels.
        reference: (R, D) reference embeddings; None to retrieve among the queries themselves.
        reference_labels: (R,) integer labels of the references.
        ref_includes_query: Whether the first Q references are the queries (each query's own
            index is then excluded, as it is when ``reference`` is None).
        metrics: Metric names; see :data:`ALL_METRICS`.
        recall_at: Cut-offs of Recall@K; by default 1, 2, 4, 8, or 1, 10, 100, 1000 from 10,000
            references on.
        precision_at: Cut-offs of precision at k, reported as ``precision_at_{k}`` (given
            cut-offs are computed even when ``metrics`` does not name ``precision_at_k``).
        k: Cut-off of ``mean_average_precision`` and ``mean_reciprocal_rank``; None for all
            references.
        average: ``"query"`` or ``"class"`` (mean of per-class means, PML's ``avg_of_avgs``).
        return_per_class: Also return each kNN metric per class.
        knn: The neighbour search; exact :class:`TorchKNN` with Euclidean ranking by default.
        kmeans: Clusterer for NMI/AMI; :class:`SklearnKMeans` by default.
        n_clusters: Clusters for NMI/AMI; the number of distinct query labels by default.
        label_relation: A :data:`~dmlkit.relations.PairRule` that judges (query, reference)
            pairs instead of label equality, the one training used (e.g.
            :func:`~dmlkit.relations.shared_class` for multi-hot labels): relevant = positive,
            irrelevant = negative, neither = left out of the query's ranking. The labels may
            then have any shape with one row per item. Exact (``knn`` must be None or a
            :class:`TorchKNN`, whose metric ranks); query averaging only; no NMI/AMI.

    Returns:
        A :class:`RetrievalResult`.
    """
    names = _known(metrics)
    if average not in ("query", "class"):
        raise ValueError(f"average must be 'query' or 'class', got {average!r}")
    if label_relation is not None:
        _check_relation_options(label_relation, names, average, return_per_class, knn)
    q, q_labels, ref, r_labels = checked_inputs(
        query, query_labels, reference, reference_labels, ref_includes_query,
        any_label_shape=label_relation is not None,
    )  # fmt: skip
    exclude_self = ref is None or ref_includes_query
    n_ref = q.shape[0] if ref is None else ref.shape[0]
    available = n_ref - int(exclude_self)
    if k is not None:
        _cutoffs((k,), available, "k")
    recall = (
        default_recall_at(available, n_ref) if recall_at is None
        else _cutoffs(recall_at, available, "recall_at")
    )  # fmt: skip
    precision = _cutoffs(precision_at, available, "precision_at")
    full = k if k is not None else available
    if "precision_at_k" in names and not precision:
        raise ValueError("precision_at_k needs its cut-offs: pass precision_at=(…)")
    if "recall_at_k" in names and not recall:
        raise ValueError("recall_at_k needs at least one cut-off in recall_at")
    requests = Requests(
        precision_at=tuple(dict.fromkeys(((1,) if "precision_at_1" in names else ()) + precision)),
        recall_at=recall if "recall_at_k" in names else (),
        r_precision="r_precision" in names,
        map_at_r="mean_average_precision_at_r" in names,
        map_at=full if "mean_average_precision" in names else None,
        mrr_at=full if "mean_reciprocal_rank" in names else None,
    )
    results: dict[str, float] = {}
    per_class: dict[str, dict[int, float]] = {}
    num_lone = 0
    depth = 0
    search = knn or TorchKNN()
    if any(name in KNN_METRICS for name in names):
        if available < 1:
            raise ValueError("the reference set has no candidate neighbour for the queries")
        if label_relation is not None:
            values = relation_query_values(q, q_labels, ref, r_labels, ref_includes_query,
                                           label_relation, search.metric, requests)  # fmt: skip
        else:
            relevant = relevant_counts(q_labels, r_labels, exclude_self)
            depth = min(requests.depth(int(relevant.max())), available)
            values = per_query_values(q, q_labels, ref, r_labels, ref_includes_query,
                                      relevant, search, requests, depth)  # fmt: skip
        depth = values.depth
        num_lone = int(values.lone.sum())
        for name, per_query in values.values.items():
            results[name], per_class[name] = averaged(
                per_query, values.labels, ~values.lone, average
            )
            warn_if_empty(name, results[name])
    clustering = [name for name in names if name in CLUSTERING_METRICS]
    if clustering:
        scores = clustering_scores(q, q_labels, kmeans, n_clusters)
        results.update({name: scores[name] for name in clustering})
    return RetrievalResult(
        metrics=_in_request_order(results, names, precision, recall),
        num_queries=q.shape[0],
        num_references=n_ref,
        num_lone_queries=num_lone,
        neighbours=depth,
        search=search.description,
        exact=search.exact,
        average=average,
        per_class=per_class if return_per_class else None,
    )
