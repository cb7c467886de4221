"""Samplers: P×K batches (:class:`PKSampler`), and PML 2.9's samplers with PML's signatures.

- :class:`PKSampler`: P classes × K samples per batch, exact resume, rank-aware (below).
- :class:`MPerClassSampler`: PML's index stream of m samples per class.
- :class:`HierarchicalSampler`: PML's batches drawn from tuples of super-classes.
- :class:`FixedSetOfTriplets`: PML's fixed set of (anchor, positive, negative) triplets.
- :class:`TuplesToWeightsSampler`: PML's sampling by how often a miner picks each item.

PML draws from the global numpy or torch random state; these samplers never touch it. Each
draws from its own generator seeded with ``(seed, epoch)``, and the ones modelled on PML draw a
new epoch on every iteration, as PML's do (see :meth:`MPerClassSampler.set_epoch`).

:class:`PKSampler` is a batch sampler (pass it as ``DataLoader(batch_sampler=...)``) for the
losses and miners that need positives in every batch. An epoch is built in three steps, all from
one numpy Generator seeded with ``(seed, epoch)`` so every rank, and every resumed run, builds the
same epoch:

1. Every class's items are put in a fresh random order; a class's groups are consecutive runs of
   K items in that order, so the groups of one class are disjoint.
2. A class schedule lists ``(class, group)`` slots; consecutive runs of P slots are the batches.
3. Each global batch is split across ranks in consecutive runs of P / W whole class groups,
   so the ranks' batches concatenated in rank order are the global batch, in its order.

Batch assembly (``groups_per_class="all"``) is round-robin: round ``r`` lists, in a fresh random
order, every class that still has an unused group, so each class appears at most once per round.
A round's leftover slots (fewer than P) open the next round's first batch, which takes the first
classes of the next round that are not among those leftovers; rounds run while they list at least
P classes, which always completes that batch. An epoch costs two sorts (items, slots) and O(P)
Python work per round, and its number of batches depends only on the class sizes, never on the
random draws.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

IntArray = npt.NDArray[np.int64]

_STATE_KEYS = frozenset({"epoch", "start_batch", "seed"})


def _check_int(value: object, name: str, minimum: int) -> int:
    # bool is an int subclass, but True as a batch size is always a bug.
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _labels_to_numpy(labels: object, ndim: int = 1) -> npt.NDArray[Any]:
    """Converts labels to an ``ndim``-D numpy integer array, rejecting anything that is not one.

    Args:
        labels: A sequence of ints (of rows of ints, for 2-D), a numpy array or a tensor.
        ndim: The dimensions the labels must have.

    Returns:
        The labels as a numpy array of an integer dtype (the values unchanged).
    """
    if isinstance(labels, Tensor):
        array = labels.detach().cpu().numpy()
    else:
        try:
            array = np.asarray(labels)
        except ValueError as error:
            what = "sequence of ints" if ndim == 1 else "array of ints"
            raise ValueError(f"labels must be a {ndim}-D {what}: {error}") from error
    if array.ndim != ndim:
        raise ValueError(f"labels must be {ndim}-D, got {array.ndim}-D shape {array.shape}")
    if array.size == 0:
        raise ValueError("labels is empty; the sampler needs at least one labelled item")
    # kind "i"/"u" excludes bool, float (and so NaN), complex, str and object arrays.
    if array.dtype.kind not in "iu":
        raise ValueError(f"labels must have an integer dtype, got {array.dtype}")
    return array


def _class_index(labels: npt.NDArray[Any]) -> tuple[IntArray, IntArray, IntArray]:
    """The dataset indices grouped by class: class ``c`` (the c-th smallest label) holds
    ``items[starts[c] : starts[c] + sizes[c]]``, in dataset order.

    Returns:
        ``(items, starts, sizes)``.
    """
    _, inverse, sizes = np.unique(labels, return_inverse=True, return_counts=True)
    items = np.argsort(inverse.reshape(-1), kind="stable").astype(np.int64)
    starts = (np.cumsum(sizes) - sizes).astype(np.int64)
    return items, starts, sizes.astype(np.int64)


def _separate_rounds(classes: IntArray, round_ends: IntArray, p: int) -> None:
    """Reorders, in place, the head of each round of a class schedule so that a batch (a run
    of ``p`` slots from the start) straddling two rounds holds ``p`` distinct classes.

    Args:
        classes: The schedule's class ids; each round lists a class at most once, and every
            round after an entry of ``round_ends`` holds at least ``p`` slots.
        round_ends: Where rounds end (the last round's end left out).
        p: Slots per batch.
    """
    for end, carried in zip(round_ends.tolist(), (round_ends % p).tolist(), strict=True):
        if not carried:
            continue
        # The batch begun by a round's last `carried` slots must not repeat their classes:
        # bring the next round's first classes not among them forward. Each class appears
        # once per round, so the next round's first P slots hold at least P - carried.
        carry = set(classes[end - carried : end].tolist())
        head = classes[end : end + p].tolist()
        fresh = [c for c in head if c not in carry][: p - carried]
        picked = set(fresh)
        classes[end : end + p] = fresh + [c for c in head if c not in picked]


class PKSampler(Sampler[list[int]]):
    """Yields batches of P classes × K samples, deterministic per ``(seed, epoch)``, rank-aware.

    Call :meth:`set_epoch` before each epoch (as with ``DistributedSampler``); without it every
    pass repeats the same epoch. A class with at least K items contributes groups drawn without
    replacement; one with fewer is drawn with replacement (``too_few="replace"``) or removed at
    construction (``too_few="drop"``, reported by a warning and :attr:`dropped_classes`).

    ``groups_per_class="one"``: each epoch visits every kept class exactly once, with one group.
    When P does not divide the number of classes C, the last batch is completed with a second
    group of the first ``P - C % P`` classes of the epoch (the items after its first group in the
    class's shuffled order, so disjoint from it when the class has at least 2K items); no class
    is skipped.

    ``groups_per_class="all"``: each class contributes ``max(1, n_c // K)`` disjoint groups, so
    no item is used twice in an epoch (unless drawn with replacement). Classes are scheduled
    round-robin (see the module docstring); rounds run while at least P classes have groups
    left, so a class contributes at most R groups, R being the P-th largest group count.
    Leftover slots that cannot fill a complete batch are dropped.

    With ``world_size`` W > 1, all ranks build the same global batches and rank ``r`` keeps the
    class groups at positions ``r·P/W … (r+1)·P/W − 1`` of each, so every rank yields the same
    number of batches of ``(P // W) * K`` indices, and the ranks' batches concatenated in rank
    order (what a gather of them gives) are the global batch in its order.

    Args:
        labels: One integer class label per dataset item (any values, e.g. 1..200 or negative).
        classes_per_batch: P, the number of distinct classes in a global batch.
        samples_per_class: K, the number of items of each class in a batch.
        seed: Non-negative base seed; an epoch depends only on ``(seed, epoch)``.
        too_few: What to do with classes that have fewer than K items.
        groups_per_class: ``"one"`` group per class per epoch, or ``"all"`` disjoint groups.
        rank: This process's rank, in ``[0, world_size)``.
        world_size: Number of processes; must divide ``classes_per_batch``.
    """

    def __init__(
        self,
        labels: Sequence[int] | npt.NDArray[Any] | Tensor,
        classes_per_batch: int,
        samples_per_class: int,
        *,
        seed: int = 0,
        too_few: Literal["replace", "drop"] = "replace",
        groups_per_class: Literal["one", "all"] = "one",
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        super().__init__()
        self._p = _check_int(classes_per_batch, "classes_per_batch", 1)
        self._k = _check_int(samples_per_class, "samples_per_class", 1)
        self._seed = _check_int(seed, "seed", 0)
        self._world_size = _check_int(world_size, "world_size", 1)
        self._rank = _check_int(rank, "rank", 0)
        if self._rank >= self._world_size:
            raise ValueError(f"rank must be in [0, world_size={self._world_size}), got {rank}")
        if self._p % self._world_size:
            raise ValueError(
                f"classes_per_batch={self._p} must be divisible by world_size="
                f"{self._world_size} so each rank gets whole class groups"
            )
        if too_few not in ("replace", "drop"):
            raise ValueError(f"too_few must be 'replace' or 'drop', got {too_few!r}")
        if groups_per_class not in ("one", "all"):
            raise ValueError(f"groups_per_class must be 'one' or 'all', got {groups_per_class!r}")
        self._groups_per_class = groups_per_class

        array = _labels_to_numpy(labels)
        values, inverse, counts = np.unique(array, return_inverse=True, return_counts=True)
        keep = counts >= self._k if too_few == "drop" else np.ones(len(values), dtype=bool)
        self._dropped: list[int] = values[~keep].tolist()
        if self._dropped:
            warnings.warn(
                f"PKSampler dropped {len(self._dropped)} of {len(values)} classes with fewer "
                f"than samples_per_class={self._k} items (too_few='drop'); their labels are "
                "in .dropped_classes",
                stacklevel=2,
            )
        num_kept = int(keep.sum())
        if num_kept < self._p:
            dropped = f" ({len(self._dropped)} dropped by too_few='drop')" if self._dropped else ""
            raise ValueError(
                f"classes_per_batch={self._p} needs at least that many classes, but labels have "
                f"{num_kept} usable classes{dropped}"
            )

        # Dataset indices grouped by kept class (class ids 0..C-1 in label order); a class's
        # items are _items[_starts[c] : _starts[c] + _sizes[c]].
        new_id = np.cumsum(keep) - 1
        by_class = np.argsort(inverse, kind="stable")
        kept_items = keep[inverse[by_class]]
        self._items: IntArray = by_class[kept_items].astype(np.int64)
        self._item_class: IntArray = new_id[inverse[self._items]].astype(np.int64)
        self._sizes: IntArray = counts[keep].astype(np.int64)
        self._starts: IntArray = np.concatenate(([0], np.cumsum(self._sizes)[:-1])).astype(np.int64)

        # "one" mode is a single round of the round-robin schedule, padded instead of cut.
        if groups_per_class == "all":
            groups = np.maximum(1, self._sizes // self._k)
        else:
            groups = np.ones_like(self._sizes)
        # Rounds run while they list at least P classes: R is the P-th largest group count.
        rounds = int(np.sort(groups)[-self._p])
        caps = np.minimum(groups, rounds)
        # Round r lists the classes with more than r groups; listing classes with the most
        # groups first makes each round's classes a prefix of one order.
        by_cap = np.argsort(-caps, kind="stable")
        round_sizes = num_kept - np.cumsum(np.bincount(caps, minlength=rounds + 1))[:rounds]
        round_starts = np.cumsum(round_sizes) - round_sizes
        self._slot_round: IntArray = np.repeat(np.arange(rounds), round_sizes).astype(np.int64)
        self._slot_class: IntArray = by_cap[
            np.arange(len(self._slot_round)) - round_starts[self._slot_round]
        ].astype(np.int64)
        self._round_ends: IntArray = np.cumsum(round_sizes).astype(np.int64)
        if groups_per_class == "one":
            self._num_batches = -(-num_kept // self._p)
        else:
            self._num_batches = int(caps.sum()) // self._p

        self._epoch = 0
        self._start_batch = 0

    @property
    def num_classes(self) -> int:
        """Number of classes kept (those sampled from)."""
        return len(self._sizes)

    @property
    def dropped_classes(self) -> list[int]:
        """Labels of the classes removed by ``too_few="drop"``, ascending."""
        return list(self._dropped)

    @property
    def batch_size(self) -> int:
        """Number of indices in each batch this rank yields: ``(P // world_size) * K``."""
        return self._p // self._world_size * self._k

    def __len__(self) -> int:
        """Number of batches this rank yields in a full epoch, whatever ``start_batch`` is."""
        return self._num_batches

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Selects the epoch the next iteration yields, optionally resuming mid-epoch.

        Args:
            epoch: Non-negative epoch number; with the seed it fixes the epoch's batches.
            start_batch: Skip this many batches of the epoch, e.g. those a killed run had
                already trained on; the rest are exactly those a full epoch yields from there.
        """
        epoch = _check_int(epoch, "epoch", 0)
        start_batch = _check_int(start_batch, "start_batch", 0)
        if start_batch > self._num_batches:
            raise ValueError(
                f"start_batch={start_batch} is past the end of the epoch "
                f"({self._num_batches} batches)"
            )
        self._epoch = epoch
        self._start_batch = start_batch

    def state_dict(self) -> dict[str, int]:
        """Returns what fixes the batches still to come: epoch, start_batch and seed.

        ``start_batch`` is the value last given to :meth:`set_epoch`; the sampler cannot know how
        many batches the training loop consumed (a DataLoader prefetches), so for a mid-epoch
        checkpoint call ``set_epoch(epoch, batches_done)`` first or store that count yourself.

        Returns:
            A dict with int entries ``epoch``, ``start_batch`` and ``seed``.
        """
        return {"epoch": self._epoch, "start_batch": self._start_batch, "seed": self._seed}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        """Restores a :meth:`state_dict`, seed included, so the run continues identically.

        Args:
            state: A mapping with exactly the keys ``epoch``, ``start_batch`` and ``seed``.
        """
        keys = set(state)
        if keys != _STATE_KEYS:
            raise ValueError(
                f"state must have exactly the keys {sorted(_STATE_KEYS)}; "
                f"missing {sorted(_STATE_KEYS - keys)}, unexpected {sorted(keys - _STATE_KEYS)}"
            )
        seed = _check_int(state["seed"], "state['seed']", 0)
        self.set_epoch(state["epoch"], state["start_batch"])
        self._seed = seed

    def __iter__(self) -> Iterator[list[int]]:
        """Yields this rank's batches of dataset indices, from ``start_batch`` on.

        Yields:
            Lists of ``batch_size`` dataset indices: ``P // world_size`` runs of K indices, each
            run one class.
        """
        batches = self._global_batches(self._epoch)[self._start_batch :]
        share = self._p // self._world_size
        mine = batches[:, self._rank * share : (self._rank + 1) * share, :]
        mine = mine.reshape(len(batches), self.batch_size)
        for batch in mine:
            yield batch.tolist()

    def _global_batches(self, epoch: int) -> IntArray:
        """Builds every rank's batches of one epoch.

        Args:
            epoch: The epoch number.

        Returns:
            Dataset indices of shape (num_batches, P, K).
        """
        rng = np.random.default_rng([self._seed, epoch])
        # Sorting by class, then by a random key, shuffles within each class only.
        within_class = np.lexsort((rng.random(len(self._items)), self._item_class))
        shuffled = self._items[within_class]

        classes, groups = self._schedule(rng)

        sizes = self._sizes[classes]
        offsets = np.empty((len(classes), self._k), dtype=np.int64)
        full = sizes >= self._k
        # Group g is the g-th run of K items in the class's shuffled order; only "one"-mode
        # padding asks for more than a class has, and wrapping then reuses the fewest items.
        offsets[full] = (groups[full, None] * self._k + np.arange(self._k)) % sizes[full, None]
        offsets[~full] = rng.integers(0, sizes[~full, None], size=(int((~full).sum()), self._k))
        indices: IntArray = shuffled[self._starts[classes, None] + offsets]
        return indices.reshape(self._num_batches, self._p, self._k)

    def _schedule(self, rng: np.random.Generator) -> tuple[IntArray, IntArray]:
        """Lists the epoch's slots: round-robin over classes (see the module docstring).

        Args:
            rng: The epoch's generator.

        Returns:
            Class ids and group numbers of the epoch's slots, ``num_batches * P`` of each;
            consecutive runs of P slots are the batches.
        """
        # Sorting by round, then by a random key, shuffles within each round only.
        order = np.lexsort((rng.random(len(self._slot_round)), self._slot_round))
        classes = self._slot_class[order]
        groups = self._slot_round
        p = self._p
        _separate_rounds(classes, self._round_ends[:-1], p)
        used = self._num_batches * p
        missing = used - len(classes)
        if missing > 0:
            # "one" mode pads its only round with second groups of its first P - C % P
            # classes; as C >= P, none is among the last C % P that the padded batch holds.
            classes = np.concatenate((classes, classes[:missing]))
            groups = np.concatenate((groups, np.ones(missing, dtype=np.int64)))
        return classes[:used], groups[:used]


class _OfflineBatches(Sampler[list[int]]):
    """Batches of a fixed count per epoch, deterministic per ``(seed, epoch)`` and resumable
    mid-epoch (``set_epoch(epoch, start_batch)``, as :class:`PKSampler`), built from what
    offline mining last found."""

    def __init__(self, num_batches: int, seed: int) -> None:
        super().__init__()
        self._num_batches = _check_int(num_batches, "num_batches", 1)
        self._seed = _check_int(seed, "seed", 0)
        self._epoch = 0
        self._start_batch = 0

    def __len__(self) -> int:
        return self._num_batches

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Selects the epoch the next iteration yields, from batch ``start_batch`` on."""
        self._epoch = _check_int(epoch, "epoch", 0)
        self._start_batch = _check_int(start_batch, "start_batch", 0)
        if self._start_batch > self._num_batches:
            raise ValueError(f"start_batch={start_batch} is past the epoch's {self._num_batches}")

    def _rng(self, batch: int) -> np.random.Generator:
        # One stream per batch: resuming at any batch draws what the whole epoch would.
        return np.random.default_rng([self._seed, self._epoch, batch, 2])

    def __iter__(self) -> Iterator[list[int]]:
        for batch in range(self._start_batch, self._num_batches):
            yield self._batch(batch)

    def _batch(self, batch: int) -> list[int]:
        """The dataset indices of batch ``batch`` of the epoch; each offline sampler's own."""
        raise NotImplementedError


class HardClassSampler(_OfflineBatches):
    """P×K batches of confusable classes: each batch is a seed class, its nearest classes (by
    centroid, from :func:`~dmlkit.functional.offline.nearest_classes`) and a share of random
    classes; K items of each (with replacement from a class of fewer than K).

    Until :meth:`set_neighbours` is first called, batches are P random classes.

    Args:
        labels: One integer label per dataset item.
        classes_per_batch: P.
        samples_per_class: K.
        random_share: The share of the P − 1 classes after the seed that are random, in [0, 1].
        num_batches: Batches per epoch.
        seed: Non-negative seed.
    """

    def __init__(
        self,
        labels: Sequence[int] | npt.NDArray[Any] | Tensor,
        classes_per_batch: int,
        samples_per_class: int,
        *,
        random_share: float = 0.25,
        num_batches: int,
        seed: int = 0,
    ) -> None:
        super().__init__(num_batches, seed)
        self._p = _check_int(classes_per_batch, "classes_per_batch", 1)
        self._k = _check_int(samples_per_class, "samples_per_class", 1)
        if not 0.0 <= random_share <= 1.0:
            raise ValueError(f"random_share must be in [0, 1], got {random_share}")
        self._random_share = random_share
        self._items, self._starts, self._sizes = _class_index(_labels_to_numpy(labels))
        if len(self._sizes) < max(2, self._p):
            raise ValueError(
                f"hard-class batches of {self._p} classes need at least {max(2, self._p)} "
                f"classes, got {len(self._sizes)}"
            )
        self.neighbours: IntArray | None = None

    def set_neighbours(self, order: npt.NDArray[Any]) -> None:
        """Each class's other classes nearest first: (C, C − 1) positions into ``classes``."""
        order = np.asarray(order, dtype=np.int64)
        if order.shape != (len(self._sizes), len(self._sizes) - 1):
            raise ValueError(
                f"neighbours must be ({len(self._sizes)}, {len(self._sizes) - 1}), "
                f"got {order.shape}"
            )
        self.neighbours = order

    @property
    def near_per_batch(self) -> int:
        """How many of a batch's classes are the seed class's nearest."""
        return round((self._p - 1) * (1.0 - self._random_share))

    def _batch(self, batch: int) -> list[int]:
        rng = self._rng(batch)
        num_classes = len(self._sizes)
        seed_class = int(rng.integers(num_classes))
        chosen = [seed_class]
        if self.neighbours is not None:
            chosen += self.neighbours[seed_class, : self.near_per_batch].tolist()
        rest = np.setdiff1d(np.arange(num_classes), chosen)
        chosen += rng.choice(rest, self._p - len(chosen), replace=False).tolist()
        out: list[int] = []
        for c in chosen:
            size = int(self._sizes[c])
            picks = rng.choice(size, self._k, replace=size < self._k)
            out += self._items[self._starts[c] + picks].tolist()
        return out


class TripletBatchSampler(_OfflineBatches):
    """Batches packed from mined triplets, flat (a, p, n, a, p, n, ...): PML's
    ``FixedSetOfTriplets`` layout, the triplets coming from offline mining. An epoch is
    ``num_batches`` batches (as many as a P×K epoch, not one pass over the triplets): it takes
    the first ``num_batches × triplets_per_batch`` triplets of a new seeded order, cycling when
    there are fewer.

    Args:
        triplets_per_batch: Triplets in a batch (3 items each).
        num_batches: Batches per epoch.
        seed: Non-negative seed.
    """

    def __init__(self, triplets_per_batch: int, *, num_batches: int, seed: int = 0) -> None:
        super().__init__(num_batches, seed)
        self._per_batch = _check_int(triplets_per_batch, "triplets_per_batch", 1)
        self.triplets: IntArray = np.zeros((0, 3), dtype=np.int64)
        self._order: tuple[tuple[int, int], IntArray] | None = None

    def set_triplets(self, triplets: npt.NDArray[Any]) -> None:
        """The (T, 3) item indices to train on from now on."""
        triplets = np.asarray(triplets, dtype=np.int64)
        if triplets.ndim != 2 or triplets.shape[1] != 3:
            raise ValueError(f"triplets must be (T, 3), got {triplets.shape}")
        self.triplets = triplets
        self._order = None

    def _batch(self, batch: int) -> list[int]:
        count = len(self.triplets)
        if count == 0:
            raise ValueError("no triplets: offline mining found none of the requested kind")
        if self._order is None or self._order[0] != (self._epoch, count):
            rng = np.random.default_rng([self._seed, self._epoch, 3])
            self._order = ((self._epoch, count), rng.permutation(count))
        order = self._order[1]
        positions = order[(batch * self._per_batch + np.arange(self._per_batch)) % count]
        return self.triplets[positions].reshape(-1).tolist()


class _FreshEpochs:
    """Seed and epoch of a sampler that, like PML's, draws a new epoch on every iteration, but
    from a generator seeded with ``(seed, epoch)`` rather than from global random state.

    An iteration draws the epoch last set by :meth:`set_epoch` (0 at first), then moves on to
    the next: a loop that never calls it still gets a new epoch each time, and one that calls
    ``set_epoch(e)`` before epoch e gets the same epoch on every rank and every rerun.
    """

    _seed: int
    _epoch: int

    def _start_epochs(self, seed: int) -> None:
        self._seed = _check_int(seed, "seed", 0)
        self._epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Selects the epoch the next iteration draws.

        Args:
            epoch: Non-negative epoch number; with the seed it fixes the epoch.
        """
        self._epoch = _check_int(epoch, "epoch", 0)

    def state_dict(self) -> dict[str, int]:
        """The epoch the next iteration draws, and the seed."""
        return {"epoch": self._epoch, "seed": self._seed}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        """Restores a :meth:`state_dict`, so that the next iteration draws the same epoch.

        Args:
            state: A mapping with exactly the keys ``epoch`` and ``seed``.
        """
        expected = {"epoch", "seed"}
        if set(state) != expected:
            raise ValueError(
                f"state must have exactly the keys {sorted(expected)}; got {sorted(state)}"
            )
        seed = _check_int(state["seed"], "state['seed']", 0)
        self.set_epoch(state["epoch"])
        self._seed = seed

    def _epoch_generator(self) -> np.random.Generator:
        """The current epoch's generator; the next call gets the next epoch's."""
        rng = np.random.default_rng([self._seed, self._epoch])
        self._epoch += 1
        return rng


class MPerClassSampler(_FreshEpochs, Sampler[int]):
    """PML's ``MPerClassSampler``: a stream of dataset indices, m per class, for
    ``DataLoader(sampler=..., batch_size=batch_size)``.

    Every run of m indices is one class; with ``batch_size`` each run of ``batch_size`` indices
    (a DataLoader batch) holds ``batch_size // m`` distinct classes, and without it each run of
    ``m × C`` indices holds all C classes. A class with at least m items gives m distinct ones,
    a smaller class m drawn with replacement. An iteration yields ``len(self)`` indices:
    ``length_before_new_iter`` rounded down to a multiple of ``batch_size`` (of ``m × C`` when
    ``batch_size`` is None and ``m × C`` is smaller), as in PML.

    How the draws are spread differs from PML's, on PKSampler's lines: PML picks each batch's
    classes anew, so a class may miss many batches in a row, and each class's m items anew;
    here classes come in passes, each a random order of all C classes in which every class
    appears once (consecutive passes are joined so that no batch repeats a class), and a class's
    groups are consecutive runs of m in successive shuffles of its items, so its items are used
    evenly. Where PML's iteration overruns its own length (``batch_size`` None and
    ``m × C > length_before_new_iter``, PML yields ``m × C`` indices), this one yields exactly
    ``len(self)``.

    Args:
        labels: One integer label per dataset item.
        m: Items per class in each run.
        batch_size: The DataLoader's batch size, or None; a multiple of m, at most ``m × C``.
        length_before_new_iter: The number of indices per iteration (rounded as above).
        seed: Non-negative seed; each iteration draws a new epoch (see
            :meth:`set_epoch`).
    """

    def __init__(
        self,
        labels: Sequence[int] | npt.NDArray[Any] | Tensor,
        m: int,
        batch_size: int | None = None,
        length_before_new_iter: int = 100000,
        *,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self._start_epochs(seed)
        self._m = _check_int(m, "m", 1)
        length = _check_int(length_before_new_iter, "length_before_new_iter", 1)
        self._items, self._starts, self._sizes = _class_index(_labels_to_numpy(labels))
        single_pass = self._m * len(self._sizes)
        if batch_size is None:
            self._batch_size = None
            self._p = len(self._sizes)
            if single_pass < length:
                length -= length % single_pass
        else:
            self._batch_size = _check_int(batch_size, "batch_size", 1)
            if length < self._batch_size:
                raise ValueError(
                    f"length_before_new_iter={length} must be at least batch_size="
                    f"{self._batch_size}"
                )
            if single_pass < self._batch_size:
                raise ValueError(
                    f"m * (number of unique labels) = {self._m} * {len(self._sizes)} must be "
                    f">= batch_size={self._batch_size}"
                )
            if self._batch_size % self._m:
                raise ValueError(
                    f"m={self._m} must divide batch_size={self._batch_size} without any remainder"
                )
            self._p = self._batch_size // self._m
            length -= length % self._batch_size
        self._length = length

    @property
    def m_per_class(self) -> int:
        """m, the items of each class in a run."""
        return self._m

    @property
    def batch_size(self) -> int | None:
        """The batch size the class runs are laid out for, or None."""
        return self._batch_size

    @property
    def num_classes(self) -> int:
        """C, the number of distinct labels."""
        return len(self._sizes)

    def __len__(self) -> int:
        """The number of indices an iteration yields."""
        return self._length

    def __iter__(self) -> Iterator[int]:
        """Yields the next epoch's ``len(self)`` dataset indices."""
        rng = self._epoch_generator()
        num_slots = -(-self._length // self._m)
        classes = self._classes(rng, num_slots)
        return iter(self._groups(rng, classes).reshape(-1)[: self._length].tolist())

    def _classes(self, rng: np.random.Generator, num_slots: int) -> IntArray:
        """The class of each run of m: passes over every class in random order."""
        num_classes = len(self._sizes)
        passes = -(-num_slots // num_classes)
        classes: IntArray = np.argsort(rng.random((passes, num_classes)), axis=1).reshape(-1)
        _separate_rounds(classes, np.arange(1, passes, dtype=np.int64) * num_classes, self._p)
        return classes[:num_slots]

    def _groups(self, rng: np.random.Generator, classes: IntArray) -> IntArray:
        """The m dataset indices of each slot: the u-th use of a class with n ≥ m items takes
        run ``u mod (n // m)`` of shuffle ``u // (n // m)`` of its items; a smaller class gives
        m items drawn with replacement."""
        m, sizes = self._m, self._sizes
        # Each slot's use number: its rank among the slots of its class.
        by_class = np.argsort(classes, kind="stable")
        sorted_classes = classes[by_class]
        use = np.empty_like(classes)
        use[by_class] = np.arange(len(classes)) - np.searchsorted(sorted_classes, sorted_classes)
        runs_per_shuffle = sizes // m
        uses = np.bincount(classes, minlength=len(sizes))
        shuffles = np.where(runs_per_shuffle > 0, -(-uses // np.maximum(runs_per_shuffle, 1)), 0)
        # One block per (class, shuffle): the class's items, shuffled within the block.
        block_class = np.repeat(np.arange(len(sizes)), shuffles)
        block_size = sizes[block_class]
        block_start = np.cumsum(block_size) - block_size
        block_of = np.repeat(np.arange(len(block_class)), block_size)
        offset = np.arange(int(block_size.sum())) - block_start[block_of]
        pool = self._items[self._starts[block_class[block_of]] + offset]
        pool = pool[np.lexsort((rng.random(len(pool)), block_of))]

        out = np.empty((len(classes), m), dtype=np.int64)
        full = runs_per_shuffle[classes] > 0
        c, u = classes[full], use[full]
        first_block = np.cumsum(shuffles) - shuffles
        block = first_block[c] + u // runs_per_shuffle[c]
        out[full] = pool[(block_start[block] + u % runs_per_shuffle[c] * m)[:, None] + np.arange(m)]
        small = classes[~full]
        draws = rng.integers(0, sizes[small, None], size=(len(small), m))
        out[~full] = self._items[self._starts[small, None] + draws]
        return out


class HierarchicalSampler(_FreshEpochs, Sampler[list[int]]):
    """PML's ``HierarchicalSampler``: batches drawn from tuples of super-classes, for
    ``DataLoader(batch_sampler=...)``.

    Every tuple of ``super_classes_per_batch`` distinct super-classes (all combinations) gives
    ``batches_per_super_tuple`` batches per epoch. Each batch has one sub-batch of
    ``batch_size // super_classes_per_batch`` slots per super-class of its tuple, filled by
    going through that super-class's classes in random order and adding ``samples_per_class``
    items of each (distinct when the class has enough, else drawn with replacement; all its
    items, shuffled, for ``"all"``) while they fit; a class that would overflow the sub-batch is
    skipped, so a sub-batch may be short. The batch's items are shuffled, and so are the batches.
    A class is an (outer label, inner label) pair, as in PML.

    Args:
        labels: (N, L) integer labels, one row per item, one column per hierarchy level.
        batch_size: The batch size; a multiple of ``super_classes_per_batch``.
        samples_per_class: Items per class, dividing ``batch_size // super_classes_per_batch``,
            or ``"all"``.
        batches_per_super_tuple: Batches drawn from each tuple of super-classes per epoch.
        super_classes_per_batch: Super-classes in each batch.
        inner_label: The column of the class labels.
        outer_label: The column of the super-class labels.
        seed: Non-negative seed; each iteration draws a new epoch (see
            :meth:`MPerClassSampler.set_epoch`).
    """

    def __init__(
        self,
        labels: Sequence[Sequence[int]] | npt.NDArray[Any] | Tensor,
        batch_size: int,
        samples_per_class: int | Literal["all"],
        batches_per_super_tuple: int = 4,
        super_classes_per_batch: int = 2,
        inner_label: int = 0,
        outer_label: int = 1,
        *,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self._start_epochs(seed)
        array = _labels_to_numpy(labels, ndim=2)
        self.batch_size = _check_int(batch_size, "batch_size", 1)
        self.batches_per_super_tuple = _check_int(
            batches_per_super_tuple, "batches_per_super_tuple", 1
        )
        self.super_classes_per_batch = _check_int(
            super_classes_per_batch, "super_classes_per_batch", 1
        )
        for name, column in (("inner_label", inner_label), ("outer_label", outer_label)):
            if _check_int(column, name, 0) >= array.shape[1]:
                raise ValueError(
                    f"{name}={column} is not a column of the {array.shape[1]}-column labels"
                )
        if self.batch_size % self.super_classes_per_batch:
            raise ValueError(
                f"batch_size={self.batch_size} should be a multiple of super_classes_per_batch="
                f"{self.super_classes_per_batch}"
            )
        self.sub_batch_len = self.batch_size // self.super_classes_per_batch
        if samples_per_class != "all":
            _check_int(samples_per_class, "samples_per_class", 1)
            if self.sub_batch_len % samples_per_class:
                raise ValueError(
                    f"batch_size // super_classes_per_batch = {self.sub_batch_len} must be a "
                    f"multiple of samples_per_class={samples_per_class}"
                )
        self.samples_per_class = samples_per_class

        pairs = array[:, [outer_label, inner_label]]
        classes, class_of = np.unique(pairs, axis=0, return_inverse=True)
        self._items, self._starts, self._sizes = _class_index(class_of.reshape(-1))
        supers, super_of_class = np.unique(classes[:, 0], return_inverse=True)
        if len(supers) < self.super_classes_per_batch:
            raise ValueError(
                f"super_classes_per_batch={self.super_classes_per_batch} needs at least that "
                f"many super-classes, but labels have {len(supers)}"
            )
        self._classes_of_super = [np.flatnonzero(super_of_class == s) for s in range(len(supers))]
        self._super_tuples = list(
            itertools.combinations(range(len(supers)), self.super_classes_per_batch)
        )

    def __len__(self) -> int:
        """The number of batches per epoch."""
        return len(self._super_tuples) * self.batches_per_super_tuple

    def __iter__(self) -> Iterator[list[int]]:
        """Yields the next epoch's batches of dataset indices."""
        rng = self._epoch_generator()
        batches = [
            rng.permutation(np.concatenate([self._sub_batch(rng, s) for s in super_tuple]))
            for super_tuple in self._super_tuples
            for _ in range(self.batches_per_super_tuple)
        ]
        for b in rng.permutation(len(batches)):
            yield batches[b].tolist()

    def _sub_batch(self, rng: np.random.Generator, super_class: int) -> IntArray:
        chosen: list[IntArray] = []
        filled = 0
        for c in rng.permutation(self._classes_of_super[super_class]):
            if filled >= self.sub_batch_len:
                break
            size = int(self._sizes[c])
            take = size if self.samples_per_class == "all" else int(self.samples_per_class)
            if filled + take > self.sub_batch_len:
                continue
            offsets = rng.choice(size, take, replace=size < take)
            chosen.append(self._items[self._starts[c] + offsets])
            filled += take
        return np.concatenate(chosen) if chosen else np.empty(0, dtype=np.int64)


class FixedSetOfTriplets(_FreshEpochs, Sampler[int]):
    """PML's ``FixedSetOfTriplets``: ``num_triplets`` (anchor, positive, negative) triplets drawn
    once, yielded flat (a, p, n, a, p, n, ...) in a new order every iteration, for
    ``DataLoader(sampler=..., batch_size=3 * k)``.

    Each triplet takes two distinct classes at random, an anchor and a positive from the first
    (distinct items when the class has two; the same item twice when it has one) and a negative
    from the second, all uniformly, as PML does.

    Args:
        labels: One integer label per dataset item; at least two classes.
        num_triplets: The number of triplets.
        seed: Non-negative seed of the triplets and of each iteration's order (see
            :meth:`MPerClassSampler.set_epoch`).
    """

    def __init__(
        self,
        labels: Sequence[int] | npt.NDArray[Any] | Tensor,
        num_triplets: int,
        *,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self._start_epochs(seed)
        self.num_triplets = _check_int(num_triplets, "num_triplets", 1)
        self._classes = _class_index(_labels_to_numpy(labels))
        if len(self._classes[2]) < 2:
            raise ValueError("FixedSetOfTriplets needs at least 2 classes, got 1")
        self._triplets = self._draw_triplets()

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        """Restores a :meth:`state_dict`: its seed's triplets, and the epoch's order."""
        super().load_state_dict(state)
        self._triplets = self._draw_triplets()

    def _draw_triplets(self) -> IntArray:
        items, starts, sizes = self._classes
        num_classes = len(sizes)
        # SeedSequence ignores trailing zero words: (seed, 0, 1) is no epoch's (seed, epoch).
        rng = np.random.default_rng([self._seed, 0, 1])
        count = self.num_triplets
        anchor_class = rng.integers(0, num_classes, size=count)
        negative_class = (anchor_class + 1 + rng.integers(0, num_classes - 1, size=count)) % (
            num_classes
        )
        size = sizes[anchor_class]
        anchor = rng.integers(0, size)
        # The positive is uniform over the class's other items (itself for a single item).
        positive = (anchor + 1 + rng.integers(0, np.maximum(size - 1, 1))) % size
        negative = rng.integers(0, sizes[negative_class])
        first = starts[anchor_class]
        return np.stack(
            (
                items[first + anchor],
                items[first + positive],
                items[starts[negative_class] + negative],
            ),
            axis=1,
        )

    @property
    def fixed_set_of_triplets(self) -> IntArray:
        """The (num_triplets, 3) dataset indices of the triplets, in the order drawn."""
        return self._triplets.copy()

    def __len__(self) -> int:
        """The number of indices an iteration yields: 3 per triplet."""
        return 3 * self.num_triplets

    def __iter__(self) -> Iterator[int]:
        """Yields every triplet's indices, the triplets in the next epoch's order."""
        order = self._epoch_generator().permutation(self.num_triplets)
        return iter(self._triplets[order].reshape(-1).tolist())


Miner = Callable[[Tensor, Tensor], tuple[Tensor, ...]]
"""Mines index tuples from ``(embeddings, labels)``: a dmlkit or PML miner."""


class TuplesToWeightsSampler(_FreshEpochs, Sampler[int]):
    """PML's ``TuplesToWeightsSampler``: each iteration embeds the dataset (or a random subset),
    mines it, and samples items with replacement in proportion to how often the miner's tuples
    hold them, for ``DataLoader(sampler=...)``.

    An item's weight is its count in the mined tuples over the largest count (0 for items the
    miner leaves out, or outside the subset); when nothing is mined every embedded item weighs
    1, as in PML. Of PML's ``**tester_kwargs`` (the options of its ``BaseTester``) only those
    about computing embeddings make sense without PML's testers, and are taken with PML's
    defaults: ``batch_size``, ``dataloader_num_workers``, ``data_device``, ``dtype``,
    ``normalize_embeddings`` and ``data_and_label_getter``; any other is refused. Unlike PML's
    tester, the model's training mode is restored after embedding, and ``data_device``
    defaults to the model's device.

    Args:
        model: Maps a batch of inputs to (B, D) embeddings.
        miner: Mines index tuples from ``(embeddings, labels)``.
        dataset: Yields ``(input, label)`` items (see ``data_and_label_getter``).
        subset_size: Embed and mine this many random items (drawn without replacement when
            the dataset has that many), and yield that many indices; None for all.
        batch_size: Items per forward pass.
        dataloader_num_workers: Workers of the embedding DataLoader.
        data_device: Where the model runs; None for the device of its parameters.
        dtype: The dtype inputs are cast to, or None.
        normalize_embeddings: L2-normalise the embeddings before mining.
        data_and_label_getter: Maps a DataLoader batch to ``(inputs, labels)``; None for a
            batch that is that pair.
        seed: Non-negative seed of the subset and of the sampling (see
            :meth:`MPerClassSampler.set_epoch`).
    """

    def __init__(
        self,
        model: nn.Module,
        miner: Miner,
        dataset: Dataset[Any],
        subset_size: int | None = None,
        *,
        batch_size: int = 32,
        dataloader_num_workers: int = 2,
        data_device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        normalize_embeddings: bool = True,
        data_and_label_getter: Callable[[Any], tuple[Tensor, Tensor]] | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self._start_epochs(seed)
        self.model = model
        self.miner = miner
        self.dataset = dataset
        self._dataset_size = _check_int(len(dataset), "len(dataset)", 1)  # type: ignore[arg-type]
        self.subset_size = (
            None if subset_size is None else _check_int(subset_size, "subset_size", 1)
        )
        self.batch_size = _check_int(batch_size, "batch_size", 1)
        self.dataloader_num_workers = _check_int(
            dataloader_num_workers, "dataloader_num_workers", 0
        )
        self.data_device = data_device
        self.dtype = dtype
        self.normalize_embeddings = normalize_embeddings
        self.data_and_label_getter = data_and_label_getter
        self.weights: Tensor | None = None

    def __len__(self) -> int:
        """The number of indices an iteration yields."""
        return self._dataset_size if self.subset_size is None else self.subset_size

    def __iter__(self) -> Iterator[int]:
        """Embeds and mines, then yields ``len(self)`` indices drawn by the new weights."""
        rng = self._epoch_generator()
        n = self._dataset_size
        if self.subset_size is None:
            indices = np.arange(n)
            dataset = self.dataset
        else:
            indices = rng.choice(n, self.subset_size, replace=self.subset_size > n)
            dataset = Subset(self.dataset, indices.tolist())
        embeddings, labels = self._embed(dataset)
        tuples = self.miner(embeddings, labels)
        weights = torch.zeros(n)
        weights[torch.from_numpy(indices)] = tuple_weights(tuples, len(labels))
        self.weights = weights
        generator = torch.Generator().manual_seed(int(rng.integers(2**63)))
        drawn = torch.multinomial(
            weights.double(), len(self), replacement=True, generator=generator
        )
        return iter(drawn.tolist())

    @torch.no_grad()
    def _embed(self, dataset: Dataset[Any]) -> tuple[Tensor, Tensor]:
        device = self.data_device
        if device is None:
            first = next(itertools.chain(self.model.parameters(), self.model.buffers()), None)
            device = "cpu" if first is None else first.device
        loader: DataLoader[Any] = DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=self.dataloader_num_workers,
            # Its own generator: a DataLoader seeds its workers from global state otherwise.
            generator=torch.Generator().manual_seed(0),
        )
        was_training = self.model.training
        self.model.eval()
        chunks, label_chunks = [], []
        try:
            for batch in loader:
                inputs, labels = (
                    batch
                    if self.data_and_label_getter is None
                    else self.data_and_label_getter(batch)
                )
                chunks.append(self.model(inputs.to(device=device, dtype=self.dtype)))
                label_chunks.append(torch.as_tensor(labels).reshape(len(labels), -1))
        finally:
            self.model.train(was_training)
        embeddings = torch.cat(chunks)
        labels = torch.cat(label_chunks)
        if labels.shape[1] != 1:
            raise ValueError(f"the dataset must give one label per item, got {labels.shape[1]}")
        if self.normalize_embeddings:
            embeddings = nn.functional.normalize(embeddings)
        return embeddings, labels[:, 0].to(embeddings.device)


def tuple_weights(tuples: Sequence[Tensor] | None, size: int) -> Tensor:
    """Each of ``size`` items' count in the index tuples over the largest count, as float32
    (PML's ``convert_to_weights``); every item weighs 1 when the tuples are empty or None.

    Args:
        tuples: Index tensors (pairs or triplets), or None.
        size: The number of items.

    Returns:
        (size,) weights.
    """
    if tuples is None or all(len(t) == 0 for t in tuples):
        return torch.ones(size)
    counts = torch.bincount(torch.cat([t.reshape(-1).cpu() for t in tuples]), minlength=size)
    return counts.float() / counts.max()
