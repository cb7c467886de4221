"""2-D maps of embeddings: UMAP (or PCA) projections, one scatter per set, coloured by class."""

from __future__ import annotations

import importlib.util
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from torch import Tensor

from ..progress import progress_bar

ProjectionMethod = Literal["auto", "umap", "pca"]
_METHODS: tuple[ProjectionMethod, ...] = ("auto", "umap", "pca")
# Panels with more classes than this get no legend: it would hide the map.
_MAX_LEGEND_CLASSES = 20
_UMAP_NEIGHBOURS = 15
_UMAP_MIN_POINTS = 16


def umap_available() -> bool:
    """Whether umap-learn can be imported (without importing it: that takes seconds)."""
    return importlib.util.find_spec("umap") is not None


def _as_points(embeddings: Tensor | np.ndarray) -> np.ndarray:
    """The embeddings as a finite float64 (N, D) array with N ≥ 3 and D ≥ 2."""
    points = (
        embeddings.detach().cpu().double().numpy()
        if isinstance(embeddings, Tensor)
        else np.asarray(embeddings, dtype=np.float64)
    )
    if points.ndim != 2:
        raise ValueError(
            f"embeddings must be 2-D (items, dimensions), got {points.ndim}-D shape {points.shape}"
        )
    if points.shape[0] < 3:
        raise ValueError(f"a 2-D map needs at least 3 embeddings, got {points.shape[0]}")
    if points.shape[1] < 2:
        raise ValueError(
            f"embeddings must have at least 2 dimensions to project, got {points.shape[1]}"
        )
    if not np.isfinite(points).all():
        raise ValueError(
            f"embeddings contain non-finite values ({int(np.isnan(points).sum())} NaN, "
            f"{int(np.isinf(points).sum())} Inf)"
        )
    return points


def project_2d(
    embeddings: Tensor | np.ndarray, method: ProjectionMethod = "auto", seed: int = 0
) -> tuple[np.ndarray, str]:
    """Projects embeddings to 2-D with UMAP or PCA.

    Args:
        embeddings: (N, D) embeddings, N ≥ 3 and D ≥ 2, all finite.
        method: ``"umap"``, ``"pca"``, or ``"auto"``: UMAP when umap-learn is installed, else
            PCA.
        seed: Random state of UMAP (PCA is deterministic).

    Returns:
        The (N, 2) float64 coordinates and the method used, as a label for titles: ``"UMAP"``,
        ``"PCA"``, or ``"PCA (umap-learn not installed)"`` or ``"PCA (too few points for
        UMAP)"`` when ``"auto"`` fell back.

    Raises:
        ValueError: Bad embeddings (not 2-D, fewer than 3 points or 2 dimensions, NaN or Inf),
            ``method="umap"`` with fewer than 16 points (its spectral start needs more), or an
            unknown method.
        ImportError: ``method="umap"`` without umap-learn.
    """
    if method not in _METHODS:
        raise ValueError(f"unknown projection method {method!r}; choose one of {_METHODS}")
    points = _as_points(embeddings)
    available = umap_available()
    if method == "umap" and not available:
        raise ImportError('UMAP maps need umap-learn: pip install "dmlkit[umap]"')
    too_few = points.shape[0] < _UMAP_MIN_POINTS
    if method == "umap" and too_few:
        raise ValueError(
            f"UMAP needs at least {_UMAP_MIN_POINTS} points, got {points.shape[0]}; use PCA"
        )
    if method == "pca" or not available or too_few:
        from sklearn.decomposition import PCA

        coordinates = PCA(n_components=2, svd_solver="full").fit_transform(points)
        label = "PCA"
        if method == "auto":
            label += " (too few points for UMAP)" if too_few else " (umap-learn not installed)"
        return np.asarray(coordinates, dtype=np.float64), label
    import umap

    reducer = umap.UMAP(
        n_components=2,
        random_state=seed,
        n_neighbors=min(_UMAP_NEIGHBOURS, points.shape[0] - 1),
    )
    with warnings.catch_warnings():
        # A random state makes UMAP single-threaded, which it announces on every fit.
        warnings.filterwarnings("ignore", message="n_jobs value", category=UserWarning)
        coordinates = reducer.fit_transform(points)
    return np.asarray(coordinates, dtype=np.float64), "UMAP"


@dataclass(frozen=True)
class EmbeddingPanel:
    """One scatter of an embedding map.

    Attributes:
        title: What the panel shows, e.g. ``"training classes"``.
        embeddings: (N, D) embeddings.
        labels: (N,) integer class labels, which colour the points.
        sampled_from: When the embeddings are already a sample, the number of items they were
            drawn from, stated in the title; None when they are all the items.
    """

    title: str
    embeddings: Tensor | np.ndarray
    labels: np.ndarray | Sequence[int]
    sampled_from: int | None = None


def _class_colours(n_classes: int, rng: np.random.Generator) -> np.ndarray:
    """(n_classes, 4) RGBA colours, one per class in sorted label order."""
    from matplotlib import colormaps

    if n_classes <= 10:
        return np.asarray(colormaps["tab10"](np.arange(n_classes)))
    if n_classes <= 20:
        return np.asarray(colormaps["tab20"](np.arange(n_classes)))
    # Spread along turbo, then shuffled: consecutive ids (often related classes) would
    # otherwise get nearly the same colour.
    colours = np.asarray(colormaps["turbo"](np.linspace(0.05, 0.95, n_classes)))
    return colours[rng.permutation(n_classes)]


def _draw_panel(
    axis: Any,
    coordinates: np.ndarray,
    labels: np.ndarray,
    title: str,
    class_names: Mapping[int, str] | None,
    colour_of: Mapping[int, np.ndarray],
) -> None:
    classes, class_ids = np.unique(labels, return_inverse=True)
    colours = np.stack([colour_of[int(label)] for label in classes])
    # Smaller dots as the map fills up, so dense clusters stay readable.
    size = float(np.clip(3000 / len(labels), 1.5, 20.0))
    if len(classes) <= _MAX_LEGEND_CLASSES:
        for class_id, label in enumerate(classes):
            shown = class_ids == class_id
            name = class_names.get(int(label), str(label)) if class_names else str(label)
            axis.scatter(
                *coordinates[shown].T,
                s=size,
                color=colours[class_id],
                label=name,
                linewidths=0,
                alpha=0.8,
            )
        axis.legend(
            fontsize=7,
            markerscale=max(1.0, 16 / size) ** 0.5,
            loc="center left",
            bbox_to_anchor=(1.0, 0.5),
            title="class",
            title_fontsize=8,
        )
    else:
        axis.scatter(*coordinates.T, s=size, c=colours[class_ids], linewidths=0, alpha=0.8)
    axis.set_title(title, fontsize=10)
    axis.set_xticks([])
    axis.set_yticks([])
    axis.set_aspect("equal", adjustable="datalim")


def plot_embedding_maps(
    panels: Sequence[EmbeddingPanel],
    path: str | Path,
    *,
    method: ProjectionMethod = "auto",
    seed: int = 0,
    max_points: int = 5000,
    class_names: Mapping[int, str] | None = None,
    progress: bool = False,
) -> Path:
    """Draws each panel's embeddings as a 2-D scatter coloured by class, side by side.

    Each panel is projected on its own (:func:`project_2d`), so e.g. training and held-out
    classes each fill their map. A panel of more than ``max_points`` items shows a seeded random
    subsample, stated in its title. Colours come from tab10 or tab20 up to 20 classes (with a
    legend), beyond that from a spread colormap in a seeded shuffled order (without legend); a
    class has one colour in every panel, and classes of different panels different colours.

    Args:
        panels: The panels, drawn left to right.
        path: The PNG to write; its folder is created.
        method: Projection method (see :func:`project_2d`).
        seed: Seed of the subsample, the colour order and UMAP.
        max_points: Most points drawn per panel.
        class_names: Optional legend names by label; unnamed labels show as numbers.
        progress: Show a bar of the panels projected (a UMAP fit takes seconds) on stderr.

    Returns:
        ``path``.

    Raises:
        ValueError: No panel, ``max_points`` below 3, a panel whose labels do not match its
            embeddings, or bad embeddings (see :func:`project_2d`).
        ImportError: ``method="umap"`` without umap-learn.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not panels:
        raise ValueError("panels is empty: there is nothing to plot")
    if isinstance(max_points, bool) or not isinstance(max_points, int) or max_points < 3:
        raise ValueError(f"max_points must be an integer of at least 3, got {max_points!r}")
    drawn = []
    for panel in progress_bar(panels, description="projecting", unit="map", enabled=progress):
        points = _as_points(panel.embeddings)
        labels = np.asarray(panel.labels)
        if labels.ndim != 1 or labels.shape[0] != points.shape[0]:
            raise ValueError(
                f"panel {panel.title!r}: labels have shape {labels.shape} but there are "
                f"{points.shape[0]} embeddings; they must match"
            )
        if not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"panel {panel.title!r}: labels must be integers, got {labels.dtype}")
        rng = np.random.default_rng(seed)
        if points.shape[0] > max_points:
            keep = np.sort(rng.choice(points.shape[0], size=max_points, replace=False))
            points, labels = points[keep], labels[keep]
        total = max(panel.sampled_from or 0, len(np.asarray(panel.labels)))
        count = (
            f"{len(labels):,} of {total:,} points" if len(labels) < total else f"{total:,} points"
        )
        coordinates, used = project_2d(points, method, seed)
        drawn.append((coordinates, labels, f"{panel.title}\n{used}, {count}"))
    # One colour per class across all panels: side by side, two panels' different classes
    # must not look alike.
    classes = np.unique(np.concatenate([labels for _, labels, _ in drawn]))
    colours = _class_colours(len(classes), np.random.default_rng(seed))
    colour_of = {int(label): colour for label, colour in zip(classes, colours, strict=True)}
    figure, axes = plt.subplots(
        1, len(drawn), figsize=(6.0 * len(drawn), 5.0), squeeze=False, layout="constrained"
    )
    for axis, (coordinates, labels, title) in zip(axes.flat, drawn, strict=True):
        _draw_panel(axis, coordinates, labels, title, class_names, colour_of)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
