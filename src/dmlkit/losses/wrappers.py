"""Losses built from other losses: :class:`SelfSupervisedLoss` (two views of each input as a
positive pair) and :class:`MultipleLosses` (a weighted sum of losses, each with its own miner).

They take any loss with PML's call contract: every dmlkit loss, a user's subclass of
:class:`~dmlkit.losses.BaseMetricLossFunction`, or another module called the same way (PML's
own included).

Neither is in the loss registry. The registry's losses are built from their options alone and
called as ``loss(embeddings, labels, indices_tuple)`` by the trainer and by the tests every
registered loss must pass; :class:`SelfSupervisedLoss` is called with two views instead, and
both need the losses they wrap. A config may still name them by import path
(``dmlkit.losses:SelfSupervisedLoss``, whose ``loss`` option takes a nested spec).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..miners import BaseMiner
from ..validation import check_embeddings, check_finite_number
from .base import BaseMetricLossFunction
from .self_supervised import VICRegLoss

LossModule = BaseMetricLossFunction | nn.Module
"""A loss with PML's call contract: a dmlkit loss, or any module called the same way."""

MinerModule = BaseMiner | nn.Module
"""A miner with PML's call contract: a dmlkit miner, or any module called the same way."""


class SelfSupervisedLoss(nn.Module):
    """A loss of two views of each input (PML's ``SelfSupervisedLoss``): ``embeddings[i]`` and
    ``ref_emb[i]`` form a positive pair, every other combination a negative pair.

    Called as ``loss(embeddings, ref_emb)``. With ``symmetric`` both views are anchors: the
    wrapped loss gets the 2N rows ``[embeddings; ref_emb]`` labelled ``0 … N−1`` twice.
    Otherwise anchors come from ``embeddings`` only, positives and negatives from ``ref_emb``:
    it gets ``loss(embeddings, labels, ref_emb=ref_emb, ref_labels=labels)`` with labels
    ``0 … N−1``.

    Differences from PML, deliberate: PML accepts only the thirteen losses it lists, by class
    name (so no subclass of them); any loss is accepted here, except those whose labels must be
    class indices (a loss with per-class parameters: ``num_classes`` set), which the item
    identities used as labels here are not, and :class:`VICRegLoss`, which takes the two views
    itself. ``symmetric=False`` needs a loss that accepts ``ref_emb``. The two views must be
    finite (N, D) tensors of one shape, dtype and device.

    Args:
        loss: The wrapped loss.
        symmetric: Use both views as anchors (True), or ``embeddings`` only.
    """

    def __init__(self, loss: LossModule, symmetric: bool = True) -> None:
        super().__init__()
        if not isinstance(loss, nn.Module):
            raise ValueError(f"loss must be a loss module, got {type(loss).__name__}")
        name = type(loss).__name__
        if isinstance(loss, VICRegLoss):
            raise ValueError(
                "SelfSupervisedLoss does not wrap VICRegLoss, which takes the two views itself: "
                "call VICRegLoss()(embeddings, ref_emb=ref_emb)"
            )
        if getattr(loss, "num_classes", None) is not None:
            raise ValueError(
                f"SelfSupervisedLoss cannot wrap {name} with per-class parameters "
                f"(num_classes={loss.num_classes}): its labels would be item indices, not classes"
            )
        if not isinstance(symmetric, bool):
            raise ValueError(f"symmetric must be a bool, got {symmetric!r}")
        if not symmetric and not getattr(loss, "supports_ref", True):
            raise ValueError(
                f"SelfSupervisedLoss(symmetric=False) passes ref_emb, which {name} does not "
                "support; use symmetric=True"
            )
        self.loss = loss
        self.symmetric = symmetric

    def forward(self, embeddings: Tensor, ref_emb: Tensor) -> Tensor:
        """Computes the wrapped loss on the two views.

        Args:
            embeddings: (N, D) first views.
            ref_emb: (N, D) second views, row ``i`` a view of the same input as
                ``embeddings[i]``.

        Returns:
            The wrapped loss's value.
        """
        emb = check_embeddings(embeddings)
        ref = check_embeddings(ref_emb, "ref_emb")
        if ref.shape != emb.shape:
            raise ValueError(
                f"ref_emb has shape {tuple(ref.shape)} but embeddings have {tuple(emb.shape)}: "
                "SelfSupervisedLoss pairs embeddings[i] with ref_emb[i]"
            )
        if ref.dtype != emb.dtype or ref.device != emb.device:
            raise ValueError(
                f"ref_emb ({ref.dtype}, {ref.device}) must match embeddings ({emb.dtype}, "
                f"{emb.device})"
            )
        labels = torch.arange(emb.shape[0], device=emb.device)
        if self.symmetric:
            result: Tensor = self.loss(torch.cat((emb, ref)), labels.repeat(2))
        else:
            result = self.loss(emb, labels, ref_emb=ref, ref_labels=labels)
        return result

    def extra_repr(self) -> str:
        return f"symmetric={self.symmetric}"


class MultipleLosses(nn.Module):
    """A weighted sum of losses (PML's ``MultipleLosses``), each optionally fed by its own
    miner.

    ``losses`` is a list (or tuple) or a dict of losses; ``miners`` and ``weights``, when given,
    take the same form. A list of miners has one entry per loss, None where a loss has no miner;
    a dict of miners names some of the losses' keys. A list of weights has one per loss; a dict
    of weights names every loss's key. The losses are summed in their order (the dict's order),
    each as ``weight · loss(embeddings, labels, indices_tuple, ref_emb, ref_labels)``, where
    ``indices_tuple`` is the loss's miner's output when it has one, else the call's.

    With any miner slot given (even a list of Nones, as in PML) the call's ``indices_tuple``
    must be None: losses without a miner then use every pair or triplet.

    Differences from PML, deliberate: bad arguments raise ``ValueError`` naming the problem
    (PML: ``assert``); no loss at all is refused (PML returns the integer 0); a None in a dict
    of miners means no miner, as in a list (PML would call None). Beyond PML's call, ``ref_emb``,
    ``ref_labels`` and dmlkit's ``anchor_in_ref``, those given, reach every loss and miner as
    keywords, so this sum can stand wherever one loss does.

    Attributes:
        is_dict: Whether the losses were given as a dict.

    Args:
        losses: The losses, as a list or a dict.
        miners: The miners, in the same form, or None.
        weights: The losses' weights (finite numbers), in the same form; None weighs each 1.
    """

    def __init__(
        self,
        losses: Sequence[LossModule] | Mapping[str, LossModule],
        miners: Sequence[MinerModule | None] | Mapping[str, MinerModule | None] | None = None,
        weights: Sequence[float] | Mapping[str, float] | None = None,
    ) -> None:
        super().__init__()
        self.is_dict = isinstance(losses, Mapping)
        self.losses: nn.ModuleDict | nn.ModuleList
        self.miners: nn.ModuleDict | nn.ModuleList | None = None
        self.weights: list[float] | dict[str, float]
        if isinstance(losses, Mapping):
            keys = list(losses)
            self.losses = nn.ModuleDict(
                {key: _module(loss, f"losses[{key!r}]", "loss") for key, loss in losses.items()}
            )
            if miners is not None:
                # A None slot is a loss without a miner; torch keeps None entries.
                self.miners = nn.ModuleDict(_miner_dict(miners, keys))  # type: ignore[arg-type]
            self.weights = (
                dict.fromkeys(keys, 1.0) if weights is None else _weight_dict(weights, keys)
            )
        else:
            items = _as_list(losses, "losses", "a list, tuple or dict")
            self.losses = nn.ModuleList(
                [_module(loss, f"losses[{i}]", "loss") for i, loss in enumerate(items)]
            )
            if miners is not None:
                self.miners = nn.ModuleList(_miner_list(miners, len(items)))  # type: ignore[arg-type]
            self.weights = (
                [1.0] * len(items) if weights is None else _weight_list(weights, len(items))
            )
        if not len(self.losses):
            raise ValueError("MultipleLosses needs at least one loss")

    def forward(
        self,
        embeddings: Tensor,
        labels: Tensor | None = None,
        indices_tuple: tuple[Tensor, ...] | None = None,
        ref_emb: Tensor | None = None,
        ref_labels: Tensor | None = None,
        anchor_in_ref: Tensor | None = None,
    ) -> Tensor:
        """The weighted sum of the losses; the arguments are every loss's (see
        :meth:`BaseMetricLossFunction.forward`), and go to the miners too.

        Raises:
            ValueError: ``indices_tuple`` given while miners are (they mine their own), or what
                a loss or miner raises.
        """
        if self.miners is not None and len(self.miners) and indices_tuple is not None:
            raise ValueError(
                "MultipleLosses was given miners, which mine each loss's tuples: pass "
                "indices_tuple=None"
            )
        # Only the reference arguments given are passed on: a module with PML's narrower call
        # (a user's loss taking (embeddings, labels, indices_tuple)) is called as PML calls it.
        reference = {
            name: value
            for name, value in (
                ("ref_emb", ref_emb),
                ("ref_labels", ref_labels),
                ("anchor_in_ref", anchor_in_ref),
            )
            if value is not None
        }
        total: Tensor | None = None
        for loss, miner, weight in self._terms():
            mined = indices_tuple if miner is None else miner(embeddings, labels, **reference)
            term = loss(embeddings, labels, mined, **reference) * weight
            total = term if total is None else total + term
        assert total is not None  # at least one loss, checked at construction
        return total

    def extra_repr(self) -> str:
        return f"weights={self.weights}"

    def _terms(self) -> list[tuple[nn.Module, nn.Module | None, float]]:
        """(loss, its miner or None, its weight), in the losses' order."""
        if isinstance(self.losses, nn.ModuleDict):
            assert isinstance(self.weights, dict)
            miners = {} if self.miners is None else dict(self.miners.named_children())
            return [(loss, miners.get(key), self.weights[key]) for key, loss in self.losses.items()]
        assert isinstance(self.weights, list)
        slots: list[nn.Module | None] = [None] * len(self.losses)
        if isinstance(self.miners, nn.ModuleList):
            slots = [miner for miner in self.miners]
        return list(zip(self.losses, slots, self.weights, strict=True))


def _miner_dict(miners: object, keys: list[str]) -> dict[str, nn.Module | None]:
    mapping = _as_dict(miners, "miners")
    unknown = [key for key in mapping if key not in keys]
    if unknown:
        raise ValueError(
            f"miners has key {unknown[0]!r}, which names no loss; the losses are {keys}"
        )
    return {
        key: None if miner is None else _module(miner, f"miners[{key!r}]", "miner")
        for key, miner in mapping.items()
    }


def _miner_list(miners: object, count: int) -> list[nn.Module | None]:
    return [
        None if miner is None else _module(miner, f"miners[{i}]", "miner")
        for i, miner in enumerate(_one_per_loss(miners, count, "miners"))
    ]


def _weight_dict(weights: object, keys: list[str]) -> dict[str, float]:
    mapping = _as_dict(weights, "weights")
    if set(mapping) != set(keys):
        raise ValueError(
            f"weights must have exactly the losses' keys {sorted(keys)}, got {sorted(mapping)}"
        )
    return {key: check_finite_number(mapping[key], f"weights[{key!r}]") for key in keys}


def _weight_list(weights: object, count: int) -> list[float]:
    return [
        check_finite_number(w, f"weights[{i}]")
        for i, w in enumerate(_one_per_loss(weights, count, "weights"))
    ]


def _one_per_loss(values: object, count: int, name: str) -> list[Any]:
    items = _as_list(values, name)
    if len(items) != count:
        raise ValueError(f"{name} must have one entry per loss ({count}), got {len(items)}")
    return items


def _module(value: object, where: str, kind: str) -> nn.Module:
    if not isinstance(value, nn.Module):
        raise ValueError(f"{where} must be a {kind} module, got {type(value).__name__}")
    return value


def _as_list(
    values: object, name: str, form: str = "a list or tuple, as the losses are"
) -> list[Any]:
    if not isinstance(values, list | tuple):
        raise ValueError(f"{name} must be {form}, got {type(values).__name__}")
    return list(values)


def _as_dict(values: object, name: str) -> Mapping[str, Any]:
    if not isinstance(values, Mapping):
        raise ValueError(f"{name} must be a dict, as the losses are, got {type(values).__name__}")
    return values


__all__ = ["MultipleLosses", "SelfSupervisedLoss"]
