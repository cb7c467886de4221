"""Caching pooled backbone features, so a head can be trained on a frozen backbone cheaply.

With the backbone frozen, every epoch would recompute the same pooled features. Computing them
once (:func:`cache_features`) turns head training into fitting an :class:`EmbeddingHead` on
``[N, C]`` vectors.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..data.datasets import LabelledDataset
from .base import check_positive
from .embedding import EmbeddingModel
from .fingerprint import state_digest
from .inference import embed_dataset

_FORMAT = "dmlkit-feature-cache"
_VERSION = 1
_SUFFIXES = (".pt", ".npz")


@dataclass(frozen=True)
class FeatureCache:
    """Pooled backbone features of a dataset.

    Attributes:
        features: float32 ``[N, C]``, in dataset order.
        labels: int64 ``[N]``.
        metadata: What the features were computed with (backbone class, pooling, a digest of
            the backbone's weights, number of items and features).
    """

    features: Tensor
    labels: np.ndarray
    metadata: dict[str, Any] = field(default_factory=dict)


def _check_suffix(path: Path) -> None:
    if path.suffix not in _SUFFIXES:
        raise ValueError(f"feature cache path must end in .pt or .npz, got {str(path)!r}")


def _dataset_labels(dataset: LabelledDataset) -> np.ndarray:
    labels = getattr(dataset, "labels", None)
    if not isinstance(labels, np.ndarray) or labels.ndim != 1:
        raise ValueError("dataset must have a labels attribute holding a 1-D numpy array")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"dataset.labels must have an integer dtype, got {labels.dtype}")
    if len(labels) != len(dataset):
        raise ValueError(
            f"dataset.labels has {len(labels)} entries but the dataset has {len(dataset)} items"
        )
    if len(labels) == 0:
        raise ValueError("dataset is empty; there are no features to cache")
    # A copy: the cache must not alias (and let callers mutate) the dataset's array.
    return labels.astype(np.int64)


def _metadata(model: EmbeddingModel, num_items: int) -> dict[str, Any]:
    return {
        "format": _FORMAT,
        "version": _VERSION,
        "backbone": type(model.backbone).__name__,
        "backbone_digest": state_digest(model.backbone),
        "pooling": model.pool.mode,
        "num_features": model.head.in_features,
        "num_items": num_items,
    }


def _write_atomic(path: Path, cache: FeatureCache) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # A temporary file in the same directory, so os.replace is an atomic rename: readers see
    # either the old file or the complete new one, never a partial write.
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            if path.suffix == ".pt":
                payload = {
                    "features": cache.features,
                    "labels": torch.from_numpy(cache.labels),
                    "metadata": cache.metadata,
                }
                torch.save(payload, f)
            else:
                np.savez(
                    f,
                    features=cache.features.numpy(),
                    labels=cache.labels,
                    metadata=np.array(json.dumps(cache.metadata)),
                )
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def load_feature_cache(path: str | os.PathLike[str]) -> FeatureCache:
    """Reads a feature cache written by :func:`cache_features`.

    Args:
        path: A ``.pt`` or ``.npz`` file.

    Returns:
        The :class:`FeatureCache`.
    """
    path = Path(path)
    _check_suffix(path)
    if not path.is_file():
        raise FileNotFoundError(f"feature cache not found: {path}")
    if path.suffix == ".pt":
        raw = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(raw, dict) or not {"features", "labels", "metadata"} <= raw.keys():
            raise ValueError(f"{path} is not a dmlkit feature cache")
        features, labels, metadata = raw["features"], raw["labels"].numpy(), raw["metadata"]
    else:
        with np.load(path, allow_pickle=False) as data:
            if not {"features", "labels", "metadata"} <= set(data.files):
                raise ValueError(f"{path} is not a dmlkit feature cache")
            features = torch.from_numpy(data["features"])
            labels = data["labels"]
            metadata = json.loads(str(data["metadata"]))
    if not isinstance(metadata, dict) or metadata.get("format") != _FORMAT:
        raise ValueError(f"{path} is not a dmlkit feature cache (no matching metadata)")
    if features.ndim != 2 or features.dtype != torch.float32:
        raise ValueError(
            f"{path}: features must be float32 [N, C], got {features.dtype} {tuple(features.shape)}"
        )
    if labels.shape != (features.shape[0],) or labels.dtype != np.int64:
        raise ValueError(
            f"{path}: labels must be int64 [{features.shape[0]}], got {labels.dtype} {labels.shape}"
        )
    return FeatureCache(features=features, labels=labels, metadata=metadata)


class _PooledFeatures(nn.Module):
    """The model's pooled backbone features as a forward pass, for :func:`embed_dataset`."""

    def __init__(self, model: EmbeddingModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> Tensor:
        return self.model.features(images)


def _compute_features(
    model: EmbeddingModel,
    dataset: LabelledDataset,
    *,
    batch_size: int,
    device: str | torch.device,
    num_workers: int,
    progress: bool,
) -> Tensor:
    first = next(model.parameters(), None)
    original_device = first.device if first is not None else None
    try:
        features, _ = embed_dataset(
            _PooledFeatures(model.to(device)),
            dataset,
            batch_size=batch_size,
            device=device,
            num_workers=num_workers,
            progress=progress,
            description="caching features",
        )
    finally:
        # The caller's model leaves on the device it came from (embed_dataset restores its mode).
        if original_device is not None:
            model.to(original_device)
    return features


def cache_features(
    model: EmbeddingModel,
    dataset: LabelledDataset,
    path: str | os.PathLike[str],
    *,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
    overwrite: bool = False,
    progress: bool = False,
) -> FeatureCache:
    """Computes ``model.features`` for every item of a dataset and caches them in a file.

    Features are computed in eval mode without gradients, in dataset order. The file (``.pt``
    or ``.npz``, chosen by the suffix) holds float32 features ``[N, C]``, int64 labels ``[N]``
    and metadata; it is written atomically (a temporary file in the same directory, then
    ``os.replace``), so an error or interruption never leaves a partial file.

    An existing file is reused, without running the model, when its metadata (backbone class,
    pooling, a digest of the backbone's weights and buffers, item count, feature size) and its
    labels match ``model`` and ``dataset``; otherwise it is recomputed and replaced. The check
    cannot see the dataset's transforms: pass ``overwrite=True`` after changing them.

    Args:
        model: The embedding model; it is returned to its original device and mode.
        dataset: A map-style dataset whose items are ``(image tensor, int label)`` and which has
            ``labels``, a 1-D integer numpy array in item order.
        path: The cache file, ending in ``.pt`` or ``.npz``; its directory is created if needed.
        batch_size: Images per forward pass.
        device: Device to compute on.
        num_workers: DataLoader worker processes.
        overwrite: Recompute even if a matching cache exists.
        progress: Show a progress bar of the items computed (rate and time left) on stderr;
            :func:`dmlkit.progress.quiet` turns it off whatever this says.

    Returns:
        The :class:`FeatureCache`.
    """
    path = Path(path)
    _check_suffix(path)
    check_positive(batch_size, "batch_size")
    labels = _dataset_labels(dataset)
    metadata = _metadata(model, len(labels))
    if not overwrite and path.exists():
        cached = load_feature_cache(path)
        if cached.metadata == metadata and np.array_equal(cached.labels, labels):
            return cached
    features = _compute_features(
        model,
        dataset,
        batch_size=batch_size,
        device=device,
        num_workers=num_workers,
        progress=progress,
    )
    cache = FeatureCache(features=features, labels=labels, metadata=metadata)
    _write_atomic(path, cache)
    return cache
