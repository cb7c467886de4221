"""A run's evaluation preprocessing as data: described once, rebuilt exactly for new images."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch.nn.functional as F
from torch import Tensor

from ..data import ToTensor, eval_transform
from .config import Config
from .datasets import DATASETS, INK_DATASETS
from .run_data import split_dataset


def evaluation_preprocessing(config: Config, in_channels: int) -> dict[str, Any]:
    """The evaluation preprocessing of a run, as a JSON description (:func:`preprocessing_transform`
    builds it). Galleries and exported models record it.

    Image-file runs use their evaluation transform (resize, centre crop, normalisation). Array
    runs (digits, Omniglot) saw float arrays: images are read in grayscale (or RGB), scaled to
    [0, 1] and area-resized to the run's ``data.image_size`` (else its test items' size).
    """
    if "transform" in DATASETS.parameters(config.data.name, "data"):
        t = config.data.transform
        return {
            "kind": "image",
            "mode": "RGB",
            "resize": int(t.eval_resize),
            "crop": int(t.eval_crop),
            "mean": [float(v) for v in t.mean],
            "std": [float(v) for v in t.std],
            "channel_order": str(t.channel_order),
            "value_scale": float(t.value_scale),
        }
    size = config.data.image_size
    if size is not None:
        shape = [int(size), int(size)]
    else:
        item, _ = split_dataset(config, "test")[0]
        shape = [int(v) for v in item.shape[-2:]]
    return {
        "kind": "array",
        "mode": "L" if in_channels == 1 else "RGB",
        "size": shape,
        "invert": config.data.name in INK_DATASETS,
    }


class _ArrayImageTransform:
    """Pillow image → float [C, H, W] in [0, 1] (inverted for Omniglot, whose arrays hold the ink
    as 1), area-resized: the array runs' preprocessing."""

    def __init__(self, size: Sequence[int], invert: bool = False) -> None:
        self.size = (int(size[0]), int(size[1]))
        self.invert = invert
        self.to_tensor = ToTensor()

    def __call__(self, image: Any) -> Tensor:
        x = self.to_tensor(image).float()
        if self.invert:
            x = 1 - x
        if tuple(x.shape[-2:]) != self.size:
            x = F.interpolate(x[None], size=self.size, mode="area")[0]
        return x


def preprocessing_transform(description: dict[str, Any]) -> Callable[[Any], Tensor]:
    """The transform a description of :func:`evaluation_preprocessing` stands for: a Pillow
    image to model input."""
    if description["kind"] == "image":
        return eval_transform(
            resize=description["resize"],
            crop=description["crop"],
            mean=description["mean"],
            std=description["std"],
            channel_order=description["channel_order"],
            value_scale=description["value_scale"],
        )
    if description["kind"] == "array":
        return _ArrayImageTransform(description["size"], bool(description.get("invert", False)))
    raise ValueError(f"unknown preprocessing kind {description['kind']!r}")


def input_shape(description: dict[str, Any]) -> tuple[int, int]:
    """(height, width) of the model input a description's transform produces."""
    if description["kind"] == "image":
        return int(description["crop"]), int(description["crop"])
    height, width = description["size"]
    return int(height), int(width)


__all__ = ["evaluation_preprocessing", "input_shape", "preprocessing_transform"]
