"""Counting the operations that force a device→host synchronisation, by dispatch, on the CPU.

On a GPU each of these stalls the stream until the device catches up: the host needs a value
(``item``), a size that depends on the data (``nonzero``, boolean-mask indexing, ``unique``…) or
a yes/no (``equal``, ``is_nonzero``). The CPU has no stream, but the same operations reach the
dispatcher there, so counting them on the CPU tells what a CUDA run would wait for.

Not seen: host copies that bypass the dispatcher (``Tensor.tolist`` and ``numpy()`` on a CPU
tensor); on CUDA those go through ``_to_copy`` to the CPU, which this mode cannot tell apart on a
CPU-only machine.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

_ALWAYS_SYNC = {
    aten._local_scalar_dense.default: "item",
    aten.nonzero.default: "nonzero",
    aten.masked_select.default: "masked_select",
    aten._unique.default: "unique",
    aten._unique2.default: "unique",
    aten.unique_dim.default: "unique",
    aten.unique_consecutive.default: "unique",
    aten.equal.default: "equal",
    aten.is_nonzero.default: "is_nonzero",
}


def _is_bool_tensor(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.dtype in (torch.bool, torch.uint8)


def sync_reason(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
    """Why ``func(*args, **kwargs)`` would make a CUDA run wait for the device, or None."""
    if func in _ALWAYS_SYNC:
        return _ALWAYS_SYNC[func]
    packet = func.overloadpacket
    if packet in (aten.index, aten._unsafe_index) and len(args) > 1:
        if any(_is_bool_tensor(i) for i in args[1] if i is not None):
            return "boolean-mask indexing"
    if packet in (aten.index_put, aten.index_put_, aten._index_put_impl_) and len(args) > 1:
        if any(_is_bool_tensor(i) for i in args[1] if i is not None):
            return "boolean-mask assignment"
    if packet is aten.repeat_interleave and kwargs.get("output_size") is None:
        return "repeat_interleave without output_size"
    if packet is aten.bincount and not kwargs.get("minlength") and len(args) < 3:
        return "bincount without minlength"
    return None


class HostSyncCounter(TorchDispatchMode):
    """Counts, by reason, the operations run under it that would make a CUDA run wait.

    Example:
        >>> with HostSyncCounter() as syncs:
        ...     loss(embeddings, labels).backward()
        >>> syncs.total
    """

    def __init__(self) -> None:
        super().__init__()
        self.reasons: Counter[str] = Counter()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        reason = sync_reason(func, args, kwargs)
        if reason is not None:
            self.reasons[reason] += 1
            self.ops[str(func)] += 1
        return func(*args, **kwargs)

    @property
    def total(self) -> int:
        """The number of syncing operations seen."""
        return sum(self.reasons.values())

    def __repr__(self) -> str:
        return f"HostSyncCounter(total={self.total}, ops={dict(self.ops)})"
