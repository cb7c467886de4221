"""Helpers shared by the tests that interrupt and resume training runs."""

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
