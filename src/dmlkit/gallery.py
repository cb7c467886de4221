"""A searchable gallery: labelled embeddings with ids, searched by image or by embedding.

A :class:`Gallery` holds the embeddings of its items with their labels and unique string ids
(image paths by default). It is built from embeddings (:meth:`Gallery.from_embeddings`) or by
embedding a dataset with a trained checkpoint (:meth:`Gallery.from_checkpoint`); in the second
case it keeps what rebuilds the model and its evaluation preprocessing (the checkpoint path, a
fingerprint of the weights and a description of the preprocessing), so queries given as images
are embedded exactly as the gallery was.

**Scores.** Higher is nearer: the cosine similarity (``"cosine"``), the dot product (``"dot"``)
or minus the Euclidean distance (``"euclidean"``). ``distances`` are ``1 − cosine``, ``−dot`` and
the Euclidean distance. :meth:`Gallery.match` and :meth:`Gallery.calibrate_threshold` use the
same scores. Exact search ranks with :class:`~dmlkit.evaluation.knn.TorchKNN` (equal scores:
lower gallery position first, positions being insertion order); approximate search uses faiss
IVF or HNSW and says so (``SearchResult.exact`` is False).

**Files.** :meth:`Gallery.save` writes a folder (``gallery.json``, ``embeddings.npy``,
``labels.npy``, ``ids.json``) into a temporary sibling folder and then swaps it in, so a failure
never damages a gallery saved before. ``gallery.json`` records each file's SHA-256; a missing,
truncated or altered file makes :meth:`Gallery.load` raise ``ValueError`` naming it. A faiss
index built for approximate search (:meth:`Gallery.build_index`, or the first approximate
search) is saved beside them (``index-hnsw.faiss``, ``index-ivf.faiss``) and loaded back, so a
loaded gallery searches approximately without rebuilding.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .data import (
    LabelledDataset,
    Subset,
    ToTensor,
    csv_manifest,
    eval_transform,
    image_folder,
    read_image,
)
from .evaluation.knn import METRICS, FaissKNN, Metric, TorchKNN, faiss_available, import_faiss
from .evaluation.verification import calibrate, pair_scores
from .models.fingerprint import file_sha256, state_digest
from .models.inference import AutocastDtype
from .training import embed_dataset, load_trained_model, split_dataset

FORMAT = "dmlkit-gallery"
VERSION = 1
ApproximateIndex = Literal["ivf", "hnsw"]
ImagePaths = str | Path | Sequence[str | Path]
Queries = Tensor | ImagePaths
_FILES = ("embeddings.npy", "labels.npy", "ids.json")
_MANIFEST = "gallery.json"


# --------------------------------------------------------------------------- preprocessing


def _preprocessing(config: Any, in_channels: int) -> dict[str, Any]:
    """The evaluation preprocessing of a run, as a JSON description (:func:`_transform` builds it).

    Image-file runs use their evaluation transform (resize, centre crop, normalisation). Array
    runs (digits, Omniglot) saw float arrays: images are read in grayscale (or RGB), scaled to
    [0, 1] and area-resized to the run's ``data.image_size`` (else its test items' size).
    """
    from .training.datasets import DATASETS

    if "transform" in DATASETS.parameters(config.data.name, "data"):
        t = config.data.transform
        return {
            "kind": "image",
            "mode": "RGB",
            "resize": int(t.eval_resize),
            "crop": int(t.eval_crop),
            "mean": [float(v) for v in t.mean],
            "std": [float(v) for v in t.std],
            "channel_order": str(t.channel_order),
            "value_scale": float(t.value_scale),
        }
    size = config.data.image_size
    if size is not None:
        shape = [int(size), int(size)]
    else:
        item, _ = split_dataset(config, "test")[0]
        shape = [int(v) for v in item.shape[-2:]]
    return {
        "kind": "array",
        "mode": "L" if in_channels == 1 else "RGB",
        "size": shape,
        # Omniglot's arrays hold the ink as 1; its image files, dark ink on white paper.
        "invert": config.data.name == "omniglot",
    }


class _ArrayImageTransform:
    """Pillow image → float [C, H, W] in [0, 1] (inverted for Omniglot, whose arrays hold the ink
    as 1), area-resized: the array runs' preprocessing."""

    def __init__(self, size: Sequence[int], invert: bool = False) -> None:
        self.size = (int(size[0]), int(size[1]))
        self.invert = invert
        self.to_tensor = ToTensor()

    def __call__(self, image: Any) -> Tensor:
        x = self.to_tensor(image).float()
        if self.invert:
            x = 1 - x
        if tuple(x.shape[-2:]) != self.size:
            x = F.interpolate(x[None], size=self.size, mode="area")[0]
        return x


def _transform(description: dict[str, Any]) -> Callable[[Any], Tensor]:
    if description["kind"] == "image":
        return eval_transform(
            resize=description["resize"],
            crop=description["crop"],
            mean=description["mean"],
            std=description["std"],
            channel_order=description["channel_order"],
            value_scale=description["value_scale"],
        )
    if description["kind"] == "array":
        return _ArrayImageTransform(description["size"], bool(description.get("invert", False)))
    raise ValueError(f"unknown preprocessing kind {description['kind']!r}")


def fingerprint(digest: str, preprocessing: dict[str, Any]) -> str:
    """The fingerprint of a model (its ``state_digest``) with its preprocessing."""
    text = json.dumps({"model": digest, "preprocessing": preprocessing}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


@dataclass
class _Embedder:
    model: nn.Module
    transform: Callable[[Any], Tensor]
    mode: str
    in_channels: int


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class SearchResult:
    """The k nearest gallery items of each query, nearest first.

    Attributes:
        ids: Per query, the k gallery ids (``None`` where an approximate index found fewer).
        labels: (Q, k) int64 gallery labels (−1 where no item was found).
        scores: (Q, k) float32 scores, higher is nearer (see the module docstring).
        distances: (Q, k) float32 distances (``1 − cosine``, Euclidean, or ``−dot``).
        ranks: (Q, k) int64 ranks, 1 for the nearest.
        indices: (Q, k) int64 gallery positions (−1 where none).
        exact: Whether the search was exact.
        method: What searched (e.g. ``"exact kNN in torch (cosine)"``).
        metric: The gallery's metric.
    """

    ids: list[list[str | None]]
    labels: Tensor
    scores: Tensor
    distances: Tensor
    ranks: Tensor
    indices: Tensor
    exact: bool
    method: str
    metric: str

    def __len__(self) -> int:
        return len(self.ids)

    def rows(self, query: int) -> list[dict[str, Any]]:
        """One query's neighbours as dicts: rank, id, label, score, distance."""
        return [
            {
                "rank": int(self.ranks[query, j]),
                "id": self.ids[query][j],
                "label": int(self.labels[query, j]),
                "score": float(self.scores[query, j]),
                "distance": float(self.distances[query, j]),
            }
            for j in range(len(self.ids[query]))
        ]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready description (``queries``: one list of rows per query)."""
        return {
            "exact": self.exact,
            "method": self.method,
            "metric": self.metric,
            "queries": [self.rows(i) for i in range(len(self))],
        }


def _user_scores(raw: Tensor, metric: str) -> tuple[Tensor, Tensor]:
    """(scores, distances) from the kNN scores (−½‖q−r‖², cosine or dot)."""
    if metric == "euclidean":
        distance = (-2.0 * raw).clamp_min(0).sqrt()
        return -distance, distance
    if metric == "cosine":
        return raw, 1.0 - raw
    return raw, -raw


def _raw_scores(a: Tensor, b: Tensor, metric: str) -> Tensor:
    """Scores along the last dimension in the kNN's convention (−½‖a−b‖², cosine or dot)."""
    a, b = a.float(), b.float()
    if metric == "cosine":
        return (F.normalize(a, dim=-1) * F.normalize(b, dim=-1)).sum(-1)
    if metric == "euclidean":
        return (a - b).pow(2).sum(-1).mul(-0.5)
    return (a * b).sum(-1)


# --------------------------------------------------------------------------- the gallery


def _as_ids(ids: Sequence[Any], n: int, what: str) -> list[str]:
    if isinstance(ids, str | bytes):
        raise TypeError(f"{what} must be a sequence of ids, not one string")
    out = [str(i) for i in ids]
    if len(out) != n:
        raise ValueError(f"{what}: {len(out)} ids for {n} items")
    return out


def _duplicates(ids: Sequence[str]) -> list[str]:
    seen: set[str] = set()
    repeated: list[str] = []
    for i in ids:
        if i in seen and i not in repeated:
            repeated.append(i)
        seen.add(i)
    return repeated


def _named(ids: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(repr(i) for i in ids[:limit])
    return shown + (f" and {len(ids) - limit} more" if len(ids) > limit else "")


def _dataset_paths(dataset: Any) -> list[str] | None:
    if isinstance(dataset, Subset):
        inner = _dataset_paths(dataset.dataset)
        return None if inner is None else [inner[int(i)] for i in dataset.indices]
    paths = getattr(dataset, "paths", None)
    if paths is None or len(paths) != len(dataset):
        return None
    return [str(p) for p in paths]


def _is_paths(queries: object) -> bool:
    if isinstance(queries, str | Path):
        return True
    return (
        isinstance(queries, Sequence)
        and not isinstance(queries, Tensor)
        and all(isinstance(q, str | Path) for q in queries)
    )


class Gallery:
    """Labelled embeddings with unique ids, searchable exactly or approximately.

    Build one with :meth:`from_embeddings`, :meth:`from_checkpoint` or :meth:`load`.

    Attributes:
        metric: ``"cosine"``, ``"euclidean"`` or ``"dot"``.
        checkpoint: The checkpoint path the embeddings came from, or None.
        model_digest: Digest of that checkpoint's model weights, or None.
        preprocessing: Description of the images' preprocessing, or None.
        class_names: Optional names of the labels.
    """

    def __init__(
        self,
        embeddings: Tensor,
        labels: np.ndarray,
        ids: list[str],
        metric: str = "cosine",
        *,
        checkpoint: str | None = None,
        model_digest: str | None = None,
        preprocessing: dict[str, Any] | None = None,
        class_names: list[str] | None = None,
        device: torch.device | str = "cpu",
        batch_size: int = 64,
        retired_ids: Sequence[str] = (),
    ) -> None:
        """Use the ``from_*`` constructors; this one takes the parts as they are stored."""
        if metric not in METRICS:
            raise ValueError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
        self.metric: Metric = metric  # type: ignore[assignment]
        self._embeddings = torch.empty(0, 0)
        self._labels = np.zeros(0, dtype=np.int64)
        self._ids: list[str] = []
        self._position: dict[str, int] = {}
        # Removed ids are never handed out again for new items.
        self._retired: set[str] = set(retired_ids)
        self.checkpoint = checkpoint
        self.model_digest = model_digest
        self.preprocessing = preprocessing
        self.class_names = class_names
        self.device = torch.device(device)
        self.batch_size = batch_size
        self._embedder: _Embedder | None = None
        self._dim: int | None = None
        # Built faiss indexes by kind, with their nlist and hnsw_m; dropped when items change.
        self._indexes: dict[str, tuple[Any, int | None, int]] = {}
        self._append(embeddings, labels, ids)

    # ----- construction

    @classmethod
    def from_embeddings(
        cls,
        embeddings: Tensor | np.ndarray,
        labels: Sequence[int] | np.ndarray | Tensor,
        ids: Sequence[Any] | None = None,
        metric: str = "cosine",
    ) -> Gallery:
        """A gallery of given embeddings (no model: queries must be embeddings).

        Args:
            embeddings: (N, D) float embeddings.
            labels: N integer labels.
            ids: N unique ids (default ``"0"``, ``"1"``, …).
            metric: ``"cosine"`` (default), ``"euclidean"`` or ``"dot"``.
        """
        emb = torch.as_tensor(
            np.asarray(embeddings) if not isinstance(embeddings, Tensor) else embeddings
        )
        n = emb.shape[0] if emb.ndim else 0
        ids_list = [str(i) for i in range(n)] if ids is None else _as_ids(ids, n, "ids")
        return cls(emb, _labels(labels, n), ids_list, metric)

    @classmethod
    def from_checkpoint(
        cls,
        checkpoint: str | Path,
        dataset: str | Path | LabelledDataset,
        ids: Sequence[Any] | None = None,
        *,
        metric: str = "cosine",
        batch_size: int = 64,
        device: torch.device | str = "cpu",
        num_workers: int = 0,
        channels_last: bool | None = None,
        autocast: AutocastDtype | None = None,
    ) -> Gallery:
        """Embeds a dataset with a trained checkpoint's model and evaluation preprocessing.

        Args:
            checkpoint: A run's ``last.pt`` or ``best.pt``.
            dataset: An image folder (``<root>/<class>/<image>``), a CSV manifest
                (``path,label[,split]``), or a :class:`LabelledDataset` whose items are already
                model inputs (such as :func:`~dmlkit.training.split_dataset`'s).
            ids: One unique id per item; default: the image paths where the dataset has them,
                else ``"0"``, ``"1"``, ….
            metric: The gallery's metric.
            batch_size: Images per forward pass.
            device: Where the model runs.
            num_workers: DataLoader workers decoding images while the model runs.
            channels_last: As :func:`~dmlkit.models.inference.embed_dataset` (default: where
                faster).
            autocast: ``"bf16"`` or ``"fp16"`` mixed precision on CUDA.
        """
        checkpoint = Path(checkpoint).resolve()
        config, model = load_trained_model(checkpoint)
        in_channels = _in_channels(checkpoint)
        preprocessing = _preprocessing(config, in_channels)
        embedder = _Embedder(model, _transform(preprocessing), preprocessing["mode"], in_channels)
        class_names: list[str] | None = None
        if isinstance(dataset, str | Path):
            path = Path(dataset)
            loader = csv_manifest if path.is_file() and path.suffix.lower() == ".csv" else None
            if loader is not None:
                items: LabelledDataset = loader(
                    path, transform=embedder.transform, mode=embedder.mode
                )
            else:
                items = image_folder(path, transform=embedder.transform, mode=embedder.mode)
            class_names = getattr(items, "class_names", None)
        else:
            items = dataset
            names = getattr(dataset, "class_names", None)
            class_names = list(names) if names is not None else None
        model.to(device)
        embeddings, labels = embed_dataset(
            model,
            items,
            batch_size=batch_size,
            device=device,
            num_workers=num_workers,
            channels_last=channels_last,
            autocast=autocast,
        )
        n = len(labels)
        if ids is None:
            ids = _dataset_paths(items) or [str(i) for i in range(n)]
        gallery = cls(
            embeddings,
            _labels(labels, n),
            _as_ids(ids, n, "ids"),
            metric,
            checkpoint=str(checkpoint),
            model_digest=state_digest(model),
            preprocessing=preprocessing,
            class_names=class_names,
            device=device,
            batch_size=batch_size,
        )
        gallery._embedder = embedder
        return gallery

    # ----- properties

    def __len__(self) -> int:
        return len(self._ids)

    @property
    def embeddings(self) -> Tensor:
        """(N, D) float32 embeddings, in gallery order (a copy)."""
        return self._embeddings.clone()

    @property
    def labels(self) -> np.ndarray:
        """(N,) int64 labels (a copy)."""
        return self._labels.copy()

    @property
    def ids(self) -> list[str]:
        """The N ids, in gallery order (a copy)."""
        return list(self._ids)

    @property
    def fingerprint(self) -> str | None:
        """The model-and-preprocessing fingerprint, or None for a gallery without a model."""
        if self.model_digest is None or self.preprocessing is None:
            return None
        return fingerprint(self.model_digest, self.preprocessing)

    def __repr__(self) -> str:
        return (
            f"Gallery(n={len(self)}, dim={self._dim}, metric={self.metric!r}, "
            f"checkpoint={self.checkpoint!r})"
        )

    # ----- the model

    def _model(self) -> _Embedder:
        if self._embedder is not None:
            return self._embedder
        if self.checkpoint is None or self.preprocessing is None:
            raise ValueError(
                "this gallery has no model (built from embeddings): give queries as embeddings"
            )
        self._embedder = _load_embedder(
            self.checkpoint, self.model_digest, self.preprocessing, self.device
        )
        return self._embedder

    @torch.no_grad()
    def embed(self, images: Tensor | ImagePaths) -> Tensor:
        """Embeds images with the gallery's model and preprocessing.

        Args:
            images: Image paths (one or a sequence), or a float tensor batch ``[B, C, H, W]``
                (or one ``[C, H, W]`` image) that is already preprocessed model input.

        Returns:
            (B, D) float32 embeddings on the CPU.

        Raises:
            ValueError: The gallery has no model, the checkpoint no longer matches the gallery's
                fingerprint, or an image cannot be read (:class:`~dmlkit.data.ImageReadError`,
                naming the file).
        """
        embedder = self._model()
        batches: Iterator[Tensor]
        if _is_paths(images):
            paths = [images] if isinstance(images, str | Path) else list(images)  # type: ignore[arg-type]
            if not paths:
                raise ValueError("no images given")
            batches = (
                torch.stack(
                    [
                        embedder.transform(read_image(p, embedder.mode))
                        for p in paths[i : i + self.batch_size]
                    ]
                )
                for i in range(0, len(paths), self.batch_size)
            )
        elif isinstance(images, Tensor):
            x = images[None] if images.ndim == 3 else images
            if x.ndim != 4 or not x.is_floating_point():
                raise ValueError(
                    f"images must be a float [B, C, H, W] tensor, got {images.dtype} "
                    f"{tuple(images.shape)}"
                )
            if x.shape[1] != embedder.in_channels:
                raise ValueError(
                    f"images have {x.shape[1]} channels; the model takes {embedder.in_channels}"
                )
            batches = iter(torch.split(x, self.batch_size))
        else:
            raise TypeError(f"images must be paths or a tensor, got {type(images).__name__}")
        model = embedder.model
        was_training = model.training
        model.eval()
        try:
            chunks = [model(b.to(self.device)).float().cpu() for b in batches]
        finally:
            model.train(was_training)
        return torch.cat(chunks)

    def _query_embeddings(self, queries: Queries, fingerprint: str | None) -> Tensor:
        if isinstance(queries, Tensor) and queries.ndim == 2:
            if fingerprint is not None and fingerprint != self.fingerprint:
                raise ValueError(
                    f"the query embeddings' fingerprint {fingerprint} does not match the "
                    f"gallery's {self.fingerprint}: they come from another model or preprocessing"
                )
            if queries.shape[1] != self._dim and self._dim is not None:
                raise ValueError(
                    f"queries have dimension {queries.shape[1]}; the gallery's is {self._dim}"
                )
            if not queries.is_floating_point():
                raise ValueError(f"query embeddings must be floating point, got {queries.dtype}")
            return queries.detach().float().cpu()
        return self.embed(queries)

    # ----- editing

    def _append(self, embeddings: Tensor, labels: np.ndarray, ids: list[str]) -> None:
        emb = embeddings.detach().float().cpu()
        if emb.ndim != 2:
            raise ValueError(f"embeddings must be (N, D), got shape {tuple(emb.shape)}")
        if emb.shape[0] != len(labels) or emb.shape[0] != len(ids):
            raise ValueError(
                f"{emb.shape[0]} embeddings, {len(labels)} labels and {len(ids)} ids: "
                "they must match"
            )
        if not bool(torch.isfinite(emb).all()):
            raise ValueError("embeddings must be finite")
        repeated = _duplicates(ids) + [i for i in dict.fromkeys(ids) if i in self._position]
        if repeated:
            raise ValueError(f"duplicate ids: {_named(list(dict.fromkeys(repeated)))}")
        if emb.shape[0] == 0 and self._dim is None and emb.shape[1] == 0:
            return
        if self._dim is not None and emb.shape[1] != self._dim:
            raise ValueError(
                f"embeddings have dimension {emb.shape[1]}; the gallery's is {self._dim}"
            )
        self._indexes.clear()
        if self._dim is None:
            self._dim = int(emb.shape[1])
            self._embeddings = emb.clone()
        else:
            self._embeddings = torch.cat([self._embeddings, emb])
        self._labels = np.concatenate([self._labels, labels.astype(np.int64)])
        for i in ids:
            self._position[i] = len(self._ids)
            self._ids.append(i)

    def add(
        self,
        items: Queries,
        labels: Sequence[int] | np.ndarray | Tensor,
        ids: Sequence[Any] | None = None,
        *,
        fingerprint: str | None = None,
    ) -> None:
        """Adds items, given as embeddings ``(N, D)``, image paths or an image tensor batch.

        Args:
            items: The new items (images are embedded with the gallery's model).
            labels: One integer label per item.
            ids: One new unique id per item; default the image paths, else the next free
                integers (as strings).
            fingerprint: For embeddings computed elsewhere, their model's fingerprint (checked).

        Raises:
            ValueError: An id repeats or is already in the gallery (the message names them), or
                the counts, dimension or fingerprint do not match.
        """
        emb = self._query_embeddings(items, fingerprint)
        n = emb.shape[0]
        if ids is None:
            if _is_paths(items):
                ids = [str(items)] if isinstance(items, str | Path) else [str(p) for p in items]  # type: ignore[union-attr]
            else:
                ids = self._free_ids(n)
        self._append(emb, _labels(labels, n), _as_ids(ids, n, "ids"))

    def _free_ids(self, n: int) -> list[str]:
        out: list[str] = []
        number = len(self._ids)
        while len(out) < n:
            if str(number) not in self._position and str(number) not in self._retired:
                out.append(str(number))
            number += 1
        return out

    def remove(self, ids: Sequence[Any] | str) -> None:
        """Removes items by id; they never appear in later results.

        Raises:
            ValueError: Some id is not in the gallery (nothing is removed; the message names it).
        """
        wanted = [ids] if isinstance(ids, str) else [str(i) for i in ids]
        unknown = [i for i in dict.fromkeys(wanted) if i not in self._position]
        if unknown:
            raise ValueError(f"ids not in the gallery: {_named(unknown)}")
        drop = np.zeros(len(self._ids), dtype=bool)
        drop[[self._position[i] for i in wanted]] = True
        keep = np.flatnonzero(~drop)
        self._indexes.clear()
        self._embeddings = self._embeddings[torch.from_numpy(keep)]
        self._labels = self._labels[keep]
        self._ids = [self._ids[i] for i in keep]
        self._position = {i: p for p, i in enumerate(self._ids)}
        self._retired.update(wanted)

    # ----- search

    def search(
        self,
        queries: Queries,
        k: int = 10,
        exact: bool = True,
        *,
        index: ApproximateIndex = "hnsw",
        nprobe: int = 16,
        ef_search: int = 128,
        fingerprint: str | None = None,
    ) -> SearchResult:
        """The k nearest gallery items of each query.

        Args:
            queries: (Q, D) embeddings, image paths, or an image tensor batch ``[Q, C, H, W]``.
            k: Neighbours per query, 1 to the gallery's size.
            exact: Exact streaming search in torch (default); False: faiss ``index``.
            index: ``"hnsw"`` or ``"ivf"`` for approximate search.
            nprobe: IVF cells visited per query.
            ef_search: HNSW search breadth.
            fingerprint: For query embeddings computed elsewhere, their model's fingerprint.

        Raises:
            ValueError: Empty gallery, k out of range, unreadable image (naming the file), or
                a fingerprint mismatch.
        """
        if len(self) == 0:
            raise ValueError("the gallery is empty: add items before searching")
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= len(self):
            raise ValueError(
                f"k must be an integer in [1, {len(self)}] (the gallery's size), got {k!r}"
            )
        q = self._query_embeddings(queries, fingerprint)
        n_q = q.shape[0]
        indices = torch.full((n_q, k), -1, dtype=torch.long)
        if exact:
            knn: TorchKNN | FaissKNN = TorchKNN(self.metric)
            blocks = knn.search(q, k, self._embeddings)
        else:
            built, nlist, hnsw_m = self._approximate_index(index)
            knn = FaissKNN(
                self.metric, index, nlist=nlist, hnsw_m=hnsw_m, nprobe=nprobe, ef_search=ef_search
            )
            blocks = knn.search_index(built, q, k)
        for block in blocks:
            indices[block.start : block.start + block.indices.shape[0]] = block.indices.cpu()
        found = indices >= 0
        safe = indices.clamp_min(0)
        raw = torch.where(found, self._rescored(q, safe), -math.inf)
        # Re-sorted by the exact scores; equal scores: lower gallery position first.
        position = torch.where(found, safe, torch.iinfo(torch.long).max)
        order = (
            torch.from_numpy(np.lexsort((position.numpy(), -raw.double().numpy()), axis=-1))
            if n_q
            else torch.zeros((0, k), dtype=torch.long)
        )
        raw, indices, found = raw.gather(1, order), indices.gather(1, order), found.gather(1, order)
        scores, distances = _user_scores(raw, self.metric)
        scores = scores.masked_fill(~found, -math.inf)
        distances = distances.masked_fill(~found, math.inf)
        labels_t = torch.from_numpy(self._labels)
        labels = torch.where(found, labels_t[indices.clamp_min(0)], -1)
        ids = [[self._ids[int(j)] if j >= 0 else None for j in row] for row in indices.tolist()]
        ranks = torch.arange(1, k + 1).expand(n_q, k).clone()
        return SearchResult(
            ids, labels, scores, distances, ranks, indices, exact, knn.description,
            self.metric,
        )  # fmt: skip

    def _rescored(self, q: Tensor, neighbours: Tensor) -> Tensor:
        """(Q, k) scores of each query with its neighbours, from the embeddings themselves.

        The kNN's scores rank, but its −½‖q−r‖² expansion loses precision for near items;
        queries go in chunks so the gathered neighbours stay under about 64 MB.
        """
        chunk = max(1, (1 << 24) // max(1, neighbours.shape[1] * q.shape[1]))
        out = torch.empty(neighbours.shape)
        for i in range(0, q.shape[0], chunk):
            rows = slice(i, i + chunk)
            out[rows] = _raw_scores(
                q[rows, None, :], self._embeddings[neighbours[rows]], self.metric
            )
        return out

    def build_index(
        self, index: ApproximateIndex = "hnsw", *, nlist: int | None = None, hnsw_m: int = 32
    ) -> None:
        """Builds a faiss index for approximate search; :meth:`save` keeps it.

        Approximate searches build one with the defaults when none is built; adding or removing
        items drops it (the next approximate search rebuilds it).

        Args:
            index: ``"hnsw"`` or ``"ivf"``.
            nlist: IVF cells; default about 4·√N.
            hnsw_m: HNSW graph degree.

        Raises:
            ValueError: Empty gallery or unknown index kind.
            ImportError: faiss is not installed.
        """
        if index not in ("ivf", "hnsw"):
            raise ValueError(f"approximate index must be 'ivf' or 'hnsw', got {index!r}")
        if len(self) == 0:
            raise ValueError("the gallery is empty: add items before building an index")
        built = FaissKNN(self.metric, index, nlist=nlist, hnsw_m=hnsw_m).build(self._embeddings)
        self._indexes[index] = (built, nlist, hnsw_m)

    def _approximate_index(self, index: str) -> tuple[Any, int | None, int]:
        if index not in ("ivf", "hnsw"):
            raise ValueError(f"approximate index must be 'ivf' or 'hnsw', got {index!r}")
        if index not in self._indexes:
            self.build_index(index)  # type: ignore[arg-type]
        return self._indexes[index]

    def match(
        self, queries: Queries, threshold: float, *, fingerprint: str | None = None
    ) -> Tensor:
        """(Q,) bool: whether each query's nearest gallery score is at least ``threshold``.

        A threshold from :meth:`calibrate_threshold` bounds the false match rate of one pair;
        the nearest of N gallery items passes it far more often for a query of an unknown class
        (about 1 − (1 − FMR)^N): calibrate on your own open-set queries for that rate."""
        result = self.search(queries, k=1, fingerprint=fingerprint)
        return result.scores[:, 0] >= threshold

    def calibrate_threshold(
        self, target_fmr: float = 1e-3, *, max_pairs: int = 200_000, seed: int = 0
    ) -> float:
        """The lowest threshold whose false match rate on the gallery's own pairs is ≤ target.

        Every pair of items is used when there are at most ``max_pairs``; otherwise up to
        ``max_pairs // 2`` random genuine (same-label) and as many random impostor pairs are
        drawn (FMR is measured on impostors alone, so the mix does not bias it).

        Returns:
            The threshold for :meth:`match` (``inf`` when none meets the target).

        Raises:
            ValueError: The gallery lacks genuine or impostor pairs.
        """
        n = len(self)
        if n < 2:
            raise ValueError("calibration needs at least two gallery items")
        labels = torch.from_numpy(self._labels)
        if n * (n - 1) // 2 <= max_pairs:
            left, right = torch.triu_indices(n, n, offset=1)
        else:
            left, right = _sampled_pairs(self._labels, max_pairs, seed)
        scores = pair_scores(self._embeddings[left], self._embeddings[right], self.metric)
        same = labels[left] == labels[right]
        return calibrate(scores, same, target_fmr=target_fmr)

    # ----- files

    def save(self, folder: str | Path) -> Path:
        """Writes the gallery to ``folder`` atomically (the old one stays whole on failure).

        Raises:
            ValueError: ``folder`` exists and is neither empty nor a saved gallery.
        """
        folder = Path(folder)
        if folder.exists():
            if not folder.is_dir():
                raise ValueError(f"{folder} exists and is not a folder")
            if any(folder.iterdir()) and not (folder / _MANIFEST).is_file():
                raise ValueError(f"{folder} is not empty and holds no gallery: not overwriting it")
        folder.parent.mkdir(parents=True, exist_ok=True)
        temporary = Path(
            tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.", suffix=".tmp")
        )
        try:
            dim = self._dim if self._dim is not None else 0
            emb = self._embeddings.numpy() if len(self) else np.zeros((0, dim), np.float32)
            np.save(temporary / "embeddings.npy", np.ascontiguousarray(emb, dtype=np.float32))
            np.save(temporary / "labels.npy", self._labels.astype(np.int64))
            (temporary / "ids.json").write_text(json.dumps(self._ids))
            indexes: dict[str, dict[str, Any]] = {}
            for kind, (built, nlist, hnsw_m) in self._indexes.items():
                name = f"index-{kind}.faiss"
                import_faiss().serialize_index(built).tofile(temporary / name)
                indexes[kind] = {"file": name, "nlist": nlist, "hnsw_m": hnsw_m}
            files = (*_FILES, *(entry["file"] for entry in indexes.values()))
            manifest = {
                "format": FORMAT,
                "version": VERSION,
                "count": len(self),
                "dim": dim,
                "metric": self.metric,
                "checkpoint": self.checkpoint,
                "model_digest": self.model_digest,
                "preprocessing": self.preprocessing,
                "fingerprint": self.fingerprint,
                "class_names": self.class_names,
                "retired_ids": sorted(self._retired),
                "indexes": indexes,
                "sha256": {name: file_sha256(temporary / name) for name in files},
            }
            (temporary / _MANIFEST).write_text(json.dumps(manifest, indent=2))
            for name in (*files, _MANIFEST):
                with open(temporary / name, "rb") as file:
                    os.fsync(file.fileno())
            _swap_in(temporary, folder)
        except BaseException:
            shutil.rmtree(temporary, ignore_errors=True)
            raise
        return folder

    @classmethod
    def load(
        cls,
        folder: str | Path,
        *,
        checkpoint: str | Path | None = None,
        device: torch.device | str = "cpu",
        batch_size: int = 64,
    ) -> Gallery:
        """Reads a gallery written by :meth:`save`.

        Args:
            folder: The gallery folder.
            checkpoint: Where its checkpoint is now, if it moved; it is loaded and must match
                the gallery's fingerprint.
            device: Where the model runs for image queries.
            batch_size: Images per forward pass.

        Raises:
            FileNotFoundError: ``folder`` does not exist.
            ValueError: A file is missing, truncated or altered (the message names it), or
                ``checkpoint`` holds another model.
        """
        folder = Path(folder)
        if not folder.is_dir():
            # A save killed between its two renames leaves the previous gallery beside it.
            interrupted = sorted(folder.parent.glob(f".{folder.name}.*.old"))
            if interrupted:
                raise ValueError(
                    f"gallery folder {folder} is missing: a save was interrupted; the previous "
                    f"gallery is in {interrupted[-1]} (rename it to {folder})"
                )
            raise FileNotFoundError(f"gallery folder {folder} not found")
        manifest_path = folder / _MANIFEST
        try:
            manifest = json.loads(manifest_path.read_text())
        except (OSError, ValueError) as error:
            raise ValueError(f"gallery file {manifest_path} cannot be read: {error}") from error
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise ValueError(f"{manifest_path} is not a dmlkit gallery manifest")
        if manifest.get("version") != VERSION:
            raise ValueError(
                f"{manifest_path}: unsupported gallery version {manifest.get('version')!r}"
            )
        try:
            digests = manifest["sha256"]
            count, dim = int(manifest["count"]), int(manifest["dim"])
            metric = str(manifest["metric"])
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"{manifest_path} lacks an entry: {error}") from error
        indexes = manifest.get("indexes", {})
        for name in (*_FILES, *(entry["file"] for entry in indexes.values())):
            path = folder / name
            if not path.is_file():
                raise ValueError(f"gallery file {path} is missing")
            if file_sha256(path) != digests.get(name):
                raise ValueError(f"gallery file {path} is corrupt or truncated (checksum differs)")
        emb = _read(folder / "embeddings.npy", lambda p: np.load(p, allow_pickle=False))
        labels = _read(folder / "labels.npy", lambda p: np.load(p, allow_pickle=False))
        ids = _read(folder / "ids.json", lambda p: json.loads(p.read_text()))
        if emb.shape != (count, dim) or emb.dtype != np.float32:
            raise ValueError(
                f"gallery file {folder / 'embeddings.npy'}: expected float32 ({count}, {dim}), "
                f"got {emb.dtype} {emb.shape}"
            )
        if labels.shape != (count,) or labels.dtype != np.int64:
            raise ValueError(
                f"gallery file {folder / 'labels.npy'}: expected int64 ({count},), "
                f"got {labels.dtype} {labels.shape}"
            )
        if (
            not isinstance(ids, list)
            or len(ids) != count
            or not all(isinstance(i, str) for i in ids)
        ):
            raise ValueError(
                f"gallery file {folder / 'ids.json'}: expected a list of {count} strings"
            )
        gallery = cls(
            torch.from_numpy(emb) if count else torch.empty(0, 0),
            labels,
            ids,
            metric,
            checkpoint=manifest.get("checkpoint"),
            model_digest=manifest.get("model_digest"),
            preprocessing=manifest.get("preprocessing"),
            class_names=manifest.get("class_names"),
            device=device,
            batch_size=batch_size,
            retired_ids=manifest.get("retired_ids", []),
        )
        if count == 0:
            gallery._dim = dim or None
        if indexes and faiss_available():
            faiss = import_faiss()
            for kind, entry in indexes.items():
                path = folder / entry["file"]
                built = _read(path, lambda p: faiss.deserialize_index(np.fromfile(p, np.uint8)))
                if built.ntotal != count:
                    raise ValueError(
                        f"gallery file {path} indexes {built.ntotal} items, not {count}"
                    )
                gallery._indexes[kind] = (built, entry["nlist"], entry["hnsw_m"])
        if checkpoint is not None:
            if gallery.preprocessing is None:
                raise ValueError("this gallery was built from embeddings; it has no checkpoint")
            gallery.checkpoint = str(Path(checkpoint).resolve())
            gallery._model()  # loads and checks the fingerprint now
        return gallery


# --------------------------------------------------------------------------- helpers


def _labels(labels: Any, n: int) -> np.ndarray:
    arr = labels.detach().cpu().numpy() if isinstance(labels, Tensor) else np.asarray(labels)
    if arr.size == 0:
        arr = arr.astype(np.int64)
    if arr.ndim != 1 or arr.dtype.kind not in "iu":
        raise ValueError(f"labels must be 1-D integers, got {arr.dtype} {arr.shape}")
    if len(arr) != n:
        raise ValueError(f"{len(arr)} labels for {n} items")
    return arr.astype(np.int64)


def _in_channels(checkpoint: Path) -> int:
    from .training.checkpoint import load_checkpoint

    return int(load_checkpoint(checkpoint)["in_channels"])


def _load_embedder(
    checkpoint: str, digest: str | None, preprocessing: dict[str, Any], device: torch.device
) -> _Embedder:
    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(
            f"the gallery's checkpoint {checkpoint} is missing; give Gallery.load(checkpoint=...)"
        )
    _, model = load_trained_model(path)
    found = state_digest(model)
    if found != digest:
        raise ValueError(
            f"checkpoint {checkpoint} holds another model than the gallery's (fingerprint "
            f"{found} ≠ {digest}); re-index the gallery with it"
        )
    in_channels = _in_channels(path)
    return _Embedder(
        model.to(device), _transform(preprocessing), preprocessing["mode"], in_channels
    )


def _sampled_pairs(labels: np.ndarray, max_pairs: int, seed: int) -> tuple[Tensor, Tensor]:
    rng = np.random.default_rng(seed)
    half = max(1, max_pairs // 2)
    order = np.argsort(labels, kind="stable")
    sorted_labels = labels[order]
    starts = np.searchsorted(sorted_labels, sorted_labels, side="left")
    ends = np.searchsorted(sorted_labels, sorted_labels, side="right")
    sizes = ends - starts
    # Genuine: a random item of a class of ≥ 2, and another random item of its class.
    eligible = np.flatnonzero(sizes >= 2)
    left, right = [], []
    if eligible.size:
        a = rng.choice(eligible, half)
        offset = rng.integers(1, sizes[a])
        b = starts[a] + (a - starts[a] + offset) % sizes[a]
        left.append(order[a])
        right.append(order[b])
    # Impostors: random pairs, kept when the labels differ.
    a = rng.integers(0, len(labels), 2 * half)
    b = rng.integers(0, len(labels), 2 * half)
    different = labels[a] != labels[b]
    left.append(a[different][:half])
    right.append(b[different][:half])
    return torch.from_numpy(np.concatenate(left)), torch.from_numpy(np.concatenate(right))


def _read(path: Path, reader: Callable[[Path], Any]) -> Any:
    try:
        return reader(path)
    except (OSError, ValueError, EOFError) as error:
        raise ValueError(f"gallery file {path} cannot be read: {error}") from error


def _swap_in(temporary: Path, folder: Path) -> None:
    """Renames ``temporary`` to ``folder``, replacing a previous gallery only once it is whole."""
    if not folder.exists():
        os.replace(temporary, folder)
        return
    old = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.", suffix=".old"))
    old.rmdir()
    os.replace(folder, old)
    try:
        os.replace(temporary, folder)
    except BaseException:
        os.replace(old, folder)
        raise
    shutil.rmtree(old, ignore_errors=True)


__all__ = [
    "FORMAT",
    "Gallery",
    "SearchResult",
    "fingerprint",
]
