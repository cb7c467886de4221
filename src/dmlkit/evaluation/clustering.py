"""Clustering quality of embeddings: k-means, then NMI and AMI against the labels."""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch
from sklearn.cluster import KMeans as _SklearnKMeans
from sklearn.metrics import adjusted_mutual_info_score, normalized_mutual_info_score
from torch import Tensor

from .knn import import_faiss


class KMeansFunction(Protocol):
    """Clusters (N, D) embeddings into ``n_clusters`` groups; returns (N,) cluster ids.

    PML's ``kmeans_func`` has the same call, so either library's functions fit either.
    """

    def __call__(self, embeddings: Tensor, n_clusters: int) -> Tensor: ...


class SklearnKMeans:
    """scikit-learn's k-means, deterministic for a seed (the default clusterer).

    Args:
        n_init: Restarts; scikit-learn keeps the best. Passed explicitly because its default
            changed in scikit-learn 1.4.
        max_iter: Lloyd iterations per restart.
        seed: Random state of the initialisation.
    """

    def __init__(self, n_init: int = 1, max_iter: int = 300, seed: int = 0) -> None:
        self.n_init = n_init
        self.max_iter = max_iter
        self.seed = seed

    def __call__(self, embeddings: Tensor, n_clusters: int) -> Tensor:
        model = _SklearnKMeans(
            n_clusters, n_init=self.n_init, max_iter=self.max_iter, random_state=self.seed
        )
        ids = model.fit_predict(embeddings.detach().cpu().double().numpy())
        return torch.from_numpy(ids.astype(np.int64))


class FaissKMeans:
    """faiss k-means (optional dependency), as PML's default: much faster for many clusters.

    Args:
        niter: Lloyd iterations.
        seed: Random seed of the initialisation.
    """

    def __init__(self, niter: int = 20, seed: int = 0) -> None:
        self.niter = niter
        self.seed = seed
        import_faiss()

    def __call__(self, embeddings: Tensor, n_clusters: int) -> Tensor:
        faiss = import_faiss()
        data = np.ascontiguousarray(embeddings.detach().cpu().float().numpy())
        model = faiss.Kmeans(data.shape[1], n_clusters, niter=self.niter, seed=self.seed)
        model.train(data)
        _, ids = model.index.search(data, 1)
        return torch.from_numpy(ids[:, 0].astype(np.int64))


def clustering_scores(
    embeddings: Tensor,
    labels: Tensor,
    kmeans: KMeansFunction | None = None,
    n_clusters: int | None = None,
) -> dict[str, float]:
    """NMI and AMI between the labels and k-means clusters of the embeddings.

    ``NMI = I(Y; C) / mean(H(Y), H(C))`` (arithmetic mean, scikit-learn's default) and
    ``AMI = (I(Y; C) − E[I]) / (mean(H(Y), H(C)) − E[I])``, the same corrected for chance.

    Args:
        embeddings: (N, D) embeddings.
        labels: (N,) integer labels.
        kmeans: The clusterer; :class:`SklearnKMeans` by default.
        n_clusters: Number of clusters; the number of distinct labels by default (DDTAS's code
            hard-codes 100, which is wrong for Cars196's 98 test classes).

    Returns:
        ``{"NMI": ..., "AMI": ...}``.
    """
    labels_np = labels.detach().cpu().numpy()
    clusters = n_clusters if n_clusters is not None else len(np.unique(labels_np))
    ids = (kmeans or SklearnKMeans())(embeddings, clusters)
    ids_np = ids.detach().cpu().numpy() if isinstance(ids, Tensor) else np.asarray(ids)
    return {
        "NMI": float(normalized_mutual_info_score(labels_np, ids_np)),
        "AMI": float(adjusted_mutual_info_score(labels_np, ids_np)),
    }
