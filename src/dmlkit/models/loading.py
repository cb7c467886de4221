"""Loading published and trained state dicts with a full report of what did not match.

``torch.nn.Module.load_state_dict`` stops at the first shape mismatch and names only one tensor.
:func:`load_weights` compares every name and shape first, so one error lists all the problems.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

StateDictSource = str | os.PathLike[str] | Mapping[str, Tensor]

# Containers that training scripts commonly wrap their state dict in.
_WRAPPER_KEYS = ("state_dict", "model")
_DATA_PARALLEL_PREFIX = "module."
# Longest list of names one error message shows per kind of problem.
_MAX_LISTED = 10


@dataclass(frozen=True)
class LoadReport:
    """What :func:`load_weights` did.

    Attributes:
        loaded: Keys copied into the module.
        missing: Keys of the module that the checkpoint lacks (left unchanged).
        unexpected: Keys of the checkpoint that the module lacks (not used).
        mismatched: ``(key, expected shape, checkpoint shape)`` for keys present on both sides
            with different shapes (not loaded).
        ignored: Keys skipped on either side because they start with an ``ignore`` prefix.
    """

    loaded: tuple[str, ...]
    missing: tuple[str, ...]
    unexpected: tuple[str, ...]
    mismatched: tuple[tuple[str, tuple[int, ...], tuple[int, ...]], ...]
    ignored: tuple[str, ...] = ()

    @property
    def complete(self) -> bool:
        """Whether every non-ignored key matched in name and shape."""
        return not (self.missing or self.unexpected or self.mismatched)


def read_state_dict(source: StateDictSource) -> dict[str, Tensor]:
    """Reads a state dict from a file or mapping, unwrapping common checkpoint layouts.

    A file is loaded on the CPU with ``weights_only=True`` (no arbitrary code runs). A mapping
    holding ``"state_dict"`` or ``"model"`` is unwrapped, and a leading ``"module."`` (left by
    ``DataParallel``/``DistributedDataParallel``) is stripped from every key.

    Args:
        source: A path to a file written by ``torch.save``, or a mapping of names to tensors.

    Returns:
        A new dict of names to tensors.
    """
    if isinstance(source, Mapping):
        raw: object = source
    else:
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint file not found: {path}")
        try:
            raw = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise ValueError(
                f"{path} holds objects other than tensors and plain containers, so it cannot be "
                f"loaded with weights_only=True; save its state_dict() instead ({exc})"
            ) from exc
    while isinstance(raw, Mapping):
        wrapper = next((k for k in _WRAPPER_KEYS if isinstance(raw.get(k), Mapping)), None)
        if wrapper is None:
            break
        raw = raw[wrapper]
    if not isinstance(raw, Mapping):
        raise ValueError(
            f"a checkpoint must hold a mapping of names to tensors, got {type(raw).__name__}"
        )
    state: dict[str, Tensor] = {}
    for key, value in raw.items():
        if not isinstance(value, Tensor):
            raise ValueError(
                f"checkpoint entry {key!r} is not a tensor but {type(value).__name__}; "
                "is this a training checkpoint rather than a state dict?"
            )
        name = str(key).removeprefix(_DATA_PARALLEL_PREFIX)
        state[name] = value
    return state


def _matches_prefix(key: str, prefixes: Sequence[str]) -> bool:
    # "fc" covers "fc" and "fc.weight", never "fc2.weight".
    return any(key == p.rstrip(".") or key.startswith(p.rstrip(".") + ".") for p in prefixes)


def _format_names(title: str, names: Sequence[str]) -> str:
    shown = ", ".join(names[:_MAX_LISTED])
    more = f", ... and {len(names) - _MAX_LISTED} more" if len(names) > _MAX_LISTED else ""
    return f"  {title} ({len(names)}): {shown}{more}"


def _format_error(module: nn.Module, report: LoadReport) -> str:
    lines = [f"checkpoint does not match {type(module).__name__}:"]
    if report.missing:
        lines.append(_format_names("missing keys", report.missing))
    if report.unexpected:
        lines.append(_format_names("unexpected keys", report.unexpected))
    if report.mismatched:
        lines.append(f"  shape mismatches ({len(report.mismatched)}):")
        lines.extend(
            f"    {key}: expected {want}, got {got}"
            for key, want, got in report.mismatched[:_MAX_LISTED]
        )
        if len(report.mismatched) > _MAX_LISTED:
            lines.append(f"    ... and {len(report.mismatched) - _MAX_LISTED} more")
    lines.append(
        "Pass ignore=(prefix, ...) to skip keys such as a classifier, or strict=False to load "
        "only the keys that match."
    )
    return "\n".join(lines)


def load_weights(
    module: nn.Module,
    source: StateDictSource,
    *,
    strict: bool = True,
    ignore: Iterable[str] = (),
) -> LoadReport:
    """Loads a state dict into ``module`` after checking every name and shape.

    Two compatibility rules make older published checkpoints load as they are:

    - A checkpoint tensor of shape ``(1, *expected)`` is squeezed to ``expected``. Caffe ports
      such as the BN-Inception file ``bn_inception-52deb4733.pth`` store BatchNorm vectors so.
    - Missing ``num_batches_tracked`` counters (files saved before PyTorch 0.4.1) are not
      reported as missing; BatchNorm keeps its own counter.

    Args:
        module: The module to load into.
        source: A path to a ``torch.save`` file or a mapping of names to tensors, optionally
            wrapped as ``{"state_dict": ...}`` or ``{"model": ...}``, with or without a
            ``"module."`` prefix (see :func:`read_state_dict`).
        strict: If True, any missing key, unexpected key or shape mismatch raises a
            ``ValueError`` listing all of them, and nothing is loaded. If False, the keys that
            match are loaded and the rest are reported.
        ignore: Key prefixes to skip on both sides, e.g. ``("fc",)``. A prefix matches whole
            dotted components: ``"fc"`` skips ``fc.weight`` but not ``fc2.weight``.

    Returns:
        A :class:`LoadReport`.
    """
    prefixes = tuple(ignore)
    state = read_state_dict(source)
    expected = module.state_dict()
    ignored = sorted({k for k in (*expected, *state) if prefixes and _matches_prefix(k, prefixes)})
    ignored_set = set(ignored)

    to_load: dict[str, Tensor] = {}
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = []
    unexpected: list[str] = []
    for key, value in state.items():
        if key in ignored_set:
            continue
        if key not in expected:
            unexpected.append(key)
            continue
        want = expected[key].shape
        if value.shape != want and value.shape == (1, *want):
            value = value.reshape(want)
        if value.shape != want:
            mismatched.append((key, tuple(want), tuple(value.shape)))
            continue
        to_load[key] = value
    missing = [
        k
        for k in expected
        if k not in state and k not in ignored_set and not k.endswith(".num_batches_tracked")
    ]
    report = LoadReport(
        loaded=tuple(to_load),
        missing=tuple(missing),
        unexpected=tuple(unexpected),
        mismatched=tuple(mismatched),
        ignored=tuple(ignored),
    )
    if strict and not report.complete:
        raise ValueError(_format_error(module, report))
    # The names and shapes are already checked; strict=False only lets the skipped keys be absent.
    module.load_state_dict(to_load, strict=False)
    return report
