"""Atomic checkpoints and the random-number state that exact resumption needs.

A checkpoint is written to a temporary file in the destination's folder, flushed to disk, then
renamed over the destination, so a run killed at any moment leaves either the previous complete
checkpoint or the new complete one, never a truncated file.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch


def save_atomic(payload: dict[str, Any], path: str | Path) -> Path:
    """Write ``payload`` with :func:`torch.save` to ``path`` atomically.

    Args:
        payload: Anything :func:`torch.save` accepts.
        path: Destination; its folder is created if needed.

    Returns:
        The destination path.
    """
    return _write_atomic(path, lambda file: torch.save(payload, file))


def write_text_atomic(text: str, path: str | Path) -> Path:
    """Write UTF-8 text to ``path`` atomically (a reader sees the old file or the whole new one).

    Returns:
        The destination path.
    """
    return _write_atomic(path, lambda file: file.write(text.encode()))


def save_array_atomic(array: np.ndarray, path: str | Path) -> Path:
    """Write a numpy array as a ``.npy`` file to ``path`` atomically.

    Returns:
        The destination path.
    """
    return _write_atomic(path, lambda file: np.save(file, array, allow_pickle=False))


def _write_atomic(path: str | Path, write: Callable[[BinaryIO], object]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_atomic`.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: The file is not a readable checkpoint (the message names it).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} not found")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:
        raise ValueError(f"checkpoint {str(path)!r} cannot be read: {error}") from error
    if not isinstance(payload, dict) or "model" not in payload:
        raise ValueError(f"{str(path)!r} is not a dmlkit checkpoint (no 'model' entry)")
    return payload


class RunRandomness:
    """A run's own torch random stream: the CPU generator and the training device's, seeded
    from the run's seed, active only inside :meth:`active`, so a run never reseeds or consumes
    the caller's global generators, and its checkpoints carry exactly its own state.

    Args:
        seed: The run's seed.
        device: The training device (its CUDA generator is part of the stream).
    """

    def __init__(self, seed: int, device: torch.device) -> None:
        self._devices = [device] if device.type == "cuda" else []
        # Generators of our own, seeded as torch.manual_seed seeds the global ones (so the stream
        # is the one earlier versions drew), without touching any global generator.
        self._state: dict[str, Any] = {"torch": torch.Generator().manual_seed(seed).get_state()}
        if self._devices:
            cuda = torch.Generator(device=device).manual_seed(seed)
            self._state["cuda"] = cuda.get_state()

    def _capture(self) -> dict[str, Any]:
        state: dict[str, Any] = {"torch": torch.get_rng_state()}
        if self._devices:
            state["cuda"] = torch.cuda.get_rng_state(self._devices[0])
        return state

    @contextmanager
    def active(self) -> Iterator[None]:
        """Draws inside this block come from, and advance, the run's stream."""
        with torch.random.fork_rng(devices=self._devices):
            torch.set_rng_state(self._state["torch"])
            if self._devices and "cuda" in self._state:
                torch.cuda.set_rng_state(self._state["cuda"], self._devices[0])
            try:
                yield
            finally:
                self._state = self._capture()

    def state_dict(self) -> dict[str, Any]:
        """The stream's state, for a checkpoint."""
        return dict(self._state)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the stream from a checkpoint's state."""
        self._state = dict(state)
