"""Hyperparameter sensitivity sweeps: one training setting varied over a range of values.

Each value is trained with one or more seeds (the config's ``train.seed`` and the ones after
it), every run in its own folder ``<out>/<key>=<value>/seed-<seed>/``, and scored on the test
classes with its best validation checkpoint (its final model when it was not validated). The
final metrics are tabulated per value as the mean over the seeds ± the half-width of their
Student-t confidence interval.

Nothing is lost when a sweep is stopped: a finished run (its ``results.json``) is read back, a
run cut off resumes exactly from its last checkpoint, and a folder holding a run of another
config is refused. Every value's config is built and checked before the first run trains.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import math
import numbers
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from ..evaluation import metric_label
from ..training import (
    Config,
    ConfigError,
    Trainer,
    config_from_dict,
    set_config_key,
    write_text_atomic,
)
from .config import TEST_METRICS, check_buildable
from .stats import Interval, confidence_interval
from .study import check_run_folder, finished_summary, print_line

BEST_VALIDATION = "best_validation"
MAX_VALUES = 1000  # a sweep trains a run per value and seed: more is surely a typo in a range

# Settings the sweep decides for every run.
_SET_BY_SWEEP = {
    "train.seed": "the sweep sets the seeds (its seeds argument)",
    "logging.run_dir": "the sweep sets each run's folder",
    "validation.metric": "the best-validation column would mix metrics under one name",
}
_INTEGER = re.compile(r"[-+]?\d+")
_WORDS = {"true": True, "false": False, "null": None}
# Integral numbers below this are named by their integer text (1.0 and 1 share ``=1``); larger
# ones by their float text, which stays short.
_INTEGER_NAMES = 1e16


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


def value_text(value: Any) -> str:
    """A swept value as text: strings as they are, anything else as JSON.

    Numbers keep their shortest exact text (``1e-05``, ``0.0003``, ``1.0``), never a fixed
    number of decimals that would print a small learning rate as zero.
    """
    if isinstance(value, str):
        return value
    return json.dumps(value, separators=(",", ":"), default=str)


def is_number(value: Any) -> bool:
    """Whether a swept value is a number (a bool is not, though Python counts it as an int)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def same_value(first: Any, second: Any) -> bool:
    """Whether two swept values are the same setting.

    Equal numbers are, whatever their type (``0`` and ``0.0``); a boolean never equals a number
    (``True == 1`` in Python, but ``true`` and ``1`` are different settings), nor a string
    anything but a string.
    """
    if is_number(first) and is_number(second):
        return bool(first == second)
    return type(first) is type(second) and bool(first == second)


def _folder_text(value: Any) -> str:
    """The value's text in its folder name: equal numbers share one (``0`` and ``0.0``)."""
    if is_number(value) and math.isfinite(value):
        if float(value).is_integer() and abs(value) < _INTEGER_NAMES:
            return str(int(value))
        return value_text(float(value))
    return value_text(value)


def value_folder(key: str, value: Any) -> str:
    """The folder name of a value's runs, ``<key>=<value>`` with only safe characters.

    Equal numbers share a folder whatever their spelling: ``0``, ``0.0`` and the range
    ``0:1:0.5``'s first value all run in ``<key>=0``.
    """
    return f"{key}={re.sub(r'[^A-Za-z0-9._,+-]', '_', _folder_text(value))}"


def parse_values(text: str) -> list[Any]:
    """The values of a sweep from a range or a list.

    Args:
        text: ``start:end:step``, the end included when the steps reach it (``"0.4:1.0:0.1"``;
            computed in decimal, so without float drift; integers when all three are, as in
            ``"1:9:2"``), or values separated by commas (``"0.1,1e-3"``, ``"adam,sgd"``). A
            list item in Python's ``int`` or ``float`` syntax is a number (``3``, ``1e-3``,
            ``.5``); ``true``, ``false`` and ``null`` (any case) are booleans and None; an item
            in quotes is the string inside them (``'1'``); anything else is a string as written
            (``1:30``, ``cuda:0``).

    Returns:
        The values, at least two, all different.

    Raises:
        ValueError: Empty text or item, a range that is not three numbers or whose step is not
            positive or whose start is after its end, fewer than two or more than
            :data:`MAX_VALUES` values, a non-finite number, an item with brackets (a YAML
            list), or a value given twice (``0`` and ``0.0``, ``1e-3`` and ``0.001``).
    """
    text = text.strip()
    if not text:
        raise ValueError("no values given: use start:end:step or a comma-separated list")
    if ":" in text and "," not in text:
        values = _parse_range(text)
        spellings = [value_text(value) for value in values]
    else:
        spellings = [item.strip() for item in text.split(",")]
        values = _parse_list(text, spellings)
    if len(values) < 2:
        raise ValueError(f"{text!r} gives {len(values)} value; a sweep needs at least 2")
    check_distinct(values, spellings)
    return values


def _parse_range(text: str) -> list[Any]:
    parts = [part.strip() for part in text.split(":")]
    if len(parts) != 3:
        raise ValueError(f"range {text!r} is not start:end:step")
    try:
        start, end, step = (Decimal(part) for part in parts)
    except InvalidOperation:
        raise ValueError(f"range {text!r}: start, end and step must be numbers") from None
    if not all(number.is_finite() for number in (start, end, step)):
        raise ValueError(f"range {text!r}: start, end and step must be finite")
    if step <= 0:
        raise ValueError(f"range {text!r}: the step must be positive, got {parts[2]}")
    if start > end:
        raise ValueError(f"range {text!r}: the start is after the end")
    count = int((end - start) // step) + 1
    if count > MAX_VALUES:
        raise ValueError(f"range {text!r} gives {count} values, more than {MAX_VALUES}")
    convert = int if all(_INTEGER.fullmatch(part) for part in parts) else float
    return [convert(start + index * step) for index in range(count)]


def _parse_list(text: str, items: list[str]) -> list[Any]:
    if len(items) > MAX_VALUES:
        raise ValueError(f"{len(items)} values, more than {MAX_VALUES}")
    values = []
    for item in items:
        if not item:
            raise ValueError(f"{text!r} has an empty value")
        values.append(_parse_item(item))
    return values


def _parse_item(item: str) -> Any:
    """One list item; read by hand, as YAML would read ``1:30`` as 90 (base 60)."""
    if len(item) >= 2 and item[0] == item[-1] and item[0] in "'\"":
        return item[1:-1]
    if any(bracket in item for bracket in "[]{}"):
        raise ValueError(
            f"value {item!r} has brackets: give the values as a plain comma-separated list, "
            "e.g. 0.1,0.2"
        )
    if item.lower() in _WORDS:
        return _WORDS[item.lower()]
    for convert in (int, float):
        try:
            number = convert(item)
        except ValueError:
            continue
        if not math.isfinite(number):
            raise ValueError(f"value {item!r} is not a finite number")
        return number
    return item


def check_distinct(values: Sequence[Any], spellings: Sequence[str] | None = None) -> None:
    """Refuse a value given twice: the same value (see :func:`same_value`), or values that
    would share a run folder.

    Args:
        values: The sweep's values.
        spellings: How each value was written, to name a repeat as given (``'0.001' repeats
            '1e-3'``); :func:`value_text` of each value when None.

    Raises:
        ValueError: Names the repeated value.
    """
    texts = list(spellings) if spellings is not None else [value_text(v) for v in values]
    if len(texts) != len(values):
        raise ValueError(f"{len(texts)} spellings given for {len(values)} values")
    for index, value in enumerate(values):
        for earlier in range(index):
            if same_value(value, values[earlier]):
                raise ValueError(
                    f"value {texts[index]!r} repeats {texts[earlier]!r}: sweep distinct values"
                )
            folder = value_folder("", value)
            if folder == value_folder("", values[earlier]):
                raise ValueError(
                    f"values {texts[earlier]!r} and {texts[index]!r} would share the run "
                    f"folder <key>{folder}: sweep values that differ in letters, digits or "
                    "._,+-"
                )


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
) -> SweepResult:
    """Train ``config`` with ``key`` set to each value, ``seeds`` times each, and tabulate.

    Finished runs are read back rather than trained again and runs cut off resume exactly, so
    running a sweep again continues it. The tables are written by :func:`write_sweep_results`;
    each run's test metrics score its best validation checkpoint, or its final model when the
    run is not validated.

    Args:
        config: The base training config.
        key: The dotted config key to vary (``"loss.options.margin"``, ``"optimizer.lr"``).
        values: Its values (see :func:`parse_values`).
        out: The sweep's folder.
        seeds: Runs per value, with seeds ``config.train.seed`` and the ones after it.
        say: Where the progress lines go (one per run).

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

    def line(cells: list[str]) -> str:
        # A "|" in a string value would otherwise end its cell.
        return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"

    lines = [
        _caption(result, level, f"`{result.key}`"),
        "",
        line(header),
        "|" + "---|" * len(header),
        *(line(row) for row in rows),
    ]
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
            config=config_from_dict(described["config"]),
        )
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise ConfigError(f"{path} is not a sweep's results: {error!r}") from None
