"""Backbones by name: :func:`create_backbone` and :func:`list_backbones`."""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable
from typing import Any

from .base import Backbone
from .bninception import BNInception
from .convnet import ConvNet
from .loading import StateDictSource
from .mobilenet import MobileNetV2
from .resnet import resnet18, resnet50
from .timm_backbone import TimmBackbone

_BUILDERS: dict[str, Callable[..., Backbone]] = {
    "bn_inception": BNInception,
    "convnet": ConvNet,
    "mobilenet_v2": MobileNetV2,
    "resnet18": resnet18,
    "resnet50": resnet50,
}
TIMM_PREFIX = "timm:"


def list_backbones() -> list[str]:
    """Names of the built-in backbones (any timm model is also available as ``"timm:<name>"``).

    Returns:
        The sorted names.
    """
    return sorted(_BUILDERS)


def _unknown_name_message(name: str) -> str:
    known = list_backbones()
    close = difflib.get_close_matches(name.lower(), known, n=1, cutoff=0.5)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return (
        f"unknown backbone {name!r}{hint}. Known backbones: {', '.join(known)}, or "
        f"'{TIMM_PREFIX}<model name>' for a timm model."
    )


def _check_options(name: str, builder: Callable[..., Backbone], options: dict[str, Any]) -> None:
    accepted = [p for p in inspect.signature(builder).parameters if p != "in_channels"]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(
            f"backbone {name!r} does not accept option(s) {', '.join(unknown)}; "
            f"it accepts: {', '.join(accepted) or 'none'}"
        )


def create_backbone(
    name: str,
    *,
    pretrained: StateDictSource | None = None,
    in_channels: int = 3,
    **options: Any,
) -> Backbone:
    """Builds a backbone by name and optionally loads weights into it.

    Built-in names are those of :func:`list_backbones`; ``"timm:<name>"`` builds a timm model
    (see :class:`~dmlkit.models.TimmBackbone`; needs an importable timm).

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
        builder = _BUILDERS.get(name)
        if builder is None:
            raise ValueError(_unknown_name_message(name))
        _check_options(name, builder, options)
        backbone = builder(in_channels=in_channels, **options)
    if pretrained is not None:
        backbone.load_pretrained(pretrained)
    return backbone
