"""Any timm model as a backbone, when timm can be imported."""

from __future__ import annotations

import importlib
from typing import Any

from torch import Tensor

from .base import Backbone, check_positive
from .loading import LoadReport, StateDictSource, load_weights

# create_model arguments that TimmBackbone sets itself.
_RESERVED_OPTIONS = ("pretrained", "num_classes", "global_pool", "in_chans")


def _import_timm() -> Any:
    try:
        return importlib.import_module("timm")
    # timm imports torchvision at import time; a broken torchvision fails with errors other
    # than ImportError (e.g. RuntimeError "operator torchvision::nms does not exist").
    except Exception as exc:
        raise ImportError(
            "timm backbones need the 'timm' package, which is not importable here "
            f"({type(exc).__name__}: {exc}). timm imports torchvision, so it needs a "
            "torchvision build that matches the installed torch; use a built-in backbone "
            "(see dmlkit.models.list_backbones()) otherwise."
        ) from exc


class TimmBackbone(Backbone):
    """Wraps ``timm.create_model(name, num_classes=0, global_pool="")``.

    ``forward`` returns ``model.forward_features(x)``, which must be a ``[B, C, H, W]`` map
    (convolutional models; transformers that return token sequences are rejected with an
    error). timm's own classifier is removed, and its keys are skipped when a published
    checkpoint is loaded.

    Args:
        name: The timm model name, e.g. ``"efficientnet_b0"``.
        in_channels: Input channels (timm's ``in_chans``).
        **options: Further keyword arguments for ``timm.create_model``.
    """

    def __init__(self, name: str, in_channels: int = 3, **options: Any) -> None:
        super().__init__()
        check_positive(in_channels, "in_channels")
        reserved = sorted(set(options) & set(_RESERVED_OPTIONS))
        if reserved:
            raise ValueError(
                f"timm option(s) {', '.join(reserved)} are set by dmlkit (headless model, "
                "feature map output, in_channels, weights through pretrained=path)"
            )
        timm = _import_timm()
        # Typed Any: timm models add methods (forward_features) that nn.Module does not declare.
        self.model: Any = timm.create_model(
            name, pretrained=False, num_classes=0, global_pool="", in_chans=in_channels, **options
        )
        self.num_features = int(self.model.num_features)
        cfg = getattr(self.model, "default_cfg", None) or {}
        self.classifier_key = cfg.get("classifier")

    def load_pretrained(self, source: StateDictSource) -> LoadReport:
        """Loads a timm checkpoint (keys without the wrapper's ``model.`` prefix), strictly.

        Args:
            source: A state dict or a path to one (see :func:`load_weights`).

        Returns:
            The :class:`LoadReport`.
        """
        key = self.classifier_key
        return load_weights(self.model, source, ignore=(key,) if key else ())

    def forward(self, x: Tensor) -> Tensor:
        """Computes the feature map with timm's ``forward_features``.

        Args:
            x: ``[B, in_channels, H, W]``.

        Returns:
            ``[B, num_features, H', W']``.
        """
        out: Tensor = self.model.forward_features(x)
        if out.ndim != 4:
            raise ValueError(
                f"timm model {type(self.model).__name__} returned features of shape "
                f"{tuple(out.shape)} from forward_features; dmlkit backbones must return a "
                "[B, C, H, W] feature map"
            )
        return out
