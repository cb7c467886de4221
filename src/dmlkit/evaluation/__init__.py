"""Retrieval evaluation on held-out classes: exact, streaming metrics, PML-compatible.

- :func:`evaluate` returns a typed :class:`RetrievalResult` (P@1, Recall@K, R-Precision, MAP@R,
  MAP@k, MRR, NMI/AMI) and prints as a table.
- :class:`AccuracyCalculator` is a drop-in for PML's, with the same keys and values.
- :class:`TorchKNN` (exact, streaming, the default) and :class:`FaissKNN` (optional; exact or
  approximate IVF/HNSW indexes) find the neighbours.
- :mod:`dmlkit.evaluation.metrics` holds the per-query formulas as pure functions.
"""

from . import metrics
from .calculator import PML_METRICS, AccuracyCalculator
from .clustering import FaissKMeans, KMeansFunction, SklearnKMeans, clustering_scores
from .knn import FaissKNN, Metric, NeighbourBlock, TorchKNN, faiss_available
from .retrieval import (
    ALL_METRICS,
    CLUSTERING_METRICS,
    DEFAULT_METRICS,
    KNN_METRICS,
    KNNBackend,
    RetrievalResult,
    evaluate,
)

__all__ = [
    "ALL_METRICS",
    "CLUSTERING_METRICS",
    "DEFAULT_METRICS",
    "KNN_METRICS",
    "PML_METRICS",
    "AccuracyCalculator",
    "FaissKMeans",
    "FaissKNN",
    "KMeansFunction",
    "KNNBackend",
    "Metric",
    "NeighbourBlock",
    "RetrievalResult",
    "SklearnKMeans",
    "TorchKNN",
    "clustering_scores",
    "evaluate",
    "faiss_available",
    "metrics",
]
