"""Counting, by dispatch on the CPU, the operations that make a CUDA run wait for the device.

On a GPU each of these stalls the stream until the device catches up: the host needs a value
(``item``), a size that depends on the data (``nonzero``, boolean-mask indexing, ``unique``,
``bincount``…), a yes/no (``equal``, ``is_nonzero``), or a Python value is copied to the device
(``torch.tensor``/``new_tensor``/``as_tensor``, seen as ``lift_fresh``). The CPU has no stream,
but these operations reach the dispatcher there too, so counting them on the CPU finds the
waits that a CUDA run's code path shares with the CPU's.

It cannot see everything a CUDA run would wait for: kernels that synchronise inside a CUDA-only
implementation, pinned-memory and allocator behaviour, or code that takes another branch on a
CUDA tensor. On a real GPU, ``torch.cuda.set_sync_debug_mode("error")`` is the check.

Assigning a Python scalar by indexing (``t[i] = v``) reaches ``lift_fresh`` on the CPU too,
though on CUDA PyTorch passes such a value as a kernel argument: the counter counts it, and the
library writes ``fill_``, ``scatter_`` or ``masked_fill_`` there instead.

``Tensor.tolist`` and ``Tensor.numpy`` bypass the dispatcher on a CPU tensor (on CUDA they copy
to the host, which waits): the counter wraps them while it is active and counts every call.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
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
    # CUDA's bincount reads the input's min and max to the host whatever its minlength.
    aten.bincount.default: "bincount",
    # A tensor built from a Python value (torch.tensor, new_tensor, as_tensor) is made on the
    # host and copied to the device, which blocks the stream; torch.full/new_full do not.
    aten.lift_fresh.default: "host→device copy",
    aten.lift_fresh_copy.default: "host→device copy",
}


def _is_bool_tensor(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.dtype in (torch.bool, torch.uint8)


def sync_reason(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
    """Why ``func(*args, **kwargs)`` would make a CUDA run wait for the device, or None."""
    if func in _ALWAYS_SYNC:
        return _ALWAYS_SYNC[func]
    packet = func.overloadpacket
    indexing = packet in (aten.index, aten._unsafe_index)
    assigning = packet in (aten.index_put, aten.index_put_, aten._index_put_impl_)
    if (indexing or assigning) and any(_is_bool_tensor(i) for i in args[1] if i is not None):
        return "boolean-mask indexing" if indexing else "boolean-mask assignment"
    if packet is aten.repeat_interleave and kwargs.get("output_size") is None:
        return "repeat_interleave without output_size"
    return None


class HostSyncCounter(TorchDispatchMode):
    """Counts, by reason, the operations run under it that would make a CUDA run wait.

    Example:
        >>> with HostSyncCounter() as syncs:
        ...     loss(embeddings, labels).backward()
        >>> syncs.total

    Args:
        host_resident: Tensors that stay on the CPU in a CUDA run too (an optimiser's step
            counters, with PyTorch's default ``capturable=False``): reading them costs no wait.
    """

    def __init__(self, host_resident: Iterable[torch.Tensor] = ()) -> None:
        super().__init__()
        self.reasons: Counter[str] = Counter()
        self.ops: Counter[str] = Counter()
        self.host_resident = {t.data_ptr() for t in host_resident}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        reason = sync_reason(func, args, kwargs)
        if func is aten._local_scalar_dense.default and args[0].data_ptr() in self.host_resident:
            reason = None
        if reason is not None:
            self.reasons[reason] += 1
            self.ops[str(func)] += 1
        return func(*args, **kwargs)

    def __enter__(self) -> HostSyncCounter:
        # The mode first: if entering it raises, torch.Tensor is left unpatched.
        entered = super().__enter__()
        self._originals = {name: getattr(torch.Tensor, name) for name in ("tolist", "numpy")}
        for name, original in self._originals.items():
            setattr(torch.Tensor, name, self._counting(name, original))
        return entered

    def __exit__(self, *exc: object) -> None:
        for name, original in self._originals.items():
            setattr(torch.Tensor, name, original)
        super().__exit__(*exc)

    def _counting(self, name: str, original: Any) -> Any:
        def counted(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if tensor.data_ptr() not in self.host_resident:
                self.reasons[f"host copy ({name})"] += 1
                self.ops[f"Tensor.{name}"] += 1
            return original(tensor, *args, **kwargs)

        return counted

    @property
    def total(self) -> int:
        """The number of syncing operations seen."""
        return sum(self.reasons.values())

    def __repr__(self) -> str:
        return f"HostSyncCounter(total={self.total}, ops={dict(self.ops)})"
