"""Backbones, embedding models, checkpoint loading and feature caching.

Backbones keep torchvision's (or, for BN-Inception, Cadene's) parameter names so published
checkpoints load with :func:`load_weights`. :func:`build_model` is the one way to build an
:class:`EmbeddingModel`: backbone, global pooling and embedding head.
"""

from .base import BACKBONES, Backbone
from .bninception import BNInception
from .cache import FeatureCache, cache_features, load_feature_cache
from .convnet import ConvNet
from .embedding import EmbeddingHead, EmbeddingModel, GlobalPool, Pooling, build_model
from .loading import LoadReport, StateDictSource, load_weights, read_state_dict
from .mobilenet import MobileNetV2
from .registry import create_backbone, list_backbones
from .resnet import ResNet, resnet18, resnet50
from .timm_backbone import TimmBackbone

__all__ = [
    "BACKBONES",
    "BNInception",
    "Backbone",
    "ConvNet",
    "EmbeddingHead",
    "EmbeddingModel",
    "FeatureCache",
    "GlobalPool",
    "LoadReport",
    "MobileNetV2",
    "Pooling",
    "ResNet",
    "StateDictSource",
    "TimmBackbone",
    "build_model",
    "cache_features",
    "create_backbone",
    "list_backbones",
    "load_feature_cache",
    "load_weights",
    "read_state_dict",
    "resnet18",
    "resnet50",
]
