"""VICRegLoss, SelfSupervisedLoss and MultipleLosses agree with PML 2.9 in value and gradient
(of both views, and of a wrapped loss's parameters), refuse what PML refuses with a ValueError
naming the problem, and wrap any loss with PML's call contract."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import dmlkit.losses as dl
import dmlkit.miners as dm
import dmlkit.reducers as dr
import dmlkit.regularizers as dg
from conftest import assert_close
from dmlkit.functional.self_supervised import vicreg_loss, vicreg_statistics
from dmlkit.losses import LOSSES
from dmlkit.losses.self_supervised import VICRegLoss
from dmlkit.losses.wrappers import MultipleLosses, SelfSupervisedLoss
from dmlkit.registry import Spec

pl = pytest.importorskip("pytorch_metric_learning.losses")
pm = pytest.importorskip("pytorch_metric_learning.miners")
pr = pytest.importorskip("pytorch_metric_learning.reducers")
pg = pytest.importorskip("pytorch_metric_learning.regularizers")

from test_pml_parity import LAYOUTS, _as_set, _make, _pml_would_zero  # noqa: E402
from user_parts import CentroidLoss, HardestPairMiner  # noqa: E402

DTYPES = pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])


def _grads(call: Callable[..., Tensor], tensors: Sequence[Tensor], dtype: torch.dtype):
    leaves = [t.to(dtype).clone().requires_grad_(True) for t in tensors]
    value = call(*leaves)
    grads = torch.autograd.grad(value, leaves, allow_unused=True)
    return value.detach(), [
        torch.zeros_like(x) if g is None else g for x, g in zip(leaves, grads, strict=True)
    ]


def assert_same_as_pml(
    ours: Callable[..., Tensor],
    theirs: Callable[..., Tensor],
    tensors: Sequence[Tensor],
    dtype: torch.dtype,
) -> None:
    """dmlkit's call in ``dtype`` against PML's in float64: the value and the gradient of every
    tensor, within conftest's 1e-5 relative rule."""
    inputs = [t.to(dtype) for t in tensors]  # PML gets the same values, in float64
    value, grads = _grads(ours, inputs, dtype)
    expected, expected_grads = _grads(theirs, inputs, torch.float64)
    assert value.dtype == dtype and torch.isfinite(value)
    assert_close(value, expected)
    for grad, expected_grad in zip(grads, expected_grads, strict=True):
        assert_close(grad, expected_grad)


def _views(n: int, d: int, seed: int = 0, noise: float = 0.4) -> tuple[Tensor, Tensor]:
    """Two views of n inputs, float64: columns of spread scales (variances on both sides of 1,
    so the variance hinge is active for some), correlated columns, a noisy second view."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, d, generator=g, dtype=torch.float64)
    base = base @ (
        torch.eye(d, dtype=torch.float64) + 0.3 * torch.randn(d, d, generator=g).double()
    )
    scales = torch.logspace(-0.7, 0.4, d, dtype=torch.float64)
    emb = base * scales
    return emb, emb + noise * torch.randn(n, d, generator=g, dtype=torch.float64)


# ------------------------------------------------------------------------------------ VICReg

# (N, D): D ≤ 2N takes the D × D covariance, D > 2N the N × N product; the sizes of
# test_pml_parity's layouts; the smallest batch; one dimension.
VICREG_SHAPES = [(2, 3), (12, 16), (16, 32), (16, 33), (5, 64), (48, 16), (128, 8), (20, 1)]

REDUCERS = {
    "mean": (lambda: None, lambda: None),
    "sum": (dr.SumReducer, pr.SumReducer),
    "avg_non_zero": (dr.AvgNonZeroReducer, pr.AvgNonZeroReducer),
    "threshold": (
        lambda: dr.ThresholdReducer(low=0.5, high=12.0),
        lambda: pr.ThresholdReducer(low=0.5, high=12.0),
    ),
}


def _vicreg_pair(reducer: str, **options: float) -> tuple[VICRegLoss, nn.Module]:
    ours, theirs = (make() for make in REDUCERS[reducer])
    return (
        VICRegLoss(**options, reducer=ours),
        pl.VICRegLoss(**options, **({} if theirs is None else {"reducer": theirs})),
    )


@DTYPES
@pytest.mark.parametrize("reducer", list(REDUCERS))
@pytest.mark.parametrize("shape", VICREG_SHAPES, ids=str)
def test_vicreg_matches_pml(shape: tuple[int, int], reducer: str, dtype: torch.dtype) -> None:
    emb, ref = _views(*shape)
    for options in (
        {},
        {"invariance_lambda": 3, "variance_mu": 7.5, "covariance_v": 4, "eps": 1e-2},
    ):
        ours, theirs = _vicreg_pair(reducer, **options)
        assert_same_as_pml(
            lambda e, r, loss=ours: loss(e, ref_emb=r),
            lambda e, r, loss=theirs: loss(e, ref_emb=r),
            (emb, ref),
            dtype,
        )


@DTYPES
@pytest.mark.parametrize("shape", VICREG_SHAPES, ids=str)
def test_vicreg_without_ref_emb_is_the_embeddings_against_themselves(
    shape: tuple[int, int], dtype: torch.dtype
) -> None:
    emb, _ = _views(*shape)
    assert_same_as_pml(VICRegLoss(), pl.VICRegLoss(), (emb,), dtype)


@DTYPES
@pytest.mark.parametrize("layout", [name for name, (_, ref) in LAYOUTS.items() if ref is None])
def test_vicreg_matches_pml_on_the_parity_layouts(layout: str, dtype: torch.dtype) -> None:
    """The embeddings of test_pml_parity's layouts (clustered by label) as first views."""
    labels, _ = LAYOUTS[layout]
    emb, _ = _make(labels, None, torch.float64)
    ref = emb + 0.3 * torch.randn(emb.shape, dtype=torch.float64)
    assert_same_as_pml(
        lambda e, r: VICRegLoss()(e, ref_emb=r),
        lambda e, r: pl.VICRegLoss()(e, ref_emb=r),
        (emb, ref),
        dtype,
    )


@pytest.mark.parametrize("n, d", [(64, 64), (64, 129), (32, 200)])
def test_vicreg_float32_on_decorrelated_views(n: int, d: int) -> None:
    """Where the covariance term is smallest next to the variances: orthogonal columns of
    variance 1 (D ≤ N), or standardised columns (D > 2N, where the N × N product subtracts the
    squared diagonal); float32 still agrees with PML's float64 value."""
    g = torch.Generator().manual_seed(5)
    if d <= n:
        q, _ = torch.linalg.qr(torch.randn(n, d, generator=g, dtype=torch.float64))
        emb = (q - q.mean(0)) * (n - 1) ** 0.5
    else:
        emb = torch.randn(n, d, generator=g, dtype=torch.float64)
        emb = (emb - emb.mean(0)) / emb.std(0)
    ref = emb + 0.05 * torch.randn(n, d, generator=g, dtype=torch.float64)
    assert_same_as_pml(
        lambda e, r: VICRegLoss()(e, ref_emb=r),
        lambda e, r: pl.VICRegLoss()(e, ref_emb=r),
        (emb, ref),
        torch.float32,
    )


@settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
@given(
    n=st.integers(2, 24),
    d=st.integers(1, 60),
    seed=st.integers(0, 2**31 - 1),
    noise=st.sampled_from([0.0, 0.1, 1.0]),
    with_ref=st.booleans(),
    reducer=st.sampled_from(list(REDUCERS)),
)
def test_vicreg_matches_pml_on_random_views(
    n: int, d: int, seed: int, noise: float, with_ref: bool, reducer: str
) -> None:
    emb, ref = _views(n, d, seed, noise)
    ours, theirs = _vicreg_pair(reducer)
    if with_ref:
        assert_same_as_pml(
            lambda e, r: ours(e, ref_emb=r),
            lambda e, r: theirs(e, ref_emb=r),
            (emb, ref),
            emb.dtype,
        )
    else:
        assert_same_as_pml(ours, theirs, (emb,), emb.dtype)


@pytest.mark.parametrize("n, d", [(6, 3), (6, 12), (6, 13), (3, 40), (2, 1)])
def test_vicreg_statistics_match_brute_force(n: int, d: int) -> None:
    """Both products (D ≤ 2N: D × D; D > 2N: N × N): every statistic's value, and the gradient
    of a combination weighing each entry differently, for two views and for one view twice."""
    g = torch.Generator().manual_seed(n * 100 + d)
    emb = torch.randn(n, d, generator=g, dtype=torch.float64).requires_grad_(True)
    ref = torch.randn(n, d, generator=g, dtype=torch.float64).requires_grad_(True)
    weights = [
        torch.randn(shape, generator=g, dtype=torch.float64) for shape in [(n,), (2, d), (2,)]
    ]

    def brute_force(e: Tensor, r: Tensor) -> list[Tensor]:
        views = torch.stack((e, r))
        centred = views - views.mean(1, keepdim=True)
        gram = centred.transpose(1, 2) @ centred
        off = (gram * ~torch.eye(d, dtype=torch.bool)).square().sum((1, 2))
        return [((e - r) ** 2).mean(1), views.var(1), off]

    for second in (ref, emb):
        stats = vicreg_statistics(emb, second)
        expected = brute_force(emb, second)
        for value, reference in zip(stats, expected, strict=True):
            assert_close(value, reference)
        combine = lambda values: sum((w * v).sum() for w, v in zip(weights, values, strict=True))  # noqa: E731
        grads = torch.autograd.grad(combine(stats), (emb, ref), allow_unused=True)
        expected_grads = torch.autograd.grad(combine(expected), (emb, ref), allow_unused=True)
        for grad, reference in zip(grads, expected_grads, strict=True):
            if reference is None:
                assert grad is None or not grad.any()
            else:
                assert_close(grad, reference)


def test_vicreg_loss_function_is_the_class() -> None:
    emb, ref = _views(10, 6)
    reducer = dr.MeanReducer()
    value = vicreg_loss(emb, ref, 25, 25, 1, 1e-4, reducer)
    assert_close(value, VICRegLoss()(emb, ref_emb=ref))
    # Each weight scales its own term: λ only the invariance, which is zero for equal views.
    assert_close(
        vicreg_loss(emb, emb, 1e3, 25, 1, 1e-4, reducer),
        vicreg_loss(emb, emb, 0, 25, 1, 1e-4, reducer),
    )
    assert vicreg_loss(emb, ref, 26, 25, 1, 1e-4, reducer) > value


@DTYPES
def test_vicreg_embedding_regularizer_is_added_where_pml_refuses_one(dtype: torch.dtype) -> None:
    """dmlkit applies it to ``embeddings`` as every dmlkit loss does; the oracle is PML's VICReg
    plus PML's regulariser of the embeddings."""
    with pytest.raises(ValueError, match="cannot use a regularizer"):
        pl.VICRegLoss(embedding_regularizer=pg.LpRegularizer())
    emb, ref = _views(12, 6)
    ours = VICRegLoss(embedding_regularizer=dg.LpRegularizer(), embedding_reg_weight=0.3)
    assert "embedding_reg_weight=0.3" in repr(ours)
    assert_same_as_pml(
        lambda e, r: ours(e, ref_emb=r),
        lambda e, r: pl.VICRegLoss()(e, ref_emb=r) + 0.3 * pg.LpRegularizer()(e),
        (emb, ref),
        dtype,
    )


def test_vicreg_divisor_reducer_is_refused() -> None:
    emb, ref = _views(8, 4)
    with pytest.raises(ValueError, match="DivisorReducer divides by a count"):
        VICRegLoss(reducer=dr.DivisorReducer())(emb, ref_emb=ref)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_vicreg_half_precision_is_computed_in_float32(dtype: torch.dtype) -> None:
    emb, ref = (t.to(dtype) for t in _views(32, 16))
    leaf = emb.clone().requires_grad_(True)
    loss = VICRegLoss()(leaf, ref_emb=ref)
    assert loss.dtype == dtype and torch.isfinite(loss)
    loss.backward()
    assert leaf.grad is not None and torch.isfinite(leaf.grad).all()
    torch.testing.assert_close(
        loss.float(), VICRegLoss()(emb.float(), ref_emb=ref.float()), rtol=1e-2, atol=0
    )


def test_vicreg_refuses_what_pml_refuses_and_more() -> None:
    emb, ref = _views(8, 4)
    loss = VICRegLoss()
    labels = torch.arange(8)
    with pytest.raises(ValueError, match=r"takes no labels.*ref_emb=ref_emb"):
        loss(emb, ref)  # the second view passed where PML's call has labels
    with pytest.raises(ValueError, match="takes no labels"):
        loss(emb, labels, ref_emb=ref)
    with pytest.raises(ValueError, match="takes no labels"):
        loss(emb, ref_emb=ref, ref_labels=labels)
    pair = (labels[:2], labels[2:4], labels[:2], labels[4:6])
    with pytest.raises(ValueError, match="does not support indices_tuple"):
        loss(emb, None, pair, ref)
    with pytest.raises(ValueError, match="does not support anchor_in_ref"):
        loss(emb, ref_emb=ref, anchor_in_ref=labels)
    with pytest.raises(
        ValueError, match=r"ref_emb has shape \(7, 4\) but embeddings have \(8, 4\)"
    ):
        loss(emb, ref_emb=ref[:7])
    with pytest.raises(ValueError, match=r"ref_emb has shape \(8, 3\)"):
        loss(emb, ref_emb=ref[:, :3])
    with pytest.raises(ValueError, match="must match embeddings"):
        loss(emb, ref_emb=ref.float())
    with pytest.raises(ValueError, match=r"at least 2 embeddings.*got 1"):
        loss(emb[:1], ref_emb=ref[:1])
    with pytest.raises(ValueError, match=r"at least 2 embeddings.*got 0"):
        loss(emb[:0])
    bad = ref.clone()
    bad[2, 1] = float("nan")
    with pytest.raises(ValueError, match="ref_emb contains non-finite"):
        loss(emb, ref_emb=bad)
    with pytest.raises(ValueError, match="embeddings must be 2-D"):
        loss(emb[0], ref_emb=ref[0])
    with pytest.raises(TypeError, match=r"embeddings must be a torch\.Tensor"):
        loss(emb.tolist())
    # PML raises ValueError for a distance; here it is not a parameter.
    with pytest.raises(TypeError, match="distance"):
        VICRegLoss(distance=None)  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="cannot use a distance"):
        pl.VICRegLoss(distance=None)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"eps": 0}, "eps must be a positive number"),
        ({"eps": float("nan")}, "eps must be a positive number"),
        ({"invariance_lambda": -1}, "invariance_lambda must be a non-negative number"),
        ({"variance_mu": float("inf")}, "variance_mu must be a non-negative number"),
        ({"covariance_v": True}, "covariance_v must be a non-negative number"),
        ({"covariance_v": "1"}, "covariance_v must be a non-negative number"),
    ],
)
def test_vicreg_refuses_bad_options(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        VICRegLoss(**options)


def test_vicreg_zero_weights_leave_terms_out_and_repr_shows_the_options() -> None:
    emb, ref = _views(8, 4)
    assert VICRegLoss(0, 0, 0)(emb, ref_emb=ref).item() == 0.0
    text = repr(VICRegLoss(invariance_lambda=3, reducer=dr.SumReducer()))
    assert "invariance_lambda=3.0" in text and "eps=0.0001" in text and "SumReducer" in text


def test_vicreg_is_a_loss_but_not_registered() -> None:
    """Registered losses are called with labels (by the trainer and the registry-wide tests);
    VICReg refuses them, so it is not in the registry."""
    assert isinstance(VICRegLoss(), dl.BaseMetricLossFunction)
    assert "VICRegLoss" not in LOSSES.names()


# ------------------------------------------------------------------------ SelfSupervisedLoss

SSL_CASES: dict[str, tuple[Callable[[], nn.Module], Callable[[], nn.Module]]] = {
    "contrastive": (dl.ContrastiveLoss, pl.ContrastiveLoss),
    "contrastive_margins": (
        lambda: dl.ContrastiveLoss(pos_margin=0.1, neg_margin=0.8),
        lambda: pl.ContrastiveLoss(pos_margin=0.1, neg_margin=0.8),
    ),
    "triplet": (
        lambda: dl.TripletMarginLoss(margin=0.2),
        lambda: pl.TripletMarginLoss(margin=0.2),
    ),
    "ntxent": (dl.NTXentLoss, pl.NTXentLoss),
    "ntxent_warm": (lambda: dl.NTXentLoss(temperature=0.5), lambda: pl.NTXentLoss(temperature=0.5)),
    "multi_similarity": (dl.MultiSimilarityLoss, pl.MultiSimilarityLoss),
    "supcon": (dl.SupConLoss, pl.SupConLoss),
    "circle": (dl.CircleLoss, pl.CircleLoss),
    "lifted": (dl.LiftedStructureLoss, pl.LiftedStructureLoss),
    "generalized_lifted": (dl.GeneralizedLiftedStructureLoss, pl.GeneralizedLiftedStructureLoss),
    "snr_contrastive": (
        dl.SignalToNoiseRatioContrastiveLoss,
        pl.SignalToNoiseRatioContrastiveLoss,
    ),
    "nca": (dl.NCALoss, pl.NCALoss),
}


@DTYPES
@pytest.mark.parametrize("symmetric", [True, False], ids=["symmetric", "one_way"])
@pytest.mark.parametrize("n", [4, 12, 32])
@pytest.mark.parametrize("name", list(SSL_CASES))
def test_self_supervised_matches_pml(
    name: str, n: int, symmetric: bool, dtype: torch.dtype
) -> None:
    ours_loss, theirs_loss = (make() for make in SSL_CASES[name])
    ours, theirs = (
        SelfSupervisedLoss(ours_loss, symmetric),
        pl.SelfSupervisedLoss(theirs_loss, symmetric),
    )
    emb, ref = _views(n, 16, seed=n)
    assert_same_as_pml(ours, theirs, (emb, ref), dtype)


def test_self_supervised_covers_every_loss_pml_supports_that_dmlkit_has_at_hand() -> None:
    """The parity cases wrap each of PML's supported losses that existed when these tests were
    written; a supported loss registered since then is still wrapped and runs."""
    compared = {type(make()).__name__ for make, _ in SSL_CASES.values()}
    emb, ref = _views(8, 6)
    for name in pl.SelfSupervisedLoss.supported_losses():
        if name in compared or name not in LOSSES.names():
            continue
        for symmetric in (True, False):
            value = SelfSupervisedLoss(LOSSES.build(name), symmetric)(emb, ref)
            assert value.ndim == 0 and torch.isfinite(value)


class _UserContrastive(dl.ContrastiveLoss):
    """A user's subclass: PML's wrapper refuses it by class name."""


class _UserSquaredDifference(dl.BaseMetricLossFunction):
    """A user's loss from the base class: mean squared distance of the positive pairs."""

    def compute_loss(self, batch) -> Tensor:
        pos, _ = batch.label_weights()
        ref = batch.embeddings if batch.ref_emb is None else batch.ref_emb
        dist = torch.cdist(batch.embeddings, ref).square()
        return (dist * pos).sum() / pos.sum()


@DTYPES
@pytest.mark.parametrize("symmetric", [True, False], ids=["symmetric", "one_way"])
def test_self_supervised_wraps_a_users_subclass(symmetric: bool, dtype: torch.dtype) -> None:
    with pytest.raises(Exception, match="not supported for _UserContrastive"):
        pl.SelfSupervisedLoss(_UserContrastive(), symmetric)
    emb, ref = _views(12, 8)
    assert_same_as_pml(
        SelfSupervisedLoss(_UserContrastive(pos_margin=0.1), symmetric),
        pl.SelfSupervisedLoss(pl.ContrastiveLoss(pos_margin=0.1), symmetric),
        (emb, ref),
        dtype,
    )
    # A loss written from the base class: the positive pairs are exactly the two views.
    value = SelfSupervisedLoss(_UserSquaredDifference(), symmetric)(emb, ref)
    assert_close(value, (emb - ref).square().sum(1).mean())


@DTYPES
@pytest.mark.parametrize(
    "name",
    ["NPairsLoss", "FastAPLoss", "MarginLoss"],
)
def test_self_supervised_wraps_losses_pml_does_not_list(name: str, dtype: torch.dtype) -> None:
    """PML's wrapper refuses these; its losses, given the labels the wrapper builds, are the
    oracle."""
    with pytest.raises(Exception, match=f"not supported for {name}"):
        pl.SelfSupervisedLoss(getattr(pl, name)())
    emb, ref = _views(10, 8)
    labels = torch.arange(10).repeat(2)
    assert_same_as_pml(
        SelfSupervisedLoss(getattr(dl, name)()),
        lambda e, r: getattr(pl, name)()(torch.cat((e, r)), labels),
        (emb, ref),
        dtype,
    )


def test_self_supervised_refuses_losses_it_cannot_give_labels() -> None:
    with pytest.raises(ValueError, match="does not wrap VICRegLoss"):
        SelfSupervisedLoss(VICRegLoss())
    with pytest.raises(ValueError, match=r"cannot wrap ProxyAnchorLoss .*num_classes=8"):
        SelfSupervisedLoss(dl.ProxyAnchorLoss(8, 4))
    with pytest.raises(ValueError, match=r"cannot wrap MarginLoss .*num_classes=5"):
        SelfSupervisedLoss(dl.MarginLoss(num_classes=5))
    with pytest.raises(ValueError, match="NPairsLoss does not support; use symmetric=True"):
        SelfSupervisedLoss(dl.NPairsLoss(), symmetric=False)
    with pytest.raises(ValueError, match="loss must be a loss module, got function"):
        SelfSupervisedLoss(lambda e, y: e.sum())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="symmetric must be a bool"):
        SelfSupervisedLoss(dl.NTXentLoss(), symmetric="yes")  # type: ignore[arg-type]


def test_self_supervised_checks_the_views() -> None:
    emb, ref = _views(8, 4)
    loss = SelfSupervisedLoss(dl.NTXentLoss())
    with pytest.raises(
        ValueError, match=r"ref_emb has shape \(6, 4\) but embeddings have \(8, 4\)"
    ):
        loss(emb, ref[:6])
    with pytest.raises(ValueError, match="must match embeddings"):
        loss(emb, ref.float())
    with pytest.raises(ValueError, match="embeddings must be 2-D"):
        loss(emb[0], ref[0])
    bad = ref.clone()
    bad[0, 0] = float("inf")
    with pytest.raises(ValueError, match="ref_emb contains non-finite"):
        loss(emb, bad)
    with pytest.raises(TypeError):
        loss(emb)  # type: ignore[call-arg]


def test_self_supervised_from_a_config_by_import_path() -> None:
    """Not registered (it takes two views, not labels), but a config names it by import path
    and its loss by a nested spec."""
    assert "SelfSupervisedLoss" not in LOSSES.names()
    spec = Spec(
        "dmlkit.losses.wrappers:SelfSupervisedLoss",
        {"loss": {"name": "NTXentLoss", "options": {"temperature": 0.2}}, "symmetric": False},
    )
    loss = LOSSES.build(spec)
    assert isinstance(loss.loss, dl.NTXentLoss) and loss.loss.temperature == 0.2
    emb, ref = _views(8, 4)
    assert_close(
        loss(emb, ref), pl.SelfSupervisedLoss(pl.NTXentLoss(temperature=0.2), False)(emb, ref)
    )


# ---------------------------------------------------------------------------- MultipleLosses

LOSS_PAIRS: dict[str, tuple[Callable[[], nn.Module], Callable[[], nn.Module]]] = {
    "contrastive": (dl.ContrastiveLoss, pl.ContrastiveLoss),
    "triplet": (lambda: dl.TripletMarginLoss(margin=0.2), lambda: pl.TripletMarginLoss(margin=0.2)),
    "ntxent": (lambda: dl.NTXentLoss(temperature=0.3), lambda: pl.NTXentLoss(temperature=0.3)),
    "multi_similarity": (dl.MultiSimilarityLoss, pl.MultiSimilarityLoss),
}

MINER_PAIRS: dict[str, tuple[Callable[[], nn.Module], Callable[[], nn.Module]]] = {
    "ms": (
        lambda: dm.MultiSimilarityMiner(epsilon=0.2),
        lambda: pm.MultiSimilarityMiner(epsilon=0.2),
    ),
    "semihard": (
        lambda: dm.TripletMarginMiner(margin=0.3, type_of_triplets="semihard"),
        lambda: pm.TripletMarginMiner(margin=0.3, type_of_triplets="semihard"),
    ),
    "batch_hard": (dm.BatchHardMiner, pm.BatchHardMiner),
    "pair_margin": (dm.PairMarginMiner, pm.PairMarginMiner),
}

# (losses, miners (None: no miner for that loss), weights), one entry per loss.
COMBINATIONS = {
    "two_plain": (["contrastive", "triplet"], None, None),
    "four_mined_weighted": (
        ["contrastive", "triplet", "ntxent", "multi_similarity"],
        ["ms", "semihard", None, "batch_hard"],
        [0.5, 2.0, 1.5, 0.25],
    ),
    "one_mined": (["ntxent", "multi_similarity"], [None, "pair_margin"], [1.0, 3.0]),
}


def _multiple(side: int, combination: str, as_dict: bool) -> nn.Module:
    """The combination built from dmlkit's parts (side 0) or PML's (side 1)."""
    names, miners, weights = COMBINATIONS[combination]
    losses = [LOSS_PAIRS[name][side]() for name in names]
    mined = None if miners is None else [m and MINER_PAIRS[m][side]() for m in miners]
    cls = MultipleLosses if side == 0 else pl.MultipleLosses
    if not as_dict:
        return cls(losses, mined, weights)
    keys = [f"{name}_{i}" for i, name in enumerate(names)]
    return cls(
        dict(zip(keys, losses, strict=True)),
        None
        if mined is None
        else {k: m for k, m in zip(keys, mined, strict=True) if m is not None},
        None if weights is None else dict(zip(keys, weights, strict=True)),
    )


def _pml_zeroes_a_term(combination: str, emb: Tensor, labels: Tensor) -> bool:
    """Whether one of PML's terms is 0 (or NaN) where dmlkit computes the loss (documented in
    test_pml_parity): such layouts are not compared."""
    names, miners, _ = COMBINATIONS[combination]
    for i, name in enumerate(names):
        miner = None if miners is None else miners[i]
        indices = None if miner is None else MINER_PAIRS[miner][1]()(emb, labels)
        if _pml_would_zero(indices, LOSS_PAIRS[name][1](), labels):
            return True
    return False


def _miners_disagree(combination: str, emb: Tensor, labels: Tensor) -> bool:
    """Whether a dmlkit miner, on embeddings in their own dtype, mines another set than PML's
    on the same values in float64: a near tie that float32 rounding breaks the other way."""
    _, miners, _ = COMBINATIONS[combination]
    for miner in miners or []:
        if miner is not None:
            ours, theirs = (make() for make in MINER_PAIRS[miner])
            if _as_set(ours(emb, labels)) != _as_set(theirs(emb.double(), labels)):
                return True
    return False


@DTYPES
@pytest.mark.parametrize("as_dict", [False, True], ids=["list", "dict"])
@pytest.mark.parametrize("combination", list(COMBINATIONS))
@pytest.mark.parametrize("layout", [name for name, (_, ref) in LAYOUTS.items() if ref is None])
def test_multiple_losses_match_pml(
    layout: str, combination: str, as_dict: bool, dtype: torch.dtype
) -> None:
    labels, _ = LAYOUTS[layout]
    emb, _ = _make(labels, None, torch.float64)
    if _pml_zeroes_a_term(combination, emb, labels):
        pytest.skip("one of PML's losses is 0 or NaN here, not the loss")
    if _miners_disagree(combination, emb.to(dtype), labels):
        pytest.skip("a miner picks otherwise on float32-rounded distances (a near tie)")
    ours, theirs = _multiple(0, combination, as_dict), _multiple(1, combination, as_dict)
    assert_same_as_pml(lambda e: ours(e, labels), lambda e: theirs(e, labels), (emb,), dtype)


@DTYPES
@pytest.mark.parametrize("miner", ["ms", "semihard", "batch_hard"])
def test_multiple_losses_pass_the_calls_indices_tuple_on(miner: str, dtype: torch.dtype) -> None:
    labels, _ = LAYOUTS["pk_batch"]
    emb, _ = _make(labels, None, torch.float64)
    indices = MINER_PAIRS[miner][1]()(emb, labels)
    ours, theirs = _multiple(0, "two_plain", False), _multiple(1, "two_plain", False)
    assert_same_as_pml(
        lambda e: ours(e, labels, indices), lambda e: theirs(e, labels, indices), (emb,), dtype
    )
    # Without labels: the tuple alone says which pairs count.
    assert_same_as_pml(
        lambda e: ours(e, None, indices), lambda e: theirs(e, None, indices), (emb,), dtype
    )


@DTYPES
def test_multiple_losses_with_parameters_match_pml(dtype: torch.dtype) -> None:
    """A loss with parameters inside: PML's state_dict loads as is (the same keys), and the
    parameters' gradients agree."""
    labels, _ = LAYOUTS["pk_batch"]
    emb, _ = _make(labels, None, torch.float64)
    theirs = pl.MultipleLosses(
        {"proxy": pl.ProxyAnchorLoss(8, 16), "contrastive": pl.ContrastiveLoss()},
        miners={"contrastive": pm.MultiSimilarityMiner(epsilon=0.2)},
        weights={"proxy": 0.3, "contrastive": 1.0},
    ).double()
    ours = MultipleLosses(
        {"proxy": dl.ProxyAnchorLoss(8, 16), "contrastive": dl.ContrastiveLoss()},
        miners={"contrastive": dm.MultiSimilarityMiner(epsilon=0.2)},
        weights={"proxy": 0.3, "contrastive": 1.0},
    ).to(dtype)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    ours.load_state_dict(theirs.state_dict())
    assert_same_as_pml(lambda e: ours(e, labels), lambda e: theirs(e, labels), (emb,), dtype)
    ours.zero_grad()
    theirs.zero_grad()
    ours(emb.to(dtype), labels).backward()
    theirs(emb, labels).backward()
    assert_close(ours.losses["proxy"].proxies.grad, theirs.losses["proxy"].proxies.grad)


@DTYPES
@pytest.mark.parametrize("with_miners", [False, True], ids=["all_pairs", "mined"])
def test_multiple_losses_pass_the_reference_set_on(with_miners: bool, dtype: torch.dtype) -> None:
    """Beyond PML's call: ref_emb and ref_labels reach every loss and miner; the oracle is the
    weighted sum of PML's losses called with the reference set (and PML-mined tuples)."""
    labels, ref_labels = LAYOUTS["ref_set"]
    emb, ref = _make(labels, ref_labels, torch.float64)
    names, weights = ["contrastive", "triplet", "multi_similarity"], [0.5, 2.0, 1.0]
    miners = ["ms", "semihard", None] if with_miners else [None] * 3
    ours = MultipleLosses(
        [LOSS_PAIRS[n][0]() for n in names],
        [m and MINER_PAIRS[m][0]() for m in miners] if with_miners else None,
        weights,
    )

    def oracle(e: Tensor, r: Tensor) -> Tensor:
        total = torch.zeros((), dtype=e.dtype)
        for name, miner, weight in zip(names, miners, weights, strict=True):
            indices = None if miner is None else MINER_PAIRS[miner][1]()(e, labels, r, ref_labels)
            total = total + weight * LOSS_PAIRS[name][1]()(e, labels, indices, r, ref_labels)
        return total

    assert_same_as_pml(
        lambda e, r: ours(e, labels, ref_emb=r, ref_labels=ref_labels), oracle, (emb, ref), dtype
    )


def test_multiple_losses_pass_anchor_in_ref_on() -> None:
    labels, _ = LAYOUTS["pk_batch"]
    emb, _ = _make(labels, None, torch.float64)
    memory = torch.cat((emb, emb.flip(0)))
    memory_labels = torch.cat((labels, labels.flip(0)))
    itself = torch.arange(len(labels))
    parts = [dl.ContrastiveLoss(), dl.TripletMarginLoss()]
    miner = dm.MultiSimilarityMiner(epsilon=0.2)
    value = MultipleLosses(parts, [miner, None], [1.0, 0.5])(
        emb, labels, None, memory, memory_labels, itself
    )
    indices = miner(emb, labels, memory, memory_labels, itself)
    expected = parts[0](emb, labels, indices, memory, memory_labels, itself) + 0.5 * parts[1](
        emb, labels, None, memory, memory_labels, itself
    )
    assert_close(value, expected)
    # anchor_in_ref changes the value: the anchors' own copies are left out.
    assert not torch.isclose(
        value, MultipleLosses(parts, None, [1.0, 0.5])(emb, labels, None, memory, memory_labels)
    )


def test_multiple_losses_take_a_users_loss_and_miner_with_pmls_narrower_call() -> None:
    """user_parts' loss takes (embeddings, labels, indices_tuple) and its miner (embeddings,
    labels): MultipleLosses calls them as PML does."""
    labels, _ = LAYOUTS["pk_batch"]
    emb, _ = _make(labels, None, torch.float32)
    centroid, miner = CentroidLoss(8, 16), HardestPairMiner()
    contrastive, user = dl.ContrastiveLoss(), _UserSquaredDifference()
    value = MultipleLosses(
        {"centroid": centroid, "contrastive": contrastive, "user": user},
        miners={"contrastive": miner},
        weights={"centroid": 2.0, "contrastive": 1.0, "user": 0.1},
    )(emb, labels)
    expected = (
        2.0 * centroid(emb, labels)
        + contrastive(emb, labels, miner(emb, labels))
        + 0.1 * user(emb, labels)
    )
    assert_close(value, expected)


def test_multiple_losses_refuse_bad_arguments() -> None:
    ntx, con = dl.NTXentLoss(), dl.ContrastiveLoss()
    miner = dm.BatchHardMiner()
    cases = [
        (lambda: MultipleLosses([]), "at least one loss"),
        (lambda: MultipleLosses({}), "at least one loss"),
        (lambda: MultipleLosses(ntx), "losses must be a list, tuple or dict, got NTXentLoss"),  # type: ignore[arg-type]
        (lambda: MultipleLosses([ntx, "x"]), r"losses\[1\] must be a loss module, got str"),  # type: ignore[list-item]
        (lambda: MultipleLosses({"a": 3}), r"losses\['a'\] must be a loss module, got int"),  # type: ignore[dict-item]
        (
            lambda: MultipleLosses([ntx, con], [miner]),
            r"miners must have one entry per loss \(2\), got 1",
        ),
        (lambda: MultipleLosses([ntx, con], {"a": miner}), "miners must be a list or tuple"),
        (lambda: MultipleLosses([ntx, con], [miner, 4]), r"miners\[1\] must be a miner module"),  # type: ignore[list-item]
        (lambda: MultipleLosses({"a": ntx}, [miner]), "miners must be a dict"),
        (
            lambda: MultipleLosses({"a": ntx}, {"b": miner}),
            "miners has key 'b', which names no loss",
        ),
        (lambda: MultipleLosses([ntx, con], None, [1.0]), "weights must have one entry per loss"),
        (
            lambda: MultipleLosses([ntx, con], None, [1.0, "2"]),
            r"weights\[1\] must be a finite number",
        ),  # type: ignore[list-item]
        (
            lambda: MultipleLosses([ntx, con], None, [1.0, float("nan")]),
            r"weights\[1\] must be a finite",
        ),
        (
            lambda: MultipleLosses({"a": ntx, "b": con}, None, {"a": 1.0}),
            r"exactly the losses' keys \['a', 'b'\]",
        ),
        (
            lambda: MultipleLosses({"a": ntx}, None, {"a": 1.0, "c": 2.0}),
            "exactly the losses' keys",
        ),
    ]
    for build, message in cases:
        with pytest.raises(ValueError, match=message):
            build()


@pytest.mark.parametrize(
    "miners",
    [[dm.BatchHardMiner(), None], [None, None], {"a": None}],
    ids=["one_miner", "list_of_nones", "dict_of_none"],
)
def test_multiple_losses_with_miner_slots_refuse_an_indices_tuple(miners) -> None:
    labels, _ = LAYOUTS["pk_batch"]
    emb, _ = _make(labels, None, torch.float64)
    losses = (
        {"a": dl.NTXentLoss(), "b": dl.ContrastiveLoss()}
        if isinstance(miners, dict)
        else [
            dl.NTXentLoss(),
            dl.ContrastiveLoss(),
        ]
    )
    loss = MultipleLosses(losses, miners)
    indices = dm.BatchHardMiner()(emb, labels)
    with pytest.raises(ValueError, match="pass indices_tuple=None"):
        loss(emb, labels, indices)
    # A None slot is a loss without a miner: it uses every pair.
    parts = list(loss.losses.values()) if isinstance(miners, dict) else list(loss.losses)
    mined = miners[0](emb, labels) if isinstance(miners, list) and miners[0] is not None else None
    assert_close(loss(emb, labels), parts[0](emb, labels, mined) + parts[1](emb, labels))


def test_multiple_losses_without_miners_as_an_empty_dict_accept_an_indices_tuple() -> None:
    """PML's rule: an empty dict of miners is no miners."""
    labels, _ = LAYOUTS["pk_batch"]
    emb, _ = _make(labels, None, torch.float64)
    indices = dm.BatchHardMiner()(emb, labels)
    loss = MultipleLosses({"a": dl.TripletMarginLoss()}, miners={})
    assert_close(loss(emb, labels, indices), dl.TripletMarginLoss()(emb, labels, indices))


def test_multiple_losses_repr_and_registry() -> None:
    loss = MultipleLosses({"a": dl.NTXentLoss()}, weights={"a": 2})
    assert "weights={'a': 2.0}" in repr(loss) and loss.is_dict
    assert MultipleLosses([dl.NTXentLoss()]).weights == [1.0]
    assert "MultipleLosses" not in LOSSES.names()
