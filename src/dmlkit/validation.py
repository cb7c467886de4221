"""Input checks shared by every public entry point, so every error message reads the same.

All checks raise ``ValueError`` (or ``TypeError`` for a non-tensor) naming the argument and what is
wrong with it. They run before any maths, so a bad call never ends in a deep stack trace or a
silently wrong number.

The checks of values (non-finite embeddings, labels outside the class range, indices out of range)
need the host to read from the device. A loss or miner call collects them in one
:class:`ValueChecks` and reads them once; :func:`set_finite_checks` turns them off.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from functools import partial
from typing import Literal

import torch
from torch import Tensor

# A miner's output and a loss's ``indices_tuple``: triplets (a, p, n) or pairs (a1, p, a2, n).
IndicesTuple = tuple[Tensor, Tensor, Tensor] | tuple[Tensor, Tensor, Tensor, Tensor]


# A context variable, not a module global: a setting made in one thread (or asyncio task)
# leaves the checks of the others as they were.
_FINITE_CHECKS: ContextVar[bool] = ContextVar("finite_checks", default=True)


def set_finite_checks(enabled: bool) -> None:
    """Turns the input checks that read tensor values on or off, for every later call in the
    current thread (or asyncio task); other threads keep their own setting, on by default.

    The checks it turns off:

    - embeddings (and reference embeddings) free of NaN and ±Inf;
    - class labels inside ``[0, num_classes)`` for the losses with per-class parameters;
    - mined indices (``indices_tuple``) and ``anchor_in_ref`` inside the batch;
    - :class:`~dmlkit.losses.HistogramLoss`'s check that the similarities it bins lie in
      [-1, 1] (where its distance does not guarantee it).

    With them on (the default), each loss or miner call reads them from the device once; on a
    GPU that read makes the host wait for the device at every call. A training loop can turn
    them off for speed and check its loss for NaN where it reads it anyway (at its logging
    steps); invalid inputs then give a NaN loss, an indexing error, a meaningless HistogramLoss
    or, on a GPU, a device-side assertion, not this module's ``ValueError``. Checks of shapes,
    dtypes and sizes always run.

    Args:
        enabled: Whether the checks run.
    """
    _FINITE_CHECKS.set(bool(enabled))


def finite_checks_enabled() -> bool:
    """Whether the input checks that read tensor values run in the current thread (see
    :func:`set_finite_checks`)."""
    return _FINITE_CHECKS.get()


@contextmanager
def finite_checks(enabled: bool) -> Iterator[None]:
    """Within this block, the input checks that read tensor values are on or off (see
    :func:`set_finite_checks`: off saves one host-device synchronisation per loss or miner
    call on a GPU); the previous setting comes back after it.

    Example:
        >>> with finite_checks(False):
        ...     loss(model(images), labels).backward()

    Args:
        enabled: Whether the checks run within the block.
    """
    token = _FINITE_CHECKS.set(bool(enabled))
    try:
        yield
    finally:
        _FINITE_CHECKS.reset(token)


class ValueChecks:
    """Input checks that read tensor values, collected so that they are read from the device
    once: :meth:`run` raises the first failure's ``ValueError``.

    Nothing is collected while :func:`set_finite_checks` has turned the checks off.
    """

    def __init__(self) -> None:
        self._failed: list[Tensor] = []
        self._messages: list[Callable[[], str]] = []

    def add(self, failed: Callable[[], Tensor], message: Callable[[], str]) -> None:
        """Adds a check.

        Args:
            failed: Returns a 0-d bool tensor, True when the check fails (not called while the
                checks are off).
            message: Builds the error message; called only for a failed check, so it may read
                values freely.
        """
        if _FINITE_CHECKS.get():
            self._failed.append(failed())
            self._messages.append(message)

    def run(self) -> None:
        """Reads every collected check at once (one host-device synchronisation) and raises
        ``ValueError`` with the message of the first that failed."""
        if not self._failed:
            return
        failed = torch.stack(self._failed)
        self._failed, messages, self._messages = [], self._messages, []
        if bool(failed.any()):
            raise ValueError(messages[int(failed.int().argmax())]())


def _require_tensor(value: object, name: str) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def check_embeddings(
    embeddings: object, name: str = "embeddings", checks: ValueChecks | None = None
) -> Tensor:
    """Checks that ``embeddings`` is a finite, floating-point (N, D) tensor.

    Args:
        embeddings: The value to check.
        name: The argument name used in error messages.
        checks: Where the finiteness check goes, read later with others; None reads it here.

    Returns:
        The embeddings, unchanged.
    """
    emb = _require_tensor(embeddings, name)
    if emb.ndim != 2:
        raise ValueError(
            f"{name} must be 2-D with shape (batch_size, embedding_size), "
            f"got {emb.ndim}-D shape {tuple(emb.shape)}"
        )
    if not emb.is_floating_point():
        raise ValueError(f"{name} must have a floating-point dtype, got {emb.dtype}")
    if emb.numel():
        _checked_here(checks).add(
            lambda: _has_non_finite(emb),
            lambda: (
                f"{name} contains non-finite values ({int(torch.isnan(emb).sum())} NaN, "
                f"{int(torch.isinf(emb).sum())} Inf)"
            ),
        )
    return emb


def _checked_here(checks: ValueChecks | None) -> ValueChecks:
    """``checks``, or for None a collector that reads each check as it is added."""
    return _ImmediateChecks() if checks is None else checks


class _ImmediateChecks(ValueChecks):
    def add(self, failed: Callable[[], Tensor], message: Callable[[], str]) -> None:
        super().add(failed, message)
        self.run()


def _has_non_finite(values: Tensor) -> Tensor:
    """Whether a non-empty tensor holds NaN or ±Inf (0-d bool), in one pass: they reach the
    extremes."""
    lowest, highest = torch.aminmax(values.detach())
    return ~(lowest.isfinite() & highest.isfinite())


def check_labels(labels: object, length: int, device: torch.device, name: str = "labels") -> Tensor:
    """Checks that ``labels`` is a 1-D integer tensor of the given length.

    Args:
        labels: The value to check.
        length: The number of rows of the matching embeddings.
        device: The device of the matching embeddings; labels are moved there.
        name: The argument name used in error messages.

    Returns:
        The labels on ``device``.
    """
    lab = _require_tensor(labels, name)
    if lab.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got {lab.ndim}-D shape {tuple(lab.shape)}")
    if lab.is_floating_point() or lab.is_complex() or lab.dtype == torch.bool:
        raise ValueError(f"{name} must have an integer dtype, got {lab.dtype}")
    if lab.shape[0] != length:
        raise ValueError(
            f"{name} has length {lab.shape[0]} but there are {length} embeddings; they must match"
        )
    return lab.to(device)


def check_indices_tuple(
    indices_tuple: Sequence[Tensor],
    n_anchors: int,
    n_refs: int,
    device: torch.device,
    checks: ValueChecks | None = None,
) -> IndicesTuple:
    """Checks a miner's output: triplets (a, p, n) or pairs (a1, p, a2, n).

    Anchor indices address the embeddings (``n_anchors`` rows); positive and negative indices
    address the reference set (``n_refs`` rows, the embeddings themselves when no ``ref_emb``).

    Args:
        indices_tuple: The tuple to check.
        n_anchors: Number of embeddings.
        n_refs: Number of reference embeddings.
        device: The device the indices are moved to.
        checks: Where the range checks go, read later with others; None reads them here.

    Returns:
        The tuple as ``torch.long`` tensors on ``device``.
    """
    if not isinstance(indices_tuple, (tuple, list)):
        raise ValueError(
            "indices_tuple must be a tuple (a, p, n) or (a1, p, a2, n), "
            f"got {type(indices_tuple).__name__}"
        )
    arity = len(indices_tuple)
    if arity not in (3, 4):
        raise ValueError(
            f"indices_tuple must have 3 (a, p, n) or 4 (a1, p, a2, n) tensors, got {arity}"
        )
    names = ("a", "p", "n") if arity == 3 else ("a1", "p", "a2", "n")
    out = []
    for part_name, part in zip(names, indices_tuple, strict=True):
        part = _require_tensor(part, f"indices_tuple[{part_name}]")
        if part.ndim != 1:
            raise ValueError(
                f"indices_tuple[{part_name}] must be 1-D, got shape {tuple(part.shape)}"
            )
        if part.numel() and (part.is_floating_point() or part.dtype == torch.bool):
            raise ValueError(f"indices_tuple[{part_name}] must be integer, got {part.dtype}")
        out.append(part.to(device=device, dtype=torch.long))
    ranges = _checked_here(checks)
    for part_name, part in zip(names, out, strict=True):
        if part.numel():
            limit = n_anchors if part_name.startswith("a") else n_refs
            ranges.add(
                partial(_outside, part, 0, limit),
                partial(
                    _range_error, f"indices_tuple[{part_name}] has indices outside", part, 0, limit
                ),
            )
    if arity == 3 and not (len(out[0]) == len(out[1]) == len(out[2])):
        raise ValueError(
            "indices_tuple (a, p, n) must have equal lengths, got "
            f"{len(out[0])}, {len(out[1])}, {len(out[2])}"
        )
    if arity == 4 and (len(out[0]) != len(out[1]) or len(out[2]) != len(out[3])):
        raise ValueError(
            "indices_tuple (a1, p, a2, n) needs len(a1) == len(p) and len(a2) == len(n), got "
            f"{len(out[0])}, {len(out[1])}, {len(out[2])}, {len(out[3])}"
        )
    return tuple(out)  # type: ignore[return-value]


def check_anchor_in_ref(
    anchor_in_ref: object,
    n_anchors: int,
    n_refs: int | None,
    device: torch.device,
    checks: ValueChecks | None = None,
) -> Tensor:
    """Checks ``anchor_in_ref``: for each anchor, the row of ``ref_emb`` holding the same item,
    or −1 where the anchor is not in the reference set.

    Args:
        anchor_in_ref: The value to check.
        n_anchors: Number of embeddings.
        n_refs: Number of reference embeddings, or None when no ``ref_emb`` was given.
        device: The device of the embeddings; the indices are moved there.
        checks: Where the range check goes, read later with others; None reads it here.

    Returns:
        The indices as ``torch.long`` on ``device``.
    """
    if n_refs is None:
        raise ValueError(
            "anchor_in_ref was given without ref_emb; it says which row of ref_emb each anchor is"
        )
    index = _require_tensor(anchor_in_ref, "anchor_in_ref")
    if index.ndim != 1:
        raise ValueError(
            f"anchor_in_ref must be 1-D, got {index.ndim}-D shape {tuple(index.shape)}"
        )
    if index.is_floating_point() or index.is_complex() or index.dtype == torch.bool:
        raise ValueError(f"anchor_in_ref must have an integer dtype, got {index.dtype}")
    if index.shape[0] != n_anchors:
        raise ValueError(
            f"anchor_in_ref has length {index.shape[0]} but there are {n_anchors} embeddings; "
            "they must match"
        )
    index = index.to(device=device, dtype=torch.long)
    if index.numel():
        _checked_here(checks).add(
            partial(_outside, index, -1, n_refs),
            partial(
                _range_error, "anchor_in_ref must hold -1 or a row of ref_emb in", index, 0, n_refs
            ),
        )
    return index


def _outside(values: Tensor, low: int, end: int) -> Tensor:
    """Whether a non-empty integer tensor holds a value outside [low, end) (0-d bool)."""
    lowest, highest = torch.aminmax(values)
    return (lowest < low) | (highest >= end)


def _range_error(what: str, values: Tensor, start: int, end: int) -> str:
    return f"{what} [{start}, {end}): min {int(values.min())}, max {int(values.max())}"


def check_positive_int(value: object, name: str) -> int:
    """Checks a constructor option that counts something (classes, dimensions, centres, bins).

    Args:
        value: The value to check: an integer ≥ 1 (``bool`` is refused).
        name: The option name used in the error message.

    Returns:
        The value as an ``int``.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def check_finite_number(value: object, name: str) -> float:
    """Checks a constructor option that must be a finite real number (a margin, say).

    Returns:
        The value as a ``float``.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def check_positive_number(value: object, name: str) -> float:
    """Checks a constructor option that must be a positive real number (a temperature, say).

    Returns:
        The value as a ``float``.
    """
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    return float(value)


def check_triplets_per_anchor(triplets_per_anchor: object) -> int | Literal["all"]:
    """Checks a ``triplets_per_anchor`` option: ``"all"``, or a positive integer
    (:func:`check_positive_int`).

    Returns:
        ``"all"``, or the number as an ``int``.
    """
    if isinstance(triplets_per_anchor, str) and triplets_per_anchor == "all":
        return "all"
    return check_positive_int(triplets_per_anchor, "triplets_per_anchor (or 'all')")


def class_labels(
    labels: Tensor, num_classes: int, name: str = "labels", checks: ValueChecks | None = None
) -> Tensor:
    """Labels for per-class parameters: checked to be class indices in [0, ``num_classes``)
    (:func:`check_class_labels`) and returned as ``torch.long``, the dtype indexing,
    ``F.cross_entropy`` and ``F.one_hot`` take, whatever integer dtype the caller used.

    Args:
        labels: 1-D integer labels (already checked by :func:`check_labels`).
        num_classes: The number of classes.
        name: The argument name used in error messages.
        checks: Where the range check goes, read later with others; None reads it here.
    """
    check_class_labels(labels, num_classes, name, checks)
    return labels.long()


def check_class_labels(
    labels: Tensor,
    num_classes: int,
    name: str = "labels",
    checks: ValueChecks | None = None,
    message: Callable[[], str] | None = None,
) -> None:
    """Checks that integer labels are class indices in [0, ``num_classes``), as per-class
    parameters need (the trainer gives contiguous indices).

    Args:
        labels: 1-D integer labels.
        num_classes: The number of classes.
        name: The argument name used in error messages.
        checks: Where the check goes, read later with others; None reads it here.
        message: Builds the error message; None names the first label outside the range.

    Raises:
        ValueError: For a label outside the range.
    """
    if len(labels):
        _checked_here(checks).add(
            lambda: _outside(labels, 0, num_classes),
            message
            or (
                lambda: (
                    f"{name} holds {int(labels[(labels < 0) | (labels >= num_classes)][0])}, "
                    f"outside the class indices [0, {num_classes}): per-class parameters need "
                    "labels 0..num_classes-1"
                )
            ),
        )


def check_batch(
    embeddings: object,
    labels: object | None,
    ref_emb: object | None,
    ref_labels: object | None,
    *,
    labels_required: bool,
    checks: ValueChecks | None = None,
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """Checks the common (embeddings, labels, ref_emb, ref_labels) arguments of losses and miners.

    Args:
        embeddings: (N, D) embeddings.
        labels: (N,) integer labels, or None where an ``indices_tuple`` makes them unnecessary.
        ref_emb: Optional (M, D) reference embeddings.
        ref_labels: (M,) labels of ``ref_emb``; required whenever ``ref_emb`` and ``labels``
            are given.
        labels_required: Whether the caller cannot work without labels.
        checks: Where the finiteness checks go, read later with others; None reads them here.

    Returns:
        (embeddings, labels, ref_emb, ref_labels), labels moved to the embeddings' device.
    """
    if checks is None:
        checks = ValueChecks()
        checked = check_batch(
            embeddings, labels, ref_emb, ref_labels, labels_required=labels_required, checks=checks
        )
        checks.run()
        return checked
    emb = check_embeddings(embeddings, checks=checks)
    if labels is None:
        if labels_required:
            raise ValueError("labels are required (they may be omitted only with an indices_tuple)")
        lab = None
    else:
        lab = check_labels(labels, emb.shape[0], emb.device)
    if ref_emb is None:
        if ref_labels is not None:
            raise ValueError("ref_labels was given without ref_emb")
        return emb, lab, None, None
    ref = check_embeddings(ref_emb, "ref_emb", checks)
    if ref.shape[1] != emb.shape[1]:
        raise ValueError(
            f"ref_emb has embedding size {ref.shape[1]} but embeddings have {emb.shape[1]}"
        )
    if ref.dtype != emb.dtype or ref.device != emb.device:
        raise ValueError(
            f"ref_emb ({ref.dtype}, {ref.device}) must match embeddings ({emb.dtype}, {emb.device})"
        )
    if ref_labels is None:
        if lab is not None or labels_required:
            raise ValueError("ref_emb was given without ref_labels; pass both")
        return emb, None, ref, None
    ref_lab = check_labels(ref_labels, ref.shape[0], emb.device, "ref_labels")
    return emb, lab, ref, ref_lab
