"""PML's samplers (MPerClassSampler, HierarchicalSampler, FixedSetOfTriplets,
TuplesToWeightsSampler): their structure, lengths and statistics against PML 2.9's, seeding that
leaves global random state alone, and the errors for bad arguments.

PML is a test-only dependency: the library never imports it.
"""

from __future__ import annotations

import itertools
import math
import random
from collections import Counter
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from dmlkit.miners import MultiSimilarityMiner
from dmlkit.samplers import (
    FixedSetOfTriplets,
    HierarchicalSampler,
    MPerClassSampler,
    TuplesToWeightsSampler,
    tuple_weights,
)

pml_samplers = pytest.importorskip("pytorch_metric_learning.samplers")
pml_miners = pytest.importorskip("pytorch_metric_learning.miners")
pml_c_f = pytest.importorskip("pytorch_metric_learning.utils.common_functions")


def make_labels(sizes: list[int]) -> np.ndarray:
    """Labels with ``sizes[i]`` items of class ``i``, shuffled so that order says nothing."""
    labels = np.repeat(np.arange(len(sizes)), sizes)
    return labels[np.random.default_rng(7).permutation(len(labels))]


@pytest.fixture
def seeded_pml() -> None:
    """PML draws from the global numpy state: seed it so its side of a test is repeatable."""
    np.random.seed(0)


def untouched_global_state(draw: Callable[[], Any]) -> None:
    py_state, np_state, torch_state = (
        random.getstate(),
        np.random.get_state(),
        torch.get_rng_state(),
    )
    draw()
    assert random.getstate() == py_state
    assert torch.equal(torch.get_rng_state(), torch_state)
    after = np.random.get_state()
    assert after[0] == np_state[0] and np.array_equal(after[1], np_state[1])


def check_epochs(make: Callable[[int], Any]) -> None:
    """Same seed and epoch, same epoch; successive iterations, other seeds: other epochs; a
    state_dict resumes at the epoch it names."""
    sampler, twin, other = make(3), make(3), make(4)
    first = list(sampler)
    second = list(sampler)
    assert first != second
    assert list(twin) == first and list(other) != first
    twin.set_epoch(1)
    assert list(twin) == second
    state = sampler.state_dict()
    assert state == {"epoch": 2, "seed": 3}
    third = list(sampler)
    resumed = make(0)
    resumed.load_state_dict(state)
    assert list(resumed) == third
    with pytest.raises(ValueError, match="exactly the keys"):
        resumed.load_state_dict({"epoch": 0})
    untouched_global_state(lambda: list(make(5)))


# ---- MPerClassSampler ---------------------------------------------------------------------------

M_PER_CLASS_CASES = [
    # sizes, m, batch_size, length_before_new_iter
    ([3, 4, 5, 6, 7, 8, 9, 10], 2, 8, 200),
    ([1, 2, 3, 40, 5, 6, 7], 4, 12, 1000),
    ([5] * 10, 3, 30, 95),
    ([5] * 10, 3, None, 95),  # one pass of 30 is shorter: the length is rounded down
    ([2, 9, 4], 2, None, 1000),
    ([6, 6, 6], 1, 3, 3),
]


@pytest.mark.parametrize(("sizes", "m", "batch_size", "length"), M_PER_CLASS_CASES)
def test_m_per_class_length_and_batch_composition_match_pml(
    sizes: list[int], m: int, batch_size: int | None, length: int, seeded_pml: None
) -> None:
    labels = make_labels(sizes)
    ours = MPerClassSampler(labels, m, batch_size, length)
    theirs = pml_samplers.MPerClassSampler(labels, m, batch_size, length)
    assert len(ours) == len(theirs)
    per_batch = len(sizes) * m if batch_size is None else batch_size
    for indices in (list(ours), list(ours), list(theirs)):
        assert len(indices) == len(ours)
        batches = labels[np.asarray(indices)].reshape(-1, per_batch // m, m)
        assert (batches == batches[:, :, :1]).all(), "a run of m mixes classes"
        for batch in batches[:, :, 0]:
            assert len(set(batch.tolist())) == len(batch), "a batch repeats a class"


def test_m_per_class_draws_distinct_items_from_big_classes_and_reuses_small_ones() -> None:
    sizes = [1, 2, 3, 8, 9, 12]
    labels = make_labels(sizes)
    runs = np.reshape(list(MPerClassSampler(labels, 3, 6, 3000)), (-1, 3))
    for run in runs:
        n = sizes[labels[run[0]]]
        assert len(set(run.tolist())) == (3 if n >= 3 else len(set(run.tolist())))
        assert len(set(run.tolist())) <= n


def test_m_per_class_spreads_classes_and_items_evenly_where_pml_draws_them_freely(
    seeded_pml: None,
) -> None:
    """Both give every class the same share of runs on average; dmlkit's passes make the shares
    equal to within one run, and a class's items equal to within one use per shuffle."""
    sizes = [4, 5, 6, 7, 8, 9, 10, 30, 11, 12, 13]
    labels = make_labels(sizes)
    m, batch_size, length = 2, 8, 8800
    counts = {}
    for name, sampler in (
        ("ours", MPerClassSampler(labels, m, batch_size, length)),
        ("pml", pml_samplers.MPerClassSampler(labels, m, batch_size, length)),
    ):
        runs = labels[np.reshape(list(sampler), (-1, m))[:, 0]]
        counts[name] = np.bincount(runs, minlength=len(sizes))
        expected = length / m / len(sizes)
        assert np.abs(counts[name] - expected).max() < 6 * math.sqrt(expected)
    assert counts["ours"].max() - counts["ours"].min() <= 1
    # Where m divides a class's size, each shuffle uses all its items once.
    even = make_labels([4, 6, 8, 10, 30, 12])
    items = Counter(list(MPerClassSampler(even, m, batch_size, length)))
    for c in range(6):
        uses = [items[i] for i in np.flatnonzero(even == c)]
        assert max(uses) - min(uses) <= 1


def test_m_per_class_drops_into_a_dataloader_as_pmls_does() -> None:
    labels = make_labels([4, 5, 6, 7, 8])
    dataset = TensorDataset(torch.arange(len(labels)), torch.from_numpy(labels))
    sampler = MPerClassSampler(torch.from_numpy(labels), 2, batch_size=6, length_before_new_iter=60)
    loader = DataLoader(dataset, batch_size=6, sampler=sampler)
    assert len(loader) == 10
    for _, batch_labels in loader:
        runs = batch_labels.reshape(3, 2)
        assert (runs == runs[:, :1]).all() and len(set(runs[:, 0].tolist())) == 3


def test_m_per_class_epochs() -> None:
    labels = make_labels([3, 4, 5, 6, 7, 8])
    check_epochs(lambda seed: MPerClassSampler(labels, 2, 4, 40, seed=seed))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"m": 3, "batch_size": 8}, "m=3 must divide batch_size=8 without any remainder"),
        ({"m": 2, "batch_size": 16}, r"m \* \(number of unique labels\) = 2 \* 4 must be >= "),
        ({"m": 2, "batch_size": 8, "length_before_new_iter": 6}, "must be at least batch_size=8"),
        ({"m": 0}, "m must be >= 1"),
        ({"m": 2.0}, "m must be an int"),
        ({"m": 2, "batch_size": 0}, "batch_size must be >= 1"),
        ({"m": 2, "length_before_new_iter": 0}, "length_before_new_iter must be >= 1"),
        ({"m": 2, "seed": -1}, "seed must be >= 0"),
    ],
)
def test_m_per_class_bad_arguments(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MPerClassSampler(make_labels([3, 3, 3, 3]), **kwargs)


def test_m_per_class_bad_labels() -> None:
    with pytest.raises(ValueError, match="integer dtype"):
        MPerClassSampler(np.array([0.5, 1.0]), 1)
    with pytest.raises(ValueError, match="labels must be 1-D"):
        MPerClassSampler(np.zeros((2, 2), dtype=int), 1)


def test_m_per_class_yields_its_length_where_pml_overruns_it(seeded_pml: None) -> None:
    labels = make_labels([3] * 10)
    assert len(list(MPerClassSampler(labels, 3, None, 20))) == 20
    assert len(list(pml_samplers.MPerClassSampler(labels, 3, None, 20))) == 30


# ---- HierarchicalSampler ------------------------------------------------------------------------


def hierarchy(class_sizes: list[list[int]]) -> np.ndarray:
    """(N, 2) labels: column 0 the class, column 1 the super-class; ``class_sizes[s]`` lists
    the sizes of super-class s's classes (class ids are global)."""
    rows, class_id = [], 0
    for super_class, sizes in enumerate(class_sizes):
        for size in sizes:
            rows += [[class_id, super_class]] * size
            class_id += 1
    labels = np.asarray(rows)
    return labels[np.random.default_rng(3).permutation(len(labels))]


HIERARCHY = [[5, 6, 2, 7], [4, 4, 4], [9, 1, 3, 5, 5], [6, 6]]


@pytest.mark.parametrize(
    ("batch_size", "samples_per_class", "super_classes_per_batch"),
    [(12, 2, 2), (12, 2, 3), (16, "all", 2), (8, 4, 1)],
)
def test_hierarchical_batches_match_pmls_structure(
    batch_size: int, samples_per_class: Any, super_classes_per_batch: int, seeded_pml: None
) -> None:
    labels = hierarchy(HIERARCHY)
    args = (labels, batch_size, samples_per_class, 3, super_classes_per_batch)
    ours = HierarchicalSampler(*args)
    theirs = pml_samplers.HierarchicalSampler(*args)
    assert len(ours) == len(theirs) == math.comb(len(HIERARCHY), super_classes_per_batch) * 3
    sub_len = batch_size // super_classes_per_batch
    for sampler in (ours, theirs):
        tuples: Counter[tuple[int, ...]] = Counter()
        for batch in sampler:
            assert 0 < len(batch) <= batch_size
            rows = labels[np.asarray(batch, dtype=np.int64)]
            supers = Counter(rows[:, 1].tolist())
            assert all(count <= sub_len for count in supers.values())
            tuples[tuple(sorted(supers))] += 1
            per_class = Counter(rows[:, 0].tolist())
            for class_id, count in per_class.items():
                size = int((labels[:, 0] == class_id).sum())
                expected = size if samples_per_class == "all" else samples_per_class
                assert count == expected
        # Every tuple of super-classes gives its batches (here no sub-batch stays empty).
        combos = itertools.combinations(range(len(HIERARCHY)), super_classes_per_batch)
        assert tuples == dict.fromkeys(combos, 3)


def test_hierarchical_fills_sub_batches_when_classes_are_plenty() -> None:
    labels = hierarchy([[4] * 6, [5] * 6, [3] * 6])
    for batch in HierarchicalSampler(labels, 12, 2):
        assert len(batch) == 12


def test_hierarchical_drops_into_a_dataloader_and_its_epochs() -> None:
    labels = hierarchy(HIERARCHY)
    dataset = TensorDataset(torch.arange(len(labels)))
    loader = DataLoader(dataset, batch_sampler=HierarchicalSampler(torch.from_numpy(labels), 12, 2))
    assert sum(1 for _ in loader) == len(loader) == 24
    check_epochs(lambda seed: HierarchicalSampler(labels, 12, 2, seed=seed))


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        ((10, 2), {"super_classes_per_batch": 5}, "needs at least that many super-classes"),
        ((13, 2), {}, "batch_size=13 should be a multiple of super_classes_per_batch=2"),
        ((12, 4), {}, "= 6 must be a multiple of samples_per_class=4"),
        ((12, 0), {}, "samples_per_class must be >= 1"),
        ((12, "some"), {}, "samples_per_class must be an int"),
        ((12, 2), {"outer_label": 2}, "outer_label=2 is not a column of the 2-column labels"),
        ((12, 2), {"batches_per_super_tuple": 0}, "batches_per_super_tuple must be >= 1"),
    ],
)
def test_hierarchical_bad_arguments(
    args: tuple[Any, ...], kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        HierarchicalSampler(hierarchy(HIERARCHY), *args, **kwargs)
    with pytest.raises(ValueError, match="labels must be 2-D"):
        HierarchicalSampler(np.arange(6), 4, 2)


# ---- FixedSetOfTriplets -------------------------------------------------------------------------


def test_fixed_set_of_triplets_is_valid_fixed_and_reshuffled(seeded_pml: None) -> None:
    sizes = [1, 2, 5, 9, 3]
    labels = make_labels(sizes)
    ours = FixedSetOfTriplets(labels, 2000)
    theirs = pml_samplers.FixedSetOfTriplets(labels, 2000)
    assert len(ours) == len(theirs) == 6000
    class_pairs = {}
    for name, triplets in (
        ("ours", np.reshape(list(ours), (-1, 3))),
        ("pml", np.reshape(list(theirs), (-1, 3))),
    ):
        a, p, n = labels[triplets].T
        assert (a == p).all() and (a != n).all()
        distinct = triplets[:, 0] != triplets[:, 1]
        assert (distinct == (np.asarray(sizes)[a] > 1)).all()
        class_pairs[name] = Counter(zip(a.tolist(), n.tolist(), strict=True))
    # Both draw the ordered class pair uniformly from the 20 pairs of distinct classes.
    for counts in class_pairs.values():
        assert len(counts) == 20 and max(counts.values()) - min(counts.values()) < 60
    first, second = np.reshape(list(ours), (-1, 3)), np.reshape(list(ours), (-1, 3))
    assert not np.array_equal(first, second)
    assert sorted(map(tuple, first.tolist())) == sorted(map(tuple, second.tolist()))
    assert sorted(map(tuple, ours.fixed_set_of_triplets.tolist())) == sorted(
        map(tuple, first.tolist())
    )


def test_fixed_set_of_triplets_epochs_and_seed() -> None:
    labels = make_labels([3, 4, 5])
    assert np.array_equal(
        FixedSetOfTriplets(labels, 20, seed=1).fixed_set_of_triplets,
        FixedSetOfTriplets(labels, 20, seed=1).fixed_set_of_triplets,
    )
    check_epochs(lambda seed: FixedSetOfTriplets(labels, 20, seed=seed))


def test_fixed_set_of_triplets_bad_arguments() -> None:
    with pytest.raises(ValueError, match="at least 2 classes, got 1"):
        FixedSetOfTriplets([4, 4, 4], 3)
    with pytest.raises(ValueError, match="num_triplets must be >= 1"):
        FixedSetOfTriplets([0, 1], 0)


# ---- TuplesToWeightsSampler ---------------------------------------------------------------------


def weights_setup() -> tuple[torch.nn.Module, TensorDataset]:
    g = torch.Generator().manual_seed(0)
    inputs = torch.randn(40, 6, generator=g)
    labels = torch.randint(0, 4, (40,), generator=g)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.BatchNorm1d(5))
    return model, TensorDataset(inputs, labels)


def test_tuples_to_weights_matches_pmls_weights() -> None:
    model, dataset = weights_setup()
    miner = pml_miners.MultiSimilarityMiner(epsilon=0.2)
    ours = TuplesToWeightsSampler(model, miner, dataset, dataloader_num_workers=0, batch_size=7)
    theirs = pml_samplers.TuplesToWeightsSampler(
        model, miner, dataset, dataloader_num_workers=0, batch_size=7, data_device="cpu"
    )
    model.train()
    drawn = list(ours)
    assert model.training, "the model's training mode is restored"
    list(theirs)
    assert ours.weights is not None
    torch.testing.assert_close(ours.weights, theirs.weights)
    assert len(drawn) == len(ours) == len(theirs) == 40
    assert all(ours.weights[i] > 0 for i in drawn)


def test_tuples_to_weights_with_a_dmlkit_miner_and_a_subset() -> None:
    model, dataset = weights_setup()
    sampler = TuplesToWeightsSampler(
        model, MultiSimilarityMiner(epsilon=0.2), dataset, 25, dataloader_num_workers=0
    )
    drawn = list(sampler)
    assert len(drawn) == len(sampler) == 25
    assert sampler.weights is not None
    assert int((sampler.weights > 0).sum()) <= 25
    assert all(sampler.weights[i] > 0 for i in drawn)
    check_epochs(
        lambda seed: TuplesToWeightsSampler(
            model,
            MultiSimilarityMiner(epsilon=0.2),
            dataset,
            25,
            dataloader_num_workers=0,
            seed=seed,
        )
    )


def test_tuple_weights_is_pmls_convert_to_weights() -> None:
    lmu = pytest.importorskip("pytorch_metric_learning.utils.loss_and_miner_utils")
    tuples = (torch.tensor([0, 0, 3]), torch.tensor([1, 2, 0]), torch.tensor([4, 4, 4]))
    expected = lmu.convert_to_weights(tuples, torch.zeros(6), dtype=torch.float32)
    torch.testing.assert_close(tuple_weights(tuples, 6), expected)
    empty = (torch.tensor([], dtype=torch.long),) * 3
    torch.testing.assert_close(tuple_weights(empty, 4), torch.ones(4))
    torch.testing.assert_close(tuple_weights(None, 2), torch.ones(2))


def test_tuples_to_weights_bad_arguments() -> None:
    model, dataset = weights_setup()
    miner = MultiSimilarityMiner()
    with pytest.raises(ValueError, match="subset_size must be >= 1"):
        TuplesToWeightsSampler(model, miner, dataset, 0)
    with pytest.raises(ValueError, match="len\\(dataset\\) must be >= 1"):
        TuplesToWeightsSampler(model, miner, TensorDataset(torch.zeros(0, 2)))
    with pytest.raises(TypeError, match="accuracy_calculator"):
        TuplesToWeightsSampler(model, miner, dataset, accuracy_calculator=None)  # type: ignore[call-arg]
    two_labels = TensorDataset(torch.zeros(4, 6), torch.zeros(4, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="one label per item, got 2"):
        list(TuplesToWeightsSampler(model, miner, two_labels, dataloader_num_workers=0))


def test_pml_samplers_use_global_randomness_which_these_do_not() -> None:
    """The reason for the seed argument: PML's draws depend on numpy's global state."""
    labels = make_labels([4, 4, 4, 4])
    np.random.seed(1)
    a = list(pml_samplers.MPerClassSampler(labels, 2, 4, 16))
    np.random.seed(1)
    assert list(pml_samplers.MPerClassSampler(labels, 2, 4, 16)) == a
    assert pml_c_f.NUMPY_RANDOM is np.random
    np.random.seed(2)
    first = list(MPerClassSampler(labels, 2, 4, 16))
    np.random.seed(3)
    assert list(MPerClassSampler(labels, 2, 4, 16)) == first
    assert list(itertools.islice(iter(FixedSetOfTriplets(labels, 4)), 3))
