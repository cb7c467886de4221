"""The embedding model: backbone, global pooling and embedding head."""

from __future__ import annotations

from typing import Any, Literal, Self, get_args

import torch.nn.functional as F
from torch import Tensor, nn

from .base import Backbone, check_positive
from .loading import StateDictSource
from .registry import create_backbone

Pooling = Literal["avg", "max", "avgmax"]
_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


class GlobalPool(nn.Module):
    """Global pooling of a ``[B, C, H, W]`` feature map to ``[B, C]``.

    ``"avgmax"`` is the sum of average and max pooling, as in DDTAS's BN-Inception model
    (``adaptive_max_pool2d(x, 1) + adaptive_avg_pool2d(x, 1)``).

    Args:
        mode: ``"avg"``, ``"max"`` or ``"avgmax"``.
    """

    def __init__(self, mode: Pooling = "avg") -> None:
        super().__init__()
        if mode not in get_args(Pooling):
            raise ValueError(f"pooling must be one of {get_args(Pooling)}, got {mode!r}")
        self.mode = mode

    def forward(self, x: Tensor) -> Tensor:
        """Pools over the spatial dimensions.

        Args:
            x: ``[B, C, H, W]``.

        Returns:
            ``[B, C]``.
        """
        if x.ndim != 4:
            raise ValueError(f"global pooling needs a [B, C, H, W] map, got shape {tuple(x.shape)}")
        if self.mode == "avg":
            return x.mean(dim=(2, 3))
        if self.mode == "max":
            return x.amax(dim=(2, 3))
        return x.mean(dim=(2, 3)) + x.amax(dim=(2, 3))

    def extra_repr(self) -> str:
        """Shows the mode when the module is printed.

        Returns:
            ``"mode=..."``.
        """
        return f"mode={self.mode!r}"


class EmbeddingHead(nn.Module):
    """Maps pooled features to embeddings, optionally L2-normalised.

    With ``hidden_dim=None`` the head is one linear layer (DDTAS's head: ``Linear(1024, 512)``
    with bias, then L2 normalisation); otherwise it is Linear, BatchNorm, ReLU, Linear.

    Args:
        in_features: Size of the input vectors.
        embedding_dim: Size of the embeddings.
        hidden_dim: Hidden size of the two-layer variant; None for a single linear layer.
        normalize: Whether to L2-normalise the output.
    """

    def __init__(
        self,
        in_features: int,
        embedding_dim: int,
        *,
        hidden_dim: int | None = None,
        normalize: bool = True,
    ) -> None:
        super().__init__()
        self.in_features = check_positive(in_features, "in_features")
        self.embedding_dim = check_positive(embedding_dim, "embedding_dim")
        self.normalize = normalize
        layers: list[nn.Module]
        if hidden_dim is None:
            layers = [nn.Linear(in_features, embedding_dim)]
        else:
            check_positive(hidden_dim, "hidden_dim")
            layers = [
                nn.Linear(in_features, hidden_dim),
                nn.BatchNorm1d(hidden_dim),
                nn.ReLU(inplace=True),
                nn.Linear(hidden_dim, embedding_dim),
            ]
        self.layers = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """Computes embeddings.

        Args:
            x: ``[B, in_features]``.

        Returns:
            ``[B, embedding_dim]``, unit-length rows when ``normalize``.
        """
        if x.ndim != 2 or x.shape[1] != self.in_features:
            raise ValueError(
                f"EmbeddingHead expects [B, {self.in_features}] inputs, got {tuple(x.shape)}"
            )
        out: Tensor = self.layers(x)
        return F.normalize(out, dim=1) if self.normalize else out


class EmbeddingModel(nn.Module):
    """Backbone, global pooling and embedding head.

    Args:
        backbone: A :class:`Backbone` (any module with an integer ``num_features`` whose
            forward returns ``[B, num_features, H, W]``).
        embedding_dim: Size of the embeddings.
        pooling: Global pooling, see :class:`GlobalPool`.
        hidden_dim: Hidden size of a two-layer head; None for a linear head.
        normalize: Whether embeddings are L2-normalised.
        freeze_bn: Keep the backbone's BatchNorm layers in eval mode, even after ``train()``,
            so their running statistics stay those of the pretrained weights (DDTAS does
            this). Their affine parameters still train. A hidden-layer head's BatchNorm is not
            frozen: its statistics start from nothing.
    """

    def __init__(
        self,
        backbone: Backbone,
        embedding_dim: int,
        *,
        pooling: Pooling = "avg",
        hidden_dim: int | None = None,
        normalize: bool = True,
        freeze_bn: bool = False,
    ) -> None:
        super().__init__()
        num_features = getattr(backbone, "num_features", None)
        if not isinstance(backbone, nn.Module) or not isinstance(num_features, int):
            raise TypeError(
                "backbone must be an nn.Module with an integer num_features attribute, got "
                f"{type(backbone).__name__}"
            )
        self.backbone = backbone
        self.pool = GlobalPool(pooling)
        self.head = EmbeddingHead(
            num_features, embedding_dim, hidden_dim=hidden_dim, normalize=normalize
        )
        self.freeze_bn = freeze_bn
        self.train()

    def train(self, mode: bool = True) -> Self:
        """Sets training mode; with ``freeze_bn`` the backbone's BatchNorm stays in eval mode.

        Args:
            mode: True for training mode, False for evaluation mode.

        Returns:
            The model.
        """
        super().train(mode)
        if self.freeze_bn:
            for module in self.backbone.modules():
                if isinstance(module, _BATCH_NORMS):
                    module.eval()
        return self

    def features(self, x: Tensor) -> Tensor:
        """Pooled backbone features, the head's input (what a feature cache stores).

        Args:
            x: ``[B, in_channels, H, W]``.

        Returns:
            ``[B, num_features]``.
        """
        pooled: Tensor = self.pool(self.backbone(x))
        return pooled

    def forward(self, x: Tensor) -> Tensor:
        """Computes embeddings.

        Args:
            x: ``[B, in_channels, H, W]``.

        Returns:
            ``[B, embedding_dim]``.
        """
        out: Tensor = self.head(self.features(x))
        return out


def build_model(
    backbone: str,
    embedding_dim: int,
    *,
    pretrained: StateDictSource | None = None,
    pooling: Pooling = "avg",
    hidden_dim: int | None = None,
    normalize: bool = True,
    freeze_bn: bool = False,
    in_channels: int = 3,
    **backbone_options: Any,
) -> EmbeddingModel:
    """Builds an embedding model, loading published backbone weights if given.

    Args:
        backbone: A backbone name (see :func:`create_backbone`).
        embedding_dim: Size of the embeddings.
        pretrained: Backbone weights: a state dict or a path to one, e.g. an ImageNet
            checkpoint. To resume a trained :class:`EmbeddingModel`, build it without
            ``pretrained`` and call :func:`load_weights` on the whole model.
        pooling: Global pooling: ``"avg"``, ``"max"`` or ``"avgmax"``.
        hidden_dim: Hidden size of a two-layer head; None for a linear head.
        normalize: Whether embeddings are L2-normalised.
        freeze_bn: Freeze the backbone's BatchNorm statistics (see :class:`EmbeddingModel`).
        in_channels: Input channels of the backbone.
        **backbone_options: Further backbone options, e.g. ``width`` for ``"convnet"``.

    Returns:
        The model, in training mode.
    """
    net = create_backbone(
        backbone, pretrained=pretrained, in_channels=in_channels, **backbone_options
    )
    return EmbeddingModel(
        net,
        embedding_dim,
        pooling=pooling,
        hidden_dim=hidden_dim,
        normalize=normalize,
        freeze_bn=freeze_bn,
    )
