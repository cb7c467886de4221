"""Offline mining in the trainer: batches built from the whole embedded training set.

``sampler.mode: hard_classes`` builds each P×K batch from a seed class, its nearest classes by
centroid and a share of random classes; ``offline_triplets`` trains on hard or semi-hard
triplets mined over the whole training set, packed into batches. Every ``sampler.refresh``
epochs (or steps) the training set is embedded again (its cached features where the backbone is
frozen) and the neighbours or triplets recomputed; what was mined is checkpointed, so a resumed
run continues with it exactly.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..functional.offline import mine_offline_triplets, nearest_classes
from ..samplers import HardClassSampler, TripletBatchSampler
from .config import SamplerConfig


class OfflineMining:
    """The offline sampler of a run and its refreshes.

    Args:
        config: The sampler section (``mode`` is ``hard_classes`` or ``offline_triplets``).
        labels: The training items' labels.
        num_batches: Batches per epoch (what the P×K sampler would give).
        seed: The run's seed.
    """

    def __init__(
        self, config: SamplerConfig, labels: np.ndarray, num_batches: int, seed: int
    ) -> None:
        self.config = config
        self.labels = np.asarray(labels)
        self.sampler: HardClassSampler | TripletBatchSampler
        if config.mode == "hard_classes":
            self.sampler = HardClassSampler(
                self.labels,
                config.classes_per_batch,
                config.samples_per_class,
                random_share=config.random_share,
                num_batches=num_batches,
                seed=seed,
            )
        else:
            # About the items of a P×K batch, as whole triplets.
            per_batch = max(1, config.classes_per_batch * config.samples_per_class // 3)
            self.sampler = TripletBatchSampler(per_batch, num_batches=num_batches, seed=seed)
        self.seed = seed
        self.refreshed_at: int | None = None
        self.refreshes = 0

    def due(self, step: int, epoch: int, epoch_start: bool) -> bool:
        """Whether to refresh now: never refreshed, or ``refresh`` units since the last."""
        if self.refreshed_at == step:
            return False
        if self.refreshed_at is None:
            return True
        if self.config.refresh_unit == "epoch":
            return epoch_start and epoch % self.config.refresh == 0
        return step % self.config.refresh == 0

    def refresh(
        self, embeddings: Tensor, labels: np.ndarray, *, step: int, seconds: float
    ) -> dict[str, float | int]:
        """Recomputes the neighbours or triplets from the training set's embeddings.

        Args:
            embeddings: (N, D) of the training items, in dataset order.
            labels: Their labels.
            step: The training step.
            seconds: What embedding them took (reported with the mining's own time).

        Returns:
            What to log: the refresh's seconds and, for triplets, how many and how hard.

        Raises:
            ValueError: The labels are not the training labels, or the first refresh finds no
                triplet (a later one that finds none keeps the previous triplets).
        """
        start = time.perf_counter()
        if not np.array_equal(labels, self.labels):
            raise ValueError("offline mining: the embedded set's labels differ from training's")
        label_tensor = torch.as_tensor(labels)
        row: dict[str, float | int] = {"step": step}
        if isinstance(self.sampler, HardClassSampler):
            _, order = nearest_classes(embeddings, label_tensor)
            self.sampler.set_neighbours(order.numpy())
        else:
            found = mine_offline_triplets(
                embeddings,
                label_tensor,
                self.config.triplets,
                self.config.triplet_margin,
                per_anchor=self.config.triplets_per_anchor,
                seed=self.seed + 7919 * (self.refreshes + 1),
            )
            if len(found.triplets) == 0 and self.refreshes == 0:
                raise ValueError(
                    f"offline mining found no {self.config.triplets} triplet in the training "
                    "set; try sampler.triplets=semihard or a larger sampler.triplet_margin"
                )
            if len(found.triplets):
                self.sampler.set_triplets(found.triplets.numpy())
            row |= {
                "triplets": len(found.triplets),
                "anchors_without": found.anchors_without,
                "mean_margin": float(found.margins.mean()) if len(found.triplets) else math.nan,
            }
        self.refreshed_at = step
        self.refreshes += 1
        row["seconds"] = seconds + time.perf_counter() - start
        return row

    def state_dict(self) -> dict[str, Any]:
        """What was mined, for the checkpoint."""
        state: dict[str, Any] = {"refreshed_at": self.refreshed_at, "refreshes": self.refreshes}
        if isinstance(self.sampler, HardClassSampler):
            neighbours = self.sampler.neighbours
            state["neighbours"] = None if neighbours is None else torch.from_numpy(neighbours)
        else:
            state["triplets"] = torch.from_numpy(self.sampler.triplets)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores :meth:`state_dict`."""
        self.refreshed_at = state["refreshed_at"]
        self.refreshes = state["refreshes"]
        if isinstance(self.sampler, HardClassSampler):
            if state["neighbours"] is not None:
                self.sampler.set_neighbours(_numpy(state["neighbours"]))
        else:
            self.sampler.set_triplets(_numpy(state["triplets"]))


def _numpy(tensor: Tensor) -> np.ndarray:
    return tensor.cpu().numpy()


__all__ = ["OfflineMining"]
