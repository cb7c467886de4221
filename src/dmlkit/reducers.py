"""Reducers for the ``reducer=`` slot of every loss (PML's names and meanings), and their
registry.

The reducers are plain dataclasses of :mod:`dmlkit.functional.reduction`, the pure maths; they
are registered here, beside the distances, where the loss floor publishes its parts. In a
config, ``MultipleReducers`` takes its per-sub-loss reducers as nested specs::

    reducer:
      name: MultipleReducers
      options:
        reducers: {pos_loss: {name: ThresholdReducer, options: {high: 0.3}}}
        default_reducer: SumReducer
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .functional.reduction import (
    REDUCTION_TYPES,
    AvgNonZeroReducer,
    BaseReducer,
    ClassWeightedReducer,
    DivisorReducer,
    DoNothingReducer,
    LossDict,
    MeanReducer,
    MultipleReducers,
    PerAnchorReducer,
    Reducer,
    SumReducer,
    ThresholdReducer,
    mean_per_row,
)
from .registry import Registry, Spec
from .typed_values import ConfigError

REDUCERS = Registry("reducer", BaseReducer)

for _reducer in (
    AvgNonZeroReducer,
    ClassWeightedReducer,
    DivisorReducer,
    DoNothingReducer,
    MeanReducer,
    PerAnchorReducer,
    SumReducer,
    ThresholdReducer,
):
    REDUCERS.add(_reducer)


def multiple_reducers_from_specs(
    reducers: Mapping[str, Any], default_reducer: BaseReducer | None = None
) -> MultipleReducers:
    """:class:`MultipleReducers` whose ``reducers`` values may be specs (a registered name, or
    ``{name, options}``) as well as reducers: the registry's entry for that name, since it
    builds nested specs only for parameters annotated with a reducer class, not in a mapping.

    Args:
        reducers: Sub-loss name -> reducer or spec.
        default_reducer: As :class:`MultipleReducers` (the registry builds a spec of it).

    Raises:
        ConfigError: A nested spec that cannot be built (its key named).
    """
    if not isinstance(reducers, Mapping):
        raise ConfigError(f"reducers: expected a mapping of sub-loss names, got {reducers!r}")
    built = {
        name: value
        if isinstance(value, BaseReducer)
        else REDUCERS.build(Spec.parse(value, f"reducers.{name}"), f"reducers.{name}")
        for name, value in reducers.items()
    }
    return MultipleReducers(built, default_reducer)


REDUCERS.add(multiple_reducers_from_specs, "MultipleReducers")

__all__ = [
    "REDUCERS",
    "REDUCTION_TYPES",
    "AvgNonZeroReducer",
    "BaseReducer",
    "ClassWeightedReducer",
    "DivisorReducer",
    "DoNothingReducer",
    "LossDict",
    "MeanReducer",
    "MultipleReducers",
    "PerAnchorReducer",
    "Reducer",
    "SumReducer",
    "ThresholdReducer",
    "mean_per_row",
    "multiple_reducers_from_specs",
]
