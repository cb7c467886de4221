"""Tiny float64 models and batches shared by the OTG tests (tests/test_ddtas_otg.py and
tests/test_ddtas_variants.py), and the DDTAS training overrides they and the trainer tests use."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dmlkit.functional.masks import PairIndices
from dmlkit.miners import ATASMSMiner
from run_helpers import DIGITS_RUN

F64 = torch.float64

SOFT_CONTRASTIVE_RUN = [
    *DIGITS_RUN,
    "train.epochs=2",
    "sampler.classes_per_batch=5",
    "sampler.samples_per_class=6",
    "logging.progress=false",
    "logging.log_every=1",
    "loss.name=SoftContrastiveLoss",
    "miner.name=ATASMSMiner",
]
"""A short digits run of AT-ASMS and the Soft Contrastive loss (the standard objective)."""

DDTAS_RUN = [*SOFT_CONTRASTIVE_RUN, "objective.name=DDTASObjective"]
"""The same run of the whole method."""


def tiny_mlp(seed: int = 0, batch_norm: bool = False) -> nn.Module:
    """6 → 16 (→ BatchNorm) → tanh → 4, in float64."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Linear(6, 16)]
    if batch_norm:
        layers.append(nn.BatchNorm1d(16))
    layers += [nn.Tanh(), nn.Linear(16, 4)]
    return nn.Sequential(*layers).to(F64)


def tiny_batches(seed: int = 1) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """A training batch of 4 classes × 3 and a meta batch of 3 classes × 2."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(12, 6, generator=g, dtype=F64)
    xm = torch.randn(6, 6, generator=g, dtype=F64)
    return x, torch.arange(12) // 3, xm, torch.arange(6) // 2


def mined_pairs(model: nn.Module, x: Tensor, y: Tensor) -> PairIndices:
    """AT-ASMS pairs through the miner's own call contract (embeddings, not similarities)."""
    with torch.no_grad():
        return PairIndices.from_tuple(ATASMSMiner(epsilon=0.1)(model(x), y))
