"""The classification losses with a weight matrix (large-margin softmax, SphereFace, ArcFace,
sub-centre ArcFace, CosFace, NormalizedSoftmax, P2SGrad) against PML 2.9 with PML's weights
loaded: values, embedding and weight gradients, logits, outliers, an optimiser step, state
dicts both ways; and their own checks (labels, half precision, use as a classifier head)."""

from __future__ import annotations

import inspect
import math
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
    ours: Callable[[], dict[str, Any]] = dict,
    theirs: Callable[[], dict[str, Any]] = dict,
) -> Callable[[int, int], Pair]:
    """A factory of (dmlkit loss, PML loss) of class ``name`` for C classes of dimension D, with
    shared ``options`` and each side's own objects (distances, reducers, regularisers)."""

    def make(num_classes: int = C, embedding_size: int = D) -> Pair:
        sizes: dict[str, int] = (
            {"descriptors_dim": embedding_size, "num_classes": num_classes}
            if name == "P2SGradLoss"
            else {"num_classes": num_classes, "embedding_size": embedding_size}
        )
        shared = options or {}
        return (
            getattr(dl, name)(**sizes, **shared, **ours()),
            getattr(pml_losses, name)(**sizes, **shared, **theirs()),
        )

    return make


PML_CASES: dict[str, Callable[..., Pair]] = {
    "large_margin": _case("LargeMarginSoftmaxLoss"),
    "large_margin_m3": _case("LargeMarginSoftmaxLoss", {"margin": 3, "scale": 2.0}),
    "sphereface": _case("SphereFaceLoss"),
    "sphereface_m2": _case("SphereFaceLoss", {"margin": 2, "scale": 3.0}),
    "arcface": _case("ArcFaceLoss"),
    # With θ + m past 180° for many targets, the linear continuation is exercised.
    "arcface_wide_margin": _case("ArcFaceLoss", {"margin": 100.0, "scale": 8.0}),
    "subcenter_arcface": _case("SubCenterArcFaceLoss"),
    "subcenter_arcface_k2": _case(
        "SubCenterArcFaceLoss", {"sub_centers": 2, "margin": 40.0, "scale": 8.0}
    ),
    "cosface": _case("CosFaceLoss"),
    "cosface_small": _case("CosFaceLoss", {"margin": 0.1, "scale": 8.0}),
    "normalized_softmax": _case("NormalizedSoftmaxLoss"),
    "normalized_softmax_euclidean": _case(
        "NormalizedSoftmaxLoss",
        {"temperature": 0.5},
        lambda: {"distance": dd.LpDistance()},
        lambda: {"distance": pml_distances.LpDistance()},
    ),
    "normalized_softmax_sum": _case(
        "NormalizedSoftmaxLoss",
        {"temperature": 0.2},
        lambda: {"reducer": dr.SumReducer()},
        lambda: {"reducer": pml_reducers.SumReducer()},
    ),
    "arcface_regularface": _case(
        "ArcFaceLoss",
        {"weight_reg_weight": 0.5},
        lambda: {"weight_regularizer": dreg.RegularFaceRegularizer()},
        lambda: {"weight_regularizer": pml_regularizers.RegularFaceRegularizer()},
    ),
    "normalized_softmax_lp_reg": _case(
        "NormalizedSoftmaxLoss",
        {"weight_reg_weight": 0.1},
        lambda: {"weight_regularizer": dreg.LpRegularizer()},
        lambda: {"weight_regularizer": pml_regularizers.LpRegularizer()},
    ),
    "p2sgrad": _case("P2SGradLoss"),
}
"""Every class of this file, and their options, compared with PML (the PML-parity guard in
test_pml_parity.py reads this table)."""

WITH_LOGITS = [name for name in PML_CASES if not name.startswith("p2sgrad")]  # PML has none there
WITH_TUPLES = WITH_LOGITS  # P2SGrad refuses an indices_tuple, as PML's does

LAYOUTS = {
    "many_classes": torch.arange(48) % C,
    "pk_batch": torch.arange(32) // 4,
    "one_class": torch.zeros(16, dtype=torch.long),
    "singletons": torch.tensor([0, 1, 2, 3, 3, 4, 5, 5, 5, 6, 7, 11]),
}


def _pair(name: str, dtype: torch.dtype, num_classes: int = C, embedding_size: int = D) -> Pair:
    """dmlkit's loss in ``dtype`` holding PML's initial weights, and PML's loss in float64.

    PML's weights are first rounded to float32, so both sides start from the same numbers.
    """
    ours, theirs = PML_CASES[name](num_classes, embedding_size)
    with torch.no_grad():
        for weight in theirs.parameters():
            weight.copy_(weight.float())
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
    if name in WITH_LOGITS:
        assert_close(ours.get_logits(emb), theirs.get_logits(emb.double()))


def _tensors(*rows: list[int]) -> tuple[torch.Tensor, ...]:
    return tuple(torch.tensor(row) for row in rows)


# Tuples naming some samples several times and leaving others out, as mined ones do.
TUPLES = {
    "triplets": _tensors([0, 0, 1, 5, 12], [1, 2, 0, 6, 13], [8, 9, 8, 20, 8]),
    "pairs": _tensors([0, 4, 4, 30], [1, 5, 6, 31], [0, 4, 17, 17], [9, 10, 10, 2]),
}


@pytest.mark.parametrize("kind", list(TUPLES))
@pytest.mark.parametrize("name", WITH_TUPLES)
def test_mined_tuples_weigh_samples_as_in_pml(name: str, kind: str) -> None:
    labels = LAYOUTS["pk_batch"]
    emb = embeddings_for(labels, torch.float64)
    assert_matches_pml(*_pair(name, torch.float64), emb, labels, TUPLES[kind])


@pytest.mark.parametrize("name", WITH_TUPLES)
def test_an_empty_mined_tuple_weighs_every_sample_as_in_pml(name: str) -> None:
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


@pytest.mark.parametrize("name", list(PML_CASES))
def test_initial_weights_have_pml_distribution(name: str) -> None:
    """Same distribution as PML's init (tests load PML's weights instead of relying on it):
    first two moments of the entries and of the columns' norms, at 1024 classes."""
    ours, theirs = PML_CASES[name](1024, 64)
    for statistic in (
        lambda w: w.mean(),
        lambda w: w.std(),
        lambda w: torch.linalg.vector_norm(w, dim=0).mean(),
    ):
        mine, reference = statistic(weight_of(ours).detach()), statistic(weight_of(theirs).detach())
        assert abs(float(mine - reference)) < 0.02 * max(1.0, abs(float(reference)))


@pytest.mark.parametrize("name", WITH_LOGITS)
def test_weight_init_func_initialises_w_as_pmls(name: str) -> None:
    def init(weight: torch.Tensor) -> None:
        with torch.no_grad():
            weight.fill_(0.25)[0].fill_(-1.0)

    ours, theirs = PML_CASES[name]()
    loss = type(ours)(num_classes=C, embedding_size=D, weight_init_func=init)
    reference = type(theirs)(num_classes=C, embedding_size=D, weight_init_func=init)
    assert torch.equal(loss.W, reference.W)


def test_get_outliers_match_pml() -> None:
    labels = torch.arange(60) % 9  # classes 9, 10, 11 have no samples
    emb = embeddings_for(labels, torch.float64)
    ours, theirs = _pair("subcenter_arcface", torch.float64)
    counts = []
    for threshold in (60, 75, 85):
        outliers, centres = ours.get_outliers(emb, labels, threshold)
        expected_outliers, expected_centres = theirs.get_outliers(emb, labels, threshold)
        assert torch.equal(outliers, expected_outliers.long())
        assert_close(centres[:, :9], expected_centres[:, :9])
        assert torch.isnan(centres[:, 9:]).all()
        alone = ours.get_outliers(emb, labels, threshold, return_dominant_centers=False)
        assert isinstance(alone, torch.Tensor) and torch.equal(alone, outliers)
        counts.append(len(outliers))
    assert len(labels) > counts[0] > counts[1] > counts[2] > 0  # not vacuous


def test_dominant_centres_are_the_sub_centres_most_samples_are_nearest_to() -> None:
    loss = dl.SubCenterArcFaceLoss(num_classes=2, embedding_size=3, sub_centers=2)
    with torch.no_grad():  # class 0: sub-centres e1, e2; class 1: e3, −e3
        loss.W.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, -1]]))
    emb = torch.tensor([[0.0, 1, 0], [0.1, 1, 0], [1, 0.2, 0], [0, 0, -1], [0, 0, -2]])
    outliers, centres = loss.get_outliers(emb, torch.tensor([0, 0, 0, 1, 1]), threshold=45)
    assert outliers.tolist() == [2]  # nearest to e1, 90° from the dominant e2
    torch.testing.assert_close(centres, torch.tensor([[0.0, 0], [1, 0], [0, -1]]))


@pytest.mark.parametrize("name", list(PML_CASES))
def test_a_label_outside_the_classes_is_a_value_error_naming_it(name: str) -> None:
    ours, _ = PML_CASES[name]()
    emb = torch.randn(4, D)
    for bad in (C, -1):
        with pytest.raises(ValueError, match=rf"labels holds {bad}, outside .*\[0, {C}\)"):
            ours(emb, torch.tensor([0, bad, 1, 2]))
    if name.startswith("subcenter"):
        with pytest.raises(ValueError, match=rf"labels holds {C}"):
            ours.get_outliers(emb, torch.tensor([0, C, 1, 2]))


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


def test_p2sgrad_refuses_a_tuple_and_takes_the_run_embedding_size() -> None:
    loss = dl.P2SGradLoss(embedding_size=D, num_classes=C)
    assert loss.weight.shape == (D, C)
    idx = torch.tensor([0, 1])
    with pytest.raises(ValueError, match="does not support indices_tuple"):
        loss(torch.randn(4, D), torch.tensor([0, 1, 0, 1]), (idx, idx, idx))
    with pytest.raises(ValueError, match="descriptors_dim=8 and embedding_size=16 differ"):
        dl.P2SGradLoss(8, C, embedding_size=D)
    with pytest.raises(ValueError, match="needs descriptors_dim"):
        dl.P2SGradLoss(num_classes=C)


def test_p2sgrad_keeps_its_weight_columns_unit_before_each_step() -> None:
    loss = dl.P2SGradLoss(D, C)
    with torch.no_grad():
        loss.weight.mul_(3.0)
    loss(torch.randn(6, D), torch.arange(6))
    torch.testing.assert_close(
        torch.linalg.vector_norm(loss.weight, dim=0), torch.ones(C), rtol=0, atol=1e-6
    )


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_classes": 0, "embedding_size": D}, "num_classes must be a positive integer"),
        ({"num_classes": C, "embedding_size": 2.5}, "embedding_size must be a positive integer"),
        ({"num_classes": C, "embedding_size": D, "margin": 2.5}, "integer angle multiplier"),
        ({"num_classes": C, "embedding_size": D, "margin": 0}, "integer angle multiplier"),
    ],
)
def test_bad_constructor_values_are_value_errors(kwargs, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        dl.LargeMarginSoftmaxLoss(**kwargs)


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: dl.NormalizedSoftmaxLoss(C, D, temperature=0), "temperature must be a positive"),
        (lambda: dl.ArcFaceLoss(0, D), "num_classes must be a positive integer, got 0"),
        (lambda: dl.CosFaceLoss(C, True), "embedding_size must be a positive integer, got True"),
        (lambda: dl.SubCenterArcFaceLoss(C, D, sub_centers=1.5), "sub_centers must be a positive"),
        (lambda: dl.ArcFaceLoss(C, D, scale=0), "scale must be a positive"),
        (lambda: dl.SphereFaceLoss(C, D, scale=-1), "scale must be a positive"),
        (lambda: dl.P2SGradLoss(D, 0), "num_classes must be a positive integer, got 0"),
        (lambda: dl.P2SGradLoss(-2, C), "descriptors_dim must be a positive integer, got -2"),
    ],
)
def test_every_class_refuses_bad_constructor_values(build, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build()


def _takes(cls: type, *names: str) -> bool:
    return any(name in inspect.signature(cls).parameters for name in names)


@pytest.mark.parametrize("loss_cls", list(dl.LOSSES.entries().values()), ids=lambda c: c.__name__)
def test_every_loss_with_a_weight_per_class_shares_one_base(loss_cls) -> None:
    """One base holds what these losses share: the checked sizes, the parameter under PML's
    name initialised by ``weight_init_func`` outside autograd, its cast to the compute dtype,
    the labels, the repr."""
    if not _takes(loss_cls, "num_classes") or not _takes(
        loss_cls, "embedding_size", "descriptors_dim"
    ):
        assert not issubclass(loss_cls, dl.ClassParametersLoss)
        return
    assert issubclass(loss_cls, dl.ClassParametersLoss)
    sizes = (
        {"descriptors_dim": D, "num_classes": C}
        if loss_cls is dl.P2SGradLoss
        else {"num_classes": C, "embedding_size": D}
    )
    loss = loss_cls(**sizes)
    weight = getattr(loss, loss_cls.weight_name)
    assert [p for p in loss.parameters()] == [weight]
    assert weight.dtype == torch.float32 and D in weight.shape
    assert loss.weight_as(torch.zeros(1, D, dtype=torch.float64)).dtype == torch.float64
    assert f"num_classes={C}" in repr(loss)
    if _takes(loss_cls, "weight_init_func"):
        loss = loss_cls(**sizes, weight_init_func=lambda w: w.fill_(0.5))  # in place on a leaf
        assert torch.all(getattr(loss, loss_cls.weight_name) == 0.5)
    with pytest.raises(ValueError, match=rf"labels holds {C}, outside"):
        loss(torch.randn(2, D), torch.tensor([0, C], dtype=torch.int32))


def test_functional_exports_every_formula_module() -> None:
    """``dmlkit.functional`` re-exports the public functions of each of its formula modules
    that declares them (``__all__``)."""
    import importlib
    import pkgutil

    import dmlkit.functional as fn

    declaring = 0
    for info in pkgutil.iter_modules(fn.__path__):
        module = importlib.import_module(f"dmlkit.functional.{info.name}")
        if not hasattr(module, "__all__"):
            continue
        declaring += 1
        missing = set(module.__all__) - set(fn.__all__)
        assert not missing, (module.__name__, missing)
        assert all(getattr(fn, name) is getattr(module, name) for name in module.__all__)
    assert declaring >= 10
    assert fn.tuple_element_weights is fn.masks.tuple_element_weights
    assert fn.sample_triplets is fn.triplets.sample_triplets


def test_margin_classes_require_cosine_similarity() -> None:
    with pytest.raises(ValueError, match="ArcFaceLoss requires CosineSimilarity"):
        dl.ArcFaceLoss(C, D, distance=dd.DotProductSimilarity())
    with pytest.raises(ValueError, match=r"CosFaceLoss computes cosines itself.*power 1"):
        dl.CosFaceLoss(C, D, distance=dd.CosineSimilarity(power=2))
    with pytest.raises(ValueError, match="sub_centers must be a positive integer"):
        dl.SubCenterArcFaceLoss(C, D, sub_centers=0)


@pytest.mark.parametrize("name", sorted({PML_CASES[n]()[0].__class__.__name__ for n in PML_CASES}))
def test_a_run_builds_every_class_from_its_values(name: str) -> None:
    loss = dl.LOSSES.build(Spec(name), "loss", num_classes=C, embedding_size=D)
    (weight,) = loss.parameters()
    assert weight.shape == (D, C * (3 if name == "SubCenterArcFaceLoss" else 1))
    loss(torch.randn(5, D), torch.tensor([0, 1, 2, 3, C - 1])).backward()


@pytest.mark.parametrize("name", WITH_LOGITS)
def test_a_trained_loss_is_a_softmax_classifier_head(name: str) -> None:
    """Trained with a linear embedding layer on 5 classes of features, ``get_logits`` of the
    embeddings classifies new samples of those classes by softmax."""
    g = torch.Generator().manual_seed(0)
    centres = 3 * torch.randn(5, 8, generator=g)
    train_labels, test_labels = torch.arange(100) % 5, torch.arange(50) % 5
    train = centres[train_labels] + torch.randn(100, 8, generator=g)
    test = centres[test_labels] + torch.randn(50, 8, generator=g)
    loss, _ = PML_CASES[name](5, 8)
    embed = torch.nn.Linear(8, 8)
    optimiser = torch.optim.Adam([*loss.parameters(), *embed.parameters()], lr=0.02)
    for _ in range(100):
        optimiser.zero_grad()
        loss(embed(train), train_labels).backward()
        optimiser.step()
    with torch.no_grad():
        probabilities = F.softmax(loss.get_logits(embed(test)), dim=1)
    assert probabilities.shape == (50, 5)
    accuracy = (probabilities.argmax(dim=1) == test_labels).float().mean()
    assert accuracy >= 0.9


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
@given(
    name=st.sampled_from(list(PML_CASES)),
    n=st.integers(1, 24),
    dim=st.integers(2, 8),
    num_classes=st.integers(1, 6),
    layout=st.sampled_from(["random", "one_class", "singletons"]),
    spread=st.sampled_from([0.0, 0.5, 2.0]),
    seed=st.integers(0, 2**31 - 1),
)
def test_matches_pml_on_random_batches(
    name: str, n: int, dim: int, num_classes: int, layout: str, spread: float, seed: int
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
    assert_matches_pml(ours, theirs, emb, labels)


def test_large_margin_psi_is_the_papers_piecewise_function() -> None:
    """ψ(θ) = (−1)^k cos(mθ) − 2k on [kπ/m, (k+1)π/m], against cos of the angle itself."""
    from dmlkit.functional.classification import multiplicative_angular_margin

    theta = torch.linspace(0, math.pi, 181, dtype=torch.float64)[:-1]
    for m in (1, 2, 3, 4):
        k = torch.floor(theta * m / math.pi)
        expected = (-1) ** k * torch.cos(m * theta) - 2 * k
        torch.testing.assert_close(multiplicative_angular_margin(torch.cos(theta), m), expected)
        assert bool((torch.diff(expected) < 0).all())  # monotonically decreasing


def test_p2sgrad_can_be_called_twice_before_one_backward() -> None:
    """The projection of the weight must not invalidate the graph of an earlier call."""
    loss = dl.P2SGradLoss(D, C)
    x1, x2 = torch.randn(6, D, requires_grad=True), torch.randn(6, D, requires_grad=True)
    (loss(x1, torch.arange(6)) + loss(x2, torch.arange(6))).backward()
    assert x1.grad is not None and x2.grad is not None and loss.weight.grad is not None


@pytest.mark.parametrize(
    "cls", [dl.LargeMarginSoftmaxLoss, dl.SphereFaceLoss, dl.ArcFaceLoss, dl.CosFaceLoss]
)
def test_the_fused_target_margin_backward_can_run_twice_but_not_twice_differentiated(cls):
    loss = cls(C, D).double()
    x = torch.randn(8, D, dtype=torch.float64, requires_grad=True)
    value = loss(x, torch.arange(8) % C)
    (first,) = torch.autograd.grad(value, x, retain_graph=True)
    (second,) = torch.autograd.grad(value, x, retain_graph=True)
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    (grad,) = torch.autograd.grad(value, x, create_graph=True)
    with pytest.raises(RuntimeError):
        grad.sum().backward()


def test_the_fused_target_margin_matches_a_plain_autograd_margin() -> None:
    """with_target_margin against the margin applied through a plain scatter, gradients for
    the logits and the magnitudes included (gradcheck-level agreement in float64)."""
    from dmlkit.functional.classification import with_target_margin

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(7, 5, dtype=torch.float64, generator=g).requires_grad_(True)
    magnitudes = (torch.rand(7, dtype=torch.float64, generator=g) + 0.5).requires_grad_(True)
    labels = torch.tensor([0, 1, 4, 4, 2, 3, 0])

    def margin(t, m):
        return torch.cos(torch.acos((t / m).clamp(-1, 1)) + 0.3) * m

    assert torch.autograd.gradcheck(
        lambda lo, ma: with_target_margin(lo, labels, margin, ma), (logits, magnitudes)
    )
