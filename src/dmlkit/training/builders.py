"""The parts of a run built from its config through their registries (:mod:`dmlkit.registry`):
model, loss, miner and objective, with the values only the run knows; and the check of every
part a config names."""

from __future__ import annotations

from typing import Any

from ..losses import LOSSES, BaseMetricLossFunction
from ..miners import MINERS, BaseMiner
from ..models import BACKBONES, EmbeddingModel, build_model
from ..models.registry import TIMM_PREFIX
from ..objectives import OBJECTIVES, Objective
from ..registry import Spec
from ..typed_values import ConfigError, expanded_path
from .config import Config, LossConfig, MinerConfig, ModelConfig, ObjectiveConfig
from .datasets import DATASET_RUN_VALUES, DATASETS
from .optimization import OPTIMIZER_RUN_VALUES, OPTIMIZERS, SCHEDULE_RUN_VALUES, SCHEDULES

# What the trainer gives an objective's constructor, by parameter name (see Objective).
OBJECTIVE_RUN_VALUES = ("loss", "miner", "lr", "seed", "batch_source")
# What the trainer gives a loss's or miner's constructor, by parameter name.
PART_RUN_VALUES = ("num_classes", "embedding_size")


def build_embedding_model(
    config: ModelConfig, in_channels: int, *, pretrained: bool = True
) -> EmbeddingModel:
    """The configured embedding model.

    Args:
        config: The model section.
        in_channels: Image channels of the data.
        pretrained: Load ``config.pretrained`` into the backbone (False when every weight will
            come from a run's checkpoint); environment variables in its path are expanded
            (``$DMLKIT_DATA/mobilenet_v2_imagenet/…``).
    """
    return build_model(
        config.backbone,
        config.embedding_dim,
        pretrained=expanded_path(config.pretrained) if pretrained else None,
        pooling=config.pooling,
        hidden_dim=config.hidden_dim,
        normalize=config.normalize,
        freeze_bn=config.freeze_bn,
        in_channels=in_channels,
        **config.backbone_options,
    )


def build_loss(config: LossConfig, **run_values: Any) -> BaseMetricLossFunction:
    """The configured loss.

    Args:
        config: The loss section.
        **run_values: ``num_classes``, ``embedding_size``: given to a loss taking them.

    Raises:
        ConfigError: Unknown loss or option (closest name suggested), or an invalid value.
    """
    loss: BaseMetricLossFunction = LOSSES.build(config.spec(), "loss", **run_values)
    return loss


def build_miner(config: MinerConfig, **run_values: Any) -> BaseMiner | None:
    """The configured miner, or None when ``miner.name`` is null."""
    spec = config.spec()
    if spec is None:
        return None
    miner: BaseMiner = MINERS.build(spec, "miner", **run_values)
    return miner


def build_objective(config: ObjectiveConfig, **run_values: Any) -> Objective:
    """The configured training objective, given the run's values (:data:`OBJECTIVE_RUN_VALUES`
    and :data:`PART_RUN_VALUES`).

    Raises:
        ConfigError: Unknown objective or option, an invalid value, or not an
            :class:`~dmlkit.objectives.Objective`.
    """
    objective = OBJECTIVES.build(config.spec(), "objective", **run_values)
    if not isinstance(objective, Objective):
        raise ConfigError(
            f"objective.name: {config.name!r} is not a dmlkit.objectives.Objective subclass"
        )
    return objective


def check_parts(config: Config) -> None:
    """Check every part the config names — dataset, backbone, loss, miner, objective,
    optimiser, schedule — without building them or reading data: names, options and their
    types, nested specs, required options, options that the run sets elsewhere. Run when a
    config is read for training, so a misspelt part is an error then, not at the start (or in
    the middle) of a run.

    Raises:
        ConfigError: What :meth:`~dmlkit.registry.Registry.check` finds.
    """
    DATASETS.check(Spec(config.data.name, config.data.options), "data", *DATASET_RUN_VALUES)
    if not config.model.backbone.startswith(TIMM_PREFIX):
        BACKBONES.check(
            Spec(config.model.backbone, config.model.backbone_options),
            "model.backbone",
            "in_channels",
        )
    LOSSES.check(config.loss.spec(), "loss", *PART_RUN_VALUES)
    miner = config.miner.spec()
    if miner is not None:
        MINERS.check(miner, "miner", *PART_RUN_VALUES)
    OBJECTIVES.check(config.objective.spec(), "objective", *OBJECTIVE_RUN_VALUES, *PART_RUN_VALUES)
    OPTIMIZERS.check(
        Spec(config.optimizer.name, config.optimizer.options), "optimizer", *OPTIMIZER_RUN_VALUES
    )
    SCHEDULES.check(
        Spec(config.scheduler.name, config.scheduler.options), "scheduler", *SCHEDULE_RUN_VALUES
    )
