"""DDTAS as one object: mining (AT-ASMS), the Online Threshold Generator and the Soft Contrastive
loss for a training batch, given the model and a source of meta batches (docs/ddtas.md §5.8)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from ..functional.masks import PairIndices, label_masks, pairs_per_anchor
from ..functional.pairwise import cosine_similarity_matrix
from ..functional.thresholds import (
    Normalization,
    PairLossForm,
    normalize_thresholds,
    pair_loss,
    pair_loss_slopes,
)
from ..miners import ASMSStats, ATASMSMiner, BaseMiner, MiningStats
from .otg import (
    closed_form_scores,
    double_backward_gradient,
    meta_gradient,
    similarities_with_tangent,
)

OTGMethod = Literal["closed_form", "double_backward"]
OTGReading = Literal["multiplier", "additive"]


class DegenerateThresholdsError(RuntimeError):
    """The OTG's weights are undefined for this batch (every score ≤ 0, or not finite)."""


@dataclass(frozen=True)
class OTGSettings:
    """How the Online Threshold Generator runs (docs/ddtas.md §5.9; defaults first there).

    Attributes:
        method: ``closed_form`` (one Jacobian-vector product, §5.3) or ``double_backward``
            (the literal virtual step, §5.1; the reference, and needed by ``additive``).
        normalization: ``joint`` maximum (released) or ``separate`` per side (§5.4).
        reading: ``multiplier`` (λ multiplies S, released) or ``additive`` (λ is a per-pair
            threshold moved by one gradient step from the loss threshold, §5.8; unverified).
        virtual_lr: η of the virtual SGD step (the released base lr, 1e-5). The multiplier
            reading's weights do not depend on it.
        threshold_lr: η_λ of the additive reading's step on the thresholds.
        meta_mining: Mine the meta batch with the DDTAS miner; False uses every pair, as
            released.
        on_degenerate: ``skip`` the step (no update; counted in the stats) or ``raise``
            :class:`DegenerateThresholdsError` when the weights are undefined (§5.5).
    """

    method: OTGMethod = "closed_form"
    normalization: Normalization = "joint"
    reading: OTGReading = "multiplier"
    virtual_lr: float = 1e-5
    threshold_lr: float = 1.0
    meta_mining: bool = False
    on_degenerate: Literal["skip", "raise"] = "skip"

    def __post_init__(self) -> None:
        choices = {
            "method": (self.method, ("closed_form", "double_backward")),
            "normalization": (self.normalization, ("joint", "separate")),
            "reading": (self.reading, ("multiplier", "additive")),
            "on_degenerate": (self.on_degenerate, ("skip", "raise")),
        }
        for name, (value, allowed) in choices.items():
            if value not in allowed:
                raise ValueError(f"OTG {name} must be one of {allowed}, got {value!r}")
        if self.reading == "additive" and self.method != "double_backward":
            raise ValueError(
                "the additive reading moves θ in the virtual step, so the closed form does not "
                "apply: use method='double_backward'"
            )
        if not (math.isfinite(self.virtual_lr) and self.virtual_lr > 0):
            raise ValueError(f"virtual_lr must be a positive number, got {self.virtual_lr}")
        if not (math.isfinite(self.threshold_lr) and self.threshold_lr > 0):
            raise ValueError(f"threshold_lr must be a positive number, got {self.threshold_lr}")


@dataclass(frozen=True)
class DDTASStats:
    """What one DDTAS step did, for logging (None where it does not apply).

    Attributes:
        num_pos_pairs: Mined positive pairs (ordered).
        num_neg_pairs: Mined negative pairs (ordered).
        num_skipped_anchors: Anchors without a mined positive or negative.
        gamma_pos: Positive mining tolerance in force (AT-ASMS's γ̂_pos).
        gamma_neg: Negative mining tolerance in force.
        ratio: AT-ASMS's r.
        tau: AT-ASMS's τ (0 when r ≤ 1).
        pos_similarity: Mean similarity of the mined positive pairs.
        neg_similarity: Mean similarity of the mined negative pairs.
        meta_loss: The OTG's meta loss.
        otg_skipped: 1 when the OTG's weights were undefined and the step skipped, else 0.
        otg_pos_mean: Mean OTG weight (multiplier) or threshold (additive) of positive pairs.
        otg_neg_mean: The same for negative pairs.
        otg_neg_max: Largest value over negative pairs.
        otg_pos_zero: Fraction of positive pairs with weight 0 (multiplier reading).
        otg_neg_zero: Fraction of negative pairs with weight 0 (multiplier reading).
    """

    num_pos_pairs: int
    num_neg_pairs: int
    num_skipped_anchors: int | None = None
    gamma_pos: float | None = None
    gamma_neg: float | None = None
    ratio: float | None = None
    tau: float | None = None
    pos_similarity: float | None = None
    neg_similarity: float | None = None
    meta_loss: float | None = None
    otg_skipped: int | None = None
    otg_pos_mean: float | None = None
    otg_neg_mean: float | None = None
    otg_neg_max: float | None = None
    otg_pos_zero: float | None = None
    otg_neg_zero: float | None = None

    def as_dict(self) -> dict[str, float | int | None]:
        """Flat mapping for loggers."""
        return asdict(self)


@dataclass(frozen=True)
class DDTASOutput:
    """The result of one DDTAS call.

    Attributes:
        loss: The training loss L^t(θ, λ*) with λ* constant; back-propagate it.
        skipped: True when the OTG's weights were undefined: ``loss`` is then a zero with a
            graph and the optimiser step should be skipped (the released code skips such
            iterations).
        stats: What was mined and generated.
    """

    loss: Tensor
    skipped: bool
    stats: DDTASStats


def _mean(values: Tensor) -> float | None:
    return float(values.mean()) if values.numel() else None


class DDTAS:
    """Dual Dynamic Threshold Adjustment Strategy for one batch at a time (docs/ddtas.md §5.8).

    Each call: embed the batch, mine pairs (AT-ASMS by default), run the Online Threshold
    Generator on those pairs against a meta batch, and return the Soft Contrastive loss with the
    generated per-pair weights held constant. With ``otg=None`` it is the mining and the loss
    alone (the released runnable configuration).

    The OTG differentiates the model in the mode of the real step and shares its forward pass
    (the closed form carries the forward-mode tangent on it). For a model with frozen
    BatchNorm, as in the DDTAS recipe, that is the released eval-mode procedure; with live
    BatchNorm, the batch statistics are differentiated rather than the running ones. The OTG's
    own forward passes run on copies of the buffers, so it never changes running statistics.

    Example::

        ddtas = DDTAS(meta_batches=meta_loader)  # an endless iterable of (images, labels)
        for x, y in loader:
            out = ddtas(model, x, y)
            optimizer.zero_grad()
            out.loss.backward()
            if not out.skipped:
                optimizer.step()

    Args:
        miner: A pair miner on cosine similarity; default ``ATASMSMiner(epsilon=0.1)``.
        pos_scale: β of the Soft Contrastive loss (released 2).
        neg_scale: α (released 40).
        threshold: λ of the loss (released 0.7); the base b of the MS form.
        form: ``soft_contrastive`` (§4) or ``multi_similarity`` (the released OTG's MS form).
        otg: OTG settings; None disables the OTG.
        meta_batches: Iterable of (images, labels) meta batches, drawn once per call when
            no ``meta_batch`` is passed (the released recipe: 5 classes × 2 from the training
            set).
    """

    def __init__(
        self,
        miner: BaseMiner | None = None,
        pos_scale: float = 2.0,
        neg_scale: float = 40.0,
        threshold: float = 0.7,
        form: PairLossForm = "soft_contrastive",
        otg: OTGSettings | None = None,
        meta_batches: Iterable[tuple[Tensor, Tensor]] | None = None,
    ) -> None:
        if pos_scale <= 0 or neg_scale <= 0:
            raise ValueError("pos_scale and neg_scale must be positive")
        if form not in ("soft_contrastive", "multi_similarity"):
            raise ValueError(f"form must be 'soft_contrastive' or 'multi_similarity', got {form!r}")
        self.miner = ATASMSMiner(epsilon=0.1) if miner is None else miner
        if not self.miner.distance.is_inverted:
            raise ValueError("DDTAS mines on cosine similarity: give the miner a similarity")
        self.pos_scale = pos_scale
        self.neg_scale = neg_scale
        self.threshold = threshold
        self.form: PairLossForm = form
        self.otg = otg
        self._meta_batches: Iterator[tuple[Tensor, Tensor]] | None = (
            None if meta_batches is None else iter(meta_batches)
        )

    # ------------------------------------------------------------------ losses

    def training_loss(self, pairs: PairIndices, n_anchors: int) -> _TrainingLoss:
        """L^t(S_pairs, λ) for these pairs, in the configured reading."""
        return _TrainingLoss(self, pairs, n_anchors)

    def meta_loss(self, labels: Tensor) -> _MetaLoss:
        """L^m(S) on a meta batch with these labels: the same form at λ = 1, over every pair
        (or the mined ones with ``meta_mining``)."""
        return _MetaLoss(self, labels)

    def _loss(
        self, values: Tensor, pairs: PairIndices, n: int, thresholds: float | Tensor
    ) -> Tensor:
        return pair_loss(
            values,
            pairs.anchors,
            pairs.is_pos,
            n,
            self.form,
            self.pos_scale,
            self.neg_scale,
            thresholds,
        )

    # ------------------------------------------------------------------ one step

    def __call__(
        self,
        model: nn.Module,
        x: Tensor,
        labels: Tensor,
        meta_batch: tuple[Tensor, Tensor] | None = None,
    ) -> DDTASOutput:
        """Mine, generate the thresholds and compute the loss for one training batch.

        Args:
            model: The embedding network (its parameters that require grad are trained).
            x: The training batch's inputs.
            labels: (B,) integer labels.
            meta_batch: (inputs, labels) of the meta batch; drawn from ``meta_batches`` when
                None. Ignored without the OTG.

        Returns:
            The loss, whether the step should be skipped, and the step's statistics.

        Raises:
            DegenerateThresholdsError: The weights are undefined and ``on_degenerate="raise"``.
            ValueError: No meta batch is available while the OTG is on, or bad labels.
        """
        otg = self.otg
        if otg is None:
            sim = cosine_similarity_matrix(model(x))
            pairs, mined = self._mine(sim, labels)
            return self._output(
                sim, pairs, mined, pairs.take(sim), self.threshold, None, None, None
            )

        x_meta, y_meta = self._meta(meta_batch, x.device)
        meta_loss = self.meta_loss(y_meta)
        if otg.method == "closed_form":
            tangent, meta_value = meta_gradient(model, x_meta, meta_loss)
            sim, sim_tangent = similarities_with_tangent(model, x, tangent)
            pairs, mined = self._mine(sim, labels)
            slopes = pair_loss_slopes(
                pairs.anchors,
                pairs.is_pos,
                sim.shape[0],
                self.form,
                self.pos_scale,
                self.neg_scale,
                self.threshold,
                sim.dtype,
            )
            scores = closed_form_scores(slopes, sim_tangent, pairs, otg.virtual_lr)
        else:
            sim = cosine_similarity_matrix(model(x))
            pairs, mined = self._mine(sim, labels)
            start = torch.full(
                (len(pairs),),
                self.threshold if otg.reading == "additive" else 0.0,
                dtype=sim.dtype,
                device=sim.device,
            )
            grad, meta_value = double_backward_gradient(
                model,
                x,
                pairs,
                start,
                self.training_loss(pairs, sim.shape[0]),
                x_meta,
                meta_loss,
                otg.virtual_lr,
            )
            if otg.reading == "additive":
                moved = start - otg.threshold_lr * grad
                thresholds = moved if bool(torch.isfinite(moved).all()) else None
                return self._output(
                    sim, pairs, mined, pairs.take(sim), thresholds, thresholds, meta_value, 0
                )
            scores = -grad
        if _no_anchor_counts(pairs, sim.shape[0]):
            # Nothing to weight: the loss is zero whatever λ is, which is not an OTG failure.
            weights: Tensor | None = torch.zeros_like(scores)
        else:
            weights = normalize_thresholds(scores, pairs.is_pos, otg.normalization)
        values = None if weights is None else weights * pairs.take(sim)
        return self._output(sim, pairs, mined, values, self.threshold, weights, meta_value, 1)

    # ------------------------------------------------------------------ helpers

    def _mine(self, sim: Tensor, labels: Tensor) -> tuple[PairIndices, MiningStats]:
        """The miner's pairs and its stats for this call (read before any other mining)."""
        mined = self.miner.mine_similarities(sim.detach(), labels)
        if len(mined) != 4:
            raise ValueError(
                f"DDTAS needs a pair miner, but {type(self.miner).__name__} returns triplets"
            )
        return PairIndices.from_tuple(mined), self.miner.last_stats

    def _meta(
        self, meta_batch: tuple[Tensor, Tensor] | None, device: torch.device
    ) -> tuple[Tensor, Tensor]:
        if meta_batch is None:
            if self._meta_batches is None:
                raise ValueError("the OTG needs meta batches: pass meta_batches= or meta_batch=")
            try:
                meta_batch = next(self._meta_batches)
            except StopIteration:
                raise ValueError("meta_batches ran out: give an endless iterable") from None
        x_meta, y_meta = meta_batch
        return x_meta.to(device), y_meta.to(device)

    def _output(
        self,
        sim: Tensor,
        pairs: PairIndices,
        mined: MiningStats,
        values: Tensor | None,
        thresholds: float | Tensor | None,
        otg_values: Tensor | None,
        meta_value: Tensor | None,
        zero_stats: int | None,
    ) -> DDTASOutput:
        """Assemble the loss and statistics; ``values``/``thresholds`` None means skipped."""
        skipped = values is None or thresholds is None
        if skipped and self.otg is not None and self.otg.on_degenerate == "raise":
            raise DegenerateThresholdsError(
                "the OTG's weights are undefined for this batch (every score ≤ 0 or not "
                "finite); use on_degenerate='skip' to skip such steps"
            )
        n = sim.shape[0]
        if skipped:
            loss = sim.sum() * 0.0
        else:
            assert values is not None and thresholds is not None
            loss = self._loss(values, pairs, n, thresholds)
        stats = self._stats(sim, pairs, mined, otg_values, meta_value, skipped, zero_stats)
        return DDTASOutput(loss, skipped and self.otg is not None, stats)

    def _stats(
        self,
        sim: Tensor,
        pairs: PairIndices,
        mined: MiningStats,
        otg_values: Tensor | None,
        meta_value: Tensor | None,
        skipped: bool,
        zero_stats: int | None,
    ) -> DDTASStats:
        with torch.no_grad():
            similarities = pairs.take(sim)
            pos, neg = similarities[pairs.is_pos], similarities[~pairs.is_pos]
            otg: dict[str, float | int | None] = {}
            if self.otg is not None:
                otg["meta_loss"] = None if meta_value is None else float(meta_value)
                otg["otg_skipped"] = int(skipped)
            if otg_values is not None:
                w_pos, w_neg = otg_values[pairs.is_pos], otg_values[~pairs.is_pos]
                otg["otg_pos_mean"] = _mean(w_pos)
                otg["otg_neg_mean"] = _mean(w_neg)
                otg["otg_neg_max"] = float(w_neg.max()) if w_neg.numel() else None
                if zero_stats:
                    otg["otg_pos_zero"] = _mean((w_pos == 0).to(sim.dtype))
                    otg["otg_neg_zero"] = _mean((w_neg == 0).to(sim.dtype))
        tolerance = getattr(self.miner, "epsilon", None)
        asms = mined if isinstance(mined, ASMSStats) else None
        return DDTASStats(
            num_pos_pairs=int(pairs.is_pos.sum()),
            num_neg_pairs=int((~pairs.is_pos).sum()),
            num_skipped_anchors=asms.num_skipped_anchors if asms else None,
            gamma_pos=asms.gamma_pos if asms else tolerance,
            gamma_neg=asms.gamma_neg if asms else tolerance,
            ratio=asms.ratio if asms else None,
            tau=asms.tau if asms else None,
            pos_similarity=_mean(pos),
            neg_similarity=_mean(neg),
            **otg,  # type: ignore[arg-type]
        )


def _no_anchor_counts(pairs: PairIndices, n_anchors: int) -> bool:
    """No anchor has both a mined positive and a mined negative (the loss skips them all)."""
    n_pos, n_neg = pairs_per_anchor(pairs.anchors, pairs.is_pos, n_anchors)
    return not bool(((n_pos > 0) & (n_neg > 0)).any())


@dataclass(frozen=True)
class _TrainingLoss:
    """L^t(S_pairs, λ) of one batch: λ multiplies S, or is the per-pair threshold."""

    method: DDTAS
    pairs: PairIndices
    n_anchors: int

    def __call__(self, similarities: Tensor, variables: Tensor) -> Tensor:
        method = self.method
        if method.otg is not None and method.otg.reading == "additive":
            return method._loss(similarities, self.pairs, self.n_anchors, variables)
        return method._loss(variables * similarities, self.pairs, self.n_anchors, method.threshold)


@dataclass(frozen=True)
class _MetaLoss:
    """L^m(S) of a meta batch: the training loss's form at λ = 1."""

    method: DDTAS
    labels: Tensor

    def __call__(self, sim: Tensor) -> Tensor:
        method = self.method
        if method.otg is not None and method.otg.meta_mining:
            pairs, _ = method._mine(sim, self.labels)
        else:
            pairs = PairIndices.from_masks(*label_masks(self.labels))
        return method._loss(pairs.take(sim), pairs, sim.shape[0], method.threshold)
