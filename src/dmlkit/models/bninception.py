"""BN-Inception (Inception-v2 with BatchNorm; Ioffe & Szegedy, 2015) with Cadene's names.

The definition follows the Caffe model ported by Cadene's ``pretrainedmodels``
(``bninception``), whose parameter names it keeps (``conv1_7x7_s2``, ``conv1_7x7_s2_bn``, ...,
``inception_5b_pool_proj_bn``, ``last_linear``), so the ImageNet checkpoint used by most deep
metric learning papers, ``bn_inception-52deb4733.pth``, loads (its BatchNorm vectors are stored
as ``(1, C)``; :func:`~dmlkit.models.load_weights` squeezes them).
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import BACKBONES, Backbone, check_num_classes, check_positive, init_weights


class _Block(NamedTuple):
    """Channel counts of one inception block; 0 means the branch is absent."""

    name: str
    in_channels: int
    c1x1: int
    c3x3_reduce: int
    c3x3: int
    double_reduce: int
    double: int
    # "avg"/"max": 3x3 stride-1 pooling then a 1x1 projection; "reduce": 3x3 stride-2 max
    # pooling without projection, and the 3x3 branches carry stride 2 (blocks 3c and 4e).
    pool: Literal["avg", "max", "reduce"]
    pool_proj: int


_BLOCKS = (
    _Block("3a", 192, 64, 64, 64, 64, 96, "avg", 32),
    _Block("3b", 256, 64, 64, 96, 64, 96, "avg", 64),
    _Block("3c", 320, 0, 128, 160, 64, 96, "reduce", 0),
    _Block("4a", 576, 224, 64, 96, 96, 128, "avg", 128),
    _Block("4b", 576, 192, 96, 128, 96, 128, "avg", 128),
    _Block("4c", 576, 160, 128, 160, 128, 160, "avg", 128),
    _Block("4d", 608, 96, 128, 192, 160, 192, "avg", 128),
    _Block("4e", 608, 0, 128, 192, 192, 256, "reduce", 0),
    _Block("5a", 1056, 352, 192, 320, 160, 224, "avg", 128),
    _Block("5b", 1024, 352, 192, 320, 192, 224, "max", 128),
)
_NUM_FEATURES = 1024


@BACKBONES.register("bn_inception")
class BNInception(Backbone):
    """BN-Inception whose ``forward`` returns the 1024-channel ``inception_5b`` feature map.

    Input convention of the Caffe-trained checkpoint: **BGR** channel order, pixel values on
    0-255 minus the per-channel mean [104, 117, 128] (no division by a standard deviation).
    Preprocessing is the data pipeline's job. The feature map is 7x7 for 224x224 and 227x227
    inputs. The stride-2 blocks concatenate a convolution with a ceil-mode pooling, which
    agree in size only when the map entering them is even; inputs whose sides are multiples of
    32 always work.

    Differences from Cadene's module, none of which changes parameter names or ImageNet
    outputs: pooling layers are functional calls (they hold no parameters); BatchNorm uses
    PyTorch's default momentum 0.1 (Cadene's 0.9 copies Caffe's moving-average fraction,
    which means the opposite in PyTorch); ``forward`` stops at the feature map.

    With a 1000-class ``last_linear`` the model has 11,295,240 parameters: 10,270,240 in the
    feature extractor and 1,025,000 in the classifier (Cadene's model, same count).

    Args:
        in_channels: Input channels (a pretrained checkpoint needs 3).
        num_classes: If given, keep the classifier ``last_linear`` (``Linear(1024,
            num_classes)``); ``forward`` does not apply it.
    """

    classifier_key = "last_linear"

    def __init__(self, in_channels: int = 3, num_classes: int | None = None) -> None:
        super().__init__()
        check_positive(in_channels, "in_channels")
        num_classes = check_num_classes(num_classes)
        self._add_conv("conv1_7x7_s2", in_channels, 64, 7, stride=2)
        self._add_conv("conv2_3x3_reduce", 64, 64, 1)
        self._add_conv("conv2_3x3", 64, 192, 3)
        for b in _BLOCKS:
            prefix = f"inception_{b.name}"
            stride = 2 if b.pool == "reduce" else 1
            if b.c1x1:
                self._add_conv(f"{prefix}_1x1", b.in_channels, b.c1x1, 1)
            self._add_conv(f"{prefix}_3x3_reduce", b.in_channels, b.c3x3_reduce, 1)
            self._add_conv(f"{prefix}_3x3", b.c3x3_reduce, b.c3x3, 3, stride=stride)
            self._add_conv(f"{prefix}_double_3x3_reduce", b.in_channels, b.double_reduce, 1)
            self._add_conv(f"{prefix}_double_3x3_1", b.double_reduce, b.double, 3)
            self._add_conv(f"{prefix}_double_3x3_2", b.double, b.double, 3, stride=stride)
            if b.pool_proj:
                self._add_conv(f"{prefix}_pool_proj", b.in_channels, b.pool_proj, 1)
        self.num_features = _NUM_FEATURES
        init_weights(self)
        if num_classes is not None:
            self.last_linear = nn.Linear(_NUM_FEATURES, num_classes)

    def _add_conv(
        self, name: str, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1
    ) -> None:
        # Caffe's convolutions have biases; the BatchNorm is a sibling named "<name>_bn".
        conv = nn.Conv2d(
            in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2
        )
        self.add_module(name, conv)
        self.add_module(f"{name}_bn", nn.BatchNorm2d(out_channels))

    def _conv(self, name: str, x: Tensor) -> Tensor:
        out: Tensor = getattr(self, f"{name}_bn")(getattr(self, name)(x))
        return F.relu(out, inplace=True)

    def _block(self, b: _Block, x: Tensor) -> Tensor:
        prefix = f"inception_{b.name}"
        branches = []
        if b.c1x1:
            branches.append(self._conv(f"{prefix}_1x1", x))
        branches.append(self._conv(f"{prefix}_3x3", self._conv(f"{prefix}_3x3_reduce", x)))
        double = self._conv(f"{prefix}_double_3x3_reduce", x)
        double = self._conv(f"{prefix}_double_3x3_1", double)
        branches.append(self._conv(f"{prefix}_double_3x3_2", double))
        if b.pool == "reduce":
            branches.append(F.max_pool2d(x, 3, stride=2, ceil_mode=True))
            if branches[0].shape[-2:] != branches[-1].shape[-2:]:
                raise ValueError(
                    f"BN-Inception cannot process this input size: the map entering {prefix} "
                    f"is {tuple(x.shape[-2:])}, but its stride-2 blocks need even sizes; use "
                    "inputs whose sides are multiples of 32, or 224 or 227"
                )
        else:
            if b.pool == "avg":
                pooled = F.avg_pool2d(x, 3, stride=1, padding=1, ceil_mode=True)
            else:
                pooled = F.max_pool2d(x, 3, stride=1, padding=1, ceil_mode=True)
            branches.append(self._conv(f"{prefix}_pool_proj", pooled))
        return torch.cat(branches, dim=1)

    def forward(self, x: Tensor) -> Tensor:
        """Computes the ``inception_5b`` feature map.

        Args:
            x: ``[B, in_channels, H, W]``, BGR minus the mean for the ImageNet weights.

        Returns:
            ``[B, 1024, H', W']``, 7x7 for 224x224 input.
        """
        x = self._conv("conv1_7x7_s2", x)
        x = F.max_pool2d(x, 3, stride=2, ceil_mode=True)
        x = self._conv("conv2_3x3", self._conv("conv2_3x3_reduce", x))
        x = F.max_pool2d(x, 3, stride=2, ceil_mode=True)
        for b in _BLOCKS:
            x = self._block(b, x)
        return x
