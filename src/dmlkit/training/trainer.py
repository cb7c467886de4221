"""The training loop: P×K batches → the objective (embed, mine, loss) → optimiser, with
validation, early stopping, logs and exactly resumable checkpoints.

The loop knows no method: what a step optimises is an :class:`~dmlkit.objectives.Objective`
(the config's ``objective`` section, or one passed in from Python).

Exact resumption rests on three rules:

- every random draw of the data pipeline is a function of (seed, epoch, batch, position): the
  sampler's batches come from (seed, epoch), and each sample's augmentation runs under its own
  seed, so the images of a batch do not depend on worker processes or on where a run restarted;
- the checkpoint holds everything else that changes: model, optimiser, schedule, gradient scaler,
  the objective's state, the run's own random stream (the global generators are never touched),
  the position in the epoch and the early-stopping state;
- evaluation runs under a forked generator, so validating does not change the training draws.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from ..data import ArrayDataset, LabelledDataset, subset
from ..distributed import average_gradients, gather, is_distributed, rank_and_world_size
from ..evaluation import evaluate
from ..miners import EmbeddingsAlreadyPackagedAsTriplets
from ..models import EmbeddingModel, cache_features
from ..models.inference import embed_dataset
from ..objectives import BatchStream, MetricLossObjective, Objective
from ..progress import progress_bar
from ..samplers import PKSampler
from ..typed_values import ConfigError
from ..validation import finite_checks
from .builders import build_embedding_model, build_loss, build_miner, build_objective
from .checkpoint import RunRandomness, load_checkpoint, save_atomic, write_text_atomic
from .config import Config
from .config_loading import config_differences
from .logs import CSVLog, TensorBoardLog
from .offline import OfflineMining
from .optimization import build_optimizer, lr_factor, parameter_groups
from .run_data import RunData, build_run_data


@dataclass
class TrainState:
    """Where training stands; saved in every checkpoint.

    Attributes:
        epoch: The current epoch (0-based).
        batch: Batches of the current epoch already trained.
        step: Training steps done in total.
        best_value: Best validation value of the selection metric so far (None before any).
        best_step: Step of the best validation.
        validated_step: Step of the latest validation (None before any).
        bad_validations: Validations since the last improvement (for early stopping).
        stopped_early: Whether early stopping ended the run.
        before: Test metrics of the untrained network.
        skipped_steps: Steps without an optimiser update because the objective asked to skip
            them.
    """

    epoch: int = 0
    batch: int = 0
    step: int = 0
    best_value: float | None = None
    best_step: int | None = None
    validated_step: int | None = None
    bad_validations: int = 0
    stopped_early: bool = False
    before: dict[str, float] | None = None
    skipped_steps: int = 0


@dataclass
class TrainResult:
    """What a finished run reports.

    Attributes:
        before: Test metrics of the untrained network (None when not computed).
        after: Test metrics of the returned model (the best validated one when validating);
            None when the run was fitted with ``test=False``.
        best_validation: Best validation value of the selection metric, if validated.
        steps: Training steps done.
        stopped_early: Whether early stopping ended the run.
        images_per_second: Mean training throughput (None when no step ran in this call).
        run_dir: Where the run wrote its files.
    """

    before: dict[str, float] | None
    after: dict[str, float] | None
    best_validation: float | None
    steps: int
    stopped_early: bool
    images_per_second: float | None
    run_dir: Path
    history: list[dict[str, float]] = field(default_factory=list)


class _SeededSamples(Dataset[tuple[Tensor, int]]):
    """Runs each ``dataset[index]`` under the sample's own seed, so that random augmentations
    depend only on the sample's place in the run, not on the process or worker that loads it;
    labels become contiguous class indices."""

    def __init__(self, dataset: LabelledDataset, classes: np.ndarray) -> None:
        self.dataset = dataset
        self.class_index = {int(label): index for index, label in enumerate(classes)}

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> tuple[Tensor, int]:  # type: ignore[override]
        index, seed = key
        with torch.random.fork_rng(devices=[]):
            # The CPU generator alone: torch.manual_seed would reseed every CUDA device too.
            torch.default_generator.manual_seed(seed)
            item, label = self.dataset[index]
        return item, self.class_index[int(label)]


class _SeededBatches:
    """The sampler's batches with a seed attached to each index."""

    def __init__(self, sampler: PKSampler, seed: int) -> None:
        self.sampler = sampler
        self.seed = seed
        self.epoch = 0
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int) -> None:
        self.epoch, self.start_batch = epoch, start_batch
        self.sampler.set_epoch(epoch, start_batch=start_batch)

    def __len__(self) -> int:
        return len(self.sampler) - self.start_batch

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for number, batch in enumerate(self.sampler, start=self.start_batch):
            seeds = np.random.SeedSequence([self.seed, self.epoch, number]).generate_state(
                len(batch), dtype=np.uint64
            )
            yield [(int(i), int(s >> np.uint64(1))) for i, s in zip(batch, seeds, strict=True)]


class _SeededStream:
    """A :class:`~dmlkit.objectives.BatchStream`: endless batches of a seeded P×K sampler,
    from the one for a given step on."""

    def __init__(self, batches: _SeededBatches, loader: DataLoader[tuple[Tensor, int]]) -> None:
        self.batches = batches
        self.loader = loader

    def from_step(self, step: int) -> Iterator[tuple[Tensor, Tensor]]:
        epoch, batch = divmod(step, len(self.batches.sampler))
        while True:
            self.batches.set_epoch(epoch, batch)
            yield from self.loader
            epoch, batch = epoch + 1, 0


class _AutocastModel(nn.Module):
    """The model under float16 autocast, returning float32 embeddings (mixed precision)."""

    def __init__(self, model: nn.Module, device: torch.device) -> None:
        super().__init__()
        self.model = model
        self.device_type = device.type

    def forward(self, x: Tensor) -> Tensor:
        with torch.autocast(self.device_type, dtype=torch.float16):
            embeddings: Tensor = self.model(x)
        return embeddings.float()


def resolve_device(name: str) -> torch.device:
    """``auto`` → CUDA when available, else CPU; otherwise the named device, checked."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(
            f"train.device: {name!r} is not a device (auto, cpu, cuda, cuda:N)"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device is {name!r} but CUDA is not available here")
    if device.type == "cuda" and is_distributed():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))  # one GPU per process
    return device


# Metric families whose entries are named by cut-off (recall_at_k → recall_at_1, recall_at_2, …).
_FAMILIES = {"recall_at_k": "recall_at_", "precision_at_k": "precision_at_"}


# Settings a resumed run may change: they do not alter what is computed.
def check_selection_metric(metric: str, metrics: Sequence[str]) -> None:
    """Refuse a best-checkpoint metric that validation does not compute.

    Raises:
        ConfigError: ``metric`` is neither in ``metrics`` nor of a family listed there
            (``recall_at_k`` computes every ``recall_at_K``).
    """
    computed = [name for name in metrics if name not in _FAMILIES]
    families = [_FAMILIES[name] for name in metrics if name in _FAMILIES]
    if metric not in computed and not any(metric.startswith(f) for f in families):
        raise ConfigError(
            f"validation.metric {metric!r} is not among validation.metrics {list(metrics)}"
        )


class Trainer:
    """Trains an embedding network as a :class:`~dmlkit.training.Config` describes.

    Training labels are mapped to contiguous class indices 0..C−1 (``classes[i]`` is the
    original label of class i; saved in checkpoints and ``results.json``), so parts with
    per-class parameters can index them; evaluation uses the original labels.

    Args:
        config: The run.
        run_dir: Output folder; ``config.logging.run_dir`` or ``runs/<timestamp>`` when None.
        objective: What each step optimises, instead of the config's ``objective`` section
            (the config's ``loss`` and ``miner`` are then not built).
        callbacks: Called with the :class:`TrainState` after every training step (for example
            to stop a run from outside).
    """

    def __init__(
        self,
        config: Config,
        run_dir: str | Path | None = None,
        *,
        objective: Objective | None = None,
        callbacks: Sequence[Callable[[TrainState], None]] = (),
    ) -> None:
        self.config = config
        chosen = run_dir or config.logging.run_dir or Path("runs") / time.strftime("%Y%m%d-%H%M%S")
        self.run_dir = Path(chosen)
        self.callbacks = list(callbacks)
        self._unchecked_loss: Tensor | None = None  # the last step's, until read
        # Several processes (torchrun): each trains on its share of every global batch; rank 0
        # alone writes files.
        self.rank, self.world_size = rank_and_world_size()
        self.is_writer = self.rank == 0
        if self.world_size > 1:
            self._agree_with_rank_zero(config, run_dir)
        self.device = resolve_device(config.train.device)
        self.amp = config.train.amp and self.device.type == "cuda"
        self.state = TrainState()
        self.randomness = RunRandomness(config.train.seed, self.device)

        # Rank 0 reads (and downloads) the data first, so that ranks never download at once.
        if not self.is_writer:
            self._wait_for_writer()
        self.data: RunData = build_run_data(config.data, config.train.seed)
        if self.is_writer:
            self._wait_for_writer()
        self.classes = np.unique(self.data.train.labels)
        model_config = config.model
        with self.randomness.active():
            self.model: EmbeddingModel = build_embedding_model(
                model_config, self.data.in_channels
            ).to(self.device)
        self.trained_part: nn.Module = self.model
        if model_config.freeze_backbone:
            self._use_cached_features()
        if config.optimizer.backbone_lr == 0:
            # A backbone with learning rate 0 is frozen: no gradient (an objective that
            # differentiates the model must not see it) and no drift of its BatchNorm statistics.
            self.model.backbone.requires_grad_(False)
            self.model.freeze_bn = True

        self.sampler = PKSampler(
            self.data.train.labels,
            config.sampler.classes_per_batch,
            config.sampler.samples_per_class,
            seed=config.train.seed,
            too_few=config.sampler.too_few,
            groups_per_class=config.sampler.groups_per_class,
            rank=self.rank,
            world_size=self.world_size,
        )
        self._val_batches: list[list[int]] | None = None
        self.mining: OfflineMining | None = None
        if config.sampler.mode != "pk":
            if self.world_size > 1:
                raise ConfigError(
                    f"sampler.mode={config.sampler.mode} runs on one process: offline mining "
                    "embeds the whole training set between steps"
                )
            self.mining = OfflineMining(
                config.sampler, self.data.train.labels, len(self.sampler), config.train.seed
            )
            self.sampler = self.mining.sampler  # type: ignore[assignment]
        self.batches, self.loader = self._seeded_loader(self.sampler, config.train.seed)
        with self.randomness.active():
            self.objective = (self._build_objective() if objective is None else objective).to(
                self.device
            )
        if config.sampler.mode == "offline_triplets" and not (
            isinstance(self.objective, MetricLossObjective)
            and isinstance(self.objective.miner, EmbeddingsAlreadyPackagedAsTriplets)
        ):
            raise ConfigError(
                "sampler.mode=offline_triplets trains a loss on the packed triplets: it needs "
                "objective.name MetricLossObjective (with miner.name null), got "
                f"{type(self.objective).__name__}"
            )
        if self.world_size > 1 and self.objective.distributed_unsupported:
            raise ConfigError(
                f"{type(self.objective).__name__} cannot train on several processes: "
                f"{self.objective.distributed_unsupported}"
            )
        if self.amp and self.objective.amp_unsupported:
            raise ConfigError(
                f"train.amp is not supported by {type(self.objective).__name__}: "
                f"{self.objective.amp_unsupported}"
            )
        self.step_model = (
            _AutocastModel(self.trained_part, self.device) if self.amp else self.trained_part
        )
        groups = [("head", self.model.head.parameters()), ("loss", self.objective.parameters())]
        if not model_config.freeze_backbone:
            groups.insert(0, ("backbone", self.model.backbone.parameters()))
        self.optimizer = build_optimizer(
            config.optimizer, parameter_groups(config.optimizer, groups)
        )
        self.total_steps = config.train.epochs * len(self.sampler)
        if config.train.max_steps is not None:
            self.total_steps = min(self.total_steps, config.train.max_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_factor(config.scheduler, config.optimizer.lr, self.total_steps)
        )
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        check_selection_metric(config.validation.metric, config.validation.metrics)
        if self.world_size > 1:
            # Every rank starts from rank 0's weights, whatever initialised them.
            with torch.no_grad():
                for tensor in [
                    *self.model.state_dict().values(),
                    *self.objective.state_dict().values(),
                ]:
                    if isinstance(tensor, Tensor) and tensor.is_floating_point():
                        dist.broadcast(tensor, src=0)

    def _agree_with_rank_zero(self, config: Config, run_dir: str | Path | None) -> None:
        """Refuses ranks given another config or run folder than rank 0, and makes rank 0's
        default run folder (a timestamp) every rank's."""
        given: list[Any] = [None] * self.world_size
        dist.all_gather_object(given, (config.to_dict(), None if run_dir is None else str(run_dir)))
        differ = [r for r, other in enumerate(given) if other != given[0]]
        if differ:
            raise ConfigError(f"ranks {differ} were given another config or run folder than rank 0")
        chosen = [str(self.run_dir)]
        dist.broadcast_object_list(chosen, src=0)
        self.run_dir = Path(chosen[0])

    def _build_objective(self) -> Objective:
        config = self.config
        part_values = {
            "num_classes": len(self.classes),
            "embedding_size": config.model.embedding_dim,
        }
        return build_objective(
            config.objective,
            loss=build_loss(config.loss, **part_values),
            miner=(
                EmbeddingsAlreadyPackagedAsTriplets()
                if config.sampler.mode == "offline_triplets"
                else build_miner(config.miner, **part_values)
            ),
            lr=config.optimizer.lr,
            seed=config.train.seed,
            batch_source=self._batch_stream,
            **part_values,
        )

    def _batch_stream(
        self, classes_per_batch: int, samples_per_class: int, seed: int, *, held_out: bool = False
    ) -> BatchStream:
        """More P×K batches of the training set, or of its held-out validation classes, for
        objectives that need them (:class:`~dmlkit.objectives.BatchSource`)."""
        dataset = self.data.train
        if held_out:
            if self.data.val is None:
                raise ValueError(
                    "held-out batches come from the validation classes: set data.val_classes "
                    "(or data.cv_folds)"
                )
            dataset = self.data.val
        sampler = PKSampler(
            dataset.labels,
            classes_per_batch,
            samples_per_class,
            seed=seed,
            too_few=self.config.sampler.too_few,
        )
        return _SeededStream(*self._seeded_loader(sampler, seed, dataset))

    def _seeded_loader(
        self, sampler: PKSampler, seed: int, dataset: LabelledDataset | None = None
    ) -> tuple[_SeededBatches, DataLoader[tuple[Tensor, int]]]:
        dataset = self.data.train if dataset is None else dataset
        batches = _SeededBatches(sampler, seed)
        loader = DataLoader(
            _SeededSamples(dataset, np.unique(dataset.labels)),
            batch_sampler=batches,  # type: ignore[arg-type]
            num_workers=self.config.data.num_workers,
            # Our own generator: worker seeding must not consume the global generator.
            generator=torch.Generator().manual_seed(seed),
            pin_memory=self.device.type == "cuda",
        )
        return batches, loader

    def _use_cached_features(self) -> None:
        """Replace the datasets by cached backbone features; only the head is trained.

        Each image's features are computed once with the evaluation transform, so training on
        the cache sees no random augmentation.
        """
        cache_dir = Path(self.config.model.cache_dir or self.run_dir / "features")
        model = self.config.model
        backbone = f"{model.backbone}-{model.pooling}-{Path(model.pretrained or 'scratch').stem}"
        cached: dict[str, LabelledDataset | None] = {}
        sources = {"train": self.data.train_eval, "val": self.data.val, "test": self.data.test}
        for name, dataset in sources.items():
            if dataset is None:
                cached[name] = None
                continue

            def cached_features(dataset: LabelledDataset = dataset, name: str = name) -> Any:
                return cache_features(
                    self.model,
                    dataset,
                    cache_dir / f"{self.data.cache_key}-{backbone}-{name}.pt",
                    batch_size=self.config.train.eval_batch_size,
                    device=self.device,
                    num_workers=self.config.data.num_workers,
                    progress=self.config.logging.progress,
                )

            # Rank 0 computes and writes the cache; the other ranks then read it.
            cache = cached_features() if self.is_writer else None
            self._wait_for_writer()
            if cache is None:
                cache = cached_features()
            cached[name] = ArrayDataset(cache.features, cache.labels)
        train, test = cached["train"], cached["test"]
        assert train is not None and test is not None
        self.data = RunData(
            train=train,
            train_eval=train,
            val=cached["val"],
            test=test,
            in_channels=self.data.in_channels,
            cache_key=self.data.cache_key,
        )
        self.trained_part = self.model.head

    # ---------------------------------------------------------------- evaluation

    def embed(self, dataset: LabelledDataset) -> tuple[Tensor, np.ndarray]:
        """Embeddings and labels of a dataset under the current model (evaluation mode), with a
        passing progress bar (``logging.progress``) that disappears when done."""
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            return embed_dataset(
                self.trained_part,
                dataset,
                batch_size=self.config.train.eval_batch_size,
                device=self.device,
                num_workers=self.config.data.num_workers,
                progress=self.config.logging.progress and self.is_writer,
                leave=False,
            )

    def evaluate_on(self, dataset: LabelledDataset) -> dict[str, float]:
        """Retrieval metrics of the current model on a dataset (each item queries the rest).

        On several processes each rank embeds a consecutive share of the items, rank 0 scores
        the gathered embeddings (in the dataset's order, so ties break as on one process) and
        every rank gets its numbers."""
        validation = self.config.validation
        if self.world_size == 1:
            embeddings, labels = self.embed(dataset)
        else:
            bounds = [len(dataset) * r // self.world_size for r in range(self.world_size + 1)]
            share = subset(dataset, np.arange(bounds[self.rank], bounds[self.rank + 1]))
            own, own_labels = self.embed(share)
            with torch.no_grad():
                embeddings = gather(own.to(self.device)).cpu()
                labels = gather(torch.as_tensor(own_labels).to(self.device)).cpu().numpy()
        metrics = None
        if self.is_writer:
            metrics = dict(
                evaluate(
                    embeddings, labels, metrics=validation.metrics, recall_at=validation.recall_at
                ).metrics
            )
        if self.world_size > 1:
            shared = [metrics]
            dist.broadcast_object_list(shared, src=0)
            metrics = shared[0]
        assert metrics is not None
        return metrics

    # ---------------------------------------------------------------- checkpoints

    def _payload(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "objective": self.objective.state_dict(),
            "mining": None if self.mining is None else self.mining.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "state": vars(self.state).copy(),
            "rng": self._every_ranks_randomness(),
            "world_size": self.world_size,
            "config": self.config.to_dict(),
            "classes": self.classes.tolist(),
            "in_channels": self.data.in_channels,
        }

    def _migrated(self, payload: dict[str, Any]) -> dict[str, Any]:
        """A checkpoint written before the objective interface (dmlkit 0.1), in today's form:
        the loss's state becomes the objective's, and of the global generators it saved, the
        torch ones become the run's stream (the only ones the run draws from)."""
        old_rng = payload["rng"]
        rng = {"torch": old_rng["torch"]}
        if self.device.type == "cuda" and "cuda" in old_rng:
            rng["cuda"] = old_rng["cuda"][self.device.index or 0]
        objective = {f"loss.{key}": value for key, value in payload.pop("loss").items()}
        return {**payload, "objective": objective, "rng": rng}

    def _every_ranks_randomness(self) -> dict[str, Any]:
        """The run's random stream; on several processes every rank's, by rank."""
        own = self.randomness.state_dict()
        if self.world_size == 1:
            return own
        ranks: list[Any] = [None] * self.world_size
        dist.all_gather_object(ranks, own)
        return {"ranks": ranks}

    def save(self, name: str = "last.pt") -> Path:
        """Write a resumable checkpoint atomically into the run folder (rank 0 writes; every
        rank waits until the file is there)."""
        self._checked_loss()
        payload = self._payload()
        path = self.run_dir / name
        if self.is_writer:
            save_atomic(payload, path)
        self._wait_for_writer()
        return path

    def _wait_for_writer(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def _restore(self, path: Path) -> None:
        payload = load_checkpoint(path)
        changed = config_differences(payload["config"], self.config)
        if changed:
            raise ConfigError(
                f"cannot resume {path}: the config differs from the run's in {', '.join(changed)}; "
                "resume with the run's own config.yaml (only logging, data.num_workers, "
                "train.device, train.eval_batch_size and train.checkpoint_every may change)"
            )
        if "objective" not in payload:
            payload = self._migrated(payload)
        if payload.get("classes", self.classes.tolist()) != self.classes.tolist():
            raise ConfigError(f"cannot resume {path}: its training classes differ from this run's")
        saved_world = payload.get("world_size", 1)
        if saved_world != self.world_size:
            raise ConfigError(
                f"cannot resume {path}: it was written by {saved_world} process(es) and this run "
                f"has {self.world_size}; resume with --nproc-per-node {saved_world} (each "
                "process's share of a batch and its random stream depend on the count)"
            )
        self.model.load_state_dict(payload["model"])
        self.objective.load_state_dict(payload["objective"])
        if self.mining is not None and payload.get("mining") is not None:
            self.mining.load_state_dict(payload["mining"])
        self.optimizer.load_state_dict(payload["optimizer"])
        self.scheduler.load_state_dict(payload["scheduler"])
        self.scaler.load_state_dict(payload["scaler"])
        self.state = TrainState(**payload["state"])
        rng = payload["rng"]
        self.randomness.load_state_dict(rng["ranks"][self.rank] if "ranks" in rng else rng)

    # ---------------------------------------------------------------- training

    def fit(self, resume: bool = False, *, test: bool = True) -> TrainResult:
        """Train, validating and checkpointing as configured, then evaluate on the test classes.

        The model is left at its best validated state (the last one without validation).

        Args:
            resume: Continue from ``<run dir>/last.pt`` exactly where it was written.
            test: Evaluate on the test classes before (if configured) and after training; a
                hyperparameter search passes False, so that no test result exists to peek at.

        Returns:
            The run's :class:`TrainResult`; also written to ``<run dir>/results.json``.
        """
        config = self.config
        self.run_dir.mkdir(parents=True, exist_ok=True)
        logs = ("train.csv", "validation.csv", "mining.csv")
        if not resume:
            if (self.run_dir / "last.pt").exists():
                raise ConfigError(
                    f"{self.run_dir} already holds a run (last.pt): resume it with --resume, or "
                    "choose another run folder"
                )
            # Rows of a run killed before its first checkpoint: this run starts them again.
            for name in logs:
                if self.is_writer:
                    (self.run_dir / name).unlink(missing_ok=True)
        self._wait_for_writer()  # every rank has checked the folder before rank 0 writes to it
        train_log, val_log, mining_log = (CSVLog(self.run_dir / name) for name in logs)
        if resume:
            self._restore(self.run_dir / "last.pt")
            if self.is_writer:
                train_log.truncate_after(self.state.step)
                val_log.truncate_after(self.state.step)
                # A refresh after the checkpoint is done again: its row goes with it.
                refreshed = None if self.mining is None else self.mining.refreshed_at
                mining_log.truncate_after(-1 if refreshed is None else refreshed)
        else:
            if self.is_writer:
                (self.run_dir / "config.yaml").write_text(config.to_yaml())
            if test and config.validation.before_training:
                self.state.before = self.evaluate_on(self.data.test)
        board = None
        if config.logging.tensorboard and self.is_writer:
            purge = self.state.step + 1 if resume else None
            board = TensorBoardLog(self.run_dir / "tensorboard", purge_step=purge)

        images = 0
        seconds = 0.0
        self.objective.start(self.state.step)
        finished = self.state.stopped_early or self.state.step >= self.total_steps
        while not finished and self.state.epoch < config.train.epochs:
            if self.mining is not None:
                self._refresh_mining(mining_log, board)
            self.batches.set_epoch(self.state.epoch, self.state.batch)
            bar = progress_bar(
                total=len(self.sampler),
                initial=self.state.batch,
                description=f"epoch {self.state.epoch + 1}/{config.train.epochs}",
                unit="step",
                enabled=config.logging.progress and self.is_writer,
                leave=False,
            )
            self.trained_part.train()
            start = time.perf_counter()
            every_step = config.train.check_finite == "every_step"
            for x, y in self.loader:
                with self.randomness.active(), finite_checks(every_step):
                    loss, extras = self._step(x, y)
                self.state.batch += 1
                self.state.step += 1
                now = time.perf_counter()
                images += len(y) * self.world_size  # the global batch
                seconds += now - start
                start = now
                bar.update()
                self._unchecked_loss = loss
                # Reading the loss makes the host wait for the device: only on logged steps
                # (and before anything is saved or validated).
                if self.state.step % config.logging.log_every == 0:
                    value = self._checked_loss()
                    row = {
                        "step": self.state.step,
                        "epoch": self.state.epoch,
                        "loss": value,
                        **extras,
                        "lr": self.optimizer.param_groups[0]["lr"],
                        "images_per_second": images / seconds,
                    }
                    if self.is_writer:
                        train_log.write(row)
                        if board:
                            board.write("train", self.state.step, row)
                    bar.set_postfix(
                        loss=f"{value:.4f}",
                        mined=extras.get("mined"),
                        img_s=f"{images / seconds:.0f}",
                        refresh=False,
                    )
                if self._validate_now("step"):
                    self._validate(val_log, board)
                if config.train.checkpoint_every and (
                    self.state.step % config.train.checkpoint_every == 0
                ):
                    self.save()
                for callback in self.callbacks:
                    callback(self.state)
                if self.world_size > 1 and self.callbacks:  # one rank stopping stops all
                    stop = torch.tensor([float(self.state.stopped_early)], device=self.device)
                    dist.all_reduce(stop, op=dist.ReduceOp.MAX)
                    self.state.stopped_early = bool(stop.item())
                if self.state.stopped_early or self.state.step >= self.total_steps:
                    break
                if self.mining is not None and self.mining.due(
                    self.state.step, self.state.epoch, epoch_start=False
                ):
                    break  # refreshed at the top of the loop, which resumes this epoch
            bar.close()
            epoch_ended = self.state.batch >= len(self.sampler)
            if self.state.batch >= len(self.sampler):
                self.state.epoch += 1
                self.state.batch = 0
                if self._validate_now("epoch") and not self.state.stopped_early:
                    self._validate(val_log, board)
            finished = self.state.stopped_early or self.state.step >= self.total_steps
            if epoch_ended or finished:  # not after a break for a mid-epoch refresh
                self.save()
        if self._validates() and self.state.validated_step != self.state.step:
            # Training after the last scheduled validation would otherwise be thrown away.
            self._validate(val_log, board)
        self.save()
        result = self._finish(images / seconds if seconds else None, val_log, test)
        if board and result.after is not None:
            board.write("test", self.state.step, result.after)
            board.close()
        return result

    def _refresh_mining(self, log: CSVLog, board: TensorBoardLog | None) -> None:
        """Re-embeds the training set and re-mines, when the refresh interval says so."""
        assert self.mining is not None
        epoch_start = self.state.batch == 0
        if not self.mining.due(self.state.step, self.state.epoch, epoch_start):
            return
        start = time.perf_counter()
        embeddings, labels = self.embed(self.data.train_eval)
        row = self.mining.refresh(
            embeddings, labels, step=self.state.step, seconds=time.perf_counter() - start
        )
        if self.is_writer:
            log.write({**row, "epoch": self.state.epoch})
        if board:
            board.write("mining", self.state.step, row)

    def _checked_loss(self) -> float:
        """The last step's loss as a number (NaN for a skipped step or none), refusing a
        diverged run, so no checkpoint or validation ever follows an unread divergence."""
        loss, self._unchecked_loss = self._unchecked_loss, None
        if loss is None:
            return math.nan
        value = float(loss)
        if not math.isfinite(value):
            raise ValueError(
                f"training diverged: the loss is {value} at step {self.state.step} (checked at "
                "every logged step; train.check_finite=every_step names the first bad batch). "
                "Lower optimizer.lr, set optimizer.grad_clip, or resume from an earlier "
                "checkpoint."
            )
        return value

    def _step(self, x: Tensor, y: Tensor) -> tuple[Tensor | None, dict[str, float | int | None]]:
        """One optimisation step; returns the loss (None when skipped), still on the device,
        and what to log beside it."""
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        out = self.objective(self.step_model, x, y)
        if self.world_size > 1 and self.objective.may_skip:
            # One rank skipping alone would leave the others waiting in the backward's
            # collectives: a step is skipped when any rank skips it.
            skip = torch.tensor([float(out.skip)], device=self.device)
            dist.all_reduce(skip, op=dist.ReduceOp.MAX)
            out = dataclasses.replace(out, skip=bool(skip.item()))
        extras = dict(out.stats)
        if self.objective.may_skip:
            extras["skipped_steps"] = self.state.skipped_steps + int(out.skip)
        self.optimizer.zero_grad(set_to_none=True)
        if out.skip:
            self.state.skipped_steps += 1
        else:
            self.scaler.scale(out.loss).backward()
            if self.world_size > 1:
                # What DDP does: the ranks' gradients averaged (model and objective alike).
                average_gradients(
                    p for group in self.optimizer.param_groups for p in group["params"]
                )
            if self.config.optimizer.grad_clip is not None:
                self.scaler.unscale_(self.optimizer)
                parameters = [p for group in self.optimizer.param_groups for p in group["params"]]
                nn.utils.clip_grad_norm_(parameters, self.config.optimizer.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        self.scheduler.step()
        # A skipped step has no loss to report (its zero only carries the graph).
        return (None if out.skip else out.loss.detach()), extras

    def _validates(self) -> bool:
        return self.data.val is not None and self.config.validation.every > 0

    def _validate_now(self, unit: str) -> bool:
        validation = self.config.validation
        if not self._validates() or validation.unit != unit:
            return False
        count = self.state.step if unit == "step" else self.state.epoch
        return count % validation.every == 0

    def _validation_batches(self) -> list[list[int]]:
        """The P×K batches of validation classes the loss is computed on: seeded, the same at
        every validation (P is lowered to the number of validation classes if need be)."""
        assert self.data.val is not None
        sampler_config = self.config.sampler
        count = self.config.validation.loss_batches
        classes = len(np.unique(self.data.val.labels))
        if count == 0 or classes < 2:
            return []
        sampler = PKSampler(
            self.data.val.labels,
            min(sampler_config.classes_per_batch, classes),
            sampler_config.samples_per_class,
            seed=self.config.train.seed + 2,
            too_few="replace",
            groups_per_class="all",
        )
        return list(itertools.islice(iter(sampler), count))

    def _validation_losses(self) -> dict[str, float | None]:
        """The objective's validation losses, averaged over the fixed validation batches."""
        assert self.data.val is not None
        if self._val_batches is None:
            self._val_batches = self._validation_batches()
        samples = _SeededSamples(self.data.val, np.unique(self.data.val.labels))
        seed = self.config.train.seed + 2
        rows: list[dict[str, float | None]] = []
        was_training = self.trained_part.training
        self.trained_part.eval()
        devices = [self.device] if self.device.type == "cuda" else []
        try:
            # A random miner must not advance the run's generators.
            with torch.no_grad(), torch.random.fork_rng(devices=devices):
                for number, batch in enumerate(self._val_batches):
                    items = [samples[(index, seed + number)] for index in batch]
                    x = torch.stack([item for item, _ in items]).to(self.device)
                    y = torch.tensor([label for _, label in items], device=self.device)
                    losses = self.objective.validation_losses(self.trained_part, x, y)
                    if losses is None:
                        return {}
                    rows.append(losses)
        finally:
            self.trained_part.train(was_training)
        if not rows:
            return {}
        out: dict[str, float | None] = {}
        for key in rows[0]:
            values = [row[key] for row in rows if row[key] is not None]
            out[key] = sum(values) / len(values) if values else None  # type: ignore[arg-type]
        return out

    def _validate(self, log: CSVLog, board: TensorBoardLog | None) -> None:
        assert self.data.val is not None
        self._checked_loss()
        validation = self.config.validation
        metrics = self.evaluate_on(self.data.val)  # rank 0's numbers, on every rank
        losses = self._validation_losses()
        self.state.validated_step = self.state.step
        if log.columns is not None:
            # A run started before the validation loss existed keeps its log's columns.
            losses = {key: value for key, value in losses.items() if key in log.columns}
        if self.is_writer:
            log.write({"step": self.state.step, "epoch": self.state.epoch, **metrics, **losses})
        if board:
            numbers = {k: v for k, v in losses.items() if v is not None}
            board.write("validation", self.state.step, {**metrics, **numbers})
        value = metrics[validation.metric]
        if self.state.best_value is None or value > self.state.best_value:
            self.state.best_value, self.state.best_step = value, self.state.step
            self.state.bad_validations = 0
            self.save("best.pt")
        else:
            self.state.bad_validations += 1
            if (
                validation.patience is not None
                and self.state.bad_validations >= validation.patience
            ):
                self.state.stopped_early = True

    def _finish(self, images_per_second: float | None, val_log: CSVLog, test: bool) -> TrainResult:
        if self.state.best_step is not None:
            self.model.load_state_dict(load_checkpoint(self.run_dir / "best.pt")["model"])
        after = self.evaluate_on(self.data.test) if test else None
        result = TrainResult(
            before=self.state.before,
            after=after,
            best_validation=self.state.best_value,
            steps=self.state.step,
            stopped_early=self.state.stopped_early,
            images_per_second=images_per_second,
            run_dir=self.run_dir,
            history=[{k: float(v) for k, v in row.items() if v} for row in val_log.rows()],
        )
        summary = {
            "before": result.before,
            "after": result.after,
            "best_validation": result.best_validation,
            "best_step": self.state.best_step,
            "steps": result.steps,
            "stopped_early": result.stopped_early,
            "skipped_steps": self.state.skipped_steps,
            "images_per_second": result.images_per_second,
            "training_classes": self.classes.tolist(),
            # The config names the objective, unless one was passed from Python: record which.
            "objective": f"{type(self.objective).__module__}:{type(self.objective).__qualname__}",
        }
        # Atomic: the protocol reads a results.json as "this run finished".
        if self.is_writer:
            write_text_atomic(json.dumps(summary, indent=2), self.run_dir / "results.json")
        self._wait_for_writer()
        return result
