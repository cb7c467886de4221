"""Inputs of the DDTAS spec's hand-checked cases (docs/ddtas.md), shared by the tests."""

from __future__ import annotations

import torch

# T2: six items of two classes and their cosine-similarity matrix.
T2_LABELS = torch.tensor([0, 0, 0, 1, 1, 1])
T2_S = [
    [1, 0.50, 0.73, 0.61, 0.493, 0.45],
    [0.50, 1, 0.67, 0.55, 0.47, 0.41],
    [0.73, 0.67, 1, 0.58, 0.62, 0.60],
    [0.61, 0.55, 0.58, 1, 0.66, 0.52],
    [0.493, 0.47, 0.62, 0.66, 1, 0.71],
    [0.45, 0.41, 0.60, 0.52, 0.71, 1],
]
