"""MobileNetV2 (Sandler et al., 2018) with torchvision's parameter names."""

from __future__ import annotations

from torch import Tensor, nn

from .base import BACKBONES, Backbone, check_num_classes, check_positive, conv_bn_act, init_weights

# (expansion t, output channels c, repeats n, stride of the first repeat s), as in the paper.
_INVERTED_RESIDUAL_SETTINGS = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
_STEM_CHANNELS = 32
_LAST_CHANNELS = 1280


class InvertedResidual(nn.Module):
    """Expansion 1x1, depthwise 3x3, linear projection 1x1; residual when shapes allow.

    Args:
        in_channels: Input channels.
        out_channels: Output channels.
        stride: Stride of the depthwise convolution.
        expansion: Hidden channels as a multiple of ``in_channels`` (no expansion layer at 1).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = in_channels * expansion
        self.use_residual = stride == 1 and in_channels == out_channels
        layers: list[nn.Module] = []
        if expansion != 1:
            layers.append(conv_bn_act(in_channels, hidden, 1, activation=nn.ReLU6))
        layers += [
            conv_bn_act(hidden, hidden, 3, stride=stride, groups=hidden, activation=nn.ReLU6),
            nn.Conv2d(hidden, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """Applies the block.

        Args:
            x: ``[B, in_channels, H, W]``.

        Returns:
            ``[B, out_channels, H / stride, W / stride]``.
        """
        out: Tensor = self.conv(x)
        return x + out if self.use_residual else out


@BACKBONES.register("mobilenet_v2")
class MobileNetV2(Backbone):
    """MobileNetV2 (width 1.0) whose ``forward`` returns the 1280-channel feature map.

    Parameter names are torchvision's (``features.0`` stem, ``features.1`` to ``features.17``
    inverted residuals, ``features.18`` last 1x1 conv, ``classifier.1``), so torchvision's
    ImageNet checkpoint ``mobilenet_v2-b0353104.pth`` loads. That checkpoint expects RGB input
    scaled to [0, 1] and normalised with the ImageNet mean (0.485, 0.456, 0.406) and standard
    deviation (0.229, 0.224, 0.225). The feature map is 1/32 of the input size (7x7 at 224).
    Without the classifier the network has 2,223,872 parameters (3,504,872 with it).

    Args:
        in_channels: Input channels (a pretrained checkpoint needs 3).
        num_classes: If given, keep torchvision's classifier ``Dropout(0.2), Linear(1280,
            num_classes)`` as ``classifier``; ``forward`` does not apply it.
    """

    classifier_key = "classifier"

    def __init__(self, in_channels: int = 3, num_classes: int | None = None) -> None:
        super().__init__()
        check_positive(in_channels, "in_channels")
        num_classes = check_num_classes(num_classes)
        layers: list[nn.Module] = [
            conv_bn_act(in_channels, _STEM_CHANNELS, 3, stride=2, activation=nn.ReLU6)
        ]
        channels = _STEM_CHANNELS
        for expansion, out_channels, repeats, first_stride in _INVERTED_RESIDUAL_SETTINGS:
            for i in range(repeats):
                stride = first_stride if i == 0 else 1
                layers.append(InvertedResidual(channels, out_channels, stride, expansion))
                channels = out_channels
        layers.append(conv_bn_act(channels, _LAST_CHANNELS, 1, activation=nn.ReLU6))
        self.features = nn.Sequential(*layers)
        self.num_features = _LAST_CHANNELS
        init_weights(self)
        if num_classes is not None:
            linear = nn.Linear(_LAST_CHANNELS, num_classes)
            # torchvision's initialisation of this layer.
            nn.init.normal_(linear.weight, 0, 0.01)
            nn.init.zeros_(linear.bias)
            self.classifier = nn.Sequential(nn.Dropout(0.2), linear)

    def forward(self, x: Tensor) -> Tensor:
        """Computes the feature map.

        Args:
            x: ``[B, in_channels, H, W]``.

        Returns:
            ``[B, 1280, ceil(H / 32), ceil(W / 32)]``.
        """
        out: Tensor = self.features(x)
        return out
