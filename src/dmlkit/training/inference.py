"""Using a trained run: rebuild its model from a checkpoint and embed a dataset."""

from __future__ import annotations

from pathlib import Path
from typing import cast

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from ..data import LabelledDataset
from ..models import EmbeddingModel
from .builders import build_embedding_model
from .checkpoint import load_checkpoint
from .config import Config
from .config_loading import config_from_dict


@torch.no_grad()
def embed_dataset(
    model: nn.Module,
    dataset: LabelledDataset,
    *,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    num_workers: int = 0,
) -> tuple[Tensor, np.ndarray]:
    """Embeddings of every item of a dataset, in order, with the model in evaluation mode.

    Args:
        model: Maps a batch of inputs to embeddings.
        dataset: Yields (input, label) pairs and has ``labels``.
        batch_size: Items per forward pass.
        device: Where the model runs.
        num_workers: DataLoader worker processes.

    Returns:
        (N, D) float32 embeddings on the CPU, and the (N,) labels.
    """
    was_training = model.training
    model.eval()
    loader: DataLoader[tuple[Tensor, int]] = DataLoader(
        cast(Dataset[tuple[Tensor, int]], dataset),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
    )
    chunks = [model(x.to(device)).float().cpu() for x, _ in loader]
    model.train(was_training)
    return torch.cat(chunks), np.asarray(dataset.labels)


def load_trained_model(path: str | Path) -> tuple[Config, EmbeddingModel]:
    """The config and trained model of a checkpoint written by the trainer.

    The backbone is built from the config without its ``pretrained`` file: every weight comes
    from the checkpoint.

    Args:
        path: A ``last.pt`` or ``best.pt`` of a run.

    Returns:
        The run's config and its model, in evaluation mode on the CPU.
    """
    payload = load_checkpoint(path)
    config = config_from_dict(payload["config"], check=False)
    model = build_embedding_model(config.model, int(payload["in_channels"]), pretrained=False)
    model.load_state_dict(payload["model"])
    return config, model.eval()
