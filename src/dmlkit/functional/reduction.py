"""Reducers: how per-element losses become one scalar.

Every reducer answers two calls. dmlkit's losses call ``reducer(losses, weights, divisor=...)``
with dense per-element values and weights (a pair that a mined tuple repeats counts as many
times); PML's call ``reducer(loss_dict, embeddings, labels)`` reduces each sub-loss of a
``loss_dict`` by its ``reduction_type`` and sums them, as PML's reducers do.

:class:`Reducer` and its subclasses are a selection rule (which elements count) and a choice of
dividing by their count or not, so their dmlkit call is a weighted sum: no index lists, no
Python loops, and the losses' fused kernels need only a total and a count from them. Any other
reducer (:class:`PerAnchorReducer`, a PML-style subclass of :class:`BaseReducer` overriding
``element_reduction``) sees the selected elements themselves.

An empty selection gives a zero that keeps the autograd graph, never a Python number or NaN.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, cast, overload

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

ValueAndSlope = Callable[[Tensor], tuple[Tensor, Tensor]]

LossDict = Mapping[str, Mapping[str, Any]]
"""PML's ``loss_dict``: sub-loss name -> ``{"losses", "indices", "reduction_type"}`` (and
``"divisor"`` for :class:`DivisorReducer`)."""

REDUCTION_TYPES = ("element", "pos_pair", "neg_pair", "triplet", "already_reduced")
"""The ``reduction_type`` values of a PML ``loss_dict`` entry."""

_INDEX_COUNTS = {"pos_pair": 2, "neg_pair": 2, "triplet": 3}


_CALL_LABELS: ContextVar[Tensor | None] = ContextVar("reducer_call_labels", default=None)


@contextmanager
def labels_for_reducers(labels: Tensor | None) -> Iterator[None]:
    """Within this block, dmlkit's reducer call gives ``labels`` (the loss call's, indexed by
    each element's row) to a reducer's ``element_reduction``, as PML's call gives its labels:
    what :class:`ClassWeightedReducer` and PML-style reducers that weigh by class read. The
    losses' ``forward`` opens it around their computation."""
    token = _CALL_LABELS.set(labels)
    try:
        yield
    finally:
        _CALL_LABELS.reset(token)


@dataclass(frozen=True, eq=False)
class BaseReducer:
    """Base of every reducer: both call contracts, and PML's hooks for custom reducers.

    A PML-style reducer subclasses this and overrides ``element_reduction`` (and, for PML's
    pair and triplet losses, ``pos_pair_reduction``, ``neg_pair_reduction``,
    ``triplet_reduction``), each taking ``(losses, loss_indices, embeddings, labels)``, as in
    PML. PML's call reaches them by the entry's ``reduction_type``. dmlkit's call carries no
    reduction type, indices, embeddings or labels: it reaches ``element_reduction`` with the
    selected elements (repeated by their integer weights), the row of each (its anchor or item
    for a 2-D matrix, its position for a vector) as indices, None for the embeddings and the
    loss call's labels (:func:`labels_for_reducers`); an empty selection gives a zero without
    calling it.

    Unlike PML's, reducers are frozen dataclasses, not torch modules, and record no statistics.
    """

    @overload
    def __call__(
        self, losses: Tensor, weights: Tensor | None = None, divisor: Tensor | int | None = None
    ) -> Tensor: ...

    @overload
    def __call__(
        self, loss_dict: LossDict, embeddings: Tensor, labels: Tensor | None = None
    ) -> Any: ...

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """dmlkit's call ``(losses, weights=None, divisor=None)`` (see :meth:`reduce`) or PML's
        ``(loss_dict, embeddings, labels=None)`` (see :meth:`reduce_loss_dict`), told apart by
        the first argument: a tensor or a mapping."""
        first = args[0] if args else kwargs.get("loss_dict", kwargs.get("losses"))
        if isinstance(first, Mapping):
            return self.reduce_loss_dict(*args, **kwargs)
        return self.reduce(*args, **kwargs)

    @property
    def fusable(self) -> bool:
        """Whether the reduction is a weighted total over a count (:class:`Reducer`'s own rule),
        which is all that the losses' fused kernels compute; other reducers get the values."""
        return False

    def reduce(
        self, losses: Tensor, weights: Tensor | None = None, divisor: Tensor | int | None = None
    ) -> Tensor:
        """dmlkit's call: reduces ``losses`` (any shape) with optional same-shaped ``weights``.

        Args:
            losses: Per-element losses; entries with zero weight must be finite.
            weights: Bool mask or float counts; None weighs every element once.
            divisor: The count a loss divides these losses by under PML's ``DivisorReducer``
                (ProxyAnchorLoss's number of proxies with a positive, say); only
                :class:`DivisorReducer` reads it, every other reducer ignores it, as in PML.

        Returns:
            A scalar tensor attached to the graph of ``losses`` (here: ``element_reduction`` of
            the selected elements).
        """
        values, rows = selected_elements(losses, weights)
        if values.numel() == 0:
            return losses.sum() * 0.0
        return self.element_reduction(values, rows, None, _CALL_LABELS.get())

    def reduce_loss_dict(
        self, loss_dict: LossDict, embeddings: Tensor, labels: Tensor | None = None
    ) -> Tensor:
        """PML's call: the sum of the ``loss_dict``'s sub-losses, each reduced by its
        ``reduction_type``.

        One sub-loss is reduced as PML's ``BaseReducer`` reduces it (its value returned as is);
        several (or none) as a PML loss reduces them, each by this reducer, summed in the
        embeddings' dtype (PML refuses them in a bare reducer call).

        Args:
            loss_dict: Sub-loss name -> ``{"losses", "indices", "reduction_type"}``; ``losses``
                is a tensor, or the number 0 for a sub-loss that is zero.
            embeddings: The batch's (N, D) embeddings (zero losses are attached to them).
            labels: The batch's (N,) labels; read by :class:`ClassWeightedReducer`.

        Returns:
            The reduced loss.
        """
        if len(loss_dict) != 1:
            return MultipleReducers({}, default_reducer=self).reduce_loss_dict(
                loss_dict, embeddings, labels
            )
        ((name, loss_info),) = loss_dict.items()
        losses, loss_indices, reduction_type, kwargs = self.unpack_loss_info(
            _checked_loss_info(name, loss_info)
        )
        return self.reduce_the_loss(
            losses, loss_indices, reduction_type, kwargs, embeddings, labels
        )

    def unpack_loss_info(
        self, loss_info: Mapping[str, Any]
    ) -> tuple[Any, Any, str, dict[str, Any]]:
        """PML's hook: ``(losses, indices, reduction_type, kwargs)`` of one sub-loss; the
        kwargs go to its reduction method."""
        return loss_info["losses"], loss_info["indices"], loss_info["reduction_type"], {}

    def reduce_the_loss(
        self,
        losses: Any,
        loss_indices: Any,
        reduction_type: str,
        kwargs: Mapping[str, Any],
        embeddings: Tensor,
        labels: Tensor | None,
    ) -> Tensor:
        """PML's hook: one sub-loss reduced by the method its ``reduction_type`` names, or
        :meth:`zero_loss` for a zero given as a number."""
        if not isinstance(losses, Tensor):
            if isinstance(losses, int | float) and losses == 0:
                return self.zero_loss(embeddings)
            raise ValueError(f"losses must be a tensor or the number 0, got {losses!r}")
        _check_sizes(losses, loss_indices, reduction_type)
        method = getattr(self, f"{reduction_type}_reduction")
        result: Tensor = method(losses, loss_indices, embeddings, labels, **kwargs)
        return result

    def zero_loss(self, embeddings: Tensor) -> Tensor:
        """A zero attached to the embeddings' graph."""
        return (embeddings * 0).sum()

    def already_reduced_reduction(
        self, losses: Tensor, loss_indices: Any, embeddings: Tensor, labels: Tensor | None
    ) -> Tensor:
        """A sub-loss its loss reduced itself: returned as is."""
        if losses.numel() != 1 or losses.ndim > 1:
            raise ValueError(
                "an 'already_reduced' sub-loss must be a scalar or hold one value, got shape "
                f"{tuple(losses.shape)}"
            )
        return losses

    def element_reduction(
        self, losses: Tensor, loss_indices: Any, embeddings: Tensor | None, labels: Tensor | None
    ) -> Tensor:
        """Reduces per-element losses (``loss_indices``: each one's element)."""
        raise NotImplementedError(f"{type(self).__name__} does not reduce 'element' losses")

    def pos_pair_reduction(
        self, losses: Tensor, loss_indices: Any, embeddings: Tensor, labels: Tensor | None
    ) -> Tensor:
        """Reduces positive-pair losses (``loss_indices``: anchors, positives)."""
        raise NotImplementedError(f"{type(self).__name__} does not reduce 'pos_pair' losses")

    def neg_pair_reduction(
        self, losses: Tensor, loss_indices: Any, embeddings: Tensor, labels: Tensor | None
    ) -> Tensor:
        """Reduces negative-pair losses (``loss_indices``: anchors, negatives)."""
        raise NotImplementedError(f"{type(self).__name__} does not reduce 'neg_pair' losses")

    def triplet_reduction(
        self, losses: Tensor, loss_indices: Any, embeddings: Tensor, labels: Tensor | None
    ) -> Tensor:
        """Reduces triplet losses (``loss_indices``: anchors, positives, negatives)."""
        raise NotImplementedError(f"{type(self).__name__} does not reduce 'triplet' losses")


def _checked_loss_info(name: str, loss_info: Any) -> Mapping[str, Any]:
    """A ``loss_dict`` entry with its keys and reduction type checked."""
    if not isinstance(loss_info, Mapping):
        raise ValueError(f"loss_dict[{name!r}] must be a mapping, got {type(loss_info).__name__}")
    missing = [key for key in ("losses", "indices", "reduction_type") if key not in loss_info]
    if missing:
        raise ValueError(f"loss_dict[{name!r}] lacks {', '.join(map(repr, missing))}")
    if loss_info["reduction_type"] not in REDUCTION_TYPES:
        raise ValueError(
            f"loss_dict[{name!r}]['reduction_type'] must be one of {', '.join(REDUCTION_TYPES)}, "
            f"got {loss_info['reduction_type']!r}"
        )
    return loss_info


def _check_sizes(losses: Tensor, loss_indices: Any, reduction_type: str) -> None:
    """PML's size assertions, as ValueErrors: one index per loss, and per tuple member."""
    if reduction_type == "already_reduced":
        return
    if losses.ndim == 0:
        raise ValueError(f"{reduction_type!r} losses must be a vector, got a scalar")
    if reduction_type == "element":
        if not isinstance(loss_indices, Tensor) or loss_indices.ndim != 1:
            raise ValueError("'element' indices must be a 1-D tensor")
        members: Sequence[Tensor] = (loss_indices,)
    else:
        count = _INDEX_COUNTS[reduction_type]
        if not isinstance(loss_indices, list | tuple) or len(loss_indices) != count:
            raise ValueError(f"{reduction_type!r} indices must be a tuple of {count} tensors")
        if not all(isinstance(x, Tensor) and x.ndim == 1 for x in loss_indices):
            raise ValueError(f"{reduction_type!r} indices must be 1-D tensors")
        members = loss_indices
    if any(len(x) != len(losses) for x in members):
        raise ValueError(
            f"{reduction_type!r} indices must have one entry per loss ({len(losses)}), got "
            f"{[len(x) for x in members]}"
        )


def selected_elements(losses: Tensor, weights: Tensor | None) -> tuple[Tensor, Tensor]:
    """The elements a dmlkit call selects, each repeated by its weight, and the row of each.

    Args:
        losses: Per-element losses, any shape.
        weights: Bool mask or non-negative integer counts shaped like ``losses``, or None.

    Returns:
        The selected values (1-D, differentiable) and each one's index along the first
        dimension of ``losses`` (0 for a scalar).
    """
    flat = losses.reshape(-1)
    per_row = math.prod(losses.shape[1:])
    rows = torch.arange(flat.numel(), device=losses.device) // max(per_row, 1)
    if weights is None:
        return flat, rows
    if weights.shape != losses.shape:
        raise ValueError(
            f"weights must be shaped like losses {tuple(losses.shape)}, got {tuple(weights.shape)}"
        )
    w = weights.reshape(-1)
    if w.dtype == torch.bool:
        return flat[w], rows[w]
    if bool((w < 0).any()) or not torch.equal(w, w.round()):
        raise ValueError(
            "a reducer that reduces the elements themselves needs weights that are a bool "
            "mask or integer counts, got fractional or negative weights"
        )
    counts = w.long()
    return flat.repeat_interleave(counts), rows.repeat_interleave(counts)


@dataclass(frozen=True)
class Reducer(BaseReducer):
    """Weighted reducers: averages every weighted element (PML's ``MeanReducer``).

    A subclass changes which elements count (:meth:`keep`) or how the total becomes the value
    (:meth:`finish`); its reduction is then still a weighted total over a count, which the
    losses' fused kernels compute blockwise. A subclass overriding ``element_reduction`` (PML's
    way) instead reduces the elements itself, on every path (see :attr:`fusable`).

    Attributes:
        average: Divide by the selected weight (True) or return the plain sum (False);
            keyword-only, so that a subclass's own fields take PML's positions
            (``ThresholdReducer(0.1, 0.5)`` is ``low=0.1, high=0.5``, as in PML).
    """

    average: bool = field(default=True, kw_only=True)

    @property
    def fusable(self) -> bool:
        # PML's custom reducers override element_reduction: their rule is theirs, not a total.
        return type(self).element_reduction is Reducer.element_reduction

    def keep(self, losses: Tensor) -> Tensor | None:
        """0/1 weights (in the losses' dtype) of the elements that count, or None for all."""
        return None

    def reduce(
        self, losses: Tensor, weights: Tensor | None = None, divisor: Tensor | int | None = None
    ) -> Tensor:
        """dmlkit's call, as :meth:`BaseReducer.reduce`: the weighted total of the selected
        elements, through :meth:`finish`."""
        if not self.fusable:
            return super().reduce(losses, weights, divisor)
        return self._weighted(losses, weights, divisor)

    def _weighted(
        self, losses: Tensor, weights: Tensor | None, divisor: Tensor | int | None
    ) -> Tensor:
        with torch.no_grad():
            w = self.effective_weights(losses, weights)
        if w is None:
            total = losses.sum()
            count = torch.full((), float(losses.numel()), device=losses.device)
        else:
            # Multiplying by the weights is one fast pass; losses are finite everywhere by
            # construction, so unselected entries contribute exact zeros.
            total, count = (losses * w).sum(), w.sum()
        return self.finish(total, count, divisor)

    def element_reduction(
        self,
        losses: Tensor,
        loss_indices: Any,
        embeddings: Tensor | None,
        labels: Tensor | None,
        divisor: Tensor | int | None = None,
    ) -> Tensor:
        """PML's call of an ``"element"`` sub-loss: the weighted rule, every loss weighing 1."""
        return self._weighted(losses, None, divisor)

    def pos_pair_reduction(
        self,
        losses: Tensor,
        loss_indices: Any,
        embeddings: Tensor,
        labels: Tensor | None,
        **kwargs: Any,
    ) -> Tensor:
        """As ``element_reduction`` (PML: pair and triplet losses are reduced as elements)."""
        return self.element_reduction(losses, loss_indices, embeddings, labels, **kwargs)

    def neg_pair_reduction(
        self,
        losses: Tensor,
        loss_indices: Any,
        embeddings: Tensor,
        labels: Tensor | None,
        **kwargs: Any,
    ) -> Tensor:
        """As ``element_reduction``."""
        return self.element_reduction(losses, loss_indices, embeddings, labels, **kwargs)

    def triplet_reduction(
        self,
        losses: Tensor,
        loss_indices: Any,
        embeddings: Tensor,
        labels: Tensor | None,
        **kwargs: Any,
    ) -> Tensor:
        """As ``element_reduction``."""
        return self.element_reduction(losses, loss_indices, embeddings, labels, **kwargs)

    def effective_weights(self, losses: Tensor, weights: Tensor | None) -> Tensor | None:
        """The given weights times this reducer's selection, in the losses' dtype."""
        kept = self.keep(losses)
        if weights is None:
            return kept
        w = weights.to(losses.dtype)
        return w if kept is None else kept.mul_(w)

    def reduce_elementwise(self, x: Tensor, fn: ValueAndSlope, weights: Tensor | None) -> Tensor:
        """Reduces ``fn(x)`` elementwise in a fused kernel (first-order gradients only).

        Equivalent to ``self(fn(x)[0], weights)``, but computed in row blocks without autograd:
        forward keeps no intermediate, backward recomputes the slopes block by block.

        Args:
            x: Input of any shape (typically the (N, M) distance matrix).
            fn: Returns ``(f(x), f'(x))``, both finite everywhere, as new tensors.
            weights: Bool mask or float counts of the same shape, or None.

        Returns:
            Scalar tensor attached to ``x``'s graph.
        """
        return reduce_elementwise_terms(x, [ElementwiseTerm(fn, weights, self)])

    def finish(self, total: Tensor, count: Tensor, divisor: Tensor | int | None = None) -> Tensor:
        """The reduced value from the selected elements' weighted ``total`` and their ``count``.

        Every path of a reducer ends here (the plain call, the fused elementwise kernels, the
        blockwise triplet sums), so a reducer's rule holds on all of them.

        Args:
            total: The weighted sum of the selected losses.
            count: The selected weight.
            divisor: The loss's own count, as for :meth:`reduce`; read only by
                :class:`DivisorReducer`.

        Returns:
            ``total / count`` when averaging (``total``, a zero, for an empty selection), else
            ``total``.
        """
        if not self.average:
            return total
        return total / count.clamp_min(1.0)


@dataclass(frozen=True)
class MeanReducer(Reducer):
    """Mean over all weighted elements."""


@dataclass(frozen=True)
class SumReducer(Reducer):
    """Sum over all weighted elements."""

    average: bool = field(default=False, kw_only=True)


@dataclass(frozen=True)
class DivisorReducer(Reducer):
    """The weighted sum divided by a count the loss supplies (PML's ``DivisorReducer``), or
    zero when that count is zero.

    Only a call given ``divisor`` has that count: any other path (a call without one, the fused
    :meth:`reduce_elementwise` and :func:`reduce_elementwise_terms` kernels, a blockwise sum
    ending in :meth:`finish`) raises ``ValueError`` rather than return the plain sum (PML:
    ``KeyError``). ProxyAnchorLoss, MarginLoss and SparseCentersRegularizer supply a divisor;
    in PML's call, each sub-loss but an ``"already_reduced"`` one has a ``"divisor"`` entry.
    """

    average: bool = field(default=False, kw_only=True)

    def unpack_loss_info(
        self, loss_info: Mapping[str, Any]
    ) -> tuple[Any, Any, str, dict[str, Any]]:
        losses, loss_indices, reduction_type, kwargs = super().unpack_loss_info(loss_info)
        if reduction_type != "already_reduced":
            if "divisor" not in loss_info:
                raise ValueError(
                    "DivisorReducer divides by the sub-loss's 'divisor' entry, and this "
                    f"{reduction_type!r} sub-loss has none"
                )
            kwargs = {"divisor": loss_info["divisor"]}
        return losses, loss_indices, reduction_type, kwargs

    def finish(self, total: Tensor, count: Tensor, divisor: Tensor | int | None = None) -> Tensor:
        if divisor is None:
            raise ValueError(
                "DivisorReducer divides by a count the loss supplies, and this loss supplies none "
                "(ProxyAnchorLoss and MarginLoss do); use another reducer, e.g. SumReducer() "
                "or MeanReducer()"
            )
        if isinstance(divisor, Tensor):
            n = divisor.to(dtype=total.dtype, device=total.device)
        else:
            n = total.new_full((), divisor)
        return torch.where(n > 0, total / torch.where(n > 0, n, 1.0), total * 0.0)


@dataclass(frozen=True)
class ThresholdReducer(Reducer):
    """Mean over the elements whose loss lies strictly inside (low, high).

    As in PML, both bounds default to None and at least one must be given.

    Attributes:
        low: Lower bound (exclusive), or None.
        high: Upper bound (exclusive), or None.
    """

    low: float | None = None
    high: float | None = None

    def __post_init__(self) -> None:
        if self.low is None and self.high is None:
            raise ValueError("ThresholdReducer needs low, high or both")

    def keep(self, losses: Tensor) -> Tensor | None:
        kept = torch.empty_like(losses)
        if self.low is not None:
            torch.gt(losses, self.low, out=kept)
            if self.high is not None:
                kept.mul_(losses < self.high)
        elif self.high is not None:
            torch.lt(losses, self.high, out=kept)
        return kept


@dataclass(frozen=True)
class AvgNonZeroReducer(ThresholdReducer):
    """Mean over the strictly positive elements: the denominator shrinks as training succeeds."""

    low: float | None = 0.0


@dataclass(frozen=True)
class DoNothingReducer(BaseReducer):
    """Leaves the losses unreduced (PML's ``DoNothingReducer``).

    PML's call returns the ``loss_dict`` itself; dmlkit's call returns the selected elements as
    a vector, each repeated by its weight, so a loss of one term returns its unreduced losses
    (a loss summing several terms refuses it).
    """

    def reduce(
        self, losses: Tensor, weights: Tensor | None = None, divisor: Tensor | int | None = None
    ) -> Tensor:
        return selected_elements(losses, weights)[0]

    def reduce_loss_dict(
        self, loss_dict: LossDict, embeddings: Tensor, labels: Tensor | None = None
    ) -> Any:
        return loss_dict


@dataclass(frozen=True)
class ClassWeightedReducer(BaseReducer):
    """Mean of the losses, each times the weight of its class (PML's ``ClassWeightedReducer``):
    an element's own label, a pair's or triplet's anchor's.

    It needs the batch's labels: PML's call gives them, and so does a dmlkit loss's call
    (:func:`labels_for_reducers`), an element's row standing for its anchor or item as PML's
    indices do. Without labels (a call with a label relation) it raises ``ValueError``.

    Attributes:
        weights: One weight per class, indexed by label (a sequence or a 1-D tensor; kept as
            a tuple of floats and cast to the losses' dtype, as PML casts its tensor).
    """

    weights: Sequence[float] | Tensor

    def __post_init__(self) -> None:
        values = torch.as_tensor(self.weights).detach()
        if values.ndim != 1 or values.numel() == 0:
            raise ValueError(
                "ClassWeightedReducer weights must be a non-empty 1-D sequence, one per class; "
                f"got shape {tuple(values.shape)}"
            )
        object.__setattr__(self, "weights", tuple(float(v) for v in values.tolist()))

    def element_reduction(
        self, losses: Tensor, loss_indices: Any, embeddings: Tensor | None, labels: Tensor | None
    ) -> Tensor:
        return self._class_weighted_mean(losses, loss_indices, labels)

    def pos_pair_reduction(
        self, losses: Tensor, loss_indices: Any, embeddings: Tensor, labels: Tensor | None
    ) -> Tensor:
        return self._class_weighted_mean(losses, loss_indices[0], labels)

    def neg_pair_reduction(
        self, losses: Tensor, loss_indices: Any, embeddings: Tensor, labels: Tensor | None
    ) -> Tensor:
        return self._class_weighted_mean(losses, loss_indices[0], labels)

    def triplet_reduction(
        self, losses: Tensor, loss_indices: Any, embeddings: Tensor, labels: Tensor | None
    ) -> Tensor:
        return self._class_weighted_mean(losses, loss_indices[0], labels)

    def _class_weighted_mean(
        self, losses: Tensor, elements: Tensor, labels: Tensor | None
    ) -> Tensor:
        if labels is None:
            raise ValueError(
                "ClassWeightedReducer weighs each loss by its class, so it needs the batch's "
                "integer labels (a loss called with multi-hot labels or a relation has none)"
            )
        classes = labels.to(elements.device)[elements]
        if classes.numel() and (int(classes.min()) < 0 or int(classes.max()) >= len(self.weights)):
            raise ValueError(
                f"ClassWeightedReducer has {len(self.weights)} class weights, but the losses' "
                f"labels span [{int(classes.min())}, {int(classes.max())}]"
            )
        if losses.numel() == 0:
            return losses.sum() * 0.0
        weights = torch.tensor(self.weights, dtype=losses.dtype, device=losses.device)
        return torch.mean(losses * weights[classes.to(losses.device)])


def mean_per_row(x: Tensor, num_per_row: Tensor) -> Tensor:
    """Each row's sum over its number of losses, 0 for a row without any: PML's default
    ``aggregation_func`` of :class:`PerAnchorReducer`.

    Args:
        x: (N, M) losses, 0 where a row has no loss.
        num_per_row: (N,) number of losses in each row.

    Returns:
        (N,) per-row means.
    """
    return torch.where(num_per_row > 0, x.sum(dim=1) / num_per_row.clamp_min(1), 0.0)


@dataclass(frozen=True)
class PerAnchorReducer(BaseReducer):
    """Aggregates pair losses per anchor, then reduces the per-anchor values with another
    reducer (PML's ``PerAnchorReducer``); element losses go to that reducer as they are.

    PML's call gathers ``"pos_pair"`` / ``"neg_pair"`` losses into an N × N table (wider if
    the pairs' second indices need it) of anchors × others; a pair listed twice fills one cell
    (and passes its gradient twice), as in PML, but a loss of +inf counts, where PML's table
    takes +inf for an empty cell. dmlkit's call takes an (N, M) loss matrix's non-zero-weight
    cells as the pairs; vectors (a loss's per-anchor values, or a list of mined pairs, whose
    anchors it cannot see) go to the reducer as elements. Triplet losses are refused, as in PML.

    Attributes:
        reducer: Reduces the N per-anchor values; None for ``MeanReducer()``.
        aggregation_func: ``(table, num_per_row) -> (N,)`` values, from the (N, M) table (0 in
            empty cells) and each row's number of losses.
    """

    reducer: BaseReducer | None = None
    aggregation_func: Callable[[Tensor, Tensor], Tensor] = mean_per_row

    def __post_init__(self) -> None:
        if self.reducer is None:
            object.__setattr__(self, "reducer", MeanReducer())
        if not callable(self.aggregation_func):
            raise ValueError(
                f"aggregation_func must be callable, got {type(self.aggregation_func).__name__}"
            )

    @property
    def inner(self) -> BaseReducer:
        """The reducer of the per-anchor values."""
        assert self.reducer is not None  # set by __post_init__
        return self.reducer

    def reduce(
        self, losses: Tensor, weights: Tensor | None = None, divisor: Tensor | int | None = None
    ) -> Tensor:
        if losses.ndim < 2:
            return self.inner(losses, weights)
        if losses.ndim > 2:
            raise ValueError(
                f"PerAnchorReducer needs an (N, M) pair matrix, got shape {tuple(losses.shape)}"
            )
        if weights is None:
            present = torch.ones_like(losses, dtype=torch.bool)
        elif weights.shape != losses.shape:
            raise ValueError(
                f"weights must be shaped like losses {tuple(losses.shape)}, got "
                f"{tuple(weights.shape)}"
            )
        else:
            present = weights > 0
        table = torch.where(present, losses, 0.0)
        return self.inner(self.aggregation_func(table, present.sum(dim=1)))

    def element_reduction(
        self, losses: Tensor, loss_indices: Any, embeddings: Tensor | None, labels: Tensor | None
    ) -> Tensor:
        entry = {"losses": losses, "indices": loss_indices, "reduction_type": "element"}
        # Only PML's call comes here (dmlkit's goes through reduce), and it gives embeddings.
        result: Tensor = self.inner({"loss": entry}, cast(Tensor, embeddings), labels)
        return result

    def pos_pair_reduction(
        self, losses: Tensor, loss_indices: Any, embeddings: Tensor, labels: Tensor | None
    ) -> Tensor:
        return self._per_anchor(losses, loss_indices, embeddings, labels)

    def neg_pair_reduction(
        self, losses: Tensor, loss_indices: Any, embeddings: Tensor, labels: Tensor | None
    ) -> Tensor:
        return self._per_anchor(losses, loss_indices, embeddings, labels)

    def triplet_reduction(
        self, losses: Tensor, loss_indices: Any, embeddings: Tensor, labels: Tensor | None
    ) -> Tensor:
        raise ValueError("PerAnchorReducer reduces element and pair losses, not triplet losses")

    def _per_anchor(
        self, losses: Tensor, loss_indices: Any, embeddings: Tensor, labels: Tensor | None
    ) -> Tensor:
        n = embeddings.shape[0]
        anchors, others = (i.to(losses.device) for i in loss_indices)
        if anchors.numel() and (int(anchors.min()) < 0 or int(anchors.max()) >= n):
            raise ValueError(f"pair anchors must index the {n} embeddings")
        if others.numel() and int(others.min()) < 0:
            raise ValueError("pair indices must be non-negative")
        width = max(n, int(others.max()) + 1) if others.numel() else n
        cells = (anchors, others)
        table = losses.new_zeros((n, width)).index_put(cells, losses)
        present = torch.zeros((n, width), dtype=torch.bool, device=losses.device)
        present = present.index_put(cells, torch.ones_like(losses, dtype=torch.bool))
        rows = self.aggregation_func(table, present.sum(dim=1))
        entry = {
            "losses": rows,
            "indices": torch.arange(n, device=embeddings.device),
            "reduction_type": "element",
        }
        result: Tensor = self.inner({"loss": entry}, embeddings, labels)
        return result


@dataclass(frozen=True)
class MultipleReducers(BaseReducer):
    """One reducer per named sub-loss, the results summed (PML's ``MultipleReducers``).

    PML's call reduces each sub-loss of the ``loss_dict`` with ``reducers[name]``, or
    ``default_reducer`` for a name not listed, and sums the values in the embeddings' dtype.
    dmlkit's losses name no sub-losses: their call goes to ``default_reducer`` when
    ``reducers`` is empty and raises ``ValueError`` otherwise, never ignoring a mapping.

    Attributes:
        reducers: Sub-loss name -> reducer.
        default_reducer: For the other sub-losses; None for ``MeanReducer()``.
    """

    reducers: Mapping[str, BaseReducer] = field(hash=False)
    default_reducer: BaseReducer | None = None

    def __post_init__(self) -> None:
        reducers = dict(self.reducers)
        for name, reducer in reducers.items():
            if not isinstance(reducer, BaseReducer):
                raise ValueError(
                    f"reducers[{name!r}] must be a reducer, got {type(reducer).__name__}"
                )
        object.__setattr__(self, "reducers", reducers)
        if self.default_reducer is None:
            object.__setattr__(self, "default_reducer", MeanReducer())

    @property
    def default(self) -> BaseReducer:
        """The reducer of the sub-losses ``reducers`` does not name."""
        assert self.default_reducer is not None  # set by __post_init__
        return self.default_reducer

    def reduce(
        self, losses: Tensor, weights: Tensor | None = None, divisor: Tensor | int | None = None
    ) -> Tensor:
        if self.reducers:
            raise ValueError(
                "MultipleReducers picks a reducer by sub-loss name, and dmlkit's losses name no "
                f"sub-losses (reducers names {sorted(self.reducers)}); give the loss the reducer "
                "itself, or call MultipleReducers PML's way, (loss_dict, embeddings, labels)"
            )
        return self.default(losses, weights, divisor)

    def reduce_loss_dict(
        self, loss_dict: LossDict, embeddings: Tensor, labels: Tensor | None = None
    ) -> Tensor:
        values = []
        for name, loss_info in loss_dict.items():
            reducer = self.reducers.get(name, self.default)
            value = reducer({name: loss_info}, embeddings, labels)
            if not isinstance(value, Tensor) or value.numel() != 1:
                raise ValueError(
                    f"the reducer of sub-loss {name!r} must return one value, got "
                    f"{value if not isinstance(value, Tensor) else tuple(value.shape)!r}"
                )
            values.append(value.reshape(()).to(embeddings.dtype))
        sub_losses = torch.stack(values) if values else embeddings.new_zeros(0)
        return self.sub_loss_reduction(sub_losses, embeddings, labels)

    def sub_loss_reduction(
        self, sub_losses: Tensor, embeddings: Tensor | None = None, labels: Tensor | None = None
    ) -> Tensor:
        """PML's hook: the value of the (S,) reduced sub-losses; their sum."""
        return torch.sum(sub_losses)


BLOCK_ELEMENTS = 1 << 18  # 1 MiB float32 temporaries: cache-resident and reused by malloc


def row_blocks(n_rows: int, n_cols: int) -> list[slice]:
    """Row slices of about ``BLOCK_ELEMENTS`` entries each, for blockwise kernels."""
    step = max(1, BLOCK_ELEMENTS // max(1, n_cols))
    return [slice(start, min(start + step, n_rows)) for start in range(0, n_rows, step)]


@dataclass(frozen=True)
class ElementwiseTerm:
    """One reduced elementwise term of a loss: ``reducer(fn(x)[0], weights)``.

    Attributes:
        fn: Returns ``(f(x), f'(x))`` as new tensors, finite everywhere.
        weights: Bool mask or float counts shaped like x, or None.
        reducer: Selection and averaging of the term.
    """

    fn: ValueAndSlope
    weights: Tensor | None
    reducer: BaseReducer

    @property
    def weighted(self) -> Reducer:
        """The term's reducer, which the fused kernel reads as a total over a count."""
        assert isinstance(self.reducer, Reducer)  # only fusable terms reach the kernel
        return self.reducer

    def weights_for(self, rows: slice, values: Tensor, weights: Tensor | None) -> Tensor | None:
        """The block's effective weights: the given ones times the reducer's selection."""
        return self.weighted.effective_weights(values, None if weights is None else weights[rows])


def reduce_elementwise_terms(x: Tensor, terms: list[ElementwiseTerm]) -> Tensor:
    """Sum of several reduced elementwise terms of the same input, in one fused kernel.

    Forward runs over row blocks and keeps nothing but scalars; backward recomputes each block's
    slopes and writes the gradient once. Only the gradient is ever a full-size tensor. A term
    whose reducer is not :attr:`~BaseReducer.fusable` gets its values as a full-size tensor
    instead, and reduces them with its dmlkit call.

    Args:
        x: Input of any shape (typically the (N, M) distance matrix).
        terms: The terms; each is reduced by its own reducer.

    Returns:
        Scalar tensor attached to ``x``'s graph (first-order gradients only); a term's
        unreduced values for a single term whose reducer returns them (DoNothingReducer).
    """
    fused = [term for term in terms if term.reducer.fusable]
    if len(fused) == len(terms):
        result: Tensor = _ElementwiseReduce.apply(x, terms)
        return result
    parts = [_ElementwiseReduce.apply(x, fused)] if fused else []
    for term in terms:
        if not term.reducer.fusable:
            parts.append(term.reducer(_Values.apply(x, term.fn), term.weights))
    if len(parts) > 1 and any(part.ndim for part in parts):
        names = sorted({type(t.reducer).__name__ for t in terms if not t.reducer.fusable})
        raise ValueError(
            f"this loss sums {len(terms)} reduced terms, and {', '.join(names)} left them "
            "unreduced; give it a reducer that returns one value"
        )
    return sum(parts[1:], parts[0])


def _as_rows(t: Tensor) -> Tensor:
    return t.reshape(-1, 1) if t.ndim < 2 else t.reshape(t.shape[0], math.prod(t.shape[1:]))


class _ElementwiseReduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, terms: list[ElementwiseTerm]) -> Tensor:  # type: ignore[override]
        rows_x = _as_rows(x)
        weights = [None if t.weights is None else _as_rows(t.weights) for t in terms]
        totals = [rows_x.new_zeros(()) for _ in terms]
        counts = [rows_x.new_zeros(()) for _ in terms]
        for block in row_blocks(*rows_x.shape):
            for i, term in enumerate(terms):
                values, _ = term.fn(rows_x[block])
                w = term.weights_for(block, values, weights[i])
                if w is None:
                    totals[i] += values.sum()
                    counts[i] += values.numel()
                else:
                    totals[i] += torch.dot(values.flatten(), w.flatten())
                    counts[i] += w.sum()
        # Each reduction is linear in its total: its scale is the reducer's value of a total
        # of 1 (a reducer that needs a divisor, which no elementwise term has, refuses here).
        scales = [
            t.weighted.finish(torch.ones_like(c), c) for t, c in zip(terms, counts, strict=True)
        ]
        ctx.save_for_backward(x)
        ctx.terms, ctx.weights, ctx.scales = terms, weights, scales
        return sum(
            (total * scale for total, scale in zip(totals, scales, strict=True)),
            rows_x.new_zeros(()),
        )

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        (x,) = ctx.saved_tensors
        rows_x = _as_rows(x)
        grad = torch.zeros_like(rows_x)
        for block in row_blocks(*rows_x.shape):
            for term, weights, scale in zip(ctx.terms, ctx.weights, ctx.scales, strict=True):
                values, slopes = term.fn(rows_x[block])
                w = term.weights_for(block, values, weights)
                if w is not None:
                    slopes.mul_(w)
                # A tensor scale, not alpha=float(scale): that would make the host wait.
                grad[block].add_(slopes.mul_(scale))
        return grad.mul_(grad_out).reshape(x.shape), None


class _Values(torch.autograd.Function):
    """``fn(x)``'s values as a tensor, its slopes as the gradient: for reducers that need the
    values themselves."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, fn: ValueAndSlope) -> Tensor:  # type: ignore[override]
        values, slopes = fn(x)
        ctx.save_for_backward(slopes)
        return values

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        (slopes,) = ctx.saved_tensors
        return grad_out * slopes, None
