"""Backbones by name: :func:`create_backbone` and :func:`list_backbones`.

Built-in backbones are registered in :data:`BACKBONES` (:mod:`dmlkit.models.base`) where they are
defined;
a user's backbone (a :class:`~dmlkit.models.Backbone` subclass, or a function returning one,
taking ``in_channels``) is named by import path, ``"my_package.nets:MyNet"``.
"""

from __future__ import annotations

from typing import Any

from ..registry import Spec
from .base import BACKBONES, Backbone
from .loading import StateDictSource
from .timm_backbone import TimmBackbone

TIMM_PREFIX = "timm:"


def list_backbones() -> list[str]:
    """Names of the built-in backbones (any timm model is also available as ``"timm:<name>"``).

    Returns:
        The sorted names.
    """
    return BACKBONES.names()


def create_backbone(
    name: str,
    *,
    pretrained: StateDictSource | None = None,
    in_channels: int = 3,
    **options: Any,
) -> Backbone:
    """Builds a backbone by name and optionally loads weights into it.

    Built-in names are those of :func:`list_backbones`; ``"timm:<name>"`` builds a timm model
    (see :class:`~dmlkit.models.TimmBackbone`; needs an importable timm); ``"package.module:Name"``
    builds a user's backbone.

    Args:
        name: The backbone name.
        pretrained: A state dict, or a path to a file holding one (loaded on the CPU with
            ``weights_only=True``), e.g. a published ImageNet checkpoint. Loading is strict,
            except that a published classifier is skipped when the backbone has none.
        in_channels: Input channels.
        **options: Backbone options: ``num_classes`` (keep the published classifier) for
            ``mobilenet_v2``, ``resnet18``, ``resnet50`` and ``bn_inception``; ``width`` and
            ``depth`` for ``convnet``; keyword arguments of ``timm.create_model`` for timm.

    Returns:
        The backbone, in training mode.

    Raises:
        ConfigError: (a ValueError) Unknown backbone or option, or a bad value.
    """
    if not isinstance(name, str):
        raise TypeError(f"backbone name must be a str, got {type(name).__name__}")
    backbone: Backbone
    if name.startswith(TIMM_PREFIX):
        timm_name = name.removeprefix(TIMM_PREFIX)
        if not timm_name:
            raise ValueError(f"{name!r} names no timm model; use e.g. 'timm:resnet18'")
        backbone = TimmBackbone(timm_name, in_channels=in_channels, **options)
    else:
        try:
            BACKBONES.get(name, "model.backbone")
        except ValueError as error:
            raise type(error)(f"{error}; or '{TIMM_PREFIX}<model name>' for a timm model") from None
        backbone = BACKBONES.build(Spec(name, options), "model.backbone", in_channels=in_channels)
        if not isinstance(backbone, Backbone):
            raise ValueError(f"model.backbone: {name!r} did not build a dmlkit.models.Backbone")
    if pretrained is not None:
        backbone.load_pretrained(pretrained)
    return backbone
