"""Benchmark configs: a base training config, the protocol's settings, and the methods compared.

A benchmark config is a YAML file with three sections::

    training:   # a training config as for `dmlkit train` (a mapping, or the path of a YAML file)
      data: {name: digits}
    protocol:   # ProtocolConfig: folds, trials, re-runs, patience, storage, ...
      folds: 2
    methods:    # name -> built-in method (presets/methods.yaml), adjusted or declared in full
      contrastive: {}
      mine:
        config: {loss: {name: MultiSimilarityLoss}}
        search:
          loss.options.alpha: {low: 0.01, high: 100.0}
          optimizer.lr: {low: 1.0e-6, high: 1.0e-2, log: true}

Every key is checked when the config is loaded, before any training starts: section keys,
protocol settings, and each method's training config and search-space keys (against
:class:`~dmlkit.training.Config`).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from torch import Tensor

from ..training import (
    RESUMABLE_CHANGES,
    Config,
    ConfigError,
    check_selection_metric,
    config_from_dict,
    set_config_key,
)
from ..training.builders import build_loss, build_miner, build_objective
from ..typed_values import dataclass_from_mapping, unknown_key_error

PRESETS_DIR = Path(__file__).with_name("presets")
SELECTION_METRIC = "mean_average_precision_at_r"
TEST_METRICS = ("precision_at_1", "r_precision", "mean_average_precision_at_r")

# Settings the protocol decides for every run; a method or a search space may not change them.
# Method sections that replace the base config's, not merge.
REPLACED = ("loss", "miner", "objective")

PROTOCOL_KEYS = (
    "data.val_classes",
    "data.cv_folds",
    "data.cv_fold",
    "data.cv_seed",
    "validation.metric",
    "validation.patience",
    "validation.before_training",
    "train.seed",
    "logging.run_dir",
)


@dataclass(frozen=True)
class SearchParam:
    """One searched hyperparameter: a float or integer range, or a list of choices.

    Attributes:
        low: Lower bound (inclusive).
        high: Upper bound (inclusive).
        log: Sample uniformly in log space (for scales and rates spanning decades).
        int: Integer values.
        step: Discretisation step of a linear range; None for continuous.
        choices: A categorical parameter's values (instead of a range).
    """

    low: float | None = None
    high: float | None = None
    log: bool = False
    int: bool = False
    step: float | None = None
    choices: tuple[Any, ...] | None = None

    def check(self, name: str) -> None:
        """Raise a ConfigError naming ``name`` if the range or choices cannot be sampled."""
        if self.choices is not None:
            if self.low is not None or self.high is not None or not self.choices:
                raise ConfigError(f"search {name!r}: give either non-empty choices or low/high")
            return
        if self.low is None or self.high is None:
            raise ConfigError(f"search {name!r}: low and high are required")
        if not self.low < self.high:
            raise ConfigError(f"search {name!r}: low ({self.low}) must be below high ({self.high})")
        if self.log and self.low <= 0:
            raise ConfigError(f"search {name!r}: a log-scale range needs low > 0, got {self.low}")
        if self.log and self.step is not None:
            raise ConfigError(f"search {name!r}: step cannot be combined with log")
        if self.step is not None and not self.step > 0:
            raise ConfigError(f"search {name!r}: step must be positive, got {self.step}")
        if self.int:
            values = {"low": self.low, "high": self.high, "step": self.step or 1}
            for key, value in values.items():
                if value != int(value):
                    raise ConfigError(f"search {name!r}: an integer range needs an integer {key}")

    def suggest(self, trial: Any, name: str) -> Any:
        """Ask an Optuna trial for this parameter's value."""
        if self.choices is not None:
            return trial.suggest_categorical(name, list(self.choices))
        assert self.low is not None and self.high is not None
        if self.int:
            step = 1 if self.step is None else int(self.step)
            return trial.suggest_int(name, int(self.low), int(self.high), step=step, log=self.log)
        return trial.suggest_float(name, self.low, self.high, step=self.step, log=self.log)

    def example(self) -> Any:
        """A value inside the range (its lower end), to check a config before searching."""
        if self.choices is not None:
            return self.choices[0]
        return int(self.low) if self.int else self.low  # type: ignore[arg-type]


@dataclass(frozen=True)
class MethodSpec:
    """One compared method: how it changes the base training config, and what is searched.

    Attributes:
        name: Row name in the results.
        config: Nested training-config values merged over the benchmark's base config.
        search: Dotted training-config key → its search range.
        description: One line for the results table's legend.
    """

    name: str
    config: Mapping[str, Any]
    search: Mapping[str, SearchParam]
    description: str = ""


@dataclass
class ProtocolConfig:
    """The Reality Check protocol's settings.

    Attributes:
        folds: Class-disjoint cross-validation folds over the training classes (the paper: 4).
        fold_seed: Seed of the class shuffle that forms the folds; fixed for a study.
        trials: Completed search trials per method (the paper: 50).
        startup_trials: Random trials before TPE starts modelling (Optuna's default 10).
        sampler_seed: Seed of the TPE sampler. Worker ``w`` of a session that finds ``m`` trials
            in the study seeds it with ``sampler_seed + 10000·w + m``, so a resumed study does
            not draw its start-up points again; give each machine its own value.
        reruns: Times the best hyperparameters are trained again (every fold) for the test
            results and their confidence intervals; at least 2.
        patience: Validations without a better validation MAP@R before a run stops (the paper:
            9, validating every 2 epochs).
        confidence: Coverage of the reported confidence intervals.
        storage: Optuna storage URL: ``sqlite:///path.db``, ``postgresql://…`` or
            ``mysql://…``; None for ``<out>/study.db``.
        study_prefix: Prefix of the study names (one study per method, named after it).
        workers: Local worker processes sharing the study (and the re-runs).
        heartbeat_interval: Seconds between a running trial's heartbeats in the storage.
        grace_period: A running trial without a heartbeat for this long belongs to a killed
            worker; it is marked failed and queued again with the same hyperparameters.
        max_retries: Times a killed or interrupted trial is queued again.
        out: Output folder; ``runs/bench-<config name>`` when None.
    """

    folds: int = 4
    fold_seed: int = 0
    trials: int = 50
    startup_trials: int = 10
    sampler_seed: int = 0
    reruns: int = 5
    patience: int = 9
    confidence: float = 0.95
    storage: str | None = None
    study_prefix: str = ""
    workers: int = 1
    heartbeat_interval: int = 60
    grace_period: int = 180
    max_retries: int = 3
    out: str | None = None


@dataclass
class BenchConfig:
    """A whole benchmark: base training config, protocol and methods.

    Attributes:
        training: The base training config as a nested mapping (checked).
        protocol: The protocol's settings.
        methods: The compared methods, in table order.
        name: The config's name (its file stem), for the default output folder.
    """

    training: dict[str, Any]
    protocol: ProtocolConfig
    methods: dict[str, MethodSpec]
    name: str = "bench"

    @property
    def out(self) -> Path:
        """The output folder."""
        return Path(self.protocol.out or Path("runs") / f"bench-{self.name}")

    @property
    def storage_url(self) -> str:
        """The Optuna storage URL (SQLite in the output folder by default)."""
        if self.protocol.storage:
            return self.protocol.storage
        return f"sqlite:///{(self.out / 'study.db').resolve()}"

    def study_name(self, method: str) -> str:
        """The Optuna study of one method."""
        return f"{self.protocol.study_prefix}{method}"

    def run_config(
        self,
        method: str,
        params: Mapping[str, Any],
        fold: int,
        seed: int,
        run_dir: Path | None = None,
    ) -> Config:
        """The training config of one fold run of a method at some hyperparameters.

        Args:
            method: A key of :attr:`methods`.
            params: Dotted training-config key → value (a trial's hyperparameters).
            fold: The validation fold.
            seed: The training seed.
            run_dir: Written into ``logging.run_dir``.

        Raises:
            ConfigError: A value the training config rejects.
        """
        values = self.method_training(method)
        for key, value in params.items():
            set_config_key(values, key, value)
        protocol = self.protocol
        forced = {
            "data.val_classes": 0.0,
            "data.cv_folds": protocol.folds,
            "data.cv_fold": fold,
            "data.cv_seed": protocol.fold_seed,
            "validation.metric": SELECTION_METRIC,
            "validation.patience": protocol.patience,
            "validation.before_training": False,
            "train.seed": seed,
            "logging.run_dir": None if run_dir is None else str(run_dir),
            "logging.progress": False,
        }
        for key, value in forced.items():
            set_config_key(values, key, value)
        return config_from_dict(values)

    def method_training(self, method: str) -> dict[str, Any]:
        """The base training config with a method's config applied.

        A method that names its ``loss`` or ``miner`` replaces that whole section, so that the
        base config's options for another loss never leak into it; other sections merge.
        """
        update = self.methods[method].config
        merged = _merged(self.training, {k: v for k, v in update.items() if k not in REPLACED})
        for key in REPLACED:
            if key in update:
                merged[key] = copy.deepcopy(update[key])
        return merged

    def fingerprint(self, method: str) -> str:
        """Identifies what a method's trials mean: base config, method and folds.

        A study resumed under a different fingerprint would mix incomparable trials.
        """
        spec = self.methods[method]
        described = {
            "training": _changed_settings(self.method_training(method)),
            "search": {key: dataclasses.asdict(param) for key, param in spec.search.items()},
            "folds": self.protocol.folds,
            "fold_seed": self.protocol.fold_seed,
            "patience": self.protocol.patience,
        }
        text = json.dumps(described, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def _changed_settings(values: Mapping[str, Any]) -> dict[str, Any]:
    """A training config as the dotted settings that differ from the defaults and change
    results: checked and typed (``1e-3`` and ``1.0e-3`` alike), and stable when later versions
    add settings with defaults."""
    checked = _flat(config_from_dict(values).to_dict())
    defaults = _flat(Config().to_dict())
    return {
        key: value
        for key, value in checked.items()
        if value != defaults.get(key) and not key.startswith(RESUMABLE_CHANGES)
    }


def _flat(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, Mapping) and not prefix.endswith("options."):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[prefix + str(key)] = value
    return flat


def _merged(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``update`` merged in recursively (mappings merge, other values replace)."""
    merged = copy.deepcopy(dict(base))
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merged(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _yaml_file(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {value!r}")
    return dict(value)


def method_presets() -> dict[str, Any]:
    """The built-in methods (``presets/methods.yaml``) as raw mappings."""
    return _mapping(_yaml_file(PRESETS_DIR / "methods.yaml"), "methods.yaml")


def bench_presets() -> list[str]:
    """Names of the built-in benchmark configs (``dmlkit bench NAME``)."""
    return sorted(path.stem for path in PRESETS_DIR.glob("*.yaml") if path.stem != "methods")


def _search(values: Any, where: str) -> dict[str, SearchParam]:
    search: dict[str, SearchParam] = {}
    for key, spec in _mapping(values, where).items():
        if spec is None:
            continue
        param = dataclass_from_mapping(SearchParam, spec, f"{where}.{key}.")
        param.check(f"{where}.{key}")
        search[str(key)] = param
    return search


def _method(name: str, entry: Any, presets: Mapping[str, Any]) -> MethodSpec:
    entry = _mapping(entry, f"methods.{name}")
    allowed = ["preset", "config", "search", "description"]
    for key in entry:
        if key not in allowed:
            raise unknown_key_error(f"methods.{name}.", str(key), allowed)
    preset_name = entry.get("preset", name if name in presets else None)
    if preset_name is None and "config" not in entry:
        raise ConfigError(
            f"methods.{name}: not a built-in method; give its config and search, or a preset "
            f"(built-in: {', '.join(presets)})"
        )
    base: dict[str, Any] = {}
    if preset_name is not None:
        if preset_name not in presets:
            raise ConfigError(
                f"methods.{name}.preset: unknown method {preset_name!r}; built-in: "
                f"{', '.join(presets)}"
            )
        base = _mapping(presets[preset_name], f"preset {preset_name}")
    config = _merged(_mapping(base.get("config"), name), _mapping(entry.get("config"), name))
    search_values = {**_mapping(base.get("search"), name), **_mapping(entry.get("search"), name)}
    search = _search(search_values, f"methods.{name}.search")
    for key in search:
        if key in PROTOCOL_KEYS:
            raise ConfigError(f"methods.{name}.search: {key} is set by the protocol")
    for key in _flat(config):
        if key in PROTOCOL_KEYS:
            raise ConfigError(f"methods.{name}.config: {key} is set by the protocol")
    description = str(entry.get("description", base.get("description", "")))
    return MethodSpec(name, config, search, description)


def _protocol(values: Any) -> ProtocolConfig:
    protocol = dataclass_from_mapping(ProtocolConfig, values, "protocol.")
    minimum = {
        "folds": 2,
        "trials": 1,
        "startup_trials": 0,
        "reruns": 2,  # a confidence interval needs two
        "patience": 1,
        "workers": 1,
        "heartbeat_interval": 1,
        "grace_period": 1,
        "max_retries": 0,
    }
    for key, low in minimum.items():
        value = getattr(protocol, key)
        if value < low:
            raise ConfigError(f"protocol.{key} must be at least {low}, got {value}")
    if not 0 < protocol.confidence < 1:
        raise ConfigError(f"protocol.confidence must be in (0, 1), got {protocol.confidence}")
    if protocol.grace_period <= protocol.heartbeat_interval:
        raise ConfigError("protocol.grace_period must exceed protocol.heartbeat_interval")
    return protocol


def _training_path(text: str, base_dir: Path | None) -> Path:
    path = Path(text).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    if not path.is_file():
        raise FileNotFoundError(f"training config {str(path)!r} not found")
    return path


def bench_config_from_dict(
    values: Mapping[str, Any], name: str = "bench", base_dir: Path | None = None
) -> BenchConfig:
    """A checked :class:`BenchConfig` from a nested mapping.

    Args:
        values: The ``training``, ``protocol`` and ``methods`` sections.
        name: The config's name (default output folder ``runs/bench-<name>``).
        base_dir: Where a ``training:`` path is relative to.

    Raises:
        ConfigError: An unknown key, a bad value, or a method whose config cannot be built.
    """
    sections = ["training", "protocol", "methods"]
    for key in values:
        if key not in sections:
            raise unknown_key_error("", str(key), sections)
    training = values.get("training")
    if isinstance(training, str):
        training = _yaml_file(_training_path(training, base_dir))
    training = _mapping(training, "training")
    config_from_dict(training)  # the base must be valid on its own
    presets = method_presets()
    methods_values = _mapping(values.get("methods"), "methods")
    if not methods_values:
        raise ConfigError(f"methods: name at least one method (built-in: {', '.join(presets)})")
    methods = {name: _method(name, entry, presets) for name, entry in methods_values.items()}
    bench = BenchConfig(training, _protocol(values.get("protocol")), methods, name)
    for method, spec in methods.items():
        example = {key: param.example() for key, param in spec.search.items()}
        try:
            config = bench.run_config(method, example, fold=0, seed=0)
        except ConfigError as error:
            raise ConfigError(f"methods.{method}: {error}") from None
        check_buildable(config, f"methods.{method}")
        if config.validation.every == 0:
            raise ConfigError(
                "training.validation.every must be positive: the protocol early-stops on "
                "validation MAP@R"
            )
        if SELECTION_METRIC not in config.validation.metrics:
            raise ConfigError(f"training.validation.metrics must include {SELECTION_METRIC}")
    return bench


class _NoBatches:
    """The batch source of a configuration check: building an objective may ask for a stream
    of training batches, and a check draws none."""

    def __init__(
        self, classes_per_batch: int, samples_per_class: int, seed: int, *, held_out: bool = False
    ) -> None:
        if classes_per_batch < 1 or samples_per_class < 1:
            raise ValueError(
                f"a P×K batch needs P ≥ 1 and K ≥ 1, got {classes_per_batch} × {samples_per_class}"
            )

    def from_step(self, step: int) -> Iterator[tuple[Tensor, Tensor]]:
        raise RuntimeError("a configuration check draws no batch")


# A stand-in class count for building a method's parts before its data is read: the
# constructors' own checks (margins, sub-centres, regulariser shapes) do not depend on it.
_CHECK_NUM_CLASSES = 2


def check_buildable(config: Config, where: str) -> None:
    """Check the run's validation metric and build its loss, miner and objective (reading a
    config has already checked every part's name and options), so that a value their
    constructors refuse is an error now rather than a failure of every run. Parts that need the
    number of training classes are built with a stand-in count; the checks that need the data
    (enough classes for a meta batch, say) are left to the run.
    """
    try:
        check_selection_metric(config.validation.metric, config.validation.metrics)
        sizes = {"embedding_size": config.model.embedding_dim, "num_classes": _CHECK_NUM_CLASSES}
        build_objective(
            config.objective,
            loss=build_loss(config.loss, **sizes),
            miner=build_miner(config.miner, **sizes),
            lr=config.optimizer.lr,
            seed=config.train.seed,
            batch_source=_NoBatches,
            **sizes,
        )
    except ConfigError as error:
        raise ConfigError(f"{where}: {error}") from None


def load_bench_config(source: str | Path, overrides: Sequence[str] = ()) -> BenchConfig:
    """Read a benchmark config from a YAML file or a built-in preset name.

    Args:
        source: A YAML file, or the name of a built-in benchmark (:func:`bench_presets`).
        overrides: ``section.key=value`` strings for the ``protocol`` and ``training`` sections,
            e.g. ``protocol.trials=10`` or ``training.optimizer.lr=1e-4``.

    Raises:
        FileNotFoundError: Neither a file nor a preset.
        ConfigError: An unknown key or a bad value.
    """
    path = Path(source).expanduser()
    if not path.is_file():
        preset = PRESETS_DIR / f"{source}.yaml"
        if str(source) in bench_presets():
            path = preset
        else:
            raise FileNotFoundError(
                f"benchmark config {str(source)!r} not found (neither a file nor a built-in "
                f"benchmark: {', '.join(bench_presets())})"
            )
    values = _mapping(_yaml_file(path), str(path))
    for override in overrides:
        key, sep, text = override.partition("=")
        section, _, rest = key.strip().partition(".")
        if not sep or not rest or section not in ("protocol", "training"):
            raise ConfigError(
                f"override {override!r}: expected protocol.KEY=VALUE or training.KEY=VALUE"
            )
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise ConfigError(f"override {override!r}: not valid YAML: {error}") from None
        if section == "protocol":
            values["protocol"] = {**_mapping(values.get("protocol"), "protocol"), rest: value}
        else:
            if rest in PROTOCOL_KEYS:
                raise ConfigError(f"override {override!r}: {rest} is set by the protocol")
            training = values.get("training")
            if isinstance(training, str):
                training = _yaml_file(_training_path(training, path.parent))
            training = _mapping(training, "training")
            set_config_key(training, rest, value)
            values["training"] = training
    return bench_config_from_dict(values, name=path.stem, base_dir=path.parent)


__all__ = [
    "TEST_METRICS",
    "BenchConfig",
    "MethodSpec",
    "ProtocolConfig",
    "SearchParam",
    "bench_config_from_dict",
    "bench_presets",
    "load_bench_config",
    "method_presets",
]
