"""PML 2.9's further miners and ``BatchedDistance``: the deterministic miners agree with PML
(tuples compared as sets) and with brute-force oracles; the random miners agree with PML in
everything that is not drawn (weights, counts, bins) and in distribution.

PML is a test-only dependency: the library never imports it.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from torch import Tensor

import dmlkit.distances as dd
import dmlkit.losses as dl
import dmlkit.miners as dm
from conftest import assert_close
from dmlkit.functional import mining

pml_miners = pytest.importorskip("pytorch_metric_learning.miners")
pml_distances = pytest.importorskip("pytorch_metric_learning.distances")

from test_pml_parity import LAYOUTS, _as_set, _make  # noqa: E402
from test_properties import batches  # noqa: E402

F64 = torch.float64
DTYPES = pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])

VALID_STRATEGIES = [
    (pos, neg)
    for pos in ("hard", "semihard", "easy", "all")
    for neg in ("hard", "semihard", "easy", "all")
    if not (pos == neg == "semihard") and {pos, neg} != {"semihard", "all"}
]


def _pair(ours: Callable[..., Any], theirs: Callable[..., Any], distance: str | None = None):
    """(dmlkit factory, PML factory): ``distance`` names a distance class both libraries have."""
    if distance is None:
        return ours, theirs
    return (
        lambda **k: ours(distance=getattr(dd, distance)(), **k),
        lambda **k: theirs(distance=getattr(pml_distances, distance)(), **k),
    )


# The deterministic miners, in test_pml_parity.MINER_PAIRS's form: name -> (dmlkit factory,
# PML factory, options).
PML_MINER_CASES: dict[str, tuple[Callable[..., Any], Callable[..., Any], dict[str, Any]]] = {
    "angular": (dm.AngularMiner, pml_miners.AngularMiner, {}),
    "angular_35": (dm.AngularMiner, pml_miners.AngularMiner, {"angle": 35}),
    "angular_5": (dm.AngularMiner, pml_miners.AngularMiner, {"angle": 5}),
    **{
        f"easy_hard_{pos}_{neg}": (
            dm.BatchEasyHardMiner,
            pml_miners.BatchEasyHardMiner,
            {"pos_strategy": pos, "neg_strategy": neg},
        )
        for pos, neg in VALID_STRATEGIES
    },
    **{
        f"easy_hard_cosine_{pos}_{neg}": (
            *_pair(dm.BatchEasyHardMiner, pml_miners.BatchEasyHardMiner, "CosineSimilarity"),
            {"pos_strategy": pos, "neg_strategy": neg},
        )
        for pos, neg in [("hard", "semihard"), ("semihard", "easy"), ("easy", "hard")]
    },
    "easy_hard_ranges": (
        dm.BatchEasyHardMiner,
        pml_miners.BatchEasyHardMiner,
        {
            "pos_strategy": "semihard",
            "neg_strategy": "hard",
            "allowed_pos_range": (0.2, 1.1),
            "allowed_neg_range": (0.9, 1.6),
        },
    ),
    "easy_hard_ranges_easy": (
        dm.BatchEasyHardMiner,
        pml_miners.BatchEasyHardMiner,
        {"pos_strategy": "easy", "allowed_pos_range": (0.5, 2.0), "allowed_neg_range": (0.0, 1.3)},
    ),
    "easy_hard_cosine_ranges": (
        *_pair(dm.BatchEasyHardMiner, pml_miners.BatchEasyHardMiner, "CosineSimilarity"),
        {
            "pos_strategy": "hard",
            "neg_strategy": "semihard",
            "allowed_pos_range": (0.1, 0.8),
            "allowed_neg_range": (-0.5, 0.6),
        },
    ),
    "hdc": (dm.HDCMiner, pml_miners.HDCMiner, {}),
    "hdc_0.3": (dm.HDCMiner, pml_miners.HDCMiner, {"filter_percentage": 0.3}),
    "hdc_all": (dm.HDCMiner, pml_miners.HDCMiner, {"filter_percentage": 1.0}),
    "hdc_cosine": (
        *_pair(dm.HDCMiner, pml_miners.HDCMiner, "CosineSimilarity"),
        {"filter_percentage": 0.2},
    ),
}

# Every miner this file compares with PML: the cases above, the random miners (by what is not
# drawn and by distribution) and the packaged triplets (test_packaged_triplets_match_pml).
PML_COMPARED_MINERS = {
    type(make(**kwargs)).__name__ for make, _, kwargs in PML_MINER_CASES.values()
}
PML_COMPARED_MINERS |= {
    "DistanceWeightedMiner",
    "UniformHistogramMiner",
    "EmbeddingsAlreadyPackagedAsTriplets",
}


def _mine_both(name: str, emb: Tensor, labels: Tensor, ref: Tensor | None, ref_labels):
    ours_cls, theirs_cls, kwargs = PML_MINER_CASES[name]
    ours, theirs = ours_cls(**kwargs), theirs_cls(**kwargs)
    ref_lab = None if ref_labels is None else ref_labels.clone()
    return ours, theirs, ours(emb, labels, ref, ref_lab), theirs(emb, labels, ref, ref_lab)


@DTYPES
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("name", list(PML_MINER_CASES))
def test_deterministic_miner_matches_pml(name: str, layout: str, dtype: torch.dtype) -> None:
    labels, ref_labels = LAYOUTS[layout]
    emb, ref = _make(labels, ref_labels, dtype)
    ours, theirs, mine, reference = _mine_both(name, emb, labels, ref, ref_labels)
    assert len(mine) == len(reference)
    assert all(t.dtype == torch.long for t in mine)
    assert _as_set(mine) == _as_set(reference)
    if len(mine) == 3:
        assert ours.num_triplets == theirs.num_triplets == len(mine[0])
    else:
        assert ours.num_pos_pairs == theirs.num_pos_pairs == len(mine[0])
        assert ours.num_neg_pairs == theirs.num_neg_pairs == len(mine[2])


def test_the_comparisons_see_tuples() -> None:
    """The parity cases are not vacuous: on the clustered layouts each case mines something,
    and the options change what is mined."""
    labels, _ = LAYOUTS["many_classes"]
    emb, _ = _make(labels, None, F64)
    mined = {}
    for name in PML_MINER_CASES:
        _, _, mine, _ = _mine_both(name, emb, labels, None, None)
        assert len(mine[0]) > 0, name
        mined[name] = _as_set(mine)
    assert mined["angular"] != mined["angular_35"]
    assert mined["hdc"] != mined["hdc_0.3"]
    assert mined["easy_hard_hard_hard"] != mined["easy_hard_easy_easy"]


SETTINGS = settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)


@pytest.mark.parametrize(
    "name",
    ["angular", "easy_hard_easy_semihard", "easy_hard_semihard_hard", "easy_hard_ranges", "hdc"],
)
@SETTINGS
@given(batch=batches())
def test_deterministic_miner_matches_pml_on_random_batches(name: str, batch) -> None:
    emb, labels, ref, ref_labels = batch
    _, _, mine, reference = _mine_both(name, emb, labels, ref, ref_labels)
    assert _as_set(mine) == _as_set(reference)


# ---------------------------------------------------------------------------- oracles


def _unit(x: Tensor) -> Tensor:
    return torch.nn.functional.normalize(x, dim=1)


def _angular_oracle(emb, labels, ref, ref_labels, angle_degrees: float) -> set[tuple[int, ...]]:
    found = set()
    for a in range(len(emb)):
        for p in range(len(ref)):
            if labels[a] != ref_labels[p] or (ref is emb and p == a):
                continue
            centre = (emb[a] + ref[p]) / 2
            for n in range(len(ref)):
                if labels[a] == ref_labels[n]:
                    continue
                ratio = (emb[a] - ref[p]).norm() / (2 * (ref[n] - centre).norm())
                if math.degrees(math.atan(float(ratio))) > angle_degrees:
                    found.add((a, p, n))
    return found


@pytest.mark.parametrize("layout", ["pk_batch", "ref_set"])
def test_angular_miner_matches_oracle_on_raw_embeddings(layout: str) -> None:
    """Angles are measured between the embeddings as given (PML's rule), so rescaling one
    embedding changes what is mined although the (normalised) distances do not change."""
    labels, ref_labels = LAYOUTS[layout]
    emb, ref = _make(labels, ref_labels, F64)
    emb = emb * torch.linspace(0.2, 3.0, len(emb), dtype=F64)[:, None]
    mined = dm.AngularMiner(25, chunk_elements=37)(emb, labels, ref, ref_labels)
    full_ref = emb if ref is None else ref
    full_labels = labels if ref_labels is None else ref_labels
    expected = _angular_oracle(emb, labels, full_ref, full_labels, 25)
    assert _as_set(mined) == expected and expected
    unscaled = dm.AngularMiner(25)(
        _unit(emb), labels, None if ref is None else _unit(ref), ref_labels
    )
    assert _as_set(unscaled) != expected


def test_angular_miner_blocks_do_not_change_the_result() -> None:
    labels, _ = LAYOUTS["many_classes"]
    emb, _ = _make(labels, None, torch.float32)
    whole = dm.AngularMiner()(emb, labels)
    blocked = dm.AngularMiner(chunk_elements=50)(emb, labels)
    for a, b in zip(whole, blocked, strict=True):
        assert torch.equal(a, b)
    # Ordered as PML's listing of all triplets: by anchor, positive, negative.
    keys = whole[0] * 10**6 + whole[1] * 10**3 + whole[2]
    assert torch.equal(keys, keys.sort().values)


def _easy_hard_oracle(sim, pos, neg, pos_strategy, neg_strategy, pos_range, neg_range):
    """Row by row in Python, on a similarity-like matrix (ranges in its units)."""
    n_rows, n_cols = sim.shape
    s = sim.tolist()

    def allowed(i: int, j: int, allowed_range) -> bool:
        return allowed_range is None or allowed_range[0] <= s[i][j] <= allowed_range[1]

    def choose(i, mask, rng, largest, above=-math.inf, below=math.inf):
        cols = [
            j
            for j in range(n_cols)
            if mask[i][j] and allowed(i, j, rng) and above < s[i][j] < below
        ]
        if not cols:
            return None
        return (max if largest else min)(cols, key=lambda j: s[i][j])

    pairs_p, pairs_n = [], []
    for i in range(n_rows):
        pos_largest, neg_largest = pos_strategy == "easy", neg_strategy != "easy"
        if pos_strategy == "semihard":
            n = choose(i, neg, neg_range, neg_largest)
            p = None if n is None else choose(i, pos, pos_range, False, above=s[i][n])
        elif neg_strategy == "semihard":
            p = choose(i, pos, pos_range, pos_largest)
            n = None if p is None else choose(i, neg, neg_range, True, below=s[i][p])
        else:
            p = choose(i, pos, pos_range, pos_largest)
            n = choose(i, neg, neg_range, neg_largest)
        if pos_strategy == "all":
            pairs_p += [(i, j) for j in range(n_cols) if pos[i][j] and allowed(i, j, pos_range)]
        if neg_strategy == "all":
            pairs_n += [(i, j) for j in range(n_cols) if neg[i][j] and allowed(i, j, neg_range)]
        both = p is not None and n is not None
        if pos_strategy != "all" and (both or (neg_strategy == "all" and p is not None)):
            pairs_p.append((i, p))
        if neg_strategy != "all" and (both or (pos_strategy == "all" and n is not None)):
            pairs_n.append((i, n))
    return {("p", *x) for x in pairs_p} | {("n", *x) for x in pairs_n}


@pytest.mark.parametrize("strategies", VALID_STRATEGIES, ids=lambda s: "_".join(s))
@pytest.mark.parametrize("inverted", [False, True], ids=["euclidean", "cosine"])
def test_batch_easy_hard_miner_matches_oracle_with_ranges(strategies, inverted: bool) -> None:
    """Includes the one deliberate difference from PML: an ``"all"`` side's allowed range
    filters its pairs (PML ignores it)."""
    pos_strategy, neg_strategy = strategies
    labels, ref_labels = LAYOUTS["ref_set"]
    emb, ref = _make(labels, ref_labels, F64)
    distance = dd.CosineSimilarity() if inverted else dd.LpDistance()
    mat = distance(emb, ref)
    pos_range, neg_range = ((0.1, 0.8), (-0.4, 0.5)) if inverted else ((0.4, 1.2), (0.8, 1.5))
    miner = dm.BatchEasyHardMiner(
        pos_strategy, neg_strategy, pos_range, neg_range, distance=distance
    )
    mined = miner(emb, labels, ref, ref_labels)
    same = labels[:, None] == ref_labels[None, :]
    sim, sign = (mat, 1) if inverted else (-mat, -1)
    on_sim = [tuple(sorted(sign * x for x in r)) for r in (pos_range, neg_range)]
    expected = _easy_hard_oracle(
        sim, same.tolist(), (~same).tolist(), pos_strategy, neg_strategy, *on_sim
    )
    assert _as_set(mined) == expected
    if "all" in strategies:
        unfiltered = dm.BatchEasyHardMiner(pos_strategy, neg_strategy, distance=distance)
        assert len(_as_set(unfiltered(emb, labels, ref, ref_labels))) > len(expected)


def test_batch_easy_hard_miner_with_all_and_a_range_differs_from_pml_as_documented() -> None:
    labels, _ = LAYOUTS["pk_batch"]
    emb, _ = _make(labels, None, F64)
    ours = dm.BatchEasyHardMiner("all", "hard", allowed_pos_range=(0.0, 1.0))(emb, labels)
    theirs = pml_miners.BatchEasyHardMiner("all", "hard", allowed_pos_range=(0.0, 1.0))(emb, labels)
    dist = dd.LpDistance()(emb)
    assert bool((dist[ours[0], ours[1]] <= 1.0).all())
    assert bool((dist[theirs[0], theirs[1]] > 1.0).any())  # PML keeps pairs outside the range
    assert torch.equal(ours[2], theirs[2]) and torch.equal(ours[3], theirs[3])


# ---------------------------------------------------------------------------- HDC


def _unordered(indices) -> Counter:
    """Pairs as a multiset, (i, j) and (j, i) alike: HDC keeps one of two equal distances."""
    a1, p, a2, n = (t.tolist() for t in indices)
    return Counter(("p", min(x), max(x)) for x in zip(a1, p, strict=True)) + Counter(
        ("n", min(x), max(x)) for x in zip(a2, n, strict=True)
    )


@pytest.mark.parametrize("kind", ["pairs", "triplets"])
def test_hdc_with_external_indices_matches_pml(kind: str) -> None:
    labels, _ = LAYOUTS["pk_batch"]
    emb, _ = _make(labels, None, F64)
    if kind == "pairs":
        external = pml_miners.MultiSimilarityMiner(epsilon=0.3)(emb, labels)
    else:
        external = pml_miners.TripletMarginMiner(margin=0.3)(emb, labels)
    ours, theirs = dm.HDCMiner(0.4), pml_miners.HDCMiner(0.4)
    ours.set_idx_externally(external, labels)
    theirs.set_idx_externally(external, labels)
    assert ours.was_set_externally
    mine = ours(emb, labels)
    reference = theirs(emb, labels)
    assert len(mine[0]) > 0 and len(mine[2]) > 0
    assert _unordered(mine) == _unordered(reference)
    ours.reset_idx()
    assert not ours.was_set_externally
    assert _as_set(ours(emb, labels)) == _as_set(pml_miners.HDCMiner(0.4)(emb, labels))


def test_hdc_external_pairs_against_the_labels_or_self_are_left_out() -> None:
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    emb, _ = _make(labels, None, F64)
    # (0, 0) pairs an anchor with itself, (0, 2) is labelled negative, (1, 0) is fine;
    # negatives: (2, 3) is labelled positive, (3, 0) is fine.
    external = tuple(torch.tensor(x) for x in ([0, 0, 1], [0, 2, 0], [2, 3], [3, 0]))
    miner = dm.HDCMiner(1.0)
    miner.set_idx_externally(external, labels)
    assert _as_set(miner(emb, labels)) == {("p", 1, 0), ("n", 3, 0)}


def test_hdc_external_indices_beyond_the_batch_are_a_value_error() -> None:
    labels = torch.arange(8) // 2
    emb, _ = _make(labels, None, F64)
    miner = dm.HDCMiner()
    with pytest.raises(ValueError, match=r"indices_tuple\[a\] has indices outside \[0, 8\)"):
        miner.set_idx_externally((torch.tensor([8]), torch.tensor([1]), torch.tensor([2])), labels)
    miner.set_idx_externally((torch.tensor([7]), torch.tensor([6]), torch.tensor([2])), labels)
    with pytest.raises(ValueError, match="external pairs address rows beyond this batch"):
        miner(emb[:6], labels[:6])


# ---------------------------------------------------------------------------- packaged triplets


def test_packaged_triplets_match_pml() -> None:
    labels, _ = LAYOUTS["many_classes"]
    emb, _ = _make(labels, None, F64)
    mine = dm.EmbeddingsAlreadyPackagedAsTriplets()(emb, labels)
    reference = pml_miners.EmbeddingsAlreadyPackagedAsTriplets()(emb, labels)
    for a, b in zip(mine, reference, strict=True):
        assert torch.equal(a, b.long())
    assert mine[0].tolist() == list(range(0, 48, 3))


def test_packaged_triplets_need_a_multiple_of_three() -> None:
    with pytest.raises(ValueError, match="its size 8 is not a multiple of 3"):
        dm.EmbeddingsAlreadyPackagedAsTriplets()(torch.randn(8, 4), torch.arange(8))


def test_packaged_triplets_are_found_in_a_reference_set_through_anchor_in_ref() -> None:
    """Against a memory bank holding the batch, the loss is the in-batch loss; triplets whose
    positive or negative the bank lacks are left out."""
    labels = torch.tensor([0, 0, 1, 2, 2, 3, 4, 4, 0])
    emb, _ = _make(labels, None, F64)
    other, _ = _make(torch.arange(5), None, F64)
    ref = torch.cat([other, emb])
    ref_labels = torch.cat([torch.arange(5) + 10, labels])
    anchor_in_ref = torch.arange(9) + 5
    miner = dm.EmbeddingsAlreadyPackagedAsTriplets()
    mined = miner(emb, labels, ref, ref_labels, anchor_in_ref)
    assert [t.tolist() for t in mined] == [[0, 3, 6], [6, 9, 12], [7, 10, 13]]
    loss = dl.TripletMarginLoss(margin=0.5)
    assert_close(
        loss(emb, labels, mined, ref, ref_labels), loss(emb, labels, miner(emb, labels)), 1e-12
    )
    anchor_in_ref[4] = -1  # the second triplet's positive is not in the bank
    mined = miner(emb, labels, ref, ref_labels, anchor_in_ref)
    assert [t.tolist() for t in mined] == [[0, 6], [6, 12], [7, 13]]
    assert all(t.numel() == 0 for t in miner(emb, labels, ref, ref_labels))


# ---------------------------------------------------------------------------- distance-weighted


def _pml_distance_weights(monkeypatch, emb, labels, ref=None, ref_labels=None) -> Tensor:
    """The weights PML's miner hands its triplet sampler, captured."""
    import pytorch_metric_learning.utils.loss_and_miner_utils as lmu

    captured: list[Tensor] = []
    sampler = lmu.get_random_triplet_indices

    def capture(*args, weights=None, **kwargs):
        captured.append(weights)
        return sampler(*args, weights=weights, **kwargs)

    monkeypatch.setattr(lmu, "get_random_triplet_indices", capture)
    pml_miners.DistanceWeightedMiner()(emb, labels, ref, ref_labels)
    monkeypatch.undo()
    return captured[0]


def _normalised(weights: Tensor) -> Tensor:
    return torch.nan_to_num(weights / weights.sum(1, keepdim=True))


def _dw_weights(emb, labels, ref=None, ref_labels=None) -> Tensor:
    ref_lab = labels if ref_labels is None else ref_labels
    dist = dd.LpDistance()(emb, ref)
    neg = labels[:, None] != ref_lab[None, :]
    return mining.distance_weighted_negative_weights(dist, neg, emb.shape[1])


@DTYPES
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_distance_weighted_probabilities_and_counts_match_pml(
    layout: str, dtype: torch.dtype, monkeypatch
) -> None:
    labels, ref_labels = LAYOUTS[layout]
    emb, ref = _make(labels, ref_labels, dtype, dim=8)
    theirs = _normalised(
        _pml_distance_weights(monkeypatch, emb.double(), labels, _64(ref), ref_labels)
    )
    ours = _normalised(_dw_weights(emb, labels, ref, ref_labels))
    assert_close(ours, theirs, 1e-5)
    # The number of triplets of each anchor is not drawn: it is PML's.
    mined = dm.DistanceWeightedMiner()(emb, labels, ref, ref_labels)
    reference = pml_miners.DistanceWeightedMiner()(emb, labels, ref, ref_labels)
    n = len(labels)
    assert torch.equal(
        torch.bincount(mined[0], minlength=n), torch.bincount(reference[0], minlength=n)
    )
    ref_lab = labels if ref_labels is None else ref_labels
    a, p, neg = mined
    assert bool((labels[a] == ref_lab[p]).all()) and bool((theirs[a, neg] > 0).all())
    if ref is None:
        assert bool((a != p).all())


def _64(x: Tensor | None) -> Tensor | None:
    return None if x is None else x.double()


def _frequencies(rows: Tensor, cols: Tensor, shape: tuple[int, int]) -> Tensor:
    counts = torch.zeros(shape, dtype=F64)
    counts.index_put_((rows, cols), torch.ones(len(rows), dtype=F64), accumulate=True)
    return counts


def _chi_square(counts: Tensor, probabilities: Tensor) -> tuple[float, int]:
    """Pearson's statistic of each row's counts against its probabilities, summed, and the
    degrees of freedom."""
    totals = counts.sum(1, keepdim=True)
    expected = probabilities * totals
    support = expected > 0
    assert float(counts[~support].sum()) == 0, "drawn outside the support"
    stat = float(((counts - expected)[support] ** 2 / expected[support]).sum())
    dof = int(support.sum()) - int((totals > 0).sum())
    return stat, dof


def _dw_batch() -> tuple[Tensor, Tensor]:
    """Correlated unit vectors in 6-D: distances spread over [0.5, 1.4], weights far from
    uniform."""
    g = torch.Generator().manual_seed(7)
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 3, 3])
    centres = torch.randn(4, 6, generator=g, dtype=F64)
    emb = 0.8 * centres[labels] + 0.6 * torch.randn(10, 6, generator=g, dtype=F64) + 0.9
    return emb, labels


def test_distance_weighted_negatives_follow_the_formula_and_pml() -> None:
    emb, labels = _dw_batch()
    probabilities = _normalised(_dw_weights(emb, labels))
    assert float(probabilities.max()) > 2.5 * float(probabilities[probabilities > 0].min())
    generator = torch.Generator().manual_seed(0)
    ours = dm.DistanceWeightedMiner(generator=generator)
    theirs = pml_miners.DistanceWeightedMiner()
    found = {"ours": ([], []), "pml": ([], [])}
    for _ in range(400):
        for key, miner in (("ours", ours), ("pml", theirs)):
            a, _, n = miner(emb, labels)
            found[key][0].append(a)
            found[key][1].append(n)
    uniform = _normalised((probabilities > 0).double())
    for key, (rows, cols) in found.items():
        counts = _frequencies(torch.cat(rows), torch.cat(cols), probabilities.shape)
        stat, dof = _chi_square(counts, probabilities)
        # ~ chi-square(dof): mean dof, sd sqrt(2 dof); 6 sd is p < 1e-6.
        assert stat < dof + 6 * math.sqrt(2 * dof), key
        wrong, _ = _chi_square(counts, uniform)
        assert wrong > dof + 20 * math.sqrt(2 * dof), key  # the test can tell the rules apart


def test_distance_weighted_positives_are_uniform() -> None:
    emb, labels = _dw_batch()
    miner = dm.DistanceWeightedMiner(generator=torch.Generator().manual_seed(1))
    mined = [miner(emb, labels) for _ in range(500)]
    counts = _frequencies(
        torch.cat([m[0] for m in mined]), torch.cat([m[1] for m in mined]), (10, 10)
    )
    same = (labels[:, None] == labels[None, :]).double().fill_diagonal_(0)
    stat, dof = _chi_square(counts, _normalised(same))
    assert stat < dof + 6 * math.sqrt(2 * dof)


def test_distance_weighted_high_dimension_float32_keeps_every_anchor() -> None:
    """The documented difference: PML scales all weights by the batch's largest, which in
    float32 and 512 dimensions underflows every weight of the anchors whose negatives are all
    far; dmlkit scales each anchor's by its own and keeps PML's float64 probabilities."""
    g = torch.Generator().manual_seed(3)
    labels = torch.arange(12) // 2
    common = _unit(torch.randn(1, 512, generator=g))
    emb = 0.5 * common + _unit(torch.randn(12, 512, generator=g))  # distances ≈ 1.25
    emb[2] = emb[0] + 0.01 * torch.randn(512, generator=g)  # one very near negative pair
    pml_f32 = pml_miners.DistanceWeightedMiner()(emb, labels)
    ours = dm.DistanceWeightedMiner()(emb, labels)
    dropped = set(range(12)) - set(pml_f32[0].tolist())
    assert dropped and set(ours[0].tolist()) == set(range(12))
    pml_f64 = pml_miners.DistanceWeightedMiner()(emb.double(), labels)
    assert set(pml_f64[0].tolist()) == set(range(12))
    assert_close(
        _normalised(_dw_weights(emb, labels)).double(),
        _normalised(_dw_weights(emb.double(), labels)),
        1e-4,
    )


# ---------------------------------------------------------------------------- uniform histogram


def _pml_bins_in_order(values: Tensor, num_bins: int, monkeypatch) -> Tensor:
    """PML's bin membership: its own loop, with the draw replaced by "every member once"."""
    monkeypatch.setattr(torch, "multinomial", lambda w, *args, **kwargs: torch.arange(len(w)))
    miner = pml_miners.UniformHistogramMiner(num_bins=num_bins)
    members = miner.filter_by_bin(values, miner.get_bins(values), 1)
    monkeypatch.undo()
    return members


@DTYPES
@pytest.mark.parametrize("num_bins", [7, 100])
@pytest.mark.parametrize(
    "case", ["random", "constant", "on_edges", "two_values", "tiny_range", "integers"]
)
def test_histogram_bins_are_pmls(case: str, num_bins: int, dtype: torch.dtype, monkeypatch) -> None:
    g = torch.Generator().manual_seed(11)
    values = {
        "random": torch.randn(500, generator=g, dtype=F64),
        "constant": torch.full((7,), 0.3, dtype=F64),
        "on_edges": torch.linspace(-1, 2, num_bins + 1, dtype=dtype).repeat(3),
        "two_values": torch.tensor([0.0, 1.0, 1.0, 0.0, 1.0], dtype=F64),
        "tiny_range": 1 + torch.rand(300, generator=g, dtype=F64) * 1e-6,
        "integers": torch.randint(0, 5, (40,), generator=g).double(),
    }[case].to(dtype)
    bins = mining.histogram_bins(values, num_bins)
    ours = torch.argsort(bins, stable=True)
    assert torch.equal(ours, _pml_bins_in_order(values, num_bins, monkeypatch))


@DTYPES
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_uniform_histogram_counts_match_pml(layout: str, dtype: torch.dtype) -> None:
    labels, ref_labels = LAYOUTS[layout]
    emb, ref = _make(labels, ref_labels, dtype)
    for distance in ("LpDistance", "CosineSimilarity"):
        kwargs = {"num_bins": 20, "pos_per_bin": 3, "neg_per_bin": 2}
        ours_cls, theirs_cls = _pair(
            dm.UniformHistogramMiner, pml_miners.UniformHistogramMiner, distance
        )
        ours, theirs = ours_cls(**kwargs), theirs_cls(**kwargs)
        mined = ours(emb, labels, ref, ref_labels)
        theirs(emb, labels, ref, ref_labels)
        assert ours.num_pos_pairs == theirs.num_pos_pairs
        assert ours.num_neg_pairs == theirs.num_neg_pairs
        # Every non-empty bin gives exactly its quota, of pairs of the right kind.
        ref_lab = labels if ref_labels is None else ref_labels
        same = labels[:, None] == ref_lab[None, :]
        if ref is None:
            same.fill_diagonal_(False)
        different = labels[:, None] != ref_lab[None, :]
        mat = ours.distance(emb, ref)
        for anchors, refs, per_bin, kind in (
            (mined[0], mined[1], 3, same),
            (mined[2], mined[3], 2, different),
        ):
            assert bool(kind[anchors, refs].all())
            if kind.any():
                bin_of = torch.full(kind.shape, -1)
                bin_of[kind] = mining.histogram_bins(mat[kind], 20)
                drawn = torch.bincount(bin_of[anchors, refs], minlength=20)
                filled = torch.bincount(bin_of[kind], minlength=20) > 0
                assert torch.equal(drawn, filled.long() * per_bin)


def test_uniform_histogram_draws_uniformly_within_bins() -> None:
    values = torch.tensor([0.0, 0.05, 0.1, 0.12, 0.5, 0.9, 0.95, 1.0, 1.0], dtype=F64)
    generator = torch.Generator().manual_seed(5)
    picks = torch.cat(
        [mining.uniform_histogram_sample(values, 4, 3, generator) for _ in range(3000)]
    )
    bins = mining.histogram_bins(values, 4)
    counts = torch.bincount(picks, minlength=len(values)).double()[None, :]
    sizes = torch.bincount(bins, minlength=4).double()
    probabilities = (1 / sizes[bins] / int((sizes > 0).sum()))[None, :]
    stat, dof = _chi_square(counts, probabilities)
    assert stat < dof + 6 * math.sqrt(2 * dof)
    # Each bin's members are drawn, never a value of another bin.
    assert set(picks.tolist()) == set(range(len(values)))


def test_uniform_histogram_draws_like_pml() -> None:
    labels, _ = LAYOUTS["pk_batch"]
    emb, _ = _make(labels, None, F64)
    kwargs = {"num_bins": 5, "pos_per_bin": 4, "neg_per_bin": 4}
    ours = dm.UniformHistogramMiner(**kwargs, generator=torch.Generator().manual_seed(2))
    theirs = pml_miners.UniformHistogramMiner(**kwargs)
    counted = {}
    for key, miner in (("ours", ours), ("pml", theirs)):
        counts = torch.zeros(32, 32, dtype=F64)
        for _ in range(300):
            a1, p, _, _ = miner(emb, labels)
            counts += _frequencies(a1, p, (32, 32))
        counted[key] = counts.flatten()[None, :]
    # Both draw each positive pair with probability per_bin / (bins · bin size) per draw.
    dist = dd.LpDistance()(emb)
    same = (labels[:, None] == labels[None, :]).fill_diagonal_(False)
    rows, cols = same.nonzero(as_tuple=True)
    bins = mining.histogram_bins(dist[rows, cols], 5)
    sizes = torch.bincount(bins, minlength=5).double()
    expected = torch.zeros(32, 32, dtype=F64)
    expected[rows, cols] = 1 / sizes[bins] / int((sizes > 0).sum())
    for key, counts in counted.items():
        stat, dof = _chi_square(counts, expected.flatten()[None, :])
        assert stat < dof + 6 * math.sqrt(2 * dof), key


# ---------------------------------------------------------------------------- random miners


RANDOM_MINERS = [dm.DistanceWeightedMiner, dm.UniformHistogramMiner]


def test_every_miner_pml_has_is_compared_here_or_in_test_pml_parity() -> None:
    from test_pml_parity import MINER_PAIRS

    compared = PML_COMPARED_MINERS | {
        type(make(**kwargs)).__name__ for make, _, kwargs in MINER_PAIRS.values()
    }
    missing = [n for n in dm.MINERS.names() if hasattr(pml_miners, n) and n not in compared]
    assert not missing


@pytest.mark.parametrize("miner_cls", RANDOM_MINERS, ids=lambda c: c.__name__)
def test_random_miners_are_reproducible_with_a_generator(miner_cls) -> None:
    labels, _ = LAYOUTS["pk_batch"]
    emb, _ = _make(labels, None, torch.float32)
    first = miner_cls(generator=torch.Generator().manual_seed(9))(emb, labels)
    second = miner_cls(generator=torch.Generator().manual_seed(9))(emb, labels)
    other = miner_cls(generator=torch.Generator().manual_seed(10))(emb, labels)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first, other, strict=True))
    # Without a generator the global one draws, and its seed reproduces the draws.
    torch.manual_seed(4)
    third = miner_cls()(emb, labels)
    torch.manual_seed(4)
    assert all(torch.equal(a, b) for a, b in zip(third, miner_cls()(emb, labels), strict=True))


@pytest.mark.parametrize("miner_cls", RANDOM_MINERS, ids=lambda c: c.__name__)
def test_random_miners_with_the_batch_as_its_own_reference_draw_as_in_batch(miner_cls) -> None:
    """The same draws from the same seed: the anchors' own rows are left out exactly as the
    diagonal is, and (distance-weighted) still count in the number of triplets, as in PML."""
    labels, _ = LAYOUTS["pk_batch"]
    emb, _ = _make(labels, None, F64)
    expected = miner_cls(generator=torch.Generator().manual_seed(3))(emb, labels)
    mined = miner_cls(generator=torch.Generator().manual_seed(3))(
        emb, labels, emb, labels, torch.arange(len(labels))
    )
    assert len(expected[0]) > 0
    for got, want in zip(mined, expected, strict=True):
        assert torch.equal(got, want)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("miner_cls", RANDOM_MINERS, ids=lambda c: c.__name__)
def test_random_miners_on_cuda_take_a_generator_of_either_device(miner_cls) -> None:
    labels, _ = LAYOUTS["pk_batch"]
    emb, _ = _make(labels, None, torch.float32)
    on_cpu = miner_cls(generator=torch.Generator().manual_seed(9))(emb, labels)
    moved = miner_cls(generator=torch.Generator().manual_seed(9))(emb.cuda(), labels.cuda())
    for a, b in zip(on_cpu, moved, strict=True):
        assert b.is_cuda and torch.equal(a, b.cpu())
    cuda_gen = torch.Generator(device="cuda").manual_seed(9)
    assert all(t.is_cuda for t in miner_cls(generator=cuda_gen)(emb.cuda(), labels.cuda()))


# ---------------------------------------------------------------------------- options


BAD_OPTIONS = [
    (dm.AngularMiner, {"angle": 90}, r"angle must be in \[0.0, 90.0\)"),
    (dm.AngularMiner, {"angle": -1}, r"angle must be in"),
    (dm.AngularMiner, {"distance": dd.LpDistance(power=2)}, r"requires LpDistance\(p=2, power=1"),
    (
        dm.AngularMiner,
        {"distance": dd.LpDistance(normalize_embeddings=False)},
        "requires LpDistance",
    ),
    (dm.AngularMiner, {"distance": dd.CosineSimilarity()}, "requires LpDistance, got Cosine"),
    (dm.BatchEasyHardMiner, {"pos_strategy": "hardest"}, "pos_strategy must be 'hard'"),
    (dm.BatchEasyHardMiner, {"neg_strategy": "medium"}, "neg_strategy must be 'hard'"),
    (dm.BatchEasyHardMiner, {"pos_strategy": "semihard"}, "cannot both be"),
    (dm.BatchEasyHardMiner, {"pos_strategy": "all"}, "cannot be used in combination"),
    (dm.BatchEasyHardMiner, {"allowed_pos_range": (1.0, 0.5)}, "must have low <= high"),
    (dm.BatchEasyHardMiner, {"allowed_neg_range": (0.5,)}, "must be None or a .low, high. pair"),
    (dm.BatchEasyHardMiner, {"allowed_neg_range": (0.0, float("nan"))}, "finite number"),
    (dm.HDCMiner, {"filter_percentage": 0}, r"filter_percentage must be in \(0, 1\]"),
    (dm.HDCMiner, {"filter_percentage": 1.5}, r"filter_percentage must be in \(0, 1\]"),
    (dm.UniformHistogramMiner, {"num_bins": 0}, "num_bins must be a positive integer"),
    (dm.UniformHistogramMiner, {"pos_per_bin": 2.5}, "pos_per_bin must be a positive integer"),
    (dm.UniformHistogramMiner, {"neg_per_bin": -1}, "neg_per_bin must be a positive integer"),
    (dm.DistanceWeightedMiner, {"cutoff": -0.1}, "cutoff must be in"),
    (dm.DistanceWeightedMiner, {"nonzero_loss_cutoff": 0.5}, "must exceed cutoff"),
    (dm.DistanceWeightedMiner, {"distance": dd.LpDistance(p=1)}, "requires LpDistance"),
]


@pytest.mark.parametrize(
    ("cls", "options", "message"), BAD_OPTIONS, ids=lambda x: getattr(x, "__name__", str(x))
)
def test_bad_options_are_value_errors_naming_them(cls, options, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        cls(**options)


@pytest.mark.parametrize(
    "miner",
    [
        lambda: dm.BatchEasyHardMiner("hard", "semihard", distance=dd.CosineSimilarity()),
        lambda: dm.HDCMiner(0.3, distance=dd.CosineSimilarity()),
    ],
)
def test_mine_similarities_equals_forward(miner) -> None:
    labels, _ = LAYOUTS["pk_batch"]
    emb, _ = _make(labels, None, F64)
    expected = miner()(emb, labels)
    mined = miner().mine_similarities(dd.CosineSimilarity()(emb), labels)
    assert _as_set(mined) == _as_set(expected) and len(expected[0])


# ---------------------------------------------------------------------------- BatchedDistance


def _blocks_of(batched, query, ref=None) -> list[tuple[Tensor, int, int]]:
    blocks: list[tuple[Tensor, int, int]] = []
    batched.iter_fn = lambda mat, s, e: blocks.append((mat, s, e))
    batched(query, ref)
    return blocks


@pytest.mark.parametrize("batch_size", [1, 7, 10, 32])
@pytest.mark.parametrize("with_ref", [False, True])
@pytest.mark.parametrize("distance", ["LpDistance", "CosineSimilarity", "SNRDistance"])
def test_batched_distance_matches_pml(batch_size: int, with_ref: bool, distance: str) -> None:
    g = torch.Generator().manual_seed(0)
    query = torch.randn(23, 5, generator=g, dtype=F64)
    ref = torch.randn(9, 5, generator=g, dtype=F64) if with_ref else None
    ours = _blocks_of(
        dd.BatchedDistance(getattr(dd, distance)(), batch_size=batch_size), query, ref
    )
    theirs = _blocks_of(
        pml_distances.BatchedDistance(getattr(pml_distances, distance)(), batch_size=batch_size),
        query,
        ref,
    )
    assert [(s, e) for _, s, e in ours] == [(s, e) for _, s, e in theirs]
    # 1e-7 of the scale: a block's distance from a query to itself (as a reference) is zero in
    # PML's cdist and rounding noise (~1e-8) in dmlkit's one-matrix-product Euclidean distance.
    for (mine, _, _), (reference, _, _) in zip(ours, theirs, strict=True):
        assert_close(mine, reference, 1e-7)
    # Blocks are computed against the whole reference set, as PML does: without ref_emb, the
    # self-distances are rounding noise rather than the exact zeros of the full matrix.
    full = getattr(dd, distance)()(query, ref)
    blocks = torch.cat([mat for mat, _, _ in ours])
    if ref is None:
        assert float((blocks.diagonal() - full.diagonal()).abs().max()) < 1e-6
        blocks.fill_diagonal_(0.0), full.fill_diagonal_(0.0)
    assert_close(blocks, full, 1e-12)


def test_batched_distance_forwards_attributes_and_takes_iter_fn_at_construction() -> None:
    seen: list[tuple[int, int]] = []
    batched = dd.BatchedDistance(
        dd.CosineSimilarity(), iter_fn=lambda mat, s, e: seen.append((s, e)), batch_size=4
    )
    assert batched.is_inverted and batched.p == 2 and batched.normalize_embeddings
    assert not dd.BatchedDistance(dd.LpDistance(power=2)).is_inverted
    assert batched(torch.randn(10, 3)) is None
    assert seen == [(0, 4), (4, 8), (8, 12)]
    assert "BatchedDistance" not in dd.DISTANCES.names()


def test_batched_distance_top_k_search_equals_the_full_search() -> None:
    query, ref = torch.randn(50, 8), torch.randn(70, 8)
    values = torch.empty(50, 3)
    indices = torch.empty(50, 3, dtype=torch.long)

    def top3(mat: Tensor, s: int, e: int) -> None:
        values[s:e], indices[s:e] = mat.topk(3, dim=1)

    dd.BatchedDistance(dd.CosineSimilarity(), top3, batch_size=16)(query, ref)
    expected = dd.CosineSimilarity()(query, ref).topk(3, dim=1)
    assert torch.equal(indices, expected.indices)
    assert_close(values, expected.values)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: dd.BatchedDistance(dd.LpDistance())(torch.randn(3, 2)), "needs an iter_fn"),
        (
            lambda: dd.BatchedDistance(dd.LpDistance(), batch_size=0),
            "batch_size must be a positive",
        ),
        (
            lambda: dd.BatchedDistance(dd.LpDistance(), batch_size=2.0),
            "batch_size must be a positive",
        ),
        (lambda: dd.BatchedDistance("cosine"), "wraps a BaseDistance, got str"),
        (lambda: dd.BatchedDistance(dd.LpDistance(), iter_fn=3), "iter_fn must be callable"),
        (
            lambda: dd.BatchedDistance(dd.LpDistance(), print)(
                torch.randn(3, 2), torch.randn(3, 4)
            ),
            "ref_emb has embedding size 4 but query_emb has 2",
        ),
        (
            lambda: dd.BatchedDistance(dd.LpDistance(), print)(torch.randn(3)),
            "query_emb must be 2-D",
        ),
    ],
)
def test_batched_distance_bad_input_is_a_value_error(make, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make()
