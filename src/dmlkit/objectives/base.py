"""The training-objective interface: given the model and a batch, the loss to optimise, whether
to skip the update, and the stats to log.

The trainer owns the loop (devices, mixed precision, optimiser, schedule, validation, logs,
checkpoints) and calls an objective once per step; everything a method does beyond "embed, mine,
compute the loss" lives in its objective. An objective is an ``nn.Module``: its parameters (a
loss's proxies, say) are trained with the model, and its ``state_dict`` is checkpointed, so
exact resume covers it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import ClassVar, Protocol

from torch import Tensor, nn

from ..registry import Registry


@dataclass(frozen=True)
class StepOutput:
    """What one training step produced.

    Attributes:
        loss: The scalar to back-propagate.
        skip: True when the optimiser must not step on this batch (the trainer counts these
            in ``skipped_steps``); ``loss`` must still be a tensor with a graph.
        stats: Values to log beside the loss (``mined`` is shown in the progress bar).
    """

    loss: Tensor
    skip: bool = False
    stats: Mapping[str, float | int | None] = field(default_factory=dict)


class BatchStream(Protocol):
    """Endless seeded P×K batches of the training set, positioned by training step, so that a
    resumed run draws the same ones."""

    def from_step(self, step: int) -> Iterator[tuple[Tensor, Tensor]]:
        """(inputs, labels) batches, the first being the one for ``step``."""
        ...


class BatchSource(Protocol):
    """What the trainer offers an objective that needs more data than the step's batch."""

    def __call__(
        self, classes_per_batch: int, samples_per_class: int, seed: int, *, held_out: bool = False
    ) -> BatchStream:
        """A stream of P×K batches of the training set, or (``held_out``) of the validation
        classes that the training batches never see."""
        ...


class Objective(nn.Module):
    """Base of training objectives.

    Subclasses implement :meth:`forward`. Values the run knows are given by the registry to
    constructor parameters of these names: ``loss`` and ``miner`` (built from the config's
    sections), ``lr`` (the optimiser's base rate), ``seed``, ``batch_source``
    (:data:`BatchSource`), ``num_classes`` and ``embedding_size``.

    Attributes:
        amp_unsupported: Why ``train.amp`` cannot be used with this objective (None: it can).
        distributed_unsupported: Why it cannot train on several processes (None: it can).
    """

    amp_unsupported: ClassVar[str | None] = None
    distributed_unsupported: ClassVar[str | None] = None

    @property
    def may_skip(self) -> bool:
        """Whether :meth:`forward` can ask to skip a step (the trainer then logs the count)."""
        return False

    def start(self, step: int) -> None:
        """Training starts, or resumes, at ``step``: position any stream the objective reads."""

    def forward(self, model: nn.Module, inputs: Tensor, labels: Tensor) -> StepOutput:
        """One step's loss.

        Args:
            model: The network being trained, in training mode. With mixed precision it is a
                wrapper that runs the network under autocast and returns float32 embeddings,
                so call it; do not reach into its attributes.
            inputs: The batch, on the training device.
            labels: (B,) training labels: contiguous class indices 0..C−1.

        Returns:
            The loss, whether to skip the update, and what to log.
        """
        raise NotImplementedError

    def validation_losses(
        self, model: nn.Module, inputs: Tensor, labels: Tensor
    ) -> dict[str, float | None] | None:
        """The loss on a batch of validation classes, without changing any state: as in
        training (``val_loss``, with the miner), over every pair or triplet
        (``val_loss_all_pairs``) and the mined count (``val_mined``). None (the default) when
        the objective has no such loss for unseen classes.

        Args:
            model: The network, in evaluation mode, under ``torch.no_grad``.
            inputs: A P×K batch of validation classes.
            labels: Their labels: the validation classes' indices 0..C_val−1.
        """
        del model, inputs, labels
        return None


OBJECTIVES = Registry("objective", Objective)
