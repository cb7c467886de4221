"""Every registered loss and miner, for the tests that must hold for each of them: a class
registered in :data:`dmlkit.losses.LOSSES` or :data:`dmlkit.miners.MINERS` is picked up
by the input-error, zero-with-graph, half-precision, reference self-identity and PML-parity
tests with no edit here.

Build them with :func:`make`: losses with per-class parameters need ``num_classes`` and
``embedding_size``, which a run gives them by parameter name; ``make`` gives them the same way.
"""

from __future__ import annotations

import inspect
from typing import Any

import dmlkit.losses as dl
import dmlkit.miners as dm
from dmlkit.losses import LOSSES
from dmlkit.miners import MINERS

ALL_LOSSES: list[type[dl.BaseMetricLossFunction]] = list(LOSSES.entries().values())
ALL_MINERS: list[type[dm.BaseMiner]] = list(MINERS.entries().values())

NUM_CLASSES = 64
"""The class count given to losses with per-class parameters: above every label the shared
tests use."""


REQUIRED_OPTIONS: dict[str, dict[str, Any]] = {"RankedListLoss": {"margin": 0.4, "Tn": 1.0}}
"""Values for the constructor options a class requires (PML makes them required too)."""


def make(cls: type[Any], embedding_size: int = 4, **options: Any) -> Any:
    """``cls(**options)``, plus ``num_classes`` (:data:`NUM_CLASSES`) and ``embedding_size``
    for a class that takes them, as a run gives them.

    Args:
        cls: A registered loss or miner class.
        embedding_size: The dimension of the embeddings the test will pass.
        **options: Constructor options.
    """
    takes = inspect.signature(cls).parameters
    run_values = {"num_classes": NUM_CLASSES, "embedding_size": embedding_size}
    required = REQUIRED_OPTIONS.get(cls.__name__, {})
    options = {**{k: v for k, v in required.items() if k not in options}, **options}
    return cls(**{k: v for k, v in run_values.items() if k in takes}, **options)
