"""Hyperparameter sensitivity sweeps: one training setting varied over a range of values.

Each value is trained with one or more seeds (the config's ``train.seed`` and the ones after
it), every run in its own folder ``<out>/<key>=<value>/seed-<seed>/``, and scored on the test
classes with its best validation checkpoint (its final model when it was not validated). The
results are tabulated by :mod:`.sweep_results`; the values come from :mod:`.sweep_values`.

Nothing is lost when a sweep is stopped: a finished run (its ``results.json``) is read back, a
run cut off resumes exactly from its last checkpoint, and a folder holding a run of another
config is refused. Every value's config is built and checked before the first run trains.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..display import metric_label, print_line
from ..progress import above_bars, progress_bar
from ..training import Config, ConfigError, Trainer, config_from_dict, set_config_key
from .config import TEST_METRICS, check_buildable
from .study import check_run_folder, finished_summary
from .sweep_results import SweepResult, SweepRun, write_sweep_results
from .sweep_values import check_distinct, value_folder, value_text

# Settings the sweep decides for every run.
_SET_BY_SWEEP = {
    "train.seed": "the sweep sets the seeds (its seeds argument)",
    "logging.run_dir": "the sweep sets each run's folder",
    "validation.metric": "the best-validation column would mix metrics under one name",
}


def check_sweep_key(config: Config, key: str) -> None:
    """Refuse a key that names no single setting of the training config.

    A key below ``loss.options`` or ``miner.options`` may be any option; whether the loss or
    miner has it is checked when each value's config is built.

    Raises:
        ConfigError: An unknown key (closest one suggested), a whole section, or a setting the
            sweep sets itself (the seed, the run folder).
    """
    if key in _SET_BY_SWEEP:
        raise ConfigError(f"cannot sweep {key}: {_SET_BY_SWEEP[key]}")
    values = config.to_dict()
    set_config_key(copy.deepcopy(values), key, None)
    current: Any = values
    for part in key.split("."):
        current = current.get(part) if isinstance(current, dict) else None
    if isinstance(current, dict):
        keys = ", ".join(f"{key}.{name}" for name in current) or f"{key}.<name>"
        raise ConfigError(f"{key} is a section, not a setting: sweep one of {keys}")


@dataclass(frozen=True)
class _PlannedRun:
    value: Any
    seed: int
    run_dir: Path
    config: Config


def _plan(
    config: Config, key: str, values: Sequence[Any], seeds: int, out: Path
) -> list[_PlannedRun]:
    """Every run's config, each built and checked, and its folder checked: a bad value, a
    folder of another run or a finished run without test metrics is an error before anything
    trains."""
    base = config.to_dict()
    planned = []
    for value in values:
        where = f"{key}={value_text(value)}"
        for offset in range(seeds):
            seed = config.train.seed + offset
            run_dir = out / value_folder(key, value) / f"seed-{seed}"
            settings = copy.deepcopy(base)
            try:
                set_config_key(settings, key, value)
                set_config_key(settings, "train.seed", seed)
                set_config_key(settings, "logging.run_dir", str(run_dir))
                run_config = config_from_dict(settings)
            except ConfigError as error:
                raise ConfigError(f"{where}: {error}") from None
            if offset == 0:
                check_buildable(run_config, where)
            check_run_folder(run_config, run_dir)
            finished = finished_summary(run_dir)
            if finished is not None and finished.get("after") is None:
                raise ConfigError(
                    f"{run_dir} finished without test metrics (trained without testing); "
                    "remove it to train it again"
                )
            planned.append(_PlannedRun(value, seed, run_dir, run_config))
    return planned


def run_sweep(
    config: Config,
    key: str,
    values: Sequence[Any],
    out: str | Path,
    *,
    seeds: int = 1,
    say: Callable[[str], None] = print_line,
    progress: bool = True,
) -> SweepResult:
    """Train ``config`` with ``key`` set to each value, ``seeds`` times each, and tabulate.

    Finished runs are read back rather than trained again and runs cut off resume exactly, so
    running a sweep again continues it. The tables are written by :func:`write_sweep_results`;
    each run's test metrics score its best validation checkpoint, or its final model when the
    run is not validated.

    Args:
        config: The base training config.
        key: The dotted config key to vary (``"loss.options.margin"``, ``"optimizer.lr"``).
        values: Its values (see :func:`.sweep_values.parse_values`).
        out: The sweep's folder.
        seeds: Runs per value, with seeds ``config.train.seed`` and the ones after it.
        say: Where the progress lines go (one per run).
        progress: Show a bar of the runs done (rate and time left) on stderr, the lines above
            it; each run's own training bars (``logging.progress``) show beneath it while it
            trains.

    Returns:
        The sweep's runs and their results.

    Raises:
        ValueError: No values, a value given twice, or fewer than one seed.
        ConfigError: A bad key, a value the config or its loss or miner rejects (before any
            run trains), a folder holding a run of another config, or a finished run without
            test metrics.
    """
    if not values:
        raise ValueError("a sweep needs at least one value")
    if seeds < 1:
        raise ValueError(f"seeds must be at least 1, got {seeds}")
    check_distinct(values)
    check_sweep_key(config, key)
    out = Path(out)
    planned = _plan(config, key, values, seeds, out)
    runs = []
    # Runs read back are counted from the start, so the rate and time left are the trained runs'.
    done = sum(finished_summary(run.run_dir) is not None for run in planned)
    say = above_bars(say)
    with progress_bar(
        total=len(planned), initial=done, description=f"sweep {key}", unit="run", enabled=progress
    ) as bar:
        for number, run in enumerate(planned, start=1):
            summary = finished_summary(run.run_dir)
            if summary is not None:
                how = "read back"
            else:
                resume = (run.run_dir / "last.pt").is_file()
                trained = Trainer(run.config, run.run_dir).fit(resume=resume, test=True)
                how = f"{'resumed, ' if resume else ''}{trained.steps} steps"
                summary = finished_summary(run.run_dir)
                assert summary is not None, "fit writes results.json"
                bar.update()
            after = summary["after"]
            shown = ", ".join(
                f"{metric_label(name)} {after[name]:.4f}" for name in TEST_METRICS if name in after
            )
            say(
                f"[{number}/{len(planned)}] {key}={value_text(run.value)} seed {run.seed}: "
                f"{shown} ({how})"
            )
            runs.append(SweepRun(run.value, run.seed, run.run_dir, summary))
    result = SweepResult(
        key=key,
        values=tuple(values),
        seeds=tuple(config.train.seed + offset for offset in range(seeds)),
        runs=tuple(runs),
        out=out,
        config=config,
    )
    write_sweep_results(result)
    return result
