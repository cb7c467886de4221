"""Losses and miners over the batches of several processes (``torch.distributed``).

Each process holds its share of a global batch. :func:`gather` concatenates the shares in rank
order on every process, keeping the gradient; the wrappers compute a loss in one of two modes:

* **global**: the loss of the whole global batch, every pair of it. Every rank computes the same
  value, the loss one process would compute on the concatenated batch.
* **efficient**: each rank's own anchors against the whole gathered batch (their pairs with
  themselves left out by index, ``anchor_in_ref``). Rank r's value is ``loss(anchors_r,
  ref=global batch)``; the ranks' mean is the single-process equivalent.

Why the gradients match single-process training: the backward of :func:`gather` sums the
gradient of the gathered tensor over the ranks (one ``all_reduce``) and keeps this rank's slice.
In global mode every rank's loss is the same L, so each rank's embeddings receive W · ∂L/∂e_r;
averaging the parameter gradients over the W ranks, as DDP does, leaves exactly ∂L/∂θ. In
efficient mode the sum gives ∂(Σ_s L_s)/∂e_r, and DDP's average leaves ∂((1/W) Σ_s L_s)/∂θ.
No factor is applied to the loss value (PML multiplies its loss by the world size instead).

Parameters of a loss (proxies, class weights) get the full gradient on every rank in global
mode; average them across ranks like the model's (``average_gradients``, or put the loss inside
the DDP module).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .losses.base import BaseMetricLossFunction
from .losses.cross_batch import CrossBatchMemory
from .miners import BaseMiner
from .validation import IndicesTuple


def is_distributed() -> bool:
    """Whether a process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def rank_and_world_size() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside a process group."""
    if not is_distributed():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def _sizes(n: int, device: torch.device) -> list[int]:
    """Every rank's first-dimension size."""
    _, world = rank_and_world_size()
    sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([n], device=device))
    return [int(s) for s in sizes]


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:  # type: ignore[override]
        rank, world = rank_and_world_size()
        sizes = _sizes(x.shape[0], x.device)
        largest = max(sizes)
        padded = x.new_zeros((largest, *x.shape[1:]))
        padded[: x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded.contiguous())
        ctx.sizes, ctx.rank = sizes, rank
        return torch.cat([part[:size] for part, size in zip(parts, sizes, strict=True)])

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:  # type: ignore[override]
        grad = grad.contiguous()
        dist.all_reduce(grad)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start : start + ctx.sizes[ctx.rank]]


def gather(x: Tensor) -> Tensor:
    """Every rank's ``x`` concatenated in rank order (shares may differ in length), with the
    gradient: the backward sums the gathered gradient over the ranks and keeps this rank's
    rows (see the module docstring). Outside a process group, ``x`` itself."""
    if not is_distributed():
        return x
    return _Gather.apply(x)  # type: ignore[no-any-return]


def own_rows(n: int, device: torch.device) -> Tensor:
    """The rows of the gathered batch holding this rank's ``n`` items."""
    rank, _ = rank_and_world_size()
    start = sum(_sizes(n, device)[:rank]) if is_distributed() else 0
    return torch.arange(start, start + n, device=device)


def average_gradients(parameters: Any) -> None:
    """Averages the parameters' gradients over the ranks, as DDP does (for parameters outside
    a DDP module, such as a loss's proxies), in one all-reduce; a parameter without a gradient
    on some rank counts zeros there, so every rank makes the same collective."""
    if not is_distributed():
        return
    _, world = rank_and_world_size()
    params = [p for p in parameters if p.requires_grad]
    if not params:
        return
    flat = torch.cat(
        [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params]
    )
    dist.all_reduce(flat)
    flat.div_(world)
    start = 0
    for p in params:
        part = flat[start : start + p.numel()].view_as(p)
        start += p.numel()
        if p.grad is None:
            p.grad = part.clone()
        else:
            p.grad.copy_(part)


def check_efficient_mode(loss: nn.Module) -> None:
    """Raises ``ValueError`` for a loss that efficient mode cannot use: one without a reference
    set, a cross-batch memory (every rank must queue the same batch), or one with state updated
    from each batch (each rank would update it from its own anchors and the states diverge)."""
    if isinstance(loss, CrossBatchMemory):
        raise ValueError(
            "CrossBatchMemory is used in global mode only: every rank must queue the same "
            "gathered batch"
        )
    if not isinstance(loss, BaseMetricLossFunction) or not loss.supports_ref:
        raise ValueError(f"efficient mode needs a dmlkit loss that takes ref_emb; {loss!r} is not")
    if any(True for _ in loss.buffers()):
        raise ValueError(
            f"{type(loss).__name__} keeps state updated from each batch: in efficient mode "
            "each rank would update it from its own anchors and the ranks' states would "
            "diverge; use global mode"
        )


class DistributedLossWrapper(nn.Module):
    """A loss over the global batch of all ranks (PML's ``DistributedLossWrapper``, without its
    world-size factor on the value; see the module docstring for what each mode computes).

    Args:
        loss: Any dmlkit loss, or a :class:`~dmlkit.losses.CrossBatchMemory` (global mode only:
            the gathered batch is queued once, identically, on every rank).
        efficient: This rank's anchors against the gathered batch, instead of the whole global
            batch on every rank.
    """

    def __init__(self, loss: BaseMetricLossFunction | CrossBatchMemory, efficient: bool = False):
        super().__init__()
        if not isinstance(loss, BaseMetricLossFunction | CrossBatchMemory):
            raise ValueError(f"loss must be a dmlkit loss or CrossBatchMemory, got {loss!r}")
        if efficient:
            check_efficient_mode(loss)
        self.loss = loss
        self.efficient = efficient

    def forward(
        self,
        embeddings: Tensor,
        labels: Tensor | None = None,
        indices_tuple: IndicesTuple | None = None,
        enqueue_mask: Tensor | None = None,
    ) -> Tensor:
        """The loss. ``indices_tuple`` indexes the global batch (global mode) or this rank's
        anchors and the global batch (efficient mode), as :class:`DistributedMinerWrapper`
        returns it; ``enqueue_mask`` is for a wrapped ``CrossBatchMemory``."""
        all_emb = gather(embeddings)
        all_labels = None if labels is None else gather(labels.to(embeddings.device))
        if isinstance(self.loss, CrossBatchMemory):
            mask = None if enqueue_mask is None else gather(enqueue_mask.to(embeddings.device))
            assert all_labels is not None
            return self.loss(all_emb, all_labels, indices_tuple, mask)
        if enqueue_mask is not None:
            raise ValueError("enqueue_mask is only for a wrapped CrossBatchMemory")
        if not self.efficient:
            return self.loss(all_emb, all_labels, indices_tuple)
        itself = own_rows(embeddings.shape[0], embeddings.device)
        return self.loss(embeddings, labels, indices_tuple, all_emb, all_labels, itself)


class DistributedMinerWrapper(nn.Module):
    """A miner over the global batch of all ranks (PML's ``DistributedMinerWrapper``).

    Global mode mines the whole gathered batch (indices into it); efficient mode mines this
    rank's anchors against it (anchor indices local, the others into the gathered batch), the
    anchors' own rows left out. Give the result to a :class:`DistributedLossWrapper` of the
    same mode.

    Args:
        miner: Any dmlkit miner.
        efficient: Mine this rank's anchors only.
    """

    def __init__(self, miner: BaseMiner, efficient: bool = False) -> None:
        super().__init__()
        if not isinstance(miner, BaseMiner):
            raise ValueError(f"miner must be a dmlkit miner, got {miner!r}")
        self.miner = miner
        self.efficient = efficient

    def forward(self, embeddings: Tensor, labels: Tensor) -> IndicesTuple:
        with torch.no_grad():
            all_emb = gather(embeddings.detach())
            all_labels = gather(labels.to(embeddings.device))
        if not self.efficient:
            return self.miner(all_emb, all_labels)
        itself = own_rows(embeddings.shape[0], embeddings.device)
        return self.miner(embeddings, labels, all_emb, all_labels, itself)


__all__ = [
    "DistributedLossWrapper",
    "DistributedMinerWrapper",
    "average_gradients",
    "check_efficient_mode",
    "gather",
    "is_distributed",
    "own_rows",
    "rank_and_world_size",
]
