"""P×K batch sampling: every batch holds P distinct classes with K samples each.

:class:`PKSampler` is a batch sampler (pass it as ``DataLoader(batch_sampler=...)``) for the
losses and miners that need positives in every batch. An epoch is built in three steps, all from
one numpy Generator seeded with ``(seed, epoch)`` so every rank, and every resumed run, builds the
same epoch:

1. Every class's items are put in a fresh random order; a class's groups are consecutive runs of
   K items in that order, so the groups of one class are disjoint.
2. A class schedule lists ``(class, group)`` slots; consecutive runs of P slots are the batches.
3. Each global batch is split across ranks by class position, so each rank gets P / W whole
   class groups.

Batch assembly (``groups_per_class="all"``) is round-robin: round ``r`` lists, in a fresh random
order, every class that still has an unused group, so each class appears at most once per round.
A round's leftover slots (fewer than P) open the next round's first batch, which takes the first
classes of the next round that are not among those leftovers; rounds run while they list at least
P classes, which always completes that batch. An epoch costs two sorts (items, slots) and O(P)
Python work per round, and its number of batches depends only on the class sizes, never on the
random draws.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from torch import Tensor
from torch.utils.data import Sampler

IntArray = npt.NDArray[np.int64]

_STATE_KEYS = frozenset({"epoch", "start_batch", "seed"})


def _check_int(value: object, name: str, minimum: int) -> int:
    # bool is an int subclass, but True as a batch size is always a bug.
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _labels_to_numpy(labels: object) -> npt.NDArray[Any]:
    """Converts labels to a 1-D numpy integer array, rejecting anything that is not one.

    Args:
        labels: A sequence of ints, a numpy array or a tensor.

    Returns:
        The labels as a 1-D numpy array of an integer dtype (the values unchanged).
    """
    if isinstance(labels, Tensor):
        array = labels.detach().cpu().numpy()
    else:
        try:
            array = np.asarray(labels)
        except ValueError as error:
            raise ValueError(f"labels must be a 1-D sequence of ints: {error}") from error
    if array.ndim != 1:
        raise ValueError(f"labels must be 1-D, got {array.ndim}-D shape {array.shape}")
    if array.size == 0:
        raise ValueError("labels is empty; the sampler needs at least one labelled item")
    # kind "i"/"u" excludes bool, float (and so NaN), complex, str and object arrays.
    if array.dtype.kind not in "iu":
        raise ValueError(f"labels must have an integer dtype, got {array.dtype}")
    return array


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
    class groups at positions ``r, r + W, ...`` of each, so every rank yields the same number of
    batches of ``(P // W) * K`` indices.

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
        mine = batches[:, self._rank :: self._world_size, :].reshape(len(batches), self.batch_size)
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
        for end, carried in zip(
            self._round_ends[:-1].tolist(), (self._round_ends[:-1] % p).tolist(), strict=True
        ):
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
        used = self._num_batches * p
        missing = used - len(classes)
        if missing > 0:
            # "one" mode pads its only round with second groups of its first P - C % P
            # classes; as C >= P, none is among the last C % P that the padded batch holds.
            classes = np.concatenate((classes, classes[:missing]))
            groups = np.concatenate((groups, np.ones(missing, dtype=np.int64)))
        return classes[:used], groups[:used]
