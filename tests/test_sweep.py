"""Hyperparameter sweeps: value parsing, a real sweep's folders and tables (aggregates checked
against the runs' own results), reading finished runs back, exact resumption of a run cut off,
refusing bad keys, values and foreign folders before training, and the sweep's plot."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import statistics
from pathlib import Path

import pytest
from PIL import Image

from dmlkit.protocol.stats import confidence_interval
from dmlkit.protocol.sweep import (
    SweepResult,
    load_sweep,
    parse_values,
    run_sweep,
    sweep_markdown,
)
from dmlkit.training import Config, ConfigError, Trainer, load_config
from dmlkit.viz.sweep import plot_sweep
from run_helpers import StopTrainingError, log_without_timing, stop_at

KEY = "loss.options.margin"
MARGINS = [0.2, 0.5]
METRICS = ("precision_at_1", "r_precision", "mean_average_precision_at_r")

# About a second per run on one core: 6 steps on digits, validated on 2 of the 5 training digits.
TINY = [
    "train.max_steps=6",
    "train.device=cpu",
    "logging.log_every=1",
    "logging.progress=false",
    "validation.every=3",
    "validation.unit=step",
    "validation.before_training=false",
    f"validation.metrics=[{','.join(METRICS)}]",
    "data.val_classes=0.4",
    "sampler.classes_per_batch=3",
    "sampler.samples_per_class=4",
    "model.embedding_dim=16",
    "loss.name=TripletMarginLoss",
    "miner.name=null",
]


def _config(*overrides: str) -> Config:
    return load_config(None, [*TINY, *overrides])


def _run_dir(out: Path, margin: float, seed: int) -> Path:
    return out / f"{KEY}={margin}" / f"seed-{seed}"


def _assert_png(path: Path) -> None:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as image:
        image.verify()


@pytest.fixture(scope="module")
def margin_sweep(tmp_path_factory: pytest.TempPathFactory) -> tuple[SweepResult, list[str]]:
    """Two triplet margins × two seeds."""
    lines: list[str] = []
    out = tmp_path_factory.mktemp("sweep") / "margin"
    return run_sweep(_config(), KEY, MARGINS, out, seeds=2, say=lines.append), lines


# ------------------------------------------------------------------------------ values


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0.4:1.0:0.1", [0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]),
        ("1:9:2", [1, 3, 5, 7, 9]),
        ("0:1:0.3", [0.0, 0.3, 0.6, 0.9]),
        ("1e-4:3e-4:1e-4", [1e-4, 2e-4, 3e-4]),
        ("-1:1:1", [-1, 0, 1]),
        ("0.1, 0.3,1e-3", [0.1, 0.3, 1e-3]),
        ("adam,sgd", ["adam", "sgd"]),
        ("true,false", [True, False]),
        ("1,2", [1, 2]),
        ("cuda:0,cpu", ["cuda:0", "cpu"]),
    ],
)
def test_parse_values(text: str, expected: list[object]) -> None:
    values = parse_values(text)
    assert values == expected
    assert [type(value) for value in values] == [type(value) for value in expected]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "no values"),
        ("   ", "no values"),
        ("0:1", "start:end:step"),
        ("0:1:0.1:2", "start:end:step"),
        ("a:1:0.1", "must be numbers"),
        ("0:inf:1", "finite"),
        ("0:1:0", "step must be positive"),
        ("0:1:-0.1", "step must be positive"),
        ("1:0:0.1", "start is after the end"),
        ("0.5:0.5:0.1", "at least 2"),
        ("0.5", "at least 2"),
        ("0:1:1e-6", "more than 1000"),
        ("0.1,,0.2", "empty value"),
        ("0.1,0.1", "repeats"),
        ("1,1.0", "repeats"),
        ("a b,a_b", "repeats"),
        (".nan,1", "finite"),
        ("[1,2", "not valid YAML"),
    ],
)
def test_parse_values_refuses(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_values(text)


# ------------------------------------------------------------------------------ a sweep


def test_sweep_writes_runs_and_tables(margin_sweep: tuple[SweepResult, list[str]]) -> None:
    result, lines = margin_sweep
    out = result.out
    assert result.seeds == (0, 1)
    assert [(run.value, run.seed) for run in result.runs] == [
        (margin, seed) for margin in MARGINS for seed in (0, 1)
    ]
    assert len(lines) == 4 and all("6 steps" in line for line in lines)
    assert lines[0].startswith(f"[1/4] {KEY}=0.2 seed 0: P@1 ")

    summaries = {}
    for margin in MARGINS:
        for seed in (0, 1):
            run_dir = _run_dir(out, margin, seed)
            saved = load_config(run_dir / "config.yaml")
            assert saved.loss.options == {"margin": margin}
            assert (saved.train.seed, saved.logging.run_dir) == (seed, str(run_dir))
            summaries[margin, seed] = json.loads((run_dir / "results.json").read_text())
            assert (run_dir / "validation.csv").is_file()
    assert summaries[0.2, 0]["after"] != summaries[0.2, 1]["after"], "the seeds must differ"

    with (out / "sweep.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row[KEY] for row in rows] == ["0.2", "0.5"]
    for row, margin in zip(rows, MARGINS, strict=True):
        assert row["seeds"] == "2"
        for metric in [*METRICS, "best_validation"]:
            readings = [
                summaries[margin, seed]["after"][metric]
                if metric in METRICS
                else summaries[margin, seed]["best_validation"]
                for seed in (0, 1)
            ]
            spread = confidence_interval(readings).half_width
            assert float(row[metric]) == pytest.approx(statistics.fmean(readings), abs=1e-6)
            assert float(row[f"{metric}_ci"]) == pytest.approx(spread, abs=1e-6)
            assert spread > 0

    described = json.loads((out / "sweep.json").read_text())
    assert (described["key"], described["values"], described["seeds"]) == (KEY, MARGINS, [0, 1])
    assert described["config"] == _config().to_dict()
    for run in described["runs"]:
        assert run["run_dir"] == f"{KEY}={run['value']}/seed-{run['seed']}"
        assert run["summary"] == summaries[run["value"], run["seed"]]

    markdown = (out / "sweep.md").read_text()
    assert markdown == sweep_markdown(result)
    assert "mean ± 95% confidence interval over 2 seeds (0, 1)" in markdown
    assert f"| `{KEY}` | Seeds | P@1 | R-Precision | MAP@R | Best val. MAP@R |" in markdown
    interval = result.intervals("precision_at_1")[0]
    assert interval is not None
    assert f"| 0.2 | 2 | {interval} |" in markdown


def test_sweep_again_reads_runs_back(margin_sweep: tuple[SweepResult, list[str]]) -> None:
    result, _ = margin_sweep
    out = result.out
    results = sorted(out.glob("*/seed-*/results.json"))
    assert len(results) == 4
    written = {path: path.stat().st_mtime_ns for path in results}
    tables = {name: (out / name).read_text() for name in ("sweep.csv", "sweep.md", "sweep.json")}
    lines: list[str] = []
    again = run_sweep(_config(), KEY, MARGINS, out, seeds=2, say=lines.append)
    assert all(line.endswith("(read back)") for line in lines) and len(lines) == 4
    assert {path: path.stat().st_mtime_ns for path in results} == written
    assert {name: (out / name).read_text() for name in tables} == tables
    assert again == result


def test_interrupted_run_resumes_exactly(
    margin_sweep: tuple[SweepResult, list[str]], tmp_path: Path
) -> None:
    result, _ = margin_sweep
    out = tmp_path / "sweep"
    run_dir = _run_dir(out, 0.2, 0)
    # A checkpoint every 2 steps (a setting that may change on resume), cut off after step 5.
    partial = _config(f"{KEY}=0.2", f"logging.run_dir={run_dir}", "train.checkpoint_every=2")
    with pytest.raises(StopTrainingError):
        Trainer(partial, run_dir, callbacks=[stop_at(5)]).fit()
    assert (run_dir / "last.pt").is_file() and not (run_dir / "results.json").exists()

    lines: list[str] = []
    resumed = run_sweep(_config(), KEY, [0.2], out, say=lines.append)
    assert lines == [lines[0]] and lines[0].endswith("(resumed, 6 steps)")
    uninterrupted = result.runs[0]
    assert (uninterrupted.value, uninterrupted.seed) == (0.2, 0)
    for field in ("after", "best_validation", "best_step", "steps"):
        assert resumed.runs[0].summary[field] == uninterrupted.summary[field], field
    for log in ("train.csv", "validation.csv"):
        assert log_without_timing(run_dir / log) == log_without_timing(uninterrupted.run_dir / log)


@pytest.mark.parametrize(
    ("key", "values", "message"),
    [
        ("loss.options.marginn", [0.1, 0.2], "has no option 'marginn'; did you mean 'margin'"),
        ("optimizer.lrr", [0.1, 0.2], "did you mean 'lr'"),
        ("data.transform", [1, 2], "is a section, not a setting"),
        ("loss.options", [1, 2], "is a section, not a setting"),
        ("train.seed", [1, 2], "sets the seeds"),
        ("logging.run_dir", ["a", "b"], "sets each run's folder"),
        (KEY, [0.5, "abc"], "loss.options.margin=abc: .*expected a number, got 'abc'"),
        ("optimizer.lr", [1e-3, -1.0], "optimizer.lr=-1.0: optimizer.lr must be"),
        ("optimizer.name", ["adam", "adamm"], "optimizer.name=adamm: .*is not one of"),
    ],
)
def test_bad_key_or_value_fails_before_training(
    tmp_path: Path, key: str, values: list[object], message: str
) -> None:
    out = tmp_path / "sweep"
    with pytest.raises(ConfigError, match=message):
        run_sweep(_config(), key, values, out, say=print)
    assert not out.exists()


def test_bad_arguments_refused(tmp_path: Path) -> None:
    for values, seeds, message in [
        ([], 1, "at least one value"),
        ([0.1, 0.1], 1, "repeats"),
        ([0.1, 0.2], 0, "seeds must be at least 1"),
    ]:
        with pytest.raises(ValueError, match=message):
            run_sweep(_config(), KEY, values, tmp_path / "sweep", seeds=seeds)
    assert not (tmp_path / "sweep").exists()


def test_folder_of_another_config_refused(tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    foreign = _run_dir(out, 0.5, 0)
    foreign.mkdir(parents=True)
    (foreign / "config.yaml").write_text(_config(f"{KEY}=0.5", "optimizer.lr=0.01").to_yaml())
    with pytest.raises(ConfigError, match=r"holds a different run .*optimizer\.lr"):
        run_sweep(_config(), KEY, MARGINS, out)
    assert not _run_dir(out, 0.2, 0).exists(), "nothing may train before the refusal"


def test_finished_run_without_test_metrics_refused(tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    untested = _run_dir(out, 0.5, 0)
    untested.mkdir(parents=True)
    (untested / "config.yaml").write_text(_config(f"{KEY}=0.5").to_yaml())
    (untested / "results.json").write_text(json.dumps({"after": None, "best_validation": 0.5}))
    with pytest.raises(ConfigError, match="finished without test metrics"):
        run_sweep(_config(), KEY, MARGINS, out)
    assert not _run_dir(out, 0.2, 0).exists(), "nothing may train before the refusal"


def test_load_sweep(margin_sweep: tuple[SweepResult, list[str]], tmp_path: Path) -> None:
    result, _ = margin_sweep
    loaded = load_sweep(result.out)
    assert loaded == result
    assert loaded.intervals("mean_average_precision_at_r") == result.intervals(
        "mean_average_precision_at_r"
    )
    with pytest.raises(FileNotFoundError, match=r"sweep\.json not found"):
        load_sweep(tmp_path)
    (tmp_path / "sweep.json").write_text("{}")
    with pytest.raises(ConfigError, match="not a sweep's results"):
        load_sweep(tmp_path)


def test_intervals(margin_sweep: tuple[SweepResult, list[str]]) -> None:
    result, _ = margin_sweep
    assert result.test_metrics() == list(METRICS)
    assert result.metrics() == [*METRICS, "best_validation"]
    for interval in result.intervals("best_validation"):
        assert interval is not None and interval.n == 2 and math.isfinite(interval.half_width)
    with pytest.raises(ValueError, match="'recall_at_1' is not in the sweep's results"):
        result.intervals("recall_at_1")


# ------------------------------------------------------------------------------ plots


def test_plot_numeric_sweep(margin_sweep: tuple[SweepResult, list[str]], tmp_path: Path) -> None:
    result, _ = margin_sweep
    path = plot_sweep(result)
    assert path == result.out / "sweep.png"
    _assert_png(path)
    # Values spanning three decades go on a log axis; the same runs stand in for them.
    spread = (1e-4, 0.1)
    runs = tuple(
        dataclasses.replace(run, value=spread[MARGINS.index(run.value)]) for run in result.runs
    )
    wide = dataclasses.replace(result, values=spread, runs=runs)
    _assert_png(plot_sweep(wide, tmp_path / "plots" / "wide.png", smoothing=3))
    with pytest.raises(ValueError, match="smoothing"):
        plot_sweep(result, tmp_path / "bad.png", smoothing=0)


def test_categorical_sweep_with_one_seed(tmp_path: Path) -> None:
    out = tmp_path / "optimizers"
    config = _config("data.val_classes=0.0")  # not validated: no validation column or panel
    result = run_sweep(config, "optimizer.name", ["adam", "sgd"], out, say=lambda line: None)
    assert result.metrics() == list(METRICS)
    assert (out / "optimizer.name=sgd" / "seed-0" / "results.json").is_file()
    markdown = (out / "sweep.md").read_text()
    assert "one seed (0)" in markdown and "| sgd | 1 |" in markdown
    with (out / "sweep.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert rows[1]["optimizer.name"] == "sgd" and rows[1]["precision_at_1_ci"] == "nan"
    _assert_png(plot_sweep(result, tmp_path / "optimizers.png"))
