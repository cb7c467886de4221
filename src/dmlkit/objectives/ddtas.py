"""DDTAS as a training objective: AT-ASMS mining, the Soft Contrastive loss and the Online
Threshold Generator, which draws its own meta batches from the training set."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal

from torch import Tensor, nn

from ..ddtas import DDTAS, OTGSettings
from ..ddtas.method import OTGMethod, OTGReading
from ..ddtas.otg import VirtualScope
from ..functional.thresholds import Normalization, PairLossForm
from ..losses import BaseMetricLossFunction, SoftContrastiveLoss
from ..miners import ASMSMiner, BaseMiner, MultiSimilarityMiner
from .base import OBJECTIVES, BatchSource, BatchStream, Objective, StepOutput
from .metric_loss import mined_and_all_pairs_losses


@OBJECTIVES.register()
class DDTASObjective(Objective):
    """DDTAS (docs/ddtas.md §5.8) on each training batch, with the OTG's meta batches drawn
    from the training classes by a P×K sampler of their own (seeded ``seed + 1``, positioned by
    the step, so a resumed run draws the same ones).

    The miner and the loss come from the config's ``miner`` and ``loss`` sections: a pair miner
    on cosine similarity (normally ``ATASMSMiner``) and ``SoftContrastiveLoss``, whose scales
    and threshold DDTAS uses.

    Args:
        loss: The Soft Contrastive loss.
        miner: ``ATASMSMiner``, ``ASMSMiner`` or ``MultiSimilarityMiner``.
        lr: The optimiser's base learning rate (the virtual step's default, as released).
        seed: The run's seed.
        batch_source: Where meta batches come from (given by the trainer).
        otg: Run the OTG; False leaves mining and the Soft Contrastive loss.
        otg_method: ``closed_form`` (one Jacobian-vector product) or ``double_backward``.
        normalization: ``joint`` (released) or ``separate`` per side.
        reading: ``multiplier`` (released), ``additive``, ``loss_weights`` or
            ``online_threshold`` (:class:`~dmlkit.ddtas.OTGSettings`).
        form: ``soft_contrastive`` or ``multi_similarity`` (the released OTG's MS form).
        virtual_lr: η of the virtual step; ``lr`` when None, as released.
        threshold_lr: η_λ of the additive reading.
        meta_mining: Mine the meta batch too (released: every pair).
        on_degenerate: ``skip`` steps whose weights are undefined (counted), or ``raise``.
        meta_classes: Classes per meta batch (released 5).
        meta_samples: Samples per class in a meta batch (released 2; at least 2 with the OTG,
            or the meta loss has no positive pair and every step would be skipped).
        meta_source: ``train`` (released: the training classes) or ``held_out``: the
            class-disjoint validation classes (``data.val_classes``), which training batches
            never see (learning-to-reweight's clean meta set). They come with the evaluation
            transform (no augmentation), and the run's validation metrics are then on classes
            the OTG has looked at.
        memory_size: Embeddings kept per class for the memory meta loss (0: none); see
            :class:`~dmlkit.ddtas.OTGSettings`.
        weight_step: The ``loss_weights`` reading's relative step.
        online_lr: The ``online_threshold`` reading's step.
        threshold_bounds: The online threshold's bounds.
        per_side: One online threshold per side.
        scope: Parameters of the virtual step: ``all``, ``head`` or ``head_and_last_block``.
        num_classes: Given by the trainer.
        embedding_size: Given by the trainer.
    """

    amp_unsupported = "its forward-mode and double-backward passes run in float32"
    distributed_unsupported = (
        "its Online Threshold Generator takes a virtual step of the model on a meta batch; "
        "across processes that step would need the gathered meta batch and a gradient "
        "all-reduce inside torch.func's functional call, which dmlkit does not implement"
    )

    def __init__(
        self,
        loss: BaseMetricLossFunction,
        miner: BaseMiner | None,
        lr: float,
        seed: int = 0,
        batch_source: BatchSource | None = None,
        *,
        otg: bool = True,
        otg_method: OTGMethod = "closed_form",
        normalization: Normalization = "joint",
        reading: OTGReading = "multiplier",
        form: PairLossForm = "soft_contrastive",
        virtual_lr: float | None = None,
        threshold_lr: float = 1.0,
        meta_mining: bool = False,
        on_degenerate: Literal["skip", "raise"] = "skip",
        meta_classes: int = 5,
        meta_samples: int = 2,
        meta_source: Literal["train", "held_out"] = "train",
        memory_size: int = 0,
        weight_step: float = 1.0,
        online_lr: float = 0.01,
        threshold_bounds: tuple[float, float] = (0.0, 1.0),
        per_side: bool = False,
        scope: VirtualScope = "all",
        num_classes: int | None = None,
        embedding_size: int | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(loss, SoftContrastiveLoss):
            raise ValueError(
                "DDTAS trains the Soft Contrastive loss: set loss.name to SoftContrastiveLoss "
                f"(got {type(loss).__name__})"
            )
        if not isinstance(miner, MultiSimilarityMiner | ASMSMiner):
            raise ValueError(
                "DDTAS needs miner.name ATASMSMiner, ASMSMiner or MultiSimilarityMiner, got "
                f"{None if miner is None else type(miner).__name__}"
            )
        settings = None
        self._stream: BatchStream | None = None
        if otg:
            settings = OTGSettings(
                method=otg_method,
                normalization=normalization,
                reading=reading,
                virtual_lr=lr if virtual_lr is None else virtual_lr,
                threshold_lr=threshold_lr,
                meta_mining=meta_mining,
                on_degenerate=on_degenerate,
                memory_size=memory_size,
                weight_step=weight_step,
                online_lr=online_lr,
                threshold_bounds=tuple(threshold_bounds),  # type: ignore[arg-type]
                per_side=per_side,
                scope=scope,
            )
            if meta_source not in ("train", "held_out"):
                raise ValueError(f"meta_source must be 'train' or 'held_out', got {meta_source!r}")
            if meta_source == "held_out" and memory_size:
                raise ValueError(
                    "a memory holds training classes and held-out meta batches share none: "
                    "use memory_size with meta_source='train'"
                )
            if meta_classes < 1 or meta_samples < 2:
                raise ValueError(
                    "meta_classes must be at least 1 and meta_samples at least 2 with the OTG, "
                    f"got {meta_classes} and {meta_samples}: a meta batch without positive pairs "
                    "has a zero meta loss, so every step would be skipped"
                )
            if batch_source is None:
                raise ValueError("the OTG needs meta batches: give batch_source")
            try:
                self._stream = batch_source(
                    meta_classes, meta_samples, seed + 1, held_out=meta_source == "held_out"
                )
            except ValueError as error:
                raise ValueError(f"meta batches (meta_classes, meta_samples): {error}") from None
        self.loss = loss
        self.method = DDTAS(
            miner,
            loss.pos_scale,
            loss.neg_scale,
            loss.threshold,
            form,
            otg=settings,
            num_classes=num_classes,
            embedding_dim=embedding_size,
        )
        # Registered, so the trainer checkpoints and resumes their state with the objective's.
        self.memory = self.method.memory
        self.online_threshold = self.method.online_threshold
        self._meta_batches: Iterator[tuple[Tensor, Tensor]] | None = None

    @property
    def may_skip(self) -> bool:
        return self.method.otg is not None

    def start(self, step: int) -> None:
        if self._stream is not None:
            self._meta_batches = self._stream.from_step(step)

    def validation_losses(
        self, model: nn.Module, inputs: Tensor, labels: Tensor
    ) -> dict[str, float | None] | None:
        """Mining and the Soft Contrastive loss; the OTG's weighting, which needs a meta step
        and would move its state, is left out."""
        return mined_and_all_pairs_losses(self.loss, self.method.miner, model(inputs), labels)

    def forward(self, model: nn.Module, inputs: Tensor, labels: Tensor) -> StepOutput:
        meta_batch = None
        if self._stream is not None:
            if self._meta_batches is None:
                raise RuntimeError("call start(step) before the first step")
            meta_batch = next(self._meta_batches)
        out = self.method(model, inputs, labels, meta_batch)
        stats = out.stats
        return StepOutput(
            out.loss,
            skip=out.skipped,
            stats={"mined": stats.num_pos_pairs + stats.num_neg_pairs, **stats.as_dict()},
        )
