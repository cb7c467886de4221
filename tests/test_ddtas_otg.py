"""DDTAS's Online Threshold Generator (docs/ddtas.md §5) and its per-pair losses (§10: T5–T7).

Every reference here is computed independently of the code under test: per-anchor loops for
the losses, the closed formulas of §5.3 for the slopes, per-pair ``autograd.grad`` loops for the
OTG's scores, and a double backward written directly with ``torch.func.functional_call`` for
the additive reading.
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor, nn
from torch.func import functional_call

from conftest import assert_close
from ddtas_spec import T2_LABELS, T2_S
from dmlkit.ddtas import DDTAS, DegenerateThresholdsError, OTGSettings
from dmlkit.ddtas.otg import (
    closed_form_scores,
    double_backward_gradient,
    meta_gradient,
    similarities_with_tangent,
    trainable_parameters,
    virtual_parameters,
)
from dmlkit.distances import CosineSimilarity, LpDistance
from dmlkit.functional.masks import PairIndices
from dmlkit.functional.pairwise import cosine_similarity_matrix
from dmlkit.functional.thresholds import normalize_thresholds, pair_loss, pair_loss_slopes
from dmlkit.losses import SoftContrastiveLoss
from dmlkit.miners import ATASMSMiner, MultiSimilarityMiner, PairMarginMiner, TripletMarginMiner
from dmlkit.models import build_model
from otg_fixtures import F64, mined_pairs, tiny_batches, tiny_mlp

# Float64 results computed two ways agree to rounding.
RTOL = 1e-12


def _sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))


# ---------------------------------------------------------------------------- oracles


def _loss_oracle(
    values: Tensor,
    anchors: Tensor,
    is_pos: Tensor,
    n_anchors: int,
    form: str = "soft_contrastive",
    pos_scale: float = 2.0,
    neg_scale: float = 40.0,
    thresholds: float | Tensor = 0.7,
) -> Tensor:
    """docs/ddtas.md §4 / §5.1 step 4 anchor by anchor, constants in Python floats (float64)."""
    t = thresholds if isinstance(thresholds, Tensor) else torch.full_like(values, float(thresholds))
    total = values.new_zeros(())
    for i in range(n_anchors):
        p_sel = (anchors == i) & is_pos
        n_sel = (anchors == i) & ~is_pos
        if not bool(p_sel.any()) or not bool(n_sel.any()):
            continue  # skipped, but still counted in n_anchors
        zp = -pos_scale * (values[p_sel] - t[p_sel])
        zn = neg_scale * (values[n_sel] - t[n_sel])
        if form == "soft_contrastive":
            pos_term = torch.log1p(torch.exp(zp)).mean()
            neg_term = torch.log1p(torch.exp(zn)).mean()
        else:
            pos_term = torch.log1p(torch.exp(zp).sum())
            neg_term = torch.log1p(torch.exp(zn).sum())
        total = total + (2.0 / pos_scale) * pos_term + (2.0 / neg_scale) * neg_term
    return total / n_anchors


def _all_pairs(labels: Tensor) -> PairIndices:
    """Every ordered pair of a batch (self excluded by index), positives first."""
    n = len(labels)
    pos = [(i, j) for i in range(n) for j in range(n) if i != j and labels[i] == labels[j]]
    neg = [(i, j) for i in range(n) for j in range(n) if labels[i] != labels[j]]
    both = pos + neg
    return PairIndices(
        torch.tensor([a for a, _ in both], dtype=torch.long),
        torch.tensor([b for _, b in both], dtype=torch.long),
        len(pos),
    )


def _meta_oracle(sim: Tensor, labels: Tensor, form: str, threshold: float) -> Tensor:
    """The unmined meta loss: the training loss's form at λ = 1 over every pair."""
    pairs = _all_pairs(labels)
    return _loss_oracle(
        pairs.take(sim), pairs.anchors, pairs.is_pos, len(labels), form, thresholds=threshold
    )


def _slopes_oracle(
    pairs: PairIndices, n_anchors: int, form: str, threshold: float, beta: float = 2.0
) -> Tensor:
    """c_k of docs/ddtas.md §5.3 from the closed formulas (α = 40), divided by B."""
    alpha = 40.0
    out = torch.zeros(len(pairs), dtype=F64)
    for k in range(len(pairs)):
        a = pairs.anchors[k]
        n_p = int(((pairs.anchors == a) & pairs.is_pos).sum())
        n_n = int(((pairs.anchors == a) & ~pairs.is_pos).sum())
        if n_p == 0 or n_n == 0:
            continue
        if form == "soft_contrastive":
            if pairs.is_pos[k]:
                c = -(2.0 / n_p) * _sigmoid(beta * threshold)
            else:
                c = (2.0 / n_n) * _sigmoid(-alpha * threshold)
        elif pairs.is_pos[k]:
            e = math.exp(beta * threshold)
            c = -2.0 * e / (1.0 + n_p * e)
        else:
            e = math.exp(-alpha * threshold)
            c = 2.0 * e / (1.0 + n_n * e)
        out[k] = c / n_anchors
    return out


def _relu_max(u: Tensor) -> Tensor:
    positive = torch.where(u > 0, u, torch.zeros_like(u))
    return positive / positive.max()


# ---------------------------------------------------------------------------- fixtures


def _brute_force_scores(
    model: nn.Module,
    x: Tensor,
    pairs: PairIndices,
    xm: Tensor,
    ym: Tensor,
    eta: float,
    form: str = "soft_contrastive",
    threshold: float = 0.7,
) -> Tensor:
    """u_k = η·c_k·⟨∇θ L^m, ∇θ S_k⟩ with one autograd.grad per mined pair (§5.3)."""
    params = [p for p in model.parameters() if p.requires_grad]
    sim_meta = cosine_similarity_matrix(model(xm))
    v = torch.autograd.grad(_meta_oracle(sim_meta, ym, form, threshold), params)
    sim = cosine_similarity_matrix(model(x))
    c = _slopes_oracle(pairs, len(x), form, threshold)
    u = torch.zeros(len(pairs), dtype=F64)
    for k in range(len(pairs)):
        grads = torch.autograd.grad(
            sim[pairs.anchors[k], pairs.references[k]], params, retain_graph=True
        )
        inner = sum((vi * gi).sum() for vi, gi in zip(v, grads, strict=True))
        u[k] = eta * c[k] * inner
    return u


def _otg_scores(
    method: DDTAS, model: nn.Module, x: Tensor, pairs: PairIndices, xm: Tensor, ym: Tensor
) -> Tensor:
    """u through the otg.py functions, closed form or double backward as ``method.otg`` says."""
    otg = method.otg
    assert otg is not None
    meta_loss = method.meta_loss(ym)
    if otg.method == "closed_form":
        v, _ = meta_gradient(model, xm, meta_loss)
        _, _, tangent = similarities_with_tangent(model, x, v)
        slopes = pair_loss_slopes(
            pairs.anchors, pairs.is_pos, len(x), method.form, 2.0, 40.0, method.threshold, F64
        )
        return closed_form_scores(slopes, tangent, pairs, otg.virtual_lr)
    zeros = torch.zeros(len(pairs), dtype=F64)
    grad, _ = double_backward_gradient(
        model,
        x,
        pairs,
        zeros,
        method.training_loss(pairs, len(x)),
        xm,
        meta_loss,
        otg.virtual_lr,
    )
    return -grad


def _side_close(actual: Tensor, expected: Tensor, is_pos: Tensor, rtol: float) -> None:
    """Entry-wise relative agreement, judged per side (negatives are ~1e-8 of positives)."""
    for side in (is_pos, ~is_pos):
        a, e = actual[side], expected[side]
        scale = float(e.abs().max()) if e.numel() else 0.0
        torch.testing.assert_close(a, e, rtol=rtol, atol=rtol * scale)


# ---------------------------------------------------------------------------- T5


def test_t5_joint_normalisation() -> None:
    u = torch.tensor([-0.2, 0.1, 0.3, -0.05], dtype=F64)
    weights = normalize_thresholds(u)
    assert weights is not None
    torch.testing.assert_close(weights, torch.tensor([0.0, 1 / 3, 1.0, 0.0], dtype=F64))
    assert weights.max().item() == 1.0


@pytest.mark.parametrize(
    "u",
    [
        [-0.2, -0.1, -0.05],
        [0.0, 0.0],
        [-0.0, -1e-30],
        [0.3, float("nan")],
        [0.3, float("inf")],
        [0.3, float("-inf")],
    ],
)
@pytest.mark.parametrize("normalization", ["joint", "separate"])
def test_t5_undefined_weights_are_none_never_nan(u: list[float], normalization: str) -> None:
    scores = torch.tensor(u, dtype=F64)
    is_pos = torch.ones(len(u), dtype=torch.bool)
    assert normalize_thresholds(scores, is_pos, normalization) is None


def test_t5_separate_normalisation() -> None:
    u = torch.tensor([0.2, -0.1, 0.4, 3e-9, -1e-9, 1e-9], dtype=F64)
    is_pos = torch.tensor([True, True, True, False, False, False])
    weights = normalize_thresholds(u, is_pos, "separate")
    assert weights is not None
    torch.testing.assert_close(
        weights, torch.tensor([0.5, 0.0, 1.0, 1.0, 0.0, 1 / 3], dtype=F64), rtol=1e-15, atol=0
    )
    joint = normalize_thresholds(u, is_pos, "joint")
    assert joint is not None and joint[3].item() == pytest.approx(7.5e-9, rel=1e-12, abs=0)


def test_t5_separate_side_with_no_positive_score_is_none() -> None:
    is_pos = torch.tensor([True, True, False, False])
    # Positives fine, negatives all ≤ 0 (and vice versa): that side would be 0/0.
    assert normalize_thresholds(torch.tensor([0.2, 0.1, -1.0, 0.0]), is_pos, "separate") is None
    assert normalize_thresholds(torch.tensor([-0.2, 0.0, 1.0, 0.5]), is_pos, "separate") is None
    # Joint normalisation of the same scores is defined.
    assert normalize_thresholds(torch.tensor([0.2, 0.1, -1.0, 0.0]), is_pos, "joint") is not None


def test_t5_separate_with_an_empty_side_is_fine() -> None:
    only_pos = torch.tensor([True, True, True])
    weights = normalize_thresholds(torch.tensor([0.5, -1.0, 2.0]), only_pos, "separate")
    assert weights is not None
    torch.testing.assert_close(weights, torch.tensor([0.25, 0.0, 1.0]))
    only_neg = ~only_pos
    weights = normalize_thresholds(torch.tensor([0.5, -1.0, 2.0]), only_neg, "separate")
    assert weights is not None
    torch.testing.assert_close(weights, torch.tensor([0.25, 0.0, 1.0]))


@pytest.mark.parametrize("normalization", ["joint", "separate"])
def test_t5_empty_scores_give_empty_weights(normalization: str) -> None:
    weights = normalize_thresholds(
        torch.zeros(0, dtype=F64),
        torch.zeros(0, dtype=torch.bool),
        normalization,
    )
    assert weights is not None and weights.shape == (0,) and weights.dtype == F64


def test_t5_bad_normalization_and_missing_is_pos() -> None:
    with pytest.raises(ValueError, match="normalization"):
        normalize_thresholds(torch.ones(2), None, "both")
    with pytest.raises(ValueError, match="is_pos"):
        normalize_thresholds(torch.ones(2), None, "separate")


# ---------------------------------------------------------------------------- T7


def _one_anchor(n_pos: int, n_neg: int) -> tuple[Tensor, Tensor]:
    anchors = torch.zeros(n_pos + n_neg, dtype=torch.long)
    is_pos = torch.arange(n_pos + n_neg) < n_pos
    return anchors, is_pos


@pytest.mark.parametrize(
    ("n_pos", "expected"),
    [(4, -2 * math.e / (1 + 4 * math.e)), (1, -2 * math.e / (1 + math.e))],
)
def test_t7_multi_similarity_positive_slopes(n_pos: int, expected: float) -> None:
    anchors, is_pos = _one_anchor(n_pos, 3)
    batch = 8  # the slopes carry the 1/B of the reduction
    slopes = pair_loss_slopes(anchors, is_pos, batch, "multi_similarity", 2.0, 40.0, 0.5, F64)
    assert slopes.dtype == F64
    for c in slopes[is_pos].tolist():
        assert c * batch == pytest.approx(expected, rel=1e-12)
    printed = {4: -0.4578881, 1: -1.4621}[n_pos]  # the spec's printed values
    assert slopes[0].item() * batch == pytest.approx(printed, abs=1e-7 if n_pos == 4 else 1e-4)


@pytest.mark.parametrize("n_neg", [1, 75])
def test_t7_multi_similarity_negative_slopes(n_neg: int) -> None:
    anchors, is_pos = _one_anchor(4, n_neg)
    slopes = pair_loss_slopes(anchors, is_pos, 8, "multi_similarity", 2.0, 40.0, 0.5, F64)
    e = math.exp(-20.0)
    expected = 2 * e / (1 + n_neg * e)
    assert expected == pytest.approx(4.1223e-9, rel=1e-4, abs=0)  # "about 4.1223e-9 for |N| ≤ 75"
    for c in slopes[~is_pos].tolist():
        assert c * 8 == pytest.approx(4.1223e-9, rel=1e-4, abs=0)
        assert c * 8 == pytest.approx(expected, rel=RTOL, abs=0)


@pytest.mark.parametrize(
    ("form", "threshold", "expected"),
    [
        ("multi_similarity", 0.5, 2 * math.exp(-20.0) / (1 + 3 * math.exp(-20.0))),
        ("soft_contrastive", 0.7, (2 / 3) * _sigmoid(-28.0)),
    ],
    ids=["multi_similarity", "soft_contrastive"],
)
def test_t7_negative_slopes_are_exact_in_float64(
    form: str, threshold: float, expected: float
) -> None:
    """In float64 the slopes must match the closed formulas to rounding. They do not if the
    constant 2/α is rounded to float32 on the way: 0.05 becomes 0.05000000075 (1.5e-8)."""
    anchors, is_pos = _one_anchor(2, 3)
    slopes = pair_loss_slopes(anchors, is_pos, 1, form, 2.0, 40.0, threshold, F64)
    for c in slopes[~is_pos].tolist():
        assert c == pytest.approx(expected, rel=1e-12, abs=0)


@pytest.mark.parametrize(("n_pos", "n_neg"), [(1, 1), (4, 75), (3, 7)])
def test_t7_soft_contrastive_positive_slopes(n_pos: int, n_neg: int) -> None:
    anchors, is_pos = _one_anchor(n_pos, n_neg)
    slopes = pair_loss_slopes(anchors, is_pos, 5, "soft_contrastive", 2.0, 40.0, 0.7, F64)
    for c in slopes[is_pos].tolist():
        assert c * 5 == pytest.approx(-(2 / n_pos) * _sigmoid(1.4), rel=1e-12)


@pytest.mark.parametrize(("n_pos", "n_neg"), [(1, 1), (4, 75), (3, 7)])
def test_t7_soft_contrastive_negative_slopes(n_pos: int, n_neg: int) -> None:
    anchors, is_pos = _one_anchor(n_pos, n_neg)
    slopes = pair_loss_slopes(anchors, is_pos, 5, "soft_contrastive", 2.0, 40.0, 0.7, F64)
    expected = (2 / n_neg) * _sigmoid(-28.0)
    assert expected == pytest.approx(1.4e-12 / n_neg, rel=0.02, abs=0)  # "about 1.4e-12/|N|"
    for c in slopes[~is_pos].tolist():
        assert c * 5 == pytest.approx(expected, rel=RTOL, abs=0)


@pytest.mark.parametrize("form", ["soft_contrastive", "multi_similarity"])
def test_t7_pairs_of_anchors_lacking_a_side_have_zero_slope(form: str) -> None:
    # anchor 0: both sides; anchor 1: positives only; anchor 2: negatives only; B = 5.
    anchors = torch.tensor([1, 0, 2, 0, 1, 2, 0])
    is_pos = torch.tensor([True, True, False, False, True, False, False])
    slopes = pair_loss_slopes(anchors, is_pos, 5, form, 2.0, 40.0, 0.5, F64)
    assert torch.all(slopes[anchors != 0] == 0)
    assert torch.all(slopes[(anchors == 0) & is_pos] < 0)
    assert torch.all(slopes[(anchors == 0) & ~is_pos] > 0)
    assert slopes[1].item() * 5 == pytest.approx(
        -2 * math.e / (1 + math.e) if form == "multi_similarity" else -2 * _sigmoid(1.0),
        rel=1e-12,
    )


# ---------------------------------------------------------------------------- pair_loss


def _t2_mined_pairs(emb: Tensor) -> tuple[tuple[Tensor, ...], Tensor, Tensor]:
    indices = ATASMSMiner(epsilon=0.1)(emb, T2_LABELS)
    a1, _, a2, _ = indices
    anchors = torch.cat([a1, a2])
    is_pos = torch.arange(len(anchors)) < len(a1)
    return indices, anchors, is_pos


def test_pair_loss_soft_contrastive_equals_soft_contrastive_loss_on_t2() -> None:
    emb = torch.linalg.cholesky(torch.tensor(T2_S, dtype=F64)).requires_grad_(True)
    indices, anchors, is_pos = _t2_mined_pairs(emb)
    a1, p, a2, n = indices
    sim = cosine_similarity_matrix(emb)
    values = torch.cat([sim[a1, p], sim[a2, n]])
    loss = pair_loss(values, anchors, is_pos, 6, "soft_contrastive", 2.0, 40.0, 0.7)
    assert loss.item() == pytest.approx(0.534575195, rel=1e-8)
    (grad,) = torch.autograd.grad(loss, emb)

    ref_emb = emb.detach().clone().requires_grad_(True)
    expected = SoftContrastiveLoss()(ref_emb, T2_LABELS, indices)
    (expected_grad,) = torch.autograd.grad(expected, ref_emb)
    assert loss.item() == pytest.approx(expected.item(), rel=RTOL)
    assert_close(grad, expected_grad, rtol=RTOL)


@pytest.mark.parametrize("neg_scale", [40.0, 32.0])
def test_pair_loss_soft_contrastive_equals_soft_contrastive_loss_on_a_random_batch(
    neg_scale: float,
) -> None:
    g = torch.Generator().manual_seed(5)
    labels = torch.arange(20) // 4
    emb = (torch.randn(5, 8, generator=g, dtype=F64)[labels] * 0.7).add_(
        torch.randn(20, 8, generator=g, dtype=F64)
    )
    emb.requires_grad_(True)
    indices = ATASMSMiner(epsilon=0.1)(emb, labels)
    a1, p, a2, n = indices
    sim = cosine_similarity_matrix(emb)
    anchors = torch.cat([a1, a2])
    is_pos = torch.arange(len(anchors)) < len(a1)
    # Shuffle the pair order: the reduction must not rely on positives coming first.
    order = torch.randperm(len(anchors), generator=g)
    values = torch.cat([sim[a1, p], sim[a2, n]])[order]
    loss = pair_loss(values, anchors[order], is_pos[order], 20, neg_scale=neg_scale)
    (grad,) = torch.autograd.grad(loss, emb)
    ref = emb.detach().clone().requires_grad_(True)
    expected = SoftContrastiveLoss(neg_scale=neg_scale)(ref, labels, indices)
    (expected_grad,) = torch.autograd.grad(expected, ref)
    assert loss.item() == pytest.approx(expected.item(), rel=RTOL)
    assert_close(grad, expected_grad, rtol=RTOL)


def _ragged_pairs(seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """Pairs in shuffled order: anchor 0 has 2 pos + 3 neg, 1 only a positive, 2 only
    negatives, 3 has 3 pos + 1 neg, 4 and 5 have nothing (B = 6)."""
    anchors = torch.tensor([0, 0, 0, 0, 0, 1, 2, 2, 3, 3, 3, 3])
    is_pos = torch.tensor([1, 1, 0, 0, 0, 1, 0, 0, 1, 1, 1, 0], dtype=torch.bool)
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(anchors), generator=g)
    values = torch.rand(len(anchors), generator=g, dtype=F64) * 1.8 - 0.8
    return values, anchors[order], is_pos[order]


@pytest.mark.parametrize("form", ["soft_contrastive", "multi_similarity"])
@pytest.mark.parametrize("per_pair_thresholds", [False, True])
def test_pair_loss_matches_per_anchor_loop(form: str, per_pair_thresholds: bool) -> None:
    # Scales whose constants (2/β = 1, 2/α = 1/16, α, β) are exact in any float format, so this
    # checks the reduction alone; see the next test for the float64 precision of the constants.
    values, anchors, is_pos = _ragged_pairs(11)
    g = torch.Generator().manual_seed(12)
    thresholds: float | Tensor = (
        0.5 + 0.3 * torch.rand(len(values), generator=g, dtype=F64) if per_pair_thresholds else 0.5
    )
    values.requires_grad_(True)
    loss = pair_loss(values, anchors, is_pos, 6, form, 2.0, 32.0, thresholds)
    (grad,) = torch.autograd.grad(loss, values)
    ref_values = values.detach().clone().requires_grad_(True)
    expected = _loss_oracle(ref_values, anchors, is_pos, 6, form, 2.0, 32.0, thresholds)
    (expected_grad,) = torch.autograd.grad(expected, ref_values)
    assert loss.dtype == F64
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-12, atol=1e-15)
    # Pairs of skipped anchors (1 and 2) get no gradient.
    assert torch.all(grad[(anchors == 1) | (anchors == 2)] == 0)


@pytest.mark.parametrize("form", ["soft_contrastive", "multi_similarity"])
@pytest.mark.parametrize(("pos_scale", "neg_scale"), [(2.0, 40.0), (0.3, 30.0)])
def test_pair_loss_float64_keeps_float64_constants(
    form: str, pos_scale: float, neg_scale: float
) -> None:
    """In float64 the loss must agree with a float64 oracle to rounding: the released scales
    (2/α = 0.05) and others (β = 0.3) are not exact in float32."""
    values, anchors, is_pos = _ragged_pairs(13)
    loss = pair_loss(values, anchors, is_pos, 6, form, pos_scale, neg_scale, 0.5)
    expected = _loss_oracle(values, anchors, is_pos, 6, form, pos_scale, neg_scale, 0.5)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)


@pytest.mark.parametrize("form", ["soft_contrastive", "multi_similarity"])
def test_pair_loss_with_no_counted_anchor_is_zero_with_graph(form: str) -> None:
    values = torch.tensor([0.3, 0.9], dtype=F64, requires_grad=True)
    loss = pair_loss(values, torch.tensor([0, 1]), torch.tensor([True, False]), 2, form)
    assert loss.item() == 0.0
    loss.backward()
    assert values.grad is not None and torch.all(values.grad == 0)


def test_pair_loss_multi_similarity_is_stable_for_large_exponents() -> None:
    # α(x − b) up to 40·(5 − 0.5) = 180: exp overflows nothing in a log-sum-exp.
    values = torch.tensor([0.2, 5.0, 4.0], dtype=torch.float32, requires_grad=True)
    loss = pair_loss(
        values, torch.tensor([0, 0, 0]), torch.tensor([True, False, False]), 1, "multi_similarity"
    )
    expected = math.log1p(math.exp(-2 * (0.2 - 0.7))) + 0.05 * (
        40 * 4.3 + math.log1p(math.exp(-40.0) + math.exp(-40 * 4.3))
    )
    assert math.isfinite(loss.item())
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert values.grad is not None and torch.isfinite(values.grad).all()


# ---------------------------------------------------------------------------- T6


@pytest.mark.parametrize(
    ("form", "threshold"), [("soft_contrastive", 0.7), ("multi_similarity", 0.5)]
)
def test_t6_closed_form_equals_double_backward_on_a_tiny_mlp(form: str, threshold: float) -> None:
    model = tiny_mlp()
    x, y, xm, ym = tiny_batches()
    pairs = mined_pairs(model, x, y)
    assert int(pairs.is_pos.sum()) > 0 and int((~pairs.is_pos).sum()) > 0
    scores = {}
    for method in ("closed_form", "double_backward"):
        ddtas = DDTAS(threshold=threshold, form=form, otg=OTGSettings(method=method))
        scores[method] = _otg_scores(ddtas, model, x, pairs, xm, ym)
    cf, db = scores["closed_form"], scores["double_backward"]
    _side_close(cf, db, pairs.is_pos, rtol=1e-9)
    w_cf, w_db = normalize_thresholds(cf), normalize_thresholds(db)
    assert w_cf is not None and w_db is not None
    torch.testing.assert_close(w_cf, w_db, rtol=0, atol=1e-5)  # the spec's tolerance
    torch.testing.assert_close(w_cf, w_db, rtol=0, atol=1e-10)  # observed: ~1e-16 in float64
    # The parameters' .grad is never written by the OTG's functions.
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize(
    ("form", "threshold"), [("soft_contrastive", 0.7), ("multi_similarity", 0.5)]
)
def test_t6_closed_form_equals_brute_force_scores(form: str, threshold: float) -> None:
    model = tiny_mlp()
    x, y, xm, ym = tiny_batches()
    pairs = mined_pairs(model, x, y)
    eta = 1e-3
    expected = _brute_force_scores(model, x, pairs, xm, ym, eta, form, threshold)
    assert bool((expected[pairs.is_pos] > 0).any()) and bool((expected[pairs.is_pos] < 0).any())
    ddtas = DDTAS(threshold=threshold, form=form, otg=OTGSettings(virtual_lr=eta))
    u = _otg_scores(ddtas, model, x, pairs, xm, ym)
    torch.testing.assert_close(u[pairs.is_pos], expected[pairs.is_pos], rtol=RTOL, atol=1e-18)
    _side_close(u, expected, pairs.is_pos, rtol=RTOL)
    ddtas_db = DDTAS(
        threshold=threshold,
        form=form,
        otg=OTGSettings(method="double_backward", virtual_lr=eta),
    )
    u_db = _otg_scores(ddtas_db, model, x, pairs, xm, ym)
    _side_close(u_db, expected, pairs.is_pos, rtol=RTOL)


@pytest.mark.parametrize("method", ["closed_form", "double_backward"])
def test_t6_weights_do_not_depend_on_the_virtual_lr(method: str) -> None:
    model = tiny_mlp()
    x, y, xm, ym = tiny_batches()
    pairs = mined_pairs(model, x, y)
    weights, losses = [], []
    for eta in (1e-5, 1e-1):
        ddtas = DDTAS(otg=OTGSettings(method=method, virtual_lr=eta))
        w = normalize_thresholds(_otg_scores(ddtas, model, x, pairs, xm, ym))
        assert w is not None
        weights.append(w)
        out = ddtas(model, x, y, (xm, ym))
        assert not out.skipped
        losses.append(out.loss.item())
    # Per side: the negative weights (~1e-13 here) are compared on their own scale.
    _side_close(weights[0], weights[1], pairs.is_pos, rtol=1e-10)
    assert losses[0] == pytest.approx(losses[1], rel=1e-10)


@pytest.mark.parametrize("eta", [1e-5, 1e-1, 10.0])
def test_t6_virtual_step_at_zero_is_the_identity(eta: float) -> None:
    model = tiny_mlp()
    x, y, _, _ = tiny_batches()
    pairs = mined_pairs(model, x, y)
    ddtas = DDTAS(otg=OTGSettings(method="double_backward"))
    variables = torch.zeros(len(pairs), dtype=F64, requires_grad=True)
    virtual = virtual_parameters(
        model, x, pairs, variables, ddtas.training_loss(pairs, len(x)), eta
    )
    params = dict(model.named_parameters())
    assert virtual.keys() == params.keys()
    for name, p in params.items():
        assert torch.equal(virtual[name], p), name
    # Away from λ = 0 the step moves θ: the identity above is not vacuous.
    moved = virtual_parameters(
        model,
        x,
        pairs,
        torch.ones(len(pairs), dtype=F64, requires_grad=True),
        ddtas.training_loss(pairs, len(x)),
        eta,
    )
    assert any(not torch.equal(moved[name], p) for name, p in params.items())


@pytest.mark.parametrize("method", ["closed_form", "double_backward"])
def test_t6_ddtas_output_matches_the_reference_weights(method: str) -> None:
    model = tiny_mlp()
    x, y, xm, ym = tiny_batches()
    pairs = mined_pairs(model, x, y)
    u = _brute_force_scores(model, x, pairs, xm, ym, 1e-5)
    w = _relu_max(u)
    with torch.no_grad():
        s_pairs = pairs.take(cosine_similarity_matrix(model(x)))
        expected = _loss_oracle(w * s_pairs, pairs.anchors, pairs.is_pos, len(x))
        meta = _meta_oracle(cosine_similarity_matrix(model(xm)), ym, "soft_contrastive", 0.7)
    out = DDTAS(otg=OTGSettings(method=method))(model, x, y, (xm, ym))
    assert not out.skipped
    assert out.loss.item() == pytest.approx(expected.item(), rel=RTOL)
    s = out.stats
    assert s.meta_loss == pytest.approx(meta.item(), rel=RTOL)
    assert s.otg_skipped == 0
    assert (s.num_pos_pairs, s.num_neg_pairs) == (
        int(pairs.is_pos.sum()),
        len(pairs) - int(pairs.is_pos.sum()),
    )
    assert s.otg_pos_mean == pytest.approx(w[pairs.is_pos].mean().item(), rel=RTOL)
    assert s.otg_pos_zero == pytest.approx((w[pairs.is_pos] == 0).double().mean().item())
    assert s.otg_neg_max == pytest.approx(w[~pairs.is_pos].max().item(), rel=RTOL, abs=0)
    assert s.pos_similarity == pytest.approx(s_pairs[pairs.is_pos].mean().item(), rel=1e-12)
    assert s.neg_similarity == pytest.approx(s_pairs[~pairs.is_pos].mean().item(), rel=1e-12)


# ---------------------------------------------------------------------------- plain DDTAS


def test_ddtas_without_otg_equals_miner_and_soft_contrastive_loss() -> None:
    model = tiny_mlp()
    reference = copy.deepcopy(model)
    x, y, _, _ = tiny_batches()
    out = DDTAS(miner=ATASMSMiner(epsilon=0.1))(model, x, y)
    out.loss.backward()
    assert not out.skipped
    assert out.stats.meta_loss is None and out.stats.otg_skipped is None

    emb = reference(x)
    miner = ATASMSMiner(epsilon=0.1)
    expected = SoftContrastiveLoss()(emb, y, miner(emb, y))
    expected.backward()
    assert out.loss.item() == pytest.approx(expected.item(), rel=RTOL)
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        assert p.grad is not None and q.grad is not None
        assert_close(p.grad, q.grad, rtol=RTOL)
    st, ms = out.stats, miner.last_stats
    assert (st.num_pos_pairs, st.num_neg_pairs) == (ms.num_pos_pairs, ms.num_neg_pairs)
    assert (st.gamma_pos, st.gamma_neg, st.ratio) == (ms.gamma_pos, ms.gamma_neg, ms.ratio)
    assert st.num_skipped_anchors == ms.num_skipped_anchors


@pytest.mark.parametrize("method", ["closed_form", "double_backward"])
def test_stats_describe_the_training_batch_with_meta_mining(method: str) -> None:
    """With ``meta_mining`` the meta batch is mined by the same miner: the mining stats
    reported must still be those of the training batch."""
    model = tiny_mlp()
    x, y, xm, ym = tiny_batches()
    miner = ATASMSMiner(epsilon=0.1)
    with torch.no_grad():
        miner(model(x), y)
    train_stats = miner.last_stats
    with torch.no_grad():
        miner(model(xm), ym)
    assert miner.last_stats.ratio != train_stats.ratio
    otg = OTGSettings(method=method, meta_mining=True)
    out = DDTAS(otg=otg)(model, x, y, (xm, ym))
    s = out.stats
    assert s.ratio == train_stats.ratio
    assert (s.gamma_pos, s.gamma_neg) == (train_stats.gamma_pos, train_stats.gamma_neg)
    assert s.num_skipped_anchors == train_stats.num_skipped_anchors


def test_meta_mining_closed_form_equals_double_backward() -> None:
    model = tiny_mlp()
    x, y, xm, ym = tiny_batches()
    outs = [
        DDTAS(otg=OTGSettings(method=m, meta_mining=True))(model, x, y, (xm, ym))
        for m in ("closed_form", "double_backward")
    ]
    assert outs[0].loss.item() == pytest.approx(outs[1].loss.item(), rel=1e-10)
    assert outs[0].stats.meta_loss == pytest.approx(outs[1].stats.meta_loss, rel=1e-12)
    # Mining the meta batch drops pairs, so the meta loss differs from the unmined one.
    unmined = DDTAS(otg=OTGSettings())(model, x, y, (xm, ym))
    assert outs[0].stats.meta_loss != pytest.approx(unmined.stats.meta_loss, rel=1e-6)


# ---------------------------------------------------------------------------- BatchNorm, .grad


@pytest.mark.parametrize("method", ["closed_form", "double_backward"])
def test_batchnorm_statistics_update_as_one_training_forward(method: str) -> None:
    model = tiny_mlp(batch_norm=True).train()
    reference = copy.deepcopy(model)
    x, y, xm, ym = tiny_batches()
    out = DDTAS(otg=OTGSettings(method=method))(model, x, y, (xm, ym))
    assert all(p.grad is None for p in model.parameters())
    reference(x)  # one plain training forward
    for (name, b), ref in zip(model.named_buffers(), reference.buffers(), strict=True):
        assert torch.equal(b, ref), name
    assert int(model[1].num_batches_tracked) == 1
    assert not torch.equal(model[1].running_mean, torch.zeros(16, dtype=F64))
    out.loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_batchnorm_closed_form_equals_double_backward() -> None:
    model = tiny_mlp(batch_norm=True).train()
    x, y, xm, ym = tiny_batches()
    outs = [
        DDTAS(otg=OTGSettings(method=m))(copy.deepcopy(model), x, y, (xm, ym))
        for m in ("closed_form", "double_backward")
    ]
    assert outs[0].loss.item() == pytest.approx(outs[1].loss.item(), rel=1e-10)
    assert outs[0].stats.otg_pos_mean == pytest.approx(outs[1].stats.otg_pos_mean, rel=1e-10)


def test_meta_gradient_changes_no_buffer_and_no_grad() -> None:
    model = tiny_mlp(batch_norm=True).train()
    before = copy.deepcopy(model)
    _, _, xm, ym = tiny_batches()
    v, value = meta_gradient(model, xm, DDTAS(otg=OTGSettings()).meta_loss(ym))
    for (name, b), ref in zip(model.named_buffers(), before.buffers(), strict=True):
        assert torch.equal(b, ref), name
    assert all(p.grad is None for p in model.parameters())
    assert set(v) == set(dict(model.named_parameters()))
    assert value.requires_grad is False and value.item() > 0
    # v is the gradient of the meta loss under batch statistics (train mode), as an oracle says.
    expected = _meta_oracle(cosine_similarity_matrix(before(xm)), ym, "soft_contrastive", 0.7)
    grads = torch.autograd.grad(expected, list(before.parameters()))
    for g, ref in zip(v.values(), grads, strict=True):
        assert_close(g, ref, rtol=RTOL)


def test_frozen_parameters_are_not_differentiated() -> None:
    model = tiny_mlp()
    model[0].weight.requires_grad_(False)
    assert set(trainable_parameters(model)) == {"0.bias", "2.weight", "2.bias"}
    x, y, xm, ym = tiny_batches()
    outs = [
        DDTAS(otg=OTGSettings(method=m))(model, x, y, (xm, ym))
        for m in ("closed_form", "double_backward")
    ]
    assert outs[0].loss.item() == pytest.approx(outs[1].loss.item(), rel=1e-10)
    outs[0].loss.backward()
    assert model[0].weight.grad is None and model[2].weight.grad is not None


# ---------------------------------------------------------------------------- the real step


@pytest.mark.parametrize("method", ["closed_form", "double_backward"])
def test_real_step_treats_the_weights_as_constants(method: str) -> None:
    model = tiny_mlp()
    reference = copy.deepcopy(model)
    x, y, xm, ym = tiny_batches()
    pairs = mined_pairs(model, x, y)
    weights = _relu_max(_brute_force_scores(reference, x, pairs, xm, ym, 1e-5)).detach()

    out = DDTAS(otg=OTGSettings(method=method))(model, x, y, (xm, ym))
    out.loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())

    reference.zero_grad(set_to_none=True)
    s_pairs = pairs.take(cosine_similarity_matrix(reference(x)))
    _loss_oracle(weights * s_pairs, pairs.anchors, pairs.is_pos, len(x)).backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert q.grad is not None and p.grad is not None
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-7, atol=1e-14, msg=name)


# ---------------------------------------------------------------------------- degenerate


@pytest.mark.parametrize("method", ["closed_form", "double_backward"])
def test_meta_batch_without_positive_pairs_skips_the_step(method: str) -> None:
    model = tiny_mlp()
    x, y, xm, _ = tiny_batches()
    singletons = torch.arange(6)  # one image per class: no positive pair, meta loss 0
    out = DDTAS(otg=OTGSettings(method=method))(model, x, y, (xm, singletons))
    assert out.skipped is True
    assert out.loss.item() == 0.0 and out.loss.requires_grad
    out.loss.backward()
    for p in model.parameters():
        assert p.grad is not None and torch.all(p.grad == 0)
    s = out.stats
    assert s.otg_skipped == 1
    assert s.meta_loss == 0.0
    for value in s.as_dict().values():
        assert value is None or math.isfinite(value)
    with pytest.raises(DegenerateThresholdsError):
        DDTAS(otg=OTGSettings(method=method, on_degenerate="raise"))(model, x, y, (xm, singletons))


# ---------------------------------------------------------------------------- normalisation


def test_separate_normalisation_lifts_the_negative_weights() -> None:
    """Observed on this MLP (4 classes × 3, meta batch 3 × 2, float64): joint normalisation
    leaves the largest negative weight near 1e-12 (§5.4 predicts ≤ 1e-8); separate
    normalisation sets it to exactly 1 and leaves the positive weights unchanged (a positive
    sets the joint maximum)."""
    model = tiny_mlp()
    x, y, xm, ym = tiny_batches()
    joint = DDTAS(otg=OTGSettings(normalization="joint"))(model, x, y, (xm, ym)).stats
    separate = DDTAS(otg=OTGSettings(normalization="separate"))(model, x, y, (xm, ym)).stats
    assert joint.otg_neg_max is not None and 0 < joint.otg_neg_max < 1e-6
    assert separate.otg_neg_max == 1.0
    assert separate.otg_pos_mean == pytest.approx(joint.otg_pos_mean, rel=1e-12)
    assert separate.otg_neg_mean is not None and separate.otg_neg_mean > 1e3 * joint.otg_neg_mean

    pairs = mined_pairs(model, x, y)
    u = _brute_force_scores(model, x, pairs, xm, ym, 1e-5)
    expected_neg = _relu_max(u[~pairs.is_pos])
    assert separate.otg_neg_mean == pytest.approx(expected_neg.mean().item(), rel=1e-6)


# ---------------------------------------------------------------------------- additive reading


def _additive_reference(
    model: nn.Module,
    x: Tensor,
    pairs: PairIndices,
    xm: Tensor,
    ym: Tensor,
    eta: float,
    threshold_lr: float,
) -> Tensor:
    """λ* = λ − η_λ·∇λ L^m(θ − η·∇θ L^t(θ; λ)) at λ = 0.7, written with functional_call."""
    params = dict(model.named_parameters())
    lam = torch.full((len(pairs),), 0.7, dtype=F64, requires_grad=True)
    s_pairs = pairs.take(cosine_similarity_matrix(functional_call(model, params, (x,))))
    train = _loss_oracle(s_pairs, pairs.anchors, pairs.is_pos, len(x), thresholds=lam)
    grads = torch.autograd.grad(train, list(params.values()), create_graph=True)
    virtual = {n: p - eta * g for (n, p), g in zip(params.items(), grads, strict=True)}
    meta = _meta_oracle(
        cosine_similarity_matrix(functional_call(model, virtual, (xm,))),
        ym,
        "soft_contrastive",
        0.7,
    )
    (grad,) = torch.autograd.grad(meta, lam)
    return (lam - threshold_lr * grad).detach()


def test_additive_reading_thresholds() -> None:
    model = tiny_mlp()
    x, y, xm, ym = tiny_batches()
    pairs = mined_pairs(model, x, y)
    eta = 1e-2
    means = {}
    for lr in (1.0, 100.0):
        otg = OTGSettings(
            method="double_backward", reading="additive", virtual_lr=eta, threshold_lr=lr
        )
        out = DDTAS(otg=otg)(model, x, y, (xm, ym))
        assert not out.skipped and math.isfinite(out.loss.item())
        s = out.stats
        assert s.otg_skipped == 0
        assert s.otg_pos_zero is None and s.otg_neg_zero is None  # weights' stats only
        expected = _additive_reference(model, x, pairs, xm, ym, eta, lr)
        if lr == 1.0:  # observed: 0.7028 (and 0.979 with threshold_lr = 100)
            assert s.otg_pos_mean == pytest.approx(0.7, abs=0.05)
        # The moves away from 0.7 agree (relative to the move, not to 0.7).
        moved = expected - 0.7
        assert s.otg_pos_mean - 0.7 == pytest.approx(moved[pairs.is_pos].mean().item(), rel=RTOL)
        assert s.otg_neg_mean - 0.7 == pytest.approx(moved[~pairs.is_pos].mean().item(), rel=RTOL)
        assert s.otg_neg_max - 0.7 == pytest.approx(moved[~pairs.is_pos].max().item(), rel=RTOL)
        with torch.no_grad():
            s_pairs = pairs.take(cosine_similarity_matrix(model(x)))
            loss = _loss_oracle(s_pairs, pairs.anchors, pairs.is_pos, len(x), thresholds=expected)
        assert out.loss.item() == pytest.approx(loss.item(), rel=RTOL)
        out.loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        model.zero_grad(set_to_none=True)
        means[lr] = s.otg_pos_mean
    # One gradient step: the move away from 0.7 is proportional to threshold_lr.
    assert means[1.0] != 0.7
    assert means[100.0] - 0.7 == pytest.approx(100 * (means[1.0] - 0.7), rel=1e-6)


# ---------------------------------------------------------------------------- errors


def test_otg_without_meta_batches_raises() -> None:
    model = tiny_mlp()
    x, y, _, _ = tiny_batches()
    with pytest.raises(ValueError, match="meta_batches"):
        DDTAS(otg=OTGSettings())(model, x, y)
    # Without the OTG no meta batch is needed.
    assert math.isfinite(DDTAS()(model, x, y).loss.item())


def test_triplet_miner_is_rejected() -> None:
    model = tiny_mlp()
    x, y, xm, ym = tiny_batches()
    for otg in (None, OTGSettings(), OTGSettings(method="double_backward")):
        ddtas = DDTAS(miner=TripletMarginMiner(distance=CosineSimilarity()), otg=otg)
        with pytest.raises(ValueError, match="pair miner"):
            ddtas(model, x, y, (xm, ym))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("method", "jvp"),
        ("normalization", "global"),
        ("reading", "offset"),
        ("on_degenerate", "ignore"),
        ("virtual_lr", 0.0),
        ("virtual_lr", -1e-5),
        ("virtual_lr", float("nan")),
        ("virtual_lr", float("inf")),
        ("threshold_lr", 0.0),
        ("threshold_lr", float("nan")),
    ],
)
def test_bad_otg_settings_name_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        OTGSettings(**{field: value})


def test_distance_miners_and_bad_scales_are_rejected() -> None:
    with pytest.raises(ValueError):
        DDTAS(miner=MultiSimilarityMiner(distance=LpDistance()))
    with pytest.raises(ValueError):
        DDTAS(miner=PairMarginMiner())  # LpDistance by default
    with pytest.raises(ValueError, match="scale"):
        DDTAS(pos_scale=0.0)
    with pytest.raises(ValueError, match="scale"):
        DDTAS(neg_scale=-1.0)
    with pytest.raises(ValueError, match="form"):
        DDTAS(form="contrastive")


# ---------------------------------------------------------------------------- ConvNet


def test_convnet_closed_form_equals_double_backward() -> None:
    torch.manual_seed(3)
    model = build_model("convnet", 16, in_channels=1).to(F64).train()
    g = torch.Generator().manual_seed(4)
    x = torch.randn(12, 1, 8, 8, generator=g, dtype=F64)
    xm = torch.randn(6, 1, 8, 8, generator=g, dtype=F64)
    y, ym = torch.arange(12) // 3, torch.arange(6) // 2
    pairs = mined_pairs(copy.deepcopy(model), x, y)
    scores = {
        m: _otg_scores(DDTAS(otg=OTGSettings(method=m)), copy.deepcopy(model), x, pairs, xm, ym)
        for m in ("closed_form", "double_backward")
    }
    _side_close(scores["closed_form"], scores["double_backward"], pairs.is_pos, rtol=1e-8)
    w_cf = normalize_thresholds(scores["closed_form"])
    w_db = normalize_thresholds(scores["double_backward"])
    assert w_cf is not None and w_db is not None
    torch.testing.assert_close(w_cf, w_db, rtol=0, atol=1e-10)
    outs = [
        DDTAS(otg=OTGSettings(method=m, normalization="separate"))(
            copy.deepcopy(model), x, y, (xm, ym)
        )
        for m in ("closed_form", "double_backward")
    ]
    assert outs[0].loss.item() == pytest.approx(outs[1].loss.item(), rel=1e-10)
    assert outs[0].stats.otg_neg_mean == pytest.approx(outs[1].stats.otg_neg_mean, rel=1e-8)


def _frozen(model: nn.Module, *names: str) -> nn.Module:
    for name, p in model.named_parameters():
        p.requires_grad_(name not in names)
    return model


def _tangent_models() -> dict[str, nn.Module]:
    """Float64 models covering each case of the OTG's own forward-mode rules: live and frozen
    BatchNorm, BatchNorm without affine parameters or with a frozen one, a first layer whose
    input has no tangent (linear, convolution) and one whose weight has none."""
    torch.manual_seed(5)
    no_affine = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4, affine=False), nn.ReLU(), nn.Flatten()
    )
    return {
        "convnet": build_model("convnet", 8, in_channels=1),
        "convnet, frozen BatchNorm": build_model("convnet", 8, in_channels=1, freeze_bn=True),
        "BatchNorm without affine": no_affine,
        "frozen BatchNorm weight": _frozen(tiny_mlp(batch_norm=True), "1.weight"),
        "frozen first weight": _frozen(tiny_mlp(batch_norm=True), "0.weight"),
        "frozen first layer": _frozen(tiny_mlp(batch_norm=True), "0.weight", "0.bias"),
        "mlp": tiny_mlp(),
    }


@pytest.mark.parametrize("name", list(_tangent_models()))
def test_training_forward_with_tangent_equals_pytorchs_forward_mode(name: str) -> None:
    """The OTG's cheaper rules (first layers, batch-statistics BatchNorm) change nothing: the
    similarities, their tangent, the real step's gradients and the running statistics are
    those of PyTorch's generic forward mode."""
    model = _tangent_models()[name].to(F64).train()
    reference = copy.deepcopy(model)
    g = torch.Generator().manual_seed(6)
    shape = (1, 8, 8) if "convnet" in name or "affine" in name else (6,)
    x = torch.randn(12, *shape, generator=g, dtype=F64)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    v = {n: torch.randn(p.shape, generator=g, dtype=F64) for n, p in params.items()}

    _, sim, tangent = similarities_with_tangent(model, x, v)
    with fwAD.dual_level():
        duals = {n: fwAD.make_dual(p, v[n]) for n, p in reference.named_parameters() if n in v}
        expected = fwAD.unpack_dual(cosine_similarity_matrix(functional_call(reference, duals, x)))
    assert expected.tangent is not None
    assert torch.equal(sim, expected.primal)
    assert_close(tangent, expected.tangent, rtol=RTOL)
    sim.sum().backward()
    expected.primal.sum().backward()
    for (n, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert (p.grad is None) == (q.grad is None), n
        if p.grad is not None:
            assert_close(p.grad, q.grad, rtol=RTOL)
    for (n, b), ref in zip(model.named_buffers(), reference.buffers(), strict=True):
        assert torch.equal(b, ref), n


def test_the_cheaper_tangent_rules_apply_to_a_convnets_first_layer_and_batchnorms(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from dmlkit.ddtas import otg

    applied: list[str] = []

    def spy(func: Callable[..., Tensor], *args: Any, **kwargs: Any) -> Tensor | None:
        result = rules[func](func, *args, **kwargs)
        if result is not None:
            applied.append(func.__name__)
        return result

    rules = dict(otg._TANGENT_RULES)
    monkeypatch.setattr(otg, "_TANGENT_RULES", dict.fromkeys(rules, spy))
    model = _tangent_models()["convnet"].to(F64).train()
    v = {n: torch.ones_like(p) for n, p in model.named_parameters()}
    similarities_with_tangent(model, torch.randn(6, 1, 8, 8, dtype=F64), v)
    assert applied == ["conv2d"] + ["batch_norm"] * 4


# ---------------------------------------------------------------------------- meta batches


def test_meta_batches_are_drawn_once_per_call() -> None:
    model = tiny_mlp()
    x, y, xm, ym = tiny_batches()
    g = torch.Generator().manual_seed(9)
    first, second = (xm, ym), (torch.randn(6, 6, generator=g, dtype=F64), ym)
    expected = [
        _meta_oracle(cosine_similarity_matrix(model(b[0])), b[1], "soft_contrastive", 0.7).item()
        for b in (first, second)
    ]
    assert expected[0] != pytest.approx(expected[1], rel=1e-6)
    ddtas = DDTAS(otg=OTGSettings(), meta_batches=itertools.cycle([first, second]))
    got = [ddtas(model, x, y).stats.meta_loss for _ in range(3)]
    assert got == pytest.approx([expected[0], expected[1], expected[0]], rel=RTOL)
    # An explicit meta batch is used as given and draws nothing from the iterable.
    assert ddtas(model, x, y, first).stats.meta_loss == pytest.approx(expected[0], rel=RTOL)
    assert ddtas(model, x, y).stats.meta_loss == pytest.approx(expected[1], rel=RTOL)


def test_finite_meta_batches_running_out_raise() -> None:
    model = tiny_mlp()
    x, y, xm, ym = tiny_batches()
    ddtas = DDTAS(otg=OTGSettings(method="double_backward"), meta_batches=[(xm, ym)])
    assert not ddtas(model, x, y).skipped
    with pytest.raises(ValueError, match="ran out"):
        ddtas(model, x, y)


@pytest.mark.parametrize("method", ["closed_form", "double_backward"])
def test_a_batch_where_no_anchor_counts_is_not_an_otg_failure(method: str) -> None:
    """One class only: no negative pair, so the loss is zero whatever the weights are. That is a
    normal (empty) step, not undefined weights: no skip, and no error even in raise mode."""
    torch.manual_seed(0)
    model = tiny_mlp()
    x = torch.randn(6, 6, dtype=torch.float64)
    y = torch.zeros(6, dtype=torch.long)
    _, _, x_meta, y_meta = tiny_batches()
    ddtas = DDTAS(otg=OTGSettings(method=method, on_degenerate="raise"))  # type: ignore[arg-type]
    out = ddtas(model, x, y, (x_meta, y_meta))
    assert not out.skipped
    assert out.stats.otg_skipped == 0
    assert out.loss.item() == 0.0
    out.loss.backward()


class _Attention(nn.Module):
    """A tiny self-attention embedder: fused attention kernels lack the OTG's derivatives."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(6, 12)
        self.out = nn.Linear(4, 4)

    def forward(self, x: Tensor) -> Tensor:
        tokens = self.qkv(x).view(x.shape[0], 3, 4)
        attended = nn.functional.scaled_dot_product_attention(tokens, tokens, tokens)
        return self.out(attended.mean(1))


def test_models_with_fused_attention_work_and_both_forms_agree() -> None:
    torch.manual_seed(0)
    model = _Attention()
    x, y, x_meta, y_meta = (t.float() if t.is_floating_point() else t for t in tiny_batches())
    losses = []
    for method in ("closed_form", "double_backward"):
        ddtas = DDTAS(otg=OTGSettings(method=method))  # type: ignore[arg-type]
        losses.append(ddtas(model, x, y, (x_meta, y_meta)).loss.item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)
