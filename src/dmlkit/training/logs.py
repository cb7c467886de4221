"""Run logs: CSV files that survive a resume, and optional TensorBoard."""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any


class CSVLog:
    """Rows appended to a CSV file, one per logged step; columns fixed by the first row.

    On a resume, :meth:`truncate_after` drops rows written after the checkpoint, so the log of
    a killed-and-resumed run reads like the log of an uninterrupted one.

    Args:
        path: The CSV file.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._columns: list[str] | None = None
        if self.path.is_file():
            with self.path.open(newline="") as file:
                self._columns = next(csv.reader(file), None)

    def write(self, row: Mapping[str, Any]) -> None:
        """Append one row (a new file gets a header from this row's keys)."""
        if self._columns is None:
            self._columns = list(row)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("w", newline="") as file:
                csv.writer(file).writerow(self._columns)
        unknown = set(row) - set(self._columns)
        if unknown:
            raise ValueError(f"{self.path}: columns {sorted(unknown)} are not in the header")
        with self.path.open("a", newline="") as file:
            csv.writer(file).writerow([_cell(row.get(name)) for name in self._columns])

    @property
    def columns(self) -> list[str] | None:
        """The header's columns, or None before the first row."""
        return None if self._columns is None else list(self._columns)

    def rows(self) -> list[dict[str, str]]:
        """Every row written so far, as strings."""
        if not self.path.is_file():
            return []
        with self.path.open(newline="") as file:
            return list(csv.DictReader(file))

    def truncate_after(self, step: int) -> None:
        """Keep only rows whose ``step`` is at most ``step``."""
        rows = [row for row in self.rows() if int(row["step"]) <= step]
        if self._columns is None:
            return
        with self.path.open("w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=self._columns)
            writer.writeheader()
            writer.writerows(rows)


def _cell(value: Any) -> Any:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6g}"
    return "" if value is None else value


class TensorBoardLog:
    """Scalars to TensorBoard event files through ``torch.utils.tensorboard``.

    Args:
        folder: Where the event files go.
        purge_step: On a resume, the first step after the checkpoint: events logged at or after
            it by the interrupted run are discarded, as the CSV logs' rows are.

    Raises:
        ImportError: The ``tensorboard`` package is not installed (``pip install
            dmlkit[tensorboard]``).
    """

    def __init__(self, folder: str | Path, purge_step: int | None = None) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as error:
            raise ImportError(
                "logging.tensorboard is true but the tensorboard package is not installed; "
                "install it with `pip install dmlkit[tensorboard]` or set logging.tensorboard=false"
            ) from error
        self._writer = SummaryWriter(str(folder), purge_step=purge_step)

    def write(self, prefix: str, step: int, values: Mapping[str, float | int | None]) -> None:
        """Log each numeric value as ``prefix/name`` at ``step``."""
        for name, value in values.items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                self._writer.add_scalar(f"{prefix}/{name}", value, step)
        self._writer.flush()

    def close(self) -> None:
        """Flush and close the event file."""
        self._writer.close()
