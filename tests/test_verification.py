"""Verification metrics against scikit-learn's curves, hand-checked cases, and calibration that
meets its target on the calibration pairs."""

from __future__ import annotations

import math

import pytest
import torch
from sklearn.metrics import precision_recall_curve, roc_curve

from dmlkit.evaluation.verification import (
    best_f1,
    calibrate,
    curves,
    fnmr_at_fmr,
    item_pairs,
    items_for_pairs,
    match,
    pair_scores,
    summary,
    tpr_at_fpr,
)


def _pairs(n: int = 400, seed: int = 0, ties: bool = False):
    g = torch.Generator().manual_seed(seed)
    same = torch.rand(n, generator=g) < 0.3
    scores = torch.randn(n, generator=g) + 1.2 * same
    if ties:
        scores = torch.round(scores * 4) / 4
    return scores, same


@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "tied"])
def test_curves_equal_scikit_learns(ties: bool) -> None:
    scores, same = _pairs(ties=ties)
    c = curves(scores, same)
    fpr, tpr, thresholds = roc_curve(same.numpy(), scores.numpy(), drop_intermediate=False)
    # scikit-learn starts with an extra +inf threshold accepting nothing.
    assert thresholds[0] == math.inf
    torch.testing.assert_close(c.thresholds, torch.from_numpy(thresholds[1:]).double())
    torch.testing.assert_close(c.tpr, torch.from_numpy(tpr[1:]).double())
    torch.testing.assert_close(c.fpr, torch.from_numpy(fpr[1:]).double())
    precision, _, pr_thresholds = precision_recall_curve(same.numpy(), scores.numpy())
    by_threshold = dict(zip(pr_thresholds.tolist(), precision[:-1].tolist(), strict=True))
    for threshold, value in zip(c.thresholds.tolist(), c.precision.tolist(), strict=True):
        if threshold in by_threshold:
            assert value == pytest.approx(by_threshold[threshold])


def test_a_hand_checked_case() -> None:
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    same = torch.tensor([True, False, True, True, False, False])
    # Threshold 0.7 accepts 0.9, 0.8, 0.7: TPR 2/3, FPR 1/3, precision 2/3.
    c = curves(scores, same)
    assert c.thresholds.tolist() == pytest.approx([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    assert c.tpr[2] == pytest.approx(2 / 3) and c.fpr[2] == pytest.approx(1 / 3)
    assert c.precision[2] == pytest.approx(2 / 3)
    assert tpr_at_fpr(scores, same, 0.0) == pytest.approx(1 / 3)  # only 0.9 is accepted
    assert fnmr_at_fmr(scores, same, 0.34) == pytest.approx(0.0)  # 0.6 accepts all 3 genuine
    threshold, f1 = best_f1(scores, same)
    assert threshold == pytest.approx(0.6) and f1 == pytest.approx(2 * 0.75 * 1 / 1.75)


@pytest.mark.parametrize("target", [0.01, 0.05, 0.2])
def test_calibrated_thresholds_meet_their_targets(target: float) -> None:
    scores, same = _pairs(n=2000, seed=3)
    threshold = calibrate(scores, same, target_fmr=target)
    accepted = scores >= threshold
    fmr = float((accepted & ~same).sum() / (~same).sum())
    assert fmr <= target
    # The lowest such threshold: one step lower breaks the target.
    lower = scores[scores < threshold].max()
    assert float(((scores >= lower) & ~same).sum() / (~same).sum()) > target
    precise = calibrate(scores, same, target_precision=0.9)
    kept = scores >= precise
    assert float((kept & same).sum() / kept.sum()) >= 0.9


def test_item_pairs_list_every_pair_once() -> None:
    emb = torch.eye(4)[[0, 0, 1, 2]] + 0.01 * torch.arange(4)[:, None]
    scores, same = item_pairs(emb, torch.tensor([7, 7, 8, 8]))
    assert len(scores) == 6 and same.tolist() == [True, False, False, False, False, True]
    assert scores[0] > 0.99


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: curves(torch.rand(4), torch.ones(4, dtype=torch.bool)), "both genuine"),
        (lambda: curves(torch.rand(4), torch.ones(3, dtype=torch.bool)), "one length"),
        (lambda: curves(torch.tensor([0.1, math.nan]), torch.tensor([True, False])), "finite"),
        (lambda: calibrate(torch.rand(4), torch.tensor([1, 0, 1, 0])), "exactly one"),
        (
            lambda: calibrate(torch.rand(4), torch.tensor([1, 0, 1, 0]), target_fmr=2.0),
            r"in \[0, 1\]",
        ),
        (lambda: item_pairs(torch.rand(3, 2), torch.arange(3), metric="dot"), "metric must be"),
        (lambda: pair_scores(torch.rand(3, 2), torch.rand(2, 2)), "one shape"),
        (lambda: pair_scores(torch.rand(3, 2), torch.rand(3, 2), "l1"), "metric must be"),
        (lambda: match(torch.rand(3, 2), torch.rand(3, 2), math.nan), "threshold must be"),
        (lambda: match(torch.rand(3, 2), torch.tensor([[0.0, math.inf]] * 3), 0.5), "finite"),
    ],
)
def test_bad_input_is_a_value_error(call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()


def test_large_sets_are_sampled_to_at_most_max_pairs() -> None:
    g = torch.Generator().manual_seed(0)
    emb, labels = torch.randn(50, 4, generator=g), torch.arange(50) % 5
    assert items_for_pairs(50, 10**6) == 50
    kept = items_for_pairs(50, 100)
    assert kept * (kept - 1) // 2 <= 100 < (kept + 1) * kept // 2
    scores, same = item_pairs(emb, labels, max_pairs=100)
    assert len(scores) == kept * (kept - 1) // 2 and len(same) == len(scores)
    again, _ = item_pairs(emb, labels, max_pairs=100)
    assert torch.equal(scores, again)  # seeded


def test_pair_scores_and_match_by_hand() -> None:
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 4.0]])
    b = torch.tensor([[2.0, 0.0], [1.0, 0.0], [0.0, 0.0]])
    torch.testing.assert_close(pair_scores(a, b), torch.tensor([1.0, 0.0, 0.0]))
    torch.testing.assert_close(pair_scores(a, b, "euclidean"), -torch.tensor([1.0, 5**0.5, 5.0]))
    torch.testing.assert_close(pair_scores(a, b, "dot"), torch.tensor([2.0, 0.0, 0.0]))
    assert match(a, b, 0.5).tolist() == [True, False, False]
    assert match(a, b, 0.0).tolist() == [True, True, True]  # a score equal to the threshold
    assert match(a, b, -2.0, "euclidean").tolist() == [True, False, False]


def test_a_calibrated_threshold_matches_at_its_rate() -> None:
    """match() at calibrate()'s threshold accepts at most the target share of impostor pairs."""
    g = torch.Generator().manual_seed(3)
    labels = torch.arange(300) % 15
    emb = torch.randn(15, 8, generator=g)[labels] + 0.8 * torch.randn(300, 8, generator=g)
    left, right = torch.triu_indices(300, 300, offset=1)
    scores, same = pair_scores(emb[left], emb[right]), labels[left] == labels[right]
    threshold = calibrate(scores, same, target_fmr=0.01)
    accepted = match(emb[left], emb[right], threshold)
    assert float(accepted[~same].float().mean()) <= 0.01
    assert float(accepted[same].float().mean()) == pytest.approx(
        1 - fnmr_at_fmr(scores, same, 0.01)
    )


def test_summary_equals_the_separate_functions() -> None:
    scores, same = _pairs(ties=True)
    numbers = summary(scores, same)
    threshold, f1 = best_f1(scores, same)
    assert numbers["best_f1"] == f1 and numbers["best_f1_threshold"] == threshold
    for fmr in (1e-2, 1e-3):
        assert numbers[f"fnmr_at_fmr_{fmr:g}"] == fnmr_at_fmr(scores, same, fmr)
        assert numbers[f"threshold_at_fmr_{fmr:g}"] == calibrate(scores, same, target_fmr=fmr)
    assert numbers["genuine_pairs"] == float(same.sum())
