"""dmlkit: deep metric learning for PyTorch.

Fast, PML-compatible losses and miners (:mod:`dmlkit.losses`, :mod:`dmlkit.miners`), their
pure maths (:mod:`dmlkit.functional`), distances and reducers, and DDTAS's mining and loss.
"""

from . import distances, functional, losses, miners, reducers

__version__ = "0.1.0"

__all__ = ["__version__", "distances", "functional", "losses", "miners", "reducers"]
