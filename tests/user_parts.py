"""Parts a user defines in their own module, named by import path in configs
(``"user_parts:CentroidLoss"``): the tests of the open registry and objective interface."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor, nn

from dmlkit.data import ArrayDataset
from dmlkit.distances import BaseDistance
from dmlkit.losses import BaseMetricLossFunction
from dmlkit.models import Backbone
from dmlkit.objectives import Objective, StepOutput


class CentroidLoss(nn.Module):
    """A loss with one learnt centre per class: needs ``num_classes`` and ``embedding_size``
    from the run, and indexes its parameters with the (contiguous) training labels."""

    def __init__(self, num_classes: int, embedding_size: int, scale: float = 1.0) -> None:
        super().__init__()
        self.centres = nn.Parameter(torch.randn(num_classes, embedding_size))
        self.scale = scale

    def forward(self, embeddings: Tensor, labels: Tensor, indices_tuple: object = None) -> Tensor:
        logits = self.scale * embeddings @ nn.functional.normalize(self.centres, dim=1).T
        return nn.functional.cross_entropy(logits, labels)


class HardestPairMiner(nn.Module):
    """A user's miner with PML's call contract and no dmlkit base class: for each anchor, its
    least similar positive and most similar negative, as pairs (a1, p, a2, n)."""

    def __init__(self, keep_self: bool = False) -> None:
        super().__init__()
        self.keep_self = keep_self

    @torch.no_grad()
    def forward(self, embeddings: Tensor, labels: Tensor) -> tuple[Tensor, ...]:
        unit = nn.functional.normalize(embeddings, dim=1)
        sim = unit @ unit.T
        same = labels[:, None] == labels[None, :]
        if not self.keep_self:
            same.fill_diagonal_(False)
        hardest_pos = torch.where(same, sim, 2.0).min(1).indices
        hardest_neg = torch.where(labels[:, None] != labels[None, :], sim, -2.0).max(1).indices
        anchors = torch.arange(len(labels))[same.any(1) & (~same).any(1)]
        return anchors, hardest_pos[anchors], anchors, hardest_neg[anchors]


class SeenLabels(Objective):
    """Records the labels the trainer hands it, and trains the given loss on the embeddings."""

    def __init__(self, loss: BaseMetricLossFunction, num_classes: int) -> None:
        super().__init__()
        self.loss = loss
        self.num_classes = num_classes
        self.seen: set[int] = set()

    def forward(self, model: nn.Module, inputs: Tensor, labels: Tensor) -> StepOutput:
        self.seen.update(int(label) for label in labels)
        return StepOutput(self.loss(model(inputs), labels), stats={"mined": None, "custom": 1.5})


class TinyNet(Backbone):
    """A user's backbone: one convolution."""

    def __init__(self, in_channels: int = 3, channels: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, channels, 3, padding=1)
        self.num_features = channels

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


def shifted_digits(split: str, shift: int = 100) -> ArrayDataset:
    """A user's dataset loader: the digits with labels moved far from 0."""
    from dmlkit.data import digits

    data = digits(split)
    return ArrayDataset(data.data, torch.from_numpy(np.asarray(data.labels) + shift))


class Vectors:
    """A user's dataset that is not an ArrayDataset: (feature vector, label) items."""

    def __init__(self, features: Tensor, labels: np.ndarray) -> None:
        self.features = features
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.features[index], int(self.labels[index])


def digit_vectors(split: str) -> Vectors:
    """The digits as flat 64-d vectors, from a loader with no transform."""
    from dmlkit.data import digits

    data = digits(split)
    return Vectors(data.data.reshape(len(data), -1).float(), np.asarray(data.labels))


class Flat(Backbone):
    """A backbone for flat vectors: a linear map to a 1 × 1 feature map."""

    def __init__(self, in_channels: int = 64, channels: int = 16) -> None:
        super().__init__()
        self.linear = nn.Linear(in_channels, channels)
        self.num_features = channels

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x)[:, :, None, None]


if TYPE_CHECKING:  # a name only a type checker sees: its annotation cannot be resolved at run time
    from collections.abc import Sequence as Unresolvable


class PartlyAnnotated(nn.Module):
    """A user's part with one annotation that cannot be resolved at run time."""

    def __init__(
        self,
        hint: Unresolvable | None = None,
        scale: float = 1.0,
        distance: BaseDistance | None = None,
    ) -> None:
        super().__init__()
        self.hint, self.scale, self.distance = hint, scale, distance


class _KillingDigits(ArrayDataset):
    """Digits that kill their own process with SIGKILL after ``after`` training items: a crash
    no handler sees, for the multi-process kill-and-resume test."""

    def __init__(self, data: ArrayDataset, after: int) -> None:
        super().__init__(data.data, data.labels)
        self.after, self.read = after, 0

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        self.read += 1
        if self.read > self.after:
            import os
            import signal

            os.kill(os.getpid(), signal.SIGKILL)
        return super().__getitem__(index)


def killed_digits(split: str) -> ArrayDataset:
    """``shifted_digits``; on the rank named by ``$DMLKIT_TEST_KILL_RANK`` (and only while it is
    set) the training split kills its process after ``$DMLKIT_TEST_KILL_AFTER`` items."""
    import os

    data = shifted_digits(split)
    rank = os.environ.get("DMLKIT_TEST_KILL_RANK")
    if split != "train" or rank is None or os.environ.get("RANK") != rank:
        return data
    return _KillingDigits(data, int(os.environ["DMLKIT_TEST_KILL_AFTER"]))
