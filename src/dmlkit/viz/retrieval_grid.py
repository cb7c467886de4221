"""Retrieval grids: query images next to their nearest neighbours, right and wrong marked.

:func:`retrieval_lists` ranks neighbours exactly as :func:`dmlkit.evaluation.evaluate` does and
scores each query's MAP@R; :func:`worst_queries` picks the failures worth looking at;
:func:`plot_retrieval_grid` draws them, with :func:`item_image` to show a dataset's items.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ..data import ArrayDataset, ImageFileDataset, Subset, read_image
from ..evaluation import Metric, TorchKNN
from ..evaluation.metrics import mean_average_precision_at_r
from ..validation import check_embeddings

# Frame colours (Okabe-Ito blue, green and vermilion); the ✓/✗ marks say the same for
# readers who cannot tell the colours apart.
_QUERY_COLOUR = "#0072B2"
_CORRECT_COLOUR = "#009E73"
_WRONG_COLOUR = "#D55E00"


@dataclass(frozen=True)
class RetrievalLists:
    """The nearest neighbours of some queries, each item querying all the others.

    Attributes:
        queries: (Q,) int64 item index of each query.
        neighbours: (Q, k) int64 item indices of its neighbours, nearest first.
        correct: (Q, k) bool, whether each neighbour shares the query's label.
        average_precision: (Q,) float64 MAP@R of each query, R being the number of other items
            with its label; NaN for a query that has none.
    """

    queries: np.ndarray
    neighbours: np.ndarray
    correct: np.ndarray
    average_precision: np.ndarray


def _int_array(values: object, name: str) -> np.ndarray:
    array = np.asarray(values.cpu() if isinstance(values, Tensor) else values)
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {array.shape}")
    if array.size and not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{name} must hold integers, got {array.dtype}")
    return array.astype(np.int64)


def retrieval_lists(
    embeddings: Tensor | np.ndarray,
    labels: Tensor | np.ndarray | Sequence[int],
    *,
    k: int = 5,
    metric: Metric = "euclidean",
    queries: Sequence[int] | None = None,
) -> RetrievalLists:
    """Every item's k nearest other items, and its MAP@R, as the library's evaluation ranks them.

    The neighbours come from the exact :class:`~dmlkit.evaluation.TorchKNN` search over all
    items (each query's own index excluded, ties broken by the lower index), so the lists and
    MAP@R values are those behind :func:`dmlkit.evaluation.evaluate`'s averages.

    Args:
        embeddings: (N, D) embeddings.
        labels: (N,) integer labels.
        k: Neighbours kept per query, in [1, N - 1].
        metric: The ranking: ``"euclidean"``, ``"cosine"`` or ``"dot"``.
        queries: Item indices of the queries, in the order wanted; None for all items.

    Returns:
        The :class:`RetrievalLists` of the queries.

    Raises:
        ValueError: Bad embeddings (not 2-D, non-finite), labels of the wrong length, k out of
            range, an unknown metric, or a query index outside [0, N).
    """
    search = TorchKNN(metric)
    points = check_embeddings(
        embeddings if isinstance(embeddings, Tensor) else torch.from_numpy(np.asarray(embeddings))
    ).detach()
    n = points.shape[0]
    item_labels = _int_array(labels, "labels")
    if item_labels.shape[0] != n:
        raise ValueError(
            f"labels has length {item_labels.shape[0]} but there are {n} embeddings; "
            "they must match"
        )
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n - 1:
        raise ValueError(f"k must be an integer in [1, {n - 1}] for {n} items, got {k!r}")
    chosen = np.arange(n) if queries is None else _int_array(queries, "queries")
    if chosen.size == 0:
        raise ValueError("queries is empty: there is nothing to retrieve")
    outside = chosen[(chosen < 0) | (chosen >= n)]
    if outside.size:
        raise ValueError(f"query indices must lie in [0, {n}); got {outside[:5].tolist()}")
    _, class_ids, class_sizes = np.unique(item_labels, return_inverse=True, return_counts=True)
    num_relevant = class_sizes[class_ids[chosen]] - 1
    depth = min(max(k, int(num_relevant.max())), n - 1)
    # The search runs over all items (as the evaluation does, so ties resolve the same way);
    # only the chosen rows are kept.
    row_of_item = np.full(n, -1)
    row_of_item[chosen] = np.arange(chosen.size)
    ranked = np.empty((chosen.size, depth), dtype=np.int64)
    for block in search.search(points, depth):
        items = np.arange(block.start, block.start + block.indices.shape[0])
        rows = row_of_item[items]
        wanted = rows >= 0
        # A query asked for twice fills only its last row here; the copy below fills the rest.
        ranked[rows[wanted]] = block.indices.cpu().numpy()[wanted]
    ranked = ranked[row_of_item[chosen]]
    correct = item_labels[ranked] == item_labels[chosen, None]
    average_precision = mean_average_precision_at_r(
        torch.from_numpy(correct), torch.from_numpy(np.maximum(num_relevant, 1)).double()
    ).numpy()
    average_precision[num_relevant == 0] = np.nan
    return RetrievalLists(
        queries=chosen,
        neighbours=ranked[:, :k].copy(),
        correct=correct[:, :k].copy(),
        average_precision=average_precision,
    )


def worst_queries(lists: RetrievalLists, n: int) -> np.ndarray:
    """The rows of ``lists`` holding the n queries with the lowest MAP@R, worst first.

    Queries without MAP@R (no other item of their class) are left out. Ties go to the query
    with fewer correct neighbours among its k, then to the lower item index.

    Args:
        lists: Retrieval lists (:func:`retrieval_lists`).
        n: How many queries, at least 1; fewer come back when fewer have a MAP@R.

    Returns:
        int64 row positions in ``lists``.

    Raises:
        ValueError: ``n`` is not an integer of at least 1.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an integer of at least 1, got {n!r}")
    scored = np.flatnonzero(~np.isnan(lists.average_precision))
    order = np.lexsort(
        (
            lists.queries[scored],
            lists.correct[scored].sum(1),
            lists.average_precision[scored],
        )
    )
    return scored[order[:n]].astype(np.int64)


def _scaled(pixels: np.ndarray) -> np.ndarray:
    """Min-max scaled to [0, 1]; a constant picture is only clipped into that range."""
    values = pixels.astype(np.float64)
    low, high = float(values.min()), float(values.max())
    if high > low:
        return (values - low) / (high - low)
    return np.clip(values, 0.0, 1.0)


def item_image(dataset: Any, index: int) -> np.ndarray:
    """A displayable picture of one dataset item: the original image, not the model's input.

    Items of an :class:`~dmlkit.data.ImageFileDataset` are read again from their file (so
    without normalisation or augmentation); items of an :class:`~dmlkit.data.ArrayDataset`
    are its raw array, min-max scaled. A :class:`~dmlkit.data.Subset` shows its underlying item.

    Args:
        dataset: An ``ImageFileDataset``, an ``ArrayDataset`` of images (``[H, W]``, or
            ``[C, H, W]`` with C 1 or 3), or a ``Subset`` of either.
        index: Item index in ``dataset``.

    Returns:
        An (H, W) grey or (H, W, 3) colour float64 picture in [0, 1].

    Raises:
        ValueError: ``index`` is out of range, the item is not an image (a feature vector, say,
            or an array with NaN), or the dataset is of another kind.
    """
    if not 0 <= index < len(dataset):
        raise ValueError(f"index {index} is out of range for a dataset of {len(dataset)} items")
    if isinstance(dataset, Subset):
        index = int(dataset.indices[index])
        dataset = dataset.dataset
    if isinstance(dataset, ImageFileDataset):
        display_mode = "L" if Image.getmodebase(dataset.mode) == "L" else "RGB"
        picture = read_image(dataset.paths[index], display_mode)
        return np.asarray(picture, dtype=np.float64) / 255.0
    if not isinstance(dataset, ArrayDataset):
        raise ValueError(
            f"cannot show items of a {type(dataset).__name__}: item_image reads ImageFileDataset "
            "and ArrayDataset items (or a Subset of them)"
        )
    pixels = dataset.data[index].cpu().numpy()
    if pixels.ndim == 3 and pixels.shape[0] in (1, 3):
        pixels = pixels[0] if pixels.shape[0] == 1 else pixels.transpose(1, 2, 0)
    elif pixels.ndim != 2:
        raise ValueError(
            f"item {index} has shape {pixels.shape}: not an image ([H, W], or [C, H, W] with "
            "C 1 or 3)"
        )
    if not np.isfinite(pixels).all():
        raise ValueError(f"item {index} has non-finite values: not an image")
    return _scaled(pixels)


def _framed(axis: Any, picture: np.ndarray, colour: str, caption: str) -> None:
    axis.imshow(picture, cmap="gray" if picture.ndim == 2 else None, vmin=0.0, vmax=1.0)
    axis.set_xticks([])
    axis.set_yticks([])
    for spine in axis.spines.values():
        spine.set_edgecolor(colour)
        spine.set_linewidth(4)
    axis.set_title(caption, fontsize=8, color=colour)


def plot_retrieval_grid(
    image_of: Callable[[int], np.ndarray],
    labels: np.ndarray | Sequence[int],
    lists: RetrievalLists,
    rows: Sequence[int],
    path: str | Path,
    *,
    title: str = "",
    class_names: Mapping[int, str] | None = None,
) -> Path:
    """Draws queries and their nearest neighbours, one figure row per query.

    Each row shows the query (blue frame, its class and MAP@R), then its k neighbours in rank
    order: a green frame and ✓ when the neighbour shares the query's class, a red frame and ✗
    when it does not (the marks carry the meaning, not the colours alone).

    Args:
        image_of: Picture of an item index, (H, W) or (H, W, 3) in [0, 1]; e.g.
            ``lambda i: item_image(dataset, i)``.
        labels: (N,) integer labels of all items.
        lists: Retrieval lists (:func:`retrieval_lists`).
        rows: Which rows of ``lists`` to draw, top to bottom (e.g. :func:`worst_queries`).
        path: The PNG to write; its folder is created.
        title: Figure title.
        class_names: Optional names by label; unnamed labels show as numbers.

    Returns:
        ``path``.

    Raises:
        ValueError: No rows, a row outside ``lists``, or labels too short for the listed items.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chosen = _int_array(rows, "rows")
    n_lists = lists.queries.shape[0]
    if chosen.size == 0:
        raise ValueError("rows is empty: there is nothing to plot")
    outside = chosen[(chosen < 0) | (chosen >= n_lists)]
    if outside.size:
        raise ValueError(f"rows must lie in [0, {n_lists}); got {outside[:5].tolist()}")
    item_labels = _int_array(labels, "labels")
    largest = int(max(lists.queries.max(), lists.neighbours.max()))
    if largest >= item_labels.shape[0]:
        raise ValueError(
            f"labels has {item_labels.shape[0]} entries but the lists refer to item {largest}"
        )

    def name(item: int) -> str:
        label = int(item_labels[item])
        return class_names.get(label, str(label)) if class_names else str(label)

    k = lists.neighbours.shape[1]
    figure, axes = plt.subplots(
        chosen.size, k + 1, figsize=(1.7 * (k + 1), 2.0 * chosen.size + 0.6), squeeze=False
    )
    for axis_row, row in zip(axes, chosen, strict=True):
        query = int(lists.queries[row])
        score = lists.average_precision[row]
        map_text = "n/a" if np.isnan(score) else f"{score:.2f}"
        caption = f"query #{query}: {name(query)}\nMAP@R {map_text}"
        _framed(axis_row[0], image_of(query), _QUERY_COLOUR, caption)
        for rank, (axis, item, hit) in enumerate(
            zip(axis_row[1:], lists.neighbours[row], lists.correct[row], strict=True), start=1
        ):
            mark, colour = ("✓", _CORRECT_COLOUR) if hit else ("✗", _WRONG_COLOUR)
            _framed(axis, image_of(int(item)), colour, f"{mark} {rank}: {name(int(item))}")
    heading = f"{title}\n" if title else ""
    figure.suptitle(f"{heading}✓ same class as the query   ✗ another class", fontsize=10)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
