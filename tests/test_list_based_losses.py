"""HistogramLoss, RankedListLoss, PNPLoss and SmoothAPLoss against PML 2.9 in value and gradient,
and against brute-force oracles where PML is wrong or fails."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dmlkit.distances as dd
import dmlkit.regularizers as dr
from conftest import assert_close
from dmlkit.functional.list_losses import positive_lists
from dmlkit.losses import LOSSES
from dmlkit.losses.list_based import HistogramLoss, PNPLoss, RankedListLoss, SmoothAPLoss
from dmlkit.reducers import (
    AvgNonZeroReducer,
    DivisorReducer,
    MeanReducer,
    SumReducer,
    ThresholdReducer,
)

pml_losses = pytest.importorskip("pytorch_metric_learning.losses")
pml_distances = pytest.importorskip("pytorch_metric_learning.distances")
pml_reducers = pytest.importorskip("pytorch_metric_learning.reducers")
pml_regularizers = pytest.importorskip("pytorch_metric_learning.regularizers")

from test_pml_parity import LAYOUTS, _make, _mined_by_pml, assert_matches_pml  # noqa: E402

# PML's ranked-list temperatures above 5 warn about overflow; several cases use Tn = 10.
pytestmark = pytest.mark.filterwarnings(
    "ignore:Values of Tp or Tn are too high",
    "ignore:Using a non-tuple sequence for multidimensional indexing",
)

Factory = Callable[[], tuple[torch.nn.Module, torch.nn.Module]]

HISTOGRAM_CASES: dict[str, Factory] = {
    "histogram": lambda: (HistogramLoss(), pml_losses.HistogramLoss()),
    "histogram_25_bins": lambda: (HistogramLoss(n_bins=25), pml_losses.HistogramLoss(n_bins=25)),
    "histogram_delta": lambda: (HistogramLoss(delta=0.04), pml_losses.HistogramLoss(delta=0.04)),
    "histogram_uneven_delta": lambda: (
        HistogramLoss(delta=0.03),
        pml_losses.HistogramLoss(delta=0.03),
    ),
    "histogram_both": lambda: (
        HistogramLoss(n_bins=40, delta=0.05),
        pml_losses.HistogramLoss(n_bins=40, delta=0.05),
    ),
    "histogram_dot_regularised": lambda: (
        HistogramLoss(
            n_bins=50,
            distance=dd.DotProductSimilarity(),
            embedding_regularizer=dr.LpRegularizer(),
            embedding_reg_weight=0.1,
        ),
        pml_losses.HistogramLoss(
            n_bins=50,
            distance=pml_distances.DotProductSimilarity(),
            embedding_regularizer=pml_regularizers.LpRegularizer(),
            embedding_reg_weight=0.1,
        ),
    ),
}

RANKED_LIST_CASES: dict[str, Factory] = {
    "ranked_list": lambda: (RankedListLoss(0.4, 10), pml_losses.RankedListLoss(0.4, 10)),
    "ranked_list_all_options": lambda: (
        RankedListLoss(margin=0.4, Tn=3, imbalance=0.3, alpha=1.1, Tp=2),
        pml_losses.RankedListLoss(margin=0.4, Tn=3, imbalance=0.3, alpha=1.1, Tp=2),
    ),
    "ranked_list_squared_sum": lambda: (
        RankedListLoss(1.0, 1.0, distance=dd.LpDistance(power=2), reducer=SumReducer()),
        pml_losses.RankedListLoss(
            1.0,
            1.0,
            distance=pml_distances.LpDistance(power=2),
            reducer=pml_reducers.SumReducer(),
        ),
    ),
    "ranked_list_cosine_nonzero": lambda: (
        RankedListLoss(
            0.5, 1.0, alpha=0.6, distance=dd.CosineSimilarity(), reducer=AvgNonZeroReducer()
        ),
        pml_losses.RankedListLoss(
            0.5,
            1.0,
            alpha=0.6,
            distance=pml_distances.CosineSimilarity(),
            reducer=pml_reducers.AvgNonZeroReducer(),
        ),
    ),
    "ranked_list_regularised": lambda: (
        RankedListLoss(
            0.2, 2, embedding_regularizer=dr.ZeroMeanRegularizer(), embedding_reg_weight=0.5
        ),
        pml_losses.RankedListLoss(
            0.2,
            2,
            embedding_regularizer=pml_regularizers.ZeroMeanRegularizer(),
            embedding_reg_weight=0.5,
        ),
    ),
}

PNP_CASES: dict[str, Factory] = {
    **{
        f"pnp_{variant}": (
            lambda variant=variant: (  # type: ignore[misc]
                PNPLoss(variant=variant),
                pml_losses.PNPLoss(variant=variant),
            )
        )
        for variant in ("Ds", "Dq", "Iu", "Ib", "O")
    },
    "pnp_Dq_alpha": lambda: (
        PNPLoss(alpha=2.5, anneal=0.05, variant="Dq"),
        pml_losses.PNPLoss(alpha=2.5, anneal=0.05, variant="Dq"),
    ),
    "pnp_Ib_b": lambda: (
        PNPLoss(b=3.5, anneal=0.1, variant="Ib"),
        pml_losses.PNPLoss(b=3.5, anneal=0.1, variant="Ib"),
    ),
    "pnp_chunked": lambda: (
        PNPLoss(variant="Ds", chunk_elements=50),
        pml_losses.PNPLoss(variant="Ds"),
    ),
}

SMOOTH_AP_CASES: dict[str, Factory] = {
    "smooth_ap": lambda: (SmoothAPLoss(), pml_losses.SmoothAPLoss()),
    "smooth_ap_warm": lambda: (
        SmoothAPLoss(temperature=0.2),
        pml_losses.SmoothAPLoss(temperature=0.2),
    ),
    "smooth_ap_chunked_nonzero": lambda: (
        SmoothAPLoss(temperature=0.05, reducer=AvgNonZeroReducer(), chunk_elements=40),
        pml_losses.SmoothAPLoss(temperature=0.05, reducer=pml_reducers.AvgNonZeroReducer()),
    ),
    "smooth_ap_regularised": lambda: (
        SmoothAPLoss(embedding_regularizer=dr.LpRegularizer(), embedding_reg_weight=0.2),
        pml_losses.SmoothAPLoss(
            embedding_regularizer=pml_regularizers.LpRegularizer(), embedding_reg_weight=0.2
        ),
    ),
}

PML_CASES: dict[str, Factory] = {
    **HISTOGRAM_CASES,
    **RANKED_LIST_CASES,
    **PNP_CASES,
    **SMOOTH_AP_CASES,
}
"""(dmlkit, PML) factories of every class here, for the registry-wide parity check."""

BATCH_LAYOUTS = [name for name, (_, ref_labels) in LAYOUTS.items() if ref_labels is None]

# Batches on which PML's Smooth-AP is right: sorted by label, as many items per class as classes.
SQUARE_LAYOUTS = {
    "square_4": torch.arange(16) // 4,
    "square_3_classes_unsorted": torch.tensor([2, 2, 2, 0, 0, 0, 1, 1, 1]),
    "square_6": torch.tensor([5, 0, 3, 1, 4, 2]).repeat_interleave(6),
    "singletons_only": torch.arange(20),
}
# Equal class sizes on which PML's Smooth-AP reads the wrong positives.
SMOOTH_AP_PML_WRONG = {
    "many_classes": LAYOUTS["many_classes"][0],
    "pk_batch": LAYOUTS["pk_batch"][0],
    "one_class": LAYOUTS["one_class"][0],
    "square_interleaved": torch.arange(16) % 4,
}

DTYPES = pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])


def _value_and_grad(loss: torch.nn.Module, emb: torch.Tensor, labels, indices=None):
    x = emb.clone().requires_grad_(True)
    value = loss(x, labels, indices)
    value.backward()
    assert x.grad is not None
    return value.detach(), x.grad


def _embeddings(labels: torch.Tensor, dtype: torch.dtype = torch.float64, seed: int = 7):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(int(labels.max()) + 1, 8, generator=g, dtype=torch.float64)
    emb = centres[labels] * 0.7 + torch.randn(len(labels), 8, generator=g, dtype=torch.float64)
    return emb.to(dtype)


# ---------------------------------------------------------------- parity with PML


@DTYPES
@pytest.mark.parametrize("layout", BATCH_LAYOUTS)
@pytest.mark.parametrize("name", list(HISTOGRAM_CASES) + list(RANKED_LIST_CASES) + list(PNP_CASES))
def test_matches_pml_on_batches(name: str, layout: str, dtype: torch.dtype) -> None:
    labels, _ = LAYOUTS[layout]
    emb, _ = _make(labels, None, dtype)
    ours, theirs = PML_CASES[name]()
    assert_matches_pml(ours, theirs, emb, labels)


@DTYPES
@pytest.mark.parametrize("layout", list(SQUARE_LAYOUTS))
@pytest.mark.parametrize("name", list(SMOOTH_AP_CASES))
def test_smooth_ap_matches_pml_where_pml_is_right(name: str, layout: str, dtype) -> None:
    labels = SQUARE_LAYOUTS[layout]
    emb, _ = _make(labels, None, dtype)
    ours, theirs = PML_CASES[name]()
    assert_matches_pml(ours, theirs, emb, labels)


@pytest.mark.parametrize("miner_kind", ["ms_pairs", "semihard_triplets", "batch_hard"])
@pytest.mark.parametrize("layout", ["many_classes", "pk_batch", "singletons"])
@pytest.mark.parametrize("name", list(HISTOGRAM_CASES))
def test_histogram_matches_pml_with_mined_tuples(name: str, layout: str, miner_kind: str) -> None:
    labels, _ = LAYOUTS[layout]
    emb, _ = _make(labels, None, torch.float64)
    indices = _mined_by_pml(miner_kind, emb, labels)
    ours, theirs = PML_CASES[name]()
    assert_matches_pml(ours, theirs, emb, labels, indices)
    ours, theirs = PML_CASES[name]()
    assert_matches_pml(ours, theirs, emb, None, indices)


@pytest.mark.parametrize("miner_kind", ["ms_pairs", "semihard_triplets", "batch_hard"])
@pytest.mark.parametrize("layout", ["square_4", "square_6"])
@pytest.mark.parametrize("name", ["smooth_ap", "smooth_ap_chunked_nonzero"])
def test_smooth_ap_matches_pml_with_mined_tuples(name: str, layout: str, miner_kind: str) -> None:
    labels = SQUARE_LAYOUTS[layout]
    emb, _ = _make(labels, None, torch.float64)
    indices = _mined_by_pml(miner_kind, emb, labels)
    ours, theirs = PML_CASES[name]()
    assert_matches_pml(ours, theirs, emb, labels, indices)


def test_histogram_tuple_edge_cases_match_pml() -> None:
    """Pairs joined on their anchors (an anchor with positives only gives no triplet) and
    repeated or self-referencing pairs, which PML keeps once as unordered pairs."""
    labels, _ = LAYOUTS["pk_batch"]
    emb, _ = _make(labels, None, torch.float64)
    t = torch.tensor
    tuples = [
        (t([0, 0, 1, 5, 9]), t([1, 2, 0, 4, 10]), t([0, 1, 9, 9]), t([8, 30, 20, 0])),
        (t([0, 1, 1, 3]), t([1, 0, 1, 2]), t([4, 4, 9, 3]), t([5, 9, 4, 4])),
        (t([0, 0, 4]), t([1, 1, 5]), t([8, 8, 0])),
    ]
    for indices in tuples:
        ours, theirs = PML_CASES["histogram"]()
        assert_matches_pml(ours, theirs, emb, labels, indices)
    # Pairs whose anchors never meet: no triplet, a zero.
    disjoint = (t([0, 1]), t([1, 0]), t([8, 9]), t([0, 1]))
    value, grad = _value_and_grad(HistogramLoss(), emb, labels, disjoint)
    assert value.item() == 0.0 and torch.all(grad == 0)
    assert pml_losses.HistogramLoss()(emb, labels, disjoint).item() == 0.0


# ------------------------------------------------- where PML is wrong or fails: oracles


def smooth_ap_oracle(
    emb: torch.Tensor, labels: torch.Tensor, temperature: float, power: float = 1
) -> torch.Tensor:
    """The paper's Smooth-AP, item by item: each anchor's positives are the items with its
    label (itself included), ranked among the whole batch by cosine similarity ** power."""
    x = F.normalize(emb, dim=1)
    sim = (x @ x.T) ** power
    n = len(labels)
    losses = []
    for a in range(n):
        positives = [k for k in range(n) if labels[k] == labels[a]]
        if len(positives) == 1:
            losses.append(sim[a, a] * 0)
            continue
        precision = sim.new_zeros(())
        for k in positives:
            before = [
                torch.sigmoid((sim[a, j] - sim[a, k]) / temperature) for j in range(n) if j != k
            ]
            before_pos = [
                torch.sigmoid((sim[a, j] - sim[a, k]) / temperature) for j in positives if j != k
            ]
            precision = precision + (1 + sum(before_pos)) / (1 + sum(before))
        losses.append(1 - precision / len(positives))
    return torch.stack(losses).mean()


@DTYPES
@pytest.mark.parametrize("layout", list(SMOOTH_AP_PML_WRONG))
def test_smooth_ap_matches_oracle_where_pml_is_wrong(layout: str, dtype) -> None:
    labels = SMOOTH_AP_PML_WRONG[layout]
    emb = _embeddings(labels)
    temperature = 0.05
    leaf = emb.clone().requires_grad_(True)
    expected = smooth_ap_oracle(leaf, labels, temperature)
    (expected_grad,) = torch.autograd.grad(expected, leaf)
    value, grad = _value_and_grad(SmoothAPLoss(temperature), emb.to(dtype), labels)
    assert_close(value, expected)
    assert_close(grad, expected_grad)
    # PML reads contiguous blocks of the class count as the positives: a different value.
    pml_value = pml_losses.SmoothAPLoss(temperature)(emb, labels)
    assert abs(pml_value.item() - expected.item()) > 1e-4


def test_smooth_ap_oracle_agrees_with_pml_where_pml_is_right() -> None:
    """The oracle itself is PML's formula on the batches PML reads correctly."""
    labels = SQUARE_LAYOUTS["square_3_classes_unsorted"]
    emb = _embeddings(labels)
    assert_close(smooth_ap_oracle(emb, labels, 0.05), pml_losses.SmoothAPLoss(0.05)(emb, labels))


def test_smooth_ap_ranks_by_powered_similarities() -> None:
    """PML ranks positives among positives by unpowered similarities, and all by powered ones."""
    labels = SQUARE_LAYOUTS["square_4"]
    emb = _embeddings(labels)
    leaf = emb.clone().requires_grad_(True)
    expected = smooth_ap_oracle(leaf, labels, 0.05, power=3)
    (expected_grad,) = torch.autograd.grad(expected, leaf)
    value, grad = _value_and_grad(
        SmoothAPLoss(0.05, distance=dd.CosineSimilarity(power=3)), emb, labels
    )
    assert_close(value, expected)
    assert_close(grad, expected_grad)
    pml = pml_losses.SmoothAPLoss(0.05, distance=pml_distances.CosineSimilarity(power=3))
    assert abs(pml(emb, labels).item() - expected.item()) > 1e-4


def histogram_oracle(
    sim: torch.Tensor, pos_pairs: list[tuple[int, int]], neg_pairs: list[tuple[int, int]], delta
) -> torch.Tensor:
    """The Histogram loss with triangular node kernels max(0, 1 − |x − r|), x = (s + 1)/δ."""
    nodes = torch.arange(round(1 + 2 / delta), dtype=sim.dtype)

    def density(pairs: list[tuple[int, int]]) -> torch.Tensor:
        x = (torch.stack([sim[i, j] for i, j in pairs]) + 1) / delta
        return (1 - (x[:, None] - nodes[None, :]).abs()).clamp_min(0).mean(0)

    return (density(neg_pairs) * density(pos_pairs).cumsum(0)).sum()


def _all_unordered_pairs(labels: torch.Tensor) -> tuple[list, list]:
    n = len(labels)
    pos = [(i, j) for i in range(n) for j in range(i + 1, n) if labels[i] == labels[j]]
    neg = [(i, j) for i in range(n) for j in range(i + 1, n) if labels[i] != labels[j]]
    return pos, neg


@DTYPES
def test_histogram_with_identical_directions_matches_oracle_where_pml_fails(dtype) -> None:
    """Similarities of exactly 1 lie on the last node; PML indexes past its histogram."""
    labels = torch.arange(10) // 2
    emb = _embeddings(labels)
    emb[1] = emb[0] * 3.0  # the same direction: a cosine of 1 (or a rounding error above)
    emb[5] = emb[4]
    leaf = emb.clone().requires_grad_(True)
    x = F.normalize(leaf, dim=1)
    sim = (x @ x.T).clamp(-1, 1)
    expected = histogram_oracle(sim, *_all_unordered_pairs(labels), 0.02)
    (expected_grad,) = torch.autograd.grad(expected, leaf)
    value, grad = _value_and_grad(HistogramLoss(), emb.to(dtype), labels)
    assert_close(value, expected)
    assert_close(grad, expected_grad)
    with pytest.raises((RuntimeError, IndexError)):
        pml_losses.HistogramLoss()(emb, labels)


def test_histogram_oracle_agrees_with_pml() -> None:
    labels = torch.arange(12) // 3
    emb = _embeddings(labels)
    x = F.normalize(emb, dim=1)
    expected = histogram_oracle(x @ x.T, *_all_unordered_pairs(labels), 0.05)
    assert_close(expected, pml_losses.HistogramLoss(delta=0.05)(emb, labels), 1e-5)


def test_histogram_refuses_what_pml_fails_on_obscurely() -> None:
    labels = torch.arange(10) // 2
    emb = _embeddings(labels) * 5
    # Unnormalised dot products leave [-1, 1]: PML indexes outside its histogram.
    raw = dd.DotProductSimilarity(normalize_embeddings=False)
    with pytest.raises(ValueError, match=r"HistogramLoss needs similarities in \[-1, 1\]"):
        HistogramLoss(distance=raw)(emb, labels)
    with pytest.raises((RuntimeError, IndexError)):
        pml_losses.HistogramLoss(
            distance=pml_distances.DotProductSimilarity(normalize_embeddings=False)
        )(emb, labels)
    # A spacing whose last node stops short of 1 (44 intervals of 0.045 end at 0.98).
    with pytest.raises(ValueError, match="short of 1"):
        HistogramLoss(delta=0.045)
    near = torch.stack([torch.tensor([1.0, 0.0]), torch.tensor([1.0, 0.01])]).double()
    near = torch.cat([near, -near])
    with pytest.raises((RuntimeError, IndexError)):
        pml_losses.HistogramLoss(delta=0.045)(near, torch.tensor([0, 0, 1, 1]))
    # Distances are not similarities (PML's formula reads the matrix as similarities).
    with pytest.raises(ValueError, match="HistogramLoss needs a similarity"):
        HistogramLoss(distance=dd.LpDistance())


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"n_bins": 40, "delta": 0.1}, "delta = 2 / n_bins"),
        ({"n_bins": 0}, "n_bins must be a positive integer"),
        ({"n_bins": 2.5}, "n_bins must be a positive integer"),
        ({"delta": -0.1}, "delta must be a positive number"),
    ],
)
def test_histogram_bad_options(options, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        HistogramLoss(**options)


def test_histogram_defaults_follow_pml() -> None:
    assert HistogramLoss().delta == pml_losses.HistogramLoss().delta == 0.02
    assert HistogramLoss(n_bins=10).delta == pml_losses.HistogramLoss(n_bins=10).delta
    assert isinstance(HistogramLoss().distance, dd.CosineSimilarity)
    assert isinstance(HistogramLoss().reducer, MeanReducer)


# ------------------------------------------------------------------- refusals and options


@pytest.mark.parametrize("name", ["histogram", "ranked_list", "pnp_O", "smooth_ap"])
def test_ref_emb_is_refused_as_by_pml(name: str) -> None:
    labels = torch.arange(16) // 4
    emb = _embeddings(labels)
    ours, theirs = PML_CASES[name]()
    with pytest.raises(ValueError, match="does not support ref_emb"):
        ours(emb, labels, None, emb[:5].clone(), labels[:5].clone())
    with pytest.raises(ValueError, match="ref_emb is not supported"):
        theirs(emb, labels, None, emb[:5].clone(), labels[:5].clone())


@pytest.mark.parametrize("name", ["ranked_list", "pnp_Dq"])
def test_indices_tuple_is_refused_as_by_pml(name: str) -> None:
    labels = torch.arange(16) // 4
    emb = _embeddings(labels)
    indices = _mined_by_pml("semihard_triplets", emb, labels)
    ours, theirs = PML_CASES[name]()
    with pytest.raises(ValueError, match="does not support indices_tuple"):
        ours(emb, labels, indices)
    with pytest.raises(ValueError, match="indices_tuple is not supported"):
        theirs(emb, labels, indices)


def test_smooth_ap_refuses_unequal_classes_as_pml() -> None:
    labels = LAYOUTS["singletons"][0]
    emb = _embeddings(labels)
    with pytest.raises(ValueError, match=r"same number of items .* class sizes \[1, 2, 3\]"):
        SmoothAPLoss()(emb, labels)
    with pytest.raises(ValueError, match="same number of elements"):
        pml_losses.SmoothAPLoss()(emb, labels)


def test_smooth_ap_with_one_item_per_class_is_zero() -> None:
    labels = torch.arange(9)
    emb = _embeddings(labels)
    value, grad = _value_and_grad(SmoothAPLoss(), emb, labels)
    assert value.item() == 0.0 and torch.all(grad == 0)
    assert pml_losses.SmoothAPLoss()(emb, labels).item() == 0.0


def test_bad_options_are_refused() -> None:
    with pytest.raises(ValueError, match="imbalance must be between 0 and 1"):
        RankedListLoss(0.4, 1.0, imbalance=1.5)
    with pytest.raises(ValueError, match="variant='X' but must be one of"):
        PNPLoss(variant="X")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="anneal must be a positive number"):
        PNPLoss(anneal=0)
    with pytest.raises(ValueError, match="b must be a positive number"):
        PNPLoss(b=0, variant="Ib")
    PNPLoss(b=0, variant="O")  # b only matters to "Ib"
    with pytest.raises(ValueError, match="temperature must be a positive number"):
        SmoothAPLoss(temperature=0.0)
    with pytest.raises(ValueError, match="chunk_elements must be a positive integer"):
        SmoothAPLoss(chunk_elements=0)
    for loss_cls in (PNPLoss, SmoothAPLoss):
        with pytest.raises(ValueError, match=f"{loss_cls.__name__} requires CosineSimilarity"):
            loss_cls(distance=dd.DotProductSimilarity())


def test_ranked_list_defaults_and_warning_follow_pml() -> None:
    loss = RankedListLoss(margin=0.4, Tn=1)
    assert loss.alpha == pml_losses.RankedListLoss(margin=0.4, Tn=1).alpha == 1.2
    assert isinstance(loss.distance, dd.LpDistance) and isinstance(loss.reducer, MeanReducer)
    with pytest.warns(UserWarning, match="Tp or Tn are too high"):
        RankedListLoss(0.4, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        RankedListLoss(0.4, 5, Tp=5)


@pytest.mark.parametrize("name", ["histogram", "pnp_O", "pnp_Dq"])
def test_losses_reduced_by_themselves_hand_their_value_to_the_reducer(name: str) -> None:
    labels = torch.arange(24) // 4
    emb = _embeddings(labels)
    ours, theirs = PML_CASES[name]()
    expected = theirs(emb, labels)
    assert expected.item() > 0
    for reducer in (SumReducer(), AvgNonZeroReducer(), ThresholdReducer(low=0.0)):
        ours.reducer = reducer
        assert_close(ours(emb, labels), expected)
    ours.reducer = ThresholdReducer(high=expected.item() / 2)
    assert ours(emb, labels).item() == 0.0
    ours.reducer = DivisorReducer()
    with pytest.raises(ValueError, match="DivisorReducer divides by a count"):
        ours(emb, labels)


# ------------------------------------------------------------- blocks and large batches


def test_positive_lists_pads_each_row() -> None:
    targets = torch.tensor([[1, 0, 1, 1], [0, 1, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    index, valid = positive_lists(targets)
    assert valid.tolist() == [[True, True, True], [True, False, False], [False] * 3]
    assert index[0].tolist() == [0, 2, 3] and index[1, 0].item() == 1


@pytest.mark.parametrize("loss_cls", [PNPLoss, SmoothAPLoss])
def test_blocks_do_not_change_the_result(loss_cls) -> None:
    labels = torch.randperm(96, generator=torch.Generator().manual_seed(3)) % 12
    emb = _embeddings(labels)
    whole = _value_and_grad(loss_cls(chunk_elements=1 << 30), emb, labels)
    for chunk in (1, 500, 3000):
        blocked = _value_and_grad(loss_cls(chunk_elements=chunk), emb, labels)
        torch.testing.assert_close(blocked[0], whole[0], rtol=1e-12, atol=0)
        torch.testing.assert_close(blocked[1], whole[1], rtol=1e-12, atol=1e-18)


@pytest.mark.parametrize("loss_cls", [PNPLoss, SmoothAPLoss])
def test_large_batch_in_bounded_blocks(loss_cls) -> None:
    """1024 items, 8 per class, in blocks of 2**16 elements (PML needs (N, N, N) tensors,
    4 GiB each in float32); the gradient stays finite and every item gets one."""
    labels = torch.arange(1024) // 8
    emb = torch.randn(1024, 32)
    value, grad = _value_and_grad(loss_cls(chunk_elements=1 << 16), emb, labels)
    assert torch.isfinite(value) and value.item() > 0
    assert torch.isfinite(grad).all() and bool((grad.abs().sum(1) > 0).all())


def test_registered() -> None:
    for loss_cls in (HistogramLoss, RankedListLoss, PNPLoss, SmoothAPLoss):
        assert LOSSES.entries()[loss_cls.__name__] is loss_cls


# ----------------------------------------------------------- random batches (hypothesis)

SETTINGS = settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)


@st.composite
def labelled_batches(draw):
    n = draw(st.integers(1, 20))
    labels = torch.randint(
        0,
        draw(st.integers(1, n)),
        (n,),
        generator=torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1))),
    )
    return _embeddings(labels, seed=draw(st.integers(0, 1000))), labels


@pytest.mark.parametrize(
    "name", ["histogram_25_bins", "ranked_list_all_options", "pnp_Ds", "pnp_Dq", "pnp_Ib"]
)
@SETTINGS
@given(batch=labelled_batches())
def test_matches_pml_on_random_batches(name: str, batch) -> None:
    emb, labels = batch
    ours, theirs = PML_CASES[name]()
    assert_matches_pml(ours, theirs, emb, labels)


@st.composite
def equal_class_batches(draw):
    classes, per_class = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    labels = torch.randperm(classes, generator=g).repeat_interleave(per_class)
    if draw(st.booleans()):
        labels = labels[torch.randperm(len(labels), generator=g)]
    return _embeddings(labels, seed=draw(st.integers(0, 1000))), labels


@SETTINGS
@given(batch=equal_class_batches(), temperature=st.sampled_from([0.01, 0.1, 1.0]))
def test_smooth_ap_matches_oracle_on_random_batches(batch, temperature: float) -> None:
    emb, labels = batch
    leaf = emb.clone().requires_grad_(True)
    expected = smooth_ap_oracle(leaf, labels, temperature)
    (expected_grad,) = torch.autograd.grad(expected, leaf)
    value, grad = _value_and_grad(SmoothAPLoss(temperature), emb, labels)
    assert_close(value, expected)
    assert_close(grad, expected_grad)
