"""Hyperparameter sweeps: value parsing, a real sweep's folders and tables (aggregates checked
against the runs' own results), reading finished runs back, exact resumption of a run cut off,
refusing bad keys, values and foreign folders before training, and the sweep's plot (the
figure itself, caught when the plotting function closes it, holds what the picture shows)."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import re
import shutil
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import numpy as np
import pytest
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.colors import to_hex
from matplotlib.container import ErrorbarContainer
from PIL import Image

from dmlkit.protocol import (
    SweepResult,
    SweepRun,
    load_sweep,
    parse_values,
    run_sweep,
    sweep_caption,
    sweep_markdown,
    sweep_table,
)
from dmlkit.protocol.stats import confidence_interval
from dmlkit.protocol.sweep_values import value_folder, value_text
from dmlkit.training import Config, ConfigError, Trainer, load_config
from dmlkit.viz.sweep import plot_sweep
from run_helpers import DIGITS_RUN, StopTrainingError, log_without_timing, stop_at

KEY = "loss.options.margin"
MARGINS = [0.2, 0.5]
METRICS = ("precision_at_1", "r_precision", "mean_average_precision_at_r")

# About a second per run on one core: 6 steps on digits, validated on 2 of the 5 training digits.
TINY = [
    *DIGITS_RUN,
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


def _standing_in(result: SweepResult, values: Sequence[Any]) -> SweepResult:
    """The margin sweep's runs standing in for other values: margin ``MARGINS[i]`` becomes
    ``values[i]``."""
    runs = tuple(
        dataclasses.replace(run, value=values[MARGINS.index(run.value)]) for run in result.runs
    )
    return dataclasses.replace(result, values=tuple(values), runs=runs)


def _with_runs(result: SweepResult, change: Any) -> SweepResult:
    """The sweep with each run replaced by ``change(run)``."""
    return dataclasses.replace(result, runs=tuple(change(run) for run in result.runs))


def _unvalidated(run: SweepRun) -> SweepRun:
    """A run as the trainer reports it without validation: tested with its final model."""
    return dataclasses.replace(run, summary={**run.summary, "best_step": None})


@pytest.fixture(scope="module")
def margin_sweep(tmp_path_factory: pytest.TempPathFactory) -> tuple[SweepResult, list[str]]:
    """Two triplet margins × two seeds."""
    lines: list[str] = []
    out = tmp_path_factory.mktemp("sweep") / "margin"
    return run_sweep(_config(), KEY, MARGINS, out, seeds=2, say=lines.append), lines


def _panel(figure: Any, title: str) -> Axes:
    """The figure's one panel whose title starts with ``title``."""
    (axis,) = [axis for axis in figure.axes if axis.get_title().startswith(title)]
    return axis


def _titles(figure: Any) -> list[str]:
    return [axis.get_title() for axis in figure.axes if axis.get_title()]


def _colour_bars(figure: Any) -> list[Axes]:
    return [axis for axis in figure.axes if axis.get_label() == "<colorbar>"]


def _bars(axis: Axes) -> list[ErrorbarContainer]:
    """A panel's metrics, one error-bar plot each."""
    return [bar for bar in axis.containers if isinstance(bar, ErrorbarContainer)]


def _points(axis: Axes, metric: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Where a panel's metric (its number among the panel's metrics) is drawn."""
    line = _bars(axis)[metric].lines[0]
    return np.asarray(line.get_xdata(), dtype=float), np.asarray(line.get_ydata(), dtype=float)


def _note(axis: Axes) -> str:
    """The notes drawn in a panel, their line breaks undone."""
    return " / ".join(" ".join(text.get_text().split()) for text in axis.texts)


def _legend_title(axis: Axes) -> str:
    """A panel's legend title, its line breaks undone."""
    legend = axis.get_legend()
    assert legend is not None
    return " ".join(legend.get_title().get_text().split())


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
        ("1e-3,1E-4,.5,+2,1_000", [1e-3, 1e-4, 0.5, 2, 1000]),
        ("adam,sgd", ["adam", "sgd"]),
        ("true,false", [True, False]),
        ("TRUE,False,NULL", [True, False, None]),
        ("1,2", [1, 2]),
        ("cuda:0,cpu", ["cuda:0", "cpu"]),
        # YAML 1.1 reads 1:30 as 90 (base 60) and yes as true: here they stay as written.
        ("1:30,2", ["1:30", 2]),
        ("yes,0x10", ["yes", "0x10"]),
        # A boolean is not the number it equals in Python.
        ("true,1", [True, 1]),
        ("0,false", [0, False]),
        # Quotes make a string of anything.
        ("'1',\"null\",x", ["1", "null", "x"]),
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
        ("nan,1", "'nan' is not a finite number"),
        ("1,-inf", "'-inf' is not a finite number"),
        ("[1,2]", "'[1' has brackets"),
        # Equal numbers, named as given.
        ("0.1,0.1", "value '0.1' repeats '0.1'"),
        ("1,1.0", "value '1.0' repeats '1'"),
        ("0,0.0", "value '0.0' repeats '0'"),
        ("1e-3,0.5,0.001", "value '0.001' repeats '1e-3'"),
        ("true,TRUE", "value 'TRUE' repeats 'true'"),
        ("a b,a_b", "values 'a b' and 'a_b' would share the run folder <key>=a_b"),
        ("'1',1", """values "'1'" and '1' would share the run folder <key>=1"""),
    ],
)
def test_parse_values_refuses(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_values(text)


def test_value_text_keeps_small_numbers() -> None:
    assert [value_text(value) for value in (1e-5, 0.0003, 2.5e-7, 1.0, True, None, "sgd")] == [
        "1e-05",
        "0.0003",
        "2.5e-07",
        "1.0",
        "true",
        "null",
        "sgd",
    ]


def test_equal_numbers_share_a_run_folder(tmp_path: Path) -> None:
    assert value_folder(KEY, 0) == value_folder(KEY, 0.0) == value_folder(KEY, -0.0) == f"{KEY}=0"
    assert value_folder(KEY, 1.0) == value_folder(KEY, 1) == f"{KEY}=1"
    assert value_folder(KEY, 1e20) == value_folder(KEY, 10**20) == f"{KEY}=1e+20"
    assert value_folder(KEY, 1e-5) == f"{KEY}=1e-05"
    assert value_folder(KEY, True) == f"{KEY}=true" != value_folder(KEY, 1)
    # A range gives floats, a list of the same numbers may give integers: the same folders.
    assert [value_folder(KEY, value) for value in parse_values("0:1:0.5")] == [
        value_folder(KEY, value) for value in parse_values("0,0.5,1")
    ]
    with pytest.raises(ValueError, match=re.escape("value '0.0' repeats '0'")):
        run_sweep(_config(), KEY, [0, 0.0], tmp_path / "sweep")
    assert not (tmp_path / "sweep").exists()


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
    caption = "each run's best validation checkpoint, mean ± 95% confidence interval over 2 seeds"
    assert f"{caption} (0, 1)." in markdown
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
        ("validation.metric", ["r_precision", "precision_at_1"], "would mix metrics"),
        (KEY, [0.5, "abc"], "loss.options.margin=abc: .*expected a number, got 'abc'"),
        ("optimizer.lr", [1e-3, -1.0], "optimizer.lr=-1.0: optimizer.lr must be"),
        ("optimizer.name", ["adam", "adamm"], "optimizer.name=adamm: .*unknown optimizer 'adamm'"),
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
    with pytest.raises(
        ConfigError,
        match=r"holds a different run .*optimizer\.lr.*remove it or choose another output folder",
    ):
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


def _reading(run: SweepRun, metric: str) -> float:
    summary = run.summary
    return float(
        summary["best_validation"] if metric == "best_validation" else summary["after"][metric]
    )


def test_sweep_table(margin_sweep: tuple[SweepResult, list[str]]) -> None:
    result, _ = margin_sweep
    header, rows = sweep_table(result)
    assert header == [KEY, "Seeds", "P@1", "R-Precision", "MAP@R", "Best val. MAP@R"]
    assert [row[:2] for row in rows] == [["0.2", "2"], ["0.5", "2"]]
    for row, margin in zip(rows, MARGINS, strict=True):
        for cell, metric in zip(row[2:], result.metrics(), strict=True):
            interval = confidence_interval(
                [_reading(run, metric) for run in result.runs_of(margin)]
            )
            assert cell == f"{interval.mean:.4f} ± {interval.half_width:.4f}"
    narrower = sweep_table(result, level=0.5)[1]
    assert narrower[0][2].split(" ± ")[0] == rows[0][2].split(" ± ")[0]
    assert float(narrower[0][2].split(" ± ")[1]) < float(rows[0][2].split(" ± ")[1])

    # The Markdown is the same table under the caption.
    markdown = sweep_markdown(result).splitlines()
    assert markdown[0] == sweep_caption(result).replace(KEY, f"`{KEY}`")
    assert markdown[2] == f"| `{KEY}` | " + " | ".join(header[1:]) + " |"
    assert markdown[4:] == ["| " + " | ".join(row) + " |" for row in rows]

    # Hyperparameter values are never rounded to fixed decimals.
    small = sweep_table(_standing_in(result, [1e-5, 3e-4]))[1]
    assert [row[0] for row in small] == ["1e-05", "0.0003"]
    # A "|" in a string value stays inside its Markdown cell.
    assert "| a\\|b | 2 |" in sweep_markdown(_standing_in(result, ["a|b", "c"]))


def test_one_seed_table_cells_are_means(margin_sweep: tuple[SweepResult, list[str]]) -> None:
    result, _ = margin_sweep
    first_seed = dataclasses.replace(
        result, seeds=(0,), runs=tuple(run for run in result.runs if run.seed == 0)
    )
    _, rows = sweep_table(first_seed)
    assert rows[0][1:3] == ["1", f"{first_seed.runs[0].summary['after']['precision_at_1']:.4f}"]
    assert "one seed (0)" in sweep_caption(first_seed)


def test_caption_names_the_tested_model(margin_sweep: tuple[SweepResult, list[str]]) -> None:
    result, _ = margin_sweep
    assert result.tested_model() == "best validation checkpoint"
    unvalidated = _with_runs(result, _unvalidated)
    assert unvalidated.tested_model() == "final model"
    assert "scored with each run's final model, mean ± 95%" in sweep_caption(unvalidated)
    assert "checkpoint" not in sweep_markdown(unvalidated)
    # Sweeping a setting that switches validation on for some values only.
    mixed = _with_runs(result, lambda run: _unvalidated(run) if run.value == 0.2 else run)
    assert mixed.tested_model() == "best validation checkpoint (final model where not validated)"


def test_runs_of_tells_booleans_from_numbers(margin_sweep: tuple[SweepResult, list[str]]) -> None:
    result = _standing_in(margin_sweep[0], [True, 1])
    # True == 1 in Python: an equality test would give each value all four runs.
    assert [(type(run.value), run.seed) for run in result.runs_of(1)] == [(int, 0), (int, 1)]
    assert [(type(run.value), run.seed) for run in result.runs_of(True)] == [(bool, 0), (bool, 1)]
    assert [row[:2] for row in sweep_table(result)[1]] == [["true", "2"], ["1", "2"]]


# ------------------------------------------------------------------------------ plots


def test_plot_numeric_sweep(
    margin_sweep: tuple[SweepResult, list[str]], tmp_path: Path, closed_figures: list[Any]
) -> None:
    result, _ = margin_sweep
    path = plot_sweep(result)
    assert path == result.out / "sweep.png"
    _assert_png(path)
    (figure,) = closed_figures
    assert _titles(figure) == [
        "final metrics (mean ± 95% CI over 2 seeds)",
        "training loss (mean over seeds, smoothed)",
        "validation MAP@R (mean over seeds)",
    ]
    metrics = _panel(figure, "final metrics")
    assert metrics.get_xscale() == "linear"
    low, high = metrics.get_ylim()
    assert low >= -0.03 and high <= 1.03, "two seeds' wide intervals stop at the metrics' range"
    assert "best validation checkpoint" in " ".join(metrics.get_ylabel().split())
    bars = _bars(metrics)
    assert [bar.get_label() for bar in bars] == ["P@1", "R-Precision", "MAP@R", "Best val. MAP@R"]
    assert all(bar.has_yerr for bar in bars), "two seeds: confidence intervals as error bars"
    x, y = _points(metrics)
    np.testing.assert_allclose(x, MARGINS)
    means = [interval.mean for interval in result.intervals("precision_at_1") if interval]
    np.testing.assert_allclose(y, means)

    # One curve per value, coloured along the colour bar's map from the smallest to the largest.
    ends = [to_hex(colormaps["viridis"](end)) for end in (0.0, 1.0)]
    for title in ("training loss", "validation"):
        curves = _panel(figure, title).get_lines()
        assert [to_hex(curve.get_color()) for curve in curves] == ends
        assert not _panel(figure, title).texts, "every value has its curve: no note"
    assert [bar.get_ylabel() for bar in _colour_bars(figure)] == [KEY, KEY]
    assert not metrics.texts


def test_plot_axis_follows_the_values(
    margin_sweep: tuple[SweepResult, list[str]], tmp_path: Path, closed_figures: list[Any]
) -> None:
    result, _ = margin_sweep
    # Values spanning three decades go on a log axis; the same runs stand in for them.
    _assert_png(
        plot_sweep(_standing_in(result, [1e-4, 0.1]), tmp_path / "w" / "w.png", smoothing=3)
    )
    # Values given out of order: the lines still run from left to right.
    plot_sweep(_standing_in(result, [0.5, 0.2]), tmp_path / "unsorted.png")
    # Exactly two decades (a learning-rate sweep 1e-4 … 1e-2) is log too; under it, linear.
    plot_sweep(_standing_in(result, [1e-4, 1e-2]), tmp_path / "two.png")
    plot_sweep(_standing_in(result, [1e-4, 9e-3]), tmp_path / "under.png")
    wide, unsorted, two, under = (_panel(f, "final metrics") for f in closed_figures)
    assert wide.get_xscale() == "log"
    assert two.get_xscale() == "log" and under.get_xscale() == "linear"
    np.testing.assert_allclose(_points(wide)[0], [1e-4, 0.1])
    np.testing.assert_allclose(_points(unsorted)[0], [0.2, 0.5])
    first, second = result.intervals("precision_at_1")
    assert first is not None and second is not None
    np.testing.assert_allclose(_points(unsorted)[1], [second.mean, first.mean])
    with pytest.raises(ValueError, match="smoothing"):
        plot_sweep(result, tmp_path / "bad.png", smoothing=0)


def test_plot_categorical_values(
    margin_sweep: tuple[SweepResult, list[str]], tmp_path: Path, closed_figures: list[Any]
) -> None:
    result = _standing_in(margin_sweep[0], ["adam", "sgd"])
    plot_sweep(result, tmp_path / "categories.png")
    moved = tmp_path / "moved"
    plot_sweep(
        _with_runs(
            result,
            lambda run: dataclasses.replace(run, run_dir=moved) if run.value == "sgd" else run,
        ),
        tmp_path / "one-category.png",
    )
    figure, partial = closed_figures
    metrics = _panel(figure, "final metrics")
    assert [label.get_text() for label in metrics.get_xticklabels()] == ["adam", "sgd"]
    assert _bars(metrics)[0].lines[0].get_linestyle() == "None", "no line between categories"
    loss = _panel(figure, "training loss")
    assert len(loss.get_lines()) == 2
    legend = loss.get_legend()
    assert legend is not None and [text.get_text() for text in legend.get_texts()] == [
        "adam",
        "sgd",
    ]
    assert _legend_title(loss) == KEY
    assert not _colour_bars(figure)
    # A category without a curve is named in the legend's title, which nothing can hide.
    for title in ("training loss", "validation"):
        panel = _panel(partial, title)
        assert len(panel.get_lines()) == 1 and not panel.texts
        assert _legend_title(panel) == f"{KEY} no curve for sgd: run folders missing"


def test_plot_leaves_recall_at_1_out_beside_p_at_1(
    margin_sweep: tuple[SweepResult, list[str]], tmp_path: Path, closed_figures: list[Any]
) -> None:
    def with_recall(run: SweepRun) -> SweepRun:
        after = run.summary["after"]
        recall = {"recall_at_1": after["precision_at_1"], "recall_at_4": 0.9}
        return dataclasses.replace(run, summary={**run.summary, "after": {**after, **recall}})

    result = _with_runs(margin_sweep[0], with_recall)
    plot_sweep(result, tmp_path / "recall.png")
    (figure,) = closed_figures
    labels = [bar.get_label() for bar in _bars(_panel(figure, "final metrics"))]
    assert labels == ["P@1", "R-Precision", "MAP@R", "Recall@4", "Best val. MAP@R"]
    assert "Recall@1" in sweep_table(result)[0], "the table keeps every metric"


def test_plot_notes_what_it_cannot_draw(
    margin_sweep: tuple[SweepResult, list[str]], tmp_path: Path, closed_figures: list[Any]
) -> None:
    result, _ = margin_sweep

    def deleted(run: SweepRun) -> SweepRun:
        return dataclasses.replace(run, run_dir=tmp_path / "deleted" / run.run_dir.name)

    plot_sweep(_with_runs(result, deleted), tmp_path / "deleted.png")
    plot_sweep(
        _with_runs(result, lambda run: deleted(run) if run.value == 0.5 else run),
        tmp_path / "half.png",
    )

    def diverged(run: SweepRun) -> SweepRun:
        after = {**run.summary["after"], "precision_at_1": math.nan}
        return dataclasses.replace(run, summary={**run.summary, "after": after})

    plot_sweep(
        _with_runs(result, lambda run: diverged(run) if run.value == 0.5 else run),
        tmp_path / "diverged.png",
    )
    gone, half, nan = closed_figures
    for title in ("training loss", "validation"):
        assert not _panel(gone, title).get_lines()
        assert _note(_panel(gone, title)) == "run folders missing"
        assert len(_panel(half, title).get_lines()) == 1
        assert _note(_panel(half, title)) == "no curve for 0.5: run folders missing"
    assert not _panel(nan, "final metrics").texts
    assert _legend_title(_panel(nan, "final metrics")) == (
        "not drawn for 0.5: a metric missing or not finite"
    )
    assert not _panel(nan, "training loss").texts


def test_categorical_sweep_with_one_seed(tmp_path: Path, closed_figures: list[Any]) -> None:
    out = tmp_path / "optimizers"
    # Not validated (no validation column, panel or checkpoint), and too short to log a row.
    config = _config("data.val_classes=0.0", "logging.log_every=10")
    result = run_sweep(config, "optimizer.name", ["adam", "sgd"], out, say=lambda line: None)
    assert result.metrics() == list(METRICS)
    assert (out / "optimizer.name=sgd" / "seed-0" / "results.json").is_file()
    markdown = (out / "sweep.md").read_text()
    assert "each run's final model, one seed (0)" in markdown and "| sgd | 1 |" in markdown
    with (out / "sweep.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert rows[1]["optimizer.name"] == "sgd" and rows[1]["precision_at_1_ci"] == "nan"

    _assert_png(plot_sweep(result, tmp_path / "optimizers.png"))
    (figure,) = closed_figures
    assert _titles(figure) == [
        "final metrics (one seed)",
        "training loss (mean over seeds, smoothed)",
    ]
    metrics = _panel(figure, "final metrics")
    assert [label.get_text() for label in metrics.get_xticklabels()] == ["adam", "sgd"]
    assert not any(bar.has_yerr for bar in _bars(metrics)), "one seed: no error bars"
    assert "final model" in " ".join(metrics.get_ylabel().split())
    loss = _panel(figure, "training loss")
    assert not loss.get_lines()
    assert _note(loss) == ("no training log rows: logging.log_every=10 exceeds the runs' steps (6)")


def test_plot_marks_the_untrained_network_and_vanishing_losses(
    margin_sweep: tuple[SweepResult, list[str]], tmp_path: Path, closed_figures: list[Any]
) -> None:
    result, _ = margin_sweep

    def vanishing(run: SweepRun) -> SweepRun:
        """The run with an untrained MAP@R of 0.1 and, for margin 0.5, a loss 1e-30 times as
        small (as a loss that is zero from the start leaves it)."""
        copy = tmp_path / run.run_dir.parent.name / run.run_dir.name
        shutil.copytree(run.run_dir, copy)
        if run.value == 0.5:
            with (copy / "train.csv").open(newline="") as handle:
                rows = list(csv.DictReader(handle))
            for row in rows:
                row["loss"] = str(float(row["loss"]) * 1e-30)
            with (copy / "train.csv").open("w", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
                writer.writeheader()
                writer.writerows(rows)
        before = {"mean_average_precision_at_r": 0.1}
        return dataclasses.replace(run, run_dir=copy, summary={**run.summary, "before": before})

    plot_sweep(result, tmp_path / "plain.png")
    plot_sweep(_with_runs(result, vanishing), tmp_path / "vanishing.png")
    plain, marked = closed_figures
    assert _panel(plain, "training loss").get_yscale() == "linear"
    assert not [line for line in _panel(plain, "final metrics").get_lines() if line.get_label()
                == "MAP@R before training"]  # fmt: skip
    assert _panel(marked, "training loss").get_yscale() == "log"
    (line,) = [
        line
        for line in _panel(marked, "final metrics").get_lines()
        if line.get_label() == "MAP@R before training"
    ]
    np.testing.assert_allclose(line.get_ydata(), [0.1, 0.1])
