"""Text for people: short metric names, short values, progress lines and Markdown tables.

The floors that display (the protocol's progress lines and result tables, the plots and the HTML
report, the command line) share these helpers. This module imports nothing else from dmlkit, so
each of them can use it without importing another; nothing below the protocol needs it.
"""

from __future__ import annotations

from collections.abc import Sequence

_LABELS = {
    "precision_at_1": "P@1",
    "r_precision": "R-Precision",
    "mean_average_precision_at_r": "MAP@R",
    "mean_average_precision": "MAP",
    "mean_reciprocal_rank": "MRR",
}
_PREFIX_LABELS = (
    ("recall_at_", "Recall@"),
    ("precision_at_", "P@"),
    ("mean_average_precision_at_", "MAP@"),
)


def metric_label(name: str) -> str:
    """A metric's short name for tables and plots: ``P@1``, ``Recall@4``, ``MAP@R``, ``NMI``.

    Args:
        name: A key of :attr:`dmlkit.evaluation.RetrievalResult.metrics` (``recall_at_4``, ...).

    Returns:
        The short name; an unknown name comes back unchanged.
    """
    if name in _LABELS:
        return _LABELS[name]
    for prefix, short in _PREFIX_LABELS:
        if name.startswith(prefix) and name.removeprefix(prefix).isdigit():
            return short + name.removeprefix(prefix)
    return name


def short_value(value: object) -> str:
    """A hyperparameter's value for tables and progress lines: floats to 4 significant digits
    (so 1e-05 does not read as 0.0000), anything else as it prints."""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def print_line(message: str) -> None:
    """Print one progress line at once (workers share the terminal)."""
    print(message, flush=True)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """A Markdown table's lines: the header, the separator, then one line per row.

    A ``|`` inside a cell is escaped, so that it does not end the cell.
    """

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"

    return [line(header), "|" + "---|" * len(header), *(line(row) for row in rows)]
