"""Cross-batch memory (XBM, Wang et al. 2020): a queue of past embeddings and labels that every
call's anchors are compared against, PML's ``CrossBatchMemory``."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..functional.masks import label_masks
from ..functional.mining import pairs_from_masks
from ..miners import BaseMiner
from ..validation import IndicesTuple, check_embeddings, check_labels, check_positive_int
from .base import BaseMetricLossFunction


def _all_pairs(labels: Tensor, ref_labels: Tensor) -> IndicesTuple:
    return pairs_from_masks(*label_masks(labels, ref_labels))


def _as_tuple_of(kind: int, indices: IndicesTuple) -> IndicesTuple:
    """A tuple in the other format when needed: triplets to their two pairs, pairs to the
    triplets they form (every negative pair with every positive pair of the same anchor)."""
    if len(indices) == kind:
        return indices
    if len(indices) == 3:
        a, p, n = indices
        return a, p, a, n
    a1, p, a2, n = indices
    pos_index, neg_index = torch.nonzero(a1[:, None] == a2[None, :], as_tuple=True)
    return a1[pos_index], p[pos_index], n[neg_index]


class CrossBatchMemory(nn.Module):
    """Compares each call's embeddings with a memory of the last ``memory_size`` embeddings
    (this call's included), through ``loss`` and, optionally, ``miner``.

    Same constructor, call and buffers (``embedding_memory``, ``label_memory``) as PML's, so a
    PML ``state_dict()`` loads. The queue position and fill state are saved too (PML keeps them
    out of its state, so a resumed PML memory restarts its queue), and a PML state dict without
    them still loads.

    Each anchor's comparison with its own memory slot is left out by index
    (``anchor_in_ref``), and without a miner the loss sees every labelled pair of anchors and
    memory directly, with no index tuple: PML lists all of them as index tensors first. Any
    loss that takes a reference set works (PML names a fixed list); a given ``indices_tuple``
    also loses its self-comparisons (PML keeps those of a given tuple).

    Args:
        loss: A loss that takes a reference set (``loss.supports_ref``).
        embedding_size: D.
        memory_size: Rows of the memory.
        miner: Mines each call's anchors against the memory, or None for every pair.
    """

    embedding_memory: Tensor
    label_memory: Tensor

    def __init__(
        self,
        loss: BaseMetricLossFunction,
        embedding_size: int,
        memory_size: int = 1024,
        miner: BaseMiner | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(loss, BaseMetricLossFunction) or not loss.supports_ref:
            raise ValueError(
                f"CrossBatchMemory needs a loss that takes a reference set, got {loss!r}"
            )
        if miner is not None and not isinstance(miner, BaseMiner):
            raise ValueError(f"miner must be a dmlkit miner or None, got {miner!r}")
        self.loss = loss
        self.miner = miner
        self.embedding_size = check_positive_int(embedding_size, "embedding_size")
        self.memory_size = check_positive_int(memory_size, "memory_size")
        self.reset_queue()

    def reset_queue(self) -> None:
        """Empties the memory."""
        self.register_buffer("embedding_memory", torch.zeros(self.memory_size, self.embedding_size))
        self.register_buffer("label_memory", torch.zeros(self.memory_size, dtype=torch.long))
        self.queue_idx = 0
        self.has_been_filled = False

    def get_extra_state(self) -> dict[str, Any]:
        return {"queue_idx": self.queue_idx, "has_been_filled": self.has_been_filled}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.queue_idx = int(state["queue_idx"])
        self.has_been_filled = bool(state["has_been_filled"])

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        extra = f"{prefix}_extra_state"
        if extra not in state_dict:  # a PML state dict: its queue restarts, as PML's does
            self.queue_idx, self.has_been_filled = 0, False
            state_dict = {**state_dict, extra: self.get_extra_state()}
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def forward(
        self,
        embeddings: Tensor,
        labels: Tensor,
        indices_tuple: IndicesTuple | None = None,
        enqueue_mask: Tensor | None = None,
    ) -> Tensor:
        """Enqueues this call's embeddings (those ``enqueue_mask`` selects, else all) and
        computes the loss of the others (else all) against the memory.

        Args:
            embeddings: (N, D) embeddings.
            labels: (N,) integer labels.
            indices_tuple: Pairs or triplets of the call's own anchors against the memory,
                added to the mined (or all) ones, as PML does.
            enqueue_mask: (N,) bool: the items to enqueue instead of using as anchors.

        Returns:
            The loss.
        """
        emb = check_embeddings(embeddings)
        if emb.shape[1] != self.embedding_size:
            raise ValueError(
                f"embeddings have size {emb.shape[1]} but the memory holds {self.embedding_size}"
            )
        labels = check_labels(labels, emb.shape[0], emb.device)
        if indices_tuple is not None and enqueue_mask is not None:
            raise ValueError("indices_tuple and enqueue_mask are mutually exclusive")
        if enqueue_mask is not None:
            enqueue_mask = self._checked_mask(enqueue_mask, emb)
            to_queue, queued_labels = emb[enqueue_mask], labels[enqueue_mask]
            emb, labels = emb[~enqueue_mask], labels[~enqueue_mask]
        else:
            if emb.shape[0] > self.memory_size:
                raise ValueError(
                    f"a batch of {emb.shape[0]} does not fit a memory of {self.memory_size}; "
                    "raise memory_size or pass enqueue_mask"
                )
            to_queue, queued_labels = emb, labels
        slots = self._enqueue(to_queue, queued_labels)
        filled = self.memory_size if self.has_been_filled else self.queue_idx
        memory = self.embedding_memory[:filled]
        memory_labels = self.label_memory[:filled]
        anchor_in_ref = slots if enqueue_mask is None else None
        mined = None
        if self.miner is not None:
            mined = self.miner(emb, labels, memory, memory_labels, anchor_in_ref)
        if indices_tuple is not None:
            mined = self._with_given(mined, indices_tuple, labels, memory_labels)
        return self.loss(emb, labels, mined, memory, memory_labels, anchor_in_ref)

    def _checked_mask(self, mask: object, emb: Tensor) -> Tensor:
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool or mask.shape != emb.shape[:1]:
            raise ValueError(f"enqueue_mask must be a bool tensor of shape ({emb.shape[0]},)")
        return mask.to(emb.device)

    def _enqueue(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """Writes the items at the queue position; returns their memory rows."""
        device, dtype = embeddings.device, embeddings.dtype
        if self.embedding_memory.device != device or self.embedding_memory.dtype != dtype:
            # As PML: the memory takes the embeddings' device and dtype.
            self.embedding_memory = self.embedding_memory.to(device, dtype)
            self.label_memory = self.label_memory.to(device)
        slots = torch.arange(self.queue_idx, self.queue_idx + len(embeddings), device=device)
        slots = slots % self.memory_size
        with torch.no_grad():
            self.embedding_memory[slots] = embeddings.detach()
            self.label_memory[slots] = labels.to(self.label_memory.dtype)
        previous = self.queue_idx
        self.queue_idx = (self.queue_idx + len(embeddings)) % self.memory_size
        if len(embeddings) and self.queue_idx <= previous:
            self.has_been_filled = True
        return slots

    @staticmethod
    def _with_given(
        mined: IndicesTuple | None,
        given: IndicesTuple,
        labels: Tensor,
        memory_labels: Tensor,
    ) -> IndicesTuple:
        """PML's rule for a given tuple: appended to the mined (or all) pairs, converted to
        their format; the all-pairs tuple is then explicit."""
        base = mined if mined is not None else _all_pairs(labels, memory_labels)
        converted = _as_tuple_of(len(base), tuple(t.to(base[0].device) for t in given))  # type: ignore[arg-type]
        return tuple(torch.cat([b, c.long()]) for b, c in zip(base, converted, strict=True))  # type: ignore[return-value]

    def extra_repr(self) -> str:
        return (
            f"embedding_size={self.embedding_size}, memory_size={self.memory_size}, "
            f"queue_idx={self.queue_idx}, has_been_filled={self.has_been_filled}"
        )


__all__ = ["CrossBatchMemory"]
