"""Checked values from plain data (YAML, command-line overrides), shared by the typed run
configuration and the registry of configurable parts.

Every value is checked against a type annotation; a value that does not fit raises
:class:`ConfigError` naming the dotted key it came from, and an unknown key suggests the closest
valid one. This module imports nothing else from dmlkit, so every floor can use it.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, Literal, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A config key or value that cannot be used; the message names it."""


def did_you_mean(name: str, candidates: Sequence[str]) -> str:
    """The hint appended to an "unknown name" message: the closest candidate, then all of them.

    Args:
        name: The unknown name.
        candidates: The valid names.

    Returns:
        Text such as ``"; did you mean 'margin'? Valid: margin, swap"``.
    """
    close = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"{hint} Valid: {', '.join(candidates) or 'none'}"


def unknown_key_error(where: str, key: str, candidates: Sequence[str]) -> ConfigError:
    """The error for a key that does not exist, naming it and the closest valid key."""
    return ConfigError(f"unknown key {where + key!r}{did_you_mean(key, candidates)}")


def is_checkable(annotation: Any) -> bool:
    """Whether :func:`coerce` knows how to check values of this annotation."""
    origin = typing.get_origin(annotation)
    if origin in (types.UnionType, typing.Union, tuple):
        return all(arg is Ellipsis or is_checkable(arg) for arg in typing.get_args(annotation))
    if origin in (Literal, dict):
        return True
    return annotation in (Any, bool, int, float, str, type(None)) or (
        dataclasses.is_dataclass(annotation) and isinstance(annotation, type)
    )


def coerce(value: Any, annotation: Any, where: str) -> Any:
    """``value`` converted to the annotated type, or a :class:`ConfigError` naming ``where``.

    Integers are accepted where floats are expected, numbers that YAML 1.1 reads as strings
    (``1e-5``) become floats, lists become tuples, and mappings fill nested config dataclasses.

    Args:
        value: The plain value.
        annotation: Its declared type (``int``, ``float | None``, ``Literal[...]``,
            ``tuple[int, ...]``, a config dataclass…).
        where: The dotted key, for messages.

    Raises:
        ConfigError: The value does not fit, or the annotation is not one :func:`is_checkable`
            accepts.
    """
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (types.UnionType, typing.Union):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (arg for arg in args if arg is not type(None)):
            try:
                return coerce(value, option, where)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} fits no type")
    if origin is Literal:
        if value not in args:
            allowed = ", ".join(repr(arg) for arg in args)
            raise ConfigError(f"{where}: {value!r} is not one of {allowed}")
        return value
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(coerce(item, args[0], f"{where}[{i}]") for i, item in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}")
        return tuple(
            coerce(item, arg, f"{where}[{i}]")
            for i, (item, arg) in enumerate(zip(value, args, strict=True))
        )
    if origin is dict:
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if annotation is Any:
        return value
    if annotation is type(None):
        if value is not None:
            raise ConfigError(f"{where}: expected null, got {value!r}")
        return None
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if annotation is float:
        # YAML 1.1 reads 1e-5 (no dot) as a string; accept it as the number it plainly is.
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise ConfigError(f"{where}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if dataclasses.is_dataclass(annotation) and isinstance(annotation, type):
        return dataclass_from_mapping(annotation, value, where + ".")
    raise ConfigError(f"{where}: unsupported field type {annotation!r}")


def dataclass_from_mapping(cls: type[T], values: Any, where: str = "") -> T:
    """An instance of a config dataclass from a mapping, every key and value checked.

    Args:
        cls: The dataclass; its fields' annotations say how values are checked and converted.
        values: The mapping (None for all defaults).
        where: Prefix of the key names in error messages (``"protocol."``).

    Raises:
        ConfigError: An unknown key (closest one suggested) or a value of the wrong type.
    """
    if values is None:
        values = {}
    if not isinstance(values, Mapping):
        raise ConfigError(f"{where.rstrip('.') or 'config'}: expected a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    kwargs = {}
    for key, value in values.items():
        if key not in hints:
            raise unknown_key_error(where, str(key), names)
        kwargs[key] = coerce(value, hints[key], where + key)
    return cls(**kwargs)


_VARIABLE = re.compile(r"\$(\w+|\{\w+\})")


def expanded_path(path: str | None) -> str | None:
    """A config's path with ``$VARIABLES`` and ``~`` expanded (None stays None).

    Raises:
        ConfigError: The path names an environment variable that is not set.
    """
    if path is None:
        return None
    unset = [name.strip("{}") for name in _VARIABLE.findall(path)]
    unset = [name for name in unset if name not in os.environ]
    if unset:
        raise ConfigError(f"{path!r} names the environment variable ${unset[0]}, which is not set")
    return os.path.expanduser(os.path.expandvars(path))
