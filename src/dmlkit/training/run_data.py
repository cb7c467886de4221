"""The datasets of a run: training, validation and test classes, built from a :class:`DataConfig`.

Training, validation and test never share a class. The test classes are the dataset's published
test split (or the second half of the classes); validation classes, when asked for, are drawn
from the training classes with the run's seed.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .. import data
from ..data import ArrayDataset, LabelledDataset, class_kfold, classes_subset, subset
from ..registry import Spec
from ..typed_values import ConfigError, expanded_path
from .config import DataConfig, TransformConfig
from .datasets import DATASETS


@dataclass(frozen=True)
class RunData:
    """The datasets of one run.

    Attributes:
        train: Training classes, with the training (augmenting) transform.
        train_eval: The same items with the evaluation transform (for feature caching).
        val: Validation classes (evaluation transform), or None.
        test: Held-out test classes (evaluation transform).
        in_channels: Image channels the backbone receives.
        cache_key: Identifies the data and its preprocessing, for feature-cache file names.
    """

    train: LabelledDataset
    train_eval: LabelledDataset
    val: LabelledDataset | None
    test: LabelledDataset
    in_channels: int
    cache_key: str


def _resized(dataset: LabelledDataset, size: int | None) -> LabelledDataset:
    """Array images resized once (area averaging), in chunks to bound memory; other datasets
    as they are (a loader without a transform gives tensors ready for the model)."""
    if size is None or not isinstance(dataset, ArrayDataset) or dataset.data.ndim != 4:
        return dataset
    chunks = [
        F.interpolate(chunk.float(), size=(size, size), mode="area")
        for chunk in torch.split(dataset.data, 1024)
    ]
    return ArrayDataset(torch.cat(chunks), dataset.labels)


def _image_transforms(config: TransformConfig) -> tuple[Callable[..., Any], Callable[..., Any]]:
    normalisation: dict[str, Any] = {
        "mean": config.mean,
        "std": config.std,
        "channel_order": config.channel_order,
        "value_scale": config.value_scale,
    }
    train = data.train_transform(
        size=config.train_crop,
        scale=config.train_scale,
        ratio=config.train_ratio,
        flip=config.flip,
        resize=config.train_resize,
        **normalisation,
    )
    evaluation = data.eval_transform(
        resize=config.eval_resize, crop=config.eval_crop, **normalisation
    )
    return train, evaluation


def _load(config: DataConfig, split: str, transform: Callable[..., Any] | None) -> LabelledDataset:
    """One split ("train" or "test") of the configured dataset, the run's values given to the
    loader's parameters of those names (:mod:`dmlkit.training.datasets`)."""
    run_values: dict[str, Any] = {"split": split}
    if transform is not None:
        run_values["transform"] = transform
    settings = {
        "root": expanded_path(config.root),
        "data_dir": expanded_path(config.data_dir),
        "download": config.download,
        "test_root": expanded_path(config.test_root),
        "on_error": config.on_error,
    }
    parameters = DATASETS.parameters(config.name, "data")
    defaults = DataConfig()
    for key, value in settings.items():
        if key in parameters:
            run_values[key] = value
        elif value != getattr(defaults, key):
            raise ConfigError(f"data.{key}: dataset {config.name!r} takes no {key}")
    dataset = DATASETS.build(Spec(config.name, config.options), "data", **run_values)
    if not isinstance(getattr(dataset, "labels", None), np.ndarray):
        raise ConfigError(f"data.name: {config.name!r} gave no LabelledDataset (a labels array)")
    return dataset  # type: ignore[no-any-return]


def _validation_split(
    labels: np.ndarray, config: DataConfig, seed: int
) -> tuple[np.ndarray, np.ndarray] | None:
    if config.cv_folds:
        try:
            fold = class_kfold(labels, config.cv_folds, config.cv_seed)[config.cv_fold]
        except ValueError as error:
            raise ConfigError(f"data.cv_folds: {error}") from None
        return fold.train_indices, fold.val_indices
    fraction = config.val_classes
    if fraction == 0:
        return None
    if not 0 < fraction < 1:
        raise ConfigError(f"data.val_classes must be in [0, 1), got {fraction}")
    classes = np.unique(labels)
    count = round(fraction * len(classes))
    if count < 2 or count > len(classes) - 2:
        raise ConfigError(
            f"data.val_classes={fraction} holds out {count} of {len(classes)} training classes; "
            "validation and training each need at least 2"
        )
    held_out = np.random.default_rng([seed, 1]).permutation(classes)[:count]
    val_indices = classes_subset(labels, held_out)
    train_indices = classes_subset(labels, np.setdiff1d(classes, held_out))
    return train_indices, val_indices


def build_run_data(config: DataConfig, seed: int = 0) -> RunData:
    """Load the configured dataset and split it into training, validation and test classes.

    Args:
        config: The data section of a run's config.
        seed: Chooses the validation classes.

    Returns:
        The run's datasets.

    Raises:
        ConfigError: Unknown dataset or an impossible validation split.
        FileNotFoundError: The data is not where the config says (the message names the path).
    """
    if "transform" in DATASETS.parameters(config.name, "data"):
        train_transform, eval_transform = _image_transforms(config.transform)
        train = _load(config, "train", train_transform)
        train_eval = _load(config, "train", eval_transform)
        test = _load(config, "test", eval_transform)
        in_channels = 3
    else:
        train = train_eval = _resized(_load(config, "train", None), config.image_size)
        test = _resized(_load(config, "test", None), config.image_size)
        item, _ = train[0]
        in_channels = int(item.shape[0])
    split = _validation_split(train.labels, config, seed)
    val = None
    if split is not None:
        train_indices, val_indices = split
        val = subset(train_eval, val_indices)
        train, train_eval = subset(train, train_indices), subset(train_eval, train_indices)
    overlap = np.intersect1d(train.labels, test.labels)
    if overlap.size:
        raise ConfigError(
            f"training and test share {overlap.size} classes (e.g. {overlap[:5].tolist()}); "
            "retrieval must be evaluated on held-out classes"
        )
    # The seed only matters through a random validation split; otherwise every seed shares a cache.
    seeded = {"seed": seed} if config.val_classes else {}
    described = {k: v for k, v in asdict(config).items() if k != "num_workers"}
    description = json.dumps({**described, **seeded}, sort_keys=True, default=str)
    cache_key = f"{config.name}-{hashlib.sha256(description.encode()).hexdigest()[:12]}"
    return RunData(train, train_eval, val, test, in_channels, cache_key)


def split_dataset(config: Any, split: str) -> LabelledDataset:
    """One split of a run's data with the evaluation transform (for ``evaluate`` and ``embed``).

    Args:
        config: A run's :class:`~dmlkit.training.Config`.
        split: ``train``, ``val`` or ``test``.
    """
    run_data = build_run_data(config.data, config.train.seed)
    if split == "val":
        if run_data.val is None:
            raise ConfigError("this run has no validation classes (data.val_classes is 0)")
        return run_data.val
    return run_data.train_eval if split == "train" else run_data.test
