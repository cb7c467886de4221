"""Hypothesis property tests: over random batch sizes, dimensions, label layouts and reference
sets, every loss and miner agrees with PML 2.9, and every loss is finite with finite gradients."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dmlkit.losses as dl
from test_pml_parity import (
    LOSSES,
    MINER_PAIRS,
    PML_REF_BROKEN,
    REF_UNSUPPORTED,
    _as_set,
    _pml_would_zero,
    assert_matches_pml,
)

pytest.importorskip("pytorch_metric_learning")

SETTINGS = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)


@st.composite
def batches(draw, allow_ref: bool = True):
    n = draw(st.integers(1, 24))
    dim = draw(st.integers(2, 8))  # in 1-D every normalised gradient is zero: only noise to compare
    n_classes = draw(st.integers(1, n))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, n_classes, (n,), generator=g)
    spread = draw(st.sampled_from([0.0, 0.5, 2.0]))
    centres = torch.randn(n_classes + 4, dim, generator=g, dtype=torch.float64)
    emb = spread * centres[labels] + torch.randn(n, dim, generator=g, dtype=torch.float64)
    ref = ref_labels = None
    if allow_ref and draw(st.booleans()):
        m = draw(st.integers(1, 24))
        ref_labels = torch.randint(0, n_classes + draw(st.integers(0, 3)), (m,), generator=g)
        ref = spread * centres[ref_labels] + torch.randn(m, dim, generator=g, dtype=torch.float64)
    return emb, labels, ref, ref_labels


@pytest.mark.parametrize("name", list(LOSSES))
@SETTINGS
@given(batch=batches())
def test_loss_matches_pml_on_random_batches(name: str, batch) -> None:
    emb, labels, ref, ref_labels = batch
    if ref is not None and (name in REF_UNSUPPORTED or name in PML_REF_BROKEN):
        ref = ref_labels = None
    ours, theirs = LOSSES[name](True)
    if _pml_would_zero(None, theirs, labels, ref_labels):
        return
    if isinstance(ours, dl.FastAPLoss) and labels.unique().numel() == 1:
        # Without negatives every AP is 1: the loss is constant, its gradient analytically
        # zero, and PML's holds rounding noise beyond the comparison's 8-epsilon floor.
        return
    assert_matches_pml(ours, theirs, emb, labels, None, ref, ref_labels)


@pytest.mark.parametrize(
    "name",
    [
        "contrastive",
        "triplet",
        "multi_similarity",
        "circle",
        "lifted",
        "ntxent",
        "supcon",
        "generalized_lifted",
    ],
)
@SETTINGS
@given(
    batch=batches(),
    miner_name=st.sampled_from(["ms", "triplet_semihard", "pair_margin", "batch_hard"]),
)
def test_loss_with_mined_tuples_matches_pml(name: str, batch, miner_name: str) -> None:
    emb, labels, ref, ref_labels = batch
    _, pml_miner, kwargs = MINER_PAIRS[miner_name]
    indices = pml_miner(**kwargs)(emb, labels, ref, ref_labels)
    ours, theirs = LOSSES[name](True)
    if _pml_would_zero(indices, theirs):
        return
    assert_matches_pml(ours, theirs, emb, labels, indices, ref, ref_labels)


@pytest.mark.parametrize("name", list(MINER_PAIRS))
@SETTINGS
@given(batch=batches())
def test_miner_matches_pml_on_random_batches(name: str, batch) -> None:
    emb, labels, ref, ref_labels = batch
    ours_cls, theirs_cls, kwargs = MINER_PAIRS[name]
    mine = ours_cls(**kwargs)(emb, labels, ref, ref_labels)
    reference = theirs_cls(**kwargs)(emb, labels, ref, ref_labels)
    assert _as_set(mine) == _as_set(reference)


@pytest.mark.parametrize("loss_cls", [dl.SoftContrastiveLoss, dl.SoftWeightedTripletLoss])
@SETTINGS
@given(batch=batches())
def test_losses_without_pml_counterpart_are_finite(loss_cls, batch) -> None:
    emb, labels, ref, ref_labels = batch
    leaf = emb.float().requires_grad_(True)
    ref_f = None if ref is None else ref.float()
    loss = loss_cls()(leaf, labels, None, ref_f, ref_labels)
    assert torch.isfinite(loss)
    loss.backward()
    assert leaf.grad is not None and torch.isfinite(leaf.grad).all()
