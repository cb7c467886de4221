"""What the real-data benchmarks share: the set-ups (Omniglot, the CUB head), the common run
settings, one loop that trains every (set-up, method, seed) and the tables of its results.

Used by ``ddtas_ablation.py`` and ``offline_mining.py``.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from dmlkit.protocol import confidence_interval
from dmlkit.training import Trainer, load_config, real_data_dir
from training import SETUPS as TRAINING_SETUPS

METRICS = ("precision_at_1", "recall_at_k", "r_precision", "mean_average_precision_at_r")
REPORTED = (
    ("mean_average_precision_at_r", "MAP@R"),
    ("r_precision", "R-Prec"),
    ("precision_at_1", "P@1"),
    ("recall_at_1", "R@1"),
    ("recall_at_2", "R@2"),
    ("recall_at_4", "R@4"),
    ("recall_at_8", "R@8"),
)


COMMON = [
    "sampler.classes_per_batch=16",
    "sampler.samples_per_class=5",
    "validation.every=0",
    "validation.before_training=false",
    "logging.progress=false",
    "logging.log_every=5",
    "validation.recall_at=[1, 2, 4, 8]",
]
# The data set-ups of the training benchmark, with this benchmark's budget.
SETUPS: dict[str, dict[str, Any]] = {
    "omniglot": {
        **TRAINING_SETUPS["omniglot"],
        "overrides": [
            *TRAINING_SETUPS["omniglot"]["overrides"],
            "train.epochs=100",
            "optimizer.lr=1e-3",
        ],
        "steps": 300,
    },
    "cub100_subset": {
        **TRAINING_SETUPS["cub100_subset"],
        "overrides": [*TRAINING_SETUPS["cub100_subset"]["overrides"], "train.epochs=1000"],
        "steps": 600,
        "frozen_features": True,
    },
}


Row = dict[str, Any]
# (set-up, method) -> why it is skipped, or None to run it.
Skip = Callable[[dict[str, Any], str], str | None]
# (run folder, the row so far, seed) -> more columns for the row (and any files to keep).
AfterRun = Callable[[Path, Row, int], Row]


def train_runs(
    setups: Sequence[str],
    methods: Mapping[str, Sequence[str]],
    seeds: Sequence[int],
    workdir: Path,
    cache: Path,
    out: Path,
    *,
    skip: Skip | None = None,
    after_run: AfterRun | None = None,
) -> dict[str, Any]:
    """Trains every method on every set-up with every seed, evaluating on the test classes;
    the results are rewritten to ``<out>.json`` after each run.

    Args:
        setups: Names in :data:`SETUPS`; a set-up whose data is absent is skipped (said).
        methods: Method name -> its config overrides.
        seeds: The seeds, the same for every method.
        workdir: Where the run folders go.
        cache: The frozen-backbone feature cache.
        out: The results stem.
        skip: Says why a (set-up, method) is not run, or None.
        after_run: More columns for a finished run's row.
    """
    data_dir = real_data_dir()
    pretrained = data_dir / "mobilenet_v2_imagenet" / "mobilenet_v2-b0353104.pth"
    results: dict[str, Any] = {"seeds": list(seeds), "rows": []}
    for name in setups:
        setup = SETUPS[name]
        if not (data_dir / setup["data"]).is_dir():
            print(f"{data_dir / setup['data']} not found; {name} skipped", flush=True)
            continue
        for method, method_overrides in methods.items():
            reason = skip(setup, method) if skip is not None else None
            if reason is not None:
                print(f"{name}: {method!r} skipped ({reason})", flush=True)
                continue
            for seed in seeds:
                overrides = [
                    *(o.format(pretrained=pretrained, cache=cache) for o in setup["overrides"]),
                    *COMMON,
                    *method_overrides,
                    f"train.max_steps={setup['steps']}",
                    f"train.seed={seed}",
                ]
                config = load_config(setup["config"], overrides)
                config.validation.metrics = METRICS
                run_dir = workdir / f"{name}-{len(results['rows'])}"
                start = time.perf_counter()
                result = Trainer(config, run_dir).fit()
                assert result.after is not None
                row: Row = {
                    "setup": name,
                    "method": method,
                    "seed": seed,
                    "after": result.after,
                    "steps": result.steps,
                    "images_per_second": result.images_per_second,
                    "seconds": time.perf_counter() - start,
                }
                if after_run is not None:
                    row |= after_run(run_dir, row, seed)
                results["rows"].append(row)
                print(
                    f"{name:14s} {method:42s} seed {seed}  "
                    f"MAP@R {result.after['mean_average_precision_at_r']:.4f}  "
                    f"P@1 {result.after['precision_at_1']:.4f}  {row['seconds']:.0f} s",
                    flush=True,
                )
                out.with_suffix(".json").write_text(json.dumps(results, indent=2))
    return results


def header(title: str, script: str, seeds: Sequence[int], details: str) -> list[str]:
    """A results file's title and its paragraph on how it was measured."""
    return [
        f"# {title}",
        "",
        f"`python benchmarks/{script}`: seeds {', '.join(map(str, seeds))}; mean ± 95% "
        f"confidence interval (Student t, {len(seeds) - 1} degrees of freedom); "
        f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, "
        f"torch {torch.__version__}. Batch 16 classes × 5; test classes held out, each test item "
        f"querying the others. {details}",
        "",
    ]


# A table column after the metrics: (header, the cell from a method's rows).
Column = tuple[str, Callable[[list[Row]], str]]


def seconds_per_run(rows: list[Row]) -> str:
    """The mean wall-clock seconds of the runs."""
    return f"{statistics.fmean(row['seconds'] for row in rows):.0f}"


def method_tables(results: dict[str, Any], columns: Sequence[Column]) -> list[str]:
    """One Markdown table per set-up: each method's metrics (mean ± 95% CI over the seeds),
    then ``columns``."""
    lines: list[str] = []
    for setup in dict.fromkeys(row["setup"] for row in results["rows"]):
        rows = [row for row in results["rows"] if row["setup"] == setup]
        headers = [label for _, label in REPORTED] + [header for header, _ in columns]
        lines += [
            f"## {setup}: {rows[0]['steps']} steps",
            "",
            "| Method | " + " | ".join(headers) + " |",
            "|---|" + "---:|" * len(headers),
        ]
        for method in dict.fromkeys(row["method"] for row in rows):
            runs = [row for row in rows if row["method"] == method]
            cells = []
            for key, _ in REPORTED:
                interval = confidence_interval([row["after"][key] for row in runs])
                cells.append(f"{interval.mean:.3f} ± {interval.half_width:.3f}")
            cells += [cell(runs) for _, cell in columns]
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines
