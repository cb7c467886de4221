"""Typed training configuration: dataclasses loaded from YAML, overridden by ``key=value`` strings.

Every field has a type and a default, so a config file only names what differs from the
defaults. Loading checks every key against the dataclasses: an unknown key is an error that names
it and suggests the closest valid one, and a value of the wrong type is an error naming the field.
Loss and miner options are passed to their classes' constructors and checked against their
signatures when the run is built (see :mod:`dmlkit.training.builders`).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ConfigError(ValueError):
    """A config key or value that cannot be used; the message names it."""


# Settings that change how a run is carried out, never its results: a resumed run may change them.
RESUMABLE_CHANGES = (
    "logging.",
    "data.num_workers",
    "train.device",
    "train.eval_batch_size",
    "train.checkpoint_every",
)


@dataclass
class TransformConfig:
    """Image preprocessing (image-file datasets only; array datasets use ``DataConfig.image_size``).

    Attributes:
        train_resize: Shorter side the training images are resized to before the random crop;
            None crops the image as it is.
        train_crop: Side of the random resized crop used in training.
        train_scale: Area fraction range of the random resized crop.
        train_ratio: Aspect-ratio range of the random resized crop.
        flip: Random horizontal flips in training.
        eval_resize: Shorter side the evaluation images are resized to before the centre crop.
        eval_crop: Side of the evaluation centre crop.
        mean: Per-channel mean subtracted after scaling.
        std: Per-channel standard deviation divided by after scaling.
        channel_order: ``"RGB"``, or ``"BGR"`` for Caffe-trained backbones such as BN-Inception.
        value_scale: 1.0 for pixels in [0, 1]; 255.0 for the 0–255 range of Caffe models.
    """

    train_resize: int | None = None
    train_crop: int = 227
    train_scale: tuple[float, float] = (0.16, 1.0)
    train_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True
    eval_resize: int = 256
    eval_crop: int = 227
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    channel_order: Literal["RGB", "BGR"] = "RGB"
    value_scale: float = 1.0


@dataclass
class DataConfig:
    """Which dataset, and how it is split into training, validation and test classes.

    Attributes:
        name: ``digits``, ``omniglot``, ``cub200``, ``cars196``, ``sop``, ``cub100_subset``,
            ``folder`` or ``csv``.
        root: Dataset folder (or CSV file for ``csv``); the shared data folder for Omniglot and
            the CUB subset when None.
        download: Fetch CUB-200-2011, Cars196 or SOP when absent (checksummed).
        test_root: For ``folder``: a second folder holding the test classes (otherwise the
            second half of the classes is the test set).
        val_classes: Fraction of the training classes held out, class-disjoint, for validation
            and early stopping; 0 disables validation.
        cv_folds: Class-disjoint cross-validation instead: the training classes are dealt into
            this many folds (:func:`dmlkit.data.class_kfold`) and fold ``cv_fold`` is held out
            for validation; 0 disables it. Cannot be combined with ``val_classes``.
        cv_fold: The validation fold, from 0 to ``cv_folds - 1``.
        cv_seed: Seed of the class shuffle that forms the folds (independent of the training
            seed, so every run of a study sees the same folds).
        image_size: Array datasets (digits, Omniglot) are resized once to this side; None keeps
            them as they are.
        num_workers: DataLoader worker processes.
        on_error: ``raise`` on an unreadable image, or ``skip`` it (and count it) when loading.
        transform: Image preprocessing for image-file datasets.
    """

    name: str = "digits"
    root: str | None = None
    download: bool = False
    test_root: str | None = None
    val_classes: float = 0.0
    cv_folds: int = 0
    cv_fold: int = 0
    cv_seed: int = 0
    image_size: int | None = None
    num_workers: int = 0
    on_error: Literal["raise", "skip"] = "raise"
    transform: TransformConfig = field(default_factory=TransformConfig)


@dataclass
class ModelConfig:
    """The embedding network: backbone, pooling and head.

    Attributes:
        backbone: A name from :func:`dmlkit.models.list_backbones` (or ``timm:<name>``).
        pretrained: Path of a state_dict to load into the backbone.
        embedding_dim: Size of the embeddings.
        pooling: ``avg``, ``max`` or ``avgmax``.
        hidden_dim: Hidden width of an MLP head; None for a linear head.
        normalize: L2-normalise the embeddings.
        freeze_bn: Keep BatchNorm running statistics frozen during training.
        freeze_backbone: Train only the head, on backbone features computed once and cached
            (requires no augmentation; the evaluation transform is used).
        cache_dir: Where cached features go; ``<run dir>/features`` when None.
    """

    backbone: str = "convnet"
    pretrained: str | None = None
    embedding_dim: int = 64
    pooling: Literal["avg", "max", "avgmax"] = "avg"
    hidden_dim: int | None = None
    normalize: bool = True
    freeze_bn: bool = False
    freeze_backbone: bool = False
    cache_dir: str | None = None


@dataclass
class LossConfig:
    """A loss from :mod:`dmlkit.losses` by class name, with constructor options."""

    name: str = "MultiSimilarityLoss"
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class MinerConfig:
    """A miner from :mod:`dmlkit.miners` by class name (None for no miner), with options."""

    name: str | None = "MultiSimilarityMiner"
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class SamplerConfig:
    """The P×K batch sampler (see :class:`dmlkit.samplers.PKSampler`).

    The defaults suit the built-in digits set, which has 5 training classes.

    Attributes:
        classes_per_batch: P, the classes in each batch.
        samples_per_class: K, the samples of each class in a batch.
        too_few: ``replace`` (sample with replacement) or ``drop`` classes with fewer than K.
        groups_per_class: ``one`` group of K per class and epoch, or ``all`` disjoint groups.
    """

    classes_per_batch: int = 5
    samples_per_class: int = 8
    too_few: Literal["replace", "drop"] = "replace"
    groups_per_class: Literal["one", "all"] = "all"


@dataclass
class OptimizerConfig:
    """Optimiser and its parameter groups.

    Attributes:
        name: ``adam``, ``adamw``, ``rmsprop`` or ``sgd``.
        lr: Learning rate of every group without its own.
        weight_decay: Weight decay (coupled L2 for Adam/RMSprop/SGD; decoupled for AdamW).
        momentum: Momentum of SGD and RMSprop.
        backbone_lr: Learning rate of the backbone; ``lr`` when None; 0 freezes it.
        head_lr: Learning rate of the embedding head; ``lr`` when None.
        loss_lr: Learning rate of the loss's own parameters (proxies etc.); ``lr`` when None.
        grad_clip: Clip the global gradient norm to this; None for no clipping.
    """

    name: Literal["adam", "adamw", "rmsprop", "sgd"] = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.0
    backbone_lr: float | None = None
    head_lr: float | None = None
    loss_lr: float | None = None
    grad_clip: float | None = None


@dataclass
class SchedulerConfig:
    """Learning-rate schedule, stepped once per training step.

    Attributes:
        name: ``none``, ``step``, ``multistep``, ``exponential`` or ``cosine``.
        step_size: Steps between decays (``step``).
        milestones: Steps at which to decay (``multistep``).
        gamma: Decay factor (``step``, ``multistep``, ``exponential``).
        warmup_steps: Linear warm-up from 0 over this many steps, before the schedule.
        min_lr: Final learning rate of ``cosine``.
    """

    name: Literal["none", "step", "multistep", "exponential", "cosine"] = "none"
    step_size: int = 1000
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1
    warmup_steps: int = 0
    min_lr: float = 0.0


@dataclass
class TrainConfig:
    """Length and mechanics of training.

    Attributes:
        epochs: Passes of the sampler over the training classes.
        max_steps: Stop after this many steps in total; None for no limit.
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``.
        amp: Automatic mixed precision (float16 autocast and gradient scaling) on CUDA.
        seed: Seeds data order, augmentation, initialisation and mining.
        eval_batch_size: Batch size when computing embeddings for evaluation.
        checkpoint_every: Also write the resumable checkpoint every this many steps (0: only at
            the end of each epoch and at validation).
    """

    epochs: int = 10
    max_steps: int | None = None
    device: str = "auto"
    amp: bool = False
    seed: int = 0
    eval_batch_size: int = 256
    checkpoint_every: int = 0


@dataclass
class ValidationConfig:
    """Validation during training and early stopping.

    Attributes:
        every: Validate every this many units; 0 never.
        unit: ``epoch`` or ``step``.
        metric: The metric that selects the best checkpoint and drives early stopping.
        patience: Stop after this many validations without improvement; None never stops early.
        metrics: Metrics computed at validation and test (names of
            :data:`dmlkit.evaluation.ALL_METRICS`).
        before_training: Also evaluate the untrained network on the test classes.
        recall_at: Cut-offs of Recall@K; None for 1, 2, 4, 8 (1, 10, 100, 1000 from 10,000
            items on).
    """

    every: int = 1
    unit: Literal["epoch", "step"] = "epoch"
    metric: str = "mean_average_precision_at_r"
    patience: int | None = None
    metrics: tuple[str, ...] = (
        "precision_at_1",
        "recall_at_k",
        "r_precision",
        "mean_average_precision_at_r",
    )
    before_training: bool = True
    recall_at: tuple[int, ...] | None = None


@dataclass
class LoggingConfig:
    """Where a run writes and what it shows.

    Attributes:
        run_dir: Output folder (config, checkpoints, logs); ``runs/<timestamp>`` when None.
        progress: Show a progress bar.
        tensorboard: Also write TensorBoard event files (needs the ``tensorboard`` package).
        log_every: Write a training row to the CSV log every this many steps.
    """

    run_dir: str | None = None
    progress: bool = True
    tensorboard: bool = False
    log_every: int = 10


@dataclass
class DDTASConfig:
    """DDTAS's Online Threshold Generator when ``method: ddtas`` (see :class:`dmlkit.ddtas.DDTAS`).

    The mining comes from the ``miner`` section (a pair miner on cosine similarity, normally
    ``ATASMSMiner``) and the loss's scales and threshold from the ``loss`` section, which must be
    ``SoftContrastiveLoss``.

    Attributes:
        otg: Run the OTG; false leaves mining and the Soft Contrastive loss.
        otg_method: ``closed_form`` (one Jacobian-vector product) or ``double_backward``.
        normalization: ``joint`` (released) or ``separate`` per side.
        reading: ``multiplier`` (released) or ``additive`` (needs ``double_backward``).
        form: ``soft_contrastive`` or ``multi_similarity`` (the released OTG's MS form).
        virtual_lr: η of the virtual step; ``optimizer.lr`` when None, as released.
        threshold_lr: η_λ of the additive reading.
        meta_mining: Mine the meta batch too (released: every pair).
        on_degenerate: ``skip`` steps whose weights are undefined (counted), or ``raise``.
        meta_classes: Classes per meta batch (released 5).
        meta_samples: Samples per class in a meta batch (released 2).
    """

    otg: bool = True
    otg_method: Literal["closed_form", "double_backward"] = "closed_form"
    normalization: Literal["joint", "separate"] = "joint"
    reading: Literal["multiplier", "additive"] = "multiplier"
    form: Literal["soft_contrastive", "multi_similarity"] = "soft_contrastive"
    virtual_lr: float | None = None
    threshold_lr: float = 1.0
    meta_mining: bool = False
    on_degenerate: Literal["skip", "raise"] = "skip"
    meta_classes: int = 5
    meta_samples: int = 2


@dataclass
class Config:
    """A whole training run.

    Attributes:
        method: ``standard`` (miner → loss) or ``ddtas`` (the ``ddtas`` section's method, with
            the miner and loss sections).
    """

    method: Literal["standard", "ddtas"] = "standard"
    ddtas: DDTASConfig = field(default_factory=DDTASConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    miner: MinerConfig = field(default_factory=MinerConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (tuples as lists), as written to YAML."""
        return _plain(dataclasses.asdict(self))

    def to_yaml(self) -> str:
        """The config as YAML text that :func:`load_config` reads back to an equal config."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


T = TypeVar("T")


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    return value


def _suggest(name: str, candidates: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, candidates, n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"{hint} Valid keys: {', '.join(candidates)}"


def unknown_key_error(where: str, key: str, candidates: Sequence[str]) -> ConfigError:
    """The error for a key that does not exist, naming it and the closest valid key."""
    return ConfigError(f"unknown key {where + key!r}{_suggest(key, candidates)}")


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """``value`` converted to the annotated type, or a ConfigError naming the field."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (types.UnionType, typing.Union):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (arg for arg in args if arg is not type(None)):
            try:
                return _coerce(value, option, where)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} fits no type")
    if origin is Literal:
        if value not in args:
            allowed = ", ".join(repr(arg) for arg in args)
            raise ConfigError(f"{where}: {value!r} is not one of {allowed}")
        return value
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(item, args[0], f"{where}[{i}]") for i, item in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}")
        return tuple(
            _coerce(item, arg, f"{where}[{i}]")
            for i, (item, arg) in enumerate(zip(value, args, strict=True))
        )
    if origin is dict:
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if annotation is Any:
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if annotation is float:
        # YAML 1.1 reads 1e-5 (no dot) as a string; accept it as the number it plainly is.
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise ConfigError(f"{where}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if dataclasses.is_dataclass(annotation) and isinstance(annotation, type):
        return dataclass_from_mapping(annotation, value, where + ".")
    raise ConfigError(f"{where}: unsupported field type {annotation!r}")


def dataclass_from_mapping(cls: type[T], values: Any, where: str = "") -> T:
    """An instance of a config dataclass from a mapping, every key and value checked.

    Args:
        cls: The dataclass; its fields' annotations say how values are checked and converted.
        values: The mapping (None for all defaults).
        where: Prefix of the key names in error messages (``"protocol."``).

    Raises:
        ConfigError: An unknown key (closest one suggested) or a value of the wrong type.
    """
    if values is None:
        values = {}
    if not isinstance(values, Mapping):
        raise ConfigError(f"{where.rstrip('.') or 'config'}: expected a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    kwargs = {}
    for key, value in values.items():
        if key not in hints:
            raise unknown_key_error(where, str(key), names)
        kwargs[key] = _coerce(value, hints[key], where + key)
    return cls(**kwargs)


def config_from_dict(values: Mapping[str, Any]) -> Config:
    """A :class:`Config` from a nested mapping, every key and value checked."""
    config = dataclass_from_mapping(Config, values)
    _check_ranges(config)
    return config


def _check_ranges(config: Config) -> None:
    at_least = {
        "train.epochs": (config.train.epochs, 1),
        "train.eval_batch_size": (config.train.eval_batch_size, 1),
        "train.checkpoint_every": (config.train.checkpoint_every, 0),
        "logging.log_every": (config.logging.log_every, 1),
        "sampler.classes_per_batch": (config.sampler.classes_per_batch, 1),
        "sampler.samples_per_class": (config.sampler.samples_per_class, 1),
        "model.embedding_dim": (config.model.embedding_dim, 1),
        "data.num_workers": (config.data.num_workers, 0),
        "data.cv_folds": (config.data.cv_folds, 0),
        "data.cv_fold": (config.data.cv_fold, 0),
        "validation.every": (config.validation.every, 0),
        "scheduler.warmup_steps": (config.scheduler.warmup_steps, 0),
        "ddtas.meta_classes": (config.ddtas.meta_classes, 1),
        "ddtas.meta_samples": (config.ddtas.meta_samples, 1),
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
    }
    for name, rate in rates.items():
        if rate is not None and not (math.isfinite(rate) and rate >= 0):
            raise ConfigError(f"{name} must be a finite number ≥ 0, got {rate}")
    if config.optimizer.lr == 0:
        raise ConfigError("optimizer.lr must be positive")
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
    if config.method == "ddtas" and config.ddtas.otg and config.ddtas.meta_samples < 2:
        raise ConfigError(
            f"ddtas.meta_samples must be at least 2 with the OTG, got "
            f"{config.ddtas.meta_samples}: a meta batch without positive pairs has a zero meta "
            "loss, so every step would be skipped"
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
    filled = _with_defaults(dict(saved), Config().to_dict())
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
