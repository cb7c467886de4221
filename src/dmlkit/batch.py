"""The checked inputs of one loss or miner call, and the pair structures derived from them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor

from .distances import BaseDistance
from .functional.masks import (
    PairIndices,
    PairWeights,
    drop_self_pairs,
    exclude_self_pairs_,
    label_weights,
    tuple_to_pair_weights,
)
from .relations import as_relation, relation_masks
from .validation import (
    IndicesTuple,
    ValueChecks,
    check_anchor_in_ref,
    check_batch,
    check_class_labels,
    check_indices_tuple,
    class_labels,
)

_LOW_PRECISION = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class Batch:
    """Embeddings, labels and an optional reference set, validated and in the compute dtype.

    Half-precision inputs are computed in float32 (as autocast does for losses), so masking
    constants and log-sum-exp stay finite; the caller casts the result back.

    Attributes:
        embeddings: (N, D) anchors.
        labels: (N,) integer labels; None when an indices tuple replaces them or a relation
            gives the pairs.
        ref_emb: (M, D) separate reference set, or None for the batch against itself.
        ref_labels: (M,) labels of ``ref_emb``.
        indices_tuple: Mined (a, p, n) or (a1, p, a2, n), or None; without the entries that
            pair an anchor with itself through ``anchor_in_ref``.
        anchor_in_ref: (N,) row of ``ref_emb`` holding each anchor itself, or −1; None when
            the reference set holds no anchor (or there is none).
        relation: Boolean (N, M) positive and negative masks from multi-hot labels or a
            :mod:`dmlkit.relations` relation (self-pairs not yet excluded); None for integer
            labels.
        num_classes: The class count the labels were checked against (class indices in
            [0, num_classes)), or None.
    """

    embeddings: Tensor
    labels: Tensor | None
    ref_emb: Tensor | None
    ref_labels: Tensor | None
    indices_tuple: IndicesTuple | None
    anchor_in_ref: Tensor | None = None
    relation: tuple[Tensor, Tensor] | None = None
    num_classes: int | None = None

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
        num_classes: int | None = None,
        class_error: Callable[[Tensor], str] | None = None,
    ) -> Batch:
        """Checks a call's arguments (raising ``ValueError`` naming any problem), reading the
        checks of values from the device once (none while they are turned off:
        :func:`~dmlkit.validation.set_finite_checks`).

        Args:
            embeddings, labels, indices_tuple, ref_emb, ref_labels, anchor_in_ref: The call's
                arguments.
            labels_required: Whether the caller cannot work without labels.
            num_classes: Check integer labels to be class indices in [0, num_classes), for
                per-class parameters; None checks no range.
            class_error: Builds the error message for labels outside that range from the
                labels; None names the first such label.
        """
        relation = as_relation(labels)
        checks = ValueChecks()
        emb, lab, ref, ref_lab = check_batch(
            embeddings,
            None if relation is not None else labels,
            ref_emb,
            None if relation is not None else ref_labels,
            labels_required=relation is None and (labels_required or indices_tuple is None),
            checks=checks,
        )
        if num_classes is not None and lab is not None:
            message = None if class_error is None else partial(class_error, lab)
            check_class_labels(lab, num_classes, checks=checks, message=message)
        masks = None
        if relation is not None:
            if len(relation) != emb.shape[0]:
                raise ValueError(
                    f"labels has {len(relation)} rows but there are {emb.shape[0]} embeddings; "
                    "they must match"
                )
            masks = relation_masks(
                relation, ref_labels, None if ref is None else ref.shape[0], emb.device
            )
        n_refs = emb.shape[0] if ref is None else ref.shape[0]
        indices = (
            None
            if indices_tuple is None
            else check_indices_tuple(indices_tuple, emb.shape[0], n_refs, emb.device, checks)  # type: ignore[arg-type]
        )
        itself = None
        if anchor_in_ref is not None:
            itself = check_anchor_in_ref(
                anchor_in_ref, emb.shape[0], None if ref is None else n_refs, emb.device, checks
            )
        checks.run()
        if itself is not None and indices is not None:
            indices = drop_self_pairs(indices, itself)
        if emb.dtype in _LOW_PRECISION:
            emb = emb.float()
            ref = None if ref is None else ref.float()
        checked_classes = None if lab is None else num_classes
        return cls(emb, lab, ref, ref_lab, indices, itself, masks, checked_classes)

    @property
    def shape(self) -> tuple[int, int]:
        """(N, M): numbers of anchors and references."""
        n = self.embeddings.shape[0]
        return n, n if self.ref_emb is None else self.ref_emb.shape[0]

    def matrix(self, distance: BaseDistance) -> Tensor:
        """The (N, M) distance or similarity matrix."""
        return distance(self.embeddings, self.ref_emb)

    def label_weights(self) -> tuple[Tensor, Tensor]:
        """0/1 float (N, M) positive and negative pair weights from the labels or the
        relation, in the compute dtype (each anchor's pair with itself excluded by index)."""
        dtype = self.embeddings.dtype
        if self.relation is not None:
            pos, neg = (mask.to(dtype) for mask in self.relation)
            exclude_self_pairs_(pos, neg, self.ref_emb is None, self.anchor_in_ref)
            return pos, neg
        if self.labels is None:
            raise ValueError("labels are required here")
        return label_weights(self.labels, self.ref_labels, dtype, self.anchor_in_ref)

    def class_labels(self, owner: str) -> Tensor:
        """The integer labels, for what needs one class per item.

        Args:
            owner: The loss or miner, for the message.

        Raises:
            ValueError: If the call gave multi-hot labels or a relation, or no labels.
        """
        if self.relation is not None:
            raise ValueError(
                f"{owner} needs integer class labels (one class per item); multi-hot labels "
                "and label relations work with the pair-based losses and the miners"
            )
        if self.labels is None:
            raise ValueError(f"{owner} needs labels")
        return self.labels

    def class_indices(self, owner: str, num_classes: int) -> Tensor:
        """The integer labels as class indices in [0, ``num_classes``), ``torch.long``, for
        per-class parameters: checked here unless :meth:`from_call` checked them against
        ``num_classes`` with the call's other inputs.

        Args:
            owner: The loss or miner, for the message.
            num_classes: The number of classes.
        """
        labels = self.class_labels(owner)
        if self.num_classes == num_classes:
            return labels.long()
        return class_labels(labels, num_classes)

    def pairs(self) -> PairWeights | PairIndices:
        """The mined pairs as index lists if an indices tuple was given, else every labelled
        pair as dense weights: what per-pair losses use."""
        if self.indices_tuple is not None:
            return PairIndices.from_tuple(self.indices_tuple)
        return self.pair_weights()

    def pair_weights(self, binary: bool = False) -> PairWeights:
        """The mined pairs if an indices tuple was given (counted, or once each when
        ``binary``), else every labelled pair."""
        if self.indices_tuple is not None:
            return tuple_to_pair_weights(
                self.indices_tuple,
                self.shape,
                self.embeddings.device,
                self.embeddings.dtype,
                binary,
            )
        if self.labels is None and self.relation is None:
            raise ValueError("labels are required when no indices_tuple is given")
        return PairWeights(*self.label_weights(), binary=True)
