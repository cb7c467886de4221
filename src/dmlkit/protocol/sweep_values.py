"""A sweep's values: parsed from the command line, compared, and named as text and folders.

A value is a number, a boolean, None or a string. Two values are the same setting when they are
equal numbers (``0`` and ``0.0``) or equal values of one type (``true`` is not ``1``); values
that are the same setting, or whose run folders would share a name, cannot both be swept.
"""

from __future__ import annotations

import json
import math
import numbers
import re
from collections.abc import Sequence
from decimal import Decimal, InvalidOperation
from typing import Any

MAX_VALUES = 1000  # a sweep trains a run per value and seed: more is surely a typo in a range

_INTEGER = re.compile(r"[-+]?\d+")
_WORDS = {"true": True, "false": False, "null": None}
# Integral numbers below this are named by their integer text (1.0 and 1 share ``=1``); larger
# ones by their float text, which stays short.
_INTEGER_NAMES = 1e16


def value_text(value: Any) -> str:
    """A swept value as text: strings as they are, anything else as JSON.

    Numbers keep their shortest exact text (``1e-05``, ``0.0003``, ``1.0``), never a fixed
    number of decimals that would print a small learning rate as zero.
    """
    if isinstance(value, str):
        return value
    return json.dumps(value, separators=(",", ":"), default=str)


def is_number(value: Any) -> bool:
    """Whether a swept value is a number (a bool is not, though Python counts it as an int)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def same_value(first: Any, second: Any) -> bool:
    """Whether two swept values are the same setting.

    Equal numbers are, whatever their type (``0`` and ``0.0``); a boolean never equals a number
    (``True == 1`` in Python, but ``true`` and ``1`` are different settings), nor a string
    anything but a string.
    """
    if is_number(first) and is_number(second):
        return bool(first == second)
    return type(first) is type(second) and bool(first == second)


def _folder_text(value: Any) -> str:
    """The value's text in its folder name: equal numbers share one (``0`` and ``0.0``)."""
    if is_number(value) and math.isfinite(value):
        if float(value).is_integer() and abs(value) < _INTEGER_NAMES:
            return str(int(value))
        return value_text(float(value))
    return value_text(value)


def value_folder(key: str, value: Any) -> str:
    """The folder name of a value's runs, ``<key>=<value>`` with only safe characters.

    Equal numbers share a folder whatever their spelling: ``0``, ``0.0`` and the range
    ``0:1:0.5``'s first value all run in ``<key>=0``.
    """
    return f"{key}={re.sub(r'[^A-Za-z0-9._,+-]', '_', _folder_text(value))}"


def parse_values(text: str) -> list[Any]:
    """The values of a sweep from a range or a list.

    Args:
        text: ``start:end:step``, the end included when the steps reach it (``"0.4:1.0:0.1"``;
            computed in decimal, so without float drift; integers when all three are, as in
            ``"1:9:2"``), or values separated by commas (``"0.1,1e-3"``, ``"adam,sgd"``). A
            list item in Python's ``int`` or ``float`` syntax is a number (``3``, ``1e-3``,
            ``.5``); ``true``, ``false`` and ``null`` (any case) are booleans and None; an item
            in quotes is the string inside them (``'1'``); anything else is a string as written
            (``1:30``, ``cuda:0``).

    Returns:
        The values, at least two, all different.

    Raises:
        ValueError: Empty text or item, a range that is not three numbers or whose step is not
            positive or whose start is after its end, fewer than two or more than
            :data:`MAX_VALUES` values, a non-finite number, an item with brackets (a YAML
            list), or a value given twice (``0`` and ``0.0``, ``1e-3`` and ``0.001``).
    """
    text = text.strip()
    if not text:
        raise ValueError("no values given: use start:end:step or a comma-separated list")
    if ":" in text and "," not in text:
        values = _parse_range(text)
        spellings = [value_text(value) for value in values]
    else:
        spellings = [item.strip() for item in text.split(",")]
        values = _parse_list(text, spellings)
    if len(values) < 2:
        raise ValueError(f"{text!r} gives {len(values)} value; a sweep needs at least 2")
    check_distinct(values, spellings)
    return values


def _parse_range(text: str) -> list[Any]:
    parts = [part.strip() for part in text.split(":")]
    if len(parts) != 3:
        raise ValueError(f"range {text!r} is not start:end:step")
    try:
        start, end, step = (Decimal(part) for part in parts)
    except InvalidOperation:
        raise ValueError(f"range {text!r}: start, end and step must be numbers") from None
    if not all(number.is_finite() for number in (start, end, step)):
        raise ValueError(f"range {text!r}: start, end and step must be finite")
    if step <= 0:
        raise ValueError(f"range {text!r}: the step must be positive, got {parts[2]}")
    if start > end:
        raise ValueError(f"range {text!r}: the start is after the end")
    count = int((end - start) // step) + 1
    if count > MAX_VALUES:
        raise ValueError(f"range {text!r} gives {count} values, more than {MAX_VALUES}")
    convert = int if all(_INTEGER.fullmatch(part) for part in parts) else float
    return [convert(start + index * step) for index in range(count)]


def _parse_list(text: str, items: list[str]) -> list[Any]:
    if len(items) > MAX_VALUES:
        raise ValueError(f"{len(items)} values, more than {MAX_VALUES}")
    values = []
    for item in items:
        if not item:
            raise ValueError(f"{text!r} has an empty value")
        values.append(_parse_item(item))
    return values


def _parse_item(item: str) -> Any:
    """One list item; read by hand, as YAML would read ``1:30`` as 90 (base 60)."""
    if len(item) >= 2 and item[0] == item[-1] and item[0] in "'\"":
        return item[1:-1]
    if any(bracket in item for bracket in "[]{}"):
        raise ValueError(
            f"value {item!r} has brackets: give the values as a plain comma-separated list, "
            "e.g. 0.1,0.2"
        )
    if item.lower() in _WORDS:
        return _WORDS[item.lower()]
    for convert in (int, float):
        try:
            number = convert(item)
        except ValueError:
            continue
        if not math.isfinite(number):
            raise ValueError(f"value {item!r} is not a finite number")
        return number
    return item


def check_distinct(values: Sequence[Any], spellings: Sequence[str] | None = None) -> None:
    """Refuse a value given twice: the same value (see :func:`same_value`), or values that
    would share a run folder.

    Args:
        values: The sweep's values.
        spellings: How each value was written, to name a repeat as given (``'0.001' repeats
            '1e-3'``); :func:`value_text` of each value when None.

    Raises:
        ValueError: Names the repeated value.
    """
    texts = list(spellings) if spellings is not None else [value_text(v) for v in values]
    if len(texts) != len(values):
        raise ValueError(f"{len(texts)} spellings given for {len(values)} values")
    for index, value in enumerate(values):
        for earlier in range(index):
            if same_value(value, values[earlier]):
                raise ValueError(
                    f"value {texts[index]!r} repeats {texts[earlier]!r}: sweep distinct values"
                )
            folder = value_folder("", value)
            if folder == value_folder("", values[earlier]):
                raise ValueError(
                    f"values {texts[earlier]!r} and {texts[index]!r} would share the run "
                    f"folder <key>{folder}: sweep values that differ in letters, digits or "
                    "._,+-"
                )
