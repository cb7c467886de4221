"""Progress bars where people wait: each long command shows one bar with its rate and time left
on stderr, and ``--quiet`` (before or after the command's name) shows none."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from dmlkit.cli import main
from dmlkit.data import ArrayDataset
from dmlkit.models.inference import embed_dataset
from dmlkit.progress import progress_bar, quiet
from dmlkit.training import Trainer, load_config
from run_helpers import write_image_folder


def bar_of(unit: str, description: str, err: str) -> re.Match[str] | None:
    """The first finished bar line of ``description``: its count, elapsed<left time and rate
    (``12.3unit/s``, or ``4.56s/unit`` below one unit a second)."""
    return re.search(
        rf"{re.escape(description)}: 100%\|[^|]*\| (\d+)/\1 "
        rf"\[\d\d:\d\d<\d\d:\d\d, +(?:[\d.]+{unit}/s|[\d.]+s/{unit})\]",
        err,
    )


def assert_no_bar(err: str) -> None:
    assert "%|" not in err and "/s]" not in err, err


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """6 classes × 5 random 32×32 RGB images, each class with its own mean colour."""
    return write_image_folder(tmp_path_factory.mktemp("images"), 6, 5, 32, 32)


@pytest.fixture(scope="module")
def checkpoint(image_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = load_config(
        None,
        [
            "data.name=folder",
            f"data.root={image_folder}",
            "data.transform.train_crop=24",
            "data.transform.eval_resize=28",
            "data.transform.eval_crop=24",
            "model.embedding_dim=16",
            "sampler.classes_per_batch=2",
            "sampler.samples_per_class=3",
            "train.max_steps=2",
            "logging.progress=false",
        ],
    )
    run_dir = tmp_path_factory.mktemp("run")
    Trainer(config, run_dir).fit(test=False)
    return run_dir / "last.pt"


def test_embed_shows_a_bar_with_rate_and_time_left(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["embed", str(checkpoint), "--out", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    bar = bar_of("item", "embedding test", captured.err)
    assert bar is not None, captured.err
    assert int(bar.group(1)) == len(np.load(tmp_path / "labels.npy"))
    assert_no_bar(captured.out)  # the bar is on stderr, the result line on stdout


@pytest.mark.parametrize(
    "command",
    [
        ["--quiet", "embed", "{checkpoint}", "--out", "{out}"],
        ["embed", "{checkpoint}", "--out", "{out}", "--quiet"],
        ["evaluate", "{checkpoint}", "--quiet"],
        ["--quiet", "index", "{checkpoint}", "{images}", "--out", "{out}/gallery"],
    ],
)
def test_quiet_prints_no_bar(
    command: list[str],
    checkpoint: Path,
    image_folder: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    paths = {"checkpoint": checkpoint, "out": tmp_path, "images": image_folder}
    assert main([part.format(**paths) for part in command]) == 0
    captured = capsys.readouterr()
    assert_no_bar(captured.err)
    assert captured.out  # the results still print


def test_index_shows_a_bar_of_the_images(
    checkpoint: Path, image_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["index", str(checkpoint), str(image_folder), "--out", str(tmp_path / "g")]) == 0
    bar = bar_of("item", "indexing", capsys.readouterr().err)
    assert bar is not None and bar.group(1) == "30"


def test_library_embedding_is_silent_unless_asked_and_quiet_wins(
    capsys: pytest.CaptureFixture[str],
) -> None:
    data = ArrayDataset(torch.randn(10, 3), np.arange(10) % 2)
    model = torch.nn.Linear(3, 2)
    embed_dataset(model, data, batch_size=4)
    assert_no_bar(capsys.readouterr().err)
    embed_dataset(model, data, batch_size=4, progress=True)
    assert bar_of("item", "embedding", capsys.readouterr().err) is not None
    with quiet():
        embed_dataset(model, data, batch_size=4, progress=True)
        with quiet(False):  # an inner block cannot turn the bars back on
            embed_dataset(model, data, batch_size=4, progress=True)
    assert_no_bar(capsys.readouterr().err)
    embed_dataset(model, data, batch_size=4, progress=True)  # quiet ended with its block
    assert bar_of("item", "embedding", capsys.readouterr().err) is not None


def test_a_bar_counts_from_its_initial_units(capsys: pytest.CaptureFixture[str]) -> None:
    with progress_bar(total=5, initial=3, description="resumed", unit="step") as bar:
        bar.update(2)
    assert bar_of("step", "resumed", capsys.readouterr().err) is not None


# One fold run of 3 digits steps is about half a second.
TUNE = [
    "--method",
    "contrastive",
    "--trials",
    "2",
    "--set",
    "training.train.epochs=1",
    "--set",
    "training.validation.every=1",
    "--set",
    "training.train.max_steps=3",
]


def test_tune_shows_one_bar_of_trials_and_quiet_none(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["tune", "digits", "--out", str(tmp_path / "a"), *TUNE]) == 0
    captured = capsys.readouterr()
    assert bar_of("trial", "tune contrastive", captured.err) is not None, captured.err
    # The trials' training runs draw no bars of their own: the one bar is the trials'.
    assert "epoch" not in captured.err and "embedding" not in captured.err
    assert "[contrastive] trial 0 fold 1/2" in captured.out
    assert main(["tune", "digits", "--quiet", "--out", str(tmp_path / "b"), *TUNE]) == 0
    assert_no_bar(capsys.readouterr().err)


SWEEP = [
    "--param",
    "optimizer.lr",
    "--values",
    "0.001,0.003",
    "--set",
    "train.max_steps=3",
    "--set",
    "validation.before_training=false",
]


def test_sweep_shows_a_bar_of_runs_and_quiet_silences_the_runs_bars_too(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["sweep", *SWEEP, "--out", str(tmp_path / "a")]) == 0
    err = capsys.readouterr().err
    assert bar_of("run", "sweep optimizer.lr", err) is not None, err
    # Each run's training bars (logging.progress is on) pass beneath it and are not left.
    assert "epoch 1/" in err
    assert main(["--quiet", "sweep", *SWEEP, "--out", str(tmp_path / "b")]) == 0
    assert_no_bar(capsys.readouterr().err)
