"""The hyperparameter search: one Optuna study per method, trials of k fold runs each.

A trial samples the method's search space with TPE, trains one model per cross-validation fold
(each early-stopped on its validation MAP@R) and scores the mean of the folds' best validation
MAP@R. The test classes are never evaluated during the search.

Nothing is lost when a worker dies:

- Finished trials live in the study's storage (SQLite by default, or a PostgreSQL/MySQL URL).
- A running trial writes a heartbeat; a trial whose heartbeat stops for ``grace_period`` seconds
  is marked failed by the next worker that starts a trial and queued again with the same
  hyperparameters. A trial stopped with Ctrl-C is queued again when ``tune`` next starts.
- A re-queued trial runs in its original trial's folder: folds that finished are read back, and
  a fold that was cut off resumes exactly from its last checkpoint.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import multiprocessing.queues
import queue
import statistics
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy.exc
import torch
import yaml
from optuna.storages import RDBStorage, fail_stale_trials
from optuna.trial import FrozenTrial, TrialState

from ..display import print_line, short_value
from ..progress import above_bars, progress_bar
from ..training import (
    Config,
    ConfigError,
    Trainer,
    TrainResult,
    build_run_data,
    config_differences,
    config_from_dict,
)
from .config import BenchConfig

Progress = Callable[[str], None]

RUN_OF = "run_of"  # user attribute: the trial whose folder a re-queued trial continues
RETRIES = "retries"
INTERRUPTED = "interrupted"
FINGERPRINT = "fingerprint"


class TrialFailedError(RuntimeError):
    """Training at a trial's hyperparameters failed (for example NaN embeddings).

    The trial is recorded as failed and the search goes on. A ConfigError is not one: it is a
    mistake in the benchmark config and stops the search.
    """


@dataclass(frozen=True)
class FoldOutcome:
    """What one fold run reports to the protocol.

    Attributes:
        best_validation: Best validation MAP@R of the run.
        steps: Training steps done.
        stopped_early: Whether early stopping ended it.
        reused: Read back from an earlier, finished run rather than trained now.
        trainer: The trainer, holding the best model, when the run was trained now.
    """

    best_validation: float
    steps: int
    stopped_early: bool
    reused: bool
    trainer: Trainer | None


def check_run_folder(config: Config, run_dir: Path) -> None:
    """Refuse a folder that holds a different run than ``config`` describes.

    Raises:
        ConfigError: Its ``config.yaml`` differs in a setting that changes results (a folder
            left by another study or sweep, or by this one before its config changed).
    """
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        return
    changed = config_differences(yaml.safe_load(saved.read_text()) or {}, config)
    if changed:
        raise ConfigError(
            f"{run_dir} holds a different run (its config differs in {', '.join(changed)}); "
            "remove it or choose another output folder"
        )


def finished_summary(run_dir: Path) -> dict[str, Any] | None:
    """A run's results.json, or None while it has not finished (or was cut off writing it)."""
    try:
        summary = json.loads((run_dir / "results.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return summary if isinstance(summary, dict) else None


def run_fold(
    bench: BenchConfig, method: str, params: Mapping[str, Any], fold: int, seed: int, run_dir: Path
) -> FoldOutcome:
    """Train one fold's model, or read it back when that run has already finished.

    A run cut off before it finished resumes exactly from its last checkpoint. A folder holding
    a run of another config is refused, never read back.
    """
    config = bench.run_config(method, params, fold, seed, run_dir)
    check_run_folder(config, run_dir)
    summary = finished_summary(run_dir)
    if summary is not None:
        return FoldOutcome(
            summary["best_validation"], summary["steps"], summary["stopped_early"], True, None
        )
    trainer = Trainer(config, run_dir)
    result: TrainResult = trainer.fit(resume=(run_dir / "last.pt").is_file(), test=False)
    if result.best_validation is None or not math.isfinite(result.best_validation):
        raise FloatingPointError(f"{run_dir}: no finite validation MAP@R")
    return FoldOutcome(result.best_validation, result.steps, result.stopped_early, False, trainer)


_SCHEMA_ATTEMPTS = 5


def open_study(bench: BenchConfig, method: str, worker: int = 0) -> optuna.Study:
    """Create or load a method's study in the benchmark's storage.

    Raises:
        ConfigError: The stored study was made with a different base config, search space or
            folds (its trials would not be comparable); use another ``protocol.out``,
            ``protocol.storage`` or ``protocol.study_prefix``.
    """
    protocol = bench.protocol
    url = bench.storage_url
    engine: dict[str, Any] = {}
    if url.startswith("sqlite"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        # Several local workers write to one SQLite file: wait for its lock instead of failing.
        engine = {"connect_args": {"timeout": 120}}
    for attempt in range(_SCHEMA_ATTEMPTS):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                storage = RDBStorage(
                    url,
                    engine_kwargs=engine,
                    heartbeat_interval=protocol.heartbeat_interval,
                    grace_period=protocol.grace_period,
                    heartbeat_stale_trial_callback=_requeue_callback(protocol.max_retries),
                )
            break
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError):
            # Workers starting together on an empty server database race to create Optuna's
            # tables; the loser finds them made a moment later.
            if attempt == _SCHEMA_ATTEMPTS - 1:
                raise
            time.sleep(0.5 * (attempt + 1))
    study = optuna.create_study(
        study_name=bench.study_name(method),
        storage=storage,
        direction="maximize",
        load_if_exists=True,
    )
    # Seeded by the worker and by the trials already made, so that a resumed study or a second
    # worker does not draw the same random start-up points again; a fresh study is reproducible.
    made = len(study.get_trials(deepcopy=False))
    study.sampler = optuna.samplers.TPESampler(
        n_startup_trials=protocol.startup_trials,
        seed=protocol.sampler_seed + 10_000 * worker + made,
        constant_liar=True,  # workers running at once spread out instead of sampling alike
    )
    fingerprint = bench.fingerprint(method)
    stored = study.user_attrs.get(FINGERPRINT)
    if stored is None:
        study.set_user_attr(FINGERPRINT, fingerprint)
        study.set_user_attr("method", method)
    elif stored != fingerprint:
        raise ConfigError(
            f"study {study.study_name!r} in {url} was run with a different training config, "
            "search space or folds; its trials would not compare with new ones. Use another "
            "protocol.out, protocol.storage or protocol.study_prefix"
        )
    return study


def _requeue(study: optuna.Study, trial: FrozenTrial, max_retries: int) -> bool:
    """Queue a trial that did not finish again, with its hyperparameters and folder."""
    retries = int(trial.user_attrs.get(RETRIES, 0))
    if retries >= max_retries:
        return False
    study.enqueue_trial(
        trial.params,
        user_attrs={RUN_OF: run_number(trial), RETRIES: retries + 1},
        skip_if_exists=False,
    )
    return True


def _requeue_callback(max_retries: int) -> Callable[[optuna.Study, FrozenTrial], None]:
    def callback(study: optuna.Study, trial: FrozenTrial) -> None:
        _requeue(study, trial, max_retries)

    return callback


def run_number(trial: FrozenTrial | optuna.Trial) -> int:
    """The trial whose folder a trial uses: its own, or the one it continues."""
    return int(trial.user_attrs.get(RUN_OF, trial.number))


def requeue_interrupted(study: optuna.Study, max_retries: int) -> int:
    """Queue again the trials stopped with Ctrl-C whose lineage has not been continued.

    A lineage (a trial and its continuations) is continued when one of its trials has finished,
    is running or is waiting; otherwise its latest trial, if interrupted, is queued again (at
    most ``max_retries`` times per lineage).

    Returns:
        How many were queued.
    """
    lineages: dict[int, list[FrozenTrial]] = {}
    for trial in study.get_trials(deepcopy=False):
        lineages.setdefault(run_number(trial), []).append(trial)
    live = (TrialState.COMPLETE, TrialState.RUNNING, TrialState.WAITING)
    queued = 0
    for members in lineages.values():
        if any(trial.state in live for trial in members):
            continue
        latest = max(members, key=lambda trial: trial.number)
        if latest.state == TrialState.FAIL and latest.user_attrs.get(INTERRUPTED):
            queued += _requeue(study, latest, max_retries)
    return queued


def completed(study: optuna.Study) -> list[FrozenTrial]:
    """The study's finished trials."""
    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))


def trial_dir(bench: BenchConfig, method: str, number: int) -> Path:
    """The folder of a trial's fold runs."""
    return bench.out / "tune" / bench.study_name(method) / f"trial-{number:04d}"


def _objective(bench: BenchConfig, method: str, say: Progress) -> Callable[[optuna.Trial], float]:
    spec = bench.methods[method]
    folds = bench.protocol.folds
    seed = base_seed(bench)

    def objective(trial: optuna.Trial) -> float:
        params = {key: param.suggest(trial, key) for key, param in spec.search.items()}
        folder = trial_dir(bench, method, run_number(trial))
        label = f"[{method}] trial {trial.number}"
        if run_number(trial) != trial.number:
            label += f" (continues trial {run_number(trial)})"
        shown = ", ".join(
            f"{key.rsplit('.', 1)[-1]}={short_value(value)}" for key, value in params.items()
        )
        say(f"{label}: {shown or 'no searched parameters'}")
        values = []
        try:
            for fold in range(folds):
                outcome = run_fold(bench, method, params, fold, seed, folder / f"fold-{fold}")
                values.append(outcome.best_validation)
                trial.set_user_attr(f"fold_{fold}", outcome.best_validation)
                how = (
                    "read back"
                    if outcome.reused
                    else (
                        f"{outcome.steps} steps"
                        + (", stopped early" if outcome.stopped_early else "")
                    )
                )
                say(
                    f"{label} fold {fold + 1}/{folds}: validation MAP@R "
                    f"{outcome.best_validation:.4f} ({how})"
                )
        except KeyboardInterrupt:
            trial.set_user_attr(INTERRUPTED, True)
            raise
        except ConfigError:
            raise
        except (ValueError, FloatingPointError) as error:
            say(f"{label} failed: {error}")
            raise TrialFailedError(str(error)) from error
        mean = statistics.fmean(values)
        say(f"{label}: mean validation MAP@R {mean:.4f}")
        return mean

    return objective


def _check_folds(bench: BenchConfig, method: str) -> None:
    """Split the data as the first fold run will, so that impossible folds (more folds than
    training classes) are one error now rather than a failure of every trial."""
    config = bench.run_config(method, {}, 0, base_seed(bench))
    build_run_data(config.data, config.train.seed)


def base_seed(bench: BenchConfig) -> int:
    """The base training config's seed: every trial trains with it."""
    return config_from_dict(bench.training).train.seed


def target_trials(bench: BenchConfig, method: str) -> int:
    """Finished trials a method's search needs: one when nothing is searched."""
    return bench.protocol.trials if bench.methods[method].search else 1


def tune_worker(
    bench: BenchConfig,
    method: str,
    worker: int = 0,
    threads: int | None = None,
    say: Progress = print_line,
    trial_ended: Callable[[int], None] | None = None,
) -> None:
    """One worker's share of a method's search: trials until the study has enough finished.

    Several workers, in this process's children or on other machines sharing the storage, may
    run at once. A worker starts a trial only while finished and running trials together fall
    short of ``protocol.trials`` (or a trial waits to be continued); otherwise it waits for the
    running ones, which finish or, if their worker died, are queued again after the grace
    period. The study so ends with that many finished trials (rarely one more, when two workers
    find it one short at the same instant). A worker also stops after twice that many attempts
    of its own, so a search whose every trial fails ends.

    Args:
        bench: The benchmark.
        method: A key of ``bench.methods``.
        worker: The worker's number (seeds its sampler).
        threads: CPU threads of this process (unchanged when None).
        say: Where progress lines go.
        trial_ended: Called after each of its trials with the study's finished trials.
    """
    if threads is not None:
        torch.set_num_threads(threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = open_study(bench, method, worker)
    target = target_trials(bench, method)
    objective = _objective(bench, method, say)
    attempts = 0
    while attempts < 2 * target:
        with warnings.catch_warnings():  # heartbeats are "experimental" since Optuna 2.9
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            fail_stale_trials(study)  # a killed worker's trial is failed and queued again first
        states = [trial.state for trial in study.get_trials(deepcopy=False)]
        done = states.count(TrialState.COMPLETE)
        if done >= target:
            return
        if done + states.count(TrialState.RUNNING) >= target and TrialState.WAITING not in states:
            # The running trials decide: they finish, or their worker died and they are queued
            # again once their heartbeat is older than the grace period.
            time.sleep(bench.protocol.heartbeat_interval)
            continue
        study.optimize(objective, n_trials=1, catch=(TrialFailedError,))
        attempts += 1
        if trial_ended is not None:
            trial_ended(len(completed(study)))
    finished = len(completed(study))
    say(f"[{method}] stopping after {attempts} attempts: {finished} of {target} trials finished")


def _worker_entry(
    bench: BenchConfig,
    method: str,
    worker: int,
    threads: int,
    lines: multiprocessing.queues.Queue[str],
) -> None:
    def say(message: str) -> None:
        lines.put(f"w{worker} {message}")

    tune_worker(bench, method, worker, threads, say)


def _relay(
    processes: Sequence[multiprocessing.process.BaseProcess],
    lines: multiprocessing.queues.Queue[str],
    say: Progress,
    tick: Callable[[], None],
) -> None:
    """Pass the workers' lines to ``say`` until every worker has ended, so that one process
    prints them (above its progress bar), calling ``tick`` after each and every half second."""
    while True:
        running = any(process.is_alive() for process in processes)
        try:
            # Once all have ended, their lines are all in the queue: empty means done.
            message = lines.get(timeout=0.5) if running else lines.get_nowait()
        except queue.Empty:
            tick()
            if running:
                continue
            return
        say(message)
        tick()


def tune(
    bench: BenchConfig,
    method: str,
    workers: int | None = None,
    say: Progress = print_line,
    progress: bool = True,
) -> optuna.Study:
    """Run (or continue) a method's search to ``protocol.trials`` finished trials.

    Args:
        bench: The benchmark.
        method: A key of ``bench.methods``.
        workers: Local worker processes (``protocol.workers`` when None); the CPU threads are
            shared out between them.
        say: Where progress lines go (the workers' too: this process prints them all).
        progress: Show a bar of the finished trials (rate and time left) on stderr, the lines
            above it; the trials' training runs draw no bars of their own.

    Returns:
        The study, loaded again after the workers have finished.
    """
    workers = workers or bench.protocol.workers
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = open_study(bench, method)
    queued = requeue_interrupted(study, bench.protocol.max_retries)
    done = len(completed(study))
    target = target_trials(bench, method)
    say(
        f"[{method}] study {study.study_name!r} in {bench.storage_url}: {done}/{target} trials "
        f"finished" + (f", {queued} interrupted trial(s) queued again" if queued else "")
    )
    if done >= target:
        return study
    _check_folds(bench, method)
    if not bench.methods[method].search:
        say(f"[{method}] nothing to search: one trial scores the fixed hyperparameters")
    say = above_bars(say)
    with progress_bar(
        total=target, initial=done, description=f"tune {method}", unit="trial", enabled=progress
    ) as bar:

        def trials_finished(count: int) -> None:
            # Only on a change: each update restarts the interval the rate is measured over.
            if min(count, target) > bar.n:
                bar.update(min(count, target) - bar.n)

        if workers == 1:
            tune_worker(bench, method, 0, None, say, trials_finished)
        else:
            threads = max(1, torch.get_num_threads() // workers)
            context = multiprocessing.get_context("spawn")
            lines: multiprocessing.queues.Queue[str] = context.Queue()
            processes = [
                context.Process(target=_worker_entry, args=(bench, method, worker, threads, lines))
                for worker in range(workers)
            ]
            for process in processes:
                process.start()
            _relay(processes, lines, say, lambda: trials_finished(len(completed(study))))
            for process in processes:
                process.join()
            failed = [p.exitcode for p in processes if p.exitcode != 0]
            if failed:
                raise RuntimeError(f"[{method}] {len(failed)} tuning worker(s) failed: {failed}")
    study = open_study(bench, method)
    best = study.best_trial if completed(study) else None
    if best is not None:
        say(
            f"[{method}] {len(completed(study))} trials finished; best mean validation MAP@R "
            f"{best.value:.4f} (trial {best.number})"
        )
    return study
