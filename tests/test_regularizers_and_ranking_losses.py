"""Regularisers (embedding and weight hooks), SNRDistance, SignalToNoiseRatioContrastiveLoss,
FastAPLoss and MarginLoss against PML 2.9: values, embedding gradients and β's gradients, one
SGD step, state_dict round trips, and the regularisers' effect on a loss.

The losses' plain comparisons over every layout and PML-mined tuple are cases of
``test_pml_parity.LOSSES``; this file adds what those cannot see (parameters, hooks)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor, nn

import dmlkit.distances as dd
import dmlkit.losses as dl
import dmlkit.reducers as dre
import dmlkit.regularizers as dr
from dmlkit.batch import Batch
from dmlkit.registry import ConfigError, Spec
from test_pml_parity import LAYOUTS, _make, _mined_by_pml
from test_properties import SETTINGS, batches

pml_losses = pytest.importorskip("pytorch_metric_learning.losses")
pml_distances = pytest.importorskip("pytorch_metric_learning.distances")
pml_reducers = pytest.importorskip("pytorch_metric_learning.reducers")
pml_regularizers = pytest.importorskip("pytorch_metric_learning.regularizers")

from conftest import assert_close  # noqa: E402

DTYPES = pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
# Labels below MarginLoss's num_classes in every layout (the largest is 19).
NUM_CLASSES = 24


def _value_and_grads(
    loss: nn.Module, emb: Tensor, labels: Tensor | None, *args: Any
) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """The loss, the embeddings' gradient and every parameter's gradient (zeros for a
    parameter the loss did not reach)."""
    loss.zero_grad()
    leaf = emb.clone().requires_grad_(True)
    value = loss(leaf, labels, *args)
    value.backward()
    assert leaf.grad is not None
    params = {
        name: torch.zeros_like(p) if p.grad is None else p.grad.clone()
        for name, p in loss.named_parameters()
    }
    return value.detach(), leaf.grad, params


def _assert_matches(ours: nn.Module, theirs: nn.Module, emb: Tensor, labels, *args) -> None:
    """dmlkit in the embeddings' dtype against PML in float64 (values, embedding and
    parameter gradients)."""
    theirs64 = [a.double() if isinstance(a, Tensor) and a.is_floating_point() else a for a in args]
    v1, g1, p1 = _value_and_grads(ours, emb, labels, *args)
    v2, g2, p2 = _value_and_grads(theirs, emb.double(), labels, *theirs64)
    assert torch.isfinite(v1)
    assert_close(v1, v2)
    assert_close(g1, g2)
    assert p1.keys() == p2.keys()
    for name in p1:
        assert_close(p1[name], p2[name])


# ---------------------------------------------------------------------------- regularisers

REGULARIZERS = {
    "lp": lambda: (dr.LpRegularizer(), pml_regularizers.LpRegularizer()),
    "lp_p1_squared": lambda: (
        dr.LpRegularizer(p=1, power=2),
        pml_regularizers.LpRegularizer(p=1, power=2),
    ),
    "lp_avg_non_zero": lambda: (
        dr.LpRegularizer(power=3, reducer=dre.ThresholdReducer(low=1.5)),
        pml_regularizers.LpRegularizer(power=3, reducer=pml_reducers.ThresholdReducer(low=1.5)),
    ),
    "zero_mean": lambda: (dr.ZeroMeanRegularizer(), pml_regularizers.ZeroMeanRegularizer()),
    "zero_mean_sum": lambda: (
        dr.ZeroMeanRegularizer(reducer=dre.SumReducer()),
        pml_regularizers.ZeroMeanRegularizer(reducer=pml_reducers.SumReducer()),
    ),
    "center_invariant": lambda: (
        dr.CenterInvariantRegularizer(),
        pml_regularizers.CenterInvariantRegularizer(),
    ),
    "center_invariant_l3": lambda: (
        dr.CenterInvariantRegularizer(distance=dd.LpDistance(p=3, normalize_embeddings=False)),
        pml_regularizers.CenterInvariantRegularizer(
            distance=pml_distances.LpDistance(p=3, normalize_embeddings=False)
        ),
    ),
    "regular_face": lambda: (
        dr.RegularFaceRegularizer(),
        pml_regularizers.RegularFaceRegularizer(),
    ),
    "regular_face_dot": lambda: (
        dr.RegularFaceRegularizer(distance=dd.DotProductSimilarity(normalize_embeddings=False)),
        pml_regularizers.RegularFaceRegularizer(
            distance=pml_distances.DotProductSimilarity(normalize_embeddings=False)
        ),
    ),
    "sparse_centers": lambda: (
        dr.SparseCentersRegularizer(num_classes=4, centers_per_class=3),
        pml_regularizers.SparseCentersRegularizer(num_classes=4, centers_per_class=3),
    ),
    "sparse_centers_squared": lambda: (
        dr.SparseCentersRegularizer(4, 3, distance=dd.CosineSimilarity(power=2)),
        pml_regularizers.SparseCentersRegularizer(
            4, 3, distance=pml_distances.CosineSimilarity(power=2)
        ),
    ),
    "sparse_centers_mean": lambda: (
        dr.SparseCentersRegularizer(num_classes=4, centers_per_class=3, reducer=dre.MeanReducer()),
        pml_regularizers.SparseCentersRegularizer(
            num_classes=4, centers_per_class=3, reducer=pml_reducers.MeanReducer()
        ),
    ),
}


@DTYPES
@pytest.mark.parametrize("name", list(REGULARIZERS))
def test_regularizer_matches_pml(name: str, dtype: torch.dtype) -> None:
    ours, theirs = REGULARIZERS[name]()
    x = torch.randn(12, 6, dtype=torch.float64)
    x[3] *= 3  # unequal norms, so that every term is non-trivial
    a, b = x.to(dtype).requires_grad_(True), x.detach().clone().requires_grad_(True)
    value, expected = ours(a), theirs(b)
    value.backward()
    expected.backward()
    assert value.dtype == dtype
    assert_close(value, expected)
    assert a.grad is not None and b.grad is not None
    assert_close(a.grad, b.grad)


def test_sparse_centers_pulls_only_same_class_centres_together() -> None:
    reg = dr.SparseCentersRegularizer(num_classes=2, centers_per_class=2)
    centres = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    assert reg(centres).item() == pytest.approx(0.0, abs=1e-6)
    apart = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    # Two pairs at chord distance √2, over twice the number of pairs.
    assert reg(apart).item() == pytest.approx(2 * 2**0.5 / 4)
    with pytest.raises(ValueError, match="expects 4 centres"):
        reg(torch.randn(5, 2))


def test_sparse_centers_cost_grows_with_the_classes_not_their_square() -> None:
    """At 2500 classes × 8 centres the (C·K)² similarities and mask take 2 GB (SOP's 11318 × 10:
    12.8 GB); computed class by class they take C·K². Measured in a fresh process: building
    the regulariser and a forward and backward."""
    script = textwrap.dedent(
        """
        import json, resource, torch
        import dmlkit.regularizers as dr
        torch.manual_seed(0)
        centres = torch.randn(64, 2500 * 8).t().requires_grad_(True)  # SoftTriple's fc.t()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        reg = dr.SparseCentersRegularizer(num_classes=2500, centers_per_class=8)
        value = reg(centres)
        value.backward()
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(json.dumps({"value": value.item(), "grew_mib": (after - before) / 1024,
                          "buffers": len(list(reg.buffers()))}))
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["value"] > 0 and result["buffers"] == 0
    assert result["grew_mib"] < 200, result


def test_regularizers_check_their_settings() -> None:
    with pytest.raises(ValueError, match="centers_per_class >= 2"):
        dr.SparseCentersRegularizer(num_classes=3, centers_per_class=1)
    with pytest.raises(ValueError, match="num_classes must be a positive integer, got 0"):
        dr.SparseCentersRegularizer(num_classes=0, centers_per_class=2)
    with pytest.raises(ValueError, match="centers_per_class must be a positive integer"):
        dr.SparseCentersRegularizer(num_classes=3, centers_per_class=2.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="requires CosineSimilarity"):
        dr.SparseCentersRegularizer(3, 2, distance=dd.LpDistance())
    with pytest.raises(ValueError, match="power=1, normalize_embeddings=False"):
        dr.CenterInvariantRegularizer(distance=dd.LpDistance())
    with pytest.raises(ValueError, match="needs a similarity"):
        dr.RegularFaceRegularizer(distance=dd.LpDistance())


EMBEDDING_REGULARIZED = {
    "contrastive": lambda reg, pml_reg: (
        dl.ContrastiveLoss(embedding_regularizer=reg, embedding_reg_weight=0.37),
        pml_losses.ContrastiveLoss(embedding_regularizer=pml_reg, embedding_reg_weight=0.37),
    ),
    "triplet": lambda reg, pml_reg: (
        dl.TripletMarginLoss(margin=0.2, embedding_regularizer=reg, embedding_reg_weight=0.37),
        pml_losses.TripletMarginLoss(
            margin=0.2, embedding_regularizer=pml_reg, embedding_reg_weight=0.37
        ),
    ),
    "multi_similarity": lambda reg, pml_reg: (
        dl.MultiSimilarityLoss(embedding_regularizer=reg, embedding_reg_weight=0.37),
        pml_losses.MultiSimilarityLoss(embedding_regularizer=pml_reg, embedding_reg_weight=0.37),
    ),
    "fastap": lambda reg, pml_reg: (
        dl.FastAPLoss(embedding_regularizer=reg, embedding_reg_weight=0.37),
        pml_losses.FastAPLoss(embedding_regularizer=pml_reg, embedding_reg_weight=0.37),
    ),
    "margin": lambda reg, pml_reg: (
        dl.MarginLoss(embedding_regularizer=reg, embedding_reg_weight=0.37),
        pml_losses.MarginLoss(embedding_regularizer=pml_reg, embedding_reg_weight=0.37),
    ),
}


@DTYPES
@pytest.mark.parametrize("layout", ["many_classes", "one_class", "no_positive_pairs", "ref_set"])
@pytest.mark.parametrize("name", list(EMBEDDING_REGULARIZED))
def test_embedding_regularizer_matches_pml(name: str, layout: str, dtype: torch.dtype) -> None:
    labels, ref_labels = LAYOUTS[layout]
    if ref_labels is not None and name == "fastap":
        pytest.skip("FastAPLoss rejects ref_emb, as PML's")
    ours, theirs = EMBEDDING_REGULARIZED[name](
        dr.LpRegularizer(power=2), pml_regularizers.LpRegularizer(power=2)
    )
    emb, ref = _make(labels, ref_labels, dtype)
    emb = emb * 1.7  # norms away from 1, so that the regulariser's gradient is not small
    _assert_matches(ours, theirs, emb, labels, None, ref, ref_labels)


@pytest.mark.parametrize("layout", ["pk_batch", "no_positive_pairs", "ref_set"])
@pytest.mark.parametrize("name", list(EMBEDDING_REGULARIZED))
def test_embedding_regularizer_adds_its_weighted_value_on_the_embeddings_only(
    name: str, layout: str
) -> None:
    labels, ref_labels = LAYOUTS[layout]
    if ref_labels is not None and name == "fastap":
        pytest.skip("FastAPLoss rejects ref_emb")
    emb, ref = _make(labels, ref_labels, torch.float64)
    reg = dr.ZeroMeanRegularizer()
    plain, _ = EMBEDDING_REGULARIZED[name](None, None)
    regularized, _ = EMBEDDING_REGULARIZED[name](reg, None)
    leaf = emb.clone().requires_grad_(True)
    ref_leaf = None if ref is None else ref.clone().requires_grad_(True)
    expected = plain(emb, labels, None, ref, ref_labels) + 0.37 * reg(emb)
    value = regularized(leaf, labels, None, ref_leaf, ref_labels)
    assert_close(value, expected)
    value.backward()
    if ref_leaf is not None:
        # The reference set is not regularised: its gradient is the plain loss's.
        ref_plain = ref.clone().requires_grad_(True)
        plain(emb, labels, None, ref_plain, ref_labels).backward()
        assert ref_leaf.grad is not None and ref_plain.grad is not None
        assert_close(ref_leaf.grad, ref_plain.grad)


def test_embedding_regularizer_gives_a_loss_without_triplets_a_gradient() -> None:
    emb = torch.randn(5, 4, requires_grad=True)
    loss = dl.MarginLoss(embedding_regularizer=dr.LpRegularizer())(emb, torch.arange(5))
    assert_close(loss, emb.norm(dim=1).mean())
    loss.backward()
    assert emb.grad is not None and bool((emb.grad != 0).all())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_regularized_loss_in_half_precision_is_finite(dtype: torch.dtype) -> None:
    labels = torch.arange(32) // 4
    emb = (torch.randn(32, 16) * 3).to(dtype).requires_grad_(True)
    loss = dl.MarginLoss(embedding_regularizer=dr.LpRegularizer(power=2))(emb, labels)
    assert loss.dtype == dtype and torch.isfinite(loss)
    loss.backward()
    assert emb.grad is not None and torch.isfinite(emb.grad).all()


class WeightedToyLoss(dl.WeightRegularizedLoss):
    """A loss with a (D, C) weight matrix, as PML's classifiers hold one, named by import path
    in the registry tests (never registered)."""

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        weight_regularizer: dr.BaseRegularizer | None = None,
        weight_reg_weight: float = 1,
        embedding_regularizer: dr.BaseRegularizer | None = None,
        embedding_reg_weight: float = 1,
    ) -> None:
        super().__init__(
            embedding_regularizer=embedding_regularizer,
            embedding_reg_weight=embedding_reg_weight,
            weight_regularizer=weight_regularizer,
            weight_reg_weight=weight_reg_weight,
        )
        self.W = nn.Parameter(torch.randn(embedding_size, num_classes))

    def compute_loss(self, batch: Batch) -> Tensor:
        assert batch.labels is not None
        logits = batch.embeddings @ self.W.to(batch.embeddings.dtype)
        loss = nn.functional.cross_entropy(logits, batch.labels)
        return self.add_weight_regularization(loss, self.W.t())


def test_weight_regularizer_adds_its_weighted_value_of_the_weight_rows() -> None:
    reg = dr.RegularFaceRegularizer()
    plain = WeightedToyLoss(5, 8)
    regularized = WeightedToyLoss(5, 8, weight_regularizer=reg, weight_reg_weight=0.25)
    regularized.load_state_dict(plain.state_dict())
    assert plain.state_dict().keys() == regularized.state_dict().keys() == {"W"}
    emb, labels = torch.randn(16, 8), torch.arange(16) % 5
    expected = plain(emb, labels) + 0.25 * reg(plain.W.t())
    value = regularized(emb, labels)
    assert_close(value, expected)
    value.backward()
    expected.backward()
    assert regularized.W.grad is not None and plain.W.grad is not None
    assert_close(regularized.W.grad, plain.W.grad)


def test_regularizers_are_built_from_nested_specs_with_the_run_values() -> None:
    loss = dl.LOSSES.build(
        {
            "name": "SignalToNoiseRatioContrastiveLoss",
            "options": {
                "embedding_regularizer": "ZeroMeanRegularizer",
                "embedding_reg_weight": 0.1,
            },
        }
    )
    assert isinstance(loss.embedding_regularizer, dr.ZeroMeanRegularizer)
    assert loss.embedding_reg_weight == 0.1
    toy = dl.LOSSES.build(
        {
            "name": "test_regularizers_and_ranking_losses:WeightedToyLoss",
            "options": {
                "weight_regularizer": {
                    "name": "SparseCentersRegularizer",
                    "options": {"centers_per_class": 2},
                },
                "embedding_regularizer": {"name": "LpRegularizer", "options": {"power": 2}},
            },
        },
        num_classes=3,
        embedding_size=4,
    )
    assert isinstance(toy.weight_regularizer, dr.SparseCentersRegularizer)
    assert toy.weight_regularizer.num_classes == 3  # the run value reaches the nested part
    assert toy.embedding_regularizer.power == 2
    with pytest.raises(ConfigError, match="did you mean 'power'"):
        dr.REGULARIZERS.build(Spec("LpRegularizer", {"powr": 2}))
    assert set(dr.REGULARIZERS.names()) == {
        "CenterInvariantRegularizer",
        "LpRegularizer",
        "RegularFaceRegularizer",
        "SparseCentersRegularizer",
        "ZeroMeanRegularizer",
    }


def test_regularizers_leave_the_state_dict_alone() -> None:
    ours = dl.ContrastiveLoss(
        embedding_regularizer=dr.SparseCentersRegularizer(num_classes=2, centers_per_class=2)
    )
    theirs = pml_losses.ContrastiveLoss(
        embedding_regularizer=pml_regularizers.SparseCentersRegularizer(
            num_classes=2, centers_per_class=2
        )
    )
    assert ours.state_dict().keys() == theirs.state_dict().keys() == set()


# ------------------------------------------------------------------------------- distances


@DTYPES
@pytest.mark.parametrize(
    "options", [{}, {"power": 2}, {"normalize_embeddings": False}], ids=["default", "sq", "raw"]
)
def test_snr_distance_matches_pml(options: dict[str, Any], dtype: torch.dtype) -> None:
    x, y = torch.randn(9, 7, dtype=torch.float64), torch.randn(13, 7, dtype=torch.float64)
    ours, theirs = dd.SNRDistance(**options), pml_distances.SNRDistance(**options)
    for args in ((x,), (x, y)):
        leaves = [a.to(dtype).detach().clone().requires_grad_(True) for a in args]
        ref_leaves = [a.detach().clone().requires_grad_(True) for a in args]
        mat, expected = ours(*leaves), theirs(*ref_leaves)
        assert_close(mat, expected)
        weights = torch.rand_like(expected)
        (mat * weights.to(dtype)).sum().backward()
        (expected * weights).sum().backward()
        for a, b in zip(leaves, ref_leaves, strict=True):
            assert a.grad is not None and b.grad is not None
            assert_close(a.grad, b.grad)
    raw = dd.SNRDistance(normalize_embeddings=False)
    assert_close(
        raw.pairwise_distance(x, y[:9]),
        pml_distances.SNRDistance().pairwise_distance(x, y[:9]),
    )
    assert "SNRDistance" in dd.DISTANCES.names()


# ------------------------------------------------------------------------------ MarginLoss


def _margin_pair(
    learn_beta: bool = True, num_classes: int | None = NUM_CLASSES, **options: Any
) -> tuple[dl.MarginLoss, Any]:
    """dmlkit's and PML's margin loss with PML's β, randomised, loaded into dmlkit's."""
    kwargs = {"learn_beta": learn_beta, "num_classes": num_classes, **options}
    theirs = pml_losses.MarginLoss(**kwargs)
    ours = dl.MarginLoss(**{k: _ours(v) for k, v in kwargs.items()})
    if learn_beta:
        with torch.no_grad():
            theirs.beta.uniform_(0.6, 1.4)
        ours.load_state_dict(theirs.state_dict())
    return ours, theirs


def _ours(value: Any) -> Any:
    """The dmlkit counterpart of a PML distance or reducer option."""
    if isinstance(value, pml_distances.CosineSimilarity):
        return dd.CosineSimilarity()
    if isinstance(value, pml_reducers.SumReducer):
        return dre.SumReducer()
    return value


MARGIN_CASES = {
    "fixed": {"learn_beta": False},
    "global_beta": {"num_classes": None, "nu": 0.2},
    "per_class_beta": {"nu": 0.1},
    "per_class_beta_sum_reducer": {"nu": 0.1, "reducer": pml_reducers.SumReducer()},
    "cosine_per_class": {
        "nu": 0.3,
        "margin": 0.1,
        "distance": pml_distances.CosineSimilarity(),
    },
}


@DTYPES
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("case", list(MARGIN_CASES))
def test_margin_loss_matches_pml_with_beta_gradients(
    case: str, layout: str, dtype: torch.dtype
) -> None:
    labels, ref_labels = LAYOUTS[layout]
    ours, theirs = _margin_pair(**MARGIN_CASES[case])
    emb, ref = _make(labels, ref_labels, dtype)
    _assert_matches(ours, theirs, emb, labels, None, ref, ref_labels)


@pytest.mark.parametrize("miner_kind", ["ms_pairs", "semihard_triplets"])
@pytest.mark.parametrize("layout", ["pk_batch", "singletons", "ref_set"])
def test_margin_loss_matches_pml_on_mined_tuples(layout: str, miner_kind: str) -> None:
    labels, ref_labels = LAYOUTS[layout]
    emb, ref = _make(labels, ref_labels, torch.float64)
    indices = _mined_by_pml(miner_kind, emb, labels, ref, ref_labels)
    ours, theirs = _margin_pair(nu=0.1)
    _assert_matches(ours, theirs, emb, labels, indices, ref, ref_labels)


@pytest.mark.parametrize("num_classes", [None, NUM_CLASSES], ids=["global", "per_class"])
def test_margin_loss_agrees_with_pml_after_an_sgd_step(num_classes: int | None) -> None:
    labels, _ = LAYOUTS["pk_batch"]
    emb, _ = _make(labels, None, torch.float64)
    ours, theirs = _margin_pair(num_classes=num_classes, nu=0.2)
    before = theirs.beta.detach().clone()
    stepped = []
    for loss, dtype in ((ours, torch.float32), (theirs, torch.float64)):
        x = nn.Parameter(emb.to(dtype).clone())
        optimiser = torch.optim.SGD([x, *loss.parameters()], lr=0.5)
        loss(x, labels).backward()
        optimiser.step()
        optimiser.zero_grad()
        stepped.append(x.detach())
    assert_close(stepped[0], stepped[1])
    assert_close(ours.beta.detach(), theirs.beta.detach())
    assert not torch.equal(theirs.beta.detach(), before)
    _assert_matches(ours, theirs, stepped[1].float(), labels)


@pytest.mark.parametrize("num_classes", [None, 7], ids=["global", "per_class"])
@pytest.mark.parametrize("learn_beta", [True, False], ids=["learnt", "fixed"])
def test_margin_loss_state_dict_round_trips_with_pml(
    learn_beta: bool, num_classes: int | None
) -> None:
    ours, theirs = _margin_pair(learn_beta=learn_beta, num_classes=num_classes)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    assert ours.beta.shape == theirs.beta.shape == ((num_classes or 1),)
    assert isinstance(ours.beta, nn.Parameter) == learn_beta
    if learn_beta:
        with torch.no_grad():
            ours.beta.add_(0.5)
        theirs.load_state_dict(ours.state_dict())
        assert torch.equal(theirs.beta, ours.beta)
        fresh = dl.MarginLoss(learn_beta=True, num_classes=num_classes)
        fresh.load_state_dict(theirs.state_dict())
        assert torch.equal(fresh.beta, ours.beta)


def test_margin_loss_label_outside_the_classes_is_named() -> None:
    loss = dl.MarginLoss(learn_beta=True, num_classes=4)
    emb = torch.randn(6, 3)
    with pytest.raises(ValueError, match=r"labels holds 4, outside the class indices \[0, 4\)"):
        loss(emb, torch.tensor([0, 1, 2, 3, 4, 0]))
    with pytest.raises(ValueError, match="holds -1"):
        loss(emb, torch.tensor([0, 1, -1, 3, 2, 0]))
    a = torch.tensor([0])
    with pytest.raises(ValueError, match="per class needs labels"):
        loss(emb, None, (a, a + 1, a + 2))
    # One β for all: any labels, and a tuple without labels.
    dl.MarginLoss(learn_beta=True)(emb, torch.tensor([10, 10, -3, -3, 7, 7]))
    dl.MarginLoss()(emb, None, (a, a + 1, a + 2))


def test_margin_loss_checks_its_options() -> None:
    with pytest.raises(ValueError, match="triplets_per_anchor"):
        dl.MarginLoss(triplets_per_anchor=0)
    with pytest.raises(ValueError, match=r"num_classes \(or None\) must be a positive integer"):
        dl.MarginLoss(num_classes=0)
    with pytest.raises(ValueError, match=r"triplets_per_anchor .*must be a positive integer"):
        dl.MarginLoss(triplets_per_anchor=2.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"num_bins must be a positive integer, got 2\.5"):
        dl.FastAPLoss(num_bins=2.5)  # type: ignore[arg-type]


def test_margin_loss_random_triplets_are_the_only_triplets_when_there_is_one_per_anchor() -> None:
    # Items 0 and 1 share a class, item 2 is alone: the triplets are (0, 1, 2) and (1, 0, 2).
    emb, labels = torch.randn(3, 5, dtype=torch.float64), torch.tensor([0, 0, 1])
    every = dl.MarginLoss(margin=0.5)(emb, labels)
    sampled = dl.MarginLoss(margin=0.5, triplets_per_anchor=3)(emb, labels)
    assert every.item() > 0
    assert_close(sampled, every)
    assert_close(every, pml_losses.MarginLoss(margin=0.5)(emb, labels))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_margin_loss_learns_beta_in_half_precision(dtype: torch.dtype) -> None:
    labels = torch.arange(32) // 4
    emb = torch.randn(32, 16).to(dtype).requires_grad_(True)
    loss_fn = dl.MarginLoss(learn_beta=True, nu=0.1, num_classes=8)
    loss = loss_fn(emb, labels)
    assert loss.dtype == dtype and torch.isfinite(loss)
    loss.backward()
    assert loss_fn.beta.grad is not None and torch.isfinite(loss_fn.beta.grad).all()
    assert loss_fn.beta.grad.dtype == torch.float32


@SETTINGS
@given(
    batch=batches(),
    learn=st.sampled_from(["fixed", "global", "per_class"]),
    nu=st.sampled_from([0.0, 0.3]),
)
def test_margin_loss_matches_pml_on_random_batches(batch, learn: str, nu: float) -> None:
    emb, labels, ref, ref_labels = batch
    ours, theirs = _margin_pair(
        learn_beta=learn != "fixed", num_classes=None if learn == "global" else 32, nu=nu
    )
    _assert_matches(ours, theirs, emb, labels, None, ref, ref_labels)


# ------------------------------------------------------------------ FastAP and SNR checks


def test_fastap_weighs_anchors_by_their_appearances_in_a_tuple() -> None:
    labels, _ = LAYOUTS["pk_batch"]
    emb, _ = _make(labels, None, torch.float64)
    indices = _mined_by_pml("semihard_triplets", emb, labels)
    assert len(indices[0]) > 0
    weighted = dl.FastAPLoss()(emb, labels, indices)
    assert_close(weighted, pml_losses.FastAPLoss()(emb, labels, indices))
    assert weighted.item() != pytest.approx(dl.FastAPLoss()(emb, labels).item())


def test_fastap_and_snr_reject_other_distances() -> None:
    with pytest.raises(ValueError, match="FastAPLoss requires LpDistance"):
        dl.FastAPLoss(distance=dd.CosineSimilarity())
    with pytest.raises(ValueError, match="p=2 and normalize_embeddings=True"):
        dl.FastAPLoss(distance=dd.LpDistance(normalize_embeddings=False))
    with pytest.raises(ValueError, match="num_bins"):
        dl.FastAPLoss(num_bins=0)
    with pytest.raises(ValueError, match="requires SNRDistance"):
        dl.SignalToNoiseRatioContrastiveLoss(distance=dd.LpDistance())
    with pytest.raises(ValueError, match="does not support ref_emb"):
        dl.FastAPLoss()(torch.randn(4, 3), torch.arange(4), ref_emb=torch.randn(2, 3))


def test_fastap_with_few_and_many_bins_matches_pml() -> None:
    labels = torch.arange(64) // 4
    emb = torch.randn(64, 8, dtype=torch.float64)
    few = dl.FastAPLoss(num_bins=10)(emb, labels)
    many = dl.FastAPLoss(num_bins=1000)(emb, labels)
    assert_close(few, pml_losses.FastAPLoss(num_bins=10)(emb, labels))
    assert_close(many, pml_losses.FastAPLoss(num_bins=1000)(emb, labels))


def test_snr_contrastive_loss_with_the_reality_check_regularizer() -> None:
    labels, _ = LAYOUTS["pk_batch"]
    emb, _ = _make(labels, None, torch.float32)
    ours = dl.SignalToNoiseRatioContrastiveLoss(
        pos_margin=0.2,
        neg_margin=0.9,
        embedding_regularizer=dr.ZeroMeanRegularizer(),
        embedding_reg_weight=0.05,
    )
    theirs = pml_losses.SignalToNoiseRatioContrastiveLoss(
        pos_margin=0.2,
        neg_margin=0.9,
        embedding_regularizer=pml_regularizers.ZeroMeanRegularizer(),
        embedding_reg_weight=0.05,
    )
    _assert_matches(ours, theirs, emb, labels)
    assert ours.state_dict().keys() == theirs.state_dict().keys() == set()
