"""The proxy losses (ProxyNCA, ProxyAnchor, SoftTriple) against PML 2.9 with PML's weights
loaded: values, embedding and weight gradients, logits, mined tuples, reducers, weight
regularisers, an optimiser step, state dicts both ways; and their own checks (labels, half
precision, initial weights, building from a run's values). NCA is compared in the parity table
of test_pml_parity.py; its reference-set semantics are checked here against an oracle."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dmlkit.distances as dd
import dmlkit.losses as dl
import dmlkit.reducers as dr
import dmlkit.regularizers as dreg
from dmlkit.registry import Spec

pml_losses = pytest.importorskip("pytorch_metric_learning.losses")
pml_miners = pytest.importorskip("pytorch_metric_learning.miners")
pml_distances = pytest.importorskip("pytorch_metric_learning.distances")
pml_reducers = pytest.importorskip("pytorch_metric_learning.reducers")
pml_regularizers = pytest.importorskip("pytorch_metric_learning.regularizers")

from conftest import assert_close  # noqa: E402
from weighted_parity import (  # noqa: E402
    C,
    D,
    assert_matches_pml,
    embeddings_for,
    weight_of,
)

Pair = tuple[torch.nn.Module, torch.nn.Module]


def _case(
    name: str,
    options: dict[str, Any] | None = None,
    ours: Callable[[int], dict[str, Any]] = lambda _: {},
    theirs: Callable[[int], dict[str, Any]] = lambda _: {},
) -> Callable[..., Pair]:
    """A factory of (dmlkit loss, PML loss) of class ``name`` for C classes of dimension D, with
    shared ``options`` and each side's own objects (given C: distances, reducers,
    regularisers)."""

    def make(num_classes: int = C, embedding_size: int = D) -> Pair:
        shared = options or {}
        return (
            getattr(dl, name)(num_classes, embedding_size, **shared, **ours(num_classes)),
            getattr(pml_losses, name)(num_classes, embedding_size, **shared, **theirs(num_classes)),
        )

    return make


PML_CASES: dict[str, Callable[..., Pair]] = {
    "proxy_nca": _case("ProxyNCALoss"),
    "proxy_nca_mlrc_scale": _case("ProxyNCALoss", {"softmax_scale": 13.98}),
    # exp(−400) underflows in float32: PML drops such an item there, dmlkit keeps its loss.
    "proxy_nca_scale_100": _case("ProxyNCALoss", {"softmax_scale": 100}),
    "proxy_nca_cosine": _case(
        "ProxyNCALoss",
        {"softmax_scale": 5},
        lambda _: {"distance": dd.CosineSimilarity()},
        lambda _: {"distance": pml_distances.CosineSimilarity()},
    ),
    "proxy_nca_sum_lp_reg": _case(
        "ProxyNCALoss",
        {"weight_reg_weight": 0.3},
        lambda _: {"reducer": dr.SumReducer(), "weight_regularizer": dreg.LpRegularizer()},
        lambda _: {
            "reducer": pml_reducers.SumReducer(),
            "weight_regularizer": pml_regularizers.LpRegularizer(),
        },
    ),
    "proxy_anchor": _case("ProxyAnchorLoss"),
    "proxy_anchor_tuned": _case("ProxyAnchorLoss", {"margin": 0.3, "alpha": 16}),
    "proxy_anchor_euclidean": _case(
        "ProxyAnchorLoss",
        {"margin": 0.5, "alpha": 4},
        lambda _: {"distance": dd.LpDistance()},
        lambda _: {"distance": pml_distances.LpDistance()},
    ),
    "proxy_anchor_mean": _case(
        "ProxyAnchorLoss",
        {},
        lambda _: {"reducer": dr.MeanReducer()},
        lambda _: {"reducer": pml_reducers.MeanReducer()},
    ),
    "proxy_anchor_avg_non_zero_regularface": _case(
        "ProxyAnchorLoss",
        {"weight_reg_weight": 0.5},
        lambda _: {
            "reducer": dr.AvgNonZeroReducer(),
            "weight_regularizer": dreg.RegularFaceRegularizer(),
        },
        lambda _: {
            "reducer": pml_reducers.AvgNonZeroReducer(),
            "weight_regularizer": pml_regularizers.RegularFaceRegularizer(),
        },
    ),
    "soft_triple": _case("SoftTripleLoss"),
    "soft_triple_k3": _case(
        "SoftTripleLoss", {"centers_per_class": 3, "la": 10, "gamma": 0.05, "margin": 0.1}
    ),
    "soft_triple_one_centre": _case("SoftTripleLoss", {"centers_per_class": 1}),
    "soft_triple_sparse_centres": _case(
        "SoftTripleLoss",
        {"centers_per_class": 4, "weight_reg_weight": 0.2},
        lambda c: {"weight_regularizer": dreg.SparseCentersRegularizer(c, 4)},
        lambda c: {"weight_regularizer": pml_regularizers.SparseCentersRegularizer(c, 4)},
    ),
}
"""Every class of this file, and their options, compared with PML (the PML-parity guard in
test_pml_parity.py reads this table)."""

LAYOUTS = {
    "many_classes": torch.arange(48) % C,
    "some_classes": torch.arange(40) % 7 + 3,  # classes 0-2 and 10-11 have no item
    "pk_batch": torch.arange(32) // 4,
    "one_class": torch.full((16,), 5),
    "singletons": torch.tensor([0, 1, 2, 3, 3, 4, 5, 5, 5, 6, 7, 11]),
    "every_class_once": torch.arange(C),
}


def _pair(name: str, dtype: torch.dtype, num_classes: int = C, embedding_size: int = D) -> Pair:
    """dmlkit's loss in ``dtype`` holding PML's initial weights (float32 numbers), and PML's
    loss in float64."""
    ours, theirs = PML_CASES[name](num_classes, embedding_size)
    theirs.double()
    ours.to(dtype)
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("name", list(PML_CASES))
def test_matches_pml(name: str, layout: str, dtype: torch.dtype) -> None:
    labels = LAYOUTS[layout]
    ours, theirs = _pair(name, dtype)
    emb = embeddings_for(labels, dtype)
    assert_matches_pml(ours, theirs, emb, labels)
    assert_close(ours.get_logits(emb), theirs.get_logits(emb.double()))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("name", ["proxy_nca", "proxy_anchor", "soft_triple"])
def test_matches_pml_with_many_classes(name: str, dtype: torch.dtype) -> None:
    labels = torch.randint(0, 1000, (96,), generator=torch.Generator().manual_seed(3))
    ours, theirs = _pair(name, dtype, 1000, 32)
    assert_matches_pml(ours, theirs, embeddings_for(labels, dtype, 32), labels)


MINERS = {
    "multi_similarity": lambda: pml_miners.MultiSimilarityMiner(epsilon=0.1),
    "semihard_triplets": lambda: pml_miners.TripletMarginMiner(
        margin=0.3, type_of_triplets="semihard"
    ),
    "batch_hard": lambda: pml_miners.BatchHardMiner(),
}


@pytest.mark.parametrize("miner", list(MINERS))
@pytest.mark.parametrize("name", list(PML_CASES))
def test_mined_tuples_weigh_items_as_in_pml(name: str, miner: str) -> None:
    labels = LAYOUTS["pk_batch"]
    emb = embeddings_for(labels, torch.float64)
    indices = MINERS[miner]()(emb, labels)
    counts = torch.bincount(torch.cat(indices), minlength=len(labels))
    anchors = indices[:1] if len(indices) == 3 else indices[0::2]
    anchor_counts = torch.bincount(torch.cat(anchors), minlength=len(labels))
    assert len(set(counts.tolist())) > 1  # items weighed differently
    # ProxyNCA counts anchors only, the others every entry: the two weightings differ.
    assert not torch.equal(counts / counts.max(), anchor_counts / anchor_counts.max())
    assert_matches_pml(*_pair(name, torch.float64), emb, labels, indices)


@pytest.mark.parametrize("name", list(PML_CASES))
def test_an_empty_mined_tuple_weighs_every_item_as_in_pml(name: str) -> None:
    labels = LAYOUTS["pk_batch"]
    emb = embeddings_for(labels, torch.float64)
    empty = torch.empty(0, dtype=torch.long)
    for indices in ((empty,) * 3, (empty,) * 4):
        ours, theirs = _pair(name, torch.float64)
        assert_matches_pml(ours, theirs, emb, labels, indices)
        assert_close(ours(emb, labels, indices), ours(emb, labels))


@pytest.mark.parametrize("name", list(PML_CASES))
def test_one_sgd_step_keeps_agreeing(name: str) -> None:
    labels = LAYOUTS["many_classes"]
    emb = embeddings_for(labels, torch.float64)
    ours, theirs = _pair(name, torch.float64)
    (key,) = theirs.state_dict()
    initial = theirs.state_dict()[key].clone()
    leaves = []
    for loss in (ours, theirs):
        x = emb.clone().requires_grad_(True)
        optimiser = torch.optim.SGD([x, *loss.parameters()], lr=0.05)
        loss(x, labels).backward()
        optimiser.step()
        leaves.append(x.detach())
    assert_close(leaves[0], leaves[1])
    assert_close(ours.state_dict()[key], theirs.state_dict()[key])
    assert not torch.equal(ours.state_dict()[key], initial)
    assert_matches_pml(ours, theirs, leaves[0], labels)


@pytest.mark.parametrize("name", list(PML_CASES))
def test_state_dicts_load_both_ways(name: str) -> None:
    ours, theirs = PML_CASES[name]()
    mine, reference = ours.state_dict(), theirs.state_dict()
    assert {k: v.shape for k, v in mine.items()} == {k: v.shape for k, v in reference.items()}
    assert len(mine) == 1
    ours.load_state_dict(reference)
    assert all(torch.equal(ours.state_dict()[k], reference[k]) for k in reference)
    fresh, _ = PML_CASES[name]()
    theirs.load_state_dict(fresh.state_dict())
    assert all(torch.equal(theirs.state_dict()[k], fresh.state_dict()[k]) for k in reference)


@pytest.mark.parametrize("name", ["proxy_nca", "proxy_anchor", "soft_triple"])
def test_initial_weights_have_pml_distribution(name: str) -> None:
    """Same distribution as PML's init (tests load PML's weights instead of relying on it):
    mean, standard deviation and largest magnitude of the entries, at 1000 classes."""
    ours, theirs = PML_CASES[name](1000, 64)
    mine, reference = weight_of(ours).detach(), weight_of(theirs).detach()
    assert mine.shape == reference.shape
    std = float(reference.std())
    assert abs(float(mine.mean())) < 0.02 * std
    assert abs(float(mine.std()) / std - 1) < 0.02
    assert abs(float(mine.abs().max()) / float(reference.abs().max()) - 1) < 0.3


@pytest.mark.parametrize("name", list(PML_CASES))
def test_a_label_outside_the_classes_is_a_value_error_naming_it(name: str) -> None:
    ours, _ = PML_CASES[name]()
    emb = torch.randn(4, D)
    for bad in (C, -1):
        with pytest.raises(ValueError, match=rf"labels holds {bad}, outside .*\[0, {C}\)"):
            ours(emb, torch.tensor([0, bad, 1, 2]))


@pytest.mark.parametrize("name", ["proxy_nca", "proxy_anchor", "soft_triple"])
def test_ref_emb_is_refused_as_in_pml(name: str) -> None:
    ours, _ = PML_CASES[name]()
    emb, labels = torch.randn(4, D), torch.tensor([0, 1, 1, 2])
    with pytest.raises(ValueError, match="does not support ref_emb"):
        ours(emb, labels, ref_emb=emb, ref_labels=labels)


@pytest.mark.parametrize("name", ["proxy_nca", "proxy_anchor", "soft_triple"])
def test_an_empty_batch_gives_a_zero_with_a_graph(name: str) -> None:
    ours, _ = PML_CASES[name]()
    emb = torch.randn(0, D, requires_grad=True)
    value = ours(emb, torch.zeros(0, dtype=torch.long))
    assert value.item() == 0.0
    value.backward()
    assert torch.all(weight_of(ours).grad == 0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", list(PML_CASES))
def test_half_precision_is_finite_and_close_to_float32(name: str, dtype: torch.dtype) -> None:
    labels = LAYOUTS["many_classes"]
    ours, _ = PML_CASES[name]()
    half = embeddings_for(labels, torch.float32).to(dtype).requires_grad_(True)
    value = ours(half, labels)
    assert value.dtype == dtype and torch.isfinite(value)
    value.backward()
    assert half.grad is not None and torch.isfinite(half.grad).all()
    assert torch.isfinite(weight_of(ours).grad).all()
    reference = ours(half.detach().float(), labels)
    torch.testing.assert_close(value.float(), reference, rtol=2e-2, atol=1e-3)


def test_proxy_anchor_divides_its_positive_side_by_the_proxies_with_a_positive() -> None:
    """The default DivisorReducer against the formula written out: Σ_c pos_c / |{c with
    items}| + Σ_c neg_c / C."""
    labels = LAYOUTS["some_classes"]
    emb = embeddings_for(labels, torch.float64)
    loss = dl.ProxyAnchorLoss(C, D).double()
    cos = F.normalize(emb) @ F.normalize(loss.proxies).T
    pos = F.one_hot(labels, C).bool()
    pos_terms = torch.log1p((torch.exp(32 * (0.1 - cos)) * pos).sum(0))
    neg_terms = torch.log1p((torch.exp(32 * (cos + 0.1)) * ~pos).sum(0))
    present = len(labels.unique())
    assert present < C
    assert_close(loss(emb, labels), pos_terms.sum() / present + neg_terms.sum() / C)


def test_divisor_reducer_needs_a_loss_that_supplies_a_divisor() -> None:
    with pytest.raises(ValueError, match="DivisorReducer divides by a count the loss supplies"):
        dl.ProxyNCALoss(C, D, reducer=dr.DivisorReducer())(torch.randn(4, D), torch.arange(4))
    reducer = dr.DivisorReducer()
    assert reducer(torch.tensor([1.0, 2.0, 3.0]), divisor=4).item() == 1.5
    zero = reducer(torch.tensor([1.0, 2.0], requires_grad=True), divisor=0)
    assert zero.item() == 0.0 and zero.requires_grad


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: dl.SoftTripleLoss(C, D, centers_per_class=0), "centers_per_class must be a "),
        (lambda: dl.SoftTripleLoss(C, D, centers_per_class=2.5), "centers_per_class must be a "),
        (lambda: dl.SoftTripleLoss(C, D, gamma=0.0), "gamma must be a positive number"),
        (lambda: dl.SoftTripleLoss(0, D), "num_classes must be a positive integer, got 0"),
        (lambda: dl.ProxyNCALoss(0, D), "num_classes must be a positive integer, got 0"),
        (lambda: dl.ProxyAnchorLoss(C, 0), "embedding_size must be a positive integer, got 0"),
        (lambda: dl.ProxyAnchorLoss(C, 2.0), "embedding_size must be a positive integer"),
    ],
)
def test_bad_constructor_values_are_value_errors(build, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build()


def test_soft_triple_refuses_a_sparse_centres_regulariser_of_other_sizes() -> None:
    """Caught at construction, not at the first call (or never, for pairs of other classes)."""
    with pytest.raises(
        ValueError,
        match=r"centers_per_class=3, but its weight_regularizer SparseCentersRegularizer has "
        r"num_classes=12 and centers_per_class=4",
    ):
        dl.SoftTripleLoss(
            C, D, centers_per_class=3, weight_regularizer=dreg.SparseCentersRegularizer(C, 4)
        )
    with pytest.raises(ValueError, match=r"SparseCentersRegularizer has num_classes=6 "):
        dl.SoftTripleLoss(
            C, D, centers_per_class=3, weight_regularizer=dreg.SparseCentersRegularizer(6, 6)
        )
    loss = dl.SoftTripleLoss(
        C, D, centers_per_class=3, weight_regularizer=dreg.SparseCentersRegularizer(C, 3)
    )
    assert torch.isfinite(loss(torch.randn(4, D), torch.tensor([0, 1, 1, 2])))


def test_weight_init_func_initialises_the_weights() -> None:
    loss = dl.SoftTripleLoss(C, D, centers_per_class=2, weight_init_func=torch.nn.init.ones_)
    assert torch.equal(loss.fc, torch.ones(D, 2 * C))


def test_a_run_builds_soft_triple_with_its_sparse_centres_regulariser() -> None:
    """``num_classes`` reaches the nested regulariser as it reaches the loss."""
    spec = Spec(
        "SoftTripleLoss",
        {
            "centers_per_class": 3,
            "weight_reg_weight": 0.2,
            "weight_regularizer": {
                "name": "SparseCentersRegularizer",
                "options": {"centers_per_class": 3},
            },
        },
    )
    loss = dl.LOSSES.build(spec, "loss", num_classes=C, embedding_size=D)
    assert loss.fc.shape == (D, 3 * C)
    assert loss.weight_regularizer.num_classes == C
    theirs = pml_losses.SoftTripleLoss(
        C,
        D,
        centers_per_class=3,
        weight_reg_weight=0.2,
        weight_regularizer=pml_regularizers.SparseCentersRegularizer(C, 3),
    ).double()
    loss.double().load_state_dict(theirs.state_dict())
    labels = LAYOUTS["many_classes"]
    assert_matches_pml(loss, theirs, embeddings_for(labels, torch.float64), labels)


@pytest.mark.parametrize("name", ["ProxyNCALoss", "ProxyAnchorLoss", "SoftTripleLoss"])
def test_a_run_builds_every_class_from_its_values(name: str) -> None:
    loss = dl.LOSSES.build(Spec(name), "loss", num_classes=C, embedding_size=D)
    assert loss.num_classes == C and loss.embedding_size == D
    loss(torch.randn(5, D), torch.tensor([0, 1, 2, 3, C - 1])).backward()


# ---------------------------------------------------------------------------- NCA


def _nca_oracle(emb, labels, ref, ref_labels, own_row, scale: float = 1.0):
    """NCA written out item by item: softmax over the references other than the item's own
    row, −log of the same-label mass, averaged over the items that have a same-label one."""
    losses = []
    for i in range(len(emb)):
        keep = [j for j in range(len(ref)) if j != own_row[i]]
        logits = -scale * ((F.normalize(emb[i], dim=0) - F.normalize(ref[keep], dim=1)) ** 2).sum(1)
        same = labels[i] == ref_labels[keep]
        if same.any():
            losses.append(-torch.log(F.softmax(logits, dim=0)[same].sum()))
    return torch.stack(losses).mean()


@pytest.mark.parametrize("in_bank", [24, 19], ids=["whole_batch", "partial"])
def test_nca_with_a_memory_bank_leaves_each_anchor_out_of_its_own_softmax(in_bank: int) -> None:
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(24) % 6
    emb = torch.randn(24, 8, generator=g, dtype=torch.float64)
    other_labels = torch.arange(20) % 5
    ref = torch.cat([torch.randn(20, 8, generator=g, dtype=torch.float64), emb[:in_bank]])
    ref_labels = torch.cat([other_labels, labels[:in_bank]])
    own_row = torch.where(torch.arange(24) < in_bank, torch.arange(24) + 20, -1)
    x, r = emb.clone().requires_grad_(True), ref.clone().requires_grad_(True)
    value = dl.NCALoss(softmax_scale=2)(x, labels, None, r, ref_labels, anchor_in_ref=own_row)
    expected = _nca_oracle(x, labels, r, ref_labels, own_row.tolist(), 2.0)
    assert_close(value, expected)
    for ours, theirs in zip(
        torch.autograd.grad(value, (x, r)), torch.autograd.grad(expected, (x, r)), strict=True
    ):
        assert_close(ours, theirs)


def test_nca_counts_a_tuples_references_as_items_only_when_they_are_the_batch() -> None:
    """PML's rule by index: against the batch (or a reference set that is the batch, by
    ``anchor_in_ref``) every entry of a tuple names an item; against other items only the
    anchors do."""
    labels = torch.arange(16) // 4
    emb = embeddings_for(labels, torch.float64)
    indices = pml_miners.MultiSimilarityMiner(epsilon=0.1)(emb, labels)
    loss = dl.NCALoss()
    in_batch = loss(emb, labels, indices)
    assert_close(in_batch, pml_losses.NCALoss()(emb, labels, indices))
    permutation = torch.randperm(16, generator=torch.Generator().manual_seed(1))
    ref, ref_labels = emb[permutation], labels[permutation]
    rows = torch.argsort(permutation)  # anchor i sits at rows[i] of the permuted batch
    p, n = rows[indices[1]], rows[indices[3]]
    permuted = (indices[0], p, indices[2], n)
    assert_close(loss(emb, labels, permuted, ref, ref_labels, anchor_in_ref=rows), in_batch)
    anchors_only = pml_losses.NCALoss()(emb, labels, permuted, ref.clone(), ref_labels)
    assert_close(loss(emb, labels, permuted, ref, ref_labels), anchors_only)
    assert not torch.isclose(anchors_only, in_batch)


# ---------------------------------------------------------------------------- properties


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
@given(
    name=st.sampled_from(list(PML_CASES)),
    n=st.integers(1, 24),
    dim=st.integers(2, 8),
    num_classes=st.integers(1, 8),
    layout=st.sampled_from(["random", "one_class", "singletons"]),
    spread=st.sampled_from([0.0, 0.5, 2.0]),
    mined=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_matches_pml_on_random_batches(
    name: str,
    n: int,
    dim: int,
    num_classes: int,
    layout: str,
    spread: float,
    mined: bool,
    seed: int,
) -> None:
    g = torch.Generator().manual_seed(seed)
    if layout == "random":
        labels = torch.randint(0, num_classes, (n,), generator=g)
    elif layout == "one_class":
        labels = torch.full((n,), num_classes - 1)
    else:
        labels = torch.randperm(max(n, num_classes), generator=g)[:n] % num_classes
    torch.manual_seed(seed)
    ours, theirs = _pair(name, torch.float64, num_classes, dim)
    centres = torch.randn(num_classes, dim, generator=g, dtype=torch.float64)
    emb = spread * centres[labels] + torch.randn(n, dim, generator=g, dtype=torch.float64)
    indices = pml_miners.TripletMarginMiner(margin=0.5)(emb, labels) if mined else None
    assert_matches_pml(ours, theirs, emb, labels, indices)
