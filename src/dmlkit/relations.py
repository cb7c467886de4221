"""Label relations: which pairs are positives and which are negatives, beyond one integer class
per item.

Every pair-based loss and miner takes, in place of (N,) integer labels:

* **Multi-hot labels**, an (N, C) tensor of 0/1 (or bool): two items are positives when they
  share a class and negatives when they share none.
* A :class:`LabelRelation`: per-item labels of any shape with a rule that maps query and
  reference labels to boolean (N, M) positive and negative masks. Pairs that are neither are
  ignored, so a rule can leave out pairs it cannot judge (e.g. other-alphabet pairs when only
  the characters within an alphabet are compared).
* A :class:`PairRelation`: the (N, M) positive and negative masks themselves, precomputed.

Integer labels are the relation ``same_label``; giving them as a :class:`LabelRelation` with
that rule gives exactly the integer-label result. ``evaluate`` takes the same relation
(``label_relation=``), so training and evaluation judge pairs alike.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

PairRule = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]
"""Maps (N, ...) query labels and (M, ...) reference labels to boolean (N, M) masks of the
positive and of the negative pairs (disjoint; a pair in neither is ignored)."""


def same_label(query_labels: Tensor, ref_labels: Tensor) -> tuple[Tensor, Tensor]:
    """Integer labels' rule: positives share the label, negatives do not."""
    same = query_labels[:, None] == ref_labels[None, :]
    return same, ~same


def shared_class(query_labels: Tensor, ref_labels: Tensor) -> tuple[Tensor, Tensor]:
    """Multi-hot labels' rule: positives share at least one class, negatives none.

    Args:
        query_labels: (N, C) 0/1 or bool.
        ref_labels: (M, C) 0/1 or bool.
    """
    shared = query_labels.float() @ ref_labels.float().T
    return shared > 0, shared == 0


@dataclass(frozen=True)
class LabelRelation:
    """Per-item labels and the rule that compares them.

    Attributes:
        labels: (N, ...) labels, one row per item (e.g. (N, 2) alphabet and character).
        rule: The :data:`PairRule`.
    """

    labels: Tensor
    rule: PairRule

    def __post_init__(self) -> None:
        if not isinstance(self.labels, Tensor) or self.labels.ndim < 1:
            raise ValueError("LabelRelation.labels must be a tensor with one row per item")
        if not callable(self.rule):
            raise ValueError(f"LabelRelation.rule must be callable, got {self.rule!r}")

    def __len__(self) -> int:
        return self.labels.shape[0]

    def masks(self, ref: LabelRelation | None) -> tuple[Tensor, Tensor]:
        """The rule's (N, M) masks against ``ref`` (the items themselves when None), checked."""
        ref_labels = self.labels if ref is None else ref.labels
        pos, neg = self.rule(self.labels, ref_labels)
        return checked_masks(pos, neg, (len(self), ref_labels.shape[0]), "the rule's masks")


@dataclass(frozen=True)
class PairRelation:
    """Precomputed positive and negative pairs.

    Attributes:
        pos: (N, M) boolean: the positive pairs (M = N without a reference set).
        neg: (N, M) boolean: the negative pairs; disjoint from ``pos``.
    """

    pos: Tensor
    neg: Tensor

    def __post_init__(self) -> None:
        if not isinstance(self.pos, Tensor) or self.pos.ndim != 2:
            raise ValueError("PairRelation.pos must be a 2-D (N, M) tensor")
        checked_masks(self.pos, self.neg, tuple(self.pos.shape), "PairRelation")

    def __len__(self) -> int:
        return self.pos.shape[0]


Relation = LabelRelation | PairRelation


def checked_masks(
    pos: object, neg: object, shape: tuple[int, ...], what: str
) -> tuple[Tensor, Tensor]:
    """``pos`` and ``neg`` if they are disjoint boolean masks of ``shape``.

    Raises:
        ValueError: Naming ``what`` and the problem.
    """
    for name, mask in (("positive", pos), ("negative", neg)):
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
            raise ValueError(f"{what}: the {name} mask must be a boolean tensor")
        if tuple(mask.shape) != shape:
            raise ValueError(
                f"{what}: the {name} mask has shape {tuple(mask.shape)}, expected {shape}"
            )
    assert isinstance(pos, Tensor) and isinstance(neg, Tensor)
    if bool((pos & neg).any()):
        raise ValueError(f"{what}: a pair is marked both positive and negative")
    return pos, neg


def multi_hot_relation(labels: Tensor, name: str = "labels") -> LabelRelation:
    """(N, C) multi-hot labels as a :class:`LabelRelation` with :func:`shared_class`.

    Raises:
        ValueError: If ``labels`` holds values other than 0 and 1.
    """
    if labels.dtype != torch.bool and not bool(((labels == 0) | (labels == 1)).all()):
        raise ValueError(
            f"2-D {name} are read as multi-hot (N, num_classes) and must hold only 0 and 1; "
            "for other label structures pass a dmlkit.relations.LabelRelation"
        )
    return LabelRelation(labels, shared_class)


def as_relation(labels: object, name: str = "labels") -> Relation | None:
    """The relation ``labels`` stands for, or None for plain 1-D labels (and anything else,
    which the integer-label checks then judge)."""
    if isinstance(labels, LabelRelation | PairRelation):
        return labels
    if isinstance(labels, Tensor) and labels.ndim == 2:
        if labels.shape[1] == 1:
            raise ValueError(
                f"{name} has shape {tuple(labels.shape)}: squeeze it to one label per item "
                "(an (N, C) tensor with C > 1 is read as multi-hot labels)"
            )
        return multi_hot_relation(labels, name)
    return None


def relation_masks(
    labels: Relation, ref_labels: object, n_refs: int | None, device: torch.device
) -> tuple[Tensor, Tensor]:
    """The (N, M) positive and negative masks of a call's relation, on ``device``.

    Args:
        labels: The call's relation (:func:`as_relation` of its labels).
        ref_labels: The reference set's labels: None without ``ref_emb``; with it, a relation
            of the same kind (multi-hot labels, or a :class:`LabelRelation` with the same
            rule); never given with a :class:`PairRelation`, which covers the reference set.
        n_refs: Rows of ``ref_emb``, or None without one.
        device: The embeddings' device.

    Raises:
        ValueError: If the reference labels do not match the relation.
    """
    if isinstance(labels, PairRelation):
        if ref_labels is not None:
            raise ValueError("a PairRelation already covers the reference set: omit ref_labels")
        expected = n_refs if n_refs is not None else len(labels)
        if labels.pos.shape[1] != expected:
            raise ValueError(
                f"the PairRelation has {labels.pos.shape[1]} columns but there are {expected} "
                "references"
            )
        return labels.pos.to(device), labels.neg.to(device)
    ref: LabelRelation | None = None
    if n_refs is not None:
        ref_relation = as_relation(ref_labels, "ref_labels")
        if not isinstance(ref_relation, LabelRelation) or ref_relation.rule is not labels.rule:
            raise ValueError(
                "ref_labels must be given in the same form as labels (multi-hot, or a "
                "LabelRelation with the same rule)"
            )
        if ref_relation.labels.shape[1:] != labels.labels.shape[1:]:
            raise ValueError(
                f"ref_labels rows have shape {tuple(ref_relation.labels.shape[1:])} but labels "
                f"rows have {tuple(labels.labels.shape[1:])}; they must match"
            )
        if len(ref_relation) != n_refs:
            raise ValueError(
                f"ref_labels has {len(ref_relation)} rows but ref_emb has {n_refs}; they must match"
            )
        ref = ref_relation
    elif ref_labels is not None:
        raise ValueError("ref_labels was given without ref_emb")
    pos, neg = labels.masks(ref)
    return pos.to(device), neg.to(device)


__all__ = [
    "LabelRelation",
    "PairRelation",
    "PairRule",
    "Relation",
    "as_relation",
    "checked_masks",
    "multi_hot_relation",
    "relation_masks",
    "same_label",
    "shared_class",
]
