"""``anchor_in_ref``: an anchor's own row in the reference set is left out exactly as the diagonal
is in a batch against itself, from the labelled pairs and from a given ``indices_tuple`` (PML's
``CrossBatchMemory`` removes these self comparisons), for every loss and miner.

The references are computed without ``anchor_in_ref``: the in-batch call, tuples filtered entry
by entry in Python, and mining the union of the memory and the batch as one batch.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

import dmlkit.losses as dl
import dmlkit.miners as dm
from components import ALL_LOSSES, ALL_MINERS, make
from conftest import assert_close
from dmlkit.functional import drop_self_pairs
from dmlkit.functional.mining import tolerances_from_ratio

F64 = torch.float64
RTOL = 1e-9  # float64, the same sums in another order
REF_LOSSES = [c for c in ALL_LOSSES if c.supports_ref]
# The memory-bank tests state their expectation as a tuple of pairs; a loss whose tuple weighs
# items (NCA) is checked against an oracle in its own tests instead.
PAIR_TUPLE_REF_LOSSES = [c for c in REF_LOSSES if not c.tuple_weighs_items]
N, M, CLASSES = 24, 20, 6


def _clustered(labels: Tensor, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(CLASSES, 8, generator=g, dtype=F64)
    return centres[labels] * 0.7 + torch.randn(len(labels), 8, generator=g, dtype=F64)


def _batch() -> tuple[Tensor, Tensor]:
    labels = torch.arange(N) % CLASSES
    return _clustered(labels, 0), labels


def _memory_bank(in_bank: int = N) -> tuple[Tensor, Tensor, Tensor]:
    """M other items followed by the batch's first ``in_bank`` items, and each anchor's row
    (−1 for the anchors left out of the bank)."""
    emb, labels = _batch()
    other_labels = torch.arange(M) % (CLASSES - 1)  # the last class only in the batch
    ref = torch.cat([_clustered(other_labels, 1), emb[:in_bank]])
    ref_labels = torch.cat([other_labels, labels[:in_bank]])
    rows = torch.arange(N) + M
    anchor_in_ref = torch.where(torch.arange(N) < in_bank, rows, -1)
    return ref, ref_labels, anchor_in_ref


def _without_self(indices: tuple[Tensor, ...], anchor_in_ref: Tensor) -> tuple[Tensor, ...]:
    """The tuple without the entries pairing an anchor with its own row, entry by entry."""
    own = anchor_in_ref.tolist()
    if len(indices) == 3:
        kept = [
            (a, p, n)
            for a, p, n in zip(*(t.tolist() for t in indices), strict=True)
            if own[a] not in (p, n)
        ]
        return tuple(torch.tensor(col, dtype=torch.long) for col in zip(*kept, strict=True))
    a1, p, a2, n = (t.tolist() for t in indices)
    pos = [(a, j) for a, j in zip(a1, p, strict=True) if own[a] != j]
    neg = [(a, j) for a, j in zip(a2, n, strict=True) if own[a] != j]
    return tuple(
        torch.tensor(col, dtype=torch.long)
        for col in (*zip(*pos, strict=True), *zip(*neg, strict=True))
    )


def _all_pairs(labels: Tensor, ref_labels: Tensor) -> tuple[Tensor, ...]:
    """Every (anchor, reference) pair by label, self copies included, as PML lists them."""
    same = labels[:, None] == ref_labels[None, :]
    a1, p = same.nonzero(as_tuple=True)
    a2, n = (~same).nonzero(as_tuple=True)
    return a1, p, a2, n


def _value_and_grads(
    loss: torch.nn.Module, emb: Tensor, labels: Tensor, indices, ref=None, ref_labels=None, **kw
) -> tuple[Tensor, ...]:
    x = emb.clone().requires_grad_(True)
    if ref is None:
        value = loss(x, labels, indices, **kw)
        return (value.detach(), *torch.autograd.grad(value, x))
    r = ref.clone().requires_grad_(True)
    value = loss(x, labels, indices, r, ref_labels, **kw)
    return (value.detach(), *torch.autograd.grad(value, (x, r), allow_unused=True))


def _assert_same(actual: tuple[Tensor, ...], expected: tuple[Tensor, ...]) -> None:
    assert torch.isfinite(actual[0])
    for a, e in zip(actual, expected, strict=True):
        assert_close(a, e, RTOL)


# ---------------------------------------------------------------------------- losses


def _in_batch_tuple(kind: str | None, emb: Tensor, labels: Tensor):
    if kind is None:
        return None
    miner = dm.MultiSimilarityMiner(epsilon=0.3) if kind == "pairs" else dm.BatchHardMiner()
    indices = miner(emb, labels)
    assert len(indices[0]) > 0
    return indices


@pytest.mark.parametrize("kind", [None, "pairs", "triplets"])
@pytest.mark.parametrize("loss_cls", ALL_LOSSES, ids=lambda c: c.__name__)
def test_loss_with_the_batch_as_its_own_reference_equals_the_in_batch_loss(
    loss_cls: type[dl.BaseMetricLossFunction], kind: str | None
) -> None:
    emb, labels = _batch()
    indices = _in_batch_tuple(kind, emb, labels)
    if not loss_cls.supports_ref:
        with pytest.raises(ValueError, match="does not support ref_emb"):
            make(loss_cls, 8)(emb, labels, indices, emb, labels, torch.arange(N))
        return
    expected = _value_and_grads(make(loss_cls, 8), emb, labels, indices)
    x = emb.clone().requires_grad_(True)
    value = make(loss_cls, 8)(x, labels, indices, x, labels, anchor_in_ref=torch.arange(N))
    _assert_same((value.detach(), *torch.autograd.grad(value, x)), expected)


@pytest.mark.parametrize("in_bank", [N, N - 5], ids=["whole_batch", "partial"])
@pytest.mark.parametrize("loss_cls", PAIR_TUPLE_REF_LOSSES, ids=lambda c: c.__name__)
def test_memory_bank_loss_equals_the_loss_over_the_pairs_without_self(
    loss_cls: type[dl.BaseMetricLossFunction], in_bank: int
) -> None:
    emb, labels = _batch()
    ref, ref_labels, anchor_in_ref = _memory_bank(in_bank)
    filtered = _without_self(_all_pairs(labels, ref_labels), anchor_in_ref)
    expected = _value_and_grads(make(loss_cls, 8), emb, labels, filtered, ref, ref_labels)
    actual = _value_and_grads(
        make(loss_cls, 8), emb, labels, None, ref, ref_labels, anchor_in_ref=anchor_in_ref
    )
    _assert_same(actual, expected)


# Miners that, run against the memory without anchor_in_ref, mine the anchors' own rows.
SELF_MINING = {
    "pairs": lambda: dm.PairMarginMiner(pos_margin=-1.0, neg_margin=4.0),
    "triplets": lambda: dm.TripletMarginMiner(margin=4.0),
}


@pytest.mark.parametrize("kind", list(SELF_MINING))
@pytest.mark.parametrize("loss_cls", PAIR_TUPLE_REF_LOSSES, ids=lambda c: c.__name__)
def test_memory_bank_loss_drops_self_pairs_from_a_mined_tuple(
    loss_cls: type[dl.BaseMetricLossFunction], kind: str
) -> None:
    emb, labels = _batch()
    ref, ref_labels, anchor_in_ref = _memory_bank()
    mined = SELF_MINING[kind]()(emb, labels, ref, ref_labels)
    filtered = _without_self(mined, anchor_in_ref)
    assert 0 < len(filtered[0]) < len(mined[0])  # the tuple did hold self pairs
    expected = _value_and_grads(make(loss_cls, 8), emb, labels, filtered, ref, ref_labels)
    actual = _value_and_grads(
        make(loss_cls, 8), emb, labels, mined, ref, ref_labels, anchor_in_ref=anchor_in_ref
    )
    _assert_same(actual, expected)


@pytest.mark.parametrize("loss_cls", REF_LOSSES, ids=lambda c: c.__name__)
def test_without_anchor_in_ref_the_reference_set_is_distinct_items(
    loss_cls: type[dl.BaseMetricLossFunction],
) -> None:
    emb, labels = _batch()
    ref, ref_labels, _ = _memory_bank()
    expected = _value_and_grads(
        make(loss_cls, 8), emb, labels, _all_pairs(labels, ref_labels), ref, ref_labels
    )
    _assert_same(_value_and_grads(make(loss_cls, 8), emb, labels, None, ref, ref_labels), expected)
    nobody = torch.full((N,), -1)
    _assert_same(
        _value_and_grads(
            make(loss_cls, 8), emb, labels, None, ref, ref_labels, anchor_in_ref=nobody
        ),
        expected,
    )


def test_a_negative_at_the_anchors_own_row_is_dropped_too() -> None:
    # Without labels nothing stops a tuple from naming an anchor's own row as a negative.
    emb, _ = _batch()
    ref, _, anchor_in_ref = _memory_bank()
    a, p, n = torch.tensor([0, 0, 1, 2]), torch.tensor([3, M, 4, 5]), torch.tensor([M, 6, 7, M + 2])
    assert [t.tolist() for t in drop_self_pairs((a, p, n), anchor_in_ref)] == [[1], [4], [7]]
    pairs = (a, p, a, n)
    kept = drop_self_pairs(pairs, anchor_in_ref)
    assert [t.tolist() for t in kept] == [[0, 1, 2], [3, 4, 5], [0, 1], [6, 7]]
    loss = dl.ContrastiveLoss()
    expected = loss(emb, None, kept, ref)
    assert_close(loss(emb, None, pairs, ref, anchor_in_ref=anchor_in_ref), expected, RTOL)
    assert not torch.isclose(loss(emb, None, pairs, ref), expected)


# ---------------------------------------------------------------------------- miners


@pytest.mark.parametrize("miner_cls", ALL_MINERS, ids=lambda c: c.__name__)
def test_miner_with_the_batch_as_its_own_reference_mines_as_in_batch(
    miner_cls: type[dm.BaseMiner],
) -> None:
    emb, labels = _batch()
    miner = miner_cls()
    torch.manual_seed(0)  # the same draws for the random miners
    expected = miner(emb, labels)
    expected_stats = miner.last_stats
    assert len(expected[0]) > 0
    torch.manual_seed(0)
    mined = miner(emb, labels, emb, labels, torch.arange(N))
    assert len(mined) == len(expected)
    for got, want in zip(mined, expected, strict=True):
        assert torch.equal(got, want)
    assert miner.last_stats == expected_stats


def _mine_the_union(miner: dm.BaseMiner, union: Tensor, union_labels: Tensor):
    """Mines memory ∪ batch as one batch (its diagonal excluded) and keeps the batch's anchors,
    renumbered: the expectation for a miner whose rule looks at one anchor's row at a time."""
    indices = miner(union, union_labels)
    if len(indices) == 3:
        keep = indices[0] >= M
        return indices[0][keep] - M, indices[1][keep], indices[2][keep]
    keep_pos, keep_neg = indices[0] >= M, indices[2] >= M
    return (
        indices[0][keep_pos] - M,
        indices[1][keep_pos],
        indices[2][keep_neg] - M,
        indices[3][keep_neg],
    )


@pytest.mark.parametrize("miner_cls", ALL_MINERS, ids=lambda c: c.__name__)
def test_memory_bank_mining_equals_mining_the_union(miner_cls: type[dm.BaseMiner]) -> None:
    if not miner_cls.mines_rows_independently:
        pytest.skip(f"{miner_cls.__name__} mines the batch as a whole: the union is no oracle")
    emb, labels = _batch()
    ref, ref_labels, anchor_in_ref = _memory_bank()
    miner = miner_cls()
    if isinstance(miner, dm.ATASMSMiner):
        # Its tolerances depend on counts over the batch's anchors: r = n_neg / N_pos, with n_neg
        # the negatives symmetric mining at ε keeps and N_pos every positive pair.
        counting = _mine_the_union(dm.MultiSimilarityMiner(miner.count_tolerance), ref, ref_labels)
        n_pos = int((labels[:, None] == ref_labels[None, :]).sum()) - N
        ratio = len(counting[2]) / n_pos
        gamma_pos, gamma_neg, _ = tolerances_from_ratio(ratio, miner.gamma_pos, miner.gamma_neg)
        reference: dm.BaseMiner = dm.ASMSMiner(gamma_pos, gamma_neg)
    else:
        ratio, reference = None, miner_cls()
    expected = _mine_the_union(reference, ref, ref_labels)
    mined = miner(emb, labels, ref, ref_labels, anchor_in_ref)
    assert len(expected[0]) > 0
    for got, want in zip(mined, expected, strict=True):
        assert torch.equal(got, want)
    if ratio is not None:
        assert miner.last_stats.ratio == pytest.approx(ratio, rel=1e-12)
        assert miner.last_stats.tau > 0  # the adaptive branch was exercised


# ---------------------------------------------------------------------------- validation


BAD = {
    "wrong length": (torch.arange(N - 1), "anchor_in_ref has length 23 but there are 24"),
    "float": (torch.arange(N).double(), "anchor_in_ref must have an integer dtype"),
    "bool": (torch.ones(N, dtype=torch.bool), "anchor_in_ref must have an integer dtype"),
    "2-D": (torch.arange(N)[:, None], "anchor_in_ref must be 1-D"),
    "too large": (
        torch.arange(N) + M + 1,
        r"anchor_in_ref must hold -1 or a row of ref_emb in \[0, 44\)",
    ),
    "below -1": (torch.arange(N) - 2, r"anchor_in_ref must hold -1 or a row of ref_emb"),
}


@pytest.mark.parametrize("case", list(BAD))
@pytest.mark.parametrize("factory", [*REF_LOSSES, *ALL_MINERS], ids=lambda c: c.__name__)
def test_bad_anchor_in_ref_is_a_value_error_naming_it(factory, case: str) -> None:
    emb, labels = _batch()
    ref, ref_labels, _ = _memory_bank()
    value, message = BAD[case]
    with pytest.raises(ValueError, match=message):
        make(factory, 8)(emb, labels, ref_emb=ref, ref_labels=ref_labels, anchor_in_ref=value)


@pytest.mark.parametrize("factory", [*ALL_LOSSES, *ALL_MINERS], ids=lambda c: c.__name__)
def test_anchor_in_ref_without_ref_emb_is_a_value_error(factory) -> None:
    emb, labels = _batch()
    with pytest.raises(ValueError, match="anchor_in_ref was given without ref_emb"):
        make(factory, 8)(emb, labels, anchor_in_ref=torch.arange(N))
