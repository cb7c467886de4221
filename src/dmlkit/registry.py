"""The registry of configurable parts: losses, miners, distances, reducers, objectives,
backbones, datasets, optimisers and learning-rate schedules, one :class:`Registry` per kind.

Each registry lives beside the base class of its parts, on their own floor (``LOSSES`` in
:mod:`dmlkit.losses`, ``BACKBONES`` in :mod:`dmlkit.models`, ``DATASETS`` in
:mod:`dmlkit.training`…), and entries register where they are defined, with a decorator::

    @LOSSES.register()
    class MyLoss(BaseMetricLossFunction): ...

A config names a part by its registered name or by import path, with options that may
themselves be specs::

    loss:
      name: ContrastiveLoss          # or "my_package.losses:MyLoss"
      options:
        pos_margin: 0.1
        distance: {name: LpDistance, options: {power: 2}}
        reducer: {name: ThresholdReducer, options: {low: 0.1}}

:meth:`Registry.build` checks every option against the entry's signature (an unknown option
suggests the closest one, a value of the wrong type names the dotted key, nested specs
included), builds nested specs with the registry whose base class the parameter's annotation
names, and gives the entry the values only the run knows, by parameter name. Two of them,
``num_classes`` and ``embedding_size`` (:data:`SHARED_RUN_VALUES`), reach nested parts too and
may be overridden by an option; every other run value belongs to this part alone and an option
of that name is refused (the run sets it elsewhere in the config).

This module imports nothing above the ground floor.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from .typed_values import ConfigError, coerce, did_you_mean, is_checkable

Entry = TypeVar("Entry", bound=Callable[..., Any])

_REGISTRIES: list[Registry] = []

# Run values a part at any depth may ask for, and that an option may set instead.
SHARED_RUN_VALUES = ("num_classes", "embedding_size")


@dataclass(frozen=True)
class Spec:
    """A part named in a config: a registered name or ``"module:attribute"``, and its options.

    Attributes:
        name: The registered name, or an import path ``"package.module:Name"``.
        options: Keyword arguments of the part's constructor; values may be nested specs.
    """

    name: str
    options: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, value: Any, where: str) -> Spec:
        """A spec from its config form: a name, or a mapping ``{name: ..., options: {...}}``."""
        if isinstance(value, Spec):
            return value
        if isinstance(value, str):
            return cls(value)
        if isinstance(value, Mapping) and isinstance(value.get("name"), str):
            extra = sorted(set(value) - {"name", "options"})
            if extra:
                raise ConfigError(
                    f"{where}: a part is given as {{name, options}}, not {extra[0]!r}"
                    f"{did_you_mean(str(extra[0]), ['name', 'options'])}"
                )
            options = value.get("options") or {}
            if not isinstance(options, Mapping):
                raise ConfigError(f"{where}.options: expected a mapping, got {options!r}")
            return cls(value["name"], dict(options))
        raise ConfigError(
            f"{where}: expected a name or {{name: ..., options: {{...}}}}, got {value!r}"
        )


def is_import_path(name: str) -> bool:
    """Whether a part's name is an import path (``"package.module:Name"``)."""
    module, sep, attribute = name.partition(":")
    return bool(sep and module and attribute)


def import_object(path: str, where: str) -> Any:
    """The object at ``"package.module:Name"`` (``Name`` may be dotted).

    Raises:
        ConfigError: The module cannot be imported or has no such attribute.
    """
    module_name, _, attribute = path.partition(":")
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as error:
        raise ConfigError(f"{where}: cannot import {module_name!r} for {path!r}: {error}") from None
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise ConfigError(f"{where}: {module_name!r} has no attribute {attribute!r}")
        target = getattr(target, part)
    return target


class Registry:
    """Named constructors of one kind of part.

    Args:
        kind: What the entries are (``"loss"``), for messages.
        base: The entries' base class, if they share one; parameters annotated with it (or a
            subclass, or a union holding one) take nested specs of this registry.
    """

    def __init__(self, kind: str, base: type | None = None) -> None:
        self.kind = kind
        self.base = base
        self._entries: dict[str, Callable[..., Any]] = {}
        _REGISTRIES.append(self)

    def register(self, name: str | None = None) -> Callable[[Entry], Entry]:
        """Decorator registering a class or function under ``name`` (default: its own name).

        Raises:
            ValueError: The name is taken by another entry, or is an import path.
        """

        def decorate(entry: Entry) -> Entry:
            self.add(entry, name)
            return entry

        return decorate

    def add(self, entry: Callable[..., Any], name: str | None = None) -> None:
        """Registers ``entry`` under ``name`` (default: its ``__name__``)."""
        key = entry.__name__ if name is None else name
        if ":" in key:
            raise ValueError(f"{self.kind} name {key!r} must not contain ':' (import paths do)")
        if self._entries.get(key, entry) is not entry:
            raise ValueError(f"{self.kind} name {key!r} is already registered")
        self._entries[key] = entry

    def names(self) -> list[str]:
        """The registered names, sorted."""
        return sorted(self._entries)

    def entries(self) -> dict[str, Callable[..., Any]]:
        """Every registered entry by name (for tests parametrised over the registry)."""
        return dict(sorted(self._entries.items()))

    def get(self, name: str, where: str | None = None) -> Callable[..., Any]:
        """The entry registered as ``name``, or the object an import path names.

        Raises:
            ConfigError: Unknown name (closest one suggested) or an import path that fails.
        """
        where = where or self.kind
        if is_import_path(name):
            entry = import_object(name, f"{where}.name")
            if not callable(entry):
                raise ConfigError(f"{where}.name: {name!r} is not a class or function")
            return entry  # type: ignore[no-any-return]
        if name not in self._entries:
            raise ConfigError(
                f"{where}.name: unknown {self.kind} {name!r}{did_you_mean(name, self.names())}"
                " (or name your own as 'package.module:Name')"
            )
        return self._entries[name]

    def parameters(self, name: str, where: str | None = None) -> list[str]:
        """The names of the parameters an entry takes (for callers that give run values only
        to entries asking for them)."""
        parameters, _ = _signature(self.get(name, where))
        return list(parameters)

    def build(
        self, spec: Spec | Mapping[str, Any] | str, where: str | None = None, **run_values: Any
    ) -> Any:
        """The part a spec describes, every option checked.

        Args:
            spec: A :class:`Spec`, or its config form.
            where: The dotted key of the spec in the config (``"loss"``), for messages.
            **run_values: Values the run knows (``num_classes``, ``embedding_size``, …): given
                to the entry's parameters of those names that the options leave out, here and
                in nested specs.

        Raises:
            ConfigError: Unknown part or option (closest one suggested), a value of the wrong
                type, a required option missing, or the constructor refusing the values.
        """
        where = where or self.kind
        spec = Spec.parse(spec, where)
        entry, kwargs = self._arguments(spec, where, run_values, construct=True)
        try:
            return entry(**kwargs)
        except (TypeError, ValueError) as error:
            raise ConfigError(f"{where} {spec.name}: {error}") from error

    def check(
        self, spec: Spec | Mapping[str, Any] | str, where: str | None = None, *run_names: str
    ) -> None:
        """Checks a spec as :meth:`build` would, without constructing anything: the name, every
        option's name and type, nested specs, and that required options are given or among
        ``run_names`` (the values the run will give). For configs read long before their run.

        Raises:
            ConfigError: As :meth:`build`, except for the constructor's own checks.
        """
        where = where or self.kind
        self._arguments(Spec.parse(spec, where), where, dict.fromkeys(run_names), construct=False)

    def _arguments(
        self, spec: Spec, where: str, run_values: Mapping[str, Any], construct: bool
    ) -> tuple[Callable[..., Any], dict[str, Any]]:
        entry = self.get(spec.name, where)
        parameters, hints = _signature(entry)
        takes_any = any(p.kind is p.VAR_KEYWORD for p in parameters.values())
        named = [
            n for n, p in parameters.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        ]
        kwargs: dict[str, Any] = {}
        nested_values = {k: v for k, v in run_values.items() if k in SHARED_RUN_VALUES}
        for key, value in spec.options.items():
            if key not in named and not takes_any:
                raise ConfigError(
                    f"{where}.options.{key}: {spec.name} has no option {key!r}"
                    f"{did_you_mean(str(key), named)}"
                )
            if key in run_values and key not in SHARED_RUN_VALUES:
                raise ConfigError(
                    f"{where}.options.{key}: the run gives {spec.name} its {key!r}; set it in the "
                    "config's own field for it, not as an option"
                )
            kwargs[key] = _option(
                value, hints.get(key, Any), f"{where}.options.{key}", nested_values, construct
            )
        for key in named:
            if key not in kwargs and key in run_values:
                kwargs[key] = run_values[key]
        missing = [
            n
            for n in named
            if n not in kwargs
            and parameters[n].default is inspect.Parameter.empty
            and parameters[n].kind is not inspect.Parameter.POSITIONAL_ONLY
        ]
        if missing:
            raise ConfigError(f"{where}.options: {spec.name} needs {', '.join(map(repr, missing))}")
        return entry, kwargs


def _signature(entry: Callable[..., Any]) -> tuple[dict[str, inspect.Parameter], dict[str, Any]]:
    """The entry's constructor parameters and their resolved annotations; an annotation that
    cannot be resolved (a user's ``TYPE_CHECKING``-only name, say) leaves that one option
    unchecked, the others are still checked."""
    target = entry.__init__ if inspect.isclass(entry) else entry  # type: ignore[misc]
    try:
        parameters = dict(inspect.signature(entry).parameters)
    except (TypeError, ValueError):  # no inspectable signature (some builtins): take anything
        parameters = {"options": inspect.Parameter("options", inspect.Parameter.VAR_KEYWORD)}
    # When one annotation cannot be resolved the whole set fails: then resolve them one by one.
    with contextlib.suppress(Exception):
        return parameters, typing.get_type_hints(target)
    hints: dict[str, Any] = {}
    namespace = getattr(target, "__globals__", {})
    for name, annotation in getattr(target, "__annotations__", {}).items():
        try:
            hints[name] = eval(annotation, namespace) if isinstance(annotation, str) else annotation
        except Exception:
            continue
    return parameters, hints


def _registry_for(annotation: Any) -> Registry | None:
    """The registry whose base class the annotation names, alone or in a union."""
    if typing.get_origin(annotation) in (types.UnionType, typing.Union):
        candidates = typing.get_args(annotation)
    else:
        candidates = (annotation,)
    for candidate in candidates:
        if not isinstance(candidate, type):
            continue
        for registry in _REGISTRIES:
            if registry.base is not None and issubclass(candidate, registry.base):
                return registry
    return None


def _option(
    value: Any, annotation: Any, where: str, run_values: Mapping[str, Any], construct: bool
) -> Any:
    """One option's value: a nested spec built (or only checked) by its registry, or a plain
    value checked against the annotation."""
    registry = _registry_for(annotation)
    if registry is not None and isinstance(value, str | Mapping | Spec):
        if construct:
            return registry.build(value, where, **run_values)
        registry.check(value, where, *run_values)
        return value
    if is_checkable(annotation):
        return coerce(value, annotation, where)
    return value


__all__ = [
    "SHARED_RUN_VALUES",
    "Registry",
    "Spec",
    "import_object",
    "is_import_path",
]
