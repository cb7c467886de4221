"""The standard step: embed the batch, mine it (optionally), compute the loss."""

from __future__ import annotations

import copy
from typing import Literal

from torch import Tensor, nn

from ..distributed import check_efficient_mode, gather, is_distributed, own_rows
from ..losses import BaseMetricLossFunction
from ..losses.base import ClassParametersLoss
from ..miners import BaseMiner, EmbeddingsAlreadyPackagedAsTriplets
from .base import OBJECTIVES, Objective, StepOutput


@OBJECTIVES.register()
class MetricLossObjective(Objective):
    """Miner → loss on the step's embeddings: what every PML training loop does.

    Any loss and miner with PML's call contract work (PML's own included): the miner's output
    is counted as ``mined`` in the logs. On several processes the batch is gathered with its
    gradient (:mod:`dmlkit.distributed`): in ``"global"`` mode the miner and the loss see the
    whole global batch on every rank; in ``"efficient"`` mode each rank's anchors are mined and
    scored against it.

    Args:
        loss: The loss (the config's ``loss`` section).
        miner: The miner, or None to use every pair or triplet (the ``miner`` section).
        distributed: ``"global"`` or ``"efficient"``, on several processes.
    """

    def __init__(
        self,
        loss: BaseMetricLossFunction | nn.Module,
        miner: BaseMiner | nn.Module | None = None,
        distributed: Literal["global", "efficient"] = "global",
    ) -> None:
        super().__init__()
        if distributed not in ("global", "efficient"):
            raise ValueError(f"distributed must be 'global' or 'efficient', got {distributed!r}")
        if distributed == "efficient":
            check_efficient_mode(loss)
        self.loss = loss
        self.miner = miner
        self.distributed = distributed

    def forward(self, model: nn.Module, inputs: Tensor, labels: Tensor) -> StepOutput:
        embeddings = model(inputs)
        if not is_distributed():
            indices_tuple = None if self.miner is None else self.miner(embeddings, labels)
            loss = self.loss(embeddings, labels, indices_tuple)
        elif self.distributed == "global":
            all_embeddings, all_labels = gather(embeddings), gather(labels)
            mined = None if self.miner is None else self.miner(all_embeddings, all_labels)
            indices_tuple = mined
            loss = self.loss(all_embeddings, all_labels, indices_tuple)
        else:
            all_embeddings, all_labels = gather(embeddings), gather(labels)
            itself = own_rows(len(labels), labels.device)
            indices_tuple = (
                None
                if self.miner is None
                else self.miner(embeddings, labels, all_embeddings.detach(), all_labels, itself)
            )
            loss = self.loss(embeddings, labels, indices_tuple, all_embeddings, all_labels, itself)
        return StepOutput(loss, stats={"mined": _count(indices_tuple)})

    def validation_losses(
        self, model: nn.Module, inputs: Tensor, labels: Tensor
    ) -> dict[str, float | None] | None:
        return mined_and_all_pairs_losses(self.loss, self.miner, model(inputs), labels)


def mined_and_all_pairs_losses(
    loss: nn.Module, miner: nn.Module | None, embeddings: Tensor, labels: Tensor
) -> dict[str, float | None] | None:
    """:meth:`Objective.validation_losses` of a miner and a loss: the loss on the mined tuples,
    on every pair or triplet, and the mined count, computed on copies (a loss or miner with
    state, such as a histogram or a memory, is left as it was). None for a loss with per-class
    parameters (they do not cover unseen classes). A batch laid out as triplets in training
    (:class:`~dmlkit.miners.EmbeddingsAlreadyPackagedAsTriplets`) has no mined form here."""
    if isinstance(loss, ClassParametersLoss) or getattr(loss, "num_classes", None) is not None:
        return None
    loss, miner = copy.deepcopy(loss), copy.deepcopy(miner)
    every = float(loss(embeddings, labels))
    if isinstance(miner, EmbeddingsAlreadyPackagedAsTriplets):
        return {"val_loss": None, "val_loss_all_pairs": every, "val_mined": None}
    mined = None if miner is None else miner(embeddings, labels)
    as_trained = every if mined is None else float(loss(embeddings, labels, mined))
    return {"val_loss": as_trained, "val_loss_all_pairs": every, "val_mined": _count(mined)}


def _count(indices_tuple: tuple[Tensor, ...] | None) -> int | None:
    """Mined triplets, or positive plus negative pairs (None without a miner)."""
    if indices_tuple is None:
        return None
    if len(indices_tuple) == 4:
        return len(indices_tuple[0]) + len(indices_tuple[2])
    return len(indices_tuple[0])
