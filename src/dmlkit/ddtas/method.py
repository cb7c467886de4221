"""DDTAS as one object: mining (AT-ASMS), the Online Threshold Generator and the Soft Contrastive
loss for a training batch, given the model and a source of meta batches (docs/ddtas.md §5.8)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Literal, get_args

import torch
import torch.nn.functional as F
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
    VirtualScope,
    closed_form_scores,
    double_backward_gradient,
    first_order_gradient,
    meta_gradient,
    similarities_with_tangent,
)

OTGMethod = Literal["closed_form", "double_backward"]
OTGReading = Literal["multiplier", "additive", "loss_weights", "online_threshold"]
_READINGS = get_args(OTGReading)


class DegenerateThresholdsError(RuntimeError):
    """The OTG's values are undefined for this batch (multiplier reading: every score ≤ 0;
    any reading: a meta gradient that is not finite)."""


@dataclass(frozen=True)
class OTGSettings:
    """How the Online Threshold Generator runs (docs/ddtas.md §5.9; defaults first there).

    Attributes:
        method: ``closed_form``: one Jacobian-vector product (§5.3), exact for the
            multiplier reading and first-order in η for the others
            (:func:`~dmlkit.ddtas.otg.first_order_gradient`); ``double_backward``: the literal
            virtual step (§5.1), exact for every reading.
        normalization: ``joint`` maximum (released) or ``separate`` per side (§5.4).
        reading: What the meta gradient adjusts (docs/ddtas_ablation.md):

            - ``multiplier``: per-pair λ multiplying S, from 0, normalised (released);
            - ``additive``: per-pair thresholds moved by one gradient step from the loss
              threshold (§5.8);
            - ``loss_weights``: per-pair weights of the loss terms at the real similarity,
              from 1, moved by one relative step (learning-to-reweight proper):
              w = clip(1 − weight_step·g/mean|g|, 0, 2);
            - ``online_threshold``: the loss threshold itself (one, or one per side), kept
              across steps and moved each step by RMS-normalised meta-gradient descent
              (``online_lr``, within ``threshold_bounds``).
        virtual_lr: η of the virtual SGD step (the released base lr, 1e-5). The multiplier
            reading's weights do not depend on it.
        threshold_lr: η_λ of the additive reading's step on the thresholds.
        meta_mining: Mine the meta batch with the DDTAS miner; False uses every pair, as
            released.
        memory_size: Embeddings kept per class from earlier training batches (0: none). With
            it, the meta loss compares the meta batch against them too (MMSI's semi-global
            dictionary), so the meta gradient sees many classes.
        weight_step: The loss-weights reading's relative step.
        online_lr: The online threshold's step (per RMS of its meta gradient).
        threshold_bounds: The online threshold's (lowest, highest) values.
        per_side: One online threshold for positive pairs and one for negative pairs.
        scope: The parameters of the virtual step: ``all`` (released), ``head``, or
            ``head_and_last_block`` (cheaper).
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
    memory_size: int = 0
    weight_step: float = 1.0
    online_lr: float = 0.01
    threshold_bounds: tuple[float, float] = (0.0, 1.0)
    per_side: bool = False
    scope: VirtualScope = "all"

    def __post_init__(self) -> None:
        choices = {
            "method": (self.method, ("closed_form", "double_backward")),
            "normalization": (self.normalization, ("joint", "separate")),
            "reading": (self.reading, _READINGS),
            "on_degenerate": (self.on_degenerate, ("skip", "raise")),
            "scope": (self.scope, get_args(VirtualScope)),
        }
        for name, (value, allowed) in choices.items():
            if value not in allowed:
                raise ValueError(f"OTG {name} must be one of {allowed}, got {value!r}")
        if not (math.isfinite(self.virtual_lr) and self.virtual_lr > 0):
            raise ValueError(f"virtual_lr must be a positive number, got {self.virtual_lr}")
        for name in ("threshold_lr", "weight_step", "online_lr"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number, got {value}")
        if not isinstance(self.memory_size, int) or isinstance(self.memory_size, bool):
            raise ValueError(f"memory_size must be an integer ≥ 0, got {self.memory_size!r}")
        if self.memory_size < 0:
            raise ValueError(f"memory_size must be an integer ≥ 0, got {self.memory_size!r}")
        if self.memory_size and self.meta_mining:
            raise ValueError("meta_mining with a memory is not supported: choose one")
        bounds = self.threshold_bounds
        if len(bounds) != 2 or not bounds[0] < bounds[1]:
            raise ValueError(f"threshold_bounds must be (low, high) with low < high, got {bounds}")
        # An option of another reading is a mistake, not something to ignore silently.
        defaults = OTGSettings.__dataclass_fields__
        used_by = {
            "threshold_lr": "additive",
            "weight_step": "loss_weights",
            "online_lr": "online_threshold",
            "threshold_bounds": "online_threshold",
            "per_side": "online_threshold",
        }
        for name, reading in used_by.items():
            if self.reading != reading and getattr(self, name) != defaults[name].default:
                raise ValueError(f"{name} applies to reading={reading!r}, not {self.reading!r}")
        if self.normalization != "joint" and self.reading != "multiplier":
            raise ValueError(
                f"normalization applies to the multiplier reading, not {self.reading!r}"
            )


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
        otg_pos_mean: Mean OTG weight (multiplier, loss_weights) or threshold (additive) of
            positive pairs.
        otg_neg_mean: The same for negative pairs.
        otg_neg_max: Largest value over negative pairs.
        otg_pos_zero: Fraction of positive pairs with weight 0 (multiplier, loss_weights).
        otg_neg_zero: Fraction of negative pairs with weight 0 (multiplier reading).
        online_threshold_pos: The online threshold of positive pairs (the one threshold
            without ``per_side``).
        online_threshold_neg: That of negative pairs.
        memory_items: Embeddings in the meta memory.
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
    online_threshold_pos: float | None = None
    online_threshold_neg: float | None = None
    memory_items: int | None = None

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
        num_classes: Training classes (labels are 0 … num_classes − 1); needed by the OTG's
            ``memory_size``.
        embedding_dim: The embeddings' size; needed by ``memory_size``.

    Attributes:
        memory: The meta memory (``otg.memory_size > 0``), else None.
        online_threshold: The online threshold's state (``reading="online_threshold"``).
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
        num_classes: int | None = None,
        embedding_dim: int | None = None,
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
        self.memory: ClassMemory | None = None
        self.online_threshold: OnlineThreshold | None = None
        if otg is not None and otg.memory_size:
            if num_classes is None or embedding_dim is None:
                raise ValueError("the OTG's memory_size needs num_classes and embedding_dim")
            self.memory = ClassMemory(num_classes, otg.memory_size, embedding_dim)
        if otg is not None and otg.reading == "online_threshold":
            low, high = otg.threshold_bounds
            if not low <= threshold <= high:
                raise ValueError(
                    f"the loss threshold {threshold} is outside threshold_bounds "
                    f"{otg.threshold_bounds}"
                )
            self.online_threshold = OnlineThreshold(
                threshold, otg.per_side, otg.online_lr, otg.threshold_bounds
            )

    # ------------------------------------------------------------------ losses

    def training_loss(self, pairs: PairIndices, n_anchors: int) -> _TrainingLoss:
        """L^t(S_pairs, λ) for these pairs, in the configured reading."""
        return _TrainingLoss(self, pairs, n_anchors)

    def meta_loss(self, labels: Tensor) -> _MetaLoss:
        """L^m on a meta batch's embeddings, with these labels: the training loss's form at
        λ = 1, over every pair (or the mined ones with ``meta_mining``), and against the
        memory's embeddings when there is one."""
        return _MetaLoss(self, labels)

    def _loss(
        self,
        values: Tensor,
        pairs: PairIndices,
        n: int,
        thresholds: float | Tensor,
        term_weights: Tensor | None = None,
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
            term_weights,
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
            loss = self._loss(pairs.take(sim), pairs, sim.shape[0], self.threshold)
            return self._output(sim, pairs, mined, loss, None, None, None)

        x_meta, y_meta = self._meta(meta_batch, x.device)
        meta_loss = self.meta_loss(y_meta)
        if otg.method == "closed_form":
            tangent, meta_value = meta_gradient(model, x_meta, meta_loss, otg.scope)
            embeddings, sim, sim_tangent = similarities_with_tangent(model, x, tangent)
            pairs, mined = self._mine(sim, labels)
            start = self._start(pairs, sim)
            if otg.reading == "multiplier":
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
                grad = -closed_form_scores(slopes, sim_tangent, pairs, otg.virtual_lr)
            else:
                grad = first_order_gradient(
                    self.training_loss(pairs, sim.shape[0]),
                    pairs.take(sim),
                    start,
                    pairs.take(sim_tangent),
                    otg.virtual_lr,
                )
        else:
            embeddings = model(x)
            sim = cosine_similarity_matrix(embeddings)
            pairs, mined = self._mine(sim, labels)
            start = self._start(pairs, sim)
            grad, meta_value = double_backward_gradient(
                model,
                x,
                pairs,
                start,
                self.training_loss(pairs, sim.shape[0]),
                x_meta,
                meta_loss,
                otg.virtual_lr,
                otg.scope,
            )
        if self.memory is not None:
            # After the meta loss: the meta batch is compared with earlier batches only.
            self.memory.push(embeddings.detach(), labels)
        return self._adjusted(sim, pairs, mined, start, grad, meta_value)

    def _start(self, pairs: PairIndices, sim: Tensor) -> Tensor:
        """The OTG's variables before the meta step, in the configured reading."""
        assert self.otg is not None
        reading = self.otg.reading
        if reading == "online_threshold":
            assert self.online_threshold is not None
            return self.online_threshold.values.to(sim.dtype).clone()
        value = {"multiplier": 0.0, "additive": self.threshold, "loss_weights": 1.0}[reading]
        return torch.full((len(pairs),), value, dtype=sim.dtype, device=sim.device)

    def _adjusted(
        self,
        sim: Tensor,
        pairs: PairIndices,
        mined: MiningStats,
        start: Tensor,
        grad: Tensor,
        meta_value: Tensor,
    ) -> DDTASOutput:
        """The training loss with the variables the meta gradient gives (docs/ddtas_ablation.md)."""
        assert self.otg is not None
        otg, n = self.otg, sim.shape[0]
        values = pairs.take(sim)
        if otg.reading == "additive":
            moved = start - otg.threshold_lr * grad
            if not bool(torch.isfinite(moved).all()):
                return self._output(sim, pairs, mined, None, None, meta_value, 0)
            loss = self._loss(values, pairs, n, moved)
            return self._output(sim, pairs, mined, loss, moved, meta_value, 0)
        if otg.reading == "loss_weights":
            if not bool(torch.isfinite(grad).all()):
                return self._output(sim, pairs, mined, None, None, meta_value, 1)
            scale = grad.abs().mean()
            step = grad / scale if scale > 0 else torch.zeros_like(grad)
            term_weights = (1.0 - otg.weight_step * step).clamp(0.0, 2.0)
            loss = self._loss(values, pairs, n, self.threshold, term_weights)
            return self._output(sim, pairs, mined, loss, term_weights, meta_value, 1)
        if otg.reading == "online_threshold":
            assert self.online_threshold is not None
            if not bool(torch.isfinite(grad).all()):
                return self._output(sim, pairs, mined, None, None, meta_value, None)
            # g/η: the first-order meta gradient does not depend on the virtual step's size.
            self.online_threshold.step(grad / otg.virtual_lr)
            thresholds = self.online_threshold.per_pair(pairs.is_pos).to(sim.dtype)
            loss = self._loss(values, pairs, n, thresholds)
            return self._output(sim, pairs, mined, loss, None, meta_value, None)
        if _no_anchor_counts(pairs, n):
            # Nothing to weight: the loss is zero whatever λ is, which is not an OTG failure.
            weights: Tensor | None = torch.zeros_like(grad)
        else:
            weights = normalize_thresholds(-grad, pairs.is_pos, otg.normalization)
        if weights is None:
            return self._output(sim, pairs, mined, None, None, meta_value, 1)
        loss = self._loss(weights * values, pairs, n, self.threshold)
        return self._output(sim, pairs, mined, loss, weights, meta_value, 1)

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
        loss: Tensor | None,
        otg_values: Tensor | None,
        meta_value: Tensor | None,
        zero_stats: int | None,
    ) -> DDTASOutput:
        """Assemble the loss and statistics; ``loss`` None means the OTG's values are
        undefined and the step is skipped."""
        skipped = loss is None
        if skipped and self.otg is not None and self.otg.on_degenerate == "raise":
            raise DegenerateThresholdsError(
                "the OTG's weights are undefined for this batch (every score ≤ 0 or not "
                "finite); use on_degenerate='skip' to skip such steps"
            )
        if loss is None:
            loss = sim.sum() * 0.0
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
            if self.online_threshold is not None:
                values = self.online_threshold.values
                otg["online_threshold_pos"] = float(values[0])
                otg["online_threshold_neg"] = float(values[-1])
            if self.memory is not None:
                otg["memory_items"] = int(self.memory.filled.sum())
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
    """L^t(S_pairs, v) of one batch, v being the reading's variables: λ multiplying S, the
    per-pair thresholds, the per-pair loss weights, or the online threshold(s)."""

    method: DDTAS
    pairs: PairIndices
    n_anchors: int

    def __call__(self, similarities: Tensor, variables: Tensor) -> Tensor:
        method, pairs, n = self.method, self.pairs, self.n_anchors
        reading = "multiplier" if method.otg is None else method.otg.reading
        if reading == "additive":
            return method._loss(similarities, pairs, n, variables)
        if reading == "loss_weights":
            return method._loss(similarities, pairs, n, method.threshold, variables)
        if reading == "online_threshold":
            per_pair = torch.where(pairs.is_pos, variables[0], variables[-1])
            return method._loss(similarities, pairs, n, per_pair)
        return method._loss(variables * similarities, pairs, n, method.threshold)


@dataclass(frozen=True)
class _MetaLoss:
    """L^m of a meta batch's embeddings: the training loss's form at λ = 1, over every pair
    (or the mined ones), and against the memory's embeddings when there is one."""

    method: DDTAS
    labels: Tensor

    def __call__(self, embeddings: Tensor) -> Tensor:
        method = self.method
        memory = method.memory
        if memory is not None and bool(memory.filled.any()):
            unit = F.normalize(embeddings, dim=1)
            stored, stored_labels = memory.entries()
            references = torch.cat([unit, stored.to(unit)])
            stored_labels = stored_labels.to(self.labels.device)
            pos, neg = label_masks(self.labels, torch.cat([self.labels, stored_labels]))
            pos[:, : len(unit)].fill_diagonal_(False)
            neg[:, : len(unit)].fill_diagonal_(False)
            pairs = PairIndices.from_masks(pos, neg)
            sim = unit @ references.T
        else:
            sim = cosine_similarity_matrix(embeddings)
            if method.otg is not None and method.otg.meta_mining:
                pairs, _ = method._mine(sim, self.labels)
            else:
                pairs = PairIndices.from_masks(*label_masks(self.labels))
        return method._loss(pairs.take(sim), pairs, sim.shape[0], method.threshold)


class ClassMemory(nn.Module):
    """The last ``size`` embeddings of every class (L2-normalised, detached), a ring buffer per
    class: the OTG's semi-global dictionary (MMSI). Its buffers are checkpointed with the
    objective, so a resumed run continues with the same memory.

    Args:
        num_classes: Classes; labels are 0 … num_classes − 1.
        size: Embeddings kept per class.
        dim: Embedding size.
    """

    bank: Tensor
    filled: Tensor
    position: Tensor

    def __init__(self, num_classes: int, size: int, dim: int) -> None:
        super().__init__()
        if num_classes < 1 or size < 1 or dim < 1:
            raise ValueError(
                f"num_classes, size and dim must be positive, got {num_classes}, {size}, {dim}"
            )
        self.register_buffer("bank", torch.zeros(num_classes, size, dim))
        self.register_buffer("filled", torch.zeros(num_classes, dtype=torch.long))
        self.register_buffer("position", torch.zeros(num_classes, dtype=torch.long))

    @torch.no_grad()
    def push(self, embeddings: Tensor, labels: Tensor) -> None:
        """Stores a batch's embeddings, each replacing its class's oldest when full."""
        num_classes, size, dim = self.bank.shape
        if embeddings.ndim != 2 or embeddings.shape[1] != dim:
            raise ValueError(f"memory embeddings must be (B, {dim}), got {tuple(embeddings.shape)}")
        labels = labels.to(self.bank.device).long()
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
            raise ValueError(f"memory labels must be in [0, {num_classes}), got {labels.tolist()}")
        unit = F.normalize(embeddings.detach(), dim=1).to(self.bank)
        # Each item's rank among its class's items in the batch, in batch order.
        order = torch.sort(labels, stable=True).indices
        sorted_labels = labels[order]
        counts = torch.bincount(labels, minlength=num_classes)
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.empty_like(labels)
        rank[order] = torch.arange(len(labels), device=labels.device) - starts[sorted_labels]
        # Only a class's last `size` items of the batch survive; their slots are distinct.
        kept = rank >= counts[labels] - size
        slot = (self.position[labels] + rank) % size
        self.bank[labels[kept], slot[kept]] = unit[kept]
        self.position.copy_((self.position + counts) % size)
        self.filled.copy_(torch.minimum(self.filled + counts, torch.full_like(counts, size)))

    def entries(self) -> tuple[Tensor, Tensor]:
        """(M, D) stored embeddings and their (M,) labels."""
        kept = torch.arange(self.bank.shape[1], device=self.bank.device) < self.filled[:, None]
        labels = torch.arange(self.bank.shape[0], device=self.bank.device)[:, None].expand_as(kept)
        return self.bank[kept], labels[kept]


class OnlineThreshold(nn.Module):
    """The Soft Contrastive loss's threshold as state moved by the meta gradient each step:
    λ ← clip(λ − lr·g/√(E[g²]), bounds), E[g²] a running mean (decay 0.9; RMSprop), so the
    step size does not depend on the gradient's scale. Checkpointed with the objective.

    Args:
        initial: The starting threshold (the loss's λ).
        per_side: Two thresholds, for positive and for negative pairs.
        lr: The step per unit of normalised gradient.
        bounds: (lowest, highest) threshold.
    """

    decay = 0.9
    values: Tensor
    square_mean: Tensor

    def __init__(
        self, initial: float, per_side: bool, lr: float, bounds: tuple[float, float]
    ) -> None:
        super().__init__()
        self.lr = lr
        self.bounds = bounds
        shape = (2 if per_side else 1,)
        self.register_buffer("values", torch.full(shape, float(initial), dtype=torch.float64))
        self.register_buffer("square_mean", torch.zeros(shape, dtype=torch.float64))

    @torch.no_grad()
    def step(self, gradient: Tensor) -> None:
        """One descent step along ``gradient`` (shaped like the thresholds)."""
        g = gradient.detach().to(self.values)
        self.square_mean.mul_(self.decay).add_((1 - self.decay) * g * g)
        scale = self.square_mean.sqrt().clamp_min(1e-30)
        self.values.sub_(self.lr * g / scale).clamp_(*self.bounds)

    def per_pair(self, is_pos: Tensor) -> Tensor:
        """(K,) each pair's threshold."""
        values = self.values.to(is_pos.device)
        return torch.where(is_pos, values[0], values[-1])
