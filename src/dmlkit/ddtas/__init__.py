"""DDTAS: asymmetric mining, the Online Threshold Generator and the Soft Contrastive loss as one
training method (specification: ddtas.md in the project's shared docs)."""

from .method import DDTAS, DDTASOutput, DDTASStats, DegenerateThresholdsError, OTGSettings
from .otg import MinedPairs

__all__ = [
    "DDTAS",
    "DDTASOutput",
    "DDTASStats",
    "DegenerateThresholdsError",
    "MinedPairs",
    "OTGSettings",
]
