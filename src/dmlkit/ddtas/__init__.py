"""DDTAS: asymmetric mining, the Online Threshold Generator and the Soft Contrastive loss as one
training method (specification: docs/ddtas.md)."""

from .method import DDTAS, DDTASOutput, DDTASStats, DegenerateThresholdsError, OTGSettings

__all__ = [
    "DDTAS",
    "DDTASOutput",
    "DDTASStats",
    "DegenerateThresholdsError",
    "OTGSettings",
]
