"""Test results of the best hyperparameters: re-runs, both Reality Check readings, and tables.

Each method's best trial is trained again ``protocol.reruns`` times, every fold, each time with a
new training seed. Each re-run is scored on the test classes in two ways (the paper's
"separated" and "concatenated"):

- separated: each fold's model embeds the test classes alone; the folds' metrics are averaged;
- concatenated: the folds' L2-normalised embeddings are concatenated into one embedding
  (k × the dimension) and scored once.

A metric is then reported as the mean over the re-runs ± the half-width of its Student-t
confidence interval.
"""

from __future__ import annotations

import csv
import json
import multiprocessing
import statistics
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from optuna.trial import FrozenTrial
from torch import Tensor

from ..display import markdown_table, metric_label, print_line, short_value
from ..evaluation import evaluate
from ..progress import above_bars, progress_bar
from ..training import (
    ConfigError,
    build_run_data,
    embed_dataset,
    load_trained_model,
    resolve_device,
    save_atomic,
)
from .config import TEST_METRICS, BenchConfig
from .stats import Interval, confidence_interval
from .study import (
    Progress,
    base_seed,
    check_run_folder,
    completed,
    open_study,
    run_fold,
    target_trials,
)

READINGS = ("separated", "concatenated")


@dataclass(frozen=True)
class RerunJob:
    """One fold run of one re-run of a method's best trial."""

    method: str
    trial: int
    params: dict[str, Any]
    rerun: int
    fold: int

    def seed(self, bench: BenchConfig) -> int:
        """Re-run r trains with the base seed + 1 + r (trials use the base seed)."""
        return base_seed(bench) + 1 + self.rerun

    def run_dir(self, bench: BenchConfig) -> Path:
        """Keyed by the trial too: a later, better trial must not read these runs back."""
        return rerun_dir(bench.out, self.method, self.trial, self.rerun) / f"fold-{self.fold}"


def rerun_dir(out: Path, method: str, trial: int, rerun: int) -> Path:
    """The folder of one re-run of a trial's hyperparameters, holding a ``fold-K`` run per fold.

    Args:
        out: The benchmark's output folder.
        method: The method's name.
        trial: The trial whose hyperparameters are re-run.
        rerun: The re-run's number, from 0.
    """
    return out / "bench" / method / f"trial-{trial:04d}" / f"rerun-{rerun}"


@dataclass(frozen=True)
class MethodResult:
    """A method's test results.

    Attributes:
        method: Its name.
        description: Its one-line description.
        trials: Finished search trials.
        best_trial: The chosen trial's number.
        best_validation: Its mean validation MAP@R over the folds.
        params: Its hyperparameters.
        per_rerun: reading → metric → one value per re-run.
        summary: reading → metric → mean ± confidence interval.
    """

    method: str
    description: str
    trials: int
    best_trial: int
    best_validation: float
    params: dict[str, Any]
    per_rerun: dict[str, dict[str, list[float]]]
    summary: dict[str, dict[str, Interval]]


def _test_embeddings(bench: BenchConfig, job: RerunJob, threads: int | None = None) -> Path:
    """Train (or read back) one fold run and store its model's test embeddings."""
    if threads is not None:
        torch.set_num_threads(threads)
    run_dir = job.run_dir(bench)
    path = run_dir / "test_embeddings.pt"
    check_run_folder(bench.run_config(job.method, job.params, job.fold, job.seed(bench)), run_dir)
    if path.is_file():
        return path
    outcome = run_fold(bench, job.method, job.params, job.fold, job.seed(bench), run_dir)
    if outcome.trainer is not None:
        embeddings, labels = outcome.trainer.embed(outcome.trainer.data.test)
    else:  # finished earlier, by a process that stopped before storing its embeddings
        config, model = load_trained_model(run_dir / "best.pt")
        test = build_run_data(config.data, config.train.seed).test
        embeddings, labels = embed_dataset(
            model.to(resolve_device(config.train.device)),
            test,
            batch_size=config.train.eval_batch_size,
            device=resolve_device(config.train.device),
        )
    save_atomic({"embeddings": embeddings, "labels": torch.as_tensor(labels)}, path)
    return path


def _run_jobs(
    bench: BenchConfig, jobs: Sequence[RerunJob], workers: int, say: Progress, progress: bool
) -> None:
    pending = [job for job in jobs if not (job.run_dir(bench) / "test_embeddings.pt").is_file()]
    if not pending:
        return
    say(f"training {len(pending)} fold run(s) of the best hyperparameters ({workers} worker(s))")
    say = above_bars(say)
    with progress_bar(
        total=len(jobs),
        initial=len(jobs) - len(pending),
        description="re-runs",
        unit="run",
        enabled=progress,
    ) as bar:

        def done(number: int, job: RerunJob) -> None:
            bar.update()
            say(f"[{job.method}] re-run {job.rerun} fold {job.fold} done ({number}/{len(pending)})")

        if workers == 1:
            for number, job in enumerate(pending, 1):
                _test_embeddings(bench, job)
                done(number, job)
            return
        threads = max(1, torch.get_num_threads() // workers)
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(workers, mp_context=context) as pool:
            futures = [pool.submit(_test_embeddings, bench, job, threads) for job in pending]
            for number, (job, future) in enumerate(zip(pending, futures, strict=True), 1):
                future.result()
                done(number, job)


def _scores(embeddings: Tensor, labels: Tensor) -> dict[str, float]:
    return dict(evaluate(embeddings, labels, metrics=TEST_METRICS).metrics)


def rerun_scores(paths: Sequence[Path]) -> dict[str, dict[str, float]]:
    """Both readings of one re-run, from its folds' stored test embeddings.

    Args:
        paths: One ``test_embeddings.pt`` per fold, all of the same test items in one order.

    Returns:
        ``{"separated": metrics, "concatenated": metrics}``.
    """
    stored, labels = _stored_test_embeddings(paths)
    per_fold = [_scores(embeddings, labels) for embeddings in stored]
    separated = {m: statistics.fmean(scores[m] for scores in per_fold) for m in TEST_METRICS}
    return {"separated": separated, "concatenated": _scores(_concatenated(stored), labels)}


def _stored_test_embeddings(paths: Sequence[Path]) -> tuple[list[Tensor], Tensor]:
    stored = [torch.load(path, map_location="cpu", weights_only=True) for path in paths]
    labels = stored[0]["labels"]
    for item, path in zip(stored, paths, strict=True):
        if not torch.equal(item["labels"], labels):
            raise ValueError(f"{path}: its test items differ from the other folds'")
    return [item["embeddings"] for item in stored], labels


def _concatenated(per_fold: Sequence[Tensor]) -> Tensor:
    return torch.cat([F.normalize(embeddings.float(), dim=1) for embeddings in per_fold], dim=1)


def concatenated_test_embeddings(paths: Sequence[Path]) -> tuple[Tensor, Tensor]:
    """A re-run's test embeddings as the protocol's concatenated reading sees them.

    Args:
        paths: One ``test_embeddings.pt`` per fold, all of the same test items in one order.

    Returns:
        The folds' L2-normalised embeddings concatenated, ``(N, folds × D)``, and the labels.
    """
    stored, labels = _stored_test_embeddings(paths)
    return _concatenated(stored), labels


def best_trial_of(bench: BenchConfig, method: str) -> tuple[FrozenTrial, int]:
    """The method's best finished trial, and how many trials finished.

    Raises:
        ConfigError: The study has no finished trial (run ``dmlkit tune`` first).
    """
    study = open_study(bench, method)
    if not completed(study):
        raise ConfigError(
            f"[{method}] the study {study.study_name!r} has no finished trial; run the search "
            "first (dmlkit tune)"
        )
    return study.best_trial, len(completed(study))


def benchmark(
    bench: BenchConfig,
    methods: Sequence[str] | None = None,
    workers: int | None = None,
    say: Progress = print_line,
    progress: bool = True,
) -> list[MethodResult]:
    """Re-run each method's best trial and score it on the test classes.

    Finished fold runs are read back, so an interrupted benchmark continues where it stopped.

    Args:
        bench: The benchmark.
        methods: Which methods (all when None).
        workers: Local processes training fold runs at once (``protocol.workers`` when None).
        say: Where progress lines go.
        progress: Show a bar of the fold runs done (rate and time left) on stderr, the lines
            above it; the runs draw no bars of their own.

    Returns:
        One result per method, in order.
    """
    methods = list(methods or bench.methods)
    workers = workers or bench.protocol.workers
    chosen = {method: best_trial_of(bench, method) for method in methods}
    for method, (_, finished) in chosen.items():
        if finished < target_trials(bench, method):
            say(
                f"[{method}] warning: only {finished} of {target_trials(bench, method)} trials "
                "finished; re-running the best of those (run dmlkit tune to complete the search)"
            )
    jobs = [
        RerunJob(method, trial.number, dict(trial.params), rerun, fold)
        for method, (trial, _) in chosen.items()
        for rerun in range(bench.protocol.reruns)
        for fold in range(bench.protocol.folds)
    ]
    _run_jobs(bench, jobs, workers, say, progress)
    results = []
    for method, (trial, trials) in chosen.items():
        per_rerun: dict[str, dict[str, list[float]]] = {
            r: {m: [] for m in TEST_METRICS} for r in READINGS
        }
        for rerun in range(bench.protocol.reruns):
            paths = [
                RerunJob(method, trial.number, dict(trial.params), rerun, fold).run_dir(bench)
                / "test_embeddings.pt"
                for fold in range(bench.protocol.folds)
            ]
            for reading, scores in rerun_scores(paths).items():
                for metric, value in scores.items():
                    per_rerun[reading][metric].append(value)
        summary = {
            reading: {
                metric: confidence_interval(values, bench.protocol.confidence)
                for metric, values in metrics.items()
            }
            for reading, metrics in per_rerun.items()
        }
        results.append(
            MethodResult(
                method=method,
                description=bench.methods[method].description,
                trials=trials,
                best_trial=trial.number,
                best_validation=float(trial.values[0]),
                params=dict(trial.params),
                per_rerun=per_rerun,
                summary=summary,
            )
        )
    return results


def write_results(bench: BenchConfig, results: Sequence[MethodResult]) -> dict[str, Path]:
    """Write ``results.md``, ``results.csv`` and ``results.json`` into the output folder.

    Returns:
        The three paths by format.
    """
    out = bench.out
    out.mkdir(parents=True, exist_ok=True)
    paths = {"md": out / "results.md", "csv": out / "results.csv", "json": out / "results.json"}
    paths["md"].write_text(results_markdown(bench, results))
    with paths["csv"].open("w", newline="") as handle:
        writer = csv.writer(handle)
        header = ["method", "trials", "best_trial", "best_validation_map_at_r", "reruns"]
        for reading in READINGS:
            for metric in TEST_METRICS:
                header += [f"{reading}_{metric}", f"{reading}_{metric}_ci"]
        writer.writerow([*header, "params"])
        for result in results:
            row: list[Any] = [
                result.method,
                result.trials,
                result.best_trial,
                f"{result.best_validation:.6f}",
                bench.protocol.reruns,
            ]
            for reading in READINGS:
                for metric in TEST_METRICS:
                    interval = result.summary[reading][metric]
                    row += [f"{interval.mean:.6f}", f"{interval.half_width:.6f}"]
            writer.writerow([*row, json.dumps(result.params, sort_keys=True)])
    described = {
        "protocol": vars(bench.protocol),
        "methods": [
            {
                "method": r.method,
                "description": r.description,
                "trials": r.trials,
                "best_trial": r.best_trial,
                "best_validation": r.best_validation,
                "params": r.params,
                "per_rerun": r.per_rerun,
                "summary": {
                    reading: {
                        metric: {"mean": i.mean, "half_width": i.half_width, "n": i.n}
                        for metric, i in metrics.items()
                    }
                    for reading, metrics in r.summary.items()
                },
            }
            for r in results
        ],
    }
    paths["json"].write_text(json.dumps(described, indent=2))
    return paths


def results_markdown(bench: BenchConfig, results: Sequence[MethodResult]) -> str:
    """The results table in Markdown: one row per method, then each method's hyperparameters."""
    protocol = bench.protocol
    level = f"{protocol.confidence:.0%}"
    names = [metric_label(m) for m in TEST_METRICS]
    header = [
        "Method",
        "Val MAP@R",
        *(f"Sep. {name}" for name in names),
        *(f"Concat. {name}" for name in names),
        "Trials",
    ]
    rows = [
        [
            result.method,
            f"{result.best_validation:.4f}",
            *(str(result.summary[r][m]) for r in READINGS for m in TEST_METRICS),
            str(result.trials),
        ]
        for result in results
    ]
    lines = [
        f"Test classes, mean ± {level} confidence interval over {protocol.reruns} re-runs of the "
        f"best hyperparameters ({protocol.folds} folds each). Separated: each fold's model alone, "
        "averaged; concatenated: the folds' L2-normalised embeddings concatenated.",
        "",
        *markdown_table(header, rows),
    ]
    lines += ["", "Best hyperparameters (trial number, mean validation MAP@R over the folds):", ""]
    for result in results:
        params = ", ".join(f"`{k}`={short_value(v)}" for k, v in result.params.items())
        lines.append(
            f"- **{result.method}** ({result.description}): trial {result.best_trial}, "
            f"{result.best_validation:.4f}; {params or 'no searched parameters'}"
        )
    return "\n".join(lines) + "\n"
