"""Helpers shared by the tests that train: the digits run they start from, and for those that
interrupt and resume runs, a stop-at-step callback and a timing-free log reader."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

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
