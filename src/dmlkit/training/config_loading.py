"""Reading a run's config: YAML files and ``key=value`` overrides into a checked
:class:`~dmlkit.training.config.Config`, and which differences a resumed run may have.

Loading checks every key against the dataclasses (:mod:`dmlkit.typed_values`): an unknown key is
an error that names it and suggests the closest valid one, and a value of the wrong type is an
error naming the field.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from ..typed_values import ConfigError, dataclass_from_mapping, unknown_key_error
from .builders import check_parts
from .config import Config

# Settings that change how a run is carried out, never its results: a resumed run may change them.
RESUMABLE_CHANGES = (
    "logging.",
    "data.num_workers",
    "train.device",
    "train.eval_batch_size",
    "train.checkpoint_every",
)


def config_from_dict(values: Mapping[str, Any], *, check: bool = True) -> Config:
    """A :class:`Config` from a nested mapping, every key and value checked.

    Configs written by dmlkit 0.1 before the objective interface are read too
    (:func:`migrated_config`).

    Args:
        values: The mapping.
        check: Also check every part the config names (:func:`check_parts`), which imports a
            user's modules; reading a finished run's config to use its model leaves it out.
    """
    config = dataclass_from_mapping(Config, migrated_config(values))
    _check_ranges(config)
    if check:
        check_parts(config)
    return config


# Where each old scheduler field went: the options of the schedules that take it.
_SCHEDULE_OPTIONS = {
    "step": ("step_size", "gamma"),
    "multistep": ("milestones", "gamma"),
    "exponential": ("gamma",),
    "cosine": ("min_lr",),
}


def migrated_config(values: Mapping[str, Any]) -> dict[str, Any]:
    """A config mapping written before the objective interface (dmlkit 0.1: ``method`` and
    ``ddtas`` sections, ``optimizer.momentum``, flat scheduler fields), in today's form; any
    other mapping unchanged.
    """
    migrated = {key: dict(v) if isinstance(v, Mapping) else v for key, v in values.items()}
    method = migrated.pop("method", None)
    ddtas = migrated.pop("ddtas", None)
    if method == "ddtas":
        migrated["objective"] = {"name": "DDTASObjective", "options": ddtas or {}}
    optimizer = migrated.get("optimizer")
    if isinstance(optimizer, dict) and "momentum" in optimizer:
        momentum = optimizer.pop("momentum")
        if momentum:
            optimizer["options"] = {**(optimizer.get("options") or {}), "momentum": momentum}
    scheduler = migrated.get("scheduler")
    old_fields = ("step_size", "milestones", "gamma", "min_lr")
    if isinstance(scheduler, dict) and any(key in scheduler for key in old_fields):
        name = scheduler.get("name", "none")
        fields = {key: scheduler.pop(key) for key in old_fields if key in scheduler}
        scheduler["name"] = "constant" if name == "none" else name
        wanted = _SCHEDULE_OPTIONS.get(scheduler["name"], ())
        scheduler["options"] = {key: value for key, value in fields.items() if key in wanted}
    return migrated


def _check_ranges(config: Config) -> None:
    at_least = {
        "train.epochs": (config.train.epochs, 1),
        "train.eval_batch_size": (config.train.eval_batch_size, 1),
        "train.checkpoint_every": (config.train.checkpoint_every, 0),
        "logging.log_every": (config.logging.log_every, 1),
        "sampler.classes_per_batch": (config.sampler.classes_per_batch, 1),
        "sampler.samples_per_class": (config.sampler.samples_per_class, 1),
        "sampler.refresh": (config.sampler.refresh, 1),
        "sampler.triplets_per_anchor": (config.sampler.triplets_per_anchor, 1),
        "model.embedding_dim": (config.model.embedding_dim, 1),
        "data.num_workers": (config.data.num_workers, 0),
        "data.cv_folds": (config.data.cv_folds, 0),
        "data.cv_fold": (config.data.cv_fold, 0),
        "validation.every": (config.validation.every, 0),
        "validation.loss_batches": (config.validation.loss_batches, 0),
        "scheduler.warmup_steps": (config.scheduler.warmup_steps, 0),
    }
    for name, (value, minimum) in at_least.items():
        if value < minimum:
            raise ConfigError(f"{name} must be at least {minimum}, got {value}")
    if config.train.max_steps is not None and config.train.max_steps < 1:
        raise ConfigError(
            f"train.max_steps must be at least 1 or null, got {config.train.max_steps}"
        )
    rates = {
        "optimizer.lr": config.optimizer.lr,
        "optimizer.backbone_lr": config.optimizer.backbone_lr,
        "optimizer.head_lr": config.optimizer.head_lr,
        "optimizer.loss_lr": config.optimizer.loss_lr,
        "optimizer.loss_weight_decay": config.optimizer.loss_weight_decay,
    }
    for name, rate in rates.items():
        if rate is not None and not (math.isfinite(rate) and rate >= 0):
            raise ConfigError(f"{name} must be a finite number ≥ 0, got {rate}")
    if config.optimizer.lr == 0:
        raise ConfigError("optimizer.lr must be positive")
    sampler = config.sampler
    if not 0 <= sampler.random_share <= 1:
        raise ConfigError(f"sampler.random_share must be in [0, 1], got {sampler.random_share}")
    if not sampler.triplet_margin > 0:
        raise ConfigError(f"sampler.triplet_margin must be positive, got {sampler.triplet_margin}")
    if sampler.mode == "offline_triplets" and config.objective.name != "MetricLossObjective":
        raise ConfigError(
            "sampler.mode=offline_triplets trains a loss on the packed triplets: it needs "
            f"objective.name MetricLossObjective, got {config.objective.name!r}"
        )
    packaged = (None, "EmbeddingsAlreadyPackagedAsTriplets")
    if sampler.mode == "offline_triplets" and config.miner.name not in packaged:
        raise ConfigError(
            "sampler.mode=offline_triplets trains on the mined triplets themselves (each batch "
            "is laid out as triplets): set miner.name to null or "
            f"EmbeddingsAlreadyPackagedAsTriplets (got {config.miner.name!r})"
        )
    data = config.data
    if data.cv_folds:
        if data.cv_folds < 2:
            raise ConfigError(f"data.cv_folds must be 0 or at least 2, got {data.cv_folds}")
        if data.cv_fold >= data.cv_folds:
            raise ConfigError(
                f"data.cv_fold must be below data.cv_folds ({data.cv_folds}), got {data.cv_fold}"
            )
        if data.val_classes:
            raise ConfigError(
                "data.val_classes and data.cv_folds both choose validation classes; set one"
            )


def _with_defaults(values: Any, defaults: Any) -> Any:
    """``values`` with keys missing from it (at any depth) taken from ``defaults``."""
    if not (isinstance(values, dict) and isinstance(defaults, dict)):
        return values
    merged = {key: _with_defaults(values.get(key, item), item) for key, item in defaults.items()}
    return {**values, **merged}


def _differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        keys = sorted(set(old) | set(new))
        return [d for k in keys for d in _differences(old.get(k), new.get(k), f"{prefix}{k}.")]
    return [] if old == new else [prefix.rstrip(".")]


def config_differences(saved: Mapping[str, Any], config: Config) -> list[str]:
    """The dotted keys where a run's saved config (``Config.to_dict()`` of an earlier run) and
    ``config`` differ in a way that changes results.

    Settings added after the run was written read as their defaults, and the
    :data:`RESUMABLE_CHANGES` are ignored.
    """
    filled = _with_defaults(migrated_config(saved), Config().to_dict())
    return [
        key
        for key in _differences(filled, config.to_dict())
        if not key.startswith(RESUMABLE_CHANGES)
    ]


def _yaml(text: str, where: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"{where}: not valid YAML: {error}") from None


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Read a YAML config (defaults when ``path`` is None) and apply ``key=value`` overrides.

    Args:
        path: YAML file; missing keys keep their defaults.
        overrides: Strings such as ``"optimizer.lr=1e-5"`` or ``"loss.options.margin=0.2"``;
            values are read as YAML (``true``, ``[0.16, 1.0]``, ``null``).

    Returns:
        The checked config.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ConfigError: An unknown key (with the closest valid one suggested) or a bad value.
    """
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {str(path)!r} not found")
        loaded = _yaml(path.read_text(), str(path))
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
        values = loaded or {}
    for override in overrides:
        apply_override(values, override)
    return config_from_dict(values)


def apply_override(values: dict[str, Any], override: str) -> None:
    """Set one dotted ``key=value`` in a nested dict, checking the key against :class:`Config`.

    Raises:
        ConfigError: Not ``key=value``, or a key that does not exist (closest one suggested).
    """
    key, sep, text = override.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {override!r} is not of the form key=value")
    set_config_key(values, key.strip(), _yaml(text, f"override {override!r}"))


def set_config_key(values: dict[str, Any], key: str, value: Any) -> None:
    """Set one dotted key (``"loss.options.margin"``) in a nested config dict.

    The key is checked against :class:`Config`; below a free-form options mapping any key goes.
    Missing or empty sections on the way are created.

    Raises:
        ConfigError: A key that does not exist (closest one suggested), or a path through a value
            that is not a section.
    """
    parts = key.split(".")
    cls: Any = Config
    target = values
    for depth, part in enumerate(parts):
        where = ".".join(parts[:depth]) + ("." if depth else "")
        if cls is not None:  # None inside a free-form options mapping, where any key goes
            hints = typing.get_type_hints(cls)
            if part not in hints:
                raise unknown_key_error(where, part, list(hints))
            annotation = hints[part]
            cls = annotation if dataclasses.is_dataclass(annotation) else None
        if depth == len(parts) - 1:
            target[part] = value
        else:
            if target.get(part) is None:  # a section left empty or null in the YAML
                target[part] = {}
            nested = target[part]
            if not isinstance(nested, dict):
                raise ConfigError(f"{'.'.join(parts[: depth + 1])} is not a section")
            target = nested
