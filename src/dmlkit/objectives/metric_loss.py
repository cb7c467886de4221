"""The standard step: embed the batch, mine it (optionally), compute the loss."""

from __future__ import annotations

from torch import Tensor, nn

from ..distributed import gather, is_distributed
from ..losses import BaseMetricLossFunction
from ..miners import BaseMiner
from .base import OBJECTIVES, Objective, StepOutput


@OBJECTIVES.register()
class MetricLossObjective(Objective):
    """Miner → loss on the step's embeddings: what every PML training loop does.

    Any loss and miner with PML's call contract work (PML's own included): the miner's output
    is counted as ``mined`` in the logs. On several processes the miner and the loss see the
    global batch, gathered with its gradient (:mod:`dmlkit.distributed`, global mode).

    Args:
        loss: The loss (the config's ``loss`` section).
        miner: The miner, or None to use every pair or triplet (the ``miner`` section).
    """

    def __init__(
        self,
        loss: BaseMetricLossFunction | nn.Module,
        miner: BaseMiner | nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.loss = loss
        self.miner = miner

    def forward(self, model: nn.Module, inputs: Tensor, labels: Tensor) -> StepOutput:
        embeddings = model(inputs)
        if is_distributed():
            # Global mode: every rank computes the loss of the whole global batch (see
            # dmlkit.distributed for why the averaged gradients are one process's).
            embeddings, labels = gather(embeddings), gather(labels)
        indices_tuple = None if self.miner is None else self.miner(embeddings, labels)
        loss = self.loss(embeddings, labels, indices_tuple)
        return StepOutput(loss, stats={"mined": _count(indices_tuple)})


def _count(indices_tuple: tuple[Tensor, ...] | None) -> int | None:
    """Mined triplets, or positive plus negative pairs (None without a miner)."""
    if indices_tuple is None:
        return None
    if len(indices_tuple) == 4:
        return len(indices_tuple[0]) + len(indices_tuple[2])
    return len(indices_tuple[0])
