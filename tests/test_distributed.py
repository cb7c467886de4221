"""Losses and miners over several processes (gloo on CPU) against one process with the
concatenated batch: the headline equivalence of ``dmlkit.distributed``.

Every registered loss and miner, 2 and 3 processes, uneven label layouts. Global mode: every
rank's loss equals the single-process loss, and the gradients averaged over the ranks (as DDP
averages) equal the single-process gradients. Efficient mode: rank r's loss equals its anchors'
loss against the whole batch, and the averaged gradients those of the ranks' mean.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from components import ALL_LOSSES, ALL_MINERS, make
from dmlkit.distributed import (
    DistributedLossWrapper,
    DistributedMinerWrapper,
    average_gradients,
    gather,
    own_rows,
)

D_IN, D = 6, 8
# Per world size: each rank's labels (uneven class layouts, equal shares; batches of a
# multiple of 3, which EmbeddingsAlreadyPackagedAsTriplets needs).
LAYOUTS = {
    2: [torch.tensor([0, 0, 1, 2, 2, 3]), torch.tensor([1, 1, 3, 4, 4, 0])],
    3: [
        torch.tensor([0, 0, 0, 1, 2, 3]),
        torch.tensor([1, 2, 2, 4, 4, 4]),
        torch.tensor([3, 5, 5, 0, 1, 6]),
    ],
}


def _inputs(world: int) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(world)
    labels = LAYOUTS[world]
    centres = torch.randn(8, D_IN, generator=g, dtype=torch.float64)
    xs = [0.8 * centres[y] + torch.randn(len(y), D_IN, generator=g, dtype=torch.float64)
          for y in labels]  # fmt: skip
    weight = torch.randn(D_IN, D, generator=g, dtype=torch.float64)
    return xs, labels, weight


def _parts(cls):
    torch.manual_seed(0)
    return make(cls, embedding_size=D).double()


def _loss_step(cls, x, labels, weight, call):
    """Value and gradients (model weight, then the loss's own parameters) of one step."""
    loss_fn = _parts(cls)
    model = weight.clone().requires_grad_(True)
    torch.manual_seed(1)  # the same draws for the random losses on every side
    value = call(loss_fn, x @ model, labels)
    value.backward()
    params = [model, *loss_fn.parameters()]
    return value.detach(), params


def _worker(rank: int, world: int, store: str, out: str) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    xs, labels, weight = _inputs(world)
    x, y = xs[rank], labels[rank]
    results: dict[str, object] = {}
    for cls in ALL_LOSSES:
        for efficient in (False, True):
            if efficient and not cls.supports_ref:
                continue
            wrapper_call = lambda f, e, lab, eff=efficient: DistributedLossWrapper(f, eff)(e, lab)  # noqa: E731
            try:
                value, params = _loss_step(cls, x, y, weight, wrapper_call)
            except ValueError as error:  # the same refusal as in one process is checked there
                results[f"{cls.__name__}/{efficient}"] = str(error)
                continue
            average_gradients(params)
            results[f"{cls.__name__}/{efficient}"] = (value, [p.grad for p in params])
    emb = x @ weight
    for cls in ALL_MINERS:
        for efficient in (False, True):
            torch.manual_seed(2)
            mined = DistributedMinerWrapper(make(cls), efficient)(emb, y)
            results[f"{cls.__name__}/miner/{efficient}"] = mined
    results["rows"] = own_rows(len(y), x.device)
    results["gathered"] = gather(y)
    torch.save(results, Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


@pytest.fixture(scope="module", params=[2, 3], ids=["2 processes", "3 processes"])
def ranks(request):
    world = request.param
    with tempfile.TemporaryDirectory() as folder:
        store = Path(folder) / "store"
        mp.spawn(_worker, args=(world, str(store), folder), nprocs=world, join=True)
        yield world, [torch.load(Path(folder) / f"rank{r}.pt") for r in range(world)]


def _single_process(cls, world: int, efficient: bool):
    xs, labels, weight = _inputs(world)
    x, y = torch.cat(xs), torch.cat(labels)
    if not efficient:
        return _loss_step(cls, x, y, weight, lambda f, e, lab: f(e, lab))
    starts = torch.cumsum(torch.tensor([0] + [len(t) for t in labels]), 0)

    def mean_of_ranks(f, e, lab):
        values = []
        for r in range(world):
            rows = torch.arange(int(starts[r]), int(starts[r + 1]))
            torch.manual_seed(1)
            values.append(f(e[rows], lab[rows], None, e, lab, rows))
        return torch.stack(values).mean()

    return _loss_step(cls, x, y, weight, mean_of_ranks)


@pytest.mark.parametrize("efficient", [False, True], ids=["global", "efficient"])
@pytest.mark.parametrize("loss_cls", ALL_LOSSES, ids=lambda c: c.__name__)
def test_losses_over_ranks_equal_one_process(ranks, loss_cls, efficient: bool) -> None:
    world, results = ranks
    key = f"{loss_cls.__name__}/{efficient}"
    if efficient and not loss_cls.supports_ref:
        pytest.skip(f"{loss_cls.__name__} takes no reference set: no efficient mode")
    got = [r[key] for r in results]
    if efficient and any(True for _ in _parts(loss_cls).buffers()):
        assert all("state" in g and "diverge" in g for g in got)  # type: ignore[operator]
        return
    if isinstance(got[0], str):  # refused on the ranks: refused in one process too
        with pytest.raises(ValueError):
            _single_process(loss_cls, world, efficient)
        return
    value, params = _single_process(loss_cls, world, efficient)
    for rank, (rank_value, grads) in enumerate(got):
        if efficient:
            xs, labels, weight = _inputs(world)
            rows = results[rank]["rows"]
            e = torch.cat(xs) @ weight
            torch.manual_seed(1)
            expected = _parts(loss_cls)(e[rows], torch.cat(labels)[rows], None, e,
                                        torch.cat(labels), rows)  # fmt: skip
            torch.testing.assert_close(rank_value, expected.detach(), rtol=1e-9, atol=1e-12)
        else:
            torch.testing.assert_close(rank_value, value, rtol=1e-9, atol=1e-12)
        for grad, param in zip(grads, params, strict=True):
            expected_grad = param.grad if param.grad is not None else torch.zeros_like(param)
            grad = grad if grad is not None else torch.zeros_like(param)
            torch.testing.assert_close(grad, expected_grad, rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("efficient", [False, True], ids=["global", "efficient"])
@pytest.mark.parametrize("miner_cls", ALL_MINERS, ids=lambda c: c.__name__)
def test_miners_over_ranks_mine_the_global_batch(ranks, miner_cls, efficient: bool) -> None:
    world, results = ranks
    xs, labels, weight = _inputs(world)
    emb, lab = torch.cat(xs) @ weight, torch.cat(labels)
    for rank in range(world):
        rows = results[rank]["rows"]
        torch.manual_seed(2)
        if efficient:
            expected = make(miner_cls)(emb[rows], lab[rows], emb, lab, rows)
        else:
            expected = make(miner_cls)(emb, lab)
        got = results[rank][f"{miner_cls.__name__}/miner/{efficient}"]
        for a, b in zip(got, expected, strict=True):
            assert torch.equal(a, b)


def test_gather_is_in_rank_order(ranks) -> None:
    world, results = ranks
    for rank in range(world):
        assert torch.equal(results[rank]["gathered"], torch.cat(LAYOUTS[world]))
