"""Typed training configuration: dataclasses loaded from YAML, overridden by ``key=value`` strings.

Every field has a type and a default, so a config file only names what differs from the
defaults; :mod:`dmlkit.training.config_loading` reads and checks YAML and overrides into these
dataclasses. The parts (dataset, backbone, loss, miner, objective,
optimiser, schedule) are named specs of :mod:`dmlkit.registry`, whose options are checked
against the parts' signatures when the run is built.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

from ..registry import Spec
from ..typed_values import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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
        name: A registered dataset (``omniglot28``, the default: Omniglot at 28 × 28, embedded
            in the package; ``digits``, ``omniglot``, ``cub200``, ``cars196``, ``sop``,
            ``cub100_subset``, ``folder``, ``csv``; see :data:`dmlkit.training.DATASETS`) or a
            loader's import path ``"package.module:load"``.
        options: Further keyword arguments of the dataset's loader (a user's loader).
        root: Dataset folder (or CSV file for ``csv``); for Omniglot and the CUB subset, when
            None, their folder in the real-data folder (``$DMLKIT_DATA`` or ``data_dir``).
        data_dir: The real-data folder; ``$DMLKIT_DATA`` when None. In ``root``, ``test_root``
            and ``data_dir``, ``$VARIABLES`` and ``~`` are expanded.
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

    name: str = "omniglot28"
    options: dict[str, Any] = field(default_factory=dict)
    root: str | None = None
    data_dir: str | None = None
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
        backbone: A name from :func:`dmlkit.models.list_backbones`, ``timm:<name>``, or a
            backbone class's import path ``"package.module:Name"``.
        backbone_options: Keyword arguments of the backbone (``width`` for ``convnet``…).
        pretrained: Path of a state_dict to load into the backbone (``$VARIABLES`` expanded:
            ``$DMLKIT_DATA/mobilenet_v2_imagenet/mobilenet_v2-b0353104.pth``).
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
    backbone_options: dict[str, Any] = field(default_factory=dict)
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
    """A loss: a registered name (:mod:`dmlkit.losses`) or an import path, with constructor
    options (nested ``{name, options}`` specs for ``distance`` and ``reducer``)."""

    name: str = "MultiSimilarityLoss"
    options: dict[str, Any] = field(default_factory=dict)

    def spec(self) -> Spec:
        """The registry spec."""
        return Spec(self.name, self.options)


@dataclass
class MinerConfig:
    """A miner: a registered name (:mod:`dmlkit.miners`) or an import path (None for no
    miner), with constructor options."""

    name: str | None = "MultiSimilarityMiner"
    options: dict[str, Any] = field(default_factory=dict)

    def spec(self) -> Spec | None:
        """The registry spec; None for no miner.

        Raises:
            ConfigError: Options given without a miner.
        """
        if self.name is None:
            if self.options:
                raise ConfigError("miner.options given but miner.name is null")
            return None
        return Spec(self.name, self.options)


@dataclass
class ObjectiveConfig:
    """What each training step optimises (:mod:`dmlkit.objectives`): ``MetricLossObjective``
    (miner → loss), ``DDTASObjective``, or an import path; options as its constructor takes."""

    name: str = "MetricLossObjective"
    options: dict[str, Any] = field(default_factory=dict)

    def spec(self) -> Spec:
        """The registry spec."""
        return Spec(self.name, self.options)


@dataclass
class SamplerConfig:
    """The P×K batch sampler (see :class:`dmlkit.samplers.PKSampler`).

    The defaults suit the default dataset, the embedded Omniglot (964 training characters of 20
    drawings each): an epoch deals each character's drawings into 5 groups of 4, 150 batches.

    Attributes:
        classes_per_batch: P, the classes in each batch.
        samples_per_class: K, the samples of each class in a batch.
        too_few: ``replace`` (sample with replacement) or ``drop`` classes with fewer than K.
        groups_per_class: ``one`` group of K per class and epoch, or ``all`` disjoint groups.
        mode: ``pk`` (online mining in random P×K batches), or offline mining over the whole
            embedded training set (:mod:`dmlkit.training.offline`): ``hard_classes`` (each
            batch a seed class, its nearest classes by centroid and a share of random ones) or
            ``offline_triplets`` (batches packed from hard or semi-hard triplets; the loss
            takes exactly those triplets, so ``miner.name`` must be null).
        refresh: Re-embed and re-mine every this many ``refresh_unit``.
        refresh_unit: ``epoch`` or ``step``.
        random_share: ``hard_classes``: the share of a batch's other classes drawn at random.
        triplets: ``offline_triplets``: ``semihard`` (0 < d_an − d_ap ≤ margin) or ``hard``
            (d_an − d_ap ≤ 0).
        triplet_margin: The semi-hard margin (on L2-normalised embeddings).
        triplets_per_anchor: Triplets mined per anchor.
    """

    classes_per_batch: int = 32
    samples_per_class: int = 4
    too_few: Literal["replace", "drop"] = "replace"
    groups_per_class: Literal["one", "all"] = "all"
    mode: Literal["pk", "hard_classes", "offline_triplets"] = "pk"
    refresh: int = 1
    refresh_unit: Literal["epoch", "step"] = "epoch"
    random_share: float = 0.25
    triplets: Literal["hard", "semihard"] = "semihard"
    triplet_margin: float = 0.1
    triplets_per_anchor: int = 1


@dataclass
class OptimizerConfig:
    """Optimiser and its parameter groups.

    Attributes:
        name: ``adam``, ``adamw``, ``rmsprop``, ``sgd`` (:data:`dmlkit.training.OPTIMIZERS`),
            or an optimiser class's import path.
        lr: Learning rate of every group without its own.
        weight_decay: Weight decay (coupled L2 for Adam/RMSprop/SGD; decoupled for AdamW).
        options: Further constructor options (``momentum`` for SGD and RMSprop, ``betas``…).
        backbone_lr: Learning rate of the backbone; ``lr`` when None; 0 freezes it.
        head_lr: Learning rate of the embedding head; ``lr`` when None.
        loss_lr: Learning rate of the objective's own parameters (a loss's proxies, say);
            ``lr`` when None.
        loss_weight_decay: Weight decay of the objective's own parameters; ``weight_decay``
            when None (the Reality Check trains a margin loss's β without decay).
        grad_clip: Clip the global gradient norm to this; None for no clipping.
    """

    name: str = "adam"
    lr: float = 3e-3
    weight_decay: float = 0.0
    options: dict[str, Any] = field(default_factory=dict)
    backbone_lr: float | None = None
    head_lr: float | None = None
    loss_lr: float | None = None
    loss_weight_decay: float | None = None
    grad_clip: float | None = None


@dataclass
class SchedulerConfig:
    """Learning-rate schedule, stepped once per training step.

    Attributes:
        name: ``constant``, ``step``, ``multistep``, ``exponential`` or ``cosine``
            (:data:`dmlkit.training.SCHEDULES`), or a schedule's import path.
        options: The schedule's options: ``step_size`` and ``gamma`` (``step``),
            ``milestones`` (absolute steps) and ``gamma`` (``multistep``), ``gamma``
            (``exponential``), ``min_lr`` (``cosine``). The schedules count steps from the end
            of the warm-up, except ``multistep``'s milestones.
        warmup_steps: Linear warm-up from 0 over this many steps, before the schedule.
    """

    name: str = "constant"
    options: dict[str, Any] = field(default_factory=dict)
    warmup_steps: int = 0


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
        check_finite: When NaN or ±Inf is looked for. ``logged_steps``: the loss, at every
            logged step (``logging.log_every``), so other steps never wait for the device (on
            a GPU a check is a host–device synchronisation); a divergence is caught at most
            ``log_every`` steps late. ``every_step``: every loss and miner call checks its
            embeddings, naming the first bad batch, at one synchronisation per call.
    """

    epochs: int = 2
    max_steps: int | None = None
    device: str = "auto"
    amp: bool = False
    seed: int = 0
    eval_batch_size: int = 256
    checkpoint_every: int = 0
    check_finite: Literal["logged_steps", "every_step"] = "logged_steps"


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
        loss_batches: At each validation, the training objective's loss on this many P×K
            batches of the validation classes (the same seeded batches every time), as in
            training (mined) and over every pair or triplet: ``val_loss``,
            ``val_loss_all_pairs`` and ``val_mined`` in ``validation.csv``; 0 for none.
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
    loss_batches: int = 4


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
class Config:
    """A whole training run."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    miner: MinerConfig = field(default_factory=MinerConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
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


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    return value
