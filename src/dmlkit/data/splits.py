"""Class-disjoint splits: metric learning tests on classes never seen in training."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from torch import Tensor

from ._common import LabelArray, as_label_array

Labels = Sequence[int] | np.ndarray | Tensor


def _indices_of(labels: LabelArray, classes: npt.ArrayLike) -> LabelArray:
    return np.flatnonzero(np.isin(labels, classes)).astype(np.int64)


def class_disjoint_halves(labels: Labels) -> tuple[LabelArray, LabelArray]:
    """Splits items by class: the first half of the sorted classes, then the second half.

    With an odd number of classes the second half has the extra one.

    Args:
        labels: One integer label per item.

    Returns:
        ``(first_indices, second_indices)``, item positions in increasing order.
    """
    lab = as_label_array(labels)
    classes = np.unique(lab)
    if len(classes) < 2:
        raise ValueError(f"need at least 2 classes to split into halves, got {len(classes)}")
    half = len(classes) // 2
    return _indices_of(lab, classes[:half]), _indices_of(lab, classes[half:])


def classes_subset(labels: Labels, classes: Iterable[int]) -> LabelArray:
    """The positions of the items whose label is one of ``classes``.

    Args:
        labels: One integer label per item.
        classes: The labels to keep; each must occur in ``labels``.

    Returns:
        Item positions in increasing order.
    """
    lab = as_label_array(labels)
    wanted = as_label_array(list(classes), name="classes")
    missing = np.setdiff1d(wanted, lab)
    if missing.size:
        raise ValueError(f"classes not present in labels: {missing[:10].tolist()}")
    return _indices_of(lab, wanted)


@dataclass(frozen=True)
class Fold:
    """One fold of a class-disjoint k-fold split.

    Attributes:
        train_indices: Positions of the training items.
        val_indices: Positions of the validation items.
        train_classes: Sorted training labels.
        val_classes: Sorted validation labels (disjoint from ``train_classes``).
    """

    train_indices: LabelArray
    val_indices: LabelArray
    train_classes: LabelArray
    val_classes: LabelArray


def class_kfold(labels: Labels, n_folds: int = 4, seed: int = 0) -> list[Fold]:
    """Class-disjoint k-fold: the classes are shuffled and dealt into ``n_folds`` groups.

    Every class is validated in exactly one fold and fold sizes (in classes) differ by at most
    one. The shuffle uses its own generator, so the result depends only on ``labels``,
    ``n_folds`` and ``seed``, never on global random state.

    Args:
        labels: One integer label per item.
        n_folds: Number of folds, at least 2 and at most the number of classes.
        seed: Seed of the class shuffle.

    Returns:
        ``n_folds`` folds.
    """
    lab = as_label_array(labels)
    classes = np.unique(lab)
    if n_folds < 2:
        raise ValueError(f"n_folds must be at least 2, got {n_folds}")
    if n_folds > len(classes):
        raise ValueError(
            f"n_folds ({n_folds}) exceeds the number of classes ({len(classes)}); "
            "every fold needs at least one validation class"
        )
    groups = np.array_split(np.random.default_rng(seed).permutation(classes), n_folds)
    folds = []
    for group in groups:
        val_classes = np.sort(group)
        train_classes = np.setdiff1d(classes, val_classes)
        folds.append(
            Fold(
                train_indices=_indices_of(lab, train_classes),
                val_indices=_indices_of(lab, val_classes),
                train_classes=train_classes,
                val_classes=val_classes,
            )
        )
    return folds
