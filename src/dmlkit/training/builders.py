"""The parts of a run built from its config through :mod:`dmlkit.registry`: loss, miner and
objective, with the values only the run knows."""

from __future__ import annotations

from typing import Any

from ..losses import BaseMetricLossFunction
from ..miners import BaseMiner
from ..models import EmbeddingModel, build_model
from ..models.registry import TIMM_PREFIX
from ..objectives import Objective
from ..registry import (
    BACKBONES,
    DATASETS,
    LOSSES,
    MINERS,
    OBJECTIVES,
    OPTIMIZERS,
    SCHEDULES,
    Spec,
)
from ..typed_values import ConfigError
from .config import Config, LossConfig, MinerConfig, ModelConfig, ObjectiveConfig

# What the trainer gives an objective's constructor, by parameter name (see Objective).
OBJECTIVE_RUN_VALUES = ("loss", "miner", "lr", "seed", "batch_source")
# What the trainer gives a loss's or miner's constructor, by parameter name.
PART_RUN_VALUES = ("num_classes", "embedding_size")
# What a run gives a dataset loader, by parameter name (see dmlkit.training.datasets).
DATASET_RUN_VALUES = ("split", "transform", "root", "data_dir", "download", "test_root", "on_error")


def build_embedding_model(
    config: ModelConfig, in_channels: int, *, pretrained: bool = True
) -> EmbeddingModel:
    """The configured embedding model.

    Args:
        config: The model section.
        in_channels: Image channels of the data.
        pretrained: Load ``config.pretrained`` into the backbone (False when every weight will
            come from a run's checkpoint).
    """
    return build_model(
        config.backbone,
        config.embedding_dim,
        pretrained=config.pretrained if pretrained else None,
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
    if config.name is None:
        if config.options:
            raise ConfigError("miner.options given but miner.name is null")
        return None
    miner: BaseMiner = MINERS.build(Spec(config.name, config.options), "miner", **run_values)
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
    types, nested specs, required options. Run when a config is read, so a misspelt part is an
    error then, not at the start (or in the middle) of a run.

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
    if config.miner.name is None:
        if config.miner.options:
            raise ConfigError("miner.options given but miner.name is null")
    else:
        MINERS.check(Spec(config.miner.name, config.miner.options), "miner", *PART_RUN_VALUES)
    OBJECTIVES.check(config.objective.spec(), "objective", *OBJECTIVE_RUN_VALUES, *PART_RUN_VALUES)
    OPTIMIZERS.check(
        Spec(config.optimizer.name, config.optimizer.options),
        "optimizer",
        "params",
        "lr",
        "weight_decay",
    )
    SCHEDULES.check(
        Spec(config.scheduler.name, config.scheduler.options),
        "scheduler",
        "base_lr",
        "total_steps",
    )
