"""Training: typed configs, the trainer loop, atomic checkpoints with exact resume, and logs.

- :func:`load_config` reads a YAML config into a typed :class:`Config`, with ``key=value``
  overrides and suggestions for unknown keys.
- :class:`Trainer` trains an embedding network on P×K batches, validates on held-out classes,
  stops early, logs (CSV, TensorBoard, progress bar) and resumes exactly from its checkpoints.
- :func:`load_trained_model` and :func:`embed_dataset` use a finished run.
"""

from .checkpoint import load_checkpoint, save_atomic, seed_everything, write_text_atomic
from .config import (
    RESUMABLE_CHANGES,
    Config,
    ConfigError,
    DataConfig,
    DDTASConfig,
    LoggingConfig,
    LossConfig,
    MinerConfig,
    ModelConfig,
    OptimizerConfig,
    SamplerConfig,
    SchedulerConfig,
    TrainConfig,
    TransformConfig,
    ValidationConfig,
    apply_override,
    config_differences,
    config_from_dict,
    load_config,
    set_config_key,
)
from .inference import embed_dataset, load_trained_model
from .run_data import RunData, build_run_data, shared_data_dir, split_dataset
from .trainer import Trainer, TrainResult, TrainState, check_selection_metric, resolve_device

__all__ = [
    "RESUMABLE_CHANGES",
    "Config",
    "ConfigError",
    "DDTASConfig",
    "DataConfig",
    "LoggingConfig",
    "LossConfig",
    "MinerConfig",
    "ModelConfig",
    "OptimizerConfig",
    "RunData",
    "SamplerConfig",
    "SchedulerConfig",
    "TrainConfig",
    "TrainResult",
    "TrainState",
    "Trainer",
    "TransformConfig",
    "ValidationConfig",
    "apply_override",
    "build_run_data",
    "check_selection_metric",
    "config_differences",
    "config_from_dict",
    "embed_dataset",
    "load_checkpoint",
    "load_config",
    "load_trained_model",
    "resolve_device",
    "save_atomic",
    "seed_everything",
    "set_config_key",
    "shared_data_dir",
    "split_dataset",
    "write_text_atomic",
]
