"""Offline (whole-set) mining against online (in-batch) mining, on real data.

Methods, each trained with the same budget (steps, batch 16 classes × 5, optimiser, learning
rate) and seeds, then evaluated on the held-out test classes:

- online: the multi-similarity loss with its miner, and the triplet loss (margin 0.1) with
  semi-hard triplet mining, on random P×K batches;
- hard classes (``sampler.mode=hard_classes``, refreshed every epoch, a quarter of each
  batch's classes random): the same two losses and miners, on batches of confusable classes;
- offline triplets (``sampler.mode=offline_triplets``): semi-hard triplets (margin 0.1) mined
  over the whole training set every epoch, the triplet loss on exactly those.

Set-ups (as ``benchmarks/ddtas_ablation.py``): **Omniglot** (ConvNet, 300 steps) and
**cub100_subset** (frozen MobileNetV2 features, linear 128-d head, 600 steps). Besides MAP@R,
R-Precision and P@1 (mean ± 95% CI over seeds), each row reports the wall-clock seconds of its
refreshes (embedding the training set and mining), summed over the run.

Run ``python benchmarks/offline_mining.py`` (CPU, about 30 minutes on 2 cores). Results go to
``benchmarks/results/offline_mining_cpu.{md,json}``.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from real_runs import SETUPS, Row, header, method_tables, seconds_per_run, train_runs
from training import add_cache_dir_option

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

MULTI_SIMILARITY = ["loss.name=MultiSimilarityLoss", "miner.name=MultiSimilarityMiner"]
TRIPLET = [
    "loss.name=TripletMarginLoss",
    "loss.options={margin: 0.1}",
    "miner.name=TripletMarginMiner",
    "miner.options={margin: 0.1, type_of_triplets: semihard}",
]
HARD_CLASSES = ["sampler.mode=hard_classes", "sampler.refresh=1", "sampler.random_share=0.25"]
METHODS: dict[str, list[str]] = {
    "online: MS loss + miner": MULTI_SIMILARITY,
    "online: triplet, semi-hard mining": TRIPLET,
    "hard classes: MS loss + miner": [*MULTI_SIMILARITY, *HARD_CLASSES],
    "hard classes: triplet, semi-hard mining": [*TRIPLET, *HARD_CLASSES],
    "offline triplets: semi-hard, whole set": [
        "loss.name=TripletMarginLoss",
        "loss.options={margin: 0.1}",
        "miner.name=null",
        "sampler.mode=offline_triplets",
        "sampler.triplets=semihard",
        "sampler.triplet_margin=0.1",
        "sampler.refresh=1",
    ],
}


def _refreshes(run_dir: Path, row: Row, seed: int) -> Row:
    """The run's refreshes from its mining.csv: how many, and their summed seconds."""
    del row, seed
    path = run_dir / "mining.csv"
    if not path.is_file():
        return {"refresh_seconds": 0.0, "refreshes": 0}
    with path.open(newline="") as file:
        logged = list(csv.DictReader(file))
    return {"refresh_seconds": sum(float(r["seconds"]) for r in logged), "refreshes": len(logged)}


def _mean_of(key: str, digits: int) -> Callable[[list[Row]], str]:
    return lambda runs: f"{statistics.fmean(run[key] for run in runs):.{digits}f}"


def markdown(results: dict[str, Any]) -> str:
    seeds = results["seeds"]
    lines = header(
        "Offline against online mining on real data (CPU)",
        "offline_mining.py",
        seeds,
        "Refreshes: every epoch, the training set embedded and mined again (their summed "
        "wall-clock seconds per run).",
    )
    columns = [
        ("Refreshes", _mean_of("refreshes", 0)),
        ("Refresh s/run", _mean_of("refresh_seconds", 1)),
        ("s/run", seconds_per_run),
    ]
    lines += method_tables(results, columns)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setups", nargs="+", default=list(SETUPS), choices=list(SETUPS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, help="override every set-up's step budget")
    parser.add_argument("--name", default="offline_mining_cpu", help="results file stem")
    parser.add_argument("--from-json", type=Path, help="only re-render the Markdown table")
    add_cache_dir_option(parser)
    args = parser.parse_args()
    if args.from_json is not None:
        text = markdown(json.loads(args.from_json.read_text()))
        args.from_json.with_suffix(".md").write_text(text)
        print(text)
        return
    if args.steps is not None:
        for setup in SETUPS.values():
            setup["steps"] = args.steps
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / args.name
    with tempfile.TemporaryDirectory() as workdir:
        chosen = {method: METHODS[method] for method in args.methods}
        results = train_runs(
            args.setups, chosen, args.seeds, Path(workdir), args.cache_dir, out,
            after_run=_refreshes,
        )  # fmt: skip
    text = markdown(results)
    out.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
