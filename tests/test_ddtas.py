"""DDTAS mining and loss against the hand-checked values of docs/ddtas.md §10 (T1–T4, T10)."""

from __future__ import annotations

import math

import pytest
import torch

import dmlkit.functional as F
from ddtas_spec import T2_LABELS, T2_S
from dmlkit.functional.mining import tolerances_from_ratio
from dmlkit.losses import SoftContrastiveLoss
from dmlkit.miners import ASMSMiner, ATASMSMiner, MultiSimilarityMiner
from dmlkit.reducers import AvgNonZeroReducer, MeanReducer, SumReducer

T1_LABELS = torch.tensor([0, 0, 1, 1])
T1_UPPER = {(0, 1): 0.50, (0, 2): 0.55, (0, 3): 0.20, (1, 2): 0.45, (1, 3): 0.48, (2, 3): 0.70}


def _sim_from_upper(n: int, upper: dict[tuple[int, int], float]) -> torch.Tensor:
    s = torch.eye(n, dtype=torch.float64)
    for (i, j), v in upper.items():
        s[i, j] = s[j, i] = v
    return s


def _embeddings(sim: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Rows of the Cholesky factor: unit vectors whose Gram matrix is ``sim``."""
    return torch.linalg.cholesky(sim).to(dtype)


def _kept(indices, n: int) -> tuple[dict[int, set[int]], dict[int, set[int]]]:
    a1, p, a2, neg = (t.tolist() for t in indices)
    pos_sets: dict[int, set[int]] = {i: set() for i in range(n)}
    neg_sets: dict[int, set[int]] = {i: set() for i in range(n)}
    for a, j in zip(a1, p, strict=True):
        pos_sets[a].add(j)
    for a, j in zip(a2, neg, strict=True):
        neg_sets[a].add(j)
    return pos_sets, neg_sets


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_t1_asms_versus_symmetric_ms(dtype: torch.dtype) -> None:
    emb = _embeddings(_sim_from_upper(4, T1_UPPER), dtype)
    asms_pos, asms_neg = _kept(ASMSMiner()(emb, T1_LABELS), 4)
    assert asms_pos == {0: {1}, 1: {0}, 2: set(), 3: set()}
    assert asms_neg == {0: {2}, 1: set(), 2: set(), 3: set()}
    ms_pos, ms_neg = _kept(MultiSimilarityMiner(epsilon=0.1)(emb, T1_LABELS), 4)
    assert ms_pos == {0: {1}, 1: {0}, 2: set(), 3: set()}
    assert ms_neg == {0: {2}, 1: {2, 3}, 2: set(), 3: set()}

    miner = ATASMSMiner(epsilon=0.1)
    at_indices = miner(emb, T1_LABELS)
    stats = miner.last_stats
    assert stats.ratio == pytest.approx(0.75)
    assert (stats.gamma_pos, stats.gamma_neg) == (0.1, 0.01)
    assert _kept(at_indices, 4) == (asms_pos, asms_neg)
    assert stats.num_skipped_anchors == 3

    loss = SoftContrastiveLoss()(emb, T1_LABELS, at_indices)
    assert loss.item() == pytest.approx(0.2282847592, rel=1e-6)
    expected = (math.log1p(math.exp(0.4)) + 0.05 * math.log1p(math.exp(-6))) / 4
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    # The released reduction is the mean over all 4 anchors; other reducers see the same
    # per-anchor losses (anchor 0's, and 0 for the 3 skipped ones).
    for reducer, factor in ((MeanReducer(), 1), (SumReducer(), 4), (AvgNonZeroReducer(), 4)):
        value = SoftContrastiveLoss(reducer=reducer)(emb, T1_LABELS, at_indices).item()
        assert value == pytest.approx(factor * expected, rel=1e-6)


def test_t1_gradients_with_respect_to_similarities() -> None:
    sim = _sim_from_upper(4, T1_UPPER)
    keep_pos, keep_neg = F.asymmetric_mining_masks(sim, *F.label_weights(T1_LABELS), 0.1, 0.01)
    sim.requires_grad_(True)
    pairs = F.PairIndices.from_masks(keep_pos, keep_neg)
    loss = F.soft_contrastive_loss(sim, pairs, reducer=MeanReducer())
    (grad,) = torch.autograd.grad(loss, sim)
    assert grad[0, 1].item() == pytest.approx(-0.2993438, abs=5e-8)
    assert grad[0, 2].item() == pytest.approx(0.0012363, abs=5e-8)
    assert grad[1, 0].item() == 0.0  # anchor 1 is skipped: no mined negative


T2_AT_ASMS = (
    {0: {1, 2}, 1: {0, 2}, 2: set(), 3: {4, 5}, 4: set(), 5: {3, 4}},
    {0: {3}, 1: {3}, 2: set(), 3: {0, 1, 2}, 4: set(), 5: {2}},
)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_t2_adaptive_tolerances_change_the_result(dtype: torch.dtype) -> None:
    emb = _embeddings(torch.tensor(T2_S, dtype=torch.float64), dtype)
    miner = ATASMSMiner(epsilon=0.1)
    indices = miner(emb, T2_LABELS)
    stats = miner.last_stats
    assert stats.ratio == pytest.approx(1.25)
    assert stats.tau == pytest.approx(0.3886499, abs=1e-7)
    assert stats.gamma_pos == pytest.approx(0.1388650, abs=1e-7)
    assert stats.gamma_neg == pytest.approx(0.0061135, abs=1e-7)
    pos_sets, neg_sets = _kept(indices, 6)
    # Anchor 2 keeps positives but no negative, anchor 4 neither side's complement: skipped.
    assert {a: s for a, s in neg_sets.items()} == T2_AT_ASMS[1]
    for anchor in (0, 1, 3, 5):
        assert pos_sets[anchor] == T2_AT_ASMS[0][anchor]
    assert SoftContrastiveLoss()(emb, T2_LABELS, indices).item() == pytest.approx(
        0.534575195, rel=1e-6 if dtype == torch.float64 else 1e-5
    )

    static = ASMSMiner()(emb, T2_LABELS)
    static_pos, static_neg = _kept(static, 6)
    assert static_pos[0] == {1} and static_neg[0] == {3, 4}
    assert static_pos[5] == {3} and static_neg[5] == {2}
    assert SoftContrastiveLoss()(emb, T2_LABELS, static).item() == pytest.approx(
        0.588205559, rel=1e-6 if dtype == torch.float64 else 1e-5
    )


def test_t2_counting_pass_agrees_with_pml() -> None:
    pml_miners = pytest.importorskip("pytorch_metric_learning.miners")
    emb = _embeddings(torch.tensor(T2_S, dtype=torch.float64))
    a1, _, a2, _ = pml_miners.MultiSimilarityMiner(epsilon=0.1)(emb, T2_LABELS)
    assert (len(a1), len(a2)) == (8, 15)
    miner = ATASMSMiner(epsilon=0.1)
    miner(emb, T2_LABELS)
    assert miner.last_stats.ratio == pytest.approx(15 / 12)


def test_t2_per_anchor_terms() -> None:
    sim = torch.tensor(T2_S, dtype=torch.float64)
    emb = _embeddings(sim)
    indices = ATASMSMiner()(emb, T2_LABELS)
    expected = {
        0: (0.788306183, 0.001347855),
        1: (0.818306183, 0.000123784),
        3: (0.811603708, 0.000627147),
        5: (0.786228814, 0.000907496),
    }
    pos_sets, neg_sets = _kept(indices, 6)
    for anchor, (pos_term, neg_term) in expected.items():
        pos_sim = sim[anchor, sorted(pos_sets[anchor])]
        neg_sim = sim[anchor, sorted(neg_sets[anchor])]
        got_pos = torch.nn.functional.softplus(-2 * (pos_sim - 0.7)).mean().item()
        got_neg = (2 / 40) * torch.nn.functional.softplus(40 * (neg_sim - 0.7)).mean().item()
        assert got_pos == pytest.approx(pos_term, abs=1e-9)
        assert got_neg == pytest.approx(neg_term, abs=1e-9)


@pytest.mark.parametrize(
    ("pos_sim", "neg_sim", "expected"),
    [
        (0.7, -1.0, 0.693147),  # a positive at λ: ln 2
        (1.0, 0.7, 0.034657 + 1.0 * math.log1p(math.exp(-0.6))),  # a negative at λ: 0.05·ln 2
        (0.9, -1.0, 0.513015),
        (1.0, 0.9, 0.400017 + math.log1p(math.exp(-0.6))),
    ],
)
def test_t3_single_pair_values(pos_sim: float, neg_sim: float, expected: float) -> None:
    sim = torch.tensor([[pos_sim, neg_sim]], dtype=torch.float64)
    pairs = F.PairIndices.from_lists(*(torch.tensor([k]) for k in (0, 0, 0, 1)))
    negligible = 0.05 * math.log1p(math.exp(40 * (-1.7)))
    loss = F.soft_contrastive_loss(sim, pairs, reducer=MeanReducer()).item()
    assert loss == pytest.approx(expected + (negligible if neg_sim == -1.0 else 0), abs=2e-6)


@pytest.mark.parametrize(
    ("ratio", "tau", "gamma_pos", "gamma_neg"),
    [
        (0.5, 0.0, 0.100000, 0.010000),
        (1.0, 0.0, 0.100000, 0.010000),
        (1.0 + 1e-12, 0.365529, 0.136553, 0.006345),
        (1.25, 0.388650, 0.138865, 0.006114),
        (2.0, 0.440399, 0.144040, 0.005596),
        (5.0, 0.496654, 0.149665, 0.005033),
        (18.75, 0.500000, 0.150000, 0.005000),
    ],
)
def test_t4_tolerance_table(ratio: float, tau: float, gamma_pos: float, gamma_neg: float) -> None:
    g_pos, g_neg, t = tolerances_from_ratio(ratio, 0.1, 0.01)
    assert t == pytest.approx(tau, abs=5e-7)
    assert g_pos == pytest.approx(gamma_pos, abs=5e-7)
    assert g_neg == pytest.approx(gamma_neg, abs=5e-7)


def test_t4_all_negatives_over_all_positives_in_a_cub_batch() -> None:
    labels = torch.arange(80) // 5  # 16 classes × 5
    emb = torch.ones(80, 8)  # every negative as similar as every positive: all are counted
    miner = ATASMSMiner()
    miner(emb, labels)
    assert miner.last_stats.ratio == pytest.approx(18.75)
    assert miner.last_stats.gamma_pos == pytest.approx(0.15, abs=1e-6)
    assert miner.last_stats.gamma_neg == pytest.approx(0.005, abs=1e-6)


def test_t4_stateless() -> None:
    torch.manual_seed(3)
    batches = [(torch.randn(40, 16), torch.arange(40) // 4) for _ in range(3)]
    miner = ATASMSMiner()
    forward = []
    for emb, lab in batches:
        miner(emb, lab)
        forward.append(miner.last_stats)
    backward = []
    for emb, lab in reversed(batches):
        miner(emb, lab)
        backward.append(miner.last_stats)
    assert forward == list(reversed(backward))
    miner(*batches[0])
    assert miner.last_stats == forward[0]


def _soft_contrastive_oracle(emb: torch.Tensor, labels: torch.Tensor, keep_pos, keep_neg):
    """The §4 formula with explicit loops and masks fixed as constants."""
    sim = torch.nn.functional.normalize(emb, dim=1) @ torch.nn.functional.normalize(emb, dim=1).T
    total = sim.new_zeros(())
    for i in range(len(labels)):
        pos = [j for j in range(len(labels)) if keep_pos[i, j]]
        neg = [j for j in range(len(labels)) if keep_neg[i, j]]
        if not pos or not neg:
            continue
        pos_term = torch.stack([torch.nn.functional.softplus(-2 * (sim[i, j] - 0.7)) for j in pos])
        neg_term = torch.stack([torch.nn.functional.softplus(40 * (sim[i, j] - 0.7)) for j in neg])
        total = total + pos_term.mean() + (2 / 40) * neg_term.mean()
    return total / len(labels)


def test_t10_no_gradient_through_thresholds() -> None:
    torch.manual_seed(7)
    labels = torch.arange(30) // 5
    emb = (0.3 * torch.randn(6, 12)[labels] + torch.randn(30, 12)).double().requires_grad_(True)
    miner = ATASMSMiner()
    indices = miner(emb, labels)
    loss = SoftContrastiveLoss()(emb, labels, indices)
    (grad,) = torch.autograd.grad(loss, emb)

    with torch.no_grad():
        sim = (
            torch.nn.functional.normalize(emb, dim=1) @ torch.nn.functional.normalize(emb, dim=1).T
        )
        stats = miner.last_stats
        keep_pos, keep_neg = F.asymmetric_mining_masks(
            sim, *F.label_weights(labels), stats.gamma_pos, stats.gamma_neg
        )
    frozen = emb.detach().clone().requires_grad_(True)
    expected = _soft_contrastive_oracle(frozen, labels, keep_pos, keep_neg)
    (expected_grad,) = torch.autograd.grad(expected, frozen)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-12)
    assert stats.tau > 0  # the adaptive branch was exercised


def test_all_anchors_skipped_gives_zero_with_graph() -> None:
    emb = torch.randn(6, 4, requires_grad=True)
    labels = torch.arange(6)  # no positive pairs: every anchor is skipped
    loss = SoftContrastiveLoss()(emb, labels, ATASMSMiner()(emb, labels))
    assert isinstance(loss, torch.Tensor) and loss.item() == 0.0
    loss.backward()
    assert emb.grad is not None and torch.all(emb.grad == 0)


def test_role_names_and_paper_letters() -> None:
    assert SoftContrastiveLoss(alpha=30, beta=3, lam=0.6).neg_scale == 30
    assert SoftContrastiveLoss(alpha=30, beta=3, lam=0.6).pos_scale == 3
    with pytest.raises(ValueError, match="alias"):
        SoftContrastiveLoss(neg_scale=10, alpha=30)
    with pytest.raises(ValueError, match="similarity"):
        from dmlkit.distances import LpDistance

        SoftContrastiveLoss(distance=LpDistance())


def test_figure_sign_and_by_value_options() -> None:
    emb = _embeddings(_sim_from_upper(4, T1_UPPER))
    _, neg_sets = _kept(ASMSMiner(negative_rule="figure")(emb, T1_LABELS), 4)
    assert neg_sets[0] == {2}  # 0.55 > 0.50 + 0.01
    # Items 0 and 2 share a label and an identical embedding (similarity exactly 1); item 1,
    # of another class, is close enough that the positive (0, 2) is hard enough to keep.
    emb = torch.tensor([[1.0, 0.0], [0.95, math.sqrt(1 - 0.95**2)], [1.0, 0.0]])
    labels = torch.tensor([0, 1, 0])
    pos_sets, _ = _kept(ASMSMiner()(emb, labels), 3)
    assert pos_sets[0] == {2}
    pos_sets, _ = _kept(ASMSMiner(exclude_self_by_value=True)(emb, labels), 3)
    assert pos_sets[0] == set()
