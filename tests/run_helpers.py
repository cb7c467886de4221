"""Helpers shared by the tests that train: the digits run they start from, a folder of images,
and for those that interrupt and resume runs, a stop-at-step callback and a timing-free log
reader."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from dmlkit.training import TrainState


class StopTrainingError(Exception):
    """Raised from a trainer callback to cut a run off, as a kill would."""


def stop_at(step: int) -> Callable[[TrainState], None]:
    """A trainer callback that stops the run right after training step ``step``."""

    def callback(state: TrainState) -> None:
        if state.step == step:
            raise StopTrainingError

    return callback


def log_without_timing(path: Path) -> list[list[str]]:
    """A training log's rows without the throughput column, which is wall-clock dependent."""
    return [line.split(",")[:-1] for line in path.read_text().splitlines()]


DIGITS_RUN = [
    "data.name=digits",
    "sampler.classes_per_batch=5",
    "sampler.samples_per_class=8",
    "optimizer.lr=1e-3",
    "train.epochs=10",
]
"""The former built-in default, scikit-learn's digits (0-4 train, 5-9 test): the tests that train
for seconds start from it and override what they test."""


def write_image_folder(root: Path, classes: int, per_class: int, height: int, width: int) -> Path:
    """``classes`` folders of ``per_class`` random RGB PNGs, each class with its own mean colour
    (so a network can learn them), seeded; returns ``root``."""
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"class_{c}").mkdir()
        for i in range(per_class):
            pixels = rng.integers(0, 255, (height, width, 3)) // 2 + 16 * c
            Image.fromarray(pixels.astype(np.uint8)).save(root / f"class_{c}" / f"{i}.png")
    return root
