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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from .data import (
    ArrayDataset,
    LabelledDataset,
    Subset,
    csv_manifest,
    image_folder,
    read_image,
)
from .evaluation.knn import METRICS, FaissKNN, Metric, TorchKNN, import_faiss
from .evaluation.verification import calibrate, pair_scores
from .models.fingerprint import file_sha256, state_digest
from .models.inference import AutocastDtype
from .training import embed_dataset, load_trained_model
from .training.preprocessing import (
    evaluation_preprocessing,
    input_shape,
    preprocessing_transform,
)

FORMAT = "dmlkit-gallery"
VERSION = 1
ApproximateIndex = Literal["ivf", "hnsw"]
ImagePaths = str | Path | Sequence[str | Path]
Queries = Tensor | ImagePaths
_FILES = ("embeddings.npy", "labels.npy", "ids.json")
_MANIFEST = "gallery.json"


def fingerprint(digest: str, preprocessing: dict[str, Any]) -> str:
    """The fingerprint of a model (its ``state_digest``) with its preprocessing."""
    text = json.dumps({"model": digest, "preprocessing": preprocessing}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _describe(preprocessing: dict[str, Any]) -> str:
    if preprocessing["kind"] == "image":
        return (
            f"resize {preprocessing['resize']}, centre crop {preprocessing['crop']}, "
            f"mean {preprocessing['mean']}, std {preprocessing['std']}"
        )
    inverted = ", inverted" if preprocessing.get("invert") else ""
    return f"{preprocessing['mode']} pixels in [0, 1]{inverted}, resized to {preprocessing['size']}"


class _ImageFiles:
    """Image files as model input, read when indexed (a :class:`LabelledDataset`, labels 0)."""

    def __init__(self, paths: list[str], embedder: _Embedder) -> None:
        self.paths = paths
        self.embedder = embedder
        self.labels = np.zeros(len(paths), dtype=np.int64)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        image = read_image(self.paths[index], self.embedder.mode)
        return self.embedder.transform(image), 0


@dataclass
class _Embedder:
    """The gallery's model with the preprocessing its images get."""

    model: nn.Module
    preprocessing: dict[str, Any]
    in_channels: int

    def __post_init__(self) -> None:
        self.transform = preprocessing_transform(self.preprocessing)
        self.mode: str = self.preprocessing["mode"]
        self.input_shape = input_shape(self.preprocessing)

    def check_input(self, images: Tensor, what: str) -> None:
        """Refuses image tensors that are not this model's preprocessed input."""
        if images.ndim != 4 or not images.is_floating_point():
            raise ValueError(
                f"{what} must be a float [B, C, H, W] tensor, got {images.dtype} "
                f"{tuple(images.shape)}"
            )
        shape = (self.in_channels, *self.input_shape)
        if tuple(images.shape[1:]) != shape:
            raise ValueError(
                f"{what} are {tuple(images.shape[1:])} (C, H, W); the gallery's model takes "
                f"preprocessed {shape} input ({_describe(self.preprocessing)}): give image "
                "files, or preprocess tensors the same way"
            )


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
                # None where an approximate index found no item (JSON has no infinity).
                "score": float(self.scores[query, j]) if self.indices[query, j] >= 0 else None,
                "distance": (
                    float(self.distances[query, j]) if self.indices[query, j] >= 0 else None
                ),
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


def _distances(scores: Tensor, metric: str) -> Tensor:
    """Distances from scores: ``1 − cosine``, the Euclidean distance, or ``−dot``."""
    return 1.0 - scores if metric == "cosine" else -scores


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
        autocast: AutocastDtype | None = None,
    ) -> None:
        """Use the ``from_*`` constructors; this one takes the parts as they are stored."""
        if metric not in METRICS:
            raise ValueError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
        self._metric: Metric = metric  # type: ignore[assignment]
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
        self.autocast: AutocastDtype | None = autocast
        self._embedder: _Embedder | None = None
        self._dim: int | None = None
        # Built faiss indexes by kind, with their nlist and hnsw_m; dropped when items change.
        self._indexes: dict[ApproximateIndex, tuple[Any, int | None, int]] = {}
        self._append(embeddings, labels, ids)

    @property
    def metric(self) -> Metric:
        """``"cosine"``, ``"euclidean"`` or ``"dot"``; fixed for the gallery's life (its index
        and thresholds depend on it)."""
        return self._metric

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
        progress: bool = False,
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
            progress: Show a progress bar of the items embedded on stderr (off by default, as
                for :func:`~dmlkit.models.inference.embed_dataset`).
        """
        checkpoint = Path(checkpoint).resolve()
        config, model = load_trained_model(checkpoint)
        in_channels = _in_channels(checkpoint)
        preprocessing = evaluation_preprocessing(config, in_channels)
        embedder = _Embedder(model, preprocessing, in_channels)
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
            if len(items):
                embedder.check_input(items[0][0][None], "the dataset's items")
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
            progress=progress,
            description="indexing",
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
            autocast=autocast,
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
        """Embeds images with the gallery's model and preprocessing, as the gallery was embedded
        (:func:`~dmlkit.models.inference.embed_dataset`: inference mode, channels-last where
        faster, the gallery's ``autocast`` on CUDA).

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
        items: LabelledDataset
        if _is_paths(images):
            paths = [images] if isinstance(images, str | Path) else list(images)  # type: ignore[arg-type]
            if not paths:
                raise ValueError("no images given")
            items = _ImageFiles([str(p) for p in paths], embedder)
        elif isinstance(images, Tensor):
            x = images[None] if images.ndim == 3 else images
            embedder.check_input(x, "images")
            items = ArrayDataset(x.detach().cpu(), np.zeros(len(x), dtype=np.int64))
        else:
            raise TypeError(f"images must be paths or a tensor, got {type(images).__name__}")
        embeddings, _ = embed_dataset(
            embedder.model,
            items,
            batch_size=self.batch_size,
            device=self.device,
            autocast=self.autocast,
        )
        return embeddings

    def _query_embeddings(self, queries: Queries, fingerprint: str | None) -> Tensor:
        if isinstance(queries, Tensor) and queries.ndim == 1:
            queries = queries[None]  # one embedding
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
            if not bool(torch.isfinite(queries).all()):
                raise ValueError("query embeddings must be finite (found NaN or inf)")
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

    def remove(self, ids: Sequence[Any] | str | int) -> None:
        """Removes items by id; they never appear in later results.

        Raises:
            ValueError: Some id is not in the gallery (nothing is removed; the message names it).
        """
        one = isinstance(ids, str) or not isinstance(ids, Sequence | np.ndarray | Tensor)
        wanted = [str(ids)] if one else [str(i) for i in ids]  # type: ignore[union-attr]
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
        if nprobe < 1 or ef_search < 1:
            raise ValueError(f"nprobe and ef_search must be at least 1, got {nprobe}, {ef_search}")
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
        scores = raw.masked_fill(~found, -math.inf)
        distances = _distances(raw, self.metric).masked_fill(~found, math.inf)
        labels_t = torch.from_numpy(self._labels)
        labels = torch.where(found, labels_t[indices.clamp_min(0)], -1)
        ids = [[self._ids[int(j)] if j >= 0 else None for j in row] for row in indices.tolist()]
        ranks = torch.arange(1, k + 1).expand(n_q, k).clone()
        return SearchResult(
            ids, labels, scores, distances, ranks, indices, exact, knn.description,
            self.metric,
        )  # fmt: skip

    def _rescored(self, q: Tensor, neighbours: Tensor) -> Tensor:
        """(Q, k) scores of each query with its neighbours, as :func:`pair_scores` gives them.

        The kNN's scores rank, but its −½‖q−r‖² expansion loses precision for near items; and
        scored as :meth:`calibrate_threshold` scores pairs, a threshold means the same in both.
        Queries go in chunks so the gathered neighbours stay under about 64 MB.
        """
        k = neighbours.shape[1]
        chunk = max(1, (1 << 24) // max(1, k * q.shape[1]))
        out = torch.empty(neighbours.shape)
        for i in range(0, q.shape[0], chunk):
            rows = neighbours[i : i + chunk]
            pairs = pair_scores(
                q[i : i + chunk].repeat_interleave(k, 0),
                self._embeddings[rows.reshape(-1)],
                self.metric,
            )
            out[i : i + chunk] = pairs.view(rows.shape)
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
        if nlist is not None and not 1 <= nlist <= len(self):
            raise ValueError(f"nlist must be in [1, {len(self)}] (the gallery's size), got {nlist}")
        if hnsw_m < 2:
            raise ValueError(f"hnsw_m must be at least 2, got {hnsw_m}")
        built = FaissKNN(self.metric, index, nlist=nlist, hnsw_m=hnsw_m).build(self._embeddings)
        self._indexes[index] = (built, nlist, hnsw_m)

    @property
    def approximate_indexes(self) -> list[ApproximateIndex]:
        """The kinds of faiss index built or saved for this gallery (``"hnsw"``, ``"ivf"``)."""
        return sorted(self._indexes)

    def _approximate_index(self, index: ApproximateIndex) -> tuple[Any, int | None, int]:
        if index not in ("ivf", "hnsw"):
            raise ValueError(f"approximate index must be 'ivf' or 'hnsw', got {index!r}")
        if index not in self._indexes:
            self.build_index(index)
        built, nlist, hnsw_m = self._indexes[index]
        if isinstance(built, _SavedIndex):
            built = built.read(len(self), self._dim, self.metric)
            self._indexes[index] = (built, nlist, hnsw_m)
        return built, nlist, hnsw_m

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
        self,
        target_fmr: float | None = None,
        *,
        target_precision: float | None = None,
        max_pairs: int = 200_000,
        seed: int = 0,
    ) -> float:
        """The lowest threshold meeting a false match rate or a precision on the gallery's own
        pairs (default: FMR ≤ 1e-3).

        Every pair of items is used when there are at most ``max_pairs``; otherwise up to
        ``max_pairs // 2`` random genuine (same-label) and as many random impostor pairs are
        drawn. FMR is measured on impostors alone, so that mix does not bias it; precision
        depends on the mix, so ``target_precision`` needs every pair.

        Returns:
            The threshold for :meth:`match` (``inf`` when none meets the target).

        Raises:
            ValueError: The gallery lacks genuine or impostor pairs, both targets are given, or
                ``target_precision`` with more than ``max_pairs`` pairs.
        """
        if target_fmr is None and target_precision is None:
            target_fmr = 1e-3
        n = len(self)
        if n < 2:
            raise ValueError("calibration needs at least two gallery items")
        labels = torch.from_numpy(self._labels)
        if n * (n - 1) // 2 <= max_pairs:
            left, right = torch.triu_indices(n, n, offset=1)
        elif target_precision is not None:
            raise ValueError(
                f"target_precision needs every pair of the gallery ({n * (n - 1) // 2:,}); raise "
                f"max_pairs (now {max_pairs:,}) or calibrate with target_fmr"
            )
        else:
            left, right = _sampled_pairs(self._labels, max_pairs, seed)
        scores = pair_scores(self._embeddings[left], self._embeddings[right], self.metric)
        same = labels[left] == labels[right]
        return calibrate(scores, same, target_fmr=target_fmr, target_precision=target_precision)

    # ----- files

    @staticmethod
    def check_save_folder(folder: str | Path) -> Path:
        """Checks, before any work, that :meth:`save` may write to ``folder``.

        Raises:
            ValueError: ``folder`` exists and is neither empty nor a saved gallery.
        """
        folder = Path(folder)
        if folder.exists():
            if not folder.is_dir():
                raise ValueError(f"{folder} exists and is not a folder")
            if any(folder.iterdir()) and not _is_gallery(folder):
                raise ValueError(f"{folder} is not empty and holds no gallery: not overwriting it")
        return folder

    def save(self, folder: str | Path) -> Path:
        """Writes the gallery to ``folder`` atomically (the old one stays whole on failure).

        Raises:
            ValueError: ``folder`` exists and is neither empty nor a saved gallery.
        """
        folder = self.check_save_folder(folder)
        folder.parent.mkdir(parents=True, exist_ok=True)
        temporary = Path(
            tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.", suffix=".tmp")
        )
        try:
            # mkdtemp makes a private folder; a saved gallery gets the usual permissions.
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(temporary, 0o777 & ~umask)
            dim = self._dim if self._dim is not None else 0
            emb = self._embeddings.numpy() if len(self) else np.zeros((0, dim), np.float32)
            np.save(temporary / "embeddings.npy", np.ascontiguousarray(emb, dtype=np.float32))
            np.save(temporary / "labels.npy", self._labels.astype(np.int64))
            (temporary / "ids.json").write_text(json.dumps(self._ids))
            indexes: dict[str, dict[str, Any]] = {}
            for kind, (built, nlist, hnsw_m) in self._indexes.items():
                name = f"index-{kind}.faiss"
                if isinstance(built, _SavedIndex):
                    (temporary / name).write_bytes(built.verified_bytes())
                else:
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
                "autocast": self.autocast,
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
            indexes = manifest.get("indexes", {})
            index_files = {
                kind: str(entry["file"])
                for kind, entry in indexes.items()
                if kind in ("ivf", "hnsw") and entry["file"] == f"index-{kind}.faiss"
            }
            if not isinstance(digests, dict) or len(index_files) != len(indexes):
                raise ValueError("malformed sha256 or indexes entry")
        except (AttributeError, KeyError, TypeError, ValueError) as error:
            raise ValueError(
                f"{manifest_path} lacks an entry or has a malformed one: {error}"
            ) from error
        for name in (*_FILES, *index_files.values()):
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
            autocast=manifest.get("autocast"),
        )
        if count == 0:
            gallery._dim = dim or None
        for kind, name in index_files.items():
            # Read on the first approximate search: exact searches never pay for it.
            saved = _SavedIndex(folder / name, digests[name])
            gallery._indexes[kind] = (
                saved,
                indexes[kind].get("nlist"),
                indexes[kind].get("hnsw_m", 32),
            )
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
            f"the gallery's checkpoint {checkpoint} is missing; say where it is now "
            "(Gallery.load(checkpoint=...), dmlkit search --checkpoint)"
        )
    _, model = load_trained_model(path)
    found = state_digest(model)
    if found != digest:
        raise ValueError(
            f"checkpoint {checkpoint} holds another model than the gallery's (fingerprint "
            f"{found} ≠ {digest}); re-index the gallery with it"
        )
    in_channels = _in_channels(path)
    return _Embedder(model.to(device), preprocessing, in_channels)


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


def _is_gallery(folder: Path) -> bool:
    try:
        return json.loads((folder / _MANIFEST).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


@dataclass(frozen=True)
class _SavedIndex:
    """A faiss index file of a loaded gallery, read when first needed."""

    path: Path
    sha256: str

    def verified_bytes(self) -> bytes:
        data = _read(self.path, lambda p: p.read_bytes())
        if hashlib.sha256(data).hexdigest() != self.sha256:
            raise ValueError(f"gallery file {self.path} changed since the gallery was loaded")
        return data

    def read(self, count: int, dim: int | None, metric: str) -> Any:
        faiss = import_faiss()
        data = np.frombuffer(self.verified_bytes(), np.uint8)
        built = _read(self.path, lambda _: faiss.deserialize_index(data))
        inner = metric != "euclidean"
        expected = faiss.METRIC_INNER_PRODUCT if inner else faiss.METRIC_L2
        if built.ntotal != count or built.d != dim or built.metric_type != expected:
            raise ValueError(
                f"gallery file {self.path} does not index this gallery ({built.ntotal} items of "
                f"dimension {built.d}; the gallery has {count} of dimension {dim}, {metric})"
            )
        return built


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
