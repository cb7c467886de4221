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
import re
import shutil
import statistics
import tempfile
from pathlib import Path
from typing import Any

from dmlkit.viz import plot_training_log
from real_runs import SETUPS, AfterRun, Row, header, method_tables, seconds_per_run, train_runs
from training import add_cache_dir_option

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
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


def _after_run(out: Path, first_seed: int) -> AfterRun:
    def after(run_dir: Path, row: Row, seed: int) -> Row:
        summary = json.loads((run_dir / "results.json").read_text())
        method = row["method"]
        if method in OTG_VARIANTS[1:] and seed == first_seed:
            plot = plot_training_log(run_dir)
            slug = "thresholds" if method == PLOTTED else _slug(method)
            shutil.copy(plot, out.with_name(f"{out.name}_{row['setup']}_{slug}.png"))
        return {"skipped_steps": summary["skipped_steps"]}

    return after


def _skip(setup: dict[str, Any], method: str) -> str | None:
    if method.startswith("cost:") and setup.get("frozen_features"):
        return "only the head is trained: the cost option changes nothing"
    return None


def run(
    setups: list[str], methods: list[str], seeds: list[int], workdir: Path, cache: Path, out: Path
) -> dict[str, Any]:
    chosen = {method: METHODS[method] for method in methods}
    return train_runs(
        setups, chosen, seeds, workdir, cache, out, skip=_skip, after_run=_after_run(out, seeds[0])
    )


def _skipped(runs: list[Row]) -> str:
    return f"{statistics.fmean(run['skipped_steps'] for run in runs):.1f}"


def _slug(method: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", method.split(":")[0].lower()).strip("_")


def markdown(results: dict[str, Any]) -> str:
    seeds = results["seeds"]
    lines = header(
        "DDTAS ablation on real data (CPU)",
        "ddtas_ablation.py",
        seeds,
        "Soft contrastive: α 40, β 2, λ 0.7; MS mining ε 0.1; ASMS γ 0.1 / 0.01; OTG: closed "
        "form, meta batch 5 × 2 from the training set.",
    )
    if "note" in results:
        lines += [f"Note: {results['note']}.", ""]
    lines += method_tables(results, [("Skipped steps", _skipped), ("s/run", seconds_per_run)])
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
