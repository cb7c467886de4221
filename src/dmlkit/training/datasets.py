"""The datasets a run can name (:data:`DATASETS`).

An entry loads one split, ``"train"`` or ``"test"``, of a class-disjoint dataset. The run gives
it, by parameter name, what it asks for: ``split``; ``transform`` (an entry taking it is an
image dataset, loaded with the training and the evaluation preprocessing); ``root``,
``data_dir``, ``download``, ``test_root`` and ``on_error`` from the ``data`` section; any other
option from ``data.options``. A user's loader is named by import path
(``data.name: "my_package.data:load"``) and follows the same contract.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from .. import data
from ..data import LabelledDataset, subset
from ..registry import Registry

DATASETS = Registry("dataset")
# What a run gives a loader, by parameter name.
DATASET_RUN_VALUES = ("split", "transform", "root", "data_dir", "download", "test_root", "on_error")

# Array datasets whose items hold the ink as 1 where their image files show dark ink on paper.
INK_DATASETS = frozenset({"omniglot", "omniglot28"})

Split = Literal["train", "test"]
ErrorPolicy = Literal["raise", "skip"]

# What the classes of a built-in dataset are: (noun, training classes, test classes).
_OMNIGLOT_CLASSES = ("characters", "background alphabets", "evaluation alphabets")
CLASS_KINDS = {
    "digits": ("digits", "0–4", "5–9"),
    "omniglot": _OMNIGLOT_CLASSES,
    "omniglot28": _OMNIGLOT_CLASSES,
}


def describe_classes(name: str, split: Split, count: int) -> str:
    """How a run's output names its classes, e.g. ``659 unseen characters (evaluation
    alphabets)``.

    Args:
        name: The run's ``data.name``.
        split: ``"train"`` or ``"test"`` (the test classes are the unseen ones).
        count: How many classes the split has.
    """
    noun, train_part, test_part = CLASS_KINDS.get(name, ("classes", "", ""))
    where = train_part if split == "train" else test_part
    unseen = " unseen" if split == "test" else ""
    return f"{count}{unseen} {noun}" + (f" ({where})" if where else "")


def real_data_dir(configured: str | None = None) -> Path:
    """The real-data folder (Omniglot, the CUB subset, MobileNetV2 weights).

    Args:
        configured: ``data.data_dir`` of a run, if set.

    Raises:
        FileNotFoundError: Neither is given (``$DMLKIT_DATA`` unset and no ``data_dir``).
    """
    folder = configured or os.environ.get("DMLKIT_DATA")
    if not folder:
        raise FileNotFoundError(
            "the real-data folder is not set: set $DMLKIT_DATA (or data.data_dir) to the folder "
            "holding omniglot/, cub100_subset/ and mobilenet_v2_imagenet/"
        )
    return Path(folder).expanduser()


def _root(root: str | None, data_dir: str | None, name: str) -> Path:
    return Path(root).expanduser() if root is not None else real_data_dir(data_dir) / name


def _required(root: str | None, name: str) -> Path:
    if root is None:
        raise ValueError(f"data.root is required for data.name={name!r}")
    return Path(root).expanduser()


def _half(dataset: LabelledDataset, split: Split) -> LabelledDataset:
    """The first half of the classes for training, the second for testing."""
    first, second = data.class_disjoint_halves(dataset.labels)
    return subset(dataset, first if split == "train" else second)


@DATASETS.register("digits")
def digits(split: Split) -> LabelledDataset:
    """scikit-learn's 8×8 digits: 0–4 train, 5–9 test."""
    return data.digits(split)


@DATASETS.register("omniglot28")
def omniglot28(split: Split) -> LabelledDataset:
    """Omniglot at 28 × 28, embedded in the package: the 964 characters of the background
    alphabets train, the 659 of the evaluation alphabets test."""
    return data.omniglot28(split)


@DATASETS.register("omniglot")
def omniglot(split: Split, root: str | None = None, data_dir: str | None = None) -> LabelledDataset:
    """Omniglot: the background alphabets train, the evaluation alphabets test."""
    subset_name = "background" if split == "train" else "evaluation"
    return data.omniglot(_root(root, data_dir, "omniglot"), subset_name)


@DATASETS.register("cub100_subset")
def cub100_subset(
    split: Split,
    transform: Callable[..., Any],
    root: str | None = None,
    data_dir: str | None = None,
) -> LabelledDataset:
    """The 100-species CUB subset of the real-data folder."""
    return data.cub100_subset(_root(root, data_dir, "cub100_subset"), split, transform=transform)


def _benchmark(load: Callable[..., LabelledDataset], name: str) -> Callable[..., LabelledDataset]:
    def split_of(
        split: Split,
        transform: Callable[..., Any],
        root: str | None = None,
        download: bool = False,
        on_error: ErrorPolicy = "raise",
    ) -> LabelledDataset:
        return load(
            _required(root, name), split, transform=transform, download=download, on_error=on_error
        )

    split_of.__doc__ = f"{load.__doc__.splitlines()[0] if load.__doc__ else name}"
    return split_of


DATASETS.add(_benchmark(data.cub200, "cub200"), "cub200")
DATASETS.add(_benchmark(data.cars196, "cars196"), "cars196")
DATASETS.add(_benchmark(data.stanford_online_products, "sop"), "sop")


@DATASETS.register("folder")
def image_folder(
    split: Split,
    transform: Callable[..., Any],
    root: str | None = None,
    test_root: str | None = None,
    on_error: ErrorPolicy = "raise",
) -> LabelledDataset:
    """``root/<class>/<image>``: half of the classes train and half test, or every class of
    ``root`` trains and those of ``test_root`` test."""
    folder = _required(root, "folder")
    if test_root is None:
        return _half(data.image_folder(folder, transform=transform, on_error=on_error), split)
    if split == "train":
        return data.image_folder(folder, transform=transform, on_error=on_error)
    test = data.image_folder(Path(test_root).expanduser(), transform=transform, on_error=on_error)
    # Both folders number their classes from 0: the test classes follow the training ones.
    offset = int(data.image_folder(folder).labels.max()) + 1
    return data.ImageFileDataset(
        test.paths, test.labels + offset, transform=transform, on_error=on_error
    )


@DATASETS.register("csv")
def csv_manifest(
    split: Split,
    transform: Callable[..., Any],
    root: str | None = None,
    on_error: ErrorPolicy = "raise",
) -> LabelledDataset:
    """A CSV manifest of (path, label) rows: half of the classes train and half test."""
    manifest = data.csv_manifest(_required(root, "csv"), transform=transform, on_error=on_error)
    return _half(manifest, split)
