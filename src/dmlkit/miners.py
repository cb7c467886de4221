"""Online miners with PML's call contract.

``miner(embeddings, labels, ref_emb=None, ref_labels=None, anchor_in_ref=None)`` returns triplets
(a, p, n) or pairs (a1, p, a2, n) as ``torch.long`` index tensors, which dmlkit and PML losses
both accept. Mining runs without gradient. After each call, ``miner.last_stats`` holds what was
mined (and ``num_pos_pairs``, ``num_neg_pairs``, ``num_triplets`` read as in PML) for logging.

Each anchor's pair with itself is never mined: the diagonal without ``ref_emb``, and the pairs
``anchor_in_ref`` names with it. They are left out before mining, as in a batch against itself,
so an anchor's own copy in the reference set never sets a mining threshold (PML's
``CrossBatchMemory`` removes them from the mined tuple afterwards).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import ClassVar, Literal

import torch
from torch import Tensor, nn

from .batch import Batch
from .distances import (
    BaseDistance,
    CosineSimilarity,
    LpDistance,
    SimilarityRequirement,
    check_distance,
)
from .functional import mining
from .functional.masks import label_weights
from .functional.triplets import DEFAULT_CHUNK_ELEMENTS, mine_triplets
from .registry import Registry
from .validation import (
    IndicesTuple,
    check_embeddings,
    check_finite_number,
    check_indices_tuple,
    check_labels,
    check_positive_int,
)


@dataclass(frozen=True)
class MiningStats:
    """What a miner returned on its last call.

    Attributes:
        num_pos_pairs: Positive pairs returned (pair miners; 0 for triplet miners).
        num_neg_pairs: Negative pairs returned (pair miners; 0 for triplet miners).
        num_triplets: Triplets returned (triplet miners; 0 for pair miners).
    """

    num_pos_pairs: int = 0
    num_neg_pairs: int = 0
    num_triplets: int = 0

    def as_dict(self) -> dict[str, float | int | None]:
        """Flat mapping for loggers."""
        return asdict(self)


@dataclass(frozen=True)
class ASMSStats(MiningStats):
    """What (AT-)ASMS mined, and the tolerances it used.

    Attributes:
        gamma_pos: Positive tolerance used.
        gamma_neg: Negative tolerance used.
        ratio: AT-ASMS's r = mined negatives / all positives (None for static ASMS or when the
            batch has no positive pair).
        tau: AT-ASMS's τ (0 when r ≤ 1 or for static ASMS).
        num_skipped_anchors: Anchors left with no mined positive or no mined negative, which
            the Soft Contrastive loss skips.
    """

    gamma_pos: float = 0.0
    gamma_neg: float = 0.0
    ratio: float | None = None
    tau: float = 0.0
    num_skipped_anchors: int = 0


class BaseMiner(nn.Module):
    """Shared call contract: checks inputs, mines without gradient, records what it mined.

    Attributes:
        requires_similarity: What ``distance`` must be: False for anything, True for any
            similarity, or the one similarity class the rule is written for.
        mines_rows_independently: Each anchor's tuples depend on its own row of the matrix
            only (not on the batch as a whole, positions or random draws): mining a batch
            against a memory bank then equals mining their union and keeping the batch's
            anchors.

    Args:
        distance: The distance or similarity; None for ``default_distance()`` (PML's).
    """

    requires_similarity: ClassVar[SimilarityRequirement] = False
    mines_rows_independently: ClassVar[bool] = True

    def __init__(self, distance: BaseDistance | None = None) -> None:
        super().__init__()
        self.distance = self.default_distance() if distance is None else distance
        check_distance(type(self).__name__, self.distance, self.requires_similarity)
        self.last_stats: MiningStats = MiningStats()

    @staticmethod
    def default_distance() -> BaseDistance:
        """The distance used when none is given."""
        return LpDistance()

    @property
    def num_pos_pairs(self) -> int:
        return self.last_stats.num_pos_pairs

    @property
    def num_neg_pairs(self) -> int:
        return self.last_stats.num_neg_pairs

    @property
    def num_triplets(self) -> int:
        return self.last_stats.num_triplets

    def forward(
        self,
        embeddings: Tensor,
        labels: Tensor,
        ref_emb: Tensor | None = None,
        ref_labels: Tensor | None = None,
        anchor_in_ref: Tensor | None = None,
    ) -> IndicesTuple:
        """Mines one batch.

        Args:
            embeddings: (N, D) embeddings.
            labels: (N,) integer labels.
            ref_emb: (M, D) reference embeddings for positives and negatives.
            ref_labels: (M,) labels of ``ref_emb``.
            anchor_in_ref: (N,) integer row of ``ref_emb`` holding each anchor itself, or −1
                where the anchor is not in the reference set; those pairs are never mined.

        Returns:
            (a, p, n) or (a1, p, a2, n): anchors index ``embeddings``, positives and negatives
            index ``ref_emb`` (or ``embeddings`` when no reference set is given).
        """
        batch = Batch.from_call(
            embeddings, labels, None, ref_emb, ref_labels, anchor_in_ref, labels_required=True
        )
        with torch.no_grad():
            mined, stats = self.mine_batch(batch)
        return self._record(mined, stats)

    def mine_batch(self, batch: Batch) -> tuple[IndicesTuple, MiningStats]:
        """Mines a checked batch: by default ``mine`` on its matrix and label weights. Miners
        whose rule needs more than the matrix (the embeddings, their dimension, which anchors
        the reference set holds) override this instead of ``mine``.
        """
        mat = batch.matrix(self.distance)
        sim = mat if self.distance.is_inverted else mat.neg_()
        pos, neg = batch.label_weights()
        return self.mine(sim, pos, neg)

    def mine_similarities(self, sim: Tensor, labels: Tensor) -> IndicesTuple:
        """Mines a batch against itself from its (N, N) similarity matrix, already computed
        with this miner's distance (which must be a similarity); as ``forward`` otherwise.

        Args:
            sim: (N, N) similarities of the batch; not modified.
            labels: (N,) integer labels.
        """
        if not self.distance.is_inverted:
            raise ValueError(f"{type(self).__name__} mines distances, not similarities")
        sim = check_embeddings(sim, "similarities")
        if sim.shape[0] != sim.shape[1]:
            raise ValueError(f"similarities must be square (N, N), got {tuple(sim.shape)}")
        labels = check_labels(labels, sim.shape[0], sim.device)
        with torch.no_grad():
            pos, neg = label_weights(labels, None, sim.dtype)
            mined, stats = self.mine(sim.detach().clone(), pos, neg)
        return self._record(mined, stats)

    def _record(self, mined: IndicesTuple, stats: MiningStats) -> IndicesTuple:
        if len(mined) == 3:
            self.last_stats = replace(stats, num_triplets=len(mined[0]))
        else:
            self.last_stats = replace(
                stats, num_pos_pairs=len(mined[0]), num_neg_pairs=len(mined[2])
            )
        return mined

    def mine(self, sim: Tensor, pos: Tensor, neg: Tensor) -> tuple[IndicesTuple, MiningStats]:
        """Mines from a similarity-like matrix (distances arrive negated) and 0/1 float label
        weights of the positive and negative pairs; all three are the miner's own buffers and
        may be overwritten.

        Returns:
            The mined tuple, and this call's stats beyond the counts of what was mined (which
            the caller fills in): ``MiningStats()`` for miners with nothing more to tell.
        """
        raise NotImplementedError


TripletType = Literal["all", "hard", "semihard", "easy"]


MINERS = Registry("miner", BaseMiner)


@MINERS.register()
class TripletMarginMiner(BaseMiner):
    """Triplets by their margin t = d_an − d_ap: ``"all"`` t ≤ margin, ``"hard"`` t ≤ 0
    (and ≤ margin), ``"semihard"`` 0 < t ≤ margin, ``"easy"`` t > margin.

    Works in blocks of positive pairs; besides the output (one entry per mined triplet) it
    keeps one byte per candidate (positive pair × reference), so that the triplets are listed
    at once. Reads the device twice: the positive pairs' number sizes the candidates, and the
    triplets' number the output.

    Args:
        margin: The margin.
        type_of_triplets: ``"all"``, ``"hard"``, ``"semihard"`` or ``"easy"``.
        distance: Default ``LpDistance()``.
        chunk_elements: Upper bound on temporaries.
    """

    def __init__(
        self,
        margin: float = 0.2,
        type_of_triplets: TripletType = "all",
        distance: BaseDistance | None = None,
        chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    ) -> None:
        super().__init__(distance)
        if type_of_triplets not in ("all", "hard", "semihard", "easy"):
            raise ValueError(
                "type_of_triplets must be 'all', 'hard', 'semihard' or 'easy', "
                f"got {type_of_triplets!r}"
            )
        self.margin = margin
        self.type_of_triplets = type_of_triplets
        self.chunk_elements = chunk_elements

    def mine(self, sim: Tensor, pos: Tensor, neg: Tensor) -> tuple[IndicesTuple, MiningStats]:
        bounds: dict[str, tuple[float | None, float | None]] = {
            "all": (None, self.margin),
            "hard": (None, min(self.margin, 0.0)),
            "semihard": (0.0, self.margin),
            "easy": (self.margin, None),
        }
        low, high = bounds[self.type_of_triplets]
        anchors, positives = pos.nonzero(as_tuple=True)
        mined = mine_triplets(-sim, anchors, positives, neg, low, high, self.chunk_elements)
        return mined, MiningStats()


@MINERS.register()
class BatchHardMiner(BaseMiner):
    """One triplet per anchor: its farthest positive and nearest negative.

    Args:
        distance: Default ``LpDistance()``.
    """

    def mine(self, sim: Tensor, pos: Tensor, neg: Tensor) -> tuple[IndicesTuple, MiningStats]:
        return mining.batch_hard_triplets(sim, pos, neg), MiningStats()


@MINERS.register()
class PairMarginMiner(BaseMiner):
    """Positive pairs farther than ``pos_margin`` and negative pairs nearer than ``neg_margin``
    (for similarities: positives below ``pos_margin``, negatives above ``neg_margin``).

    Args:
        pos_margin: Positive margin.
        neg_margin: Negative margin.
        distance: Default ``LpDistance()``.
    """

    def __init__(
        self,
        pos_margin: float = 0.2,
        neg_margin: float = 0.8,
        distance: BaseDistance | None = None,
    ) -> None:
        super().__init__(distance)
        self.pos_margin = pos_margin
        self.neg_margin = neg_margin

    def mine(self, sim: Tensor, pos: Tensor, neg: Tensor) -> tuple[IndicesTuple, MiningStats]:
        # On the similarity-like matrix (distances negated), "farther than the positive
        # margin" is below it and "nearer than the negative margin" is above it.
        sign = 1.0 if self.distance.is_inverted else -1.0
        condition = torch.empty_like(sim)
        pos.mul_(torch.lt(sim, sign * self.pos_margin, out=condition))
        neg.mul_(torch.gt(sim, sign * self.neg_margin, out=condition))
        return mining.pairs_from_masks(pos, neg), MiningStats()


@MINERS.register()
class MultiSimilarityMiner(BaseMiner):
    """Multi-similarity mining: positives less similar than the hardest negative plus
    ``epsilon``, negatives more similar than the hardest positive minus ``epsilon`` (strict).

    Args:
        epsilon: The tolerance.
        distance: Default ``CosineSimilarity()``.
    """

    def __init__(self, epsilon: float = 0.1, distance: BaseDistance | None = None) -> None:
        super().__init__(distance)
        self.epsilon = epsilon

    @staticmethod
    def default_distance() -> BaseDistance:
        return CosineSimilarity()

    def mine(self, sim: Tensor, pos: Tensor, neg: Tensor) -> tuple[IndicesTuple, MiningStats]:
        keep_pos, keep_neg = mining.asymmetric_mining_masks(
            sim, pos, neg, self.epsilon, self.epsilon
        )
        return mining.pairs_from_masks(keep_pos, keep_neg), MiningStats()


@MINERS.register()
class ASMSMiner(BaseMiner):
    """DDTAS's asymmetric sample mining (docs/ddtas.md §2): multi-similarity mining with a separate
    tolerance per side, ``S_ij − γ_pos < maxN_i`` for positives and ``S_ij + γ_neg > minP_i``
    for negatives; it keeps more positives and fewer negatives than symmetric mining.

    Args:
        gamma_pos: Positive tolerance (released value 0.1).
        gamma_neg: Negative tolerance (released value 0.01).
        negative_rule: ``"code"`` (released) or ``"figure"`` (``S_ij − γ_neg > minP_i``, the
            paper figure's sign; an ablation option).
        exclude_self_by_value: Also drop positives with ``S ≥ 1 − 1e-6``, as the released code
            does (a parity option; dmlkit excludes self-pairs by index regardless).
        distance: A similarity; default ``CosineSimilarity()``.
    """

    requires_similarity = True

    def __init__(
        self,
        gamma_pos: float = 0.1,
        gamma_neg: float = 0.01,
        negative_rule: mining.NegativeRule = "code",
        exclude_self_by_value: bool = False,
        distance: BaseDistance | None = None,
    ) -> None:
        super().__init__(distance)
        if negative_rule not in ("code", "figure"):
            raise ValueError(f"negative_rule must be 'code' or 'figure', got {negative_rule!r}")
        self.gamma_pos = gamma_pos
        self.gamma_neg = gamma_neg
        self.negative_rule: mining.NegativeRule = negative_rule
        self.exclude_self_by_value = exclude_self_by_value

    @staticmethod
    def default_distance() -> BaseDistance:
        return CosineSimilarity()

    def tolerances(self, sim: Tensor, pos: Tensor, neg: Tensor) -> Tensor:
        """The tolerances for this batch, static for ASMS, left on the device to be read once
        with the mined sizes: the six values of :func:`.mining.adaptive_tolerance_values`."""
        # Filled on the device: a tensor built from a Python list is copied host→device, which
        # blocks the stream.
        static = (self.gamma_pos, self.gamma_neg, math.nan, 0.0, 0.0, 0.0)
        return torch.stack([sim.new_full((), v, dtype=torch.float64) for v in static])

    def mine(self, sim: Tensor, pos: Tensor, neg: Tensor) -> tuple[IndicesTuple, MiningStats]:
        if self.exclude_self_by_value:
            pos.mul_(sim < 1 - 1e-6)
        values = self.tolerances(sim, pos, neg)
        keep_pos, keep_neg = mining.asymmetric_mining_masks(
            sim, pos, neg, values[0], values[1], self.negative_rule
        )
        skipped = (keep_pos.sum(1) * keep_neg.sum(1) == 0).sum()
        ((a1, p), (a2, n)), read = mining.nonzero_lists([keep_pos, keep_neg], values, skipped)
        used = mining.AdaptiveTolerances.from_values(read[:6])
        stats = ASMSStats(
            gamma_pos=used.gamma_pos,
            gamma_neg=used.gamma_neg,
            ratio=used.ratio,
            tau=used.tau,
            num_skipped_anchors=int(read[6]),
        )
        return (a1, p, a2, n), stats


@MINERS.register()
class ATASMSMiner(ASMSMiner):
    """DDTAS's adaptive-tolerance ASMS (docs/ddtas.md §3), stateless.

    Every batch: count the negatives that symmetric mining at ``epsilon`` keeps (n_neg) and all
    positive pairs (N_pos); if r = n_neg / N_pos > 1 then τ = k·σ(r),
    γ̂_pos = γ_pos·(1 + τ), γ̂_neg = γ_neg·(1 − τ); else the static tolerances. Then ASMS
    with (γ̂_pos, γ̂_neg). The tolerances used are in ``last_stats``.

    Args:
        epsilon: Base tolerance ε (0.1 for CUB and Cars, 0.03 for SOP).
        k: Update scale (released value 1/2).
        gamma_pos: Static positive tolerance; default ε.
        gamma_neg: Static negative tolerance; default ε/10.
        count_tolerance: ε of the counting pass; default ε (an earlier variant used ε/10).
        negative_rule: See ``ASMSMiner``.
        exclude_self_by_value: See ``ASMSMiner``.
        distance: A similarity; default ``CosineSimilarity()``.
    """

    def __init__(
        self,
        epsilon: float = 0.1,
        k: float = 0.5,
        gamma_pos: float | None = None,
        gamma_neg: float | None = None,
        count_tolerance: float | None = None,
        negative_rule: mining.NegativeRule = "code",
        exclude_self_by_value: bool = False,
        distance: BaseDistance | None = None,
    ) -> None:
        super().__init__(
            epsilon if gamma_pos is None else gamma_pos,
            epsilon / 10 if gamma_neg is None else gamma_neg,
            negative_rule,
            exclude_self_by_value,
            distance,
        )
        self.epsilon = epsilon
        self.k = k
        self.count_tolerance = epsilon if count_tolerance is None else count_tolerance

    def tolerances(self, sim: Tensor, pos: Tensor, neg: Tensor) -> Tensor:
        return mining.adaptive_tolerance_values(
            sim, pos, neg, self.gamma_pos, self.gamma_neg, self.count_tolerance, self.k
        )


def _check_unit_euclidean(owner: str, distance: BaseDistance) -> None:
    """PML's angular and distance-weighted rules assume Euclidean distances of unit vectors."""
    if not (distance.p == 2 and distance.power == 1 and distance.normalize_embeddings):
        raise ValueError(
            f"{owner} requires LpDistance(p=2, power=1, normalize_embeddings=True), "
            f"got {distance!r}"
        )


def _check_number(value: object, name: str, low: float, high: float = math.inf) -> float:
    """A real option in [low, high)."""
    number = check_finite_number(value, name)
    if not low <= number < high:
        raise ValueError(f"{name} must be in [{low}, {high}), got {value!r}")
    return number


@MINERS.register()
class AngularMiner(BaseMiner):
    """Triplets whose angle at the negative exceeds ``angle`` (Wang et al. 2017, "Deep Metric
    Learning with Angular Loss"): with c = (a + p)/2, ``atan(‖a − p‖ / (2‖n − c‖)) > angle``.

    As in PML the angle is measured between the embeddings as given, not normalised: the
    distance, which must be PML's ``LpDistance()``, does not enter the rule. Works in blocks of
    positive pairs and keeps one byte per candidate (positive pair × reference), so that the
    triplets are listed at once: two reads from the device, the positive pairs' number and
    the triplets'.

    Args:
        angle: Threshold in degrees, in [0, 90).
        distance: ``LpDistance()`` (p = 2, power 1, normalised), the default.
        chunk_elements: Upper bound on temporaries.
    """

    requires_similarity = LpDistance

    def __init__(
        self,
        angle: float = 20,
        distance: BaseDistance | None = None,
        chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    ) -> None:
        super().__init__(distance)
        _check_unit_euclidean(type(self).__name__, self.distance)
        self.angle = _check_number(angle, "angle", 0.0, 90.0)
        self.chunk_elements = check_positive_int(chunk_elements, "chunk_elements")

    def mine_batch(self, batch: Batch) -> tuple[IndicesTuple, MiningStats]:
        pos, neg = batch.label_weights()
        ref = batch.embeddings if batch.ref_emb is None else batch.ref_emb
        mined = mining.angular_triplets(
            batch.embeddings, ref, pos, neg, math.radians(self.angle), self.chunk_elements
        )
        return mined, MiningStats()


_STRATEGIES = ("hard", "semihard", "easy", "all")


# Global rules gather one side's pairs from the flattened matrix: one flat index per pair is
# cheaper to find and to gather with than a (row, column) pair.
def _rows_and_columns(positions: Tensor, width: int) -> list[Tensor]:
    return [positions // width, positions % width]


def _check_range(value: object, name: str) -> tuple[float, float] | None:
    if value is None:
        return None
    if not isinstance(value, tuple | list) or len(value) != 2:
        raise ValueError(f"{name} must be None or a (low, high) pair, got {value!r}")
    low, high = (check_finite_number(x, f"{name}[{i}]") for i, x in enumerate(value))
    if low > high:
        raise ValueError(f"{name} must have low <= high, got {value!r}")
    return low, high


@MINERS.register()
class BatchEasyHardMiner(BaseMiner):
    """Per anchor, one positive and one negative chosen by strategy (Xuan et al. 2020,
    "Improved Embeddings with Easy Positive Triplet Mining"), as pairs (a, p, a, n).

    ``"hard"`` takes the farthest positive or the nearest negative, ``"easy"`` the nearest
    positive or the farthest negative, ``"semihard"`` the hardest positive nearer than the
    chosen negative (or the hardest negative farther than the chosen positive), strictly;
    ``"all"`` every pair of that side. Anchors lacking either side's choice are dropped (an
    ``"all"`` side keeps its pairs regardless). A range keeps only the pairs whose distance
    (or similarity) lies in [low, high].

    Differs from PML in one case: PML ignores a side's allowed range when that side's
    strategy is ``"all"``; dmlkit applies it, as the option describes.

    Args:
        pos_strategy: ``"hard"``, ``"semihard"``, ``"easy"`` or ``"all"``.
        neg_strategy: Likewise; not ``"semihard"`` on both sides, nor with ``"all"``.
        allowed_pos_range: (low, high) allowed anchor-positive distances, or None.
        allowed_neg_range: (low, high) allowed anchor-negative distances, or None.
        distance: Default ``LpDistance()``.
    """

    HARD: ClassVar[str] = "hard"
    SEMIHARD: ClassVar[str] = "semihard"
    EASY: ClassVar[str] = "easy"
    ALL: ClassVar[str] = "all"
    all_batch_mining_strategies: ClassVar[list[str]] = list(_STRATEGIES)

    def __init__(
        self,
        pos_strategy: mining.EasyHardStrategy = "easy",
        neg_strategy: mining.EasyHardStrategy = "semihard",
        allowed_pos_range: tuple[float, float] | None = None,
        allowed_neg_range: tuple[float, float] | None = None,
        distance: BaseDistance | None = None,
    ) -> None:
        super().__init__(distance)
        for name, strategy in (("pos_strategy", pos_strategy), ("neg_strategy", neg_strategy)):
            if strategy not in _STRATEGIES:
                raise ValueError(
                    f"{name} must be 'hard', 'semihard', 'easy' or 'all', got {strategy!r}"
                )
        if pos_strategy == neg_strategy == "semihard":
            raise ValueError('pos_strategy and neg_strategy cannot both be "semihard"')
        if {pos_strategy, neg_strategy} == {"semihard", "all"}:
            raise ValueError('"semihard" cannot be used in combination with "all"')
        self.pos_strategy: mining.EasyHardStrategy = pos_strategy
        self.neg_strategy: mining.EasyHardStrategy = neg_strategy
        self.allowed_pos_range = _check_range(allowed_pos_range, "allowed_pos_range")
        self.allowed_neg_range = _check_range(allowed_neg_range, "allowed_neg_range")

    def _on_sim(self, allowed: tuple[float, float] | None) -> tuple[float, float] | None:
        if allowed is None or self.distance.is_inverted:
            return allowed
        return -allowed[1], -allowed[0]

    def mine(self, sim: Tensor, pos: Tensor, neg: Tensor) -> tuple[IndicesTuple, MiningStats]:
        mined = mining.easy_hard_pairs(
            sim,
            pos,
            neg,
            self.pos_strategy,
            self.neg_strategy,
            self._on_sim(self.allowed_pos_range),
            self._on_sim(self.allowed_neg_range),
        )
        return mined, MiningStats()


@MINERS.register()
class HDCMiner(BaseMiner):
    """Hard-aware deeply cascaded mining (Yuan et al. 2017): the hardest ``filter_percentage``
    of the batch's positive pairs (the farthest) and of its negative pairs (the nearest),
    ``ceil(filter_percentage · count)`` of each, in no particular order (PML lists them
    hardest first; the order of a tuple changes no loss).

    ``set_idx_externally`` restricts the candidates to a given tuple's pairs (a cascade's
    previous stage; triplets count as their two pairs), as given, repeats included, until
    ``reset_idx``. Unlike PML, the pairs of that tuple that the labels do not make positive
    (or negative), and each anchor's pair with itself, are left out.

    Args:
        filter_percentage: Share of each side's pairs kept, in (0, 1].
        distance: Default ``LpDistance()``.
    """

    mines_rows_independently = False

    def __init__(
        self, filter_percentage: float = 0.5, distance: BaseDistance | None = None
    ) -> None:
        super().__init__(distance)
        self.filter_percentage = check_finite_number(filter_percentage, "filter_percentage")
        if not 0 < self.filter_percentage <= 1:
            raise ValueError(f"filter_percentage must be in (0, 1], got {filter_percentage!r}")
        self._external: tuple[Tensor, Tensor, Tensor, Tensor] | None = None

    @property
    def was_set_externally(self) -> bool:
        """Whether ``set_idx_externally`` gave the candidate pairs."""
        return self._external is not None

    def set_idx_externally(self, external_indices_tuple: IndicesTuple, labels: Tensor) -> None:
        """Mines from the pairs of ``external_indices_tuple`` on later calls, not from every
        labelled pair.

        Args:
            external_indices_tuple: (a, p, n) or (a1, p, a2, n) of the batches to come.
            labels: (N,) labels of those batches; anchor indices must address them.
        """
        checked = check_indices_tuple(
            external_indices_tuple, len(labels), torch.iinfo(torch.long).max, labels.device
        )
        self._external = (
            checked if len(checked) == 4 else (checked[0], checked[1], checked[0], checked[2])
        )

    def reset_idx(self) -> None:
        """Mines from every labelled pair again."""
        self._external = None

    def _candidates(self, pos: Tensor, neg: Tensor) -> tuple[Tensor, Tensor]:
        """Flat positions in the (N, M) matrix of the positive and negative candidates, listed
        with one read from the device (the external tuple's range check included)."""
        if self._external is None:
            ((pos_positions,), (neg_positions,)), _ = mining.nonzero_lists(
                [pos.view(-1), neg.view(-1)]
            )
            return pos_positions, neg_positions
        a1, p, a2, n = (t.to(pos.device) for t in self._external)
        n_rows, width = pos.shape
        highest = torch.stack(
            [t.max() if t.numel() else t.new_full((), -1) for t in (a1, a2, p, n)]
        )
        # Looked up clamped, so that the range is checked from the same read as the sizes.
        flat_pos = a1.clamp(max=n_rows - 1) * width + p.clamp(max=width - 1)
        flat_neg = a2.clamp(max=n_rows - 1) * width + n.clamp(max=width - 1)
        keep = [pos.view(-1)[flat_pos] > 0, neg.view(-1)[flat_neg] > 0]
        ((kept_pos,), (kept_neg,)), read = mining.nonzero_lists(keep, highest)
        if max(read[:2]) >= n_rows or max(read[2:]) >= width:
            raise ValueError(
                "HDCMiner's external pairs address rows beyond this batch's "
                f"{n_rows} anchors and {width} references"
            )
        return flat_pos[kept_pos], flat_neg[kept_neg]

    def mine(self, sim: Tensor, pos: Tensor, neg: Tensor) -> tuple[IndicesTuple, MiningStats]:
        # The hardest are taken among the listed candidates, in their row-major order: a
        # top-k over the whole matrix would break ties (a symmetric pair's two entries)
        # differently from PML's.
        flat = sim.flatten()
        mined: list[Tensor] = []
        for positions, largest in zip(self._candidates(pos, neg), (False, True), strict=True):
            hardest = mining.hardest_fraction(flat[positions], self.filter_percentage, largest)
            mined += _rows_and_columns(positions[hardest], sim.shape[1])
        a1, p, a2, n = mined
        return (a1, p, a2, n), MiningStats()


@MINERS.register()
class UniformHistogramMiner(BaseMiner):
    """Pairs spread evenly over their distances: each side's pairs are binned into
    ``num_bins`` equal-width bins between their smallest and largest distance (or similarity),
    and ``pos_per_bin`` (``neg_per_bin``) pairs are drawn from each non-empty bin, uniformly
    and with replacement.

    Random: pass a ``generator`` for reproducible draws (the global one otherwise).

    Args:
        num_bins: Number of bins per side.
        pos_per_bin: Positive pairs drawn from each non-empty bin.
        neg_per_bin: Negative pairs drawn from each non-empty bin.
        distance: Default ``LpDistance()``.
        generator: Source of randomness (any device); None for the global one.
    """

    mines_rows_independently = False

    def __init__(
        self,
        num_bins: int = 100,
        pos_per_bin: int = 10,
        neg_per_bin: int = 10,
        distance: BaseDistance | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(distance)
        self.num_bins = check_positive_int(num_bins, "num_bins")
        self.pos_per_bin = check_positive_int(pos_per_bin, "pos_per_bin")
        self.neg_per_bin = check_positive_int(neg_per_bin, "neg_per_bin")
        self.generator = generator

    def mine(self, sim: Tensor, pos: Tensor, neg: Tensor) -> tuple[IndicesTuple, MiningStats]:
        # The bins are half-open in the distances themselves (as PML draws them), not in
        # their negation.
        values = (sim if self.distance.is_inverted else sim.neg_()).flatten()
        picked = mining.uniform_histogram_pairs(
            values,
            [pos.view(-1) > 0, neg.view(-1) > 0],
            self.num_bins,
            [self.pos_per_bin, self.neg_per_bin],
            self.generator,
        )
        a1, p, a2, n = (index for side in picked for index in _rows_and_columns(side, sim.shape[1]))
        return (a1, p, a2, n), MiningStats()


@MINERS.register()
class DistanceWeightedMiner(BaseMiner):
    """Distance-weighted sampling (Wu et al. 2017, "Sampling Matters in Deep Embedding
    Learning"): random triplets whose negatives are drawn with probability ∝ 1/q(d), q the
    density of distances between random points of the unit sphere in the embedding
    dimension, with d clamped below at ``cutoff`` and never at d ≥ ``nonzero_loss_cutoff``.

    As PML, each anchor gets as many triplets as the reference set holds items of its class
    (itself included), each with a positive drawn uniformly among its positives. Unlike PML,
    each anchor's weights are scaled by their own maximum rather than the batch's, so in high
    dimensions (float32, D ≳ 128) no anchor loses all its negatives to underflow; otherwise
    the probabilities are PML's.

    Random: pass a ``generator`` for reproducible draws (the global one otherwise).

    Args:
        cutoff: Lower clamp of the distances.
        nonzero_loss_cutoff: Negatives at this distance or beyond are never drawn.
        distance: ``LpDistance()`` (p = 2, power 1, normalised), the default.
        generator: Source of randomness (any device); None for the global one.
    """

    mines_rows_independently = False

    requires_similarity = LpDistance

    def __init__(
        self,
        cutoff: float = 0.5,
        nonzero_loss_cutoff: float = 1.4,
        distance: BaseDistance | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(distance)
        _check_unit_euclidean(type(self).__name__, self.distance)
        self.cutoff = _check_number(cutoff, "cutoff", 0.0)
        self.nonzero_loss_cutoff = _check_number(nonzero_loss_cutoff, "nonzero_loss_cutoff", 0.0)
        if self.nonzero_loss_cutoff <= self.cutoff:
            raise ValueError(
                f"nonzero_loss_cutoff ({nonzero_loss_cutoff}) must exceed cutoff ({cutoff}): "
                "otherwise no negative is ever drawn"
            )
        self.generator = generator

    def mine_batch(self, batch: Batch) -> tuple[IndicesTuple, MiningStats]:
        pos, neg = batch.label_weights()
        weights = mining.distance_weighted_negative_weights(
            batch.matrix(self.distance),
            neg,
            batch.embeddings.shape[1],
            self.cutoff,
            self.nonzero_loss_cutoff,
        )
        # PML's count of triplets per anchor includes the anchor's own copy when the
        # reference set holds it.
        n = batch.shape[0]
        if batch.ref_emb is None:
            itself = torch.ones(n, dtype=torch.long, device=pos.device)
        elif batch.anchor_in_ref is None:
            itself = torch.zeros(n, dtype=torch.long, device=pos.device)
        else:
            itself = (batch.anchor_in_ref >= 0).long()
        per_anchor = (pos > 0).sum(1) + itself
        return mining.random_triplets(pos, weights, per_anchor, self.generator), MiningStats()


@MINERS.register()
class EmbeddingsAlreadyPackagedAsTriplets(BaseMiner):
    """For batches laid out as consecutive (anchor, positive, negative) triplets: returns
    (3k, 3k + 1, 3k + 2) for every k, whatever the labels.

    With a reference set, a triplet's positive and negative are looked up where
    ``anchor_in_ref`` places the batch's items in it; triplets whose positive or negative the
    reference set does not hold are left out (all of them without ``anchor_in_ref``). PML
    returns the in-batch indices unchanged, which then address the wrong rows.

    The batch size must be a multiple of 3 (PML fails an assertion otherwise).
    """

    mines_rows_independently = False

    def __init__(self) -> None:
        super().__init__()

    def mine_batch(self, batch: Batch) -> tuple[IndicesTuple, MiningStats]:
        n = batch.shape[0]
        if n % 3:
            raise ValueError(
                f"{type(self).__name__} needs the batch laid out as consecutive (anchor, "
                f"positive, negative) triplets, but its size {n} is not a multiple of 3"
            )
        a, p, neg = mining.packaged_triplets(n, batch.embeddings.device)
        if batch.ref_emb is None:
            return (a, p, neg), MiningStats()
        if batch.anchor_in_ref is None:
            return (a[:0], p[:0], neg[:0]), MiningStats()
        p, neg = batch.anchor_in_ref[p], batch.anchor_in_ref[neg]
        kept = (p >= 0) & (neg >= 0)
        return (a[kept], p[kept], neg[kept]), MiningStats()


__all__ = [
    "MINERS",
    "ASMSMiner",
    "ASMSStats",
    "ATASMSMiner",
    "AngularMiner",
    "BaseMiner",
    "BatchEasyHardMiner",
    "BatchHardMiner",
    "DistanceWeightedMiner",
    "EmbeddingsAlreadyPackagedAsTriplets",
    "HDCMiner",
    "MiningStats",
    "MultiSimilarityMiner",
    "PairMarginMiner",
    "TripletMarginMiner",
    "UniformHistogramMiner",
]
