"""Training: typed configs, the trainer loop, atomic checkpoints with exact resume, and logs.

- :func:`load_config` reads a YAML config into a typed :class:`Config`, with ``key=value``
  overrides and suggestions for unknown keys.
- :class:`Trainer` trains an embedding network on P×K batches through a training objective
  (:mod:`dmlkit.objectives`), validates on held-out classes, stops early, logs (CSV,
  TensorBoard, progress bar) and resumes exactly from its checkpoints.
- :func:`load_trained_model` and :func:`embed_dataset` use a finished run.
"""

from ..models.inference import embed_dataset
from ..typed_values import ConfigError
from .builders import build_loss, build_miner, build_objective, check_parts
from .checkpoint import RunRandomness, load_checkpoint, save_atomic, write_text_atomic
from .config import (
    Config,
    DataConfig,
    LoggingConfig,
    LossConfig,
    MinerConfig,
    ModelConfig,
    ObjectiveConfig,
    OptimizerConfig,
    SamplerConfig,
    SchedulerConfig,
    TrainConfig,
    TransformConfig,
    ValidationConfig,
)
from .config_loading import (
    RESUMABLE_CHANGES,
    apply_override,
    config_differences,
    config_from_dict,
    load_config,
    set_config_key,
)
from .datasets import real_data_dir
from .inference import load_trained_model
from .optimization import build_optimizer, lr_factor, parameter_groups
from .run_data import RunData, build_run_data, split_dataset
from .trainer import Trainer, TrainResult, TrainState, check_selection_metric, resolve_device

__all__ = [
    "RESUMABLE_CHANGES",
    "Config",
    "ConfigError",
    "DataConfig",
    "LoggingConfig",
    "LossConfig",
    "MinerConfig",
    "ModelConfig",
    "ObjectiveConfig",
    "OptimizerConfig",
    "RunData",
    "RunRandomness",
    "SamplerConfig",
    "SchedulerConfig",
    "TrainConfig",
    "TrainResult",
    "TrainState",
    "Trainer",
    "TransformConfig",
    "ValidationConfig",
    "apply_override",
    "build_loss",
    "build_miner",
    "build_objective",
    "build_optimizer",
    "build_run_data",
    "check_parts",
    "check_selection_metric",
    "config_differences",
    "config_from_dict",
    "embed_dataset",
    "load_checkpoint",
    "load_config",
    "load_trained_model",
    "lr_factor",
    "parameter_groups",
    "real_data_dir",
    "resolve_device",
    "save_atomic",
    "set_config_key",
    "split_dataset",
    "write_text_atomic",
]
