"""Embedding a dataset fast: worker decoding, channels-last layout, inference mode, autocast."""

from __future__ import annotations

import contextlib
import itertools
import warnings
from collections.abc import Iterator
from typing import Any, Literal, cast

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from ..data import LabelledDataset
from ..progress import progress_bar

AutocastDtype = Literal["bf16", "fp16"]
_AUTOCAST_DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _has_4d_weights(model: nn.Module) -> bool:
    return any(t.ndim == 4 for t in itertools.chain(model.parameters(), model.buffers()))


def _use_channels_last(
    model: nn.Module, batch: Tensor, device: torch.device, requested: bool | None
) -> bool:
    """Whether to run in channels-last: asked for, or (``None``) 4-D images into a conv net."""
    if batch.ndim != 4:
        if requested:
            raise ValueError(
                f"channels_last=True needs 4-D [B, C, H, W] inputs, got shape {tuple(batch.shape)}"
            )
        return False
    if requested is not None:
        return requested
    # oneDNN (CPU) and cuDNN (CUDA) both have native NHWC convolutions; elsewhere stay NCHW.
    return device.type in ("cpu", "cuda") and _has_4d_weights(model)


@contextlib.contextmanager
def _channels_last(model: nn.Module) -> Iterator[None]:
    """Converts the model's 4-D tensors to channels-last, and restores the originals on exit.

    The original tensors themselves are put back (``.data``), so the caller's model leaves with
    the same storage, layout and values it came with; Parameter objects (and an optimizer's
    references to them) are never replaced.
    """
    saved = [(t, t.data) for t in itertools.chain(model.parameters(), model.buffers())]
    try:
        for tensor, data in saved:
            if data.ndim == 4:
                tensor.data = data.contiguous(memory_format=torch.channels_last)
        yield
    finally:
        for tensor, data in saved:
            tensor.data = data


def _autocast(
    device: torch.device, autocast: AutocastDtype | None
) -> contextlib.AbstractContextManager[Any]:
    if autocast is None:
        return contextlib.nullcontext()
    if autocast not in _AUTOCAST_DTYPES:
        raise ValueError(f"autocast must be None, 'bf16' or 'fp16', got {autocast!r}")
    if device.type != "cuda":
        warnings.warn(
            f"autocast={autocast!r} is only used on CUDA; embedding on {device} runs in float32",
            stacklevel=3,
        )
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=_AUTOCAST_DTYPES[autocast])


def embed_dataset(
    model: nn.Module,
    dataset: LabelledDataset,
    *,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    num_workers: int = 0,
    channels_last: bool | None = None,
    autocast: AutocastDtype | None = None,
    progress: bool = False,
    description: str = "embedding",
    leave: bool = True,
) -> tuple[Tensor, np.ndarray]:
    """Embeddings of every item of a dataset, in order, with the model in evaluation mode.

    The model runs under :func:`torch.inference_mode`. With ``num_workers > 0`` the images are
    read and transformed in DataLoader worker processes while the model runs on earlier
    batches (into pinned memory, copied asynchronously, when ``device`` is CUDA). 4-D image
    batches run in channels-last memory format by default on the CPU and CUDA, which is faster
    for convolutions there; the embeddings equal the contiguous path's within float rounding.

    The model leaves as it came: every module's training flag and every tensor's memory
    format are restored, even on error. The model must already be on ``device``. The global
    RNG is not consumed (the DataLoader draws its worker seeds from a private generator, and
    the CPU RNG state is restored afterwards, so a random transform does not advance it either).

    Args:
        model: Maps a batch of inputs to embeddings.
        dataset: Yields (input, label) pairs and has ``labels``.
        batch_size: Items per forward pass.
        device: Where the model runs.
        num_workers: DataLoader worker processes decoding and transforming the inputs.
        channels_last: Run 4-D inputs (and the model) in channels-last format: ``None``
            (default) when the inputs are 4-D and the model has 4-D weights on CPU or CUDA;
            ``False`` keeps the contiguous layout (the previous behaviour, bit for bit).
        autocast: ``"bf16"`` or ``"fp16"`` to run the forward under mixed precision on CUDA;
            ignored with a warning on other devices. Embeddings are returned in float32.
        progress: Show a progress bar of the items embedded (rate and time left) on stderr.
            Off by default, so that a library call prints nothing;
            :func:`dmlkit.progress.quiet` turns it off whatever this says.
        description: The bar's label.
        leave: Keep the finished bar on screen; False for a bar inside another one.

    Returns:
        (N, D) float32 embeddings on the CPU, and the (N,) labels.

    Raises:
        ValueError: The dataset is empty, or its items' labels differ from ``dataset.labels``.
    """
    device = torch.device(device)
    on_cuda = device.type == "cuda"
    precision = _autocast(device, autocast)
    loader: DataLoader[tuple[Tensor, int]] = DataLoader(
        cast(Dataset[tuple[Tensor, int]], dataset),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=on_cuda,
        # A private generator: the loader's base seed is not drawn from the global RNG.
        generator=torch.Generator().manual_seed(0),
    )
    modes = [(module, module.training) for module in model.modules()]
    chunks: list[Tensor] = []
    item_labels: list[Tensor] = []
    layout = contextlib.ExitStack()
    try:
        model.eval()
        bar = progress_bar(
            total=len(dataset), description=description, unit="item", enabled=progress, leave=leave
        )
        with torch.random.fork_rng(devices=[]), layout, bar:
            memory_format = torch.contiguous_format
            for index, (x, y) in enumerate(loader):
                item_labels.append(torch.as_tensor(y))
                if index == 0 and _use_channels_last(model, x, device, channels_last):
                    layout.enter_context(_channels_last(model))
                    memory_format = torch.channels_last
                x = x.to(device, non_blocking=on_cuda)
                if memory_format is torch.channels_last:
                    x = x.contiguous(memory_format=memory_format)
                with torch.inference_mode(), precision:
                    out = model(x)
                chunks.append(out.float().cpu())
                bar.update(len(y))
    finally:
        for module, training in modes:
            module.training = training
    if not chunks:
        raise ValueError("dataset is empty; there is nothing to embed")
    labels = np.asarray(dataset.labels)
    if not np.array_equal(torch.cat(item_labels).numpy(), labels):
        raise ValueError("the labels returned by the dataset's items differ from dataset.labels")
    # Outside inference mode, so the result is an ordinary tensor callers may modify in place.
    return torch.cat(chunks).contiguous(), labels


__all__ = ["AutocastDtype", "embed_dataset"]
