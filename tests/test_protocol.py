"""The Reality Check protocol on digits: class-disjoint cross-validation folds, confidence
intervals, a study that loses nothing to a killed worker or Ctrl-C, local workers sharing one
study, both test readings, ``dmlkit tune`` / ``dmlkit bench`` end to end, and config errors."""

from __future__ import annotations

import csv
import json
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
import torch.nn.functional as F
import yaml
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial
from scipy import stats as scipy_stats

from dmlkit.cli import main
from dmlkit.data import class_kfold, digits
from dmlkit.evaluation import evaluate
from dmlkit.protocol import (
    TEST_METRICS,
    bench_config_from_dict,
    confidence_interval,
    load_bench_config,
    open_study,
    rerun_scores,
    run_fold,
    trial_dir,
    tune,
)
from dmlkit.protocol import study as study_module
from dmlkit.protocol.config import PRESETS_DIR
from dmlkit.protocol.study import base_seed, requeue_interrupted
from dmlkit.training import ConfigError, Trainer, build_run_data, load_config
from run_helpers import DIGITS_RUN, StopTrainingError, log_without_timing, stop_at

ROOT = Path(__file__).resolve().parents[1]
METHOD = "contrastive"
TRAIN_DIGITS = set(range(5))
TEST_DIGITS = set(range(5, 10))
# About a second per fold run: one epoch of digits, validated at its end.
FAST = ["training.train.epochs=1", "training.validation.every=1"]
# Half a second: 3 steps, then the final validation.
TINY = [*FAST, "training.train.max_steps=3"]
PNG = b"\x89PNG\r\n\x1a\n"


def _sets(overrides: list[str]) -> list[str]:
    return [arg for override in overrides for arg in ("--set", override)]


def _classes(dataset) -> set[int]:  # type: ignore[no-untyped-def]
    return {int(label) for label in np.unique(dataset.labels)}


def _load_study(out: Path, method: str = METHOD) -> optuna.Study:
    return optuna.load_study(study_name=method, storage=f"sqlite:///{out / 'study.db'}")


def _base(**methods: object) -> dict[str, object]:
    """A small benchmark config as a mapping, with the given methods."""
    return {
        "training": {"data": {"name": "digits"}, "validation": {"every": 1}},
        "protocol": {"folds": 2},
        "methods": methods or {METHOD: {}},
    }


# ---------------------------------------------------------------- splits


@pytest.mark.parametrize("folds", [2, 3, 4, 5])
def test_cv_folds_split_the_training_digits_class_disjointly(folds: int) -> None:
    train_labels = digits("train").labels
    validated: list[set[int]] = []
    for fold in range(folds):
        config = load_config(
            None, [*DIGITS_RUN, f"data.cv_folds={folds}", f"data.cv_fold={fold}", "data.cv_seed=3"]
        )
        run = build_run_data(config.data, seed=0)
        assert run.val is not None
        train, val, test = _classes(run.train), _classes(run.val), _classes(run.test)
        assert train.isdisjoint(val) and train.isdisjoint(test) and val.isdisjoint(test)
        assert train | val == TRAIN_DIGITS
        assert test == TEST_DIGITS
        assert _classes(run.train_eval) == train
        assert len(run.train) + len(run.val) == len(train_labels)
        assert val == {int(c) for c in class_kfold(train_labels, folds, 3)[fold].val_classes}
        # The training seed does not move the folds.
        assert _classes(build_run_data(config.data, seed=11).val) == val
        validated.append(val)
    every = sorted(c for val in validated for c in val)
    assert every == sorted(TRAIN_DIGITS)  # each training digit validated in exactly one fold
    sizes = [len(val) for val in validated]
    assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("folds", [2, 5])
def test_bench_run_configs_hold_out_one_fold_each(folds: int) -> None:
    bench = load_bench_config("digits", [f"protocol.folds={folds}", "protocol.fold_seed=1"])
    validated = []
    for fold in range(folds):
        config = bench.run_config(METHOD, {"loss.options.pos_margin": 0.3}, fold, seed=fold + 7)
        assert (config.data.cv_folds, config.data.cv_fold, config.data.cv_seed) == (folds, fold, 1)
        assert config.data.val_classes == 0
        assert config.validation.metric == "mean_average_precision_at_r"
        assert config.validation.patience == bench.protocol.patience
        assert config.validation.before_training is False
        assert config.train.seed == fold + 7
        assert config.loss.options["pos_margin"] == 0.3
        run = build_run_data(config.data, config.train.seed)
        train, val, test = _classes(run.train), _classes(run.val), _classes(run.test)
        assert train.isdisjoint(val) and (train | val).isdisjoint(test)
        assert train | val == TRAIN_DIGITS and test == TEST_DIGITS
        validated.append(val)
    assert sorted(c for val in validated for c in val) == sorted(TRAIN_DIGITS)
    # Another fold seed deals the digits into other folds (2 folds, seed 1: 0, 1, 4 | 2, 3;
    # seed 0: 2, 3, 4 | 0, 1).
    other = load_bench_config("digits", [f"protocol.folds={folds}", "protocol.fold_seed=0"])
    moved = [
        _classes(build_run_data(other.run_config(METHOD, {}, fold, 0).data).val)
        for fold in range(folds)
    ]
    assert moved != validated


def test_cv_settings_are_config_errors() -> None:
    for overrides, message in [
        (["data.cv_folds=1"], "data.cv_folds must be 0 or at least 2, got 1"),
        (["data.cv_folds=3", "data.cv_fold=3"], "data.cv_fold must be below data.cv_folds (3)"),
        (["data.cv_folds=2", "data.cv_fold=-1"], "data.cv_fold must be at least 0"),
        (["data.cv_folds=2", "data.val_classes=0.4"], "both choose validation classes"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_config(None, overrides)
    # 5 training digits make at most 5 folds.
    too_many = load_config(None, [*DIGITS_RUN, "data.cv_folds=6"])
    with pytest.raises(ConfigError, match=r"exceeds the number of classes \(5\)"):
        build_run_data(too_many.data)


# ---------------------------------------------------------------- confidence intervals


def test_confidence_interval_of_a_known_sample() -> None:
    values = [1.0, 2.0, 3.0, 4.0, 5.0]
    interval = confidence_interval(values)
    assert interval.mean == 3.0 and interval.n == 5
    # t(0.975, 4 degrees of freedom) = 2.776445105; the sample standard deviation is √2.5.
    assert interval.half_width == pytest.approx(2.776445105 * math.sqrt(2.5) / math.sqrt(5))
    assert interval.half_width == pytest.approx(1.96324, abs=1e-5)
    low, high = scipy_stats.t.interval(0.95, 4, loc=3.0, scale=scipy_stats.sem(values))
    assert (interval.mean - interval.half_width, interval.mean + interval.half_width) == (
        pytest.approx(low),
        pytest.approx(high),
    )
    assert str(interval) == "3.0000 ± 1.9632"
    ninety = confidence_interval(values, level=0.9)
    assert ninety.mean == 3.0 and 0 < ninety.half_width < interval.half_width
    assert confidence_interval(values, level=0.99).half_width > interval.half_width
    # Shifting the sample moves only the mean; scaling it scales the half-width.
    shifted = confidence_interval([v + 10 for v in values])
    assert shifted.mean == 13.0 and shifted.half_width == pytest.approx(interval.half_width)
    assert confidence_interval([2 * v for v in values]).half_width == pytest.approx(
        2 * interval.half_width
    )


def test_confidence_interval_of_one_value_and_bad_input() -> None:
    single = confidence_interval([0.7])
    assert single.mean == 0.7 and single.n == 1 and math.isnan(single.half_width)
    assert str(single) == "0.7000"
    assert confidence_interval([0.5, 0.5]).half_width == 0.0
    for values, level, message in [
        ([], 0.95, "at least one value"),
        ([1.0, math.nan], 0.95, "non-finite"),
        ([1.0, math.inf], 0.95, "non-finite"),
        ([1.0, 2.0], 0.0, "level must be in"),
        ([1.0, 2.0], 1.0, "level must be in"),
        ([1.0, 2.0], 1.5, "level must be in"),
    ]:
        with pytest.raises(ValueError, match=message):
            confidence_interval(values, level)


# ---------------------------------------------------------------- resumable search


def test_tune_resumes_after_a_killed_worker_without_losing_anything(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """SIGKILL a ``dmlkit tune`` in the middle of a trial's second fold, then run it again."""
    out = tmp_path / "bench"
    grace = 2
    overrides = [
        *FAST,
        "training.logging.log_every=1",
        "training.train.checkpoint_every=2",
        "protocol.heartbeat_interval=1",
        f"protocol.grace_period={grace}",
    ]
    args = ["tune", "digits", "--method", METHOD, "--out", str(out), "--trials", "3"]
    args += _sets(overrides)
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    folder = out / "tune" / METHOD

    def cut_in_second_fold(trial: optuna.trial.FrozenTrial) -> bool:
        runs = folder / f"trial-{trial.number:04d}"
        return (
            trial.state == TrialState.RUNNING
            and (runs / "fold-0" / "results.json").is_file()
            and (runs / "fold-1" / "last.pt").is_file()
            and not (runs / "fold-1" / "results.json").exists()
        )

    with (tmp_path / "stderr.txt").open("w") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "dmlkit.cli", *args],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            start_new_session=True,
        )
        try:
            study = None
            deadline = time.monotonic() + 180
            while process.poll() is None:
                assert time.monotonic() < deadline, "no trial reached its second fold in time"
                if study is None and (folder / "trial-0000").is_dir():
                    study = _load_study(out)
                if study is not None:
                    trials = study.get_trials()
                    if any(t.state == TrialState.COMPLETE for t in trials) and any(
                        cut_in_second_fold(t) for t in trials
                    ):
                        break
                time.sleep(0.02)
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    if process.returncode == 0:
        pytest.skip("the search finished before it could be killed; nothing to resume")
    assert process.returncode == -signal.SIGKILL, (tmp_path / "stderr.txt").read_text()

    before = _load_study(out).get_trials()
    finished = {t.number: t for t in before if t.state == TrialState.COMPLETE}
    (killed,) = [t for t in before if t.state == TrialState.RUNNING]
    assert finished and set(killed.user_attrs) == {"fold_0"}
    bench = load_bench_config("digits", [*overrides, f"protocol.out={out}", "protocol.trials=3"])
    killed_dir = trial_dir(bench, METHOD, killed.number)
    fold_0 = killed_dir / "fold-0" / "results.json"
    fold_0_stamp, fold_0_text = fold_0.stat().st_mtime_ns, fold_0.read_text()

    time.sleep(grace + 0.5)  # the killed worker's heartbeat is now stale
    capsys.readouterr()
    assert main(args) == 0
    printed = capsys.readouterr().out

    after = {t.number: t for t in _load_study(out).get_trials()}
    for number, trial in finished.items():  # finished trials are untouched
        assert after[number].state == TrialState.COMPLETE
        assert after[number].params == trial.params
        assert after[number].value == trial.value
        assert after[number].user_attrs == trial.user_attrs
    complete = [t for t in after.values() if t.state == TrialState.COMPLETE]
    assert len(complete) == 3
    assert after[killed.number].state == TrialState.FAIL
    (continued,) = [t for t in after.values() if t.user_attrs.get("run_of") == killed.number]
    assert continued.state == TrialState.COMPLETE
    assert continued.params == killed.params
    assert not trial_dir(bench, METHOD, continued.number).exists()  # it used the killed trial's
    # Fold 0 was read back, not trained again.
    assert fold_0.stat().st_mtime_ns == fold_0_stamp and fold_0.read_text() == fold_0_text
    assert continued.user_attrs["fold_0"] == killed.user_attrs["fold_0"]
    assert f"(continues trial {killed.number}) fold 1/2: validation MAP@R" in printed
    assert "(read back)" in printed
    assert json.loads((killed_dir / "fold-1" / "results.json").read_text())["after"] is None

    # The resumed fold is the fold an uninterrupted run trains.
    whole = run_fold(bench, METHOD, killed.params, 1, base_seed(bench), tmp_path / "whole")
    resumed = json.loads((killed_dir / "fold-1" / "results.json").read_text())
    assert resumed["best_validation"] == whole.best_validation == continued.user_attrs["fold_1"]
    assert resumed["steps"] == whole.steps
    assert continued.value == pytest.approx(
        statistics.fmean([continued.user_attrs["fold_0"], whole.best_validation])
    )
    assert log_without_timing(killed_dir / "fold-1" / "train.csv") == log_without_timing(
        tmp_path / "whole" / "train.csv"
    )


def _float_trial(state: TrialState, margin: float, **attrs: object) -> optuna.trial.FrozenTrial:
    return create_trial(
        state=state,
        value=0.5 if state == TrialState.COMPLETE else None,
        params={"loss.options.margin": margin},
        distributions={"loss.options.margin": FloatDistribution(-0.2, 2.0)},
        user_attrs=attrs,
    )


def _interrupted_study() -> optuna.Study:
    """Trial 0 finished, trial 1 stopped with Ctrl-C after its first fold, trial 2 failed."""
    study = optuna.create_study(direction="maximize")
    study.add_trial(_float_trial(TrialState.COMPLETE, 0.1))
    study.add_trial(_float_trial(TrialState.FAIL, 0.7, interrupted=True, fold_0=0.4))
    study.add_trial(_float_trial(TrialState.FAIL, 1.3))  # failed by itself: not queued
    return study


def _interrupt_next(study: optuna.Study) -> optuna.Trial:
    """Start the next trial and stop it with Ctrl-C, as the objective records it."""
    trial = study.ask()
    trial.suggest_float("loss.options.margin", -0.2, 2.0)
    trial.set_user_attr("interrupted", True)
    study.tell(trial, state=TrialState.FAIL)
    return trial


def test_a_trial_stopped_by_ctrl_c_is_queued_again_once() -> None:
    study = _interrupted_study()
    assert requeue_interrupted(study, max_retries=2) == 1
    assert requeue_interrupted(study, max_retries=2) == 0  # already queued
    (waiting,) = study.get_trials(states=(TrialState.WAITING,))
    assert waiting.user_attrs == {"run_of": 1, "retries": 1}
    trial = study.ask()  # the queued trial comes first, with the interrupted one's value
    assert trial.number == waiting.number == 3
    assert trial.suggest_float("loss.options.margin", -0.2, 2.0) == 0.7
    study.tell(trial, 0.6)
    assert requeue_interrupted(study, max_retries=2) == 0  # continued: nothing more to queue
    assert not study.get_trials(states=(TrialState.WAITING,))
    assert requeue_interrupted(_interrupted_study(), max_retries=0) == 0


def test_a_trial_stopped_by_ctrl_c_twice_is_queued_again_up_to_max_retries() -> None:
    study = _interrupted_study()
    assert requeue_interrupted(study, max_retries=2) == 1
    assert _interrupt_next(study).params == {"loss.options.margin": 0.7}
    assert requeue_interrupted(study, max_retries=2) == 1
    (again,) = study.get_trials(states=(TrialState.WAITING,))
    assert again.user_attrs == {"run_of": 1, "retries": 2}  # still the first trial's folder
    _interrupt_next(study)
    assert requeue_interrupted(study, max_retries=2) == 0  # out of retries


def test_ctrl_c_during_a_trial_continues_it_in_its_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bench = load_bench_config("digits", [*TINY, "protocol.trials=1", f"protocol.out={tmp_path}"])
    real_run_fold = study_module.run_fold

    def interrupted_in_fold_1(*args, **kwargs):  # type: ignore[no-untyped-def]
        if args[3] == 1:
            raise KeyboardInterrupt
        return real_run_fold(*args, **kwargs)

    monkeypatch.setattr(study_module, "run_fold", interrupted_in_fold_1)
    with pytest.raises(KeyboardInterrupt):
        tune(bench, METHOD, say=lambda _: None)
    monkeypatch.setattr(study_module, "run_fold", real_run_fold)
    (stopped,) = _load_study(tmp_path).get_trials()
    assert stopped.state == TrialState.FAIL and stopped.user_attrs["interrupted"] is True
    fold_0 = trial_dir(bench, METHOD, 0) / "fold-0" / "results.json"
    stamp = fold_0.stat().st_mtime_ns

    lines: list[str] = []
    study = tune(bench, METHOD, say=lines.append)
    assert "1 interrupted trial(s) queued again" in lines[0]
    (done,) = study.get_trials(states=(TrialState.COMPLETE,))
    assert done.user_attrs["run_of"] == 0 and done.params == stopped.params
    assert done.user_attrs["fold_0"] == stopped.user_attrs["fold_0"]
    assert fold_0.stat().st_mtime_ns == stamp
    assert (trial_dir(bench, METHOD, 0) / "fold-1" / "results.json").is_file()
    assert not trial_dir(bench, METHOD, done.number).exists()


def test_local_workers_share_one_study(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    args = ["tune", "digits", "--method", METHOD, "--workers", "2", "--trials", "3"]
    assert main([*args, "--out", str(tmp_path), *_sets(TINY)]) == 0
    trials = _load_study(tmp_path).get_trials()
    assert all(t.state == TrialState.COMPLETE for t in trials)
    # Exactly 3, unless both workers found the study one short at the same instant (documented).
    assert len(trials) in (3, 4)
    assert len({t.number for t in trials}) == len(trials)
    # Each worker samples with its own seed: no hyperparameters are tried twice.
    assert len({tuple(sorted(t.params.items())) for t in trials}) == len(trials)
    bench = load_bench_config("digits", [f"protocol.out={tmp_path}"])
    for trial in trials:
        for fold in range(2):
            results = trial_dir(bench, METHOD, trial.number) / f"fold-{fold}" / "results.json"
            assert (
                json.loads(results.read_text())["best_validation"]
                == trial.user_attrs[f"fold_{fold}"]
            )
    printed = capfd.readouterr().out
    assert f"w0 [{METHOD}] trial" in printed and f"w1 [{METHOD}] trial" in printed


# ---------------------------------------------------------------- test readings


def _store(path: Path, embeddings: torch.Tensor, labels: torch.Tensor) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"embeddings": embeddings, "labels": labels}, path)
    return path


def _scores(embeddings: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    return dict(evaluate(embeddings, labels, metrics=TEST_METRICS).metrics)


def test_rerun_scores_separated_and_concatenated(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(5).repeat_interleave(6)
    centres = torch.randn(5, 8, generator=gen)
    a = F.normalize(centres[labels] + 0.9 * torch.randn(30, 8, generator=gen), dim=1)
    b = F.normalize(centres[labels] + 0.9 * torch.randn(30, 8, generator=gen), dim=1)
    fold_a = _store(tmp_path / "a.pt", a, labels)
    fold_b = _store(tmp_path / "b.pt", b, labels)
    scores = rerun_scores([fold_a, fold_b])
    per_fold = [_scores(a, labels), _scores(b, labels)]
    joined = _scores(torch.cat([a, b], dim=1), labels)
    assert set(scores) == {"separated", "concatenated"}
    for metric in TEST_METRICS:
        assert 0 < per_fold[0][metric] < 1  # neither trivial nor perfect
        assert scores["separated"][metric] == pytest.approx(
            (per_fold[0][metric] + per_fold[1][metric]) / 2
        )
        assert scores["concatenated"][metric] == pytest.approx(joined[metric])
    # Folds are L2-normalised before they are joined: a fold's scale does not weigh more.
    scaled = rerun_scores([_store(tmp_path / "a10.pt", 10 * a, labels), fold_b])
    assert scaled["concatenated"] == pytest.approx(scores["concatenated"])
    # Two identical folds read like one.
    same = rerun_scores([fold_a, _store(tmp_path / "a_copy.pt", a.clone(), labels)])
    assert same["concatenated"] == pytest.approx(per_fold[0])
    assert same["separated"] == pytest.approx(per_fold[0])
    shuffled = _store(tmp_path / "c.pt", b, labels.flip(0))
    with pytest.raises(ValueError, match=r"c\.pt: its test items differ"):
        rerun_scores([fold_a, shuffled])


def test_bench_end_to_end_and_again_without_training(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    reruns = 2
    args = ["bench", "digits", "--out", str(tmp_path), "--trials", "2"]
    args += _sets([*TINY, f"protocol.reruns={reruns}"])
    assert main(args) == 0
    first = capsys.readouterr().out
    bench = load_bench_config("digits", [*TINY, f"protocol.out={tmp_path}"])
    methods = list(bench.methods)
    assert methods == ["contrastive", "multi_similarity_miner"]

    with (tmp_path / "results.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    columns = ["method", "trials", "best_trial", "best_validation_map_at_r", "reruns"]
    for reading in ("separated", "concatenated"):
        for metric in TEST_METRICS:
            columns += [f"{reading}_{metric}", f"{reading}_{metric}_ci"]
    assert list(rows[0]) == [*columns, "params"]
    assert [row["method"] for row in rows] == methods
    described = json.loads((tmp_path / "results.json").read_text())
    assert described["protocol"]["reruns"] == reruns
    markdown = (tmp_path / "results.md").read_text()
    for row, result in zip(rows, described["methods"], strict=True):
        method = row["method"]
        study = _load_study(tmp_path, method)
        assert result["method"] == method and int(row["trials"]) == result["trials"] == 2
        assert int(row["best_trial"]) == result["best_trial"] == study.best_trial.number
        assert result["best_validation"] == study.best_value
        assert result["params"] == study.best_trial.params == json.loads(row["params"])
        assert set(result["params"]) == set(bench.methods[method].search)
        table_row = next(line for line in markdown.splitlines() if line.startswith(f"| {method} |"))
        assert table_row.count("±") == 6
        for reading, metrics in result["per_rerun"].items():
            for metric, values in metrics.items():
                assert len(values) == reruns
                interval = confidence_interval(values)
                summary = result["summary"][reading][metric]
                assert summary["mean"] == pytest.approx(interval.mean)
                assert summary["half_width"] == pytest.approx(interval.half_width)
                assert float(row[f"{reading}_{metric}"]) == pytest.approx(interval.mean, abs=1e-6)
        assert (tmp_path / "plots" / f"{method}_history.png").read_bytes()[:8] == PNG
        # The reported numbers are those of the stored test embeddings of each re-run.
        for rerun in range(reruns):
            trial = f"trial-{result['best_trial']:04d}"
            folds = tmp_path / "bench" / method / trial / f"rerun-{rerun}"
            paths = [folds / f"fold-{fold}" / "test_embeddings.pt" for fold in range(2)]
            scores = rerun_scores(paths)
            for reading, metrics in scores.items():
                for metric, value in metrics.items():
                    assert result["per_rerun"][reading][metric][rerun] == pytest.approx(value)
            stored = torch.load(paths[0], weights_only=True)
            assert set(stored["labels"].tolist()) == TEST_DIGITS
            for fold in range(2):
                config = yaml.safe_load((folds / f"fold-{fold}" / "config.yaml").read_text())
                assert config["train"]["seed"] == base_seed(bench) + 1 + rerun
                assert config["data"]["cv_fold"] == fold
        # Re-runs train with new seeds: their test numbers differ.
        separated = result["per_rerun"]["separated"]["mean_average_precision_at_r"]
        assert len(set(separated)) == reruns
    assert "±" in markdown and "| Method |" in markdown

    # The search never looked at the test classes.
    tune_results = sorted((tmp_path / "tune").glob("*/trial-*/fold-*/results.json"))
    assert len(tune_results) == 2 * 2 * 2  # methods × trials × folds
    assert all(json.loads(path.read_text())["after"] is None for path in tune_results)
    assert "training 8 fold run(s)" in first

    written = sorted(tmp_path.glob("**/*.pt")) + tune_results
    stamps = {path: path.stat().st_mtime_ns for path in written}
    results_json = (tmp_path / "results.json").read_text()
    assert main(args) == 0
    again = capsys.readouterr().out
    assert "fold run(s)" not in again and "trial 0:" not in again
    assert {path: path.stat().st_mtime_ns for path in written} == stamps
    assert sorted(tmp_path.glob("**/*.pt")) + tune_results == written
    assert (tmp_path / "results.json").read_text() == results_json


# ---------------------------------------------------------------- config errors


def test_bench_config_errors_name_the_key() -> None:
    search = {"loss.options.pos_margin": {"low": 0.0, "high": 1.0}}
    custom = {"config": {"loss": {"name": "ContrastiveLoss"}}, "search": search}
    cases = [
        ({**_base(), "protcol": {}}, "unknown key 'protcol'; did you mean 'protocol'?"),
        ({**_base(), "protocol": {"trails": 3}}, "unknown key 'protocol.trails'"),
        ({**_base(), "protocol": {"folds": 1}}, "protocol.folds must be at least 2"),
        (
            {**_base(), "protocol": {"heartbeat_interval": 5, "grace_period": 5}},
            "grace_period must exceed protocol.heartbeat_interval",
        ),
        (
            _base(mine={**custom, "search": {"train.seed": {"low": 0, "high": 9}}}),
            "train.seed is set by the protocol",
        ),
        (
            _base(mine={**custom, "search": {"data.cv_fold": {"low": 0, "high": 1}}}),
            "data.cv_fold is set by the protocol",
        ),
        (
            _base(mine={**custom, "search": {"optimizer.lr": {"low": 1.0, "high": 0.5}}}),
            "low (1.0) must be below high (0.5)",
        ),
        (
            _base(
                mine={**custom, "search": {"optimizer.lr": {"low": 0.0, "high": 1.0, "log": True}}}
            ),
            "a log-scale range needs low > 0",
        ),
        (
            _base(mine={**custom, "search": {"optimizer.lr": {"low": 0.1}}}),
            "low and high are required",
        ),
        (
            _base(mine={**custom, "search": {"optimizer.lr": {"lo": 0.1, "high": 1.0}}}),
            "did you mean 'low'?",
        ),
        (
            _base(mine={**custom, "search": {"optimizer.lrr": {"low": 0.1, "high": 1.0}}}),
            "methods.mine: unknown key 'optimizer.lrr'",
        ),
        (_base(mine={"config": {"optimizer": {"lr": -1.0}}}), "methods.mine: optimizer.lr must be"),
        (_base(mystery={}), "methods.mystery: not a built-in method"),
        (_base(mine={"preset": "nope"}), "methods.mine.preset: unknown method 'nope'"),
        (_base(contrastive={"serch": search}), "unknown key 'methods.contrastive.serch'"),
        ({**_base(), "methods": {}}, "name at least one method"),
    ]
    for values, message in cases:
        with pytest.raises(ConfigError, match=re.escape(message)):
            bench_config_from_dict(values)
    bench = bench_config_from_dict(_base(mine=custom))  # the same method, declared in full
    assert bench.methods["mine"].search["loss.options.pos_margin"].high == 1.0
    for overrides, message in [
        (["protocol.trails=3"], "unknown key 'protocol.trails'"),
        (["optimizer.lr=0.1"], "expected protocol.KEY=VALUE or training.KEY=VALUE"),
        (["training.optimizer.lrr=0.1"], "unknown key 'optimizer.lrr'"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_bench_config("digits", overrides)
    with pytest.raises(FileNotFoundError, match="neither a file nor a built-in benchmark"):
        load_bench_config("no-such-benchmark")


def test_fingerprint_follows_what_trials_mean() -> None:
    reference = load_bench_config("digits").fingerprint(METHOD)

    def fingerprint(override: str) -> str:
        return load_bench_config("digits", [override]).fingerprint(METHOD)

    for override in [
        "protocol.workers=2",
        "protocol.trials=9",
        "protocol.reruns=5",
        "training.train.eval_batch_size=64",
        "training.logging.log_every=3",
    ]:
        assert fingerprint(override) == reference, override
    for override in [
        "protocol.folds=3",
        "protocol.fold_seed=1",
        "protocol.patience=5",
        "training.optimizer.lr=0.01",
    ]:
        assert fingerprint(override) != reference, override


def test_cli_refuses_bad_configs_and_a_changed_search_space(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = ["--out", str(tmp_path)]
    for argv, message in [
        (["tune", "digits", "--set", "protocol.trails=3", *out], "unknown key 'protocol.trails'"),
        (["bench", "digits", "--method", "nope", *out], "--method nope: not in the config"),
        (["tune", str(tmp_path / "missing.yaml"), *out], "missing.yaml"),
        (["tune", "digits", "--trials", "0", *out], "protocol.trials must be at least 1"),
    ]:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"dmlkit {argv[0]}: error: ") and message in err
        assert err.count("\n") == 1
    assert not (tmp_path / "study.db").exists()

    bench = load_bench_config("digits", [f"protocol.out={tmp_path}"])
    open_study(bench, METHOD)  # the study now records what its trials mean
    open_study(bench, METHOD)  # the same config opens it again
    narrower = yaml.safe_load((PRESETS_DIR / "digits.yaml").read_text())
    narrower["methods"] = {
        METHOD: {"search": {"loss.options.pos_margin": {"low": 0.0, "high": 1.0}}}
    }
    path = tmp_path / "narrower.yaml"
    path.write_text(yaml.safe_dump(narrower))
    capsys.readouterr()
    with pytest.raises(ConfigError, match="different training config, search space or folds"):
        open_study(load_bench_config(path, [f"protocol.out={tmp_path}"]), METHOD)
    assert main(["tune", str(path), *out]) == 2
    err = capsys.readouterr().err
    assert "different training config, search space or folds" in err and err.count("\n") == 1
    assert not (tmp_path / "tune").exists()  # nothing was trained
    # Another study prefix keeps both studies in the same storage.
    assert (
        open_study(
            load_bench_config(path, [f"protocol.out={tmp_path}", "protocol.study_prefix=narrow-"]),
            METHOD,
        ).study_name
        == "narrow-contrastive"
    )


# ---------------------------------------------------------------- fixed bugs


def test_a_resumed_study_samples_new_hyperparameters(tmp_path: Path) -> None:
    bench = load_bench_config("digits", [f"protocol.out={tmp_path}"])
    search = bench.methods[METHOD].search

    def objective(trial: optuna.Trial) -> float:
        for key, param in search.items():
            param.suggest(trial, key)
        return 0.5

    for _ in range(2):  # two `dmlkit tune` sessions, one trial each
        open_study(bench, METHOD).optimize(objective, n_trials=1)
    first, second = _load_study(tmp_path).get_trials()
    assert first.params != second.params


def test_a_fold_restarted_before_its_first_checkpoint_logs_each_step_once(tmp_path: Path) -> None:
    bench = load_bench_config("digits", [*FAST, "training.logging.log_every=1"])
    params = {"loss.options.pos_margin": 0.5, "loss.options.neg_margin": 1.0}
    run_dir = tmp_path / "fold-1"
    config = bench.run_config(METHOD, params, 1, 0, run_dir)
    with pytest.raises(StopTrainingError):
        Trainer(config, run_dir, callbacks=[stop_at(3)]).fit(test=False)
    assert not (run_dir / "last.pt").exists()
    outcome = run_fold(bench, METHOD, params, 1, 0, run_dir)
    steps = [int(row[0]) for row in log_without_timing(run_dir / "train.csv")[1:]]
    assert steps == list(range(1, outcome.steps + 1))


def test_tune_refuses_a_misspelt_loss_option(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = yaml.safe_load((PRESETS_DIR / "digits.yaml").read_text())
    config["methods"] = {METHOD: {"search": {"loss.options.pos_margn": {"low": 0.0, "high": 1.0}}}}
    path = tmp_path / "typo.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["tune", str(path), "--out", str(tmp_path), "--trials", "1"]) == 2
    assert "pos_margn" in capsys.readouterr().err


@pytest.mark.parametrize(
    "source",
    ["digits", "omniglot", *sorted(str(p) for p in (ROOT / "configs" / "bench").glob("*.yaml"))],
)
def test_every_shipped_benchmark_config_loads(source: str) -> None:
    bench = load_bench_config(source)
    for method, spec in bench.methods.items():
        config = bench.run_config(method, {k: p.example() for k, p in spec.search.items()}, 0, 0)
        # A method that names its loss gets that loss's options only, never the base config's.
        assert config.loss.name == spec.config["loss"]["name"]
        searched = {key.rsplit(".", 1)[-1] for key in spec.search if key.startswith("loss.")}
        assert set(config.loss.options) <= searched | set(spec.config["loss"].get("options", {}))


def test_a_folder_of_another_run_is_refused_never_read_back(tmp_path: Path) -> None:
    bench = load_bench_config("digits", [*TINY, "protocol.trials=1", f"protocol.out={tmp_path}"])
    tune(bench, METHOD, say=lambda _: None)
    (trial,) = _load_study(tmp_path).get_trials()
    # Another study in the same folder gets folders of its own.
    other = load_bench_config(
        "digits",
        [*TINY, "protocol.trials=1", f"protocol.out={tmp_path}", "protocol.study_prefix=b-"],
    )
    assert trial_dir(other, METHOD, 0) != trial_dir(bench, METHOD, 0)
    # A finished folder whose config differs from the run asked for is an error, not a result.
    changed = {
        **trial.params,
        "loss.options.neg_margin": trial.params["loss.options.neg_margin"] + 0.1,
    }
    with pytest.raises(ConfigError, match=r"holds a different run.*neg_margin"):
        run_fold(bench, METHOD, changed, 0, 0, trial_dir(bench, METHOD, 0) / "fold-0")
    # The same config is read back.
    outcome = run_fold(bench, METHOD, trial.params, 0, 0, trial_dir(bench, METHOD, 0) / "fold-0")
    assert outcome.reused and outcome.best_validation == trial.user_attrs["fold_0"]


def test_a_results_file_cut_off_mid_write_means_an_unfinished_run(tmp_path: Path) -> None:
    bench = load_bench_config("digits", TINY)
    params = {"loss.options.pos_margin": 0.0, "loss.options.neg_margin": 1.0}
    first = run_fold(bench, METHOD, params, 0, 0, tmp_path)
    (tmp_path / "results.json").write_text('{"best_validation": 0.')
    again = run_fold(bench, METHOD, params, 0, 0, tmp_path)  # resumed from last.pt, finished
    assert not again.reused and again.best_validation == first.best_validation
    assert json.loads((tmp_path / "results.json").read_text())["steps"] == first.steps


@pytest.mark.parametrize(
    ("methods", "message"),
    [
        ({"x": {"preset": "triplet", "config": {"train": {"seed": 3}}}}, "train.seed is set by"),
        (
            {
                "x": {
                    "preset": "triplet",
                    "search": {"loss.options.margin": {"low": 0, "high": 1, "step": -0.1}},
                }
            },
            "step must be positive",
        ),
        (
            {
                "x": {
                    "preset": "triplet",
                    "search": {"loss.options.margin": {"low": 0.5, "high": 3, "int": True}},
                }
            },
            "integer low",
        ),
        (
            {
                "x": {
                    "preset": "triplet",
                    "search": {"loss.options.margin": {"low": 0, "high": 1, "log": "false"}},
                }
            },
            "expected true or false",
        ),
    ],
)
def test_method_settings_the_protocol_owns_or_cannot_sample_are_errors(
    methods: dict[str, object], message: str
) -> None:
    values = {"training": {"data": {"name": "digits"}}, "methods": methods}
    with pytest.raises(ConfigError, match=message):
        bench_config_from_dict(values)


def test_cli_paths_are_taken_literally(tmp_path: Path) -> None:
    out = tmp_path / "runs #2"
    args = ["tune", "digits", "--method", METHOD, "--trials", "1", "--out", str(out)]
    assert main([*args, *_sets(TINY)]) == 0
    assert (out / "study.db").is_file()
