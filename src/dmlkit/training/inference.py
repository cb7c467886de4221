"""Using a trained run: rebuild its model from a checkpoint."""

from __future__ import annotations

from pathlib import Path

from ..models import EmbeddingModel
from .builders import build_embedding_model
from .checkpoint import load_checkpoint
from .config import Config
from .config_loading import config_from_dict


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
