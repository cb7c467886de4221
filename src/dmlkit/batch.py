"""The checked inputs of one loss or miner call, and the pair structures derived from them."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .distances import BaseDistance
from .functional.masks import (
    PairIndices,
    PairWeights,
    batch_pair_weights,
    drop_self_pairs,
    label_weights,
)
from .validation import IndicesTuple, check_anchor_in_ref, check_batch, check_indices_tuple

_LOW_PRECISION = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class Batch:
    """Embeddings, labels and an optional reference set, validated and in the compute dtype.

    Half-precision inputs are computed in float32 (as autocast does for losses), so masking
    constants and log-sum-exp stay finite; the caller casts the result back.

    Attributes:
        embeddings: (N, D) anchors.
        labels: (N,) labels, or None when an indices tuple replaces them.
        ref_emb: (M, D) separate reference set, or None for the batch against itself.
        ref_labels: (M,) labels of ``ref_emb``.
        indices_tuple: Mined (a, p, n) or (a1, p, a2, n), or None; without the entries that
            pair an anchor with itself through ``anchor_in_ref``.
        anchor_in_ref: (N,) row of ``ref_emb`` holding each anchor itself, or −1; None when
            the reference set holds no anchor (or there is none).
    """

    embeddings: Tensor
    labels: Tensor | None
    ref_emb: Tensor | None
    ref_labels: Tensor | None
    indices_tuple: IndicesTuple | None
    anchor_in_ref: Tensor | None = None

    @classmethod
    def from_call(
        cls,
        embeddings: object,
        labels: object | None,
        indices_tuple: object | None = None,
        ref_emb: object | None = None,
        ref_labels: object | None = None,
        anchor_in_ref: object | None = None,
        *,
        labels_required: bool = False,
    ) -> Batch:
        """Checks a call's arguments (raising ``ValueError`` naming any problem)."""
        emb, lab, ref, ref_lab = check_batch(
            embeddings,
            labels,
            ref_emb,
            ref_labels,
            labels_required=labels_required or indices_tuple is None,
        )
        n_refs = emb.shape[0] if ref is None else ref.shape[0]
        indices = (
            None
            if indices_tuple is None
            else check_indices_tuple(indices_tuple, emb.shape[0], n_refs, emb.device)  # type: ignore[arg-type]
        )
        itself = None
        if anchor_in_ref is not None:
            itself = check_anchor_in_ref(
                anchor_in_ref, emb.shape[0], None if ref is None else n_refs, emb.device
            )
            if indices is not None:
                indices = drop_self_pairs(indices, itself)
        if emb.dtype in _LOW_PRECISION:
            emb = emb.float()
            ref = None if ref is None else ref.float()
        return cls(emb, lab, ref, ref_lab, indices, itself)

    @property
    def shape(self) -> tuple[int, int]:
        """(N, M): numbers of anchors and references."""
        n = self.embeddings.shape[0]
        return n, n if self.ref_emb is None else self.ref_emb.shape[0]

    def matrix(self, distance: BaseDistance) -> Tensor:
        """The (N, M) distance or similarity matrix."""
        return distance(self.embeddings, self.ref_emb)

    def label_weights(self) -> tuple[Tensor, Tensor]:
        """0/1 float (N, M) positive and negative pair weights from the labels, in the compute
        dtype (each anchor's pair with itself excluded by index)."""
        if self.labels is None:
            raise ValueError("labels are required here")
        return label_weights(
            self.labels, self.ref_labels, self.embeddings.dtype, self.anchor_in_ref
        )

    def pairs(self) -> PairWeights | PairIndices:
        """The mined pairs as index lists if an indices tuple was given, else every labelled
        pair as dense weights: what per-pair losses use."""
        if self.indices_tuple is not None:
            return PairIndices.from_tuple(self.indices_tuple)
        return self.pair_weights()

    def pair_weights(self, binary: bool = False) -> PairWeights:
        """The mined pairs if an indices tuple was given (counted, or once each when
        ``binary``), else every labelled pair."""
        return batch_pair_weights(
            self.labels,
            self.ref_labels,
            self.indices_tuple,
            self.shape,
            self.embeddings.device,
            self.embeddings.dtype,
            binary,
            self.anchor_in_ref,
        )
