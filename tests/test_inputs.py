"""Bad input gets a ValueError naming the problem; empty selections give graph-carrying zeros;
half precision gives finite losses."""

from __future__ import annotations

import inspect

import pytest
import torch

import dmlkit.losses as dl
import dmlkit.miners as dm
from components import ALL_LOSSES, ALL_MINERS, make
from conftest import assert_close
from dmlkit.distances import DotProductSimilarity, LpDistance
from dmlkit.reducers import AvgNonZeroReducer, DivisorReducer, MeanReducer, SumReducer

CALLABLES = ALL_LOSSES + ALL_MINERS


def _batch(n: int = 8, d: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(n, d), torch.arange(n) // 2


@pytest.mark.parametrize("factory", CALLABLES, ids=lambda c: c.__name__)
class TestBadInput:
    def test_embeddings_not_2d(self, factory) -> None:
        _, labels = _batch()
        with pytest.raises(ValueError, match="embeddings must be 2-D"):
            make(factory)(torch.randn(8), labels)
        with pytest.raises(ValueError, match="embeddings must be 2-D"):
            make(factory)(torch.randn(8, 2, 2), labels)

    def test_labels_not_1d(self, factory) -> None:
        emb, labels = _batch()
        with pytest.raises(ValueError, match="labels must be 1-D"):
            make(factory)(emb, labels[:, None, None])
        with pytest.raises(ValueError, match=r"squeeze it to one label per item"):
            make(factory)(emb, labels[:, None])
        with pytest.raises(ValueError, match=r"read as multi-hot .* must hold only 0 and 1"):
            make(factory)(emb, torch.stack([labels, labels], dim=1) + 2)

    def test_labels_wrong_length(self, factory) -> None:
        emb, labels = _batch()
        with pytest.raises(ValueError, match="labels has length 7 but there are 8 embeddings"):
            make(factory)(emb, labels[:7])

    def test_non_integer_labels(self, factory) -> None:
        emb, labels = _batch()
        with pytest.raises(ValueError, match="integer dtype"):
            make(factory)(emb, labels.float())
        with pytest.raises(ValueError, match="integer dtype"):
            make(factory)(emb, labels > 1)

    @pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
    def test_non_finite_embeddings(self, factory, bad: float) -> None:
        emb, labels = _batch()
        emb[3, 1] = bad
        with pytest.raises(ValueError, match="non-finite"):
            make(factory)(emb, labels)

    def test_ref_emb_without_ref_labels(self, factory) -> None:
        emb, labels = _batch()
        if not getattr(factory, "supports_ref", True):
            with pytest.raises(ValueError, match="does not support ref_emb"):
                make(factory)(emb, labels, ref_emb=emb.clone())
            return
        call = make(factory)
        kwargs = {"ref_emb": torch.randn(5, 4)}
        with pytest.raises(ValueError, match="ref_emb was given without ref_labels"):
            call(emb, labels, **kwargs)

    def test_ref_dimension_mismatch(self, factory) -> None:
        if not getattr(factory, "supports_ref", True):
            pytest.skip(f"{factory.__name__} rejects ref_emb outright")
        emb, labels = _batch()
        with pytest.raises(ValueError, match="ref_emb has embedding size 3"):
            make(factory)(emb, labels, ref_emb=torch.randn(5, 3), ref_labels=torch.arange(5))

    def test_not_a_tensor(self, factory) -> None:
        _, labels = _batch()
        with pytest.raises(TypeError, match=r"embeddings must be a torch\.Tensor"):
            make(factory)([[0.0, 1.0]] * 8, labels)


def _tuple_error(loss_cls, message: str) -> str:
    """The error a bad tuple gets: its own, or the refusal of a loss that takes none."""
    return message if loss_cls.supports_indices_tuple else "does not support indices_tuple"


@pytest.mark.parametrize("loss_cls", ALL_LOSSES, ids=lambda c: c.__name__)
class TestIndicesTuple:
    def test_wrong_arity(self, loss_cls) -> None:
        emb, labels = _batch()
        idx = torch.tensor([0, 1])
        with pytest.raises(ValueError, match=_tuple_error(loss_cls, "got 2")):
            make(loss_cls)(emb, labels, (idx, idx))
        with pytest.raises(ValueError, match=_tuple_error(loss_cls, "got 5")):
            make(loss_cls)(emb, labels, (idx,) * 5)

    def test_wrong_length(self, loss_cls) -> None:
        emb, labels = _batch()
        with pytest.raises(ValueError, match=_tuple_error(loss_cls, "equal lengths")):
            make(loss_cls)(
                emb, labels, (torch.tensor([0, 1]), torch.tensor([1, 0]), torch.tensor([2]))
            )
        with pytest.raises(ValueError, match=_tuple_error(loss_cls, r"len\(a1\) == len\(p\)")):
            make(loss_cls)(
                emb,
                labels,
                (torch.tensor([0]), torch.tensor([1, 0]), torch.tensor([2]), torch.tensor([3])),
            )

    def test_out_of_range(self, loss_cls) -> None:
        emb, labels = _batch()
        with pytest.raises(ValueError, match=_tuple_error(loss_cls, r"outside \[0, 8\)")):
            make(loss_cls)(emb, labels, (torch.tensor([0]), torch.tensor([8]), torch.tensor([2])))
        with pytest.raises(ValueError, match=_tuple_error(loss_cls, r"outside \[0, 8\)")):
            make(loss_cls)(emb, labels, (torch.tensor([-1]), torch.tensor([1]), torch.tensor([2])))

    def test_float_indices(self, loss_cls) -> None:
        emb, labels = _batch()
        idx = torch.tensor([0.0])
        with pytest.raises(ValueError, match=_tuple_error(loss_cls, "must be integer")):
            make(loss_cls)(emb, labels, (idx, idx, idx))


def test_ref_indices_address_the_reference_set() -> None:
    emb, labels = _batch()
    ref, ref_labels = torch.randn(20, 4), torch.arange(20) % 4
    loss = dl.ContrastiveLoss()
    loss(
        emb,
        labels,
        (torch.tensor([7]), torch.tensor([19]), torch.tensor([7]), torch.tensor([0])),
        ref,
        ref_labels,
    )
    with pytest.raises(ValueError, match=r"indices_tuple\[a1\] has indices outside \[0, 8\)"):
        loss(
            emb,
            labels,
            (torch.tensor([8]), torch.tensor([0]), torch.tensor([0]), torch.tensor([0])),
            ref,
            ref_labels,
        )


@pytest.mark.parametrize("loss_cls", ALL_LOSSES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("case", ["no_pairs_mined", "no_triplets_mined", "single_item"])
def test_empty_selection_is_a_zero_with_a_graph(loss_cls, case: str) -> None:
    emb = torch.randn(6, 4, requires_grad=True)
    labels = torch.arange(6) // 2
    empty = torch.empty(0, dtype=torch.long)
    indices = None
    if case == "no_pairs_mined":
        indices = (empty, empty, empty, empty)
    elif case == "no_triplets_mined":
        indices = (empty, empty, empty)
    else:
        emb = torch.randn(1, 4, requires_grad=True)
        labels = torch.tensor([3])
    loss_fn = make(loss_cls)
    if indices is not None and not loss_cls.supports_indices_tuple:
        with pytest.raises(ValueError, match="does not support indices_tuple"):
            loss_fn(emb, labels, indices)  # as PML's
        return
    loss = loss_fn(emb, labels, indices)
    assert isinstance(loss, torch.Tensor) and loss.ndim == 0
    assert loss.requires_grad
    if indices is not None and loss_cls.tuple_weighs_items:
        # PML's rule for losses whose tuple weighs items: an empty one weighs every item 1.
        assert_close(loss, loss_fn(emb.detach(), labels))
        return
    if indices is None and any(True for _ in loss_fn.parameters()):
        # One item compared with the loss's own weights (proxies, class weights): not empty.
        assert torch.isfinite(loss) and loss.item() != 0.0
        return
    assert loss.item() == 0.0
    loss.backward()
    assert emb.grad is not None and torch.all(emb.grad == 0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("loss_cls", ALL_LOSSES, ids=lambda c: c.__name__)
def test_half_precision_gives_finite_losses_close_to_float32(loss_cls, dtype) -> None:
    torch.manual_seed(1)
    labels = torch.arange(64) // 4
    base = torch.randn(16, 32)[labels] * 0.8 + torch.randn(64, 32)
    half = base.to(dtype).requires_grad_(True)
    loss_fn = make(loss_cls, 32)  # one instance: the same weights, if any, for both calls
    loss = loss_fn(half, labels)
    assert loss.dtype == dtype and torch.isfinite(loss)
    loss.backward()
    assert half.grad is not None and torch.isfinite(half.grad).all()
    reference = loss_fn(half.detach().float(), labels)
    torch.testing.assert_close(loss.float(), reference, rtol=2e-2, atol=1e-3)


@pytest.mark.parametrize("loss_cls", ALL_LOSSES, ids=lambda c: c.__name__)
def test_a_callers_autocast_leaves_the_loss_in_float32(loss_cls) -> None:
    """Under the caller's bf16 autocast a loss computes as without it (products in float32),
    where an autocast product would come back in half and mix dtypes."""
    torch.manual_seed(2)
    labels = torch.arange(48) // 4
    emb = (torch.randn(12, 16)[labels] + torch.randn(48, 16)).requires_grad_(True)
    loss_fn = make(loss_cls, 16)
    torch.manual_seed(0)
    expected = loss_fn(emb, labels)
    torch.manual_seed(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = loss_fn(emb, labels)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    got.backward()
    assert emb.grad is not None and torch.isfinite(emb.grad).all()


@pytest.mark.parametrize("miner_cls", ALL_MINERS, ids=lambda c: c.__name__)
def test_miners_run_in_half_precision(miner_cls) -> None:
    labels = torch.arange(24) // 4  # a multiple of 3: packaged triplets need one
    for dtype in (torch.float16, torch.bfloat16):
        out = miner_cls()(torch.randn(24, 16).to(dtype), labels)
        assert all(t.dtype == torch.long for t in out)


def test_mined_tuples_do_not_depend_on_gradients() -> None:
    emb = torch.randn(16, 8, requires_grad=True)
    out = dm.MultiSimilarityMiner()(emb, torch.arange(16) // 4)
    assert all(not t.requires_grad for t in out)


@pytest.mark.parametrize("loss_cls", ALL_LOSSES, ids=lambda c: c.__name__)
def test_empty_reference_set_and_empty_batch_give_zero(loss_cls) -> None:
    emb = torch.randn(3, 4, requires_grad=True)
    labels = torch.tensor([0, 1, 0])
    cases = [(emb, labels, torch.randn(0, 4), torch.zeros(0, dtype=torch.long))]
    if not loss_cls.supports_ref:
        cases = []
    cases.append(
        (torch.randn(0, 4, requires_grad=True), torch.zeros(0, dtype=torch.long), None, None)
    )
    for x, y, ref, ref_y in cases:
        for loss in (
            make(loss_cls),
            *(
                [dl.TripletMarginLoss(triplets_per_anchor=2)]
                if loss_cls is dl.TripletMarginLoss
                else []
            ),
        ):
            value = loss(x, y, None, ref, ref_y)
            assert value.item() == 0.0
            value.backward()


@pytest.mark.parametrize("miner_cls", ALL_MINERS, ids=lambda c: c.__name__)
def test_miners_on_empty_reference_set_and_empty_batch(miner_cls) -> None:
    emb, labels = torch.randn(3, 4), torch.tensor([0, 1, 0])
    for args in (
        (emb, labels, torch.randn(0, 4), torch.zeros(0, dtype=torch.long)),
        (torch.randn(0, 4), torch.zeros(0, dtype=torch.long)),
    ):
        out = miner_cls()(*args)
        assert all(t.numel() == 0 and t.dtype == torch.long for t in out)


def test_masked_logsumexp_fractional_weights() -> None:
    from dmlkit.functional import masked_logsumexp

    x = torch.tensor([[0.0, 10.0], [1.0, -2.0]], dtype=torch.float64)
    w = torch.tensor([[1.0, 0.5], [0.0, 2.5]], dtype=torch.float64)
    lse, nonempty = masked_logsumexp(x, w)
    expected = torch.log((w * x.exp()).sum(1, keepdim=True))
    torch.testing.assert_close(lse, expected)
    assert nonempty.tolist() == [[1.0], [1.0]]
    lse1, _ = masked_logsumexp(x, w, add_one=True)
    torch.testing.assert_close(lse1, torch.log1p((w * x.exp()).sum(1, keepdim=True)))


PML_DEFAULT_REDUCERS = {
    dl.ContrastiveLoss: AvgNonZeroReducer(),
    dl.SignalToNoiseRatioContrastiveLoss: AvgNonZeroReducer(),
    dl.MarginLoss: DivisorReducer(),
    dl.ProxyAnchorLoss: DivisorReducer(),
    dl.TripletMarginLoss: AvgNonZeroReducer(),
    dl.CircleLoss: AvgNonZeroReducer(),
    dl.SupConLoss: AvgNonZeroReducer(),
}


@pytest.mark.parametrize("loss_cls", ALL_LOSSES, ids=lambda c: c.__name__)
def test_every_loss_shows_the_reducer_it_uses(loss_cls) -> None:
    expected = PML_DEFAULT_REDUCERS.get(loss_cls, MeanReducer())
    assert make(loss_cls).reducer == expected == loss_cls.default_reducer()
    assert make(loss_cls, reducer=SumReducer()).reducer == SumReducer()
    # The reducer shown is the one applied: passing it explicitly changes nothing.
    emb, labels = _batch(12)
    loss = make(loss_cls)
    with_reducer = make(loss_cls, reducer=expected)
    with_reducer.load_state_dict(loss.state_dict())  # the same weights, if any
    torch.testing.assert_close(with_reducer(emb, labels), loss(emb, labels))


SIMILARITY_ONLY = {
    dl.SoftContrastiveLoss,
    dl.SoftTripleLoss,
    dl.ManifoldLoss,
    dl.HistogramLoss,
    dm.ASMSMiner,
    dm.ATASMSMiner,
}


@pytest.mark.parametrize("factory", CALLABLES, ids=lambda c: c.__name__)
def test_similarity_requirement_is_checked_at_construction(factory) -> None:
    if "distance" not in inspect.signature(factory).parameters:
        pytest.skip(f"{factory.__name__} takes no distance (PML's ignores one)")
    requirement = factory.requires_similarity
    if isinstance(requirement, type):  # one distance class (CircleLoss: CosineSimilarity)
        assert requirement is not DotProductSimilarity
        with pytest.raises(
            ValueError, match=f"{factory.__name__} requires {requirement.__name__}, got Dot"
        ):
            make(factory, distance=DotProductSimilarity())
    elif factory in SIMILARITY_ONLY:
        assert factory.requires_similarity is True
        make(factory, distance=DotProductSimilarity(normalize_embeddings=False))
        with pytest.raises(ValueError, match=f"{factory.__name__} needs a similarity .*LpDistance"):
            make(factory, distance=LpDistance())
    else:
        assert factory.requires_similarity is False
        make(factory, distance=LpDistance(power=2))
        make(factory, distance=DotProductSimilarity())


SUPPLIES_A_DIVISOR = {dl.MarginLoss, dl.ProxyAnchorLoss}
"""The losses that give their reducer a divisor (PML's ``DivisorReducer`` reads it)."""


@pytest.mark.parametrize("loss_cls", ALL_LOSSES, ids=lambda c: c.__name__)
def test_divisor_reducer_is_refused_by_every_loss_that_supplies_no_divisor(loss_cls) -> None:
    """PML raises (a KeyError) where the loss has no divisor; a silent sum would be wrong. Every
    path counts: the fused kernels (ContrastiveLoss, SNR), the blockwise all-triplets sum and
    the mined-triplet path (TripletMarginLoss)."""
    emb, labels = _batch(12)
    tuple_ = (torch.tensor([0, 2, 4]), torch.tensor([1, 3, 5]), torch.tensor([2, 0, 0]))
    calls = [(None,), (tuple_,)] if loss_cls.supports_indices_tuple else [(None,)]
    losses = [make(loss_cls, reducer=DivisorReducer())]
    if loss_cls is dl.TripletMarginLoss:
        losses.append(dl.TripletMarginLoss(triplets_per_anchor=2, reducer=DivisorReducer()))
    for loss in losses:
        for (indices,) in calls:
            if loss_cls in SUPPLIES_A_DIVISOR:
                value = loss(emb, labels, indices)
                assert torch.isfinite(value) and value.item() > 0
            else:
                with pytest.raises(ValueError, match="DivisorReducer divides by a count"):
                    loss(emb, labels, indices)


def test_divisor_reducer_refuses_every_reduction_path_without_a_divisor() -> None:
    from dmlkit.functional import all_triplets_margin_loss

    x = torch.rand(5, 3)
    reducer = DivisorReducer()
    message = "DivisorReducer divides by a count"
    with pytest.raises(ValueError, match=message):
        reducer(x)
    with pytest.raises(ValueError, match=message):
        reducer.finish(x.sum(), torch.tensor(15.0))
    with pytest.raises(ValueError, match=message):
        reducer.reduce_elementwise(x, lambda t: (t * 2, torch.full_like(t, 2.0)), None)
    dist, neg = torch.rand(4, 4), torch.ones(4, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match=message):
        all_triplets_margin_loss(
            dist, torch.tensor([0, 1]), torch.tensor([1, 0]), neg, 0.1, reducer
        )
    assert_close(reducer(x, divisor=4), x.sum() / 4)
    assert_close(reducer.finish(x.sum(), torch.tensor(15.0), divisor=5), x.sum() / 5)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.uint8])
@pytest.mark.parametrize("loss_cls", ALL_LOSSES, ids=lambda c: c.__name__)
def test_labels_of_any_integer_dtype_give_the_int64_value(loss_cls, dtype) -> None:
    """Every loss, those with per-class parameters included (cross-entropy, one-hot and
    indexing take int64 only), gives the same value and gradients for int32 (int16, uint8)
    labels as for int64 ones."""
    torch.manual_seed(0)
    labels = torch.arange(12) // 3
    base = torch.randn(12, 4)
    loss = make(loss_cls)  # one instance: the same weights, if any, for both calls
    results = []
    for lab in (labels, labels.to(dtype)):
        torch.manual_seed(1)  # the same random triplets, if any
        emb = base.clone().requires_grad_(True)
        value = loss(emb, lab)
        value.backward()
        results.append((value.detach(), emb.grad))
    assert_close(results[1][0], results[0][0])
    assert_close(results[1][1], results[0][1])
