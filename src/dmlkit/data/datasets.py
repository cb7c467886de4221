"""Labelled datasets: the protocol the samplers and trainer rely on, and its implementations.

Every dataset exposes ``labels``, an int64 array readable without decoding any image, so a
sampler can plan batches from labels alone.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from ._common import LabelArray, as_label_array
from .transforms import ToTensor

OnError = Literal["raise", "skip"]
ImageToTensor = Callable[[Image.Image], Tensor]
TensorTransform = Callable[[Tensor], Tensor]

# What Pillow raises for missing, truncated or non-image files (SyntaxError: broken PNG chunks;
# DecompressionBombError is not an OSError).
_READ_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


class ImageReadError(ValueError):
    """An image file could not be opened or decoded; the message names the file."""


@runtime_checkable
class LabelledDataset(Protocol):
    """A map-style dataset of ``(sample, label)`` pairs whose labels are known up front.

    Attributes:
        labels: int64 ``[N]``, the label of every item, readable without decoding any sample.
    """

    labels: npt.NDArray[np.int64]

    def __len__(self) -> int:
        """The number of items."""
        ...

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        """The sample and its label."""
        ...


class ArrayDataset(Dataset[tuple[Tensor, int]]):
    """Samples held in memory as one array: small image sets, cached features ``[N, D]``.

    The data is kept in its own dtype (a bool image set stays 1 byte per pixel) and each item is
    converted to float32 when read: bool becomes 0.0/1.0, other dtypes are cast without scaling.

    Attributes:
        data: The samples, ``[N, ...]``.
        labels: int64 ``[N]``.
        transform: Applied to each float item, or ``None``.
    """

    def __init__(
        self,
        data: Tensor | np.ndarray,
        labels: Sequence[int] | np.ndarray | Tensor,
        transform: TensorTransform | None = None,
    ) -> None:
        """Wraps ``data`` and ``labels`` without copying ``data`` when it is already an array.

        Args:
            data: ``[N, ...]`` tensor or array.
            labels: ``N`` integer labels.
            transform: Applied to each float item, or ``None``.
        """
        self.data = data if isinstance(data, Tensor) else torch.from_numpy(np.asarray(data))
        if self.data.ndim < 1:
            raise ValueError("data must have a leading item dimension, got a scalar")
        self.labels = as_label_array(labels)
        if len(self.labels) != len(self.data):
            raise ValueError(
                f"data has {len(self.data)} items but labels has {len(self.labels)}; "
                "they must match"
            )
        self.transform = transform

    def __len__(self) -> int:
        """The number of items."""
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        """The float32 sample (after ``transform``) and its label.

        Args:
            index: Item index.

        Returns:
            ``(sample, label)``.
        """
        sample = self.data[index].float()
        if self.transform is not None:
            sample = self.transform(sample)
        return sample, int(self.labels[index])

    def __repr__(self) -> str:
        return (
            f"ArrayDataset(n={len(self)}, item_shape={tuple(self.data.shape[1:])}, "
            f"dtype={self.data.dtype}, classes={len(np.unique(self.labels))})"
        )


def read_image(path: str | Path, mode: str = "RGB") -> Image.Image:
    """Decodes an image file with Pillow.

    Args:
        path: The image file.
        mode: The Pillow mode to convert it to (``"RGB"``, ``"L"``, ...).

    Returns:
        The decoded image; a missing or undecodable file raises :class:`ImageReadError`
        naming it.
    """
    try:
        with Image.open(path) as image:
            return image.convert(mode)
    except _READ_ERRORS as exc:
        # The path must be in the message itself: DataLoader re-raises worker errors by
        # rebuilding the exception from its text.
        raise ImageReadError(f"cannot read image {path}: {type(exc).__name__}: {exc}") from exc


def _check_image(path: Path) -> str | None:
    """Opens and verifies ``path`` without decoding its pixels.

    Returns:
        ``None`` when it looks like a readable image, otherwise the reason it is not.
    """
    try:
        with Image.open(path) as image:
            image.verify()
    except _READ_ERRORS as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


class ImageFileDataset(Dataset[tuple[Tensor, int]]):
    """Images on disk, decoded with Pillow when read.

    Attributes:
        paths: One path per item.
        labels: int64 ``[N]``.
        transform: Pillow image to tensor (default: float ``[C, H, W]`` in ``[0, 1]``).
        mode: The Pillow mode each image is converted to (``"RGB"``, ``"L"``, ...).
        class_names: Optional names, ``class_names[label]`` naming each label.
        skipped: ``(path, reason)`` for each file dropped as unreadable (``on_error="skip"``).
    """

    def __init__(
        self,
        paths: Sequence[str | Path],
        labels: Sequence[int] | np.ndarray | Tensor,
        transform: ImageToTensor | None = None,
        on_error: OnError = "raise",
        class_names: Sequence[str] | None = None,
        mode: str = "RGB",
    ) -> None:
        """Builds the dataset; with ``on_error="skip"`` every file is verified here.

        Args:
            paths: Image files.
            labels: One integer label per path.
            transform: Pillow image to tensor; ``None`` gives float ``[C, H, W]`` in ``[0, 1]``.
            on_error: ``"raise"``: an unreadable file raises :class:`ImageReadError` when read.
                ``"skip"``: unreadable files are found now (open + verify, which reads headers
                and checksums but does not decode pixels), dropped, recorded in ``skipped``, and
                reported in one warning. A file that passes the check yet fails to decode
                (a truncated JPEG) still raises when read.
            class_names: Optional label names.
            mode: Pillow mode to convert each image to.
        """
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        if mode not in Image.MODES:
            raise ValueError(f"mode must be a Pillow image mode such as 'RGB' or 'L', got {mode!r}")
        all_paths = [Path(p) for p in paths]
        all_labels = as_label_array(labels)
        if len(all_paths) != len(all_labels):
            raise ValueError(
                f"{len(all_paths)} paths but {len(all_labels)} labels; they must match"
            )
        self.skipped: list[tuple[Path, str]] = []
        if on_error == "skip":
            keep = np.ones(len(all_paths), dtype=bool)
            for i, path in enumerate(all_paths):
                reason = _check_image(path)
                if reason is not None:
                    self.skipped.append((path, reason))
                    keep[i] = False
            if self.skipped:
                first_path, first_reason = self.skipped[0]
                if not keep.any():
                    raise ValueError(
                        f"all {len(all_paths)} images are unreadable; first: {first_path} "
                        f"({first_reason})"
                    )
                warnings.warn(
                    f"skipped {len(self.skipped)} unreadable image(s) of {len(all_paths)}; "
                    f"first: {first_path} ({first_reason}); the full list is in .skipped",
                    stacklevel=2,
                )
                all_paths = [p for p, k in zip(all_paths, keep, strict=True) if k]
                all_labels = all_labels[keep]
        self.paths = all_paths
        self.labels = all_labels
        self.transform: ImageToTensor = transform if transform is not None else ToTensor()
        self.mode = mode
        self.class_names = list(class_names) if class_names is not None else None

    def __len__(self) -> int:
        """The number of items."""
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        """The transformed image and its label.

        Args:
            index: Item index.

        Returns:
            ``(image_tensor, label)``.
        """
        return self.transform(read_image(self.paths[index], self.mode)), int(self.labels[index])

    def __repr__(self) -> str:
        return (
            f"ImageFileDataset(n={len(self)}, classes={len(np.unique(self.labels))}, "
            f"mode={self.mode!r}, skipped={len(self.skipped)}, transform={self.transform!r})"
        )


class Subset(Dataset[tuple[Tensor, int]]):
    """A view of some items of a labelled dataset, with ``labels`` restricted to match.

    Attributes:
        dataset: The underlying dataset (never itself a ``Subset``: nested subsets compose).
        indices: int64 positions in ``dataset``.
        labels: ``dataset.labels[indices]``.
    """

    def __init__(self, dataset: LabelledDataset, indices: Sequence[int] | np.ndarray | Tensor):
        """Selects ``indices`` of ``dataset``.

        Args:
            dataset: Any labelled dataset.
            indices: Positions in ``dataset``, each in ``[0, len(dataset))``.
        """
        idx = as_label_array(indices, name="indices")
        n = len(dataset)
        bad = idx[(idx < 0) | (idx >= n)]
        if bad.size:
            raise ValueError(
                f"indices must lie in [0, {n}) for a dataset of {n} items; got {bad[:5].tolist()}"
            )
        if isinstance(dataset, Subset):
            idx = dataset.indices[idx]
            dataset = dataset.dataset
        self.dataset: LabelledDataset = dataset
        self.indices: LabelArray = idx
        self.labels = np.asarray(dataset.labels)[idx]

    def __len__(self) -> int:
        """The number of items."""
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        """Item ``indices[index]`` of the underlying dataset.

        Args:
            index: Position in this subset.

        Returns:
            ``(sample, label)``.
        """
        return self.dataset[int(self.indices[index])]

    def __repr__(self) -> str:
        return f"Subset(n={len(self)}, of={self.dataset!r})"


def subset(
    dataset: LabelledDataset, indices: Sequence[int] | np.ndarray | Tensor
) -> LabelledDataset:
    """Selects some items of a labelled dataset, keeping ``labels`` consistent.

    Args:
        dataset: Any labelled dataset.
        indices: Positions to keep, in order (e.g. from :mod:`dmlkit.data.splits`).

    Returns:
        A :class:`Subset` whose ``labels`` are ``dataset.labels[indices]``.
    """
    return Subset(dataset, indices)
