"""Helpers shared by the data loaders: label arrays and line-numbered parsing of index files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch

LabelArray = npt.NDArray[np.int64]


def as_label_array(labels: object, name: str = "labels") -> LabelArray:
    """Converts ``labels`` to a 1-D int64 array, rejecting floats, booleans and other shapes.

    Args:
        labels: A sequence, array or tensor of integer class ids.
        name: The argument name used in error messages.

    Returns:
        The labels as a 1-D ``int64`` array.
    """
    arr = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    # np.asarray([]) is float64; an empty label list is still a valid (empty) integer list.
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    if arr.dtype.kind not in "iu":
        raise ValueError(f"{name} must be integers, got dtype {arr.dtype}")
    return arr.astype(np.int64, copy=False)


def require_file(path: Path, hint: str) -> Path:
    """Raises ``FileNotFoundError`` naming ``path`` (and ``hint``) when it does not exist.

    Args:
        path: The file or folder that must exist.
        hint: What to do about it, appended to the message.

    Returns:
        ``path``, unchanged.
    """
    if not path.exists():
        raise FileNotFoundError(f"{path} not found; {hint}")
    return path


def read_rows(path: Path, n_fields: int, sep: str | None = None) -> list[tuple[int, list[str]]]:
    """Reads a text table of ``n_fields`` columns, skipping blank lines.

    The last field takes the rest of the line, so it may contain the separator (file names with
    spaces).

    Args:
        path: The text file.
        n_fields: The number of fields each line must have.
        sep: The field separator; ``None`` splits on runs of whitespace.

    Returns:
        ``(line_number, fields)`` for each non-blank line, line numbers counted from 1.
    """
    rows = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            fields = [field.strip() for field in line.split(sep, n_fields - 1)]
            if len(fields) != n_fields or not all(fields):
                raise ValueError(
                    f"{path}, line {line_no}: expected {n_fields} fields, got {line.rstrip()!r}"
                )
            rows.append((line_no, fields))
    return rows


def parse_int(value: str, path: Path, line_no: int, column: str) -> int:
    """Parses one integer field, naming the file, line and column when it is not an integer.

    Args:
        value: The field's text.
        path: The file it came from.
        line_no: Its line number.
        column: The column's name.

    Returns:
        The integer.
    """
    try:
        return int(value)
    except ValueError:
        raise ValueError(
            f"{path}, line {line_no}: {column} must be an integer, got {value!r}"
        ) from None


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> str:
    """Raises ``ValueError`` unless ``value`` is one of ``choices``.

    Args:
        name: The argument name used in the message.
        value: The value given.
        choices: The allowed values.

    Returns:
        ``value``, unchanged.
    """
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def split_by_first_test_class(labels: LabelArray, split: str, first_test_class: int) -> LabelArray:
    """Positions of a class-range split: train is labels below ``first_test_class``, test the rest.

    Args:
        labels: One label per item.
        split: ``"train"``, ``"test"`` or ``"all"``.
        first_test_class: The smallest test label.

    Returns:
        Item positions in increasing order.
    """
    check_choice("split", split, ("train", "test", "all"))
    if split == "all":
        return np.arange(len(labels), dtype=np.int64)
    is_test = labels >= first_test_class
    return np.flatnonzero(is_test if split == "test" else ~is_test).astype(np.int64)
