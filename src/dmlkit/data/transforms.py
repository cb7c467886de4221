"""Pillow-based image transforms: random resized crop, flip, resize, centre crop, normalisation.

Every transform is a small picklable class (so DataLoader workers can use it) with a readable
repr. Random choices come only from torch's global RNG, never from Python's ``random`` or numpy:
the trainer makes augmentation reproducible by seeding torch per sample, which only works when
torch is the sole source of randomness.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from PIL import Image
from torch import Tensor

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

ChannelOrder = Literal["RGB", "BGR"]
PilTransform = Callable[[Image.Image], Image.Image]


def pil_to_tensor(image: Image.Image) -> Tensor:
    """Converts a Pillow image to a float32 ``[C, H, W]`` tensor with values in ``[0, 1]``.

    Args:
        image: An 8-bit image (modes such as ``"RGB"``, ``"L"``, ``"RGBA"``) or a 1-bit one.

    Returns:
        The pixels, divided by 255 (1-bit images give exactly 0.0 and 1.0).
    """
    # A palette image's values are palette indices, not intensities.
    if image.mode == "P":
        raise ValueError("palette ('P' mode) images must be converted first, e.g. to 'RGB'")
    arr = np.array(image)
    if arr.dtype == np.bool_:
        pixels = torch.from_numpy(arr).float()
    elif arr.dtype == np.uint8:
        pixels = torch.from_numpy(arr).float().div_(255.0)
    else:
        raise ValueError(
            f"image mode {image.mode!r} (pixel type {arr.dtype}) is not 8-bit; "
            "convert it first, e.g. to 'RGB' or 'L'"
        )
    if pixels.ndim == 2:
        pixels = pixels.unsqueeze(-1)
    return pixels.permute(2, 0, 1).contiguous()


def _uniform(low: float, high: float) -> float:
    return float(torch.empty(1).uniform_(low, high).item())


def _randint(high: int) -> int:
    """A uniform integer in ``[0, high)``."""
    return int(torch.randint(high, (1,)).item())


def _check_range(name: str, value: tuple[float, float], upper: float | None = None) -> None:
    low, high = value
    if not 0 < low <= high or (upper is not None and high > upper):
        limit = f" and at most {upper}" if upper is not None else ""
        raise ValueError(f"{name} must be (low, high) with 0 < low <= high{limit}, got {value}")


def _check_size(name: str, value: int) -> None:
    if value < 1:
        raise ValueError(f"{name} must be a positive number of pixels, got {value}")


@dataclass(frozen=True)
class ToTensor:
    """Converts a Pillow image to a float ``[C, H, W]`` tensor in ``[0, 1]``, unnormalised."""

    def __call__(self, image: Image.Image) -> Tensor:
        """Converts ``image``; see :func:`pil_to_tensor`.

        Args:
            image: The image.

        Returns:
            The float tensor.
        """
        return pil_to_tensor(image)


@dataclass(frozen=True)
class ImageTransform:
    """Converts a Pillow image to a normalised float tensor: ``(pixels - mean) / std``.

    Attributes:
        mean: Per-channel means, in the output channel order and in ``value_scale`` units.
        std: Per-channel standard deviations, same conventions as ``mean``.
        channel_order: ``"RGB"`` or ``"BGR"`` (Caffe-trained networks such as BN-Inception take
            BGR).
        value_scale: The value of a full-intensity pixel before normalisation: 1.0 gives pixels
            in ``[0, 1]`` (torchvision recipes), 255.0 gives 0-255 (the Caffe/BN-Inception
            recipe, usually with std 1).
    """

    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    channel_order: ChannelOrder = "RGB"
    value_scale: float = 1.0

    def __post_init__(self) -> None:
        # Lists from YAML configs become tuples so the transform stays hashable and immutable.
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))
        if len(self.mean) != len(self.std) or not self.mean:
            raise ValueError(
                f"mean and std need the same, non-zero number of channels, got "
                f"{len(self.mean)} and {len(self.std)}"
            )
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std must be positive, got {self.std}")
        if self.channel_order not in ("RGB", "BGR"):
            raise ValueError(f"channel_order must be 'RGB' or 'BGR', got {self.channel_order!r}")
        if self.value_scale <= 0:
            raise ValueError(f"value_scale must be positive, got {self.value_scale}")

    def __call__(self, image: Image.Image) -> Tensor:
        """Converts and normalises ``image``.

        Args:
            image: The image; its channel count must match ``mean`` (or ``mean`` has one entry).

        Returns:
            A float32 ``[C, H, W]`` tensor.
        """
        pixels = pil_to_tensor(image)
        n_channels = pixels.shape[0]
        if len(self.mean) not in (1, n_channels):
            raise ValueError(
                f"mean/std have {len(self.mean)} channels but the image ({image.mode}) has "
                f"{n_channels}"
            )
        if self.channel_order == "BGR":
            if n_channels != 3:
                raise ValueError(f"channel_order 'BGR' needs a 3-channel image, got {image.mode}")
            pixels = pixels.flip(0)
        if self.value_scale != 1.0:
            pixels.mul_(self.value_scale)
        mean = torch.tensor(self.mean).view(-1, 1, 1)
        std = torch.tensor(self.std).view(-1, 1, 1)
        return pixels.sub_(mean).div_(std)


@dataclass(frozen=True)
class RandomResizedCrop:
    """Crops a random box of random area and aspect ratio, then resizes it to ``size`` square.

    The box follows torchvision's ``RandomResizedCrop``: up to 10 tries to draw an area fraction
    from ``scale`` and a log-uniform aspect ratio from ``ratio`` that fit in the image, then a
    centre crop with the ratio clamped to ``ratio``.

    Attributes:
        size: Output side length in pixels.
        scale: Range of the box's area as a fraction of the image's.
        ratio: Range of the box's width / height.
    """

    size: int = 227
    scale: tuple[float, float] = (0.16, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)

    def __post_init__(self) -> None:
        object.__setattr__(self, "scale", tuple(self.scale))
        object.__setattr__(self, "ratio", tuple(self.ratio))
        _check_size("size", self.size)
        _check_range("scale", self.scale, upper=1.0)
        _check_range("ratio", self.ratio)

    def get_box(self, width: int, height: int) -> tuple[int, int, int, int]:
        """Draws a crop box for an image of the given size.

        Args:
            width: Image width.
            height: Image height.

        Returns:
            ``(left, top, box_width, box_height)``.
        """
        area = width * height
        log_low, log_high = math.log(self.ratio[0]), math.log(self.ratio[1])
        for _ in range(10):
            target_area = area * _uniform(*self.scale)
            aspect = math.exp(_uniform(log_low, log_high))
            w = round(math.sqrt(target_area * aspect))
            h = round(math.sqrt(target_area / aspect))
            if 0 < w <= width and 0 < h <= height:
                return _randint(width - w + 1), _randint(height - h + 1), w, h
        # Fallback for extreme image shapes: the largest centred box within the ratio range.
        in_ratio = width / height
        if in_ratio < self.ratio[0]:
            w, h = width, round(width / self.ratio[0])
        elif in_ratio > self.ratio[1]:
            w, h = round(height * self.ratio[1]), height
        else:
            w, h = width, height
        return (width - w) // 2, (height - h) // 2, w, h

    def __call__(self, image: Image.Image) -> Image.Image:
        """Crops and resizes ``image``.

        Args:
            image: The image.

        Returns:
            A ``size`` x ``size`` image.
        """
        left, top, w, h = self.get_box(*image.size)
        # Crop, then resize (not resize(box=...), which blends in pixels outside the box), so the
        # output matches torchvision's RandomResizedCrop on PIL images.
        box = image.crop((left, top, left + w, top + h))
        return box.resize((self.size, self.size), Image.Resampling.BILINEAR)


@dataclass(frozen=True)
class RandomHorizontalFlip:
    """Mirrors the image left-right with probability ``p``."""

    p: float = 0.5

    def __post_init__(self) -> None:
        if not 0.0 <= self.p <= 1.0:
            raise ValueError(f"p must be a probability in [0, 1], got {self.p}")

    def __call__(self, image: Image.Image) -> Image.Image:
        """Flips ``image`` or returns it unchanged.

        Args:
            image: The image.

        Returns:
            The possibly flipped image.
        """
        if float(torch.rand(1).item()) < self.p:
            return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return image


@dataclass(frozen=True)
class Resize:
    """Resizes so the shorter side is ``size`` pixels, keeping the aspect ratio (bilinear)."""

    size: int

    def __post_init__(self) -> None:
        _check_size("size", self.size)

    def __call__(self, image: Image.Image) -> Image.Image:
        """Resizes ``image``.

        Args:
            image: The image.

        Returns:
            The resized image.
        """
        width, height = image.size
        scale = self.size / min(width, height)
        new_size = (max(1, round(width * scale)), max(1, round(height * scale)))
        if new_size == image.size:
            return image
        return image.resize(new_size, Image.Resampling.BILINEAR)


@dataclass(frozen=True)
class CenterCrop:
    """Crops the central ``size`` x ``size`` square."""

    size: int

    def __post_init__(self) -> None:
        _check_size("size", self.size)

    def __call__(self, image: Image.Image) -> Image.Image:
        """Crops ``image``.

        Args:
            image: The image, at least ``size`` pixels on each side.

        Returns:
            The central square.
        """
        width, height = image.size
        if width < self.size or height < self.size:
            raise ValueError(
                f"image of {width}x{height} is smaller than the {self.size}-pixel centre crop; "
                "resize it first"
            )
        left, top = (width - self.size) // 2, (height - self.size) // 2
        return image.crop((left, top, left + self.size, top + self.size))


@dataclass(frozen=True)
class Compose:
    """Applies Pillow transforms in order, then a final image-to-tensor conversion."""

    steps: tuple[PilTransform, ...]
    to_tensor: Callable[[Image.Image], Tensor] = field(default_factory=ToTensor)

    def __post_init__(self) -> None:
        object.__setattr__(self, "steps", tuple(self.steps))

    def __call__(self, image: Image.Image) -> Tensor:
        """Runs every step on ``image``.

        Args:
            image: The image.

        Returns:
            The output of ``to_tensor``.
        """
        for step in self.steps:
            image = step(image)
        return self.to_tensor(image)

    def __repr__(self) -> str:
        lines = [f"    {step!r}," for step in (*self.steps, self.to_tensor)]
        return "Compose(\n" + "\n".join(lines) + "\n)"


def train_transform(
    size: int = 227,
    scale: tuple[float, float] = (0.16, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    flip: bool = True,
    resize: int | None = None,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    channel_order: ChannelOrder = "RGB",
    value_scale: float = 1.0,
) -> Compose:
    """The standard metric-learning training augmentation.

    Optional shorter-side resize, random resized crop, optional horizontal flip, normalisation.

    Args:
        size: Output side length.
        scale: Area range of the random crop, as a fraction of the image.
        ratio: Aspect-ratio (width / height) range of the random crop.
        flip: Whether to flip left-right with probability 0.5.
        resize: If given, first resize the shorter side to this many pixels.
        mean: Per-channel means (see :class:`ImageTransform`).
        std: Per-channel standard deviations.
        channel_order: ``"RGB"`` or ``"BGR"``.
        value_scale: 1.0 for pixels in ``[0, 1]``, 255.0 for 0-255.

    Returns:
        A picklable callable from a Pillow image to a float ``[C, size, size]`` tensor.
    """
    steps: list[PilTransform] = [] if resize is None else [Resize(resize)]
    steps.append(RandomResizedCrop(size, scale, ratio))
    if flip:
        steps.append(RandomHorizontalFlip())
    return Compose(
        tuple(steps), ImageTransform(tuple(mean), tuple(std), channel_order, value_scale)
    )


def eval_transform(
    resize: int = 256,
    crop: int = 227,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    channel_order: ChannelOrder = "RGB",
    value_scale: float = 1.0,
) -> Compose:
    """The standard deterministic evaluation transform: resize shorter side, centre crop.

    Args:
        resize: Shorter-side length after resizing.
        crop: Side length of the centre crop (at most ``resize``).
        mean: Per-channel means (see :class:`ImageTransform`).
        std: Per-channel standard deviations.
        channel_order: ``"RGB"`` or ``"BGR"``.
        value_scale: 1.0 for pixels in ``[0, 1]``, 255.0 for 0-255.

    Returns:
        A picklable callable from a Pillow image to a float ``[C, crop, crop]`` tensor.
    """
    if crop > resize:
        raise ValueError(f"crop ({crop}) must not exceed resize ({resize})")
    return Compose(
        (Resize(resize), CenterCrop(crop)),
        ImageTransform(tuple(mean), tuple(std), channel_order, value_scale),
    )
