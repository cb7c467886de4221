"""Every registered loss and miner, for the tests that must hold for each of them: a class
registered in :data:`dmlkit.losses.LOSSES` or :data:`dmlkit.miners.MINERS` is picked up
by the input-error, zero-with-graph, half-precision, reference self-identity and PML-parity
tests with no edit here."""

from __future__ import annotations

import dmlkit.losses as dl
import dmlkit.miners as dm
from dmlkit.losses import LOSSES
from dmlkit.miners import MINERS

ALL_LOSSES: list[type[dl.BaseMetricLossFunction]] = list(LOSSES.entries().values())
ALL_MINERS: list[type[dm.BaseMiner]] = list(MINERS.entries().values())
