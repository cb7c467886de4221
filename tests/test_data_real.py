"""dmlkit.data on the real shared data: Omniglot (npz and PNG) and the 100-class CUB subset.

The data lives outside the repository, in ``$DMLKIT_DATA`` (``make`` sets ``../shared/data``);
the tests skip when it is absent.
"""

from __future__ import annotations

import re
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from dmlkit.data import ArrayDataset, cub100_subset, omniglot
from real_data import REAL_DATA

SHARED = REAL_DATA


def _shared(name: str, what: str) -> Path:
    path = SHARED / name
    if not path.is_dir():
        pytest.skip(f"{SHARED / name} not found; {what} tests skipped")
    return path


def _ink_fraction(ds: ArrayDataset) -> float:
    return np.count_nonzero(ds.data.numpy()) / ds.data.numel()


@pytest.fixture(scope="module")
def omniglot_root() -> Path:
    return _shared("omniglot", "Omniglot")


@pytest.fixture(scope="module")
def background(omniglot_root: Path) -> ArrayDataset:
    return omniglot(omniglot_root, "background")


def test_omniglot_background_npz(background: ArrayDataset) -> None:
    assert len(background) == 19_280 and background.labels.dtype == np.int64
    assert background.data.shape == (19_280, 1, 105, 105)
    counts = np.bincount(background.labels)
    assert counts[0] == 0 and np.all(counts[1:] == 20) and len(counts) == 965  # ids 1..964
    assert np.all(np.diff(background.labels) >= 0)
    image, label = background[25]
    assert label == 2 and image.dtype == torch.float32 and image.shape == (1, 105, 105)
    assert set(torch.unique(image).tolist()) == {0.0, 1.0}
    # Ink is the minority: ~7.8% of pixels per the data's README (so the inversion happened).
    assert 0.07 < _ink_fraction(background) < 0.09


def test_omniglot_evaluation_npz(omniglot_root: Path) -> None:
    evaluation = omniglot(omniglot_root, "evaluation")
    assert len(evaluation) == 13_180
    assert evaluation.labels.min() == 965 and evaluation.labels.max() == 1623
    assert np.all(np.bincount(evaluation.labels)[965:] == 20)
    assert 0.075 < _ink_fraction(evaluation) < 0.095


def test_omniglot_png_layout_matches_npz(
    omniglot_root: Path, background: ArrayDataset, tmp_path: Path
) -> None:
    with zipfile.ZipFile(omniglot_root / "images_background_small1.zip") as zf:
        zf.extractall(tmp_path)
        ids_and_drawers = sorted(
            (int(m[1]), int(m[2]))
            for m in (re.search(r"/(\d+)_(\d+)\.png$", n) for n in zf.namelist())
            if m is not None
        )
    pngs = omniglot(tmp_path, "background_small1")
    assert len(pngs) == 2_720 == len(ids_and_drawers)
    assert pngs.labels.tolist() == [char_id for char_id, _ in ids_and_drawers]
    npz_index = [(char_id - 1) * 20 + drawer - 1 for char_id, drawer in ids_and_drawers]
    assert np.array_equal(background.labels[npz_index], pngs.labels)
    assert torch.equal(background.data[npz_index], pngs.data)
    assert torch.equal(pngs[0][0], background[npz_index[0]][0])


def test_omniglot_missing_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"neither .*images_evaluation.npz nor"):
        omniglot(tmp_path, "evaluation")
    (tmp_path / "images_background_small1" / "A" / "character01").mkdir(parents=True)
    (tmp_path / "images_background_small1" / "A" / "character01" / "x.png").write_bytes(b"")
    with pytest.raises(ValueError, match=r"x.png: expected an Omniglot file name"):
        omniglot(tmp_path, "background_small1")


def test_cub100_subset_standard_split() -> None:
    root = _shared("cub100_subset", "CUB subset")
    train, test = cub100_subset(root, "train"), cub100_subset(root, "test")
    assert (len(train), len(test)) == (3_428, 2_474)
    train_classes, test_classes = set(train.labels.tolist()), set(test.labels.tolist())
    assert (len(train_classes), len(test_classes)) == (58, 42)
    assert not train_classes & test_classes and train_classes | test_classes == set(range(100))
    everything = cub100_subset(root, "all")
    assert len(everything) == 5_902
    assert (
        everything.class_names is not None and everything.class_names[0] == "Black_footed_Albatross"
    )
    assert train.paths[0] == root / "images" / "Black_footed_Albatross" / "0000.jpg"
    image, label = train[0]
    assert image.shape == (3, 227, 227) and label == 0 and 0.0 <= image.min() < image.max() <= 1.0
