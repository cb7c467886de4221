"""A drop-in for PML's ``AccuracyCalculator``: same call, keys and values; faiss not needed."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from .clustering import KMeansFunction, clustering_scores
from .knn import Metric, NeighbourBlock, TorchKNN
from .retrieval import (
    Average,
    KNNBackend,
    Requests,
    averaged,
    checked_inputs,
    per_query_values,
    relevant_counts,
    warn_if_empty,
)

# PML's metric names, in the order PML reports them.
PML_METRICS = (
    "AMI",
    "NMI",
    "mean_average_precision",
    "mean_average_precision_at_r",
    "mean_reciprocal_rank",
    "precision_at_1",
    "r_precision",
)
_CLUSTERING = ("AMI", "NMI")
PMLKnnFunction = Callable[[Tensor, int, Tensor, bool], tuple[Tensor, Tensor]]


class _PMLStyleKNN:
    """Adapts PML's ``knn_func(query, k, reference, ref_includes_query) -> (dists, indices)``."""

    exact = True
    metric: Metric = "euclidean"  # PML's default ranking; unused, as no metric here recounts

    def __init__(self, knn_func: PMLKnnFunction) -> None:
        self.knn_func = knn_func

    @property
    def description(self) -> str:
        return f"custom knn_func {type(self.knn_func).__name__}"

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
        del query_labels, reference_labels
        if reference is None:
            reference, ref_includes_query = query, True
        distances, indices = self.knn_func(query, k, reference, ref_includes_query)
        yield NeighbourBlock(0, indices.long(), -distances.float(), None)


class AccuracyCalculator:
    """PML's ``AccuracyCalculator`` (2.9) with dmlkit's exact streaming kNN underneath.

    ``get_accuracy`` returns the same keys and values as PML's for its metrics:
    ``precision_at_1``, ``r_precision``, ``mean_average_precision_at_r``,
    ``mean_average_precision``, ``mean_reciprocal_rank``, ``NMI``, ``AMI``. Definitions are in
    :func:`dmlkit.evaluation.evaluate`. Differences from PML: faiss is optional (the default
    search is :class:`TorchKNN` with PML's Euclidean ranking, which never holds an N×N matrix),
    ties are broken by the lower reference index, the default clusterer is scikit-learn's
    k-means, and ``label_comparison_fn`` is not supported.

    Args:
        include: Metrics to compute (all when empty).
        exclude: Metrics not to compute.
        avg_of_avgs: Average per class first, then over classes.
        return_per_class: Return a list of per-class values (sorted labels) for kNN metrics.
        k: Neighbours per query: None for all references, ``"max_bin_count"`` for the largest
            class, or an integer (R-based metrics are then wrong below the largest class, and a
            warning says so, as in PML).
        label_comparison_fn: Not supported; must be None.
        device: Device to compute on; the query's device by default.
        knn_func: A dmlkit search (:class:`TorchKNN`, :class:`FaissKNN`) or a PML-style
            ``knn_func(query, k, reference, ref_includes_query)``.
        kmeans_func: Clusterer for NMI/AMI, ``(embeddings, n_clusters) -> ids``.
    """

    def __init__(
        self,
        include: Sequence[str] = (),
        exclude: Sequence[str] = (),
        avg_of_avgs: bool = False,
        return_per_class: bool = False,
        k: int | str | None = None,
        label_comparison_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
        device: torch.device | str | None = None,
        knn_func: KNNBackend | PMLKnnFunction | None = None,
        kmeans_func: KMeansFunction | None = None,
    ) -> None:
        self._check_names(include, exclude)
        if avg_of_avgs and return_per_class:
            raise ValueError("avg_of_avgs and return_per_class are mutually exclusive")
        if not (k is None or k == "max_bin_count" or (_is_int(k) and int(k) > 0)):  # type: ignore[arg-type]
            raise ValueError("k must be an integer greater than 0, or None, or 'max_bin_count'")
        if label_comparison_fn is not None:
            raise ValueError(
                "label_comparison_fn is not supported: dmlkit compares integer labels for equality"
            )
        self.include = tuple(include)
        self.exclude = tuple(exclude)
        self.avg_of_avgs = avg_of_avgs
        self.return_per_class = return_per_class
        self.k = k
        self.device = torch.device(device) if device is not None else None
        if knn_func is None:
            self.knn: KNNBackend = TorchKNN()
        elif hasattr(knn_func, "search"):
            self.knn = knn_func  # type: ignore[assignment]
        else:
            self.knn = _PMLStyleKNN(knn_func)  # type: ignore[arg-type]
        self.kmeans_func = kmeans_func

    @staticmethod
    def _check_names(include: Sequence[str], exclude: Sequence[str]) -> None:
        for names in (include, exclude):
            if not isinstance(names, (tuple, list)):
                raise TypeError(f"include and exclude must be tuples, got {type(names).__name__}")
            unknown = [name for name in names if name not in PML_METRICS]
            if unknown:
                raise ValueError(
                    f"unknown metric(s) {', '.join(map(repr, unknown))}; known metrics: "
                    + ", ".join(PML_METRICS)
                )

    def get_curr_metrics(
        self, include: Sequence[str] = (), exclude: Sequence[str] = ()
    ) -> list[str]:
        """The metrics a call computes, after the constructor's and the call's include/exclude."""
        self._check_names(include, exclude)
        chosen = [m for m in PML_METRICS if not self.include or m in self.include]
        chosen = [m for m in chosen if m not in self.exclude]
        return [m for m in chosen if (not include or m in include) and m not in exclude]

    def _list_length(self, max_count: int, n_ref: int, self_count: int, names: list[str]) -> int:
        """PML's ``determine_k``: the neighbours PML would retrieve."""
        if self.k == "max_bin_count":
            return max_count - self_count
        if self.k is None:
            return n_ref - self_count
        k = int(self.k)  # type: ignore[arg-type]
        r_metrics = {"r_precision", "mean_average_precision_at_r"} & set(names)
        if k < max_count and r_metrics:
            warnings.warn(
                f"k={k} is below the largest class ({max_count}), so {sorted(r_metrics)} read "
                "truncated lists and are wrong; use k='max_bin_count'",
                RuntimeWarning,
                stacklevel=3,
            )
        return k

    def get_accuracy(
        self,
        query: Tensor | np.ndarray,
        query_labels: Tensor | np.ndarray,
        reference: Tensor | np.ndarray | None = None,
        reference_labels: Tensor | np.ndarray | None = None,
        ref_includes_query: bool = False,
        include: Sequence[str] = (),
        exclude: Sequence[str] = (),
    ) -> dict[str, float | list[float]]:
        """Computes the metrics, as PML's ``get_accuracy``.

        Args:
            query: (Q, D) query embeddings.
            query_labels: (Q,) integer labels.
            reference: (R, D) references; the queries themselves when None.
            reference_labels: (R,) labels of the references.
            ref_includes_query: Whether the first Q references are the queries.
            include: Metrics for this call (overrides the constructor's include).
            exclude: Metrics to leave out of this call.

        Returns:
            Metric name → value, or → per-class list with ``return_per_class``.
        """
        names = self.get_curr_metrics(include, exclude)
        if self.device is not None:
            query = _as_device(query, self.device)
            reference = None if reference is None else _as_device(reference, self.device)
        q, q_labels, ref, r_labels = checked_inputs(
            query, query_labels, reference, reference_labels, ref_includes_query
        )
        exclude_self = ref is None or ref_includes_query
        n_ref = q.shape[0] if ref is None else ref.shape[0]
        out: dict[str, float | list[float]] = {}
        knn_names = [name for name in names if name not in _CLUSTERING]
        if knn_names:
            relevant = relevant_counts(q_labels, r_labels, exclude_self)
            max_count = int(relevant.max()) + int(exclude_self)
            length = self._list_length(max_count, n_ref, int(exclude_self), names)
            if length > n_ref - int(exclude_self):
                raise ValueError(
                    f"k={length} neighbours asked for, but the reference set has only "
                    f"{n_ref - int(exclude_self)} candidates per query"
                )
            if length < 1:  # every query is lone: nothing to search, every kNN metric is NaN
                lone = torch.ones(q.shape[0], dtype=torch.bool, device=q.device)
                per_query = {name: torch.full_like(lone, math.nan, dtype=torch.float64)
                             for name in knn_names}  # fmt: skip
            else:
                requests = Requests(
                    precision_at=(1,) if "precision_at_1" in names else (),
                    r_precision="r_precision" in names,
                    map_at_r="mean_average_precision_at_r" in names,
                    map_at=length if "mean_average_precision" in names else None,
                    mrr_at=length if "mean_reciprocal_rank" in names else None,
                    r_cap=length,
                )
                depth = min(requests.depth(int(relevant.max())), length)
                values = per_query_values(q, q_labels, ref, r_labels, ref_includes_query,
                                          relevant, self.knn, requests, depth)  # fmt: skip
                per_query, lone = values.values, values.lone
            average: Average = "class" if self.avg_of_avgs else "query"
            for name in knn_names:
                value, per_class = averaged(per_query[name], q_labels, ~lone, average)
                warn_if_empty(name, value)
                out[name] = self._per_class_list(per_class, q_labels) if self.return_per_class \
                    else value  # fmt: skip
        clustering = [name for name in names if name in _CLUSTERING]
        if clustering:
            scores = clustering_scores(q, q_labels, self.kmeans_func)
            out.update({name: scores[name] for name in clustering})
        return {name: out[name] for name in names}

    @staticmethod
    def _per_class_list(per_class: dict[int, float], labels: Tensor) -> list[float]:
        if per_class:
            return [per_class[label] for label in sorted(per_class)]
        return [math.nan] * int(torch.unique(labels).numel())


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _as_device(x: Tensor | np.ndarray, device: torch.device) -> Tensor:
    return (torch.from_numpy(x) if isinstance(x, np.ndarray) else x).to(device)
