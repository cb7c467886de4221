"""Digests that tie saved files to the exact weights and bytes they came from."""

from __future__ import annotations

import hashlib
import os

import torch
from torch import nn


def state_digest(module: nn.Module) -> str:
    """A digest of a module's state: every tensor's name, dtype, shape and bytes, in order.

    Any change to a weight or buffer (BatchNorm statistics included) changes it. Galleries,
    feature caches and exported models record it, so a file can be matched to its model.

    Args:
        module: The model or a part of it.

    Returns:
        32 hex digits (BLAKE2b, 128 bits).
    """
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in module.state_dict().items():
        data = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{data.dtype}:{tuple(data.shape)};".encode())
        digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def file_sha256(path: str | os.PathLike[str]) -> str:
    """The SHA-256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


__all__ = ["file_sha256", "state_digest"]
