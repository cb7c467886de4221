"""PKSampler: batch structure, class and item coverage, determinism, rank split, resume, input
checks."""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader, TensorDataset

from dmlkit.samplers import PKSampler


def make_labels(sizes: list[int], first_label: int = 0) -> np.ndarray:
    """Labels with ``sizes[i]`` items of class ``first_label + i``, interleaved so that dataset
    order says nothing about class."""
    labels = np.repeat(np.arange(first_label, first_label + len(sizes)), sizes)
    return labels[np.random.default_rng(123).permutation(len(labels))]


def epoch(sampler: PKSampler, number: int = 0, start_batch: int = 0) -> list[list[int]]:
    sampler.set_epoch(number, start_batch)
    return list(sampler)


def check_structure(
    batches: list[list[int]], labels: np.ndarray, sampler: PKSampler, k: int
) -> None:
    """Each batch is P / W runs of K indices, each run a single class, the classes distinct."""
    for batch in batches:
        assert len(batch) == sampler.batch_size
        runs = labels[batch].reshape(-1, k)
        assert (runs == runs[:, :1]).all(), "a K-run mixes classes"
        assert len(set(runs[:, 0].tolist())) == len(runs), "a class appears twice in a batch"


def group_labels(batches: list[list[int]], labels: np.ndarray, k: int) -> list[int]:
    return [int(labels[run[0]]) for batch in batches for run in np.reshape(batch, (-1, k))]


@pytest.mark.parametrize("mode", ["one", "all"])
@pytest.mark.parametrize(("p", "k"), [(4, 2), (3, 5), (1, 1)])
def test_batches_are_p_distinct_classes_with_k_samples(mode: str, p: int, k: int) -> None:
    labels = make_labels([1, 2, 3, 5, 8, 13, 21, 4, 6])
    sampler = PKSampler(labels, p, k, groups_per_class=mode)
    assert sampler.batch_size == p * k
    for number in range(3):
        batches = epoch(sampler, number)
        assert len(batches) == len(sampler) > 0
        check_structure(batches, labels, sampler, k)


def test_one_mode_visits_every_class_exactly_once_when_p_divides() -> None:
    labels = make_labels([3, 4, 5, 6, 7, 8, 9, 10])
    sampler = PKSampler(labels, 4, 3)
    for number in range(3):
        visits = Counter(group_labels(epoch(sampler, number), labels, 3))
        assert visits == dict.fromkeys(range(8), 1)


def test_one_mode_pads_the_last_batch_instead_of_skipping_classes() -> None:
    # 10 classes, P = 4: 3 batches, the last completed by second groups of 2 classes.
    labels = make_labels([6] * 10)
    sampler = PKSampler(labels, 4, 3)
    assert len(sampler) == 3
    for number in range(3):
        batches = epoch(sampler, number)
        visits = Counter(group_labels(batches, labels, 3))
        assert set(visits) == set(range(10))
        assert sorted(visits.values()) == [1] * 8 + [2] * 2
        # With at least 2K items, a class's second group uses items its first did not.
        flat = [i for batch in batches for i in batch]
        assert len(flat) == len(set(flat))


@pytest.mark.parametrize("too_few", ["replace", "drop"])
def test_all_mode_uses_each_item_at_most_once(too_few: str) -> None:
    sizes = [2, 3, 5, 8, 13, 21, 34, 9, 9, 10]
    labels = make_labels(sizes)
    k, p = 2, 4
    sampler = PKSampler(labels, p, k, groups_per_class="all", too_few=too_few)
    groups = [n // k for n in sizes]
    rounds = sorted(groups)[-p]
    assert len(sampler) == sum(min(g, rounds) for g in groups) // p
    for number in range(3):
        batches = epoch(sampler, number)
        check_structure(batches, labels, sampler, k)
        flat = [i for batch in batches for i in batch]
        assert len(flat) == len(set(flat))
        # Round 0 lists every class and later rounds complete its batches.
        assert set(group_labels(batches, labels, k)) == set(range(len(sizes)))


def test_all_mode_batches_mix_different_classes_across_rounds() -> None:
    # Equal classes with many groups: a fixed class order would repeat the same batches.
    labels = make_labels([20] * 8)
    batches = epoch(PKSampler(labels, 4, 2, groups_per_class="all"))
    class_sets = {frozenset(labels[batch].tolist()) for batch in batches}
    assert len(batches) == 20
    assert len(class_sets) > 10


@pytest.mark.parametrize("mode", ["one", "all"])
def test_same_seed_and_epoch_give_same_batches_and_others_differ(mode: str) -> None:
    labels = make_labels([7, 9, 11, 13, 15, 17])
    first = PKSampler(labels, 3, 2, groups_per_class=mode, seed=5)
    second = PKSampler(labels, 3, 2, groups_per_class=mode, seed=5)
    other_seed = PKSampler(labels, 3, 2, groups_per_class=mode, seed=6)
    assert epoch(first, 4) == epoch(second, 4) == epoch(first, 4)
    assert epoch(first, 4) != epoch(first, 5)
    assert epoch(first, 4) != epoch(other_seed, 4)


def test_iteration_leaves_global_random_state_alone() -> None:
    sampler = PKSampler(make_labels([5, 6, 7, 8]), 2, 3)
    py_state, np_state, torch_state = (
        random.getstate(),
        np.random.get_state(),
        torch.get_rng_state(),
    )
    epoch(sampler, 3)
    assert random.getstate() == py_state
    assert torch.equal(torch.get_rng_state(), torch_state)
    after = np.random.get_state()
    assert after[0] == np_state[0] and np.array_equal(after[1], np_state[1])


def test_replace_draws_small_classes_with_replacement() -> None:
    labels = np.array([0, 1, 1, 2, 2, 2, 2])
    sampler = PKSampler(labels, 3, 4)
    assert sampler.num_classes == 3 and sampler.dropped_classes == []
    (batch,) = epoch(sampler)
    runs = {int(labels[run[0]]): sorted(run.tolist()) for run in np.reshape(batch, (-1, 4))}
    assert runs[0] == [0, 0, 0, 0]
    assert set(runs[1]) <= {1, 2}  # two items fill four slots
    assert runs[2] == [3, 4, 5, 6]  # a class with exactly K items is drawn without replacement


def test_drop_removes_small_classes_and_reports_them() -> None:
    labels = make_labels([1, 5, 2, 6, 7, 3], first_label=1)  # CUB-style ids from 1
    with pytest.warns(UserWarning, match="dropped 3 of 6 classes") as record:
        sampler = PKSampler(labels, 3, 4, too_few="drop")
    assert len(record) == 1
    assert sampler.dropped_classes == [1, 3, 6]
    assert sampler.num_classes == 3
    for number in range(3):
        assert set(group_labels(epoch(sampler, number), labels, 4)) == {2, 4, 5}


def test_fewer_kept_classes_than_p_is_an_error_naming_the_counts() -> None:
    with pytest.raises(ValueError, match=r"classes_per_batch=4 .* 3 usable classes"):
        PKSampler(make_labels([5, 5, 5]), 4, 2)
    with (
        pytest.warns(UserWarning),
        pytest.raises(ValueError, match=r"2 usable classes \(2 dropped"),
    ):
        PKSampler(make_labels([1, 5, 1, 5]), 3, 2, too_few="drop")


@pytest.mark.parametrize("mode", ["one", "all"])
def test_ranks_split_each_global_batch_into_whole_class_groups(mode: str) -> None:
    labels = make_labels([4, 5, 6, 7, 8, 9, 10, 11, 12, 3, 2])
    full = PKSampler(labels, 6, 2, groups_per_class=mode, seed=3)
    global_batches = epoch(full, 2)
    world = 3
    ranks = [
        PKSampler(labels, 6, 2, groups_per_class=mode, seed=3, rank=r, world_size=world)
        for r in range(world)
    ]
    per_rank = [epoch(sampler, 2) for sampler in ranks]
    assert all(
        len(batches) == len(sampler) == len(full)
        for batches, sampler in zip(per_rank, ranks, strict=True)
    )
    for sampler, batches in zip(ranks, per_rank, strict=True):
        assert sampler.batch_size == 4
        check_structure(batches, labels, sampler, 2)
    for b, global_batch in enumerate(global_batches):
        groups = np.reshape(global_batch, (-1, 2))
        for r in range(world):
            # Rank r holds the r-th consecutive run of P / W groups of the global batch.
            share = len(groups) // world
            assert per_rank[r][b] == groups[r * share : (r + 1) * share].reshape(-1).tolist()
        # Concatenated in rank order (as a gather gives them), the ranks' batches are the
        # global batch, in its order.
        assert [i for r in range(world) for i in per_rank[r][b]] == list(global_batch)
        parts = [set(per_rank[r][b]) for r in range(world)]
        assert set().union(*parts) == set(global_batch)
        assert sum(len(part) for part in parts) == len(set(global_batch))


def test_works_as_a_dataloader_batch_sampler() -> None:
    labels = make_labels([4, 6, 8, 10, 3])
    dataset = TensorDataset(torch.arange(len(labels)), torch.as_tensor(labels))
    sampler = PKSampler(torch.as_tensor(labels), 4, 2, seed=1)
    sampler.set_epoch(7)
    loader = DataLoader(dataset, batch_sampler=sampler)
    expected = epoch(sampler, 7)
    got = [(idx.tolist(), lab) for idx, lab in loader]
    assert len(got) == len(loader) == len(sampler)
    for (indices, batch_labels), batch in zip(got, expected, strict=True):
        assert indices == batch
        assert batch_labels.tolist() == labels[batch].tolist()


@pytest.mark.parametrize("mode", ["one", "all"])
@pytest.mark.parametrize("rank", [0, 1])
def test_start_batch_resumes_exactly_where_a_killed_run_stopped(mode: str, rank: int) -> None:
    labels = make_labels([9, 10, 11, 12, 13, 14, 15, 16, 5])
    kwargs: dict[str, Any] = {"groups_per_class": mode, "seed": 11, "rank": rank, "world_size": 2}
    sampler = PKSampler(labels, 4, 2, **kwargs)
    full = epoch(sampler, 3)
    assert len(full) >= 3
    for done in (0, 1, len(full) - 1, len(full)):
        resumed = PKSampler(labels, 4, 2, **kwargs)
        resumed.set_epoch(3, start_batch=done)
        assert len(resumed) == len(full)  # len() is the full epoch's
        assert full[:done] + list(resumed) == full


def test_state_dict_round_trip_restores_seed_epoch_and_start_batch() -> None:
    labels = make_labels([6, 7, 8, 9, 10])
    sampler = PKSampler(labels, 2, 3, seed=42)
    full = epoch(sampler, 5)
    sampler.set_epoch(5, start_batch=1)
    state = sampler.state_dict()
    assert state == {"epoch": 5, "start_batch": 1, "seed": 42}
    restored = PKSampler(labels, 2, 3, seed=0)
    restored.load_state_dict(state)
    assert restored.state_dict() == state
    assert list(restored) == full[1:]


def test_label_values_and_dtypes_do_not_matter() -> None:
    base = make_labels([5, 6, 7, 8, 9])
    reference = epoch(PKSampler(base, 3, 2, seed=9))
    shifted = base * 7 - 100  # negative ids, same order
    variants: list[Any] = [
        base.tolist(),
        base.astype(np.int8),
        base.astype(np.uint16),
        torch.as_tensor(base, dtype=torch.int32),
        torch.as_tensor(base, dtype=torch.uint8),
        shifted,
        torch.as_tensor(shifted),
    ]
    for labels in variants:
        assert epoch(PKSampler(labels, 3, 2, seed=9)) == reference


@pytest.mark.parametrize(
    ("labels", "match"),
    [
        ([0.0, 1.0, 2.0], "integer dtype"),
        (np.array([0, 1, np.nan]), "integer dtype"),
        (torch.tensor([0.0, 1.0]), "integer dtype"),
        (np.array([True, False]), "integer dtype"),
        (["a", "b"], "integer dtype"),
        (np.zeros((3, 2), dtype=np.int64), "1-D"),
        (torch.zeros(2, 2, dtype=torch.long), "1-D"),
        ([[0], [1, 2]], "1-D sequence of ints"),
        ([], "empty"),
        (torch.zeros(0, dtype=torch.long), "empty"),
    ],
)
def test_bad_labels_are_rejected(labels: Any, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        PKSampler(labels, 1, 1)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"classes_per_batch": 0}, "classes_per_batch must be >= 1"),
        ({"samples_per_class": 0}, "samples_per_class must be >= 1"),
        ({"samples_per_class": 2.0}, "samples_per_class must be an int"),
        ({"classes_per_batch": True}, "classes_per_batch must be an int"),
        ({"seed": -1}, "seed must be >= 0"),
        ({"too_few": "pad"}, "too_few must be"),
        ({"groups_per_class": "two"}, "groups_per_class must be"),
        ({"world_size": 0}, "world_size must be >= 1"),
        ({"world_size": 3}, "divisible by world_size=3"),
        ({"rank": 2, "world_size": 2}, r"rank must be in \[0, world_size=2\)"),
        ({"rank": -1, "world_size": 2}, "rank must be >= 0"),
    ],
)
def test_bad_arguments_are_rejected(kwargs: dict[str, Any], match: str) -> None:
    args: dict[str, Any] = {"classes_per_batch": 4, "samples_per_class": 2} | kwargs
    with pytest.raises(ValueError, match=match):
        PKSampler(make_labels([3] * 5), **args)


def test_bad_epoch_start_batch_and_state_are_rejected() -> None:
    sampler = PKSampler(make_labels([3] * 6), 2, 2)
    assert len(sampler) == 3
    with pytest.raises(ValueError, match="epoch must be >= 0"):
        sampler.set_epoch(-1)
    with pytest.raises(ValueError, match="start_batch=4 is past the end of the epoch"):
        sampler.set_epoch(0, start_batch=4)
    with pytest.raises(ValueError, match="missing \\['seed'\\], unexpected \\['step'\\]"):
        sampler.load_state_dict({"epoch": 1, "start_batch": 0, "step": 3})
    with pytest.raises(ValueError, match="state\\['seed'\\] must be >= 0"):
        sampler.load_state_dict({"epoch": 1, "start_batch": 0, "seed": -2})
    assert sampler.state_dict() == {"epoch": 0, "start_batch": 0, "seed": 0}


@pytest.mark.filterwarnings("ignore:PKSampler dropped")
@settings(max_examples=50, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 12), min_size=1, max_size=12),
    p=st.integers(1, 6),
    k=st.integers(1, 4),
    mode=st.sampled_from(["one", "all"]),
    too_few=st.sampled_from(["replace", "drop"]),
    world_size=st.sampled_from([1, 2, 3]),
    number=st.integers(0, 3),
)
def test_property_structure_coverage_and_rank_split(
    sizes: list[int], p: int, k: int, mode: str, too_few: str, world_size: int, number: int
) -> None:
    labels = make_labels(sizes)
    p *= world_size
    kwargs: dict[str, Any] = {"groups_per_class": mode, "too_few": too_few, "seed": number}
    kept = [c for c, n in enumerate(sizes) if n >= k or too_few == "replace"]
    if len(kept) < p:
        with pytest.raises(ValueError, match="usable classes"):
            PKSampler(labels, p, k, **kwargs)
        return
    full = PKSampler(labels, p, k, **kwargs)
    batches = epoch(full, number)
    if mode == "one":
        assert len(full) == -(-len(kept) // p)
    else:
        groups = [max(1, sizes[c] // k) for c in kept]
        rounds = sorted(groups)[-p]
        assert len(full) == sum(min(g, rounds) for g in groups) // p
    assert len(batches) == len(full)
    start = number % (len(full) + 1)
    assert epoch(full, number, start) == batches[start:]
    check_structure(batches, labels, full, k)
    visits = Counter(group_labels(batches, labels, k))
    if mode == "one":
        assert set(visits) == set(kept)
        assert sum(visits.values()) - len(kept) == -len(kept) % p
    else:
        items = [i for batch in batches for i in batch if sizes[labels[i]] >= k]
        assert len(items) == len(set(items))
    ranks = [
        epoch(PKSampler(labels, p, k, rank=rank, world_size=world_size, **kwargs), number)
        for rank in range(world_size)
    ]
    for b, batch in enumerate(batches):
        assert sorted(i for r in ranks for i in r[b]) == sorted(batch)
