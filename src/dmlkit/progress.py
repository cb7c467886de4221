"""Progress bars for the steps people wait on, all drawn one way and all turned off one way.

Every long step (embedding a dataset, caching features, an epoch of training, a search's trials,
a benchmark's or a sweep's runs, a report's maps) shows one tqdm bar on stderr with its count,
rate and time left, in units that mean something (``img``, ``step``, ``trial``, ``run``).
Functions that draw one take a ``progress`` argument; :func:`quiet` turns every bar off
at once, whatever those arguments say (``dmlkit --quiet`` runs each command inside it, for logs).

This module imports nothing else from dmlkit, so every floor may use it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")

_quiet = False


@contextlib.contextmanager
def quiet(enabled: bool = True) -> Iterator[None]:
    """Within the block, no progress bar is shown (when ``enabled``; otherwise nothing changes).

    Bars of this process only: worker processes a command starts draw none of their own.

    Args:
        enabled: Whether to silence the bars.
    """
    global _quiet
    before = _quiet
    _quiet = _quiet or enabled
    try:
        yield
    finally:
        _quiet = before


def progress_bar(
    iterable: Iterable[T] | None = None,
    *,
    total: int | None = None,
    description: str,
    unit: str,
    enabled: bool = True,
    initial: int = 0,
    leave: bool = True,
) -> tqdm[T]:
    """A tqdm bar on stderr showing the count, the rate and the time left.

    Args:
        iterable: What to iterate over, counting one unit per item; None for a bar advanced
            with ``update(n)``.
        total: Units in all (default: ``len(iterable)`` where it has one).
        description: The bar's label.
        unit: What one unit is, singular and short (``"img"``, ``"step"``, ``"trial"``).
        enabled: Show the bar; a bar inside :func:`quiet` is never shown.
        initial: Units already done (a resumed epoch or search).
        leave: Keep the finished bar on screen; False for a bar inside another one.

    Returns:
        The bar (a disabled one still counts, and its methods do nothing visible).
    """
    return tqdm(
        iterable,
        total=total,
        initial=initial,
        desc=description,
        unit=unit,
        leave=leave,
        dynamic_ncols=True,
        disable=_quiet or not enabled,
    )


def above_bars(say: Callable[[str], Any]) -> Callable[[str], None]:
    """``say`` wrapped so that its lines print above the bars on screen instead of through them.

    Args:
        say: Prints one line (to stdout or stderr).
    """

    def said(message: str) -> None:
        with tqdm.external_write_mode():
            say(message)

    return said


__all__ = ["above_bars", "progress_bar", "quiet"]
