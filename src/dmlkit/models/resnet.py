"""ResNet-18 and ResNet-50 (He et al., 2016) with torchvision's parameter names."""

from __future__ import annotations

from torch import Tensor, nn

from .base import BACKBONES, Backbone, check_num_classes, check_positive, conv2d, init_weights


def _downsample(in_channels: int, out_channels: int, stride: int) -> nn.Sequential | None:
    if stride == 1 and in_channels == out_channels:
        return None
    return nn.Sequential(
        conv2d(in_channels, out_channels, 1, stride=stride), nn.BatchNorm2d(out_channels)
    )


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a shortcut (ResNet-18/34).

    Args:
        in_channels: Input channels.
        planes: Output channels.
        stride: Stride of the first convolution.
    """

    expansion = 1

    def __init__(self, in_channels: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = conv2d(in_channels, planes, 3, stride=stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv2d(planes, planes, 3)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _downsample(in_channels, planes, stride)

    def forward(self, x: Tensor) -> Tensor:
        """Applies the block.

        Args:
            x: ``[B, in_channels, H, W]``.

        Returns:
            ``[B, planes, H / stride, W / stride]``.
        """
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        result: Tensor = self.relu(out + identity)
        return result


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carrying the stride, "ResNet v1.5"), 1x1 expand, with a shortcut.

    Args:
        in_channels: Input channels.
        planes: Width of the 3x3 convolution; the block outputs ``4 * planes`` channels.
        stride: Stride of the 3x3 convolution.
    """

    expansion = 4

    def __init__(self, in_channels: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out_channels = planes * self.expansion
        self.conv1 = conv2d(in_channels, planes, 1)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv2d(planes, planes, 3, stride=stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv2d(planes, out_channels, 1)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _downsample(in_channels, out_channels, stride)

    def forward(self, x: Tensor) -> Tensor:
        """Applies the block.

        Args:
            x: ``[B, in_channels, H, W]``.

        Returns:
            ``[B, 4 * planes, H / stride, W / stride]``.
        """
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        result: Tensor = self.relu(out + identity)
        return result


class ResNet(Backbone):
    """ResNet whose ``forward`` returns the last stage's feature map (1/32 of the input size).

    Parameter names are torchvision's (``conv1``, ``bn1``, ``layer1.0.conv1``, ...,
    ``layerN.0.downsample.0``/``.1``, ``fc``), so torchvision checkpoints load. They expect RGB
    input in [0, 1] normalised with the ImageNet mean and standard deviation.

    Args:
        block: :class:`BasicBlock` or :class:`Bottleneck`.
        layers: Number of blocks in each of the four stages.
        in_channels: Input channels (a pretrained checkpoint needs 3).
        num_classes: If given, keep the classifier ``fc`` (``Linear(num_features,
            num_classes)``); ``forward`` does not apply it.
    """

    classifier_key = "fc"

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: tuple[int, int, int, int],
        in_channels: int = 3,
        num_classes: int | None = None,
    ) -> None:
        super().__init__()
        check_positive(in_channels, "in_channels")
        num_classes = check_num_classes(num_classes)
        self.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        channels = 64
        stages: list[nn.Sequential] = []
        for i, (planes, repeats) in enumerate(zip((64, 128, 256, 512), layers, strict=True)):
            blocks: list[nn.Module] = []
            for j in range(repeats):
                stride = 2 if i > 0 and j == 0 else 1
                blocks.append(block(channels, planes, stride))
                channels = planes * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.num_features = channels
        if num_classes is not None:
            self.fc = nn.Linear(channels, num_classes)
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        """Computes the feature map.

        Args:
            x: ``[B, in_channels, H, W]``.

        Returns:
            ``[B, num_features, ceil(H / 32), ceil(W / 32)]``.
        """
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        out: Tensor = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return out


@BACKBONES.register("resnet18")
def resnet18(in_channels: int = 3, num_classes: int | None = None) -> ResNet:
    """ResNet-18: 512 feature channels; 11,689,512 parameters with a 1000-class ``fc``.

    Args:
        in_channels: Input channels.
        num_classes: Keep a classifier with this many classes (see :class:`ResNet`).

    Returns:
        The backbone.
    """
    return ResNet(BasicBlock, (2, 2, 2, 2), in_channels=in_channels, num_classes=num_classes)


@BACKBONES.register("resnet50")
def resnet50(in_channels: int = 3, num_classes: int | None = None) -> ResNet:
    """ResNet-50 (v1.5): 2048 feature channels; 25,557,032 parameters with a 1000-class ``fc``.

    Args:
        in_channels: Input channels.
        num_classes: Keep a classifier with this many classes (see :class:`ResNet`).

    Returns:
        The backbone.
    """
    return ResNet(Bottleneck, (3, 4, 6, 3), in_channels=in_channels, num_classes=num_classes)
