"""The Omniglot copy embedded in the package (``omniglot28``), the default dataset of a run.

The shipped file must be exactly what ``scripts/build_embedded_omniglot.py`` makes from the
full-resolution arrays in ``$DMLKIT_DATA/omniglot``; the rebuild test skips when they are absent.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch

from dmlkit.data import omniglot, omniglot28
from dmlkit.training import Config, Trainer, build_run_data, load_config
from dmlkit.training.preprocessing import evaluation_preprocessing
from real_data import REAL_DATA

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "src" / "dmlkit" / "data" / "embedded" / "omniglot28.npz"
SHIPPED_SHA256 = "fa04df2aaa2d759263f67933040549d63640d8f28ca1d800dcb01ce61e3eae4d"
SOURCE = REAL_DATA / "omniglot"


def _build_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "build_embedded_omniglot", ROOT / "scripts" / "build_embedded_omniglot.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _source() -> Path:
    if not (SOURCE / "images_background.npz").is_file():
        pytest.skip(f"{SOURCE} not found; the rebuild of the embedded Omniglot is not checked")
    return SOURCE


def test_shipped_file_has_the_recorded_checksum() -> None:
    assert hashlib.sha256(SHIPPED.read_bytes()).hexdigest() == SHIPPED_SHA256


def test_the_script_rebuilds_the_shipped_file_byte_for_byte(tmp_path: Path) -> None:
    out = tmp_path / "omniglot28.npz"
    assert _build_script().main(["--source", str(_source()), "--out", str(out)]) == 0
    assert out.read_bytes() == SHIPPED.read_bytes()


def test_the_script_refuses_a_source_that_fails_its_checksum(tmp_path: Path) -> None:
    source = _source()
    for name in ("images_evaluation.npz", "images_evaluation.npz.sha256", "alphabets.tsv"):
        (tmp_path / name).symlink_to(source / name)
    (tmp_path / "images_background.npz").write_bytes(b"not the archive")
    (tmp_path / "images_background.npz.sha256").write_text(
        (source / "images_background.npz.sha256").read_text()
    )
    with pytest.raises(ValueError, match=r"images_background\.npz: SHA-256 is"):
        _build_script().build(tmp_path)


def test_splits_are_the_background_and_evaluation_characters() -> None:
    train, test = omniglot28("train"), omniglot28("test")
    assert len(train) == 964 * 20 and len(test) == 659 * 20
    assert np.array_equal(np.unique(train.labels), np.arange(1, 965))
    assert np.array_equal(np.unique(test.labels), np.arange(965, 1624))
    assert np.array_equal(np.bincount(test.labels)[965:], np.full(659, 20))
    assert len(omniglot28("all")) == 1623 * 20
    image, label = test[0]
    assert image.shape == (1, 28, 28) and image.dtype == torch.float32 and label == 965
    assert set(torch.unique(image).tolist()) == {0.0, 1.0}
    ink = train.data.float().mean().item()
    assert 0.08 < ink < 0.13, f"ink fraction {ink}"  # 7.8% at 105 x 105; strokes shrink less
    with pytest.raises(ValueError, match="split must be one of"):
        omniglot28("validation")


def test_images_are_the_full_resolution_characters_shrunk() -> None:
    full = omniglot(_source(), "evaluation")
    shrink = _build_script().shrink
    shrunk = shrink(~full.data[:40].numpy().astype(bool))  # back to the stored paper = True
    test = omniglot28("test")
    assert np.array_equal(test.data[:40].numpy(), shrunk)
    assert np.array_equal(test.labels, full.labels)


def test_alphabets_are_stored_with_the_characters() -> None:
    with np.load(SHIPPED) as archive:
        alphabet, names = archive["alphabet"], archive["alphabets"]
    assert len(names) == 50 and alphabet.shape == (1623,)
    # Character ids 1-964 are the 30 background alphabets, the rest the 20 evaluation ones.
    assert len(np.unique(alphabet[:964])) == 30 and len(np.unique(alphabet[964:])) == 20
    assert names[alphabet[0]] == "Arcadian" and names[alphabet[-1]] == "ULOG"


def test_a_run_on_it_splits_and_inverts_like_full_omniglot() -> None:
    config = load_config(None, ["data.name=omniglot28", "data.val_classes=0.1"])
    data = build_run_data(config.data, seed=0)
    assert len(np.unique(data.train.labels)) == 964 - 96
    assert data.val is not None and len(np.unique(data.val.labels)) == 96
    assert len(np.unique(data.test.labels)) == 659 and data.in_channels == 1
    preprocessing = evaluation_preprocessing(config, data.in_channels)
    assert preprocessing["invert"] is True and preprocessing["size"] == [28, 28]


def test_the_default_run_trains_on_it_and_keeps_mining(tmp_path: Path) -> None:
    config = load_config(None, ["train.max_steps=30", "logging.log_every=1"])
    assert config.data.name == Config().data.name == "omniglot28"
    Trainer(config, tmp_path).fit(test=False)
    with (tmp_path / "train.csv").open(newline="") as file:
        rows = list(csv.DictReader(file))
    assert len(rows) == 30
    assert all(float(row["loss"]) > 0 for row in rows)
    assert int(rows[-1]["mined"]) > 0
