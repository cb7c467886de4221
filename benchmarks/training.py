"""Training on real data: retrieval on held-out classes before and after training, and throughput.

Two set-ups, each trained with the triplet, multi-similarity and contrastive losses on the same
budget and seed:

- **Omniglot**: the small ConvNet on 28×28 images, trained on the 964 background characters and
  evaluated on the 659 evaluation characters (13,180 images, each querying the others).
- **cub100_subset**: ImageNet MobileNetV2 features computed once (frozen backbone, 1280-d
  average-pooled) and a linear 128-d head trained on them; 58 training / 42 test species (the
  standard CUB class split). The untrained 1280-d features themselves are reported too, since
  they are the bar a trained head has to clear.

"Before" is the untrained network (random ConvNet; random head on the frozen features).
Throughput is training images per second on the CPU, excluding evaluation; for the CUB head it is
the head's, and the one-off feature extraction is reported separately.

Run ``python benchmarks/training.py`` (about 20 minutes on 2 cores, 7 of them extracting the CUB
features once; they are kept in ``build/feature_cache``). Results go to
``benchmarks/results/training_cpu.{md,json}``. The real-data folder is
``$DMLKIT_DATA`` (the Makefile sets ``../shared/data``; unset, the run stops saying so); a set-up
whose data is absent is skipped with a message.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from dmlkit.evaluation import evaluate
from dmlkit.models import load_feature_cache
from dmlkit.training import Trainer, load_config, real_data_dir

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
METRICS = ("precision_at_1", "recall_at_k", "r_precision", "mean_average_precision_at_r")

LOSSES: dict[str, list[str]] = {
    "triplet": [
        "loss.name=TripletMarginLoss",
        "loss.options={margin: 0.1}",
        "miner.name=TripletMarginMiner",
        "miner.options={margin: 0.1, type_of_triplets: semihard}",
    ],
    "multi-similarity": [
        "loss.name=MultiSimilarityLoss",
        "miner.name=MultiSimilarityMiner",
    ],
    "contrastive": [
        "loss.name=ContrastiveLoss",
        "loss.options={pos_margin: 0.0, neg_margin: 0.5}",
        "miner.name=null",
    ],
}

SETUPS: dict[str, dict[str, Any]] = {
    "omniglot": {
        "data": "omniglot",
        "config": ROOT / "configs" / "omniglot.yaml",
        "overrides": ["data.val_classes=0", "validation.every=0", "train.epochs=3"],
    },
    "cub100_subset": {
        "data": "cub100_subset",
        "config": None,
        "overrides": [
            "data.name=cub100_subset",
            "model.backbone=mobilenet_v2",
            "model.pretrained={pretrained}",
            "model.freeze_backbone=true",
            "model.embedding_dim=128",
            "model.cache_dir={cache}",
            "sampler.classes_per_batch=16",
            "sampler.samples_per_class=4",
            "optimizer.lr=1e-4",
            "train.epochs=20",
            "train.eval_batch_size=64",
            "validation.every=0",
        ],
    },
}


def _row(name: str, loss: str, result: Any, seconds: float) -> dict[str, Any]:
    return {
        "setup": name,
        "loss": loss,
        "before": result.before,
        "after": result.after,
        "steps": result.steps,
        "images_per_second": result.images_per_second,
        "seconds": seconds,
    }


def run(setups: list[str], seed: int, workdir: Path, cache: Path) -> dict[str, Any]:
    data_dir = real_data_dir()
    pretrained = data_dir / "mobilenet_v2_imagenet" / "mobilenet_v2-b0353104.pth"
    rows: list[dict[str, Any]] = []
    extras: dict[str, Any] = {}
    for name in setups:
        setup = SETUPS[name]
        if not (data_dir / setup["data"]).is_dir():
            print(f"{data_dir / setup['data']} not found; {name} skipped")
            continue
        for loss, loss_overrides in LOSSES.items():
            overrides = [
                o.format(pretrained=pretrained, cache=cache) for o in setup["overrides"]
            ] + [*loss_overrides, f"train.seed={seed}", "logging.progress=false"]
            config = load_config(setup["config"], overrides)
            config.validation.metrics = METRICS
            cached_before = any(cache.glob("*.pt"))
            start = time.perf_counter()
            trainer = Trainer(config, workdir / f"{name}-{loss}")
            if name == "cub100_subset" and "feature_extraction_images" not in extras:
                extras["features_from_cache"] = cached_before
                extras["feature_extraction_seconds"] = time.perf_counter() - start
                extras["feature_extraction_images"] = len(trainer.data.train) + len(
                    trainer.data.test
                )
            result = trainer.fit()
            seconds = time.perf_counter() - start
            rows.append(_row(name, loss, result, seconds))
            print(
                f"{name:14s} {loss:17s} P@1 {result.before['precision_at_1']:.3f} → "
                f"{result.after['precision_at_1']:.3f}  MAP@R "
                f"{result.before['mean_average_precision_at_r']:.3f} → "
                f"{result.after['mean_average_precision_at_r']:.3f}  "
                f"{result.images_per_second:.0f} img/s  {seconds:.0f} s",
                flush=True,
            )
        if name == "cub100_subset":
            test_cache = next(cache.glob(f"{trainer.data.cache_key}-*-test.pt"))
            features = load_feature_cache(test_cache)
            raw = evaluate(features.features, features.labels, metrics=METRICS, knn=None)
            cosine = evaluate(
                torch.nn.functional.normalize(features.features, dim=1),
                features.labels,
                metrics=METRICS,
            )
            extras["raw_features_euclidean"] = dict(raw.metrics)
            extras["raw_features_cosine"] = dict(cosine.metrics)
    return {"rows": rows, **extras}


def _markdown(results: dict[str, Any], seed: int) -> str:
    lines = [
        "# Training on real data (CPU)",
        "",
        f"`python benchmarks/training.py`, seed {seed}, one run per cell, "
        f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, "
        f"torch {torch.__version__}.",
        "",
        "| Set-up | Loss | P@1 before | P@1 after | MAP@R before | MAP@R after "
        "| R@1 after | Steps | Train images/s | Wall time |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in results["rows"]:
        before, after = row["before"], row["after"]
        lines.append(
            f"| {row['setup']} | {row['loss']} | {before['precision_at_1']:.3f} | "
            f"{after['precision_at_1']:.3f} | {before['mean_average_precision_at_r']:.3f} | "
            f"{after['mean_average_precision_at_r']:.3f} | {after['recall_at_1']:.3f} | "
            f"{row['steps']} | {row['images_per_second']:.0f} | {row['seconds']:.0f} s |"
        )
    if "raw_features_cosine" in results:
        raw = results["raw_features_cosine"]
        lines += [
            "",
            "Untrained MobileNetV2 features (1280-d, cosine) on the 42 test species: "
            f"P@1 {raw['precision_at_1']:.3f}, MAP@R {raw['mean_average_precision_at_r']:.3f}, "
            f"R@1 {raw['recall_at_1']:.3f}.",
        ]
        images, seconds = (
            results["feature_extraction_images"],
            results["feature_extraction_seconds"],
        )
        if results["features_from_cache"]:
            lines[-1] += f" The {images} images' features were read from the cache."
        else:
            lines[-1] += (
                f" Feature extraction: {images} images in {seconds:.0f} s "
                f"({images / seconds:.0f} images/s)."
            )
    return "\n".join(lines) + "\n"


def add_cache_dir_option(parser: argparse.ArgumentParser) -> None:
    """``--cache-dir``: where the frozen-backbone features are kept between benchmark runs."""
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=ROOT / "build" / "feature_cache",
        help="where the frozen-backbone features are kept between runs (git-ignored)",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setups", nargs="+", default=list(SETUPS), choices=list(SETUPS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default="training_cpu", help="results file stem")
    add_cache_dir_option(parser)
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra config override for every run, e.g. --set optimizer.lr=1e-3",
    )
    args = parser.parse_args()
    for setup in SETUPS.values():
        setup["overrides"] = [*setup["overrides"], *args.set]
    with tempfile.TemporaryDirectory() as workdir:
        results = run(args.setups, args.seed, Path(workdir), args.cache_dir)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(results, indent=2))
    markdown = _markdown(results, args.seed)
    (RESULTS / f"{args.name}.md").write_text(markdown)
    print(markdown)


if __name__ == "__main__":
    main()
