"""``dmlkit report``: one self-contained HTML page for a training run, a sweep or a benchmark.

The page holds its pictures as embedded PNGs (``data:`` URIs) and its tables as HTML, so it can
be mailed, archived or opened offline as a single file. The PNGs are also left in the folder's
``plots/`` for papers and slides.

- A **training run** (``config.yaml`` and ``train.csv``): the metrics table, the training curves,
  and, from its checkpoint, UMAP maps of the training and held-out classes and retrieval grids
  of chosen and of the worst queries.
- A **sweep** (``sweep.json``, written by ``dmlkit sweep``): the final metrics per value and the
  sweep's plot.
- A **benchmark** (``results.json`` of ``dmlkit bench``): the results table with confidence
  intervals, each method's hyperparameters and search history, and, for the first re-run of each
  method's best hyperparameters, its training curves, a map of its test embeddings and the worst
  queries.
"""

from __future__ import annotations

import base64
import html
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import yaml
from torch import Tensor

from .. import __version__
from ..data import LabelledDataset, subset
from ..display import metric_label, short_value
from ..evaluation import verification
from ..training import (
    build_run_data,
    config_from_dict,
    embed_dataset,
    load_trained_model,
    resolve_device,
    write_text_atomic,
)
from .curves import plot_training_log
from .embedding_map import EmbeddingPanel, plot_embedding_maps
from .retrieval_grid import item_image, plot_retrieval_grid, retrieval_lists, worst_queries
from .verification import plot_verification

ReportKind = Literal["run", "sweep", "bench"]
# A retrieval grid is one figure: beyond these it is no longer a picture one can read.
MAX_NEIGHBOURS = 20
MAX_GRID_ROWS = 50
Say = Callable[[str], None]


@dataclass(frozen=True)
class ReportOptions:
    """What a report shows.

    Attributes:
        checkpoint: The checkpoint that embeds the data: a path, or a file name in the run
            folder; None: ``best.pt``, or ``last.pt`` when the run kept no best checkpoint (it
            was not validated).
        queries: Test-item indices whose retrieval results are shown, besides the worst ones.
        worst: How many of the worst queries (lowest MAP@R) to show; 0 for none.
        k: Neighbours shown per query.
        max_points: At most this many points per embedding map (a seeded subsample beyond).
        projection: ``auto`` (UMAP, or PCA without umap-learn), ``umap`` or ``pca``.
        smoothing: Moving-average window of the training curves; None chooses one.
        embeddings: False skips what needs the model and the data (maps and retrieval grids).
        device: Where the model embeds the data: ``auto`` (CUDA when available), ``cpu``, ...
        seed: Seeds the subsamples and the projection.
        progress: Show progress bars on stderr while embedding and projecting (off by
            default, so that a library call prints nothing; ``dmlkit report`` shows them).
    """

    checkpoint: str | None = None
    queries: tuple[int, ...] = ()
    worst: int = 6
    k: int = 5
    max_points: int = 2000
    projection: Literal["auto", "umap", "pca"] = "auto"
    smoothing: int | None = None
    embeddings: bool = True
    device: str = "auto"
    seed: int = 0
    progress: bool = False

    def __post_init__(self) -> None:
        problems = []
        if not 0 <= self.worst <= MAX_GRID_ROWS:
            problems.append(f"worst must be in [0, {MAX_GRID_ROWS}], got {self.worst}")
        if len(self.queries) > MAX_GRID_ROWS:
            problems.append(f"at most {MAX_GRID_ROWS} queries, got {len(self.queries)}")
        if not 1 <= self.k <= MAX_NEIGHBOURS:
            problems.append(f"k must be in [1, {MAX_NEIGHBOURS}], got {self.k}")
        if self.max_points < 3:
            problems.append(f"max_points must be at least 3, got {self.max_points}")
        if self.smoothing is not None and self.smoothing < 1:
            problems.append(f"smoothing must be at least 1, got {self.smoothing}")
        if problems:
            raise ValueError("report options: " + "; ".join(problems))


@dataclass(frozen=True)
class Table:
    """A table of the page: a header row and text cells."""

    header: Sequence[str]
    rows: Sequence[Sequence[str]]
    caption: str = ""


@dataclass(frozen=True)
class Figure:
    """A PNG of the page, embedded when the page is written."""

    path: Path
    caption: str = ""


@dataclass
class Section:
    """A titled part of the page: paragraphs, tables, figures and a folded code block."""

    title: str
    paragraphs: list[str] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)
    code: str | None = None


def report_kind(folder: str | Path) -> ReportKind:
    """What a folder holds, judged by its files.

    Raises:
        FileNotFoundError: The folder does not exist.
        ValueError: It is none of a training run, a sweep or a benchmark.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder")
    if (folder / "sweep.json").is_file():
        return "sweep"
    results = folder / "results.json"
    if results.is_file() and "methods" in _read_json(results):
        return "bench"
    run_files = ("train.csv", "results.json", "last.pt", "best.pt")
    if (folder / "config.yaml").is_file() and any((folder / f).is_file() for f in run_files):
        return "run"
    raise ValueError(
        f"{folder} is not a training run (config.yaml with train.csv, results.json or a "
        "checkpoint), a sweep (sweep.json) or a benchmark (results.json of dmlkit bench)"
    )


def write_report(
    folder: str | Path,
    out: str | Path | None = None,
    options: ReportOptions | None = None,
    say: Say | None = None,
) -> Path:
    """Write the HTML report of a training run, a sweep or a benchmark.

    The page's PNGs are also written to a folder beside it: ``<folder>/plots`` for the default
    page, ``<stem>_plots`` beside an ``out`` page.

    Args:
        folder: The run, sweep or benchmark folder.
        out: The HTML file; ``<folder>/report.html`` when None.
        options: What to show; the defaults of :class:`ReportOptions` when None.
        say: Receives progress lines (embedding, projecting); silent when None.

    Returns:
        The HTML file's path.

    Raises:
        FileNotFoundError: The folder, or a file the report needs, is missing.
        ValueError: The folder is not a run, sweep or benchmark, or an option is out of range.
    """
    folder = Path(folder)
    options = options or ReportOptions()
    say = say or (lambda _line: None)
    kind = report_kind(folder)
    path = Path(out) if out is not None else folder / "report.html"
    if path.is_dir():
        raise ValueError(f"the report's output {path} is a folder; give an .html file name")
    plots = folder / "plots" if out is None else path.with_name(f"{path.stem}_plots")
    builders = {"run": _run_report, "sweep": _sweep_report, "bench": _bench_report}
    title, sections = builders[kind](folder, plots, options, say)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(render_html(title, sections), path)
    path.chmod(0o644)  # a page to share, not a private temporary file
    return path


# ------------------------------------------------------------------------------ a training run


def _run_report(
    folder: Path, plots: Path, options: ReportOptions, say: Say
) -> tuple[str, list[Section]]:
    config = config_from_dict(_read_yaml(folder / "config.yaml"), check=False)
    sections = [
        _run_summary(folder, config),
        _curves_section(folder, plots / "training.png", options),
    ]
    if options.embeddings:
        sections += _run_embedding_sections(folder, plots, options, say)
    sections.append(Section("Config", code=(folder / "config.yaml").read_text()))
    return f"dmlkit run {folder.name}", sections


def _curves_section(run_dir: Path, path: Path, options: ReportOptions) -> Section:
    section = Section("Training curves")
    try:
        plot_training_log(run_dir, path, smoothing=options.smoothing)
    except FileNotFoundError as error:
        section.paragraphs.append(f"No training curves: {error}.")
        return section
    section.figures.append(
        Figure(
            path,
            "Training-log curves, smoothed (faint: the raw values); the validation loss (dashed) "
            "beside the training loss, as in training and over every pair; validation metrics "
            "as logged.",
        )
    )
    return section


def _run_summary(folder: Path, config: Any) -> Section:
    section = Section("Summary")
    miner = config.miner.name or "no miner"
    section.paragraphs.append(
        f"{config.data.name}: {config.model.backbone} → {config.model.embedding_dim}-d, "
        f"{config.loss.name} with {miner}, seed {config.train.seed}."
    )
    results_path = folder / "results.json"
    if not results_path.is_file():
        section.paragraphs.append("No results.json: the run has not finished.")
        return section
    results = _read_json(results_path)
    before, after = results.get("before") or {}, results.get("after") or {}
    names = list(after or before)
    if names:
        section.tables.append(
            Table(
                ["metric", "before training", "after training"],
                [[metric_label(n), _number(before.get(n)), _number(after.get(n))] for n in names],
                "Retrieval on the held-out test classes (each test item queries the others), "
                + (
                    "with the best validation checkpoint."
                    if results.get("best_step") is not None
                    else "with the final model (no validation)."
                ),
            )
        )
    facts = [
        ("steps", results.get("steps")),
        ("best validation value", results.get("best_validation")),
        ("best step", results.get("best_step")),
        ("stopped early", results.get("stopped_early")),
        ("training images / s", results.get("images_per_second")),
    ]
    section.tables.append(Table(["", "value"], [[name, _number(v)] for name, v in facts]))
    return section


def _checkpoint(folder: Path, name: str | None) -> Path | None:
    """The checkpoint to embed with: a path as given, else a file of the run folder; a named one
    must exist, the default falls back from best.pt to last.pt."""
    if name is not None:
        for path in (Path(name), folder / name):
            if path.is_file():
                return path
        raise FileNotFoundError(f"no checkpoint {name} (nor {folder / name})")
    for default in ("best.pt", "last.pt"):
        if (folder / default).is_file():
            return folder / default
    return None


def _run_embedding_sections(
    folder: Path, plots: Path, options: ReportOptions, say: Say
) -> list[Section]:
    checkpoint = _checkpoint(folder, options.checkpoint)
    if checkpoint is None:
        return [_note("Embeddings", f"No best.pt or last.pt in {folder}: no model to embed with.")]
    config, model = load_trained_model(checkpoint)
    try:
        data = build_run_data(config.data, config.train.seed)
    except FileNotFoundError as error:
        return [_note("Embeddings", f"The run's data is not available here ({error}).")]
    _check_queries(options.queries, len(data.test))
    device = resolve_device(options.device)
    model = model.to(device)

    def embed(dataset: LabelledDataset, which: str) -> tuple[Tensor, np.ndarray]:
        return embed_dataset(
            model,
            dataset,
            batch_size=config.train.eval_batch_size,
            device=device,
            progress=options.progress,
            description=f"embedding {which}",
        )

    rng = np.random.default_rng(options.seed)
    train_items = _sample(len(data.train_eval), options.max_points, rng)
    say(
        f"embedding {len(train_items)} training and {len(data.test)} test items ({checkpoint.name})"
    )
    train_embeddings, train_labels = embed(subset(data.train_eval, train_items), "training items")
    test_embeddings, test_labels = embed(data.test, "test items")
    caption = f"Embeddings of the {checkpoint.name} model."
    maps = _map_section(
        [
            EmbeddingPanel(
                "training classes",
                train_embeddings,
                train_labels,
                sampled_from=len(data.train_eval),
            ),
            EmbeddingPanel("held-out test classes", test_embeddings, test_labels),
        ],
        plots / "embeddings.png",
        options,
        caption,
        say,
    )
    grids = _retrieval_section(data.test, test_embeddings, test_labels, plots, options, say)
    return [maps, grids, _verification_section(test_embeddings, test_labels, plots)]


def _verification_section(embeddings: Tensor, labels: np.ndarray, plots: Path) -> Section:
    """Same/different verification over every pair of the test items."""
    try:
        scores, same = verification.item_pairs(embeddings, torch.as_tensor(labels))
        curves = verification.curves(scores, same)
    except ValueError as error:  # e.g. one item per class: no genuine pair
        return _note("Verification", f"Not computed: {error}.")
    numbers = curves.summary()
    section = Section("Verification")
    section.paragraphs.append(
        f"Every pair of {verification.pairs_description(len(labels))} of the test set, by "
        "cosine similarity: a pair is accepted as the same class at a score at least the "
        "threshold."
    )
    section.tables.append(
        Table(["quantity", "value"], [[name, _number(value)] for name, value in numbers.items()])
    )
    path = plot_verification(curves, plots / "verification.png")
    section.figures.append(Figure(path, "ROC (FMR on a log scale) and precision–recall."))
    return section


# ------------------------------------------------------------------------------ maps and grids


def _map_section(
    panels: Sequence[EmbeddingPanel],
    path: Path,
    options: ReportOptions,
    caption: str,
    say: Say,
) -> Section:
    say(f"projecting embeddings to 2-D ({options.projection})")
    section = Section("Embedding maps")
    plot_embedding_maps(
        panels,
        path,
        method=options.projection,
        seed=options.seed,
        max_points=options.max_points,
        progress=options.progress,
    )
    section.figures.append(Figure(path, caption + " Colour: class; each panel projected alone."))
    return section


def _retrieval_section(
    dataset: LabelledDataset,
    embeddings: Tensor,
    labels: np.ndarray,
    plots: Path,
    options: ReportOptions,
    say: Say,
) -> Section:
    section = Section("Retrieval")
    _check_queries(options.queries, len(labels))
    if options.k > len(labels) - 1:
        raise ValueError(f"k={options.k} neighbours, but the test set has only {len(labels)} items")
    try:
        item_image(dataset, 0)
    except ValueError as error:
        section.paragraphs.append(f"No retrieval grids: {error}.")
        return section
    k = options.k
    say(f"ranking the neighbours of {len(labels)} test queries")
    lists = retrieval_lists(embeddings, labels, k=k)
    section.paragraphs.append(
        f"Each row: a test query (blue) and its {k} nearest other test items, nearest first; "
        "✓ (green) shares the query's class, ✗ (red) does not. MAP@R is the query's own."
    )

    def image_of(index: int) -> np.ndarray:
        return item_image(dataset, index)

    worst = worst_queries(lists, options.worst).tolist() if options.worst else []
    for rows, name, caption in (
        (list(options.queries), "chosen", "Chosen queries"),
        (worst, "worst", "The worst queries (lowest MAP@R)"),
    ):
        if not rows:
            continue
        path = plots / f"retrieval_{name}.png"
        plot_retrieval_grid(image_of, labels, lists, rows, path, title=caption)
        section.figures.append(Figure(path, caption))
        section.tables.append(
            Table(
                ["query", "class", "MAP@R", f"correct in the top {k}"],
                [
                    [
                        str(int(lists.queries[row])),
                        str(int(labels[lists.queries[row]])),
                        _number(float(lists.average_precision[row])),
                        str(int(lists.correct[row].sum())),
                    ]
                    for row in rows
                ],
                f"{caption}: test-item index, class, its MAP@R.",
            )
        )
    return section


def _check_queries(queries: Sequence[int], n: int) -> None:
    bad = [q for q in queries if not 0 <= q < n]
    if bad:
        raise ValueError(f"query indices {bad} are outside the {n} test items")


def _sample(n: int, limit: int, rng: np.random.Generator) -> np.ndarray:
    if n <= limit:
        return np.arange(n)
    return np.sort(rng.choice(n, size=limit, replace=False))


# ------------------------------------------------------------------------------ a sweep


def _sweep_report(
    folder: Path, plots: Path, options: ReportOptions, say: Say
) -> tuple[str, list[Section]]:
    from ..protocol.sweep_results import load_sweep, sweep_caption, sweep_table
    from .sweep import plot_sweep

    result = load_sweep(folder)
    summary = Section("Final metrics per value")
    header, rows = sweep_table(result)
    summary.tables.append(Table(header, rows, sweep_caption(result)))
    plot = Section("Sensitivity")
    path = plot_sweep(result, plots / "sweep.png", smoothing=options.smoothing)
    plot.figures.append(
        Figure(path, f"Final test metrics and training curves against {result.key}.")
    )
    config = yaml.safe_dump(result.config.to_dict(), sort_keys=False)
    return f"dmlkit sweep of {result.key}", [summary, plot, Section("Base config", code=config)]


# ------------------------------------------------------------------------------ a benchmark


def _bench_report(
    folder: Path, plots: Path, options: ReportOptions, say: Say
) -> tuple[str, list[Section]]:
    from ..protocol import rerun_dir

    results = _read_json(folder / "results.json")
    protocol = results.get("protocol", {})
    methods = results["methods"]
    overview = Section("Results")
    level = protocol.get("confidence", 0.95)
    overview.paragraphs.append(
        f"Test classes, mean ± {level:.0%} confidence interval over {protocol.get('reruns')} "
        f"re-runs of each method's best hyperparameters ({protocol.get('folds')} folds each, "
        f"{protocol.get('trials')} search trials). Separated: each fold's model alone, averaged; "
        "concatenated: the folds' L2-normalised embeddings joined."
    )
    for reading in ("separated", "concatenated"):
        metric_names = list(methods[0]["summary"][reading]) if methods else []
        overview.tables.append(
            Table(
                ["method", "val MAP@R", *[metric_label(m) for m in metric_names]],
                [
                    [
                        m["method"],
                        _number(m["best_validation"]),
                        *[_interval(m["summary"][reading][name]) for name in metric_names],
                    ]
                    for m in methods
                ],
                f"{reading.capitalize()} reading.",
            )
        )
    sections = [overview]
    for method in methods:
        name = method["method"]
        section = Section(f"{name}: {method.get('description', '')}".rstrip(": "))
        params = method.get("params", {})
        section.tables.append(
            Table(
                ["hyperparameter", "best value"],
                [[key, short_value(value)] for key, value in params.items()],
                f"Trial {method['best_trial']} of {method['trials']}.",
            )
        )
        history = folder / "plots" / f"{name}_history.png"
        if history.is_file():
            section.figures.append(Figure(history, "Search history: each trial's objective."))
        first = rerun_dir(folder, name, int(method["best_trial"]), 0)
        sections.append(section)
        if not (first / "fold-0").is_dir():
            section.paragraphs.append(f"No re-run folders under {first}: no curves or maps.")
            continue
        curves = _curves_section(first / "fold-0", plots / f"{name}_training.png", options)
        section.paragraphs += curves.paragraphs
        section.figures += [
            Figure(figure.path, "Training curves of re-run 0, fold 0.") for figure in curves.figures
        ]
        stored = sorted(first.glob("fold-*/test_embeddings.pt"))
        if options.embeddings and stored:
            sections += _bench_embedding_sections(name, first, stored, plots, options, say)
    return f"dmlkit benchmark {folder.name}", sections


def _bench_embedding_sections(
    name: str,
    first: Path,
    stored: Sequence[Path],
    plots: Path,
    options: ReportOptions,
    say: Say,
) -> list[Section]:
    from ..protocol import concatenated_test_embeddings

    embeddings, labels_tensor = concatenated_test_embeddings(stored)
    labels = labels_tensor.numpy()
    maps = _map_section(
        [EmbeddingPanel(f"{name}: held-out test classes", embeddings, labels)],
        plots / f"{name}_embeddings.png",
        options,
        f"Re-run 0's test embeddings, the {len(stored)} folds' models concatenated.",
        say,
    )
    maps.title = f"{name}: embedding map"
    config = config_from_dict(_read_yaml(first / "fold-0" / "config.yaml"), check=False)
    try:
        test = build_run_data(config.data, config.train.seed).test
    except FileNotFoundError as error:
        return [maps, _note(f"{name}: retrieval", f"The data is not available here ({error}).")]
    grids = _retrieval_section(test, embeddings, labels, plots / name, options, say)
    grids.title = f"{name}: retrieval"
    return [maps, grids]


# ------------------------------------------------------------------------------ HTML

_STYLE = """
body { font: 15px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1200px;
       padding: 0 1em; color: #1d1d1f; }
h1 { font-size: 1.6em; margin-bottom: 0.1em; }
h2 { font-size: 1.25em; border-bottom: 1px solid #ddd; padding-bottom: 0.2em; margin-top: 2em; }
.meta { color: #666; font-size: 0.9em; }
table { border-collapse: collapse; margin: 0.8em 0; font-variant-numeric: tabular-nums;
        display: block; max-width: 100%; overflow-x: auto; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.7em; text-align: right; white-space: nowrap; }
th:first-child, td:first-child { text-align: left; }
th { background: #f3f3f3; }
caption { caption-side: top; text-align: left; color: #555; padding-bottom: 0.3em; }
figure { margin: 1em 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { color: #555; font-size: 0.9em; }
pre { background: #f7f7f7; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
"""


def render_html(title: str, sections: Sequence[Section]) -> str:
    """The page: a title, then each section's paragraphs, tables, figures and code.

    Args:
        title: The page title.
        sections: Its sections, in order; figures are read and embedded as base64 PNGs.

    Returns:
        A complete HTML5 document that references no other file.
    """
    e = html.escape
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        '<head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{e(title)}</title><style>{_STYLE}</style></head>",
        "<body>",
        f"<h1>{e(title)}</h1>",
        f'<p class="meta">Written by dmlkit {e(__version__)} on {stamp}.</p>',
    ]
    for section in sections:
        parts.append(f"<section><h2>{e(section.title)}</h2>")
        parts += [f"<p>{e(text)}</p>" for text in section.paragraphs]
        parts += [_table_html(table) for table in section.tables]
        for figure in section.figures:
            data = base64.b64encode(figure.path.read_bytes()).decode("ascii")
            parts.append(
                f'<figure><img alt="{e(figure.caption or figure.path.name)}" '
                f'src="data:image/png;base64,{data}">'
                f"<figcaption>{e(figure.caption)}</figcaption></figure>"
            )
        if section.code is not None:
            parts.append(f"<details><summary>show</summary><pre>{e(section.code)}</pre></details>")
        parts.append("</section>")
    parts += ["</body>", "</html>", ""]
    return "\n".join(parts)


def _table_html(table: Table) -> str:
    e = html.escape
    caption = f"<caption>{e(table.caption)}</caption>" if table.caption else ""
    head = "".join(f"<th>{e(cell)}</th>" for cell in table.header)
    body = "".join(
        "<tr>" + "".join(f"<td>{e(cell)}</td>" for cell in row) + "</tr>" for row in table.rows
    )
    return f"<table>{caption}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _note(title: str, text: str) -> Section:
    return Section(title, paragraphs=[text])


# ------------------------------------------------------------------------------ small readers


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path} does not hold a JSON object")
    return value


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing")
    value = yaml.safe_load(path.read_text()) or {}
    if not isinstance(value, dict):
        raise ValueError(f"{path} does not hold a YAML mapping")
    return value


def _number(value: object) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.4f}" if abs(value) < 100 else f"{value:,.1f}"
    return str(value)


def _interval(summary: Mapping[str, Any]) -> str:
    from ..protocol.stats import Interval

    return str(Interval(summary["mean"], summary["half_width"], summary["n"]))
