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
from .validation import IndicesTuple, check_embeddings, check_labels


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

    Args:
        distance: The distance or similarity; None for ``default_distance()`` (PML's).
    """

    requires_similarity: ClassVar[SimilarityRequirement] = False

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
            mat = batch.matrix(self.distance)
            sim = mat if self.distance.is_inverted else mat.neg_()
            pos, neg = batch.label_weights()
        return self._mine_and_record(sim, pos, neg)

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
            return self._mine_and_record(sim.detach().clone(), pos, neg)

    def _mine_and_record(self, sim: Tensor, pos: Tensor, neg: Tensor) -> IndicesTuple:
        with torch.no_grad():
            mined, stats = self.mine(sim, pos, neg)
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

    Works in blocks of positive pairs, so memory stays bounded; the output itself has one
    entry per mined triplet.

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

    def tolerances(self, sim: Tensor, pos: Tensor, neg: Tensor) -> mining.AdaptiveTolerances:
        """The tolerances for this batch: static for ASMS."""
        return mining.AdaptiveTolerances(self.gamma_pos, self.gamma_neg, None, 0.0, 0, 0)

    def mine(self, sim: Tensor, pos: Tensor, neg: Tensor) -> tuple[IndicesTuple, MiningStats]:
        if self.exclude_self_by_value:
            pos.mul_(sim < 1 - 1e-6)
        used = self.tolerances(sim, pos, neg)
        keep_pos, keep_neg = mining.asymmetric_mining_masks(
            sim, pos, neg, used.gamma_pos, used.gamma_neg, self.negative_rule
        )
        stats = ASMSStats(
            gamma_pos=used.gamma_pos,
            gamma_neg=used.gamma_neg,
            ratio=used.ratio,
            tau=used.tau,
            num_skipped_anchors=int((keep_pos.sum(1) * keep_neg.sum(1) == 0).sum()),
        )
        return mining.pairs_from_masks(keep_pos, keep_neg), stats


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

    def tolerances(self, sim: Tensor, pos: Tensor, neg: Tensor) -> mining.AdaptiveTolerances:
        return mining.adaptive_tolerances(
            sim, pos, neg, self.gamma_pos, self.gamma_neg, self.count_tolerance, self.k
        )


__all__ = [
    "MINERS",
    "ASMSMiner",
    "ASMSStats",
    "ATASMSMiner",
    "BaseMiner",
    "BatchHardMiner",
    "MiningStats",
    "MultiSimilarityMiner",
    "PairMarginMiner",
    "TripletMarginMiner",
]
