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
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from ddtas_ablation import COMMON, METRICS, REPORTED, SETUPS
from dmlkit.protocol import confidence_interval
from dmlkit.training import Trainer, load_config, real_data_dir
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


def _refresh_seconds(run_dir: Path) -> tuple[float, int]:
    path = run_dir / "mining.csv"
    if not path.is_file():
        return 0.0, 0
    with path.open(newline="") as file:
        rows = list(csv.DictReader(file))
    return sum(float(row["seconds"]) for row in rows), len(rows)


def run(
    setups: list[str], methods: list[str], seeds: list[int], workdir: Path, cache: Path, out: Path
) -> dict[str, Any]:
    data_dir = real_data_dir()
    pretrained = data_dir / "mobilenet_v2_imagenet" / "mobilenet_v2-b0353104.pth"
    results: dict[str, Any] = {"seeds": seeds, "rows": []}
    for name in setups:
        setup = SETUPS[name]
        if not (data_dir / setup["data"]).is_dir():
            print(f"{data_dir / setup['data']} not found; {name} skipped", flush=True)
            continue
        for method in methods:
            for seed in seeds:
                overrides = [
                    *(o.format(pretrained=pretrained, cache=cache) for o in setup["overrides"]),
                    *COMMON,
                    *METHODS[method],
                    f"train.max_steps={setup['steps']}",
                    f"train.seed={seed}",
                ]
                config = load_config(setup["config"], overrides)
                config.validation.metrics = METRICS
                run_dir = workdir / f"{name}-{len(results['rows'])}"
                start = time.perf_counter()
                result = Trainer(config, run_dir).fit()
                seconds = time.perf_counter() - start
                refresh, refreshes = _refresh_seconds(run_dir)
                results["rows"].append(
                    {
                        "setup": name,
                        "method": method,
                        "seed": seed,
                        "after": result.after,
                        "steps": result.steps,
                        "seconds": seconds,
                        "refresh_seconds": refresh,
                        "refreshes": refreshes,
                    }
                )
                print(
                    f"{name:14s} {method:42s} seed {seed}  "
                    f"MAP@R {result.after['mean_average_precision_at_r']:.4f}  "
                    f"P@1 {result.after['precision_at_1']:.4f}  {seconds:.0f} s "
                    f"(refreshes {refresh:.1f} s)",
                    flush=True,
                )
                out.with_suffix(".json").write_text(json.dumps(results, indent=2))
    return results


def markdown(results: dict[str, Any]) -> str:
    seeds = results["seeds"]
    lines = [
        "# Offline against online mining on real data (CPU)",
        "",
        f"`python benchmarks/offline_mining.py`: seeds {', '.join(map(str, seeds))}; mean ± 95% "
        f"confidence interval (Student t, {len(seeds) - 1} degrees of freedom); "
        f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, "
        f"torch {torch.__version__}. Batch 16 classes × 5; test classes held out, each test item "
        "querying the others. Refreshes: every epoch, the training set embedded and mined again "
        "(their summed wall-clock seconds per run).",
        "",
    ]
    reported = REPORTED
    for setup in dict.fromkeys(row["setup"] for row in results["rows"]):
        rows = [row for row in results["rows"] if row["setup"] == setup]
        lines += [
            f"## {setup}: {rows[0]['steps']} steps",
            "",
            "| Method | "
            + " | ".join(label for _, label in reported)
            + " | Refreshes | Refresh s/run | s/run |",
            "|---|" + "---:|" * (len(reported) + 3),
        ]
        for method in dict.fromkeys(row["method"] for row in rows):
            runs = [row for row in rows if row["method"] == method]
            cells = []
            for key, _ in reported:
                interval = confidence_interval([row["after"][key] for row in runs])
                cells.append(f"{interval.mean:.3f} ± {interval.half_width:.3f}")
            refreshes = statistics.fmean(row["refreshes"] for row in runs)
            refresh = statistics.fmean(row["refresh_seconds"] for row in runs)
            seconds = statistics.fmean(row["seconds"] for row in runs)
            lines.append(
                f"| {method} | "
                + " | ".join(cells)
                + f" | {refreshes:.0f} | {refresh:.1f} | {seconds:.0f} |"
            )
        lines.append("")
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
        results = run(args.setups, args.methods, args.seeds, Path(workdir), args.cache_dir, out)
    text = markdown(results)
    out.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
