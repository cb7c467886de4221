"""Device→host synchronisations in a training step, counted by dispatch on the CPU
(:mod:`host_syncs`): every registered loss, alone and after every registered miner.

A loss call reads its input checks (NaN/Inf, class ranges, index ranges) from the device once,
and not at all with :func:`dmlkit.finite_checks` off; its forward and backward read nothing else,
except where a tensor's shape depends on the data (:data:`SHAPE_READS`).
"""

from __future__ import annotations

import threading

import pytest
import torch

import dmlkit
import dmlkit.losses as dl
import dmlkit.miners as dm
from components import ALL_LOSSES, ALL_MINERS, make
from dmlkit.validation import finite_checks_enabled
from host_syncs import HostSyncCounter

N_CLASSES, PER_CLASS, DIM = 12, 4, 16  # 48 items: a multiple of 3 for the packaged triplets

SHAPE_READS: dict[str, str] = {
    "AngularLoss": "lists the positive pairs (their number sizes the work, blockwise over pairs "
    "× references; a dense form costs N·M² work)",
    "TripletMarginLoss": "lists the positive pairs (their number sizes the blocks of "
    "pairs × references; a dense form costs N·M² work)",
    "DynamicSoftMarginLoss": "lists the positive pairs (their number sizes the blocks of "
    "pairs × references; a dense form costs N·M² work)",
    "TupletMarginLoss": "lists the positive pairs; the dense (N, M) form without the list "
    "measured 70% slower on CPU at batch 1024",
    "NPairsLoss": "the number of labels with two items is the size of the (P, P) matrix",
    "PNPLoss": "the largest number of positives of an anchor is the width of the (B, K, N) blocks",
    "SmoothAPLoss": "the class size is the width of the (B, K, N) blocks",
}
"""The losses whose forward reads one value because a tensor's shape depends on it, and why."""


def _batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    embeddings = torch.randn(N_CLASSES * PER_CLASS, DIM, generator=generator)
    labels = torch.arange(N_CLASSES).repeat_interleave(PER_CLASS)
    return embeddings.requires_grad_(), labels


def _step_syncs(loss: torch.nn.Module, checks: bool) -> HostSyncCounter:
    embeddings, labels = _batch()
    with dmlkit.finite_checks(checks), HostSyncCounter() as syncs:
        loss(embeddings, labels).backward()
    return syncs


def test_the_counter_sees_syncing_operations() -> None:
    x = torch.arange(6.0)
    with HostSyncCounter() as syncs:
        (x > 2).nonzero()
        x[x > 2]
        float(x.sum())
        torch.bincount(x.long(), minlength=8)  # CUDA reads the min and max whatever minlength
        x.new_tensor(2.0)
        x.cumsum(0)  # no sync
        x.new_full((), 2.0)  # no sync
    assert syncs.reasons == {
        "nonzero": 1,
        "boolean-mask indexing": 1,
        "item": 1,
        "bincount": 1,
        "host→device copy": 1,
    }


@pytest.mark.parametrize("cls", ALL_LOSSES, ids=lambda c: c.__name__)
def test_a_loss_reads_nothing_with_checks_off(cls: type) -> None:
    syncs = _step_syncs(make(cls, embedding_size=DIM), checks=False)
    assert syncs.total == (cls.__name__ in SHAPE_READS), syncs


@pytest.mark.parametrize("cls", ALL_LOSSES, ids=lambda c: c.__name__)
def test_a_loss_reads_its_input_checks_once(cls: type) -> None:
    syncs = _step_syncs(make(cls, embedding_size=DIM), checks=True)
    assert syncs.total == 1 + (cls.__name__ in SHAPE_READS), syncs


def _loss_for(mined: tuple[torch.Tensor, ...]) -> torch.nn.Module:
    return dl.TripletMarginLoss() if len(mined) == 3 else dl.ContrastiveLoss()


@pytest.mark.parametrize("cls", ALL_MINERS, ids=lambda c: c.__name__)
def test_a_loss_given_mined_tuples_reads_nothing(cls: type) -> None:
    embeddings, labels = _batch()
    with dmlkit.finite_checks(False):
        mined = make(cls, embedding_size=DIM)(embeddings, labels)
        with HostSyncCounter() as syncs:
            _loss_for(mined)(embeddings, labels, mined).backward()
    assert syncs.total == 0, syncs


MINED_SHAPE_READS: dict[str, str] = {
    "NPairsLoss": "the number of distinct anchor labels of the mined pairs is the size of the "
    "(P, P) matrix",
    "SmoothAPLoss": "the class size is the width of the (B, K, N) blocks, as without tuples",
}
"""The losses that, given mined tuples, read one value because a tensor's shape depends on it."""


@pytest.mark.parametrize("kind", ["pairs", "triplets"])
@pytest.mark.parametrize("cls", ALL_LOSSES, ids=lambda c: c.__name__)
def test_every_loss_given_mined_tuples_reads_nothing(
    cls: type[dl.BaseMetricLossFunction], kind: str
) -> None:
    if not cls.supports_indices_tuple:
        pytest.skip(f"{cls.__name__} takes no indices_tuple")
    embeddings, labels = _batch()
    miner = dm.PairMarginMiner() if kind == "pairs" else dm.TripletMarginMiner(margin=0.5)
    with dmlkit.finite_checks(False):
        mined = miner(embeddings, labels)
        assert mined[0].numel() > 0
        loss = make(cls, embedding_size=DIM)
        with HostSyncCounter() as syncs:
            loss(embeddings, labels, mined).backward()
    assert syncs.total == (cls.__name__ in MINED_SHAPE_READS), syncs


MINER_SHAPE_READS: dict[str, str] = {
    "TripletMarginMiner": "lists the positive pairs, then the triplets: the triplet count "
    "cannot be known without either the pair list or a dense N·M² pass",
    "AngularMiner": "lists the positive pairs, then the triplets, as TripletMarginMiner",
}
"""The miners that read two sizes (over the target of one), and why."""


@pytest.mark.parametrize("cls", ALL_MINERS, ids=lambda c: c.__name__)
def test_a_miner_and_loss_step_reads_at_most_once(cls: type) -> None:
    # The one read allowed: the number of mined tuples, a shape.
    embeddings, labels = _batch()
    with dmlkit.finite_checks(False), HostSyncCounter() as syncs:
        mined = make(cls, embedding_size=DIM)(embeddings, labels)
        _loss_for(mined)(embeddings, labels, mined).backward()
    assert syncs.total <= 1 + (cls.__name__ in MINER_SHAPE_READS), syncs
    if cls.__name__ in MINER_SHAPE_READS:
        assert syncs.total == 2, syncs  # an improvement must update the list


@pytest.mark.parametrize("cls", ALL_MINERS, ids=lambda c: c.__name__)
def test_a_loss_given_mined_tuples_reads_its_checks_once(cls: type) -> None:
    embeddings, labels = _batch()
    mined = make(cls, embedding_size=DIM)(embeddings, labels)
    with HostSyncCounter() as syncs:
        _loss_for(mined)(embeddings, labels, mined).backward()
    assert syncs.total == 1, syncs


def test_non_finite_embeddings_raise_with_checks_on_and_pass_with_them_off() -> None:
    embeddings, labels = _batch()
    embeddings = embeddings.detach().clone()
    embeddings[3, 2] = float("nan")
    assert finite_checks_enabled()
    with pytest.raises(ValueError, match=r"embeddings contains non-finite values \(1 NaN, 0 Inf\)"):
        dl.ContrastiveLoss()(embeddings, labels)
    with dmlkit.finite_checks(False):
        assert torch.isnan(dl.ContrastiveLoss()(embeddings, labels))
    assert finite_checks_enabled()


def test_out_of_range_inputs_raise_from_the_one_read() -> None:
    embeddings, labels = _batch()
    arcface = dl.ArcFaceLoss(num_classes=N_CLASSES, embedding_size=DIM)
    with HostSyncCounter() as syncs, pytest.raises(ValueError, match=r"labels holds 12"):
        arcface(embeddings, labels + 1)
    # The one read of every check (any failed?), then, only because one failed, which one
    # (argmax) and its message's look-up of the first label out of range.
    assert syncs.reasons == {"item": 3, "boolean-mask indexing": 1}, syncs
    mined = (torch.tensor([0, 1]), torch.tensor([1, 2]), torch.tensor([4, 99]))
    with (
        HostSyncCounter() as syncs,
        pytest.raises(ValueError, match=r"indices_tuple\[n\] has indices outside \[0, 48\)"),
    ):
        dl.TripletMarginLoss()(embeddings, labels, mined)
    # The one read, which check failed, and the message's min and max.
    assert syncs.reasons == {"item": 4}, syncs
    valid = (*mined[:2], torch.tensor([4, 9]))
    with HostSyncCounter() as syncs:
        arcface(embeddings, labels)
        dl.TripletMarginLoss()(embeddings, labels, valid)
    assert syncs.reasons == {"item": 2}, syncs  # valid inputs: the one read of each call


def test_set_finite_checks_holds_until_set_back() -> None:
    embeddings, labels = _batch()
    dmlkit.set_finite_checks(False)
    try:
        with HostSyncCounter() as syncs:
            dl.ContrastiveLoss()(embeddings, labels).backward()
        assert syncs.total == 0
    finally:
        dmlkit.set_finite_checks(True)
    assert finite_checks_enabled()


def test_finite_checks_turned_off_in_one_thread_stay_on_in_another() -> None:
    off, done = threading.Event(), threading.Event()
    seen: list[bool] = []

    def turn_off_and_hold() -> None:
        with dmlkit.finite_checks(False):
            off.set()
            done.wait()

    def read() -> None:
        seen.append(finite_checks_enabled())

    holder = threading.Thread(target=turn_off_and_hold)
    holder.start()
    try:
        assert off.wait(timeout=10)
        reader = threading.Thread(target=read)
        reader.start()
        reader.join()
        assert finite_checks_enabled()
    finally:
        done.set()
        holder.join()
    assert seen == [True]
