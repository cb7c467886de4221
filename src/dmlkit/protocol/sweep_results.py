"""A sweep's results: its runs, their metrics per value, and the tables and files made of them.

A metric is tabulated per value as the mean over the seeds ± the half-width of its Student-t
confidence interval. :func:`write_sweep_results` writes ``sweep.json`` (read back by
:func:`load_sweep`), ``sweep.csv`` and ``sweep.md`` into the sweep's folder.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..display import markdown_table, metric_label
from ..training import Config, ConfigError, config_from_dict, write_text_atomic
from .stats import Interval, confidence_interval
from .sweep_values import same_value, value_text

BEST_VALIDATION = "best_validation"


@dataclass(frozen=True)
class SweepRun:
    """One finished run of a sweep.

    Attributes:
        value: The swept setting's value.
        seed: The run's training seed.
        run_dir: The run's folder.
        summary: The run's ``results.json``: ``after`` holds its test metrics (of its best
            validation checkpoint, or of its final model when ``best_step`` is None: not
            validated), ``best_validation`` its best validation value (None without validation).
    """

    value: Any
    seed: int
    run_dir: Path
    summary: dict[str, Any]


@dataclass(frozen=True)
class SweepResult:
    """A whole sweep: every value's runs, in the order of the values, then of the seeds.

    Attributes:
        key: The swept dotted config key (``"loss.options.margin"``).
        values: The values it took.
        seeds: The training seeds each value was run with.
        runs: One run per value and seed.
        out: The sweep's folder.
        config: The base config the values were set in.
    """

    key: str
    values: tuple[Any, ...]
    seeds: tuple[int, ...]
    runs: tuple[SweepRun, ...]
    out: Path
    config: Config

    def runs_of(self, value: Any) -> list[SweepRun]:
        """The runs of one value, one per seed (``True`` and ``1`` are different values)."""
        return [run for run in self.runs if same_value(run.value, value)]

    def labels(self) -> list[str]:
        """Each value as text, for tables and plot axes."""
        return [value_text(value) for value in self.values]

    def test_metrics(self) -> list[str]:
        """Names of the test metrics the runs report, in the order the trainer wrote them."""
        names: dict[str, None] = {}
        for run in self.runs:
            names.update(dict.fromkeys(run.summary.get("after") or {}))
        return list(names)

    def metrics(self) -> list[str]:
        """The test metrics, then :data:`BEST_VALIDATION` when the runs were validated."""
        validated = any(run.summary.get(BEST_VALIDATION) is not None for run in self.runs)
        return self.test_metrics() + ([BEST_VALIDATION] if validated else [])

    def metric_label(self, metric: str) -> str:
        """A metric's short name for tables and plots (``P@1``, ``Best val. MAP@R``)."""
        if metric == BEST_VALIDATION:
            selection = self.config.validation.metric
            return f"Best val. {metric_label(selection)}"
        return metric_label(metric)

    def tested_model(self) -> str:
        """Which model of each run the test metrics score, for captions and axis labels.

        A validated run (its ``results.json`` has a ``best_step``) is tested with its best
        validation checkpoint, any other with its final model. ``validation.every`` alone does
        not tell: a run without validation classes is not validated either.

        Returns:
            ``"best validation checkpoint"``, ``"final model"``, or both when the swept setting
            switched validation on for some values only.
        """
        validated = [run.summary.get("best_step") is not None for run in self.runs]
        if all(validated):
            return "best validation checkpoint"
        if not any(validated):
            return "final model"
        return "best validation checkpoint (final model where not validated)"

    def intervals(self, metric: str, level: float = 0.95) -> list[Interval | None]:
        """A metric per value: the mean over the seeds ± the confidence interval's half-width.

        Args:
            metric: A name of :meth:`test_metrics`, or :data:`BEST_VALIDATION`.
            level: Coverage of the confidence interval.

        Returns:
            One interval per value (in the order of :attr:`values`); its half-width is NaN with
            one seed, and its mean too when a run's value is not finite. None for a value
            whose runs lack the metric.

        Raises:
            ValueError: A metric no run reports.
        """
        if metric not in self.metrics():
            raise ValueError(
                f"metric {metric!r} is not in the sweep's results ({', '.join(self.metrics())})"
            )
        intervals: list[Interval | None] = []
        for value in self.values:
            readings = [_reading(run.summary, metric) for run in self.runs_of(value)]
            present = [reading for reading in readings if reading is not None]
            if not present:
                intervals.append(None)
            elif all(math.isfinite(reading) for reading in present):
                intervals.append(confidence_interval(present, level))
            else:
                intervals.append(Interval(math.nan, math.nan, len(present)))
        return intervals


def _reading(summary: dict[str, Any], metric: str) -> float | None:
    if metric == BEST_VALIDATION:
        return summary.get(BEST_VALIDATION)
    return (summary.get("after") or {}).get(metric)


def sweep_caption(result: SweepResult, level: float = 0.95) -> str:
    """The sentence that tells what the sweep's table holds (plain text, for any format)."""
    return _caption(result, level, result.key)


def _caption(result: SweepResult, level: float, key: str) -> str:
    seeds = ", ".join(str(seed) for seed in result.seeds)
    spread = (
        f"mean ± {level:.0%} confidence interval over {len(result.seeds)} seeds ({seeds})"
        if len(result.seeds) > 1
        else f"one seed ({seeds})"
    )
    return f"Sweep of {key}: test classes scored with each run's {result.tested_model()}, {spread}."


def sweep_table(result: SweepResult, level: float = 0.95) -> tuple[list[str], list[list[str]]]:
    """The sweep's results as a table of text cells, one row per value.

    The Markdown table (:func:`sweep_markdown`) and the HTML report are both made from it.

    Args:
        result: The sweep.
        level: Coverage of the confidence intervals.

    Returns:
        The header (the key, ``Seeds``, then each metric's short name, as
        :meth:`SweepResult.metric_label`) and the rows: the value (:func:`value_text`), its
        number of runs, then per metric the mean ± the confidence half-width to 4 decimals
        (the mean alone with one seed; ``nan`` when a run's value is not finite; ``–`` when
        the value's runs lack the metric).
    """
    metrics = result.metrics()
    header = [result.key, "Seeds", *(result.metric_label(metric) for metric in metrics)]
    intervals = [result.intervals(metric, level) for metric in metrics]
    rows = [
        [
            label,
            str(len(result.runs_of(value))),
            *(str(per_value[row] or "–") for per_value in intervals),
        ]
        for row, (value, label) in enumerate(zip(result.values, result.labels(), strict=True))
    ]
    return header, rows


def sweep_markdown(result: SweepResult, level: float = 0.95) -> str:
    """The sweep's table in Markdown (:func:`sweep_table` under :func:`sweep_caption`)."""
    header, rows = sweep_table(result, level)
    header[0] = f"`{header[0]}`"
    lines = [_caption(result, level, f"`{result.key}`"), "", *markdown_table(header, rows)]
    return "\n".join(lines) + "\n"


def _sweep_csv(result: SweepResult, level: float) -> str:
    metrics = result.metrics()
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([result.key, "seeds", *(name for m in metrics for name in (m, f"{m}_ci"))])
    intervals = [result.intervals(metric, level) for metric in metrics]
    for row, (value, label) in enumerate(zip(result.values, result.labels(), strict=True)):
        cells: list[str] = []
        for per_value in intervals:
            interval = per_value[row]
            cells += (
                ["", ""]
                if interval is None
                else [f"{interval.mean:.6f}", f"{interval.half_width:.6f}"]
            )
        writer.writerow([label, len(result.runs_of(value)), *cells])
    return buffer.getvalue()


def write_sweep_results(result: SweepResult, level: float = 0.95) -> dict[str, Path]:
    """Write ``sweep.json``, ``sweep.csv`` and ``sweep.md`` into the sweep's folder, atomically.

    ``sweep.json`` holds the key, values, seeds, base config and each run's folder (relative to
    the sweep's) and ``results.json``; :func:`load_sweep` reads it back. ``sweep.csv`` and
    ``sweep.md`` hold one row per value: the seeds, then each metric's mean and confidence
    half-width (NaN with one seed).

    Returns:
        The three paths by format (``json``, ``csv``, ``md``).
    """
    described = {
        "key": result.key,
        "values": list(result.values),
        "seeds": list(result.seeds),
        "config": result.config.to_dict(),
        "runs": [
            {
                "value": run.value,
                "seed": run.seed,
                "run_dir": run.run_dir.relative_to(result.out).as_posix(),
                "summary": run.summary,
            }
            for run in result.runs
        ],
    }
    out = result.out
    return {
        "json": write_text_atomic(json.dumps(described, indent=2), out / "sweep.json"),
        "csv": write_text_atomic(_sweep_csv(result, level), out / "sweep.csv"),
        "md": write_text_atomic(sweep_markdown(result, level), out / "sweep.md"),
    }


def load_sweep(out: str | Path) -> SweepResult:
    """Read a sweep back from its folder's ``sweep.json``.

    Raises:
        FileNotFoundError: The folder has no ``sweep.json`` (the sweep never finished).
        ConfigError: A ``sweep.json`` that is not one written by :func:`write_sweep_results`.
    """
    out = Path(out)
    path = out / "sweep.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: {out} holds no finished sweep (run the sweep first)"
        )
    try:
        described = json.loads(path.read_text())
        runs = tuple(
            SweepRun(run["value"], run["seed"], out / run["run_dir"], run["summary"])
            for run in described["runs"]
        )
        return SweepResult(
            key=described["key"],
            values=tuple(described["values"]),
            seeds=tuple(described["seeds"]),
            runs=runs,
            out=out,
            config=config_from_dict(described["config"], check=False),
        )
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise ConfigError(f"{path} is not a sweep's results: {error!r}") from None
