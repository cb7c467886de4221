"""DynamicSoftMarginLoss, ManifoldLoss and ThresholdConsistentMarginLoss against PML 2.9 (values,
embedding, reference and proxy gradients, mined tuples, a sequence of calls, state dicts), and
against brute-force oracles written here where PML is wrong or crashes (each such difference is
documented in the class's docstring)."""

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
from dmlkit.functional import adaptive_margins as fam
from dmlkit.losses import LOSSES
from dmlkit.losses.adaptive_margins import (
    DynamicSoftMarginLoss,
    ManifoldLoss,
    ThresholdConsistentMarginLoss,
)
from dmlkit.registry import Spec

pml_losses = pytest.importorskip("pytorch_metric_learning.losses")
pml_distances = pytest.importorskip("pytorch_metric_learning.distances")

from conftest import assert_close  # noqa: E402
from test_pml_parity import LAYOUTS, _make, _mined_by_pml, assert_matches_pml  # noqa: E402

F64 = torch.float64
DTYPES = pytest.mark.parametrize("dtype", [F64, torch.float32], ids=["f64", "f32"])
Pair = tuple[torch.nn.Module, torch.nn.Module]


class DetachedPMLSoftMargin(pml_losses.DynamicSoftMarginLoss):
    """PML's loss with its histogram detached, the one change dmlkit makes (PML issue #731):
    the same values, and the gradient without the term through the histogram."""

    def update_histogram(self, data: torch.Tensor) -> None:
        super().update_histogram(data.detach())


def _tcm(**kw: float) -> Callable[[], Pair]:
    return lambda: (
        ThresholdConsistentMarginLoss(**kw),
        pml_losses.ThresholdConsistentMarginLoss(**kw),
    )


def _soft_margin(ours: dict | None = None, theirs: dict | None = None, **kw) -> Callable[[], Pair]:
    return lambda: (
        DynamicSoftMarginLoss(**kw, **(ours or {})),
        DetachedPMLSoftMargin(**kw, **(theirs or {})),
    )


SOFT_MARGIN_CASES = {
    "dynamic_soft_margin": _soft_margin(),
    # knots up to 2.6: every difference of unit vectors lies within them, as PML needs
    "dynamic_soft_margin_bins": _soft_margin(min_val=-3.0, num_bins=15, momentum=0.3),
    "dynamic_soft_margin_squared": _soft_margin(
        {"distance": dd.LpDistance(power=2)},
        {"distance": pml_distances.LpDistance(power=2)},
        min_val=-4.0,
        num_bins=10,
    ),
}
TCM_CASES = {
    "tcm": _tcm(),
    "tcm_margins": _tcm(lambda_plus=0.5, lambda_minus=2.0, margin_plus=0.6, margin_minus=0.1),
}
MANIFOLD_K = 20  # above every label of the layouts: labels serve as meta-classes


def _manifold(**kw: float) -> Callable[[], Pair]:
    def make() -> Pair:
        ours = ManifoldLoss(16, K=MANIFOLD_K, **kw)
        theirs = pml_losses.ManifoldLoss(16, K=MANIFOLD_K, **kw)
        ours.load_state_dict(theirs.state_dict())
        return ours, theirs

    return make


MANIFOLD_CASES = {
    "manifold": _manifold(),
    "manifold_intrinsic_only": _manifold(lambdaC=0.0),
    "manifold_tuned": _manifold(lambdaC=0.3, alpha=0.6, margin=1e-3),
}
PML_CASES: dict[str, Callable[[], Pair]] = {**SOFT_MARGIN_CASES, **TCM_CASES, **MANIFOLD_CASES}
"""Every class of this file compared with PML (the PML-parity guard reads this table)."""

IN_BATCH_LAYOUTS = [name for name, (_, ref) in LAYOUTS.items() if ref is None]


def _grads(loss, emb, labels, indices=None, ref=None, ref_labels=None, **kw):
    x = emb.clone().requires_grad_(True)
    r = None if ref is None else ref.clone().requires_grad_(True)
    value = loss(x, labels, indices, r, ref_labels, **kw)
    leaves = (x,) if r is None else (x, r)
    return (value.detach(), *torch.autograd.grad(value, leaves, allow_unused=True))


def _assert_all_close(actual, expected, rtol: float = 1e-5) -> None:
    assert torch.isfinite(actual[0])
    for a, e in zip(actual, expected, strict=True):
        assert_close(a, torch.zeros_like(a) if e is None else e, rtol)


# ------------------------------------------------------------------ DynamicSoftMarginLoss


def _soft_margin_oracle(
    diffs: list[torch.Tensor],
    hist: torch.Tensor,
    min_val: float = -2.0,
    num_bins: int = 10,
    momentum: float = 0.01,
    reduce: str = "mean",
) -> tuple[torch.Tensor, torch.Tensor]:
    """One difference at a time: its knot position clamped into the knots, its weight split
    between its two knots, the running update, then the CDF at its knot."""
    delta = 2 * abs(min_val) / num_bins
    counts = [0.0] * (num_bins + 1)
    positions = []
    for d in diffs:
        u = min(max((float(d.detach()) - min_val) / delta, 0.0), num_bins - 1)
        k = math.floor(u)
        counts[k] += 1 - (u - k)
        counts[k + 1] += u - k
        positions.append(k)
    m = momentum if float(hist.sum()) != 0 else 1.0
    new = [(1 - m) * float(h) + m * c for h, c in zip(hist.tolist(), counts, strict=False)]
    new = [h / sum(new) for h in new]
    cdf = [sum(new[: k + 1]) for k in range(num_bins)]
    terms = torch.stack([cdf[k] * d for k, d in zip(positions, diffs, strict=True)])
    value = terms.mean() if reduce == "mean" else terms.sum()
    return value, torch.tensor(new, dtype=hist.dtype)


def _triplet_diffs(dist: torch.Tensor, triplets: list[tuple[int, int, int]]) -> list[torch.Tensor]:
    return [dist[a, p] - dist[a, n] for a, p, n in triplets]


def _label_triplets(labels, ref_labels=None) -> list[tuple[int, int, int]]:
    ref = labels if ref_labels is None else ref_labels
    out = []
    for a in range(len(labels)):
        for p in range(len(ref)):
            if (ref_labels is None and p == a) or labels[a] != ref[p]:
                continue
            out.extend((a, p, n) for n in range(len(ref)) if labels[a] != ref[n])
    return out


def _unit_distances(x: torch.Tensor, y: torch.Tensor, power: float = 1) -> torch.Tensor:
    return torch.cdist(F.normalize(x, dim=1), F.normalize(y, dim=1)) ** power


@DTYPES
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("name", list(SOFT_MARGIN_CASES))
def test_soft_margin_matches_pml(name: str, layout: str, dtype: torch.dtype) -> None:
    labels, ref_labels = LAYOUTS[layout]
    emb, ref = _make(labels, ref_labels, dtype)
    ours, theirs = SOFT_MARGIN_CASES[name]()
    assert_matches_pml(ours, theirs, emb, labels, None, ref, ref_labels)
    assert_close(ours.hist_, theirs.hist_)


@pytest.mark.parametrize("miner", ["ms_pairs", "semihard_triplets", "batch_hard"])
@pytest.mark.parametrize("layout", ["many_classes", "pk_batch", "singletons", "ref_set"])
def test_soft_margin_with_pml_mined_tuples_matches_pml(layout: str, miner: str) -> None:
    labels, ref_labels = LAYOUTS[layout]
    emb, ref = _make(labels, ref_labels, F64)
    indices = _mined_by_pml(miner, emb, labels, ref, ref_labels)
    ours, theirs = SOFT_MARGIN_CASES["dynamic_soft_margin"]()
    assert_matches_pml(ours, theirs, emb, labels, indices, ref, ref_labels)
    assert_close(ours.hist_, theirs.hist_)


def test_soft_margin_values_match_unmodified_pml_but_not_its_gradient() -> None:
    """Detaching the histogram changes no value; PML's gradient differs by the term through
    its histogram, and its second backward pass fails."""
    labels, _ = LAYOUTS["pk_batch"]
    emb, _ = _make(labels, None, F64)
    ours, theirs = DynamicSoftMarginLoss(), pml_losses.DynamicSoftMarginLoss()
    mine = _grads(ours, emb, labels)
    x = emb.clone().requires_grad_(True)
    value = theirs(x, labels)
    value.backward()
    assert_close(mine[0], value)
    assert not torch.allclose(mine[1], x.grad, rtol=1e-3)
    second = theirs(emb.clone().requires_grad_(True), labels)
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        second.backward()


def test_soft_margin_sequence_of_calls_matches_pml() -> None:
    ours, theirs = DynamicSoftMarginLoss(momentum=0.2), DetachedPMLSoftMargin(momentum=0.2)
    plain = pml_losses.DynamicSoftMarginLoss(momentum=0.2)
    for step, layout in enumerate(
        ["pk_batch", "many_classes", "ref_set", "singletons", "pk_batch"]
    ):
        labels, ref_labels = LAYOUTS[layout]
        emb, ref = _make(labels, ref_labels, F64)
        emb = emb + step  # a different batch at each step
        mine = _grads(ours, emb, labels, None, ref, ref_labels)
        reference = _grads(theirs, emb, labels, None, ref, ref_labels)
        _assert_all_close(mine, reference)
        assert_close(ours.hist_, theirs.hist_)
        with torch.no_grad():
            assert_close(mine[0], plain(emb, labels, None, ref, ref_labels))


def test_soft_margin_histogram_is_a_buffer_saved_and_restored_by_state_dict() -> None:
    labels, _ = LAYOUTS["pk_batch"]
    emb, _ = _make(labels, None, F64)
    loss = DynamicSoftMarginLoss().double()
    assert list(loss.state_dict()) == ["hist_"] and not loss.hist_.any()
    for shift in (0.0, 0.5):
        loss(emb + shift, labels)
    state = loss.state_dict()
    assert state["hist_"].sum().item() == pytest.approx(1.0)
    restored = DynamicSoftMarginLoss().double()
    restored.load_state_dict(state)
    assert torch.equal(restored.hist_, loss.hist_)
    _assert_all_close(_grads(restored, emb - 1, labels), _grads(loss, emb - 1, labels), 1e-12)
    assert torch.equal(restored.hist_, loss.hist_)
    # A history changes the result: the restored state is what makes the calls agree.
    fresh = DynamicSoftMarginLoss().double()
    assert not torch.isclose(fresh(emb - 1, labels), restored(emb - 1, labels))


@pytest.mark.parametrize("reduce", ["mean", "sum"])
@pytest.mark.parametrize("layout", ["pk_batch", "singletons", "ref_set"])
def test_soft_margin_matches_oracle(layout: str, reduce: str) -> None:
    labels, ref_labels = LAYOUTS[layout]
    emb, ref = _make(labels, ref_labels, F64)
    reducer = dr.MeanReducer() if reduce == "mean" else dr.SumReducer()
    loss = DynamicSoftMarginLoss(momentum=0.1, reducer=reducer)
    hist = torch.zeros(10, dtype=F64)
    for step in range(2):
        x = (emb + step).requires_grad_(True)
        r = None if ref is None else ref.clone().requires_grad_(True)
        value = loss(x, labels, None, r, ref_labels)
        triplets = _label_triplets(
            labels.tolist(), None if ref_labels is None else ref_labels.tolist()
        )
        expected, hist = _soft_margin_oracle(
            _triplet_diffs(_unit_distances(x, x if r is None else r), triplets),
            hist,
            momentum=0.1,
            reduce=reduce,
        )
        assert_close(value, expected)
        assert_close(loss.hist_, hist)
        leaves = (x,) if r is None else (x, r)
        for ours, theirs in zip(
            torch.autograd.grad(value, leaves), torch.autograd.grad(expected, leaves), strict=True
        ):
            assert_close(ours, theirs)


def test_soft_margin_beyond_the_last_knot_sits_on_it_where_pml_raises() -> None:
    """A difference of 1.6 or more (defaults) lies past PML's last knot: PML indexes past its
    histogram; dmlkit places it on the last knot."""
    angles = torch.tensor([0.0, math.pi, 0.15, 2.0, 2.1], dtype=F64)
    emb = torch.stack([angles.cos(), angles.sin()], dim=1)
    labels = torch.tensor([0, 0, 1, 2, 2])
    with pytest.raises(RuntimeError, match="index"):
        pml_losses.DynamicSoftMarginLoss()(emb, labels)
    x = emb.clone().requires_grad_(True)
    value = DynamicSoftMarginLoss().double()(x, labels)
    dist = _unit_distances(x, x)
    triplets = _label_triplets(labels.tolist())
    assert max(float(d.detach()) for d in _triplet_diffs(dist, triplets)) > 1.6
    expected, _ = _soft_margin_oracle(_triplet_diffs(dist, triplets), torch.zeros(10, dtype=F64))
    assert_close(value, expected)
    assert_close(torch.autograd.grad(value, x)[0], torch.autograd.grad(expected, x)[0])


def _matched_oracle(
    dist: torch.Tensor, hist: torch.Tensor, momentum: float = 0.01
) -> tuple[torch.Tensor, torch.Tensor]:
    """Label-free: anchor i's positive is reference i; its negative the closest other reference
    of anchor i or other anchor of reference i; one entry per matched pair."""
    n, m = dist.shape
    diffs = []
    for i in range(min(n, m)):
        others = [dist[i, j] for j in range(m) if j != i] + [dist[k, i] for k in range(n) if k != i]
        diffs.append(dist[i, i] - torch.stack(others).min())
    return _soft_margin_oracle(diffs, hist, momentum=momentum)


@DTYPES
@pytest.mark.parametrize("sizes", [(8, 8), (8, 5), (5, 8), (2, 1)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_soft_margin_without_labels_pairs_rows_by_index(sizes, dtype) -> None:
    g = torch.Generator().manual_seed(3)
    emb = torch.randn(sizes[0], 16, generator=g, dtype=F64)
    ref = torch.randn(sizes[1], 16, generator=g, dtype=F64)
    matched = min(sizes)
    ref[:matched] += 2 * emb[:matched]  # matched pairs: mostly closer than the negatives
    loss = DynamicSoftMarginLoss().to(dtype)
    mine = _grads(loss, emb.to(dtype), None, None, ref.to(dtype))
    x, r = emb.clone().requires_grad_(True), ref.clone().requires_grad_(True)
    expected, hist = _matched_oracle(_unit_distances(x, r), torch.zeros(10, dtype=F64))
    _assert_all_close(mine, (expected, *torch.autograd.grad(expected, (x, r))))
    assert_close(loss.hist_, hist.to(dtype))
    if sizes[0] == sizes[1]:
        # PML pads nothing for matched sizes: its value is the same; its backward pass fails.
        value = pml_losses.DynamicSoftMarginLoss()(x, None, None, r)
        assert_close(mine[0], value)
        with pytest.raises(RuntimeError, match="inplace operation"):
            value.backward()


def test_soft_margin_without_labels_uses_a_given_tuple_and_refuses_what_it_cannot_pair() -> None:
    labels, _ = LAYOUTS["pk_batch"]
    emb, _ = _make(labels, None, F64)
    indices = _mined_by_pml("semihard_triplets", emb, labels)
    loss = DynamicSoftMarginLoss()
    assert_close(loss(emb, None, indices), DynamicSoftMarginLoss()(emb, labels, indices))
    with pytest.raises(ValueError, match="needs labels, an indices_tuple, or ref_emb"):
        loss(emb)
    with pytest.raises(ValueError, match="rows are paired by index"):
        loss(emb, None, None, emb + 1, labels)
    with pytest.raises(ValueError, match="rows are paired by index"):
        loss(emb, None, None, emb + 1, anchor_in_ref=torch.arange(len(emb)))


def test_soft_margin_blockwise_path_equals_listed_triplets_and_pml() -> None:
    """Enough positive pairs for several blocks: the all-triplets path agrees with the same
    triplets given as a tuple, and with PML."""
    labels = torch.arange(160) // 40
    emb, _ = _make(labels, None, F64)
    pos = labels[:, None] == labels[None, :]
    pos.fill_diagonal_(False)
    triplets = torch.where(pos[:, :, None] & (labels[:, None, None] != labels[None, None, :]))
    blockwise, listed = DynamicSoftMarginLoss(), DynamicSoftMarginLoss()
    _assert_all_close(_grads(blockwise, emb, labels), _grads(listed, emb, labels, triplets), 1e-9)
    assert_close(blockwise.hist_, listed.hist_, 1e-12)
    assert_matches_pml(DynamicSoftMarginLoss(), DetachedPMLSoftMargin(), emb, labels)


def test_soft_margin_constructor_checks() -> None:
    for distance, shown in [
        (dd.LpDistance(normalize_embeddings=False), "normalize_embeddings=False"),
        (dd.LpDistance(p=1), "p=1"),
    ]:
        with pytest.raises(ValueError, match=f"requires LpDistance with .*{shown}"):
            DynamicSoftMarginLoss(distance=distance)
    with pytest.raises(ValueError, match="requires LpDistance, got CosineSimilarity"):
        DynamicSoftMarginLoss(distance=dd.CosineSimilarity())
    for bad in (0.0, 1.5, float("nan")):
        with pytest.raises(ValueError, match="min_val must be a negative number"):
            DynamicSoftMarginLoss(min_val=bad)
    with pytest.raises(ValueError, match="num_bins must be a positive integer"):
        DynamicSoftMarginLoss(num_bins=0)
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match=r"momentum must be a number in \[0, 1\]"):
            DynamicSoftMarginLoss(momentum=bad)
    loss = DynamicSoftMarginLoss(min_val=-1.0, num_bins=4)
    assert loss.delta == 0.5 and loss.hist_.shape == (4,)


def test_soft_margin_histogram_follows_the_embeddings_dtype() -> None:
    labels, _ = LAYOUTS["pk_batch"]
    emb, _ = _make(labels, None, F64)
    loss = DynamicSoftMarginLoss()
    loss(emb, labels)
    assert loss.hist_.dtype == F64
    loss(emb.half(), labels)
    assert loss.hist_.dtype == torch.float32  # half precision is computed in float32


# --------------------------------------------------------------------------- ManifoldLoss


def _manifold_oracle(
    emb: torch.Tensor,
    proxies: torch.Tensor,
    meta: list[int],
    alpha: float,
    lambda_c: float,
    margin: float,
) -> torch.Tensor:
    """The paper's loops (as in PML's test of its original implementation), in float64, with
    the margin, and ``lambda_c = inf`` meaning the context term alone."""
    nodes = F.normalize(torch.cat([emb, proxies]), dim=1)
    w = torch.exp(torch.clamp(nodes @ nodes.T, min=0) / 0.5)
    eye = torch.eye(len(w), dtype=w.dtype)
    w = w - w * eye
    d = torch.diag(w.sum(1) ** -0.5)
    a = (1 - alpha) * torch.linalg.inv(eye - alpha * d @ w @ d)
    n, k = len(meta), len(proxies)
    items, prox = a[:n], a[n:]
    intrinsic, context = [], []
    for i in range(n):
        own = meta[i]
        s_int = a.new_zeros(())
        s_ctx = a.new_zeros(())
        own_cos = F.cosine_similarity(items[i], prox[own], dim=0)
        for j in range(k):
            if j == own:
                continue
            v = items[i, n + j] - items[i, n + own] + margin
            if v >= 0:
                s_int = s_int + torch.exp(v)
            c = F.cosine_similarity(items[i], prox[j], dim=0) - own_cos + margin
            if c >= 0:
                s_ctx = s_ctx + torch.exp(c)
        intrinsic.append(torch.log(1 + s_int))
        context.append(torch.log(1 + s_ctx))
    ctx = torch.stack(context).mean()
    return ctx if math.isinf(lambda_c) else torch.stack(intrinsic).mean() + lambda_c * ctx


def _manifold_grads(loss, emb, labels=None, meta=None):
    loss.zero_grad()
    x = emb.clone().requires_grad_(True)
    value = loss(x, labels, meta)
    value.backward()
    return value.detach(), x.grad, loss.proxies.grad.clone()


@DTYPES
@pytest.mark.parametrize("layout", IN_BATCH_LAYOUTS)
@pytest.mark.parametrize("name", list(MANIFOLD_CASES))
def test_manifold_matches_pml(name: str, layout: str, dtype: torch.dtype) -> None:
    """Meta-classes given to PML as its indices_tuple, to dmlkit as labels and as PML does; PML
    solves the graph in float32, so its float64 results are float32-accurate only (1e-5)."""
    labels, _ = LAYOUTS[layout]
    emb, _ = _make(labels, None, dtype)
    ours, theirs = MANIFOLD_CASES[name]()
    ours.to(dtype)
    theirs.double()
    reference = _manifold_grads(theirs, emb.double(), None, labels)
    _assert_all_close(_manifold_grads(ours, emb, labels), reference)
    _assert_all_close(_manifold_grads(ours, emb, None, labels), reference)


@pytest.mark.parametrize(
    ("alpha", "lambda_c", "margin"),
    [(0.8, 1.0, 5e-4), (0.99, 1.0, 0.0), (0.99, 0.0, 0.0), (0.5, math.inf, 1e-3)],
)
def test_manifold_matches_the_papers_loops(alpha: float, lambda_c: float, margin: float) -> None:
    labels, _ = LAYOUTS["many_classes"]
    emb, _ = _make(labels, None, F64)
    loss = ManifoldLoss(16, K=MANIFOLD_K, lambdaC=lambda_c, alpha=alpha, margin=margin).double()
    value, grad, proxy_grad = _manifold_grads(loss, emb, labels)
    x = emb.clone().requires_grad_(True)
    proxies = loss.proxies.detach().clone().requires_grad_(True)
    expected = _manifold_oracle(x, proxies, labels.tolist(), alpha, lambda_c, margin)
    assert_close(value, expected, 1e-9)
    expected_grads = torch.autograd.grad(expected, (x, proxies))
    assert_close(grad, expected_grads[0], 1e-8)
    assert_close(proxy_grad, expected_grads[1], 1e-8)


def test_manifold_context_only_where_pml_gives_no_number() -> None:
    labels, _ = LAYOUTS["pk_batch"]
    emb, _ = _make(labels, None, F64)
    theirs = pml_losses.ManifoldLoss(16, K=MANIFOLD_K, lambdaC=math.inf).double()
    assert not torch.isfinite(theirs(emb, indices_tuple=labels)).all()
    ours = ManifoldLoss(16, K=MANIFOLD_K, lambdaC=math.inf).double()
    ours.load_state_dict(theirs.state_dict())
    context = ManifoldLoss(16, K=MANIFOLD_K, lambdaC=1.0).double()
    intrinsic = ManifoldLoss(16, K=MANIFOLD_K, lambdaC=0.0).double()
    for loss in (context, intrinsic):
        loss.load_state_dict(theirs.state_dict())
    value = ours(emb, labels)
    assert value > 0
    assert_close(value, context(emb, labels) - intrinsic(emb, labels), 1e-9)


def test_manifold_random_meta_classes_are_pmls_under_the_same_seed() -> None:
    labels, _ = LAYOUTS["many_classes"]
    emb, _ = _make(labels, None, F64)
    ours, theirs = MANIFOLD_CASES["manifold"]()
    ours.double()
    theirs.double()
    torch.manual_seed(11)
    mine = _manifold_grads(ours, emb)
    torch.manual_seed(11)
    reference = _manifold_grads(theirs, emb)
    _assert_all_close(mine, reference)
    torch.manual_seed(12)
    assert not torch.isclose(_manifold_grads(ours, emb)[0], mine[0])


def test_manifold_proxies_are_pmls_and_state_dicts_load_both_ways() -> None:
    torch.manual_seed(5)
    ours = ManifoldLoss(16, K=7)
    torch.manual_seed(5)
    theirs = pml_losses.ManifoldLoss(16, K=7)
    assert ours.proxies.shape == theirs.proxies.shape == (7, 16)
    assert torch.equal(ours.proxies, theirs.proxies)
    assert list(ours.state_dict()) == list(theirs.state_dict()) == ["proxies"]
    with torch.no_grad():
        ours.proxies.mul_(2)
    theirs.load_state_dict(ours.state_dict())
    assert torch.equal(theirs.proxies, ours.proxies)
    other = ManifoldLoss(embedding_size=16, K=7)
    other.load_state_dict(theirs.state_dict())
    assert torch.equal(other.proxies, ours.proxies)


def test_manifold_one_sgd_step_matches_pml() -> None:
    labels, _ = LAYOUTS["pk_batch"]
    emb, _ = _make(labels, None, F64)
    ours, theirs = MANIFOLD_CASES["manifold"]()
    ours.double()
    theirs.double()
    for loss in (ours, theirs):
        optimiser = torch.optim.SGD(loss.parameters(), lr=10.0)
        loss(emb, None, labels).backward()
        optimiser.step()
    assert_close(ours.proxies, theirs.proxies)


def test_manifold_input_checks() -> None:
    labels, _ = LAYOUTS["pk_batch"]
    emb, _ = _make(labels, None, torch.float32)
    loss = ManifoldLoss(16, K=MANIFOLD_K)
    with pytest.raises(ValueError, match="at least 20 embeddings, got 16"):
        loss(emb[:16])
    with pytest.raises(ValueError, match=r"proxy indices in \[0, K=20\), got values in \[18, 25\]"):
        loss(emb, labels + 18)
    with pytest.raises(ValueError, match=r"in \[0, K=20\), got values in \[-1, 6\]"):
        loss(emb, None, labels - 1)
    with pytest.raises(ValueError, match="as labels or as indices_tuple, not both"):
        loss(emb, labels, labels)
    with pytest.raises(ValueError, match=r"indices_tuple \(meta-classes\) has length 31"):
        loss(emb, None, labels[:31])
    with pytest.raises(ValueError, match="does not support indices_tuple of pairs or triplets"):
        loss(emb, labels, _mined_by_pml("semihard_triplets", emb.double(), labels))
    with pytest.raises(ValueError, match="does not support ref_emb"):
        loss(emb, labels, None, emb, labels)
    with pytest.raises(ValueError, match="embeddings have size 8 but ManifoldLoss was built with"):
        loss(emb[:, :8], labels)
    for kwargs, message in [
        ({}, "needs l"),
        ({"l": 16, "embedding_size": 8}, "l=16 and embedding_size=8 differ"),
        ({"l": 16, "lambdaC": -1.0}, "lambdaC must be a non-negative"),
        ({"l": 16, "alpha": 1.0}, r"alpha must be a number in \(0, 1\)"),
        ({"l": 16, "alpha": 0.0}, r"alpha must be a number in \(0, 1\)"),
        ({"l": 16, "K": 0}, "K must be a positive integer"),
        ({"l": 0}, "l must be a positive integer"),
        ({"l": 16, "distance": dd.LpDistance()}, "needs a similarity"),
    ]:
        with pytest.raises(ValueError, match=message):
            ManifoldLoss(**kwargs)


def test_manifold_is_built_by_the_registry_from_the_runs_embedding_size() -> None:
    loss = LOSSES.build(Spec("ManifoldLoss", {"K": 4}), "loss", num_classes=3, embedding_size=8)
    assert isinstance(loss, ManifoldLoss) and loss.proxies.shape == (4, 8)


# --------------------------------------------------------------- ThresholdConsistentMargin


def _tcm_oracle(
    emb: torch.Tensor,
    labels: list[int],
    ref: torch.Tensor | None = None,
    ref_labels: list[int] | None = None,
    indices: tuple[torch.Tensor, ...] | None = None,
    lambdas: tuple[float, float] = (1.0, 1.0),
    margins: tuple[float, float] = (0.9, 0.5),
    reduce: str = "mean",
    power: float = 1,
) -> torch.Tensor:
    """Pair by pair: positives from the reference set (the batch itself without one)."""
    refs = emb if ref is None else ref
    if indices is None:
        r_labels = labels if ref_labels is None else ref_labels
        pos = [
            (a, j)
            for a in range(len(labels))
            for j in range(len(r_labels))
            if labels[a] == r_labels[j] and not (ref is None and a == j)
        ]
        neg = [
            (a, j)
            for a in range(len(labels))
            for j in range(len(r_labels))
            if labels[a] != r_labels[j]
        ]
    elif len(indices) == 3:
        a, p, n = (t.tolist() for t in indices)
        pos, neg = list(zip(a, p, strict=True)), list(zip(a, n, strict=True))
    else:
        a1, p, a2, n = (t.tolist() for t in indices)
        pos, neg = list(zip(a1, p, strict=True)), list(zip(a2, n, strict=True))

    def side(pairs, selected, term):
        terms = []
        for a, j in pairs:
            s = F.cosine_similarity(emb[a], refs[j], dim=0) ** power
            if selected(s):
                terms.append(term(s))
        if not terms:
            return emb.sum() * 0
        total = torch.stack(terms).sum()
        return total / len(terms) if reduce == "mean" else total

    m_plus, m_minus = margins
    return lambdas[0] * side(pos, lambda s: s <= m_plus, lambda s: m_plus - s) + lambdas[1] * side(
        neg, lambda s: s >= m_minus, lambda s: s - m_minus
    )


@DTYPES
@pytest.mark.parametrize("layout", IN_BATCH_LAYOUTS)
@pytest.mark.parametrize("name", list(TCM_CASES))
def test_tcm_matches_pml(name: str, layout: str, dtype: torch.dtype) -> None:
    labels, _ = LAYOUTS[layout]
    emb, _ = _make(labels, None, dtype)
    assert_matches_pml(*TCM_CASES[name](), emb, labels)


@pytest.mark.parametrize("miner", ["ms_pairs", "semihard_triplets", "batch_hard"])
@pytest.mark.parametrize("layout", ["many_classes", "pk_batch", "singletons"])
def test_tcm_with_pml_mined_tuples_matches_pml(layout: str, miner: str) -> None:
    labels, _ = LAYOUTS[layout]
    emb, _ = _make(labels, None, F64)
    indices = _mined_by_pml(miner, emb, labels)
    assert_matches_pml(*TCM_CASES["tcm"](), emb, labels, indices)


@pytest.mark.parametrize("miner", [None, "ms_pairs", "semihard_triplets"])
@pytest.mark.parametrize("layout", ["ref_set", "ref_no_shared_class"])
def test_tcm_with_reference_set_matches_oracle(layout: str, miner: str | None) -> None:
    """PML looks reference indices up in the embeddings; dmlkit in the reference set."""
    labels, ref_labels = LAYOUTS[layout]
    emb, ref = _make(labels, ref_labels, F64)
    indices = None if miner is None else _mined_by_pml(miner, emb, labels, ref, ref_labels)
    mine = _grads(ThresholdConsistentMarginLoss(), emb, labels, indices, ref, ref_labels)
    x, r = emb.clone().requires_grad_(True), ref.clone().requires_grad_(True)
    expected = _tcm_oracle(x, labels.tolist(), r, ref_labels.tolist(), indices)
    _assert_all_close(mine, (expected, *torch.autograd.grad(expected, (x, r), allow_unused=True)))


def test_tcm_pml_reads_reference_indices_from_the_embeddings() -> None:
    labels, ref_labels = LAYOUTS["ref_set"]  # 24 embeddings, 40 references
    emb, ref = _make(labels, ref_labels, F64)
    with pytest.raises(IndexError):
        pml_losses.ThresholdConsistentMarginLoss()(emb, labels, None, ref, ref_labels)
    small_ref, small_labels = ref[:10], ref_labels[:10]
    theirs = pml_losses.ThresholdConsistentMarginLoss()(emb, labels, None, small_ref, small_labels)
    ours = ThresholdConsistentMarginLoss()(emb, labels, None, small_ref, small_labels)
    expected = _tcm_oracle(emb, labels.tolist(), small_ref, small_labels.tolist())
    assert_close(ours, expected)
    assert not torch.isclose(theirs, expected)


@pytest.mark.parametrize("layout", ["pk_batch", "singletons"])
@pytest.mark.parametrize(
    ("reducer", "reduce"), [(dr.SumReducer(), "sum"), (dr.MeanReducer(), "mean")]
)
def test_tcm_reducer_reduces_each_side(layout: str, reducer, reduce: str) -> None:
    """PML ignores the reducer (its value is a mean); here it is applied to each side."""
    labels, _ = LAYOUTS[layout]
    emb, _ = _make(labels, None, F64)
    mine = _grads(ThresholdConsistentMarginLoss(lambda_minus=0.5, reducer=reducer), emb, labels)
    x = emb.clone().requires_grad_(True)
    expected = _tcm_oracle(x, labels.tolist(), lambdas=(1.0, 0.5), reduce=reduce)
    _assert_all_close(mine, (expected, torch.autograd.grad(expected, x)[0]))


def test_tcm_applies_the_cosine_power() -> None:
    labels, _ = LAYOUTS["pk_batch"]
    emb, _ = _make(labels, None, F64)
    loss = ThresholdConsistentMarginLoss(distance=dd.CosineSimilarity(power=2))
    expected = _tcm_oracle(emb, labels.tolist(), power=2)
    assert_close(loss(emb, labels), expected)


def test_tcm_with_nothing_selected_is_a_zero_with_a_graph() -> None:
    emb = torch.tensor([[1.0, 0.0], [1.0, 0.01], [-1.0, 0.0]], requires_grad=True)
    loss = ThresholdConsistentMarginLoss()(emb, torch.tensor([0, 0, 1]))
    assert loss.item() == 0.0
    loss.backward()
    assert emb.grad is not None and not emb.grad.any()


# ------------------------------------------------------------------- random batches (PML)

SETTINGS = settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)


@st.composite
def _batches(draw, allow_ref: bool):
    n = draw(st.integers(1, 20))
    dim = draw(st.integers(2, 8))
    n_classes = draw(st.integers(1, n))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    labels = torch.randint(0, n_classes, (n,), generator=g)
    spread = draw(st.sampled_from([0.0, 0.5, 2.0]))
    centres = torch.randn(n_classes + 3, dim, generator=g, dtype=F64)
    emb = spread * centres[labels] + torch.randn(n, dim, generator=g, dtype=F64)
    ref = ref_labels = None
    if allow_ref and draw(st.booleans()):
        m = draw(st.integers(1, 20))
        ref_labels = torch.randint(0, n_classes + 2, (m,), generator=g)
        ref = spread * centres[ref_labels] + torch.randn(m, dim, generator=g, dtype=F64)
    return emb, labels, ref, ref_labels


@SETTINGS
@given(batch=_batches(allow_ref=True))
def test_soft_margin_matches_pml_on_random_batches(batch) -> None:
    emb, labels, ref, ref_labels = batch
    # PML raises past its last knot (1.6); dmlkit's clamping is checked against the oracle.
    dist = _unit_distances(emb, emb if ref is None else ref)
    triplets = _label_triplets(labels.tolist(), None if ref is None else ref_labels.tolist())
    if any(float(dist[a, p] - dist[a, n]) >= 1.6 for a, p, n in triplets):
        return
    ours, theirs = SOFT_MARGIN_CASES["dynamic_soft_margin"]()
    assert_matches_pml(ours, theirs, emb, labels, None, ref, ref_labels)


@SETTINGS
@given(batch=_batches(allow_ref=False))
def test_tcm_matches_pml_on_random_batches(batch) -> None:
    emb, labels, _, _ = batch
    assert_matches_pml(*TCM_CASES["tcm"](), emb, labels)


def test_functional_histogram_splits_each_weight_between_its_knots() -> None:
    positions = fam.soft_margin_positions(torch.tensor([-3.0, -1.9, 0.1, 1.7, 5.0]), -2.0, 0.4, 10)
    assert torch.allclose(positions, torch.tensor([0.0, 0.25, 5.25, 9.0, 9.0]))
    counts = fam.soft_margin_histogram(positions, torch.tensor([1.0, 4.0, 1.0, 1.0, 2.0]), 10)
    expected = torch.zeros(10)
    expected[0], expected[1], expected[5], expected[6], expected[9] = 1 + 3, 1, 0.75, 0.25, 3
    assert torch.allclose(counts, expected)
    hist = fam.update_soft_margin_histogram(torch.zeros(10), counts, 0.5)
    assert torch.allclose(hist, expected / expected.sum())  # the first batch replaces it
    again = fam.update_soft_margin_histogram(hist, counts, 0.5)
    assert torch.allclose(again, (0.5 * hist + 0.5 * counts) / (0.5 * hist + 0.5 * counts).sum())
