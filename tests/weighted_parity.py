"""Helpers shared by the PML-parity tests of the losses with per-class weights (proxy and
classification losses): inputs, and the comparison of value, embedding gradient and weight
gradient with PML."""

from __future__ import annotations

import torch

from conftest import assert_close

C, D = 12, 16  # classes and embedding size of the parity cases


def embeddings_for(labels: torch.Tensor, dtype: torch.dtype, dim: int = D, seed: int = 1234):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(int(labels.max()) + 1, dim, generator=g, dtype=torch.float64)
    emb = centres[labels] * 0.6 + torch.randn(len(labels), dim, generator=g, dtype=torch.float64)
    return emb.to(dtype)


def weight_of(loss: torch.nn.Module) -> torch.nn.Parameter:
    (weight,) = loss.parameters()
    return weight


def value_and_grads(loss, emb, labels, indices=None):
    x = emb.clone().requires_grad_(True)
    loss.zero_grad()
    value = loss(x, labels, indices)
    value.backward()
    return value.detach(), x.grad, weight_of(loss).grad.clone()


def assert_matches_pml(ours, theirs, emb, labels, indices=None) -> None:
    """Value, embedding gradient and weight gradient of dmlkit (in the embeddings' dtype)
    against PML in float64, each within 1e-5 relative (conftest's rule)."""
    mine = value_and_grads(ours, emb, labels, indices)
    reference = value_and_grads(theirs, emb.double(), labels, indices)
    assert torch.isfinite(mine[0])
    for actual, expected in zip(mine, reference, strict=True):
        assert_close(actual, expected)
