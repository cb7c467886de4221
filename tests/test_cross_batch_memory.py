"""CrossBatchMemory against PML 2.9's: the same losses over a sequence of calls that wraps the
memory around, with miners, an enqueue mask and a given tuple; its state saved and loaded."""

from __future__ import annotations

import pytest
import torch

import dmlkit.losses as dl
import dmlkit.miners as dm

pl = pytest.importorskip("pytorch_metric_learning.losses")
pm = pytest.importorskip("pytorch_metric_learning.miners")

from conftest import assert_close  # noqa: E402
from run_helpers import DIGITS_RUN  # noqa: E402

D, MEMORY = 8, 40

LOSSES = {
    "contrastive": lambda: (dl.ContrastiveLoss(), pl.ContrastiveLoss()),
    "triplet": lambda: (dl.TripletMarginLoss(), pl.TripletMarginLoss()),
    "multi_similarity": lambda: (dl.MultiSimilarityLoss(), pl.MultiSimilarityLoss()),
    "circle": lambda: (dl.CircleLoss(), pl.CircleLoss()),
    "ntxent": lambda: (dl.NTXentLoss(), pl.NTXentLoss()),
    "supcon": lambda: (dl.SupConLoss(), pl.SupConLoss()),
    "lifted": lambda: (dl.GeneralizedLiftedStructureLoss(), pl.GeneralizedLiftedStructureLoss()),
    "snr": lambda: (dl.SignalToNoiseRatioContrastiveLoss(), pl.SignalToNoiseRatioContrastiveLoss()),
}
MINERS = {
    None: lambda: (None, None),
    "ms": lambda: (dm.MultiSimilarityMiner(0.2), pm.MultiSimilarityMiner(0.2)),
    "pair_margin": lambda: (dm.PairMarginMiner(), pm.PairMarginMiner()),
}


def _batches(count: int, n: int = 12):
    g = torch.Generator().manual_seed(7)
    centres = torch.randn(5, D, generator=g, dtype=torch.float64)
    for _ in range(count):
        labels = torch.randint(5, (n,), generator=g)
        yield 0.6 * centres[labels] + torch.randn(n, D, generator=g, dtype=torch.float64), labels


def _step(memory, emb, labels, **kwargs):
    x = emb.clone().requires_grad_(True)
    value = memory(x, labels, **kwargs)
    value.backward()
    return value.detach(), x.grad


@pytest.mark.parametrize("miner", list(MINERS))
@pytest.mark.parametrize("name", list(LOSSES))
def test_a_sequence_of_calls_matches_pml(name: str, miner) -> None:
    loss_ours, loss_theirs = LOSSES[name]()
    miner_ours, miner_theirs = MINERS[miner]()
    ours = dl.CrossBatchMemory(loss_ours, D, MEMORY, miner_ours)
    theirs = pl.CrossBatchMemory(loss_theirs, D, MEMORY, miner_theirs)
    for emb, labels in _batches(6):  # 72 items through a memory of 40: it wraps around
        v1, g1 = _step(ours, emb, labels)
        v2, g2 = _step(theirs, emb, labels)
        assert_close(v1, v2, 1e-7)
        assert_close(g1, g2 if g2 is not None else torch.zeros_like(g1), 1e-7)
    assert ours.queue_idx == theirs.queue_idx and ours.has_been_filled
    torch.testing.assert_close(ours.embedding_memory, theirs.embedding_memory)


def test_an_enqueue_mask_and_a_given_tuple_match_pml() -> None:
    ours = dl.CrossBatchMemory(dl.ContrastiveLoss(), D, MEMORY)
    theirs = pl.CrossBatchMemory(pl.ContrastiveLoss(), D, MEMORY)
    for step, (emb, labels) in enumerate(_batches(5)):
        if step % 2:
            mask = torch.arange(len(emb)) % 3 == 0
            v1, g1 = _step(ours, emb, labels, enqueue_mask=mask)
            v2, g2 = _step(theirs, emb, labels, enqueue_mask=mask)
        else:
            # Triplets whose references index the memory, none of them an anchor's own slot
            # (dmlkit drops those from a given tuple too; PML keeps them).
            a, p, n = pm.TripletMarginMiner(margin=0.5)(emb, labels)
            own = (ours.queue_idx + a) % MEMORY
            keep = (p != own) & (n != own)
            given = (a[keep], p[keep], n[keep])
            v1, g1 = _step(ours, emb, labels, indices_tuple=given)
            v2, g2 = _step(theirs, emb, labels, indices_tuple=given)
        assert_close(v1, v2, 1e-7)
        assert_close(g1, g2, 1e-7)


def test_the_state_saves_the_queue_and_loads_pmls() -> None:
    memory = dl.CrossBatchMemory(dl.ContrastiveLoss(), D, MEMORY)
    for emb, labels in _batches(4):
        memory(emb.float(), labels)
    copy = dl.CrossBatchMemory(dl.ContrastiveLoss(), D, MEMORY)
    copy.load_state_dict(memory.state_dict())
    assert (copy.queue_idx, copy.has_been_filled) == (memory.queue_idx, memory.has_been_filled)
    emb, labels = next(_batches(1))
    assert torch.equal(copy(emb.float(), labels), memory(emb.float(), labels))
    pml_memory = pl.CrossBatchMemory(pl.ContrastiveLoss(), D, MEMORY)
    fresh = dl.CrossBatchMemory(dl.ContrastiveLoss(), D, MEMORY)
    fresh.load_state_dict(pml_memory.state_dict())
    assert fresh.queue_idx == 0 and not fresh.has_been_filled


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda m: m(torch.randn(50, D), torch.zeros(50, dtype=torch.long)), "does not fit"),
        (lambda m: m(torch.randn(4, D + 1), torch.zeros(4, dtype=torch.long)), "size 9"),
        (
            lambda m: m(torch.randn(4, D), torch.zeros(4, dtype=torch.long),
                        enqueue_mask=torch.ones(3, dtype=torch.bool)),
            "enqueue_mask must be a bool tensor of shape",
        ),
        (
            lambda m: m(torch.randn(4, D), torch.zeros(4, dtype=torch.long),
                        indices_tuple=(torch.tensor([0]),) * 3,
                        enqueue_mask=torch.ones(4, dtype=torch.bool)),
            "mutually exclusive",
        ),
    ],
)  # fmt: skip
def test_bad_calls_are_value_errors(call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call(dl.CrossBatchMemory(dl.ContrastiveLoss(), D, MEMORY))


def test_a_loss_without_a_reference_set_is_refused() -> None:
    with pytest.raises(ValueError, match="needs a loss that takes a reference set"):
        dl.CrossBatchMemory(dl.NPairsLoss(), D)


MEMORY_RUN = [
    *DIGITS_RUN,
    "data.name=user_parts:shifted_digits",
    "train.epochs=1",
    "train.max_steps=8",
    "train.checkpoint_every=1",
    "sampler.classes_per_batch=4",
    "sampler.samples_per_class=4",
    "logging.progress=false",
    "validation.before_training=false",
    "loss.name=dmlkit.losses:CrossBatchMemory",
    "loss.options.loss.name=ContrastiveLoss",
    "loss.options.memory_size=40",
    "loss.options.miner.name=MultiSimilarityMiner",
    "miner.name=null",
]


def test_a_run_with_memory_killed_and_resumed_equals_an_uninterrupted_one(tmp_path) -> None:
    """The memory is part of the objective's state: a resumed run continues its queue."""
    from dmlkit.training import Trainer, load_config
    from run_helpers import StopTrainingError, stop_at

    whole = Trainer(load_config(None, MEMORY_RUN), tmp_path / "whole")
    whole.fit(test=False)
    memory = whole.objective.loss
    assert isinstance(memory, dl.CrossBatchMemory) and memory.has_been_filled
    cut = tmp_path / "cut"
    with pytest.raises(StopTrainingError):
        Trainer(load_config(None, MEMORY_RUN), cut, callbacks=[stop_at(5)]).fit(test=False)
    resumed = Trainer(load_config(None, MEMORY_RUN), cut)
    resumed.fit(resume=True, test=False)
    assert resumed.objective.loss.queue_idx == memory.queue_idx
    for key, value in whole.objective.state_dict().items():
        other = resumed.objective.state_dict()[key]
        assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other
    for key, value in whole.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key
