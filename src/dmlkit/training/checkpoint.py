"""Atomic checkpoints and the random-number state that exact resumption needs.

A checkpoint is written to a temporary file in the destination's folder, flushed to disk, then
renamed over the destination, so a run killed at any moment leaves either the previous complete
checkpoint or the new complete one, never a truncated file.
"""

from __future__ import annotations

import os
import random
import tempfile
from collections.abc import Callable
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


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """The global generators' states, for :func:`set_rng_state` after a resume."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the states captured by :func:`rng_state`."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
