"""Plots of dmlkit.viz: smoothing, training curves, embedding maps and retrieval grids.

Figures are checked twice: the PNG on disk is a valid image, and the figure itself (caught when
the plotting function closes it) holds what the picture should show.
"""

from __future__ import annotations

import csv
import math
import warnings
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import numpy as np
import pytest
import torch
from matplotlib.colors import to_hex
from PIL import Image
from sklearn.metrics import silhouette_score

from dmlkit.data import ArrayDataset, ImageFileDataset, subset
from dmlkit.data.transforms import ToTensor
from dmlkit.evaluation import evaluate
from dmlkit.viz import embedding_map
from dmlkit.viz.curves import plot_training_log
from dmlkit.viz.embedding_map import EmbeddingPanel, plot_embedding_maps, project_2d
from dmlkit.viz.retrieval_grid import (
    RetrievalLists,
    item_image,
    plot_retrieval_grid,
    retrieval_lists,
    worst_queries,
)
from dmlkit.viz.smoothing import auto_window, moving_average

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_valid_png(path: Path, min_size: tuple[int, int] = (200, 150)) -> tuple[int, int]:
    assert path.is_file()
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        width, height = image.size
    assert width >= min_size[0] and height >= min_size[1]
    assert width <= 5000 and height <= 5000
    return width, height


def blobs(
    centres: np.ndarray, per_class: int, spread: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(len(centres)), per_class)
    points = centres[labels] + spread * rng.normal(size=(len(labels), centres.shape[1]))
    return points, labels


def nearest_centroid_accuracy(points: np.ndarray, labels: np.ndarray) -> float:
    classes = np.unique(labels)
    centroids = np.stack([points[labels == c].mean(0) for c in classes])
    nearest = np.argmin(((points[:, None] - centroids[None]) ** 2).sum(-1), axis=1)
    return float((classes[nearest] == labels).mean())


# --- moving_average and auto_window ---------------------------------------------------------


def test_constant_series_stays_constant_to_the_edges() -> None:
    values = np.full(40, 0.7)
    np.testing.assert_array_equal(moving_average(values, 9), values)
    # What a plain convolution does: zero padding drags both ends towards 0.
    plain = np.convolve(values, np.ones(9) / 9, mode="same")
    assert plain[0] < 0.5 and plain[-1] < 0.5


@pytest.mark.parametrize(
    ("window", "expected"),
    [
        # Near the edges the window shrinks symmetrically: the ends are their own average.
        (3, [1, 7 / 3, 14 / 3, 28 / 3, 16]),
        # Even window: one more point on the right than on the left, where there is room.
        (4, [1, 7 / 3, 30 / 4, 28 / 3, 16]),
    ],
)
def test_moving_average_by_hand(window: int, expected: list[float]) -> None:
    result = moving_average([1, 2, 4, 8, 16], window)
    assert result.dtype == np.float64
    np.testing.assert_allclose(result, expected, rtol=1e-14)


def test_linear_series_unchanged_up_to_the_edges() -> None:
    values = 3.0 * np.arange(50) + 2.0
    np.testing.assert_allclose(moving_average(values, 7), values, rtol=1e-12)


def test_the_steep_start_of_a_loss_curve_is_kept() -> None:
    steps = np.arange(1000)
    loss = 2.0 * np.exp(-steps / 100) + 0.2
    smoothed = moving_average(loss, 41)
    assert smoothed[0] == loss[0]
    # A window cut on one side only (the first 21 points) would start far below the curve.
    assert np.mean(loss[:21]) < loss[0] - 0.15
    assert abs(smoothed[5] - loss[5]) < 0.002


def test_non_finite_values_are_ignored() -> None:
    result = moving_average([1.0, math.nan, 3.0, math.inf, 5.0], 3)
    np.testing.assert_allclose(result, [1.0, 2.0, 3.0, 4.0, 5.0])
    only_gaps = moving_average([math.nan, math.nan, math.nan, -math.inf, 2.0], 3)
    np.testing.assert_array_equal(np.isnan(only_gaps), [True, True, True, False, False])
    np.testing.assert_allclose(only_gaps[3:], [2.0, 2.0])
    assert np.isnan(moving_average([math.nan, math.nan], 5)).all()


def test_window_one_is_the_identity() -> None:
    values = np.array([3.0, math.nan, -1.5, 2.25], dtype=np.float32)
    result = moving_average(values, 1)
    assert result.dtype == np.float64
    np.testing.assert_array_equal(result, values.astype(np.float64))


def test_window_longer_than_the_series() -> None:
    np.testing.assert_allclose(moving_average([1.0, 2.0, 4.0], 10), [1.0, 7 / 3, 4.0])
    assert moving_average([], 5).shape == (0,)


@pytest.mark.parametrize("window", [0, -3, 2.5, True, "3"])
def test_bad_window_is_rejected(window: Any) -> None:
    with pytest.raises(ValueError, match="window"):
        moving_average([1.0, 2.0, 3.0], window)


def test_values_must_be_one_dimensional() -> None:
    with pytest.raises(ValueError, match="1-D"):
        moving_average(np.ones((3, 4)), 3)


def test_auto_window() -> None:
    assert [auto_window(n) for n in (0, 1, 10, 49, 50, 100, 1000, 10_000)] == [
        1,
        1,
        1,
        1,
        3,
        5,
        41,
        401,
    ]
    assert all(auto_window(n) % 2 == 1 for n in range(500))
    with pytest.raises(ValueError, match="n must"):
        auto_window(-1)


# --- plot_training_log --------------------------------------------------------------------------


def write_run(folder: Path, n_steps: int = 120) -> dict[str, np.ndarray]:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    steps = np.arange(1, n_steps + 1) * 10
    loss = 2.0 * np.exp(-steps / 600) + 0.2 * rng.normal(size=n_steps)
    with (folder / "train.csv").open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["step", "epoch", "loss", "lr"])
        for i, step in enumerate(steps):
            writer.writerow([step, step // 400, f"{loss[i]:.6g}", "0.001"])
    with (folder / "validation.csv").open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["step", "epoch", "mean_average_precision_at_r"])
        for epoch in range(3):
            writer.writerow([400 * (epoch + 1), epoch, 0.2 + 0.1 * epoch])
    return {"steps": steps, "loss": np.array([float(f"{v:.6g}") for v in loss])}


@pytest.mark.parametrize("smoothing", [None, 1, 5])
def test_training_log_png(tmp_path: Path, closed_figures: list[Any], smoothing: int | None) -> None:
    logged = write_run(tmp_path / "run")
    path = plot_training_log(
        tmp_path / "run", tmp_path / "plots" / "curves.png", smoothing=smoothing
    )
    assert path == tmp_path / "plots" / "curves.png"
    assert_valid_png(path, min_size=(800, 250))
    (figure,) = closed_figures
    titles = {axis.get_title(): axis for axis in figure.axes if axis.get_visible()}
    assert set(titles) == {"training loss", "validation"}
    window = auto_window(len(logged["steps"])) if smoothing is None else smoothing
    loss_lines = titles["training loss"].get_lines()
    if window == 1:
        (raw,) = loss_lines
        assert "moving average" not in figure.get_suptitle()
    else:
        raw, smoothed = loss_lines
        assert raw.get_alpha() == pytest.approx(0.25)
        assert smoothed.get_color() == raw.get_color()
        np.testing.assert_allclose(smoothed.get_ydata(), moving_average(logged["loss"], window))
        assert f"moving average of {window} logged steps" in figure.get_suptitle()
    np.testing.assert_allclose(raw.get_ydata(), logged["loss"])
    (validation,) = titles["validation"].get_lines()
    assert validation.get_marker() == "o"
    np.testing.assert_allclose(validation.get_ydata(), [0.2, 0.3, 0.4])


def test_training_log_default_path_and_errors(tmp_path: Path) -> None:
    write_run(tmp_path / "run")
    assert plot_training_log(tmp_path / "run") == tmp_path / "run" / "training.png"
    assert_valid_png(tmp_path / "run" / "training.png")
    with pytest.raises(ValueError, match="smoothing"):
        plot_training_log(tmp_path / "run", smoothing=0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"train\.csv"):
        plot_training_log(tmp_path / "empty")


# --- project_2d and plot_embedding_maps -----------------------------------------------------


def test_pca_projection_separates_two_blobs() -> None:
    centres = np.zeros((2, 8))
    centres[0, 0], centres[1, 0] = -10.0, 10.0
    points, labels = blobs(centres, 50, 0.5, seed=1)
    coordinates, used = project_2d(torch.from_numpy(points).float(), method="pca")
    assert used == "PCA"
    assert coordinates.shape == (100, 2) and coordinates.dtype == np.float64
    again, _ = project_2d(torch.from_numpy(points).float(), method="pca")
    np.testing.assert_array_equal(coordinates, again)
    assert nearest_centroid_accuracy(coordinates, labels) == 1.0
    assert silhouette_score(coordinates, labels) > 0.8


def test_auto_falls_back_to_pca_without_umap(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(embedding_map, "umap_available", lambda: False)
    points = np.random.default_rng(0).normal(size=(30, 5))
    coordinates, used = project_2d(points)
    assert used == "PCA (umap-learn not installed)"
    np.testing.assert_allclose(coordinates, project_2d(points, method="pca")[0])
    with pytest.raises(ImportError, match=r'pip install "dmlkit\[umap\]"'):
        project_2d(points, method="umap")


@pytest.mark.parametrize(
    ("embeddings", "message"),
    [
        (np.array([[0.0, 1.0], [math.nan, 2.0], [3.0, 4.0]]), "non-finite"),
        (np.array([[0.0, 1.0], [1.0, math.inf], [3.0, 4.0]]), "non-finite"),
        (np.zeros(5), "2-D"),
        (np.zeros((2, 4)), "at least 3"),
        (np.zeros((5, 1)), "at least 2 dimensions"),
    ],
)
def test_project_2d_rejects_bad_embeddings(embeddings: np.ndarray, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        project_2d(embeddings, method="pca")


def test_project_2d_rejects_unknown_method() -> None:
    with pytest.raises(ValueError, match="unknown projection method"):
        project_2d(np.zeros((5, 3)), method="tsne")  # type: ignore[arg-type]


def test_embedding_maps(
    tmp_path: Path, closed_figures: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(embedding_map, "umap_available", lambda: False)
    rng = np.random.default_rng(3)
    many_classes = np.arange(600) % 30
    many = EmbeddingPanel(
        "training classes", rng.normal(size=(600, 6)) + many_classes[:, None], many_classes
    )
    few_points, few_labels = blobs(rng.normal(size=(5, 6)) * 8, 20, 1.0, seed=4)
    few = EmbeddingPanel("held-out classes", torch.from_numpy(few_points), list(few_labels))
    names = {0: "zero", 1: "one"}
    path = plot_embedding_maps(
        [many, few], tmp_path / "maps" / "map.png", max_points=200, class_names=names
    )
    assert path == tmp_path / "maps" / "map.png"
    assert_valid_png(path, min_size=(900, 400))
    (figure,) = closed_figures
    left, right = figure.axes
    assert "200 of 600 points" in left.get_title()
    assert "PCA (umap-learn not installed)" in left.get_title()
    assert "100 points" in right.get_title() and " of " not in right.get_title()
    assert left.get_legend() is None
    (scatter,) = left.collections
    assert len(scatter.get_offsets()) == 200
    assert len({to_hex(c) for c in scatter.get_facecolors()}) == len(np.unique(many_classes))
    legend = right.get_legend()
    assert [t.get_text() for t in legend.get_texts()] == ["zero", "one", "2", "3", "4"]
    # Classes 0-4 are in both panels and keep their colours: the right panel's five are among
    # the left panel's thirty.
    right_colours = {to_hex(c.get_facecolors()[0]) for c in right.collections}
    assert len(right_colours) == 5
    assert right_colours <= {to_hex(c) for c in scatter.get_facecolors()}


def test_embedding_maps_give_disjoint_classes_distinct_colours(
    tmp_path: Path, closed_figures: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(embedding_map, "umap_available", lambda: False)
    rng = np.random.default_rng(6)
    train_labels, test_labels = np.arange(100) % 5, 5 + np.arange(100) % 5
    panels = [
        EmbeddingPanel("training classes", rng.normal(size=(100, 4)), train_labels),
        EmbeddingPanel("held-out classes", rng.normal(size=(100, 4)), test_labels),
    ]
    plot_embedding_maps(panels, tmp_path / "map.png")
    (figure,) = closed_figures
    colours = [[to_hex(c.get_facecolors()[0]) for c in axis.collections] for axis in figure.axes]
    tab10 = [to_hex(c) for c in matplotlib.colormaps["tab10"].colors]
    assert colours == [tab10[:5], tab10[5:]]


def test_embedding_map_subsample_is_seeded(
    tmp_path: Path, closed_figures: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(embedding_map, "umap_available", lambda: False)
    rng = np.random.default_rng(5)
    panel = EmbeddingPanel("all", rng.normal(size=(300, 4)), rng.integers(0, 3, size=300))
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        plot_embedding_maps([panel], tmp_path / f"{name}.png", max_points=50, seed=seed)
    shown = [figure.axes[0].collections[0].get_offsets() for figure in closed_figures]
    np.testing.assert_array_equal(shown[0], shown[1])
    assert not np.array_equal(shown[0], shown[2])


def test_embedding_maps_reject_bad_panels(tmp_path: Path) -> None:
    points = np.zeros((10, 3))
    with pytest.raises(ValueError, match="panels is empty"):
        plot_embedding_maps([], tmp_path / "x.png", method="pca")
    with pytest.raises(ValueError, match="must match"):
        plot_embedding_maps(
            [EmbeddingPanel("p", points, [0] * 9)], tmp_path / "x.png", method="pca"
        )
    with pytest.raises(ValueError, match="max_points"):
        plot_embedding_maps(
            [EmbeddingPanel("p", points, [0] * 10)], tmp_path / "x.png", max_points=2
        )
    assert not (tmp_path / "x.png").exists()


# --- retrieval lists ----------------------------------------------------------------------------


def oracle_lists(
    embeddings: np.ndarray, labels: np.ndarray, metric: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Full neighbour rankings, relevance and MAP@R by brute force in numpy (float64)."""
    x = embeddings.astype(np.float64)
    if metric == "cosine":
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
        distance = -(x @ x.T)
    else:
        distance = ((x[:, None] - x[None]) ** 2).sum(-1)
    np.fill_diagonal(distance, np.inf)
    order = np.argsort(distance, axis=1, kind="stable")[:, :-1]  # self (inf) is last
    correct = labels[order] == labels[:, None]
    relevant = np.array([(labels == label).sum() - 1 for label in labels])
    average_precision = np.full(len(labels), np.nan)
    for i, r in enumerate(relevant):
        if r:
            hits = correct[i, :r]
            precision = np.cumsum(hits) / np.arange(1, r + 1)
            average_precision[i] = (precision * hits).sum() / r
    return order, correct, average_precision


@pytest.fixture(scope="module")
def small_set() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(7)
    labels = np.append(rng.integers(0, 6, size=59), 99)  # the last item is alone in its class
    offsets = 0.8 * (labels % 3)[:, None]  # classes overlap: MAP@R is neither 0 nor 1
    embeddings = (rng.normal(size=(60, 4)) + offsets).astype(np.float32)
    return embeddings, labels


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_retrieval_lists_match_brute_force(
    small_set: tuple[np.ndarray, np.ndarray], metric: str
) -> None:
    embeddings, labels = small_set
    lists = retrieval_lists(embeddings, labels, k=7, metric=metric)  # type: ignore[arg-type]
    order, correct, average_precision = oracle_lists(embeddings, labels, metric)
    np.testing.assert_array_equal(lists.queries, np.arange(60))
    assert lists.neighbours.dtype == np.int64 and lists.correct.dtype == np.bool_
    np.testing.assert_array_equal(lists.neighbours, order[:, :7])
    np.testing.assert_array_equal(lists.correct, correct[:, :7])
    np.testing.assert_allclose(lists.average_precision, average_precision, rtol=1e-12)
    assert np.isnan(lists.average_precision[59])
    assert not (lists.correct & (labels[lists.neighbours] != labels[:, None])).any()


def test_retrieval_lists_agree_with_evaluate(small_set: tuple[np.ndarray, np.ndarray]) -> None:
    embeddings, labels = small_set
    lists = retrieval_lists(torch.from_numpy(embeddings), labels, k=3)
    result = evaluate(embeddings, labels, metrics=["mean_average_precision_at_r"])
    assert result.num_lone_queries == 1
    assert np.nanmean(lists.average_precision) == pytest.approx(
        result["mean_average_precision_at_r"], rel=1e-12
    )


def test_retrieval_lists_of_chosen_queries(small_set: tuple[np.ndarray, np.ndarray]) -> None:
    embeddings, labels = small_set
    everything = retrieval_lists(embeddings, labels, k=4)
    chosen = [17, 0, 59, 17]
    some = retrieval_lists(embeddings, labels, k=4, queries=chosen)
    np.testing.assert_array_equal(some.queries, chosen)
    np.testing.assert_array_equal(some.neighbours, everything.neighbours[chosen])
    np.testing.assert_array_equal(some.correct, everything.correct[chosen])
    np.testing.assert_array_equal(some.average_precision, everything.average_precision[chosen])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"labels": np.zeros(59, dtype=np.int64)}, "labels has length 59"),
        ({"labels": np.zeros(60)}, "integers"),
        ({"k": 0}, r"k must be an integer in \[1, 59\]"),
        ({"k": 60}, r"k must be an integer in \[1, 59\]"),
        ({"queries": [3, 60]}, r"\[0, 60\); got \[60\]"),
        ({"queries": [-1]}, r"got \[-1\]"),
        ({"queries": []}, "queries is empty"),
        ({"metric": "manhattan"}, "unknown metric"),
    ],
)
def test_retrieval_lists_reject_bad_input(
    small_set: tuple[np.ndarray, np.ndarray], kwargs: dict[str, Any], message: str
) -> None:
    embeddings, labels = small_set
    arguments: dict[str, Any] = {"labels": labels, **kwargs}
    with pytest.raises(ValueError, match=message):
        retrieval_lists(embeddings, **arguments)


def test_worst_queries_order() -> None:
    lists = RetrievalLists(
        queries=np.array([13, 11, 12, 10, 14]),
        neighbours=np.zeros((5, 3), dtype=np.int64),
        correct=np.array([[1, 1, 0], [0, 0, 0], [1, 0, 0], [0, 1, 1], [0, 0, 0]], dtype=bool),
        average_precision=np.array([0.5, math.nan, 0.2, 0.5, 0.2]),
    )
    # Lowest MAP@R first; then fewer correct (row 4 before row 2); then lower item (10 < 13).
    np.testing.assert_array_equal(worst_queries(lists, 4), [4, 2, 3, 0])
    np.testing.assert_array_equal(worst_queries(lists, 2), [4, 2])
    np.testing.assert_array_equal(worst_queries(lists, 10), [4, 2, 3, 0])  # the NaN is left out
    with pytest.raises(ValueError, match="n must"):
        worst_queries(lists, 0)


# --- item_image and plot_retrieval_grid ---------------------------------------------------------


def test_item_image_of_bool_array_items() -> None:
    data = np.zeros((3, 1, 5, 6), dtype=bool)
    data[1, 0, 2, :] = True
    picture = item_image(ArrayDataset(data, [0, 1, 2]), 1)
    assert picture.shape == (5, 6) and picture.dtype == np.float64
    np.testing.assert_array_equal(picture, data[1, 0].astype(np.float64))
    np.testing.assert_array_equal(item_image(ArrayDataset(data, [0, 1, 2]), 0), np.zeros((5, 6)))


def test_item_image_of_digits_like_and_colour_arrays() -> None:
    counts = np.arange(64, dtype=np.float32).reshape(1, 1, 8, 8) % 17  # ink counts 0-16
    picture = item_image(ArrayDataset(counts, [0]), 0)
    assert picture.shape == (8, 8)
    np.testing.assert_allclose(picture, counts[0, 0] / 16.0)
    colour = np.random.default_rng(0).normal(size=(2, 3, 4, 6))
    picture = item_image(ArrayDataset(colour, [0, 1]), 1)
    assert picture.shape == (4, 6, 3)
    assert picture.min() == 0.0 and picture.max() == 1.0
    channels_last = colour[1].transpose(1, 2, 0)
    low, high = channels_last.min(), channels_last.max()
    np.testing.assert_allclose(picture, (channels_last - low) / (high - low))


def test_item_image_reads_files_of_a_subset(tmp_path: Path) -> None:
    pixels = [np.zeros((4, 6, 3), dtype=np.uint8) for _ in range(2)]
    pixels[0][..., 0] = 255
    pixels[1][..., 1] = 200
    paths = []
    for i, array in enumerate(pixels):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(array).save(paths[-1])

    def normalised(image: Image.Image) -> torch.Tensor:
        return (ToTensor()(image) - 0.5) / 0.25  # what a model sees: not [0, 1]

    images = ImageFileDataset(paths, [3, 4], transform=normalised)
    view = subset(subset(images, [1, 0]), [1, 0])  # nested: item 0 is file 0 again
    np.testing.assert_allclose(item_image(view, 1), pixels[1] / 255.0)
    np.testing.assert_allclose(item_image(view, 0), pixels[0] / 255.0)
    grey = item_image(ImageFileDataset(paths, [3, 4], mode="L"), 1)
    assert grey.shape == (4, 6) and 0.0 < grey.max() < 1.0


@pytest.mark.parametrize(
    ("data", "index", "message"),
    [
        (np.zeros((3, 16)), 0, "not an image"),
        (np.zeros((3, 2, 4, 4)), 0, "not an image"),
        (np.full((3, 1, 4, 4), math.nan), 0, "non-finite"),
        (np.zeros((3, 1, 4, 4)), 3, "out of range"),
        (np.zeros((3, 1, 4, 4)), -1, "out of range"),
    ],
)
def test_item_image_rejects_non_images(data: np.ndarray, index: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        item_image(ArrayDataset(data, [0, 1, 2]), index)


def test_item_image_rejects_other_datasets() -> None:
    with pytest.raises(ValueError, match="cannot show items of a list"):
        item_image([(torch.zeros(1, 4, 4), 0)], 0)


def test_retrieval_grid(
    tmp_path: Path, closed_figures: list[Any], small_set: tuple[np.ndarray, np.ndarray]
) -> None:
    embeddings, labels = small_set

    def name(label: int) -> str:
        return "lonely" if label == 99 else str(label)

    images = ArrayDataset(np.random.default_rng(1).random((60, 1, 8, 8)), labels)
    lists = retrieval_lists(embeddings, labels, k=4)
    rows = worst_queries(lists, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a missing ✓/✗ glyph would warn
        path = plot_retrieval_grid(
            lambda i: item_image(images, i),
            labels,
            lists,
            rows,
            tmp_path / "grid" / "worst.png",
            title="worst queries",
            class_names={99: "lonely"},
        )
    assert_valid_png(path, min_size=(500, 400))
    (figure,) = closed_figures
    assert len(figure.axes) == 3 * 5
    assert figure.get_suptitle().startswith("worst queries")
    for row, axes in zip(rows, np.reshape(figure.axes, (3, 5)), strict=True):
        query = lists.queries[row]
        assert axes[0].get_title().startswith(f"query #{query}: {name(labels[query])}\n")
        assert f"MAP@R {lists.average_precision[row]:.2f}" in axes[0].get_title()
        for rank, (axis, item, hit) in enumerate(
            zip(axes[1:], lists.neighbours[row], lists.correct[row], strict=True), start=1
        ):
            assert axis.get_title() == f"{'✓' if hit else '✗'} {rank}: {name(labels[item])}"
            frame = to_hex(axis.spines["left"].get_edgecolor())
            assert frame == ("#009e73" if hit else "#d55e00")


def test_retrieval_grid_rejects_bad_rows(
    tmp_path: Path, small_set: tuple[np.ndarray, np.ndarray]
) -> None:
    embeddings, labels = small_set
    lists = retrieval_lists(embeddings, labels, k=2, queries=[0, 1])
    with pytest.raises(ValueError, match="rows is empty"):
        plot_retrieval_grid(lambda i: np.zeros((4, 4)), labels, lists, [], tmp_path / "g.png")
    with pytest.raises(ValueError, match=r"rows must lie in \[0, 2\)"):
        plot_retrieval_grid(lambda i: np.zeros((4, 4)), labels, lists, [2], tmp_path / "g.png")
    with pytest.raises(ValueError, match="labels has 5 entries"):
        plot_retrieval_grid(lambda i: np.zeros((4, 4)), labels[:5], lists, [0], tmp_path / "g.png")


# --- UMAP (slow: numba JIT) ---------------------------------------------------------------------


@pytest.mark.umap
def test_umap_separates_three_clusters() -> None:
    pytest.importorskip("umap")
    centres = np.zeros((3, 10))
    centres[0, 0], centres[1, 1], centres[2, 2] = 12.0, 12.0, 12.0
    points, labels = blobs(centres, 100, 1.0, seed=2)
    coordinates, used = project_2d(points, method="umap", seed=0)
    assert used == "UMAP"
    assert coordinates.shape == (300, 2) and np.isfinite(coordinates).all()
    assert nearest_centroid_accuracy(coordinates, labels) > 0.98
    assert silhouette_score(coordinates, labels) > 0.5
    assert project_2d(points[:40], seed=0)[1] == "UMAP"  # auto picks UMAP when installed


def test_project_2d_leaves_tiny_sets_to_pca(monkeypatch: pytest.MonkeyPatch) -> None:
    # UMAP's spectral start fails below about 16 points: auto falls back, umap refuses.
    monkeypatch.setattr(embedding_map, "umap_available", lambda: True)
    points = np.random.default_rng(0).normal(size=(10, 4))
    coordinates, used = project_2d(points, method="auto")
    assert used == "PCA (too few points for UMAP)" and coordinates.shape == (10, 2)
    with pytest.raises(ValueError, match="UMAP needs at least 16 points, got 10"):
        project_2d(points, method="umap")


def test_embedding_map_states_a_sample_drawn_before(
    tmp_path: Path, closed_figures: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(embedding_map, "umap_available", lambda: False)
    rng = np.random.default_rng(7)
    panel = EmbeddingPanel("training classes", rng.normal(size=(100, 4)), np.arange(100) % 4, 901)
    plot_embedding_maps([panel], tmp_path / "map.png")
    (figure,) = closed_figures
    assert "100 of 901 points" in figure.axes[0].get_title()
