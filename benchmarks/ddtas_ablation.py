"""DDTAS ablation on real data: what each part of the method does, against standard losses.

Every method trains with the same budget (steps, batch 16 classes × 5, optimiser, learning rate)
and the same seeds, then embeds the held-out test classes, each test item querying the others.
Methods:

- the Soft Contrastive loss (α 40, β 2, λ 0.7) with multi-similarity mining at ε = 0.1 (the
  base), then with static ASMS (+ASMS, γ 0.1 / 0.01), with AT-ASMS (+AT-ASMS, the released
  runnable configuration), the base with the Online Threshold Generator (+OTG, closed form, joint
  normalisation as released), and full DDTAS (AT-ASMS + OTG); full DDTAS with the OTG's
  separate normalisation (a deviation, docs/ddtas.md §5.4) is an extra row;
- baselines: the multi-similarity loss with its miner, the triplet loss with semi-hard mining and
  the contrastive loss.

Set-ups: **Omniglot** with the small ConvNet on 28×28 images (964 training, 659 test characters)
and **cub100_subset** with frozen ImageNet MobileNetV2 features and a linear 128-d head (58
training, 42 test species). Results are mean ± 95% confidence interval (Student t over seeds).

Run ``python benchmarks/ddtas_ablation.py`` (CPU, about 40 minutes on 2 cores). Results go to
``benchmarks/results/ddtas_ablation_cpu.{md,json}``, with the threshold curves of one full DDTAS
run per set-up. A set-up whose data is absent from the shared data folder is skipped.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from dmlkit.protocol import confidence_interval
from dmlkit.training import Trainer, load_config, real_data_dir
from dmlkit.viz import plot_training_log
from training import SETUPS as TRAINING_SETUPS
from training import add_cache_dir_option

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
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

SOFT_CONTRASTIVE = [
    "loss.name=SoftContrastiveLoss",
    "loss.options={pos_scale: 2.0, neg_scale: 40.0, threshold: 0.7}",
]
AT_ASMS_OTG = [
    *SOFT_CONTRASTIVE,
    "miner.name=ATASMSMiner",
    "miner.options={epsilon: 0.1}",
    "objective.name=DDTASObjective",
]
METHODS: dict[str, list[str]] = {
    "base: MS mining + soft contrastive": [
        *SOFT_CONTRASTIVE,
        "miner.name=MultiSimilarityMiner",
        "miner.options={epsilon: 0.1}",
    ],
    "+ASMS": [
        *SOFT_CONTRASTIVE,
        "miner.name=ASMSMiner",
        "miner.options={gamma_pos: 0.1, gamma_neg: 0.01}",
    ],
    "+AT-ASMS": [*SOFT_CONTRASTIVE, "miner.name=ATASMSMiner", "miner.options={epsilon: 0.1}"],
    "+OTG (on the base)": [
        *SOFT_CONTRASTIVE,
        "miner.name=MultiSimilarityMiner",
        "miner.options={epsilon: 0.1}",
        "objective.name=DDTASObjective",
    ],
    "full DDTAS (AT-ASMS + OTG)": [
        *SOFT_CONTRASTIVE,
        "miner.name=ATASMSMiner",
        "miner.options={epsilon: 0.1}",
        "objective.name=DDTASObjective",
    ],
    "full DDTAS, separate OTG normalisation": [
        *SOFT_CONTRASTIVE,
        "miner.name=ATASMSMiner",
        "miner.options={epsilon: 0.1}",
        "objective.name=DDTASObjective",
        "objective.options.normalization=separate",
    ],
    # The OTG variants of docs/ddtas_ablation.md (AT-ASMS + soft contrastive + OTG).
    "v1: memory meta loss (8 per class)": [
        *AT_ASMS_OTG,
        "objective.options.memory_size=8",
    ],
    "v2: held-out meta classes (20%)": [
        *AT_ASMS_OTG,
        "data.val_classes=0.2",
        "objective.options.meta_source=held_out",
    ],
    "v2 control: 20% of classes held out, meta from training": [
        *AT_ASMS_OTG,
        "data.val_classes=0.2",
    ],
    "v3: per-pair loss weights": [*AT_ASMS_OTG, "objective.options.reading=loss_weights"],
    "v4: online threshold (per side)": [
        *AT_ASMS_OTG,
        "objective.options={reading: online_threshold, per_side: true}",
    ],
    "cost: OTG on head + last block": [
        *AT_ASMS_OTG,
        "objective.options.scope=head_and_last_block",
    ],
    "multi-similarity loss + miner": [
        "loss.name=MultiSimilarityLoss",
        "miner.name=MultiSimilarityMiner",
    ],
    "triplet (semi-hard, margin 0.1)": [
        "loss.name=TripletMarginLoss",
        "loss.options={margin: 0.1}",
        "miner.name=TripletMarginMiner",
        "miner.options={margin: 0.1, type_of_triplets: semihard}",
    ],
    "contrastive (0, 0.5)": [
        "loss.name=ContrastiveLoss",
        "loss.options={pos_margin: 0.0, neg_margin: 0.5}",
        "miner.name=null",
    ],
}
PLOTTED = "full DDTAS (AT-ASMS + OTG)"
# The issue-20 ablation (``--methods otg-variants``): no OTG, the released OTG, the variants.
OTG_VARIANTS = [
    "+AT-ASMS",
    "full DDTAS (AT-ASMS + OTG)",
    "v1: memory meta loss (8 per class)",
    "v2: held-out meta classes (20%)",
    "v2 control: 20% of classes held out, meta from training",
    "v3: per-pair loss weights",
    "v4: online threshold (per side)",
    "cost: OTG on head + last block",
]

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
            if method.startswith("cost:") and setup.get("frozen_features"):
                # The model trained there is the head alone: the cost option changes nothing.
                print(f"{name}: {method!r} skipped (only the head is trained)", flush=True)
                continue
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
                summary = json.loads((run_dir / "results.json").read_text())
                results["rows"].append(
                    {
                        "setup": name,
                        "method": method,
                        "seed": seed,
                        "after": result.after,
                        "steps": result.steps,
                        "skipped_steps": summary["skipped_steps"],
                        "images_per_second": result.images_per_second,
                        "seconds": seconds,
                    }
                )
                if method in OTG_VARIANTS[1:] and seed == seeds[0]:
                    plot = plot_training_log(run_dir)
                    slug = "thresholds" if method == PLOTTED else _slug(method)
                    shutil.copy(plot, out.with_name(f"{out.name}_{name}_{slug}.png"))
                print(
                    f"{name:14s} {method:40s} seed {seed}  "
                    f"MAP@R {result.after['mean_average_precision_at_r']:.4f}  "
                    f"P@1 {result.after['precision_at_1']:.4f}  "
                    f"skipped {summary['skipped_steps']}  {seconds:.0f} s",
                    flush=True,
                )
                out.with_suffix(".json").write_text(json.dumps(results, indent=2))
    return results


def _slug(method: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", method.split(":")[0].lower()).strip("_")


def markdown(results: dict[str, Any]) -> str:
    seeds = results["seeds"]
    lines = [
        "# DDTAS ablation on real data (CPU)",
        "",
        f"`python benchmarks/ddtas_ablation.py`: seeds {', '.join(map(str, seeds))}; mean ± 95% "
        f"confidence interval (Student t, {len(seeds) - 1} degrees of freedom); "
        f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, "
        f"torch {torch.__version__}. Batch 16 classes × 5; test classes held out, each test item "
        "querying the others. Soft contrastive: α 40, β 2, λ 0.7; MS mining ε 0.1; ASMS γ 0.1 / "
        "0.01; OTG: closed form, meta batch 5 × 2 from the training set.",
        "",
    ]
    if "note" in results:
        lines += [f"Note: {results['note']}.", ""]
    for setup in dict.fromkeys(row["setup"] for row in results["rows"]):
        rows = [row for row in results["rows"] if row["setup"] == setup]
        first = rows[0]
        lines += [
            f"## {setup}: {first['steps']} steps",
            "",
            "| Method | "
            + " | ".join(label for _, label in REPORTED)
            + " | Skipped steps | s/run |",
            "|---|" + "---:|" * (len(REPORTED) + 2),
        ]
        for method in dict.fromkeys(row["method"] for row in rows):
            runs = [row for row in rows if row["method"] == method]
            cells = []
            for key, _ in REPORTED:
                interval = confidence_interval([row["after"][key] for row in runs])
                cells.append(f"{interval.mean:.3f} ± {interval.half_width:.3f}")
            skipped = statistics.fmean(row["skipped_steps"] for row in runs)
            seconds = statistics.fmean(row["seconds"] for row in runs)
            lines.append(
                f"| {method} | " + " | ".join(cells) + f" | {skipped:.1f} | {seconds:.0f} |"
            )
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setups", nargs="+", default=list(SETUPS), choices=list(SETUPS))
    parser.add_argument(
        "--methods",
        nargs="+",
        default=list(METHODS),
        choices=[*METHODS, "otg-variants"],
        help="methods to run; otg-variants: no OTG, the released OTG and its variants",
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, help="override every set-up's step budget")
    parser.add_argument("--name", default="ddtas_ablation_cpu", help="results file stem")
    add_cache_dir_option(parser)
    parser.add_argument(
        "--from-json",
        type=Path,
        help="only re-render the Markdown table from a results JSON written by an earlier run",
    )
    args = parser.parse_args()
    if args.from_json is not None:
        text = markdown(json.loads(args.from_json.read_text()))
        args.from_json.with_suffix(".md").write_text(text)
        print(text)
        return
    if args.methods == ["otg-variants"]:
        args.methods = OTG_VARIANTS
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
