"""The backbone contract and the layers shared by several backbones."""

from __future__ import annotations

from torch import nn

from ..registry import Registry
from .loading import LoadReport, StateDictSource, load_weights


class Backbone(nn.Module):
    """A network that maps images to a feature map.

    ``forward(x)`` takes a ``[B, in_channels, H, W]`` batch and returns the final feature map
    ``[B, num_features, H', W']``, before global pooling. Backbones whose published checkpoints
    carry a classifier keep it only when built with ``num_classes``; ``forward`` never applies
    it (pool the feature map and call the classifier yourself to get logits).

    Attributes:
        num_features: Channels of the feature map.
        classifier_key: Key prefix of the classifier in published checkpoints (``"fc"``,
            ``"classifier"``, ...), or None if they have none.
    """

    num_features: int
    classifier_key: str | None = None

    def load_pretrained(self, source: StateDictSource) -> LoadReport:
        """Loads a published or saved checkpoint strictly.

        The classifier's keys are skipped when this backbone has no classifier, so both a full
        published checkpoint and a headless one load.

        Args:
            source: A state dict or a path to one (see :func:`load_weights`).

        Returns:
            The :class:`LoadReport`.
        """
        key = self.classifier_key
        ignore = (key,) if key is not None and not hasattr(self, key) else ()
        return load_weights(self, source, ignore=ignore)


BACKBONES = Registry("backbone", Backbone)


def conv2d(
    in_channels: int, out_channels: int, kernel_size: int, *, stride: int = 1, groups: int = 1
) -> nn.Conv2d:
    """A bias-free convolution with "same" padding (output size = input size / stride).

    Args:
        in_channels: Input channels.
        out_channels: Output channels.
        kernel_size: Odd square kernel size.
        stride: Convolution stride.
        groups: Convolution groups (``in_channels`` for a depthwise convolution).

    Returns:
        The ``nn.Conv2d``.
    """
    return nn.Conv2d(
        in_channels,
        out_channels,
        kernel_size,
        stride=stride,
        padding=(kernel_size - 1) // 2,
        groups=groups,
        bias=False,
    )


def conv_bn_act(
    in_channels: int,
    out_channels: int,
    kernel_size: int,
    *,
    stride: int = 1,
    groups: int = 1,
    activation: type[nn.Module] | None = nn.ReLU,
) -> nn.Sequential:
    """Convolution (no bias, "same" padding), BatchNorm, then an optional activation.

    The layers are indexed 0, 1, 2, which is torchvision's ``Conv2dNormActivation`` layout, so
    parameter names match torchvision checkpoints.

    Args:
        in_channels: Input channels.
        out_channels: Output channels.
        kernel_size: Odd square kernel size.
        stride: Convolution stride.
        groups: Convolution groups (``in_channels`` for a depthwise convolution).
        activation: Activation class, constructed with ``inplace=True``; None for none.

    Returns:
        The ``nn.Sequential``.
    """
    layers: list[nn.Module] = [
        conv2d(in_channels, out_channels, kernel_size, stride=stride, groups=groups),
        nn.BatchNorm2d(out_channels),
    ]
    if activation is not None:
        layers.append(activation(inplace=True))
    return nn.Sequential(*layers)


def init_weights(module: nn.Module) -> None:
    """Initialises convolutions and normalisation layers as torchvision does.

    Convolutions get Kaiming-normal weights (fan-out, ReLU gain) and zero biases; BatchNorm
    layers get unit scale and zero shift. Linear layers keep PyTorch's default.

    Args:
        module: The module whose submodules are initialised in place.
    """
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def check_positive(value: int, name: str) -> int:
    """Checks that an integer option is positive.

    Args:
        value: The value to check.
        name: The option name used in the error message.

    Returns:
        The value, unchanged.
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def check_num_classes(num_classes: int | None) -> int | None:
    """Checks the ``num_classes`` option of backbones that may keep their classifier.

    Args:
        num_classes: None (no classifier) or a positive integer.

    Returns:
        The value, unchanged.
    """
    return None if num_classes is None else check_positive(num_classes, "num_classes")
