"""Small image sets held in memory: scikit-learn's digits and Omniglot (full size, or the 28 × 28
copy embedded in the package)."""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path

import numpy as np
import numpy.typing as npt

from ._common import LabelArray, check_choice, split_by_first_test_class
from .datasets import ArrayDataset, TensorTransform, read_image

# Global Omniglot character ids: background index k is id k + 1, evaluation index k is k + 965.
OMNIGLOT_ID_OFFSET = {"background": 1, "evaluation": 965}
_OMNIGLOT_PNG = re.compile(r"(\d+)_(\d+)\.png")
# Built by scripts/build_embedded_omniglot.py; the characters are global ids 1-1623 in order.
_OMNIGLOT28 = "embedded/omniglot28.npz"
_OMNIGLOT28_SIDE = 28


def digits(split: str = "train", transform: TensorTransform | None = None) -> ArrayDataset:
    """scikit-learn's 8x8 handwritten digits (1,797 images), a tiny class-disjoint benchmark.

    Args:
        split: ``"train"`` (digits 0-4), ``"test"`` (digits 5-9) or ``"all"``.
        transform: Applied to each float ``[1, 8, 8]`` item, or ``None``.

    Returns:
        Float items ``[1, 8, 8]`` in ``[0, 1]``; labels are the digits.
    """
    check_choice("split", split, ("train", "test", "all"))
    # Imported here so that importing dmlkit.data does not pay for scikit-learn's start-up.
    from sklearn.datasets import load_digits

    bunch = load_digits()
    labels = np.asarray(bunch.target, dtype=np.int64)
    keep = split_by_first_test_class(labels, split, first_test_class=5)
    # Pixel values are counts 0-16 (ink in a 4x4 block of the original bitmap).
    images = (np.asarray(bunch.images, dtype=np.float32) / 16.0)[keep, None]
    return ArrayDataset(images, labels[keep], transform)


def _omniglot_npz(path: Path, subset: str) -> tuple[npt.NDArray[np.bool_], LabelArray]:
    if subset not in OMNIGLOT_ID_OFFSET:
        raise ValueError(
            f"{path}: an Omniglot npz file holds 'background' or 'evaluation', not {subset!r}"
        )
    with np.load(path) as archive:
        missing = {"images", "labels"} - set(archive.files)
        if missing:
            raise ValueError(f"{path} lacks array(s) {sorted(missing)}; expected images, labels")
        images = archive["images"]
        labels = archive["labels"]
    if images.dtype != np.bool_ or images.ndim != 4 or labels.shape != images.shape[:2]:
        raise ValueError(
            f"{path}: expected bool images [characters, drawers, H, W] and labels "
            f"[characters, drawers], got images {images.dtype} {images.shape} and labels "
            f"{labels.shape}"
        )
    n_chars, n_drawers, height, width = images.shape
    # The file stores the PNG pixels (True = white paper); ink is what a model should see as 1.
    np.logical_not(images, out=images)
    data = images.reshape(n_chars * n_drawers, 1, height, width)
    return data, labels.reshape(-1).astype(np.int64) + OMNIGLOT_ID_OFFSET[subset]


def _ink(path: Path) -> npt.NDArray[np.bool_]:
    # Through "L", not straight to "1", which would dither a grayscale PNG.
    return np.asarray(read_image(path, "L")) < 128


def _omniglot_pngs(folder: Path) -> tuple[npt.NDArray[np.bool_], LabelArray]:
    keyed = []
    for path in folder.glob("*/*/*.png"):
        match = _OMNIGLOT_PNG.fullmatch(path.name)
        if match is None:
            raise ValueError(f"{path}: expected an Omniglot file name <character id>_<drawer>.png")
        keyed.append((int(match[1]), int(match[2]), path))
    if not keyed:
        raise ValueError(f"{folder} holds no <alphabet>/<character>/<id>_<drawer>.png files")
    # The npz order: by character id, then drawer.
    keyed.sort()
    first = _ink(keyed[0][2])
    images = np.empty((len(keyed), 1, *first.shape), dtype=np.bool_)
    for i, (_, _, path) in enumerate(keyed):
        ink = first if i == 0 else _ink(path)
        if ink.shape != first.shape:
            raise ValueError(
                f"{path} is {ink.shape[1]}x{ink.shape[0]} pixels but {keyed[0][2]} is "
                f"{first.shape[1]}x{first.shape[0]}; all must be the same size"
            )
        images[i, 0] = ink
    return images, np.array([char_id for char_id, _, _ in keyed], dtype=np.int64)


def omniglot(
    root: str | Path, subset: str = "background", transform: TensorTransform | None = None
) -> ArrayDataset:
    """Omniglot handwritten characters, from the npz arrays or the original PNG folders.

    Looks for ``<root>/images_<subset>.npz`` first (bool ``images [chars, 20, 105, 105]`` with
    True = white background, and ``labels [chars, 20]``), then for the folder
    ``<root>/images_<subset>/<Alphabet>/characterNN/<global id>_<drawer>.png``. Both give the
    same items in the same order (by character, then drawer) and the same labels.

    Args:
        root: The folder holding the npz file or the ``images_<subset>`` folder.
        subset: ``"background"`` or ``"evaluation"``; for PNG folders also another suffix such
            as ``"background_small1"``.
        transform: Applied to each float ``[1, H, W]`` item, or ``None``.

    Returns:
        Items ``[1, 105, 105]``, read as float with ink = 1.0 and paper = 0.0 (stored as bool,
        about 11 KB per image); labels are the global character ids (1-964 background,
        965-1623 evaluation).
    """
    root = Path(root)
    if not re.fullmatch(r"\w+", subset):
        raise ValueError(f"subset must be a name such as 'background', got {subset!r}")
    npz = root / f"images_{subset}.npz"
    folder = root / f"images_{subset}"
    if npz.is_file():
        data, labels = _omniglot_npz(npz, subset)
    elif folder.is_dir():
        data, labels = _omniglot_pngs(folder)
    else:
        raise FileNotFoundError(f"neither {npz} nor the PNG folder {folder} exists")
    return ArrayDataset(data, labels, transform)


def omniglot28(split: str = "train", transform: TensorTransform | None = None) -> ArrayDataset:
    """All of Omniglot at 28 × 28, embedded in the package: no download, no data folder.

    Every one of the 1,623 characters × 20 drawers, shrunk from 105 × 105 to a 28 × 28 ink mask
    by ``scripts/build_embedded_omniglot.py`` (MIT licence, Brenden Lake; the notice is in
    ``dmlkit/data/embedded/LICENSE.omniglot``). It loads in a few hundredths of a second.

    Args:
        split: ``"train"`` (the 964 characters of the 30 background alphabets, 19,280 images),
            ``"test"`` (the 659 characters of the 20 evaluation alphabets, 13,180 images) or
            ``"all"``.
        transform: Applied to each float ``[1, 28, 28]`` item, or ``None``.

    Returns:
        Items ``[1, 28, 28]``, read as float with ink = 1.0 and paper = 0.0 (stored as bool);
        labels are the global character ids, as :func:`omniglot` gives them (1-964 background,
        965-1623 evaluation).
    """
    check_choice("split", split, ("train", "test", "all"))
    with (
        resources.files(__package__).joinpath(_OMNIGLOT28).open("rb") as file,
        np.load(file) as archive,
    ):
        packed = archive["images"]
    ids = np.arange(1, len(packed) + 1, dtype=np.int64)
    chars = split_by_first_test_class(ids, split, OMNIGLOT_ID_OFFSET["evaluation"])
    n_drawers = packed.shape[1]
    ink = np.unpackbits(packed[chars], axis=-1).view(np.bool_)
    images = ink.reshape(len(chars) * n_drawers, 1, _OMNIGLOT28_SIDE, _OMNIGLOT28_SIDE)
    return ArrayDataset(images, np.repeat(ids[chars], n_drawers), transform)
