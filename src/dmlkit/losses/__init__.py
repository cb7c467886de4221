"""Metric learning losses with PML's call contract.

Every loss is called as ``loss(embeddings, labels, indices_tuple=None, ref_emb=None,
ref_labels=None, anchor_in_ref=None)`` and returns a scalar tensor. Class names, constructor
parameters and defaults are PML 2.9's, so switching is a change of import; ``distance=`` takes a
:mod:`dmlkit.distances` object and ``reducer=`` a :mod:`dmlkit.reducers` object, and
``loss.distance`` and ``loss.reducer`` are the objects in use, defaults included.

Differences from PML, all deliberate:

* Self-pairs are excluded by index, never by value or object identity. Without ``ref_emb`` they
  are the diagonal. With ``ref_emb``, the reference set is distinct items unless
  ``anchor_in_ref`` says which row of it each anchor is (−1 for none), as a cross-batch memory
  or a gathered distributed batch knows; those (anchor, itself) pairs are then left out of the
  labelled pairs and of any ``indices_tuple``, as PML's ``CrossBatchMemory`` removes them. PML
  decides by object identity (``ref_emb is embeddings``).
* A loss over a single positive and a single negative pair is computed, not returned as 0.
* Half-precision inputs are computed in float32 and the result cast back.
"""

from .adaptive_margins import DynamicSoftMarginLoss, ManifoldLoss, ThresholdConsistentMarginLoss
from .base import LOSSES, BaseMetricLossFunction, ClassParametersLoss, WeightRegularizedLoss
from .classification import (
    ArcFaceLoss,
    CosFaceLoss,
    LargeMarginSoftmaxLoss,
    NormalizedSoftmaxLoss,
    P2SGradLoss,
    SphereFaceLoss,
    SubCenterArcFaceLoss,
)
from .cross_batch import CrossBatchMemory
from .list_based import HistogramLoss, PNPLoss, RankedListLoss, SmoothAPLoss
from .margin import MarginLoss
from .pair_based import (
    CircleLoss,
    ContrastiveLoss,
    GeneralizedLiftedStructureLoss,
    LiftedStructureLoss,
    MultiSimilarityLoss,
    NPairsLoss,
    NTXentLoss,
    SignalToNoiseRatioContrastiveLoss,
    SoftContrastiveLoss,
    SoftWeightedTripletLoss,
    SupConLoss,
    TripletMarginLoss,
)
from .proxies import NCALoss, ProxyAnchorLoss, ProxyNCALoss, SoftTripleLoss
from .ranking import FastAPLoss
from .self_supervised import VICRegLoss
from .tuple_based import AngularLoss, InstanceLoss, IntraPairVarianceLoss, TupletMarginLoss
from .wrappers import MultipleLosses, SelfSupervisedLoss

__all__ = [
    "LOSSES",
    "AngularLoss",
    "ArcFaceLoss",
    "BaseMetricLossFunction",
    "CircleLoss",
    "ClassParametersLoss",
    "ContrastiveLoss",
    "CosFaceLoss",
    "CrossBatchMemory",
    "DynamicSoftMarginLoss",
    "FastAPLoss",
    "GeneralizedLiftedStructureLoss",
    "HistogramLoss",
    "InstanceLoss",
    "IntraPairVarianceLoss",
    "LargeMarginSoftmaxLoss",
    "LiftedStructureLoss",
    "ManifoldLoss",
    "MarginLoss",
    "MultiSimilarityLoss",
    "MultipleLosses",
    "NCALoss",
    "NPairsLoss",
    "NTXentLoss",
    "NormalizedSoftmaxLoss",
    "P2SGradLoss",
    "PNPLoss",
    "ProxyAnchorLoss",
    "ProxyNCALoss",
    "RankedListLoss",
    "SelfSupervisedLoss",
    "SignalToNoiseRatioContrastiveLoss",
    "SmoothAPLoss",
    "SoftContrastiveLoss",
    "SoftTripleLoss",
    "SoftWeightedTripletLoss",
    "SphereFaceLoss",
    "SubCenterArcFaceLoss",
    "SupConLoss",
    "ThresholdConsistentMarginLoss",
    "TripletMarginLoss",
    "TupletMarginLoss",
    "VICRegLoss",
    "WeightRegularizedLoss",
]
