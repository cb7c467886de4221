"""Losses and miners agree with pytorch-metric-learning 2.9 (the reference) in value and gradient.

PML is a test-only dependency: the library never imports it.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

import dmlkit.distances as dd
import dmlkit.losses as dl
import dmlkit.miners as dm
import dmlkit.regularizers as dr

pml_losses = pytest.importorskip("pytorch_metric_learning.losses")
pml_miners = pytest.importorskip("pytorch_metric_learning.miners")
pml_distances = pytest.importorskip("pytorch_metric_learning.distances")
pml_regularizers = pytest.importorskip("pytorch_metric_learning.regularizers")

from conftest import assert_close  # noqa: E402

LOSSES: dict[str, Callable[[bool], tuple[torch.nn.Module, torch.nn.Module]]] = {
    "contrastive": lambda _: (dl.ContrastiveLoss(), pml_losses.ContrastiveLoss()),
    "contrastive_margins": lambda _: (
        dl.ContrastiveLoss(pos_margin=0.2, neg_margin=0.8),
        pml_losses.ContrastiveLoss(pos_margin=0.2, neg_margin=0.8),
    ),
    "contrastive_cosine": lambda _: (
        dl.ContrastiveLoss(pos_margin=0.8, neg_margin=0.3, distance=dd.CosineSimilarity()),
        pml_losses.ContrastiveLoss(
            pos_margin=0.8, neg_margin=0.3, distance=pml_distances.CosineSimilarity()
        ),
    ),
    "contrastive_raw_euclidean": lambda _: (
        dl.ContrastiveLoss(neg_margin=4.0, distance=dd.LpDistance(normalize_embeddings=False)),
        pml_losses.ContrastiveLoss(
            neg_margin=4.0, distance=pml_distances.LpDistance(normalize_embeddings=False)
        ),
    ),
    "triplet": lambda _: (dl.TripletMarginLoss(), pml_losses.TripletMarginLoss()),
    "triplet_margin_smooth": lambda _: (
        dl.TripletMarginLoss(margin=0.2, smooth_loss=True),
        pml_losses.TripletMarginLoss(margin=0.2, smooth_loss=True),
    ),
    "triplet_swap": lambda _: (
        dl.TripletMarginLoss(margin=0.3, swap=True),
        pml_losses.TripletMarginLoss(margin=0.3, swap=True),
    ),
    "triplet_squared_chunked": lambda _: (
        dl.TripletMarginLoss(margin=0.5, distance=dd.LpDistance(power=2), chunk_elements=64),
        pml_losses.TripletMarginLoss(margin=0.5, distance=pml_distances.LpDistance(power=2)),
    ),
    "triplet_cosine": lambda _: (
        dl.TripletMarginLoss(margin=0.1, distance=dd.CosineSimilarity()),
        pml_losses.TripletMarginLoss(margin=0.1, distance=pml_distances.CosineSimilarity()),
    ),
    "npairs": lambda _: (dl.NPairsLoss(), pml_losses.NPairsLoss()),
    "circle": lambda _: (dl.CircleLoss(), pml_losses.CircleLoss()),
    "circle_small_gamma": lambda _: (
        dl.CircleLoss(m=0.25, gamma=16),
        pml_losses.CircleLoss(m=0.25, gamma=16),
    ),
    "multi_similarity": lambda _: (dl.MultiSimilarityLoss(), pml_losses.MultiSimilarityLoss()),
    "multi_similarity_tuned": lambda _: (
        dl.MultiSimilarityLoss(alpha=17.97, beta=75.66, base=0.77),
        pml_losses.MultiSimilarityLoss(alpha=17.97, beta=75.66, base=0.77),
    ),
    "multi_similarity_euclidean": lambda _: (
        dl.MultiSimilarityLoss(base=1.0, distance=dd.LpDistance()),
        pml_losses.MultiSimilarityLoss(base=1.0, distance=pml_distances.LpDistance()),
    ),
    "lifted": lambda _: (dl.LiftedStructureLoss(), pml_losses.LiftedStructureLoss()),
    "lifted_cosine": lambda _: (
        dl.LiftedStructureLoss(neg_margin=0.2, pos_margin=0.9, distance=dd.CosineSimilarity()),
        pml_losses.LiftedStructureLoss(
            neg_margin=0.2, pos_margin=0.9, distance=pml_distances.CosineSimilarity()
        ),
    ),
    "generalized_lifted": lambda _: (
        dl.GeneralizedLiftedStructureLoss(),
        pml_losses.GeneralizedLiftedStructureLoss(),
    ),
    "generalized_lifted_margins": lambda _: (
        dl.GeneralizedLiftedStructureLoss(neg_margin=0.7, pos_margin=0.1),
        pml_losses.GeneralizedLiftedStructureLoss(neg_margin=0.7, pos_margin=0.1),
    ),
    "ntxent": lambda _: (dl.NTXentLoss(), pml_losses.NTXentLoss()),
    "ntxent_euclidean": lambda _: (
        dl.NTXentLoss(temperature=0.5, distance=dd.LpDistance()),
        pml_losses.NTXentLoss(temperature=0.5, distance=pml_distances.LpDistance()),
    ),
    "supcon": lambda _: (dl.SupConLoss(), pml_losses.SupConLoss()),
    "supcon_euclidean": lambda _: (
        dl.SupConLoss(temperature=0.5, distance=dd.LpDistance()),
        pml_losses.SupConLoss(temperature=0.5, distance=pml_distances.LpDistance()),
    ),
    "snr_contrastive": lambda _: (
        dl.SignalToNoiseRatioContrastiveLoss(),
        pml_losses.SignalToNoiseRatioContrastiveLoss(),
    ),
    "snr_contrastive_zero_mean": lambda _: (
        dl.SignalToNoiseRatioContrastiveLoss(
            pos_margin=0.1,
            neg_margin=0.7,
            embedding_regularizer=dr.ZeroMeanRegularizer(),
            embedding_reg_weight=0.3,
        ),
        pml_losses.SignalToNoiseRatioContrastiveLoss(
            pos_margin=0.1,
            neg_margin=0.7,
            embedding_regularizer=pml_regularizers.ZeroMeanRegularizer(),
            embedding_reg_weight=0.3,
        ),
    ),
    "margin": lambda _: (dl.MarginLoss(), pml_losses.MarginLoss()),
    "margin_cosine_learnt_per_class": lambda _: (
        dl.MarginLoss(
            margin=0.1,
            nu=0.05,
            beta=0.4,
            learn_beta=True,
            num_classes=64,
            distance=dd.CosineSimilarity(),
        ),
        pml_losses.MarginLoss(
            margin=0.1,
            nu=0.05,
            beta=0.4,
            learn_beta=True,
            num_classes=64,
            distance=pml_distances.CosineSimilarity(),
        ),
    ),
    "fastap": lambda _: (dl.FastAPLoss(), pml_losses.FastAPLoss()),
    "fastap_euclidean_bins": lambda _: (
        dl.FastAPLoss(num_bins=25, distance=dd.LpDistance()),
        pml_losses.FastAPLoss(num_bins=25, distance=pml_distances.LpDistance()),
    ),
    "nca": lambda _: (dl.NCALoss(), pml_losses.NCALoss()),
    "nca_scaled_cosine": lambda _: (
        dl.NCALoss(softmax_scale=8, distance=dd.CosineSimilarity()),
        pml_losses.NCALoss(softmax_scale=8, distance=pml_distances.CosineSimilarity()),
    ),
    "nca_euclidean": lambda _: (
        dl.NCALoss(softmax_scale=3, distance=dd.LpDistance()),
        pml_losses.NCALoss(softmax_scale=3, distance=pml_distances.LpDistance()),
    ),
}

REF_UNSUPPORTED = {"npairs", "fastap", "fastap_euclidean_bins"}
# PML's swap reads d(p, n) from the anchor-by-reference matrix, which is wrong (and crashes) with a
# separate reference set; test_triplet_swap_with_reference_set checks dmlkit against an oracle.
PML_REF_BROKEN = {"triplet_swap"}

# (name, labels, ref_labels or None)
LAYOUTS = {
    "many_classes": (torch.arange(48) % 12, None),
    "pk_batch": (torch.arange(32) // 4, None),
    "one_class": (torch.zeros(16, dtype=torch.long), None),
    "singletons": (torch.tensor([0, 1, 2, 3, 3, 4, 5, 5, 5, 6, 7, 8]), None),
    "no_positive_pairs": (torch.arange(20), None),
    "ref_set": (torch.arange(24) % 6, torch.arange(40) % 8),
    "ref_no_shared_class": (torch.arange(10) % 3, torch.arange(12) % 4 + 3),
}


def _make(labels: torch.Tensor, ref_labels: torch.Tensor | None, dtype: torch.dtype, dim: int = 16):
    g = torch.Generator().manual_seed(1234)
    centres = torch.randn(int(labels.max()) + 20, dim, generator=g, dtype=torch.float64)
    emb = centres[labels] * 0.6 + torch.randn(len(labels), dim, generator=g, dtype=torch.float64)
    ref = None
    if ref_labels is not None:
        ref = centres[ref_labels] * 0.6 + torch.randn(
            len(ref_labels), dim, generator=g, dtype=torch.float64
        )
        ref = ref.to(dtype)
    return emb.to(dtype), ref


def _run(loss, emb, labels, indices=None, ref=None, ref_labels=None):
    emb = emb.clone().requires_grad_(True)
    ref_leaf = None if ref is None else ref.clone().requires_grad_(True)
    value = loss(emb, labels, indices, ref_leaf, None if ref_labels is None else ref_labels.clone())
    value.backward()
    return value.detach(), emb.grad, None if ref_leaf is None else ref_leaf.grad


def assert_matches_pml(
    ours, theirs, emb, labels, indices=None, ref=None, ref_labels=None, rtol=1e-5
):
    """dmlkit in the inputs' dtype against PML in float64: for float32 inputs this judges
    dmlkit by PML's exact value rather than by PML's own float32 rounding."""
    v1, g1, r1 = _run(ours, emb, labels, indices, ref, ref_labels)
    ref64 = None if ref is None else ref.double()
    v2, g2, r2 = _run(theirs, emb.double(), labels, indices, ref64, ref_labels)
    assert torch.isfinite(v1)
    assert_close(v1, v2, rtol)
    assert g1 is not None
    assert_close(g1, g2 if g2 is not None else torch.zeros_like(g1), rtol)
    if ref is not None:
        assert r1 is not None
        assert_close(r1, r2 if r2 is not None else torch.zeros_like(r1), rtol)


def _mined_by_pml(kind: str, emb, labels, ref=None, ref_labels=None):
    miner = {
        "ms_pairs": pml_miners.MultiSimilarityMiner(epsilon=0.3),
        "semihard_triplets": pml_miners.TripletMarginMiner(margin=0.3, type_of_triplets="semihard"),
        "batch_hard": pml_miners.BatchHardMiner(),
    }[kind]
    return miner(emb, labels, ref, ref_labels)


PML_PAIR_LOSSES = (
    pml_losses.ContrastiveLoss,
    pml_losses.MultiSimilarityLoss,
    pml_losses.CircleLoss,
    pml_losses.LiftedStructureLoss,
    pml_losses.GeneralizedLiftedStructureLoss,
    pml_losses.NTXentLoss,
    pml_losses.SupConLoss,
)


def _pml_would_zero(indices, theirs=None, labels=None, ref_labels=None) -> bool:
    """PML's pair losses return 0 when every pair index tensor has at most one element, and
    PML's NCA returns 0 for a single query and NaN (a mean over nothing) when no query has a
    positive; dmlkit computes the loss, or 0 (documented differences), so those cases are not
    compared."""
    if isinstance(theirs, pml_losses.NCALoss) and labels is not None:
        from dmlkit.functional import label_masks

        return len(labels) <= 1 or not bool(label_masks(labels, ref_labels)[0].any())
    if theirs is not None and not isinstance(theirs, PML_PAIR_LOSSES):
        return False
    if indices is None:
        if labels is None:
            return False
        from dmlkit.functional import label_masks, pairs_from_masks

        indices = pairs_from_masks(*label_masks(labels, ref_labels))
    if len(indices) == 3:
        indices = (indices[0], indices[1], indices[0], indices[2])
    return all(len(x) <= 1 for x in indices)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("name", list(LOSSES))
def test_loss_matches_pml_without_tuples(name: str, layout: str, dtype: torch.dtype) -> None:
    labels, ref_labels = LAYOUTS[layout]
    if ref_labels is not None and name in REF_UNSUPPORTED:
        pytest.skip("PML and dmlkit both reject ref_emb for this loss")
    if ref_labels is not None and name in PML_REF_BROKEN:
        pytest.skip("PML's swap is wrong with ref_emb; see test_triplet_swap_with_reference_set")
    ours, theirs = LOSSES[name](dtype == torch.float64)
    if _pml_would_zero(None, theirs, labels, ref_labels):
        pytest.skip("PML's value is 0 or NaN here, not the loss")
    emb, ref = _make(labels, ref_labels, dtype)
    assert_matches_pml(ours, theirs, emb, labels, None, ref, ref_labels)


@pytest.mark.parametrize("miner_kind", ["ms_pairs", "semihard_triplets", "batch_hard"])
@pytest.mark.parametrize("layout", ["many_classes", "pk_batch", "singletons", "ref_set"])
@pytest.mark.parametrize("name", list(LOSSES))
def test_loss_matches_pml_with_pml_mined_tuples(name: str, layout: str, miner_kind: str) -> None:
    labels, ref_labels = LAYOUTS[layout]
    if ref_labels is not None and name in REF_UNSUPPORTED:
        pytest.skip("PML and dmlkit both reject ref_emb for this loss")
    if ref_labels is not None and name in PML_REF_BROKEN:
        pytest.skip("PML's swap is wrong with ref_emb; see test_triplet_swap_with_reference_set")
    emb, ref = _make(labels, ref_labels, torch.float64)
    indices = _mined_by_pml(miner_kind, emb, labels, ref, ref_labels)
    if _pml_would_zero(indices):
        pytest.skip("PML returns 0 for at most one pair of each kind")
    ours, theirs = LOSSES[name](True)
    assert_matches_pml(ours, theirs, emb, labels, indices, ref, ref_labels)


def test_triplet_swap_with_reference_set() -> None:
    labels, ref_labels = LAYOUTS["ref_set"]
    emb, ref = _make(labels, ref_labels, torch.float64)
    emb.requires_grad_(True)
    ref.requires_grad_(True)
    margin = 0.3
    loss = dl.TripletMarginLoss(margin=margin, swap=True)(emb, labels, None, ref, ref_labels)
    e, r = torch.nn.functional.normalize(emb, dim=1), torch.nn.functional.normalize(ref, dim=1)
    a, p, n = torch.where(
        (labels[:, None, None] == ref_labels[None, :, None])
        & (labels[:, None, None] != ref_labels[None, None, :])
    )
    d_ap = (e[a] - r[p]).norm(dim=1)
    d_an = torch.minimum((e[a] - r[n]).norm(dim=1), (r[p] - r[n]).norm(dim=1))
    violations = (d_ap - d_an + margin).relu()
    expected = violations.sum() / (violations > 0).sum()
    assert_close(loss, expected)
    grads = torch.autograd.grad(loss, (emb, ref))
    expected_grads = torch.autograd.grad(expected, (emb, ref))
    for ours, theirs in zip(grads, expected_grads, strict=True):
        assert_close(ours, theirs)


def test_loss_accepts_tuple_without_labels() -> None:
    labels, _ = LAYOUTS["pk_batch"]
    emb, _ = _make(labels, None, torch.float64)
    indices = _mined_by_pml("ms_pairs", emb, labels)
    assert_matches_pml(dl.ContrastiveLoss(), pml_losses.ContrastiveLoss(), emb, None, indices)


DMLKIT_MINERS = {
    "ms": lambda: dm.MultiSimilarityMiner(epsilon=0.2),
    "triplet_all": lambda: dm.TripletMarginMiner(margin=0.3),
    "batch_hard": lambda: dm.BatchHardMiner(),
    "pair_margin": lambda: dm.PairMarginMiner(pos_margin=0.6, neg_margin=1.2),
    "at_asms": lambda: dm.ATASMSMiner(epsilon=0.3),
}


@pytest.mark.parametrize("miner", list(DMLKIT_MINERS))
@pytest.mark.parametrize(
    "name", ["contrastive", "triplet", "multi_similarity", "circle", "lifted", "ntxent", "supcon"]
)
def test_pml_loss_accepts_dmlkit_tuples(name: str, miner: str) -> None:
    labels, _ = LAYOUTS["pk_batch"]
    emb, _ = _make(labels, None, torch.float64)
    indices = DMLKIT_MINERS[miner]()(emb, labels)
    assert all(t.dtype == torch.long for t in indices)
    ours, theirs = LOSSES[name](True)
    assert_matches_pml(ours, theirs, emb, labels, indices)


MINER_PAIRS = {
    "ms": (dm.MultiSimilarityMiner, pml_miners.MultiSimilarityMiner, {}),
    "ms_eps": (dm.MultiSimilarityMiner, pml_miners.MultiSimilarityMiner, {"epsilon": 0.4}),
    "ms_euclidean": (
        lambda **k: dm.MultiSimilarityMiner(distance=dd.LpDistance(), **k),
        lambda **k: pml_miners.MultiSimilarityMiner(distance=pml_distances.LpDistance(), **k),
        {"epsilon": 0.3},
    ),
    "triplet_all": (dm.TripletMarginMiner, pml_miners.TripletMarginMiner, {}),
    "triplet_hard": (
        dm.TripletMarginMiner,
        pml_miners.TripletMarginMiner,
        {"margin": 0.3, "type_of_triplets": "hard"},
    ),
    "triplet_semihard": (
        dm.TripletMarginMiner,
        pml_miners.TripletMarginMiner,
        {"margin": 0.3, "type_of_triplets": "semihard"},
    ),
    "triplet_easy": (
        dm.TripletMarginMiner,
        pml_miners.TripletMarginMiner,
        {"margin": 0.1, "type_of_triplets": "easy"},
    ),
    "triplet_cosine_semihard": (
        lambda **k: dm.TripletMarginMiner(distance=dd.CosineSimilarity(), **k),
        lambda **k: pml_miners.TripletMarginMiner(distance=pml_distances.CosineSimilarity(), **k),
        {"margin": 0.2, "type_of_triplets": "semihard"},
    ),
    "batch_hard": (dm.BatchHardMiner, pml_miners.BatchHardMiner, {}),
    "batch_hard_cosine": (
        lambda **k: dm.BatchHardMiner(distance=dd.CosineSimilarity()),
        lambda **k: pml_miners.BatchHardMiner(distance=pml_distances.CosineSimilarity()),
        {},
    ),
    "pair_margin": (dm.PairMarginMiner, pml_miners.PairMarginMiner, {}),
    "pair_margin_set": (
        dm.PairMarginMiner,
        pml_miners.PairMarginMiner,
        {"pos_margin": 0.7, "neg_margin": 1.3},
    ),
    "pair_margin_cosine": (
        lambda **k: dm.PairMarginMiner(distance=dd.CosineSimilarity(), **k),
        lambda **k: pml_miners.PairMarginMiner(distance=pml_distances.CosineSimilarity(), **k),
        {"pos_margin": 0.5, "neg_margin": 0.1},
    ),
}


def _as_set(indices) -> set[tuple[int, ...]]:
    if len(indices) == 3:
        return set(zip(*(t.tolist() for t in indices), strict=True))
    pos = {("p", *x) for x in zip(indices[0].tolist(), indices[1].tolist(), strict=True)}
    neg = {("n", *x) for x in zip(indices[2].tolist(), indices[3].tolist(), strict=True)}
    return pos | neg


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("name", list(MINER_PAIRS))
def test_miner_matches_pml(name: str, layout: str, dtype: torch.dtype) -> None:
    ours_cls, theirs_cls, kwargs = MINER_PAIRS[name]
    labels, ref_labels = LAYOUTS[layout]
    emb, ref = _make(labels, ref_labels, dtype)
    ref_lab = None if ref_labels is None else ref_labels.clone()
    ours, theirs = ours_cls(**kwargs), theirs_cls(**kwargs)
    mine = ours(emb, labels, ref, ref_lab)
    reference = theirs(emb, labels, ref, ref_lab)
    assert len(mine) == len(reference)
    assert _as_set(mine) == _as_set(reference)
    if len(mine) == 3:
        assert ours.num_triplets == theirs.num_triplets == len(mine[0])
    else:
        assert ours.num_pos_pairs == theirs.num_pos_pairs
        assert ours.num_neg_pairs == theirs.num_neg_pairs
    if name.startswith(("triplet", "pair_margin")):
        for a, b in zip(mine, reference, strict=True):
            assert torch.equal(a, b.long())


# Losses holding per-class weights are compared with PML's weights loaded into them, in their
# own test files; each such file lists its (dmlkit, PML) factories as ``PML_CASES``.
WEIGHTED_PARITY_FILES = (
    "test_adaptive_margin_losses",
    "test_classification_losses",
    "test_list_based_losses",
    "test_proxy_losses",
    "test_tuple_based_losses",
)


def test_every_registered_class_that_pml_has_is_compared_with_pml() -> None:
    """A loss or miner registered under a name PML also has cannot escape the comparisons
    with PML: at least one case of this file's tables, or of a weighted-parity file's
    ``PML_CASES``, must build it."""
    import importlib

    from dmlkit.losses import LOSSES as LOSS_REGISTRY
    from dmlkit.miners import MINERS as MINER_REGISTRY

    compared_losses = {type(make(False)[0]).__name__ for make in LOSSES.values()}
    for file in WEIGHTED_PARITY_FILES:
        cases = importlib.import_module(file).PML_CASES
        compared_losses |= {type(make()[0]).__name__ for make in cases.values()}
    compared_miners = {type(ours(**kwargs)).__name__ for ours, _, kwargs in MINER_PAIRS.values()}
    compared_miners |= importlib.import_module("test_more_miners").PML_COMPARED_MINERS
    missing = [
        name
        for name in LOSS_REGISTRY.names()
        if hasattr(pml_losses, name) and name not in compared_losses
    ] + [
        name
        for name in MINER_REGISTRY.names()
        if hasattr(pml_miners, name) and name not in compared_miners
    ]
    assert not missing, f"no PML parity case builds {missing}"
