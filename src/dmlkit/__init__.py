"""dmlkit: deep metric learning for PyTorch.

Fast, PML-compatible losses and miners (:mod:`dmlkit.losses`, :mod:`dmlkit.miners`), their
pure maths (:mod:`dmlkit.functional`), distances, reducers and regularisers, and DDTAS
(:mod:`dmlkit.ddtas`: asymmetric mining, the Online Threshold Generator and the Soft Contrastive
loss).
"""

from . import ddtas, distances, functional, losses, miners, reducers, regularizers
from .validation import finite_checks, set_finite_checks

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "ddtas",
    "distances",
    "finite_checks",
    "functional",
    "losses",
    "miners",
    "reducers",
    "regularizers",
    "set_finite_checks",
]
