"""AngularLoss, TupletMarginLoss, IntraPairVarianceLoss and InstanceLoss against PML 2.9: values
and gradients (embeddings and reference set) in float32 and float64 on the parity layouts, with
and without a reference set, with PML-mined tuples, with reducers, distances and regularisers;
brute-force oracles where PML returns 0 or NaN; constructor and input errors."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dmlkit.distances as dd
import dmlkit.reducers as dr
import dmlkit.regularizers as dreg
from dmlkit.losses.tuple_based import (
    AngularLoss,
    InstanceLoss,
    IntraPairVarianceLoss,
    TupletMarginLoss,
)

pml_losses = pytest.importorskip("pytorch_metric_learning.losses")
pml_miners = pytest.importorskip("pytorch_metric_learning.miners")
pml_distances = pytest.importorskip("pytorch_metric_learning.distances")
pml_reducers = pytest.importorskip("pytorch_metric_learning.reducers")
pml_regularizers = pytest.importorskip("pytorch_metric_learning.regularizers")

from conftest import assert_close  # noqa: E402
from test_pml_parity import LAYOUTS, _make, _run, assert_matches_pml  # noqa: E402

Pair = tuple[torch.nn.Module, torch.nn.Module]

PML_CASES: dict[str, Callable[[], Pair]] = {
    "angular": lambda: (AngularLoss(), pml_losses.AngularLoss()),
    "angular_alpha_50": lambda: (AngularLoss(alpha=50), pml_losses.AngularLoss(alpha=50)),
    "angular_alpha_36": lambda: (AngularLoss(alpha=36), pml_losses.AngularLoss(alpha=36)),
    "angular_avg_nonzero_lp_reg": lambda: (
        AngularLoss(
            reducer=dr.AvgNonZeroReducer(),
            embedding_regularizer=dreg.LpRegularizer(),
            embedding_reg_weight=0.3,
        ),
        pml_losses.AngularLoss(
            reducer=pml_reducers.AvgNonZeroReducer(),
            embedding_regularizer=pml_regularizers.LpRegularizer(),
            embedding_reg_weight=0.3,
        ),
    ),
    "tuplet": lambda: (TupletMarginLoss(), pml_losses.TupletMarginLoss()),
    "tuplet_margin_scale": lambda: (
        TupletMarginLoss(margin=12.5, scale=16),
        pml_losses.TupletMarginLoss(margin=12.5, scale=16),
    ),
    "tuplet_sum": lambda: (
        TupletMarginLoss(reducer=dr.SumReducer()),
        pml_losses.TupletMarginLoss(reducer=pml_reducers.SumReducer()),
    ),
    "intra_pair": lambda: (IntraPairVarianceLoss(), pml_losses.IntraPairVarianceLoss()),
    "intra_pair_eps": lambda: (
        IntraPairVarianceLoss(pos_eps=0.2, neg_eps=0.1),
        pml_losses.IntraPairVarianceLoss(pos_eps=0.2, neg_eps=0.1),
    ),
    "intra_pair_euclidean": lambda: (
        IntraPairVarianceLoss(pos_eps=0.1, neg_eps=0.05, distance=dd.LpDistance()),
        pml_losses.IntraPairVarianceLoss(
            pos_eps=0.1, neg_eps=0.05, distance=pml_distances.LpDistance()
        ),
    ),
    "intra_pair_avg_nonzero": lambda: (
        IntraPairVarianceLoss(reducer=dr.AvgNonZeroReducer()),
        pml_losses.IntraPairVarianceLoss(reducer=pml_reducers.AvgNonZeroReducer()),
    ),
    "instance": lambda: (InstanceLoss(), pml_losses.InstanceLoss()),
    "instance_gamma_sum_reg": lambda: (
        InstanceLoss(
            gamma=8,
            reducer=dr.SumReducer(),
            embedding_regularizer=dreg.LpRegularizer(),
            embedding_reg_weight=0.5,
        ),
        pml_losses.InstanceLoss(
            gamma=8,
            reducer=pml_reducers.SumReducer(),
            embedding_regularizer=pml_regularizers.LpRegularizer(),
            embedding_reg_weight=0.5,
        ),
    ),
}
"""(dmlkit, PML) factories: every case is compared on every layout and with mined tuples."""

PAIR_LOSSES = (TupletMarginLoss, IntraPairVarianceLoss)
"""PML's GenericPairLoss subclasses: PML returns 0 when every pair list has at most one pair."""


def _pml_returns_zero_instead(ours: torch.nn.Module, indices, labels, ref_labels) -> bool:
    if not isinstance(ours, PAIR_LOSSES):
        return False
    if indices is None:
        ref = labels if ref_labels is None else ref_labels
        same = labels[:, None] == ref[None, :]
        if ref_labels is None:
            same.fill_diagonal_(False)
        sizes = [int(same.sum()), int((labels[:, None] != ref[None, :]).sum())]
    else:
        sizes = [len(t) for t in indices]
    return all(size <= 1 for size in sizes)


def _skip_unsupported(ours: torch.nn.Module, ref_labels, indices=None) -> None:
    if isinstance(ours, InstanceLoss) and (ref_labels is not None or indices is not None):
        pytest.skip("InstanceLoss refuses ref_emb and indices_tuple (as PML's)")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("name", list(PML_CASES))
def test_matches_pml_without_tuples(name: str, layout: str, dtype: torch.dtype) -> None:
    labels, ref_labels = LAYOUTS[layout]
    ours, theirs = PML_CASES[name]()
    _skip_unsupported(ours, ref_labels)
    assert not _pml_returns_zero_instead(ours, None, labels, ref_labels)
    emb, ref = _make(labels, ref_labels, dtype)
    assert_matches_pml(ours, theirs, emb, labels, None, ref, ref_labels)


def _mined(kind: str, emb, labels, ref=None, ref_labels=None):
    miner = {
        "ms_pairs": pml_miners.MultiSimilarityMiner(epsilon=0.3),
        "pair_margin": pml_miners.PairMarginMiner(pos_margin=0.6, neg_margin=1.2),
        "semihard_triplets": pml_miners.TripletMarginMiner(margin=0.3, type_of_triplets="semihard"),
        "batch_hard": pml_miners.BatchHardMiner(),
    }[kind]
    return miner(emb, labels, ref, ref_labels)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("miner", ["ms_pairs", "pair_margin", "semihard_triplets", "batch_hard"])
@pytest.mark.parametrize("layout", ["many_classes", "pk_batch", "singletons", "ref_set"])
@pytest.mark.parametrize("name", [n for n in PML_CASES if not n.startswith("instance")])
def test_matches_pml_with_mined_tuples(
    name: str, layout: str, miner: str, dtype: torch.dtype
) -> None:
    labels, ref_labels = LAYOUTS[layout]
    emb, ref = _make(labels, ref_labels, dtype)
    indices = _mined(miner, emb.double(), labels, None if ref is None else ref.double(), ref_labels)
    ours, theirs = PML_CASES[name]()
    if _pml_returns_zero_instead(ours, indices, labels, ref_labels):
        pytest.skip("PML returns 0 for at most one pair of each kind")
    assert_matches_pml(ours, theirs, emb, labels, indices, ref, ref_labels)


@pytest.mark.parametrize("name", ["tuplet", "intra_pair", "intra_pair_euclidean"])
def test_pair_losses_accept_a_tuple_without_labels(name: str) -> None:
    labels, _ = LAYOUTS["pk_batch"]
    emb, _ = _make(labels, None, torch.float64)
    indices = _mined("ms_pairs", emb, labels)
    ours, theirs = PML_CASES[name]()
    assert_matches_pml(ours, theirs, emb, None, indices)


@pytest.mark.parametrize("with_ref", [False, True])
def test_angular_tuple_with_repeats_and_without_negative_pairs(with_ref: bool) -> None:
    """Repeated positive pairs each count (as PML's per-pair losses do); a pair tuple with no
    negative pair gives PML's zero, with zero gradients for both sets."""
    labels, ref_labels = LAYOUTS["ref_set" if with_ref else "pk_batch"]
    emb, ref = _make(labels, ref_labels, torch.float64)
    ref_lab = labels if ref_labels is None else ref_labels
    a1, p = torch.nonzero(labels[:, None] == ref_lab[None, :], as_tuple=True)
    a1, p = a1[a1 != p][:9], p[a1 != p][:9]
    repeated = (torch.cat([a1, a1[:4]]), torch.cat([p, p[:4]]), a1[:2], p[:2])
    assert_matches_pml(
        AngularLoss(), pml_losses.AngularLoss(), emb, labels, repeated, ref, ref_labels
    )
    empty = a1[:0]
    value, grad, ref_grad = _run(AngularLoss(), emb, labels, (a1, p, empty, empty), ref, ref_labels)
    assert value.item() == 0.0 and torch.all(grad == 0)
    assert ref_grad is None or torch.all(ref_grad == 0)
    assert_matches_pml(
        AngularLoss(), pml_losses.AngularLoss(), emb, labels, (a1, p, empty, empty), ref, ref_labels
    )


@pytest.mark.parametrize("layout", ["many_classes", "ref_set"])
def test_angular_loss_is_independent_of_the_block_size(
    layout: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Blocks of one or a few pairs (the bound on the blocks' temporaries made tiny) give the
    one-block result, and PML's."""
    import dmlkit.functional.reduction as reduction

    labels, ref_labels = LAYOUTS[layout]
    emb, ref = _make(labels, ref_labels, torch.float64)
    whole = _run(AngularLoss(), emb, labels, None, ref, ref_labels)
    for elements in (1, 100):
        monkeypatch.setattr(reduction, "BLOCK_ELEMENTS", elements)
        blocked = _run(AngularLoss(), emb, labels, None, ref, ref_labels)
        for ours, expected in zip(blocked, whole, strict=True):
            if expected is not None:
                assert_close(ours, expected, 1e-12)
        assert_matches_pml(
            AngularLoss(), pml_losses.AngularLoss(), emb, labels, None, ref, ref_labels
        )


def _angular_oracle(emb, labels, ref, ref_labels, alpha: float) -> torch.Tensor:
    """PML's formula written out per (pair, reference) triple."""
    sq_tan = math.tan(math.radians(alpha)) ** 2
    same = labels[:, None] == ref_labels[None, :]
    a, p = torch.nonzero(same, as_tuple=True)
    unit_a, unit_p = F.normalize(emb[a], dim=1), F.normalize(ref[p], dim=1)
    logits = 4 * sq_tan * (unit_a + unit_p) @ ref.T - 2 * (1 + sq_tan) * (unit_a * unit_p).sum(
        1, keepdim=True
    )
    logits = logits.masked_fill(same[a], -math.inf)
    return torch.logsumexp(F.pad(logits, (0, 1)), dim=1).mean()


def test_angular_loss_matches_the_written_out_formula_with_unnormalised_references() -> None:
    """The references enter the negative term as given (PML's form): scaling them changes the
    loss, exactly as the formula says."""
    labels, ref_labels = LAYOUTS["ref_set"]
    emb, ref = _make(labels, ref_labels, torch.float64)
    for scale in (1.0, 3.0):
        x, r = emb.clone().requires_grad_(True), (ref * scale).requires_grad_(True)
        value = AngularLoss(alpha=45)(x, labels, None, r, ref_labels)
        expected = _angular_oracle(x, labels, r, ref_labels, 45)
        assert_close(value, expected, 1e-10)
        for ours, theirs in zip(
            torch.autograd.grad(value, (x, r)), torch.autograd.grad(expected, (x, r)), strict=True
        ):
            assert_close(ours, theirs, 1e-10)


def test_tuplet_margin_gradient_is_finite_for_identical_positives() -> None:
    """A positive pair of identical embeddings (cosine exactly 1): PML's arccos makes the
    gradient NaN; dmlkit's value is PML's and its gradient finite."""
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    emb, _ = _make(labels, None, torch.float64)
    emb[1] = emb[0]
    value, grad, _ = _run(TupletMarginLoss(), emb, labels)
    pml_value, pml_grad, _ = _run(pml_losses.TupletMarginLoss(), emb, labels)
    assert torch.isnan(pml_grad).any()
    assert_close(value, pml_value)
    assert torch.isfinite(grad).all()
    # Away from the duplicated pair the gradient is PML's.
    assert_close(grad[2:], pml_grad[2:])


def _tuplet_oracle(sim, a1, p, a2, n, margin: float, scale: float) -> torch.Tensor:
    losses = []
    for a, j in zip(a1.tolist(), p.tolist(), strict=True):
        target = torch.cos(torch.acos(sim[a, j]) - math.radians(margin))
        negs = sim[a2[a2 == a], n[a2 == a]]
        losses.append(torch.log1p(torch.exp(scale * (negs - target)).sum()))
    return torch.stack(losses).mean()


def _intra_pair_oracle(sim, a1, p, a2, n, pos_eps: float, neg_eps: float) -> torch.Tensor:
    pos, neg = sim[a1, p], sim[a2, n]
    pos_loss = ((1 - pos_eps) * pos.mean() - pos).relu().pow(2).mean()
    neg_loss = (neg - (1 + neg_eps) * neg.mean()).relu().pow(2).mean()
    return pos_loss + neg_loss


@pytest.mark.parametrize("n_pos", [1, 3])
def test_pair_losses_on_single_pairs_match_the_formula(n_pos: int) -> None:
    """PML returns 0 when each pair list holds at most one pair; dmlkit computes the loss
    (a documented difference), checked against the formula written out."""
    labels = torch.tensor([0, 0, 0, 1, 1, 2])
    emb, _ = _make(labels, None, torch.float64)
    emb[4] = -emb[3] + 0.2 * emb[5]  # a dissimilar positive pair, so the variance term is active
    a1, p = torch.tensor([0, 3, 1])[:n_pos], torch.tensor([1, 4, 2])[:n_pos]
    a2, n = torch.tensor([0]), torch.tensor([5])
    for loss, oracle in (
        (TupletMarginLoss(margin=10, scale=8), lambda s: _tuplet_oracle(s, a1, p, a2, n, 10, 8)),
        (
            IntraPairVarianceLoss(pos_eps=0.3, neg_eps=0.3),
            lambda s: _intra_pair_oracle(s, a1, p, a2, n, 0.3, 0.3),
        ),
    ):
        x = emb.clone().requires_grad_(True)
        value = loss(x, None, (a1, p, a2, n))
        expected = oracle(F.normalize(x, dim=1) @ F.normalize(x, dim=1).T)
        assert value.item() > 0
        assert_close(value, expected, 1e-10)
        assert_close(torch.autograd.grad(value, x)[0], torch.autograd.grad(expected, x)[0], 1e-10)
        if n_pos == 1:
            assert pml_losses.TupletMarginLoss()(emb, None, (a1, p, a2, n)).item() == 0.0


def test_instance_loss_targets_are_label_ranks() -> None:
    """PML's target of item i is the column equal to its label's rank among the distinct
    labels (the item itself when labels are 0 … N − 1): written out, with shuffled labels."""
    labels = torch.tensor([7, 3, 3, 9, 7, 1])
    emb, _ = _make(labels, None, torch.float64)
    x = emb.clone().requires_grad_(True)
    value = InstanceLoss(gamma=4)(x, labels)
    ranks = torch.tensor([2, 1, 1, 3, 2, 0])
    unit = F.normalize(x, dim=1)
    expected = F.cross_entropy(4 * unit @ unit.T, ranks)
    assert_close(value, expected, 1e-12)
    assert_close(torch.autograd.grad(value, x)[0], torch.autograd.grad(expected, x)[0], 1e-12)


def test_instance_loss_refuses_tuples_and_reference_sets() -> None:
    labels = torch.arange(8) // 2
    emb = torch.randn(8, 4)
    with pytest.raises(ValueError, match="InstanceLoss does not support indices_tuple"):
        InstanceLoss()(emb, labels, (torch.tensor([0]), torch.tensor([1]), torch.tensor([2])))
    with pytest.raises(ValueError, match="does not support ref_emb"):
        InstanceLoss()(emb, labels, None, emb.clone(), labels)


def test_angular_loss_needs_labels_with_a_tuple() -> None:
    emb = torch.randn(8, 4)
    tuple_ = (torch.tensor([0]), torch.tensor([1]), torch.tensor([2]))
    with pytest.raises(ValueError, match="labels are required"):
        AngularLoss()(emb, None, tuple_)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: AngularLoss(alpha=0), r"alpha must be an angle in degrees in \(0, 90\)"),
        (lambda: AngularLoss(alpha=90), r"alpha must be an angle in degrees in \(0, 90\)"),
        (lambda: AngularLoss(alpha=float("nan")), "alpha must be a finite number"),
        (lambda: AngularLoss(alpha=True), "alpha must be a finite number"),
        (
            lambda: AngularLoss(distance=dd.LpDistance(power=2)),
            r"AngularLoss requires LpDistance\(p=2, power=1, normalize_embeddings=True\)",
        ),
        (
            lambda: AngularLoss(distance=dd.LpDistance(normalize_embeddings=False)),
            r"AngularLoss requires LpDistance\(p=2",
        ),
        (lambda: AngularLoss(distance=dd.LpDistance(p=1)), r"AngularLoss requires LpDistance\(p=2"),
        (
            lambda: AngularLoss(distance=dd.CosineSimilarity()),
            "AngularLoss requires LpDistance, got CosineSimilarity",
        ),
        (lambda: TupletMarginLoss(scale=0), "scale must be a positive number"),
        (lambda: TupletMarginLoss(margin=float("inf")), "margin must be a finite number"),
        (
            lambda: TupletMarginLoss(distance=dd.LpDistance()),
            "TupletMarginLoss requires CosineSimilarity, got LpDistance",
        ),
        (lambda: IntraPairVarianceLoss(pos_eps=-0.1), r"pos_eps must lie in \[0, 1\)"),
        (lambda: IntraPairVarianceLoss(neg_eps=1), r"neg_eps must lie in \[0, 1\)"),
        (lambda: IntraPairVarianceLoss(neg_eps="0.1"), "neg_eps must be a finite number"),
        (lambda: InstanceLoss(gamma=-1), "gamma must be a positive number"),
        (
            lambda: InstanceLoss(distance=dd.DotProductSimilarity()),
            "InstanceLoss requires CosineSimilarity, got DotProductSimilarity",
        ),
    ],
)
def test_bad_constructor_values(make: Callable[[], object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make()


def test_defaults_and_repr() -> None:
    angular, tuplet = AngularLoss(), TupletMarginLoss()
    pair, instance = IntraPairVarianceLoss(), InstanceLoss()
    assert (angular.alpha, tuplet.margin, tuplet.scale) == (40.0, 5.73, 64.0)
    assert (pair.pos_eps, pair.neg_eps, instance.gamma) == (0.01, 0.01, 64.0)
    assert isinstance(angular.distance, dd.LpDistance)
    for loss in (tuplet, pair, instance):
        assert isinstance(loss.distance, dd.CosineSimilarity)
    assert all(loss.reducer == dr.MeanReducer() for loss in (angular, tuplet, pair, instance))
    assert "alpha=40.0" in repr(angular) and "scale=64.0" in repr(tuplet)


SETTINGS = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)


@st.composite
def batches(draw):
    n = draw(st.integers(1, 20))
    dim = draw(st.integers(2, 8))
    n_classes = draw(st.integers(1, n))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    labels = torch.randint(0, n_classes, (n,), generator=g)
    spread = draw(st.sampled_from([0.0, 0.5, 2.0]))
    centres = torch.randn(n_classes + 4, dim, generator=g, dtype=torch.float64)
    emb = spread * centres[labels] + torch.randn(n, dim, generator=g, dtype=torch.float64)
    ref = ref_labels = None
    if draw(st.booleans()):
        m = draw(st.integers(1, 20))
        ref_labels = torch.randint(0, n_classes + draw(st.integers(0, 3)), (m,), generator=g)
        ref = spread * centres[ref_labels] + torch.randn(m, dim, generator=g, dtype=torch.float64)
    return emb, labels, ref, ref_labels


@pytest.mark.parametrize(
    "name", ["angular", "tuplet", "intra_pair", "intra_pair_euclidean", "instance"]
)
@SETTINGS
@given(batch=batches(), miner=st.sampled_from([None, "ms_pairs", "batch_hard"]))
def test_matches_pml_on_random_batches(name: str, batch, miner: str | None) -> None:
    emb, labels, ref, ref_labels = batch
    ours, theirs = PML_CASES[name]()
    if isinstance(ours, InstanceLoss):
        ref = ref_labels = miner = None
    indices = None if miner is None else _mined(miner, emb, labels, ref, ref_labels)
    if _pml_returns_zero_instead(ours, indices, labels, ref_labels):
        return
    assert_matches_pml(ours, theirs, emb, labels, indices, ref, ref_labels)
