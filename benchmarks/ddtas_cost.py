"""What DDTAS's Online Threshold Generator costs: one training step against a plain one.

Each variant is a whole training step on the same batch of 80 (16 classes × 5), optimiser step
included:

- **plain**: embed, AT-ASMS mining, Soft Contrastive loss, backward, Adam;
- **DDTAS without OTG**: the same through the :class:`~dmlkit.ddtas.DDTAS` object;
- **OTG, closed form**: plus one backward pass on a 5 × 2 meta batch and a forward-mode
  Jacobian-vector product carried on the training forward pass (docs/ddtas.md §5.3);
- **OTG, double backward**: the literal virtual step (docs/ddtas.md §5.1) through
  ``functional_call``.

Two models: the linear 128-d head on 1280-d MobileNetV2-sized features (the cub100_subset
set-up), and the small ConvNet on 28×28 grey images (the Omniglot set-up) with live BatchNorm.
The inputs are random: the cost does not depend on the pixel values. Steps are interleaved
(one of each variant per round) and the median over rounds is reported, with the ratio to the
plain step; the bare cost of one similarity-matrix forward+backward is the physical reference.

Run ``python benchmarks/ddtas_cost.py`` (about 3 minutes on 2 CPU cores); results go to
``benchmarks/results/ddtas_cost_<device>.{md,json}``. CUDA is used when present.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dmlkit.ddtas import DDTAS, OTGSettings
from dmlkit.losses import SoftContrastiveLoss
from dmlkit.miners import ATASMSMiner
from dmlkit.models import EmbeddingHead, build_model

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
CLASSES, PER_CLASS, META_CLASSES, META_PER_CLASS = 16, 5, 5, 2


def _models(device: torch.device) -> dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]]:
    return {
        "MobileNetV2-feature head (1280 → 128)": (
            lambda: EmbeddingHead(1280, 128).to(device),
            (1280,),
        ),
        "ConvNet, 28×28 grey, live BatchNorm": (
            lambda: build_model("convnet", 64, in_channels=1).to(device),
            (1, 28, 28),
        ),
    }


def _batch(shape: tuple[int, ...], classes: int, per_class: int, device: torch.device):
    x = torch.randn(classes * per_class, *shape, device=device)
    y = torch.arange(classes, device=device).repeat_interleave(per_class)
    return x, y


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _variants(
    make: Callable[[], nn.Module], shape: tuple[int, ...], device: torch.device
) -> dict[str, Callable[[], None]]:
    """One training step of each variant, all on the same batch and model."""
    x, y = _batch(shape, CLASSES, PER_CLASS, device)
    meta = _batch(shape, META_CLASSES, META_PER_CLASS, device)
    model = make().train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-5)
    miner, loss_fn = ATASMSMiner(epsilon=0.1), SoftContrastiveLoss()
    embeddings = model(x).detach()

    def bare() -> None:
        e = embeddings.clone().requires_grad_(True)
        (e @ e.T).sum().backward()

    def plain() -> None:
        out = model(x)
        loss = loss_fn(out, y, miner(out, y))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    def through(method: DDTAS) -> Callable[[], None]:
        def step() -> None:
            out = method(model, x, y, meta)
            optimizer.zero_grad()
            out.loss.backward()
            if not out.skipped:
                optimizer.step()

        return step

    return {
        "bare x@x.T forward+backward": bare,
        "plain step": plain,
        "DDTAS without OTG": through(DDTAS(otg=None)),
        "OTG, closed form": through(DDTAS(otg=OTGSettings(method="closed_form"))),
        "OTG, double backward": through(DDTAS(otg=OTGSettings(method="double_backward"))),
    }


def measure(rounds: int, device: torch.device) -> list[dict[str, Any]]:
    torch.manual_seed(0)
    rows = []
    for model_name, (make, shape) in _models(device).items():
        variants = _variants(make, shape, device)
        times: dict[str, list[float]] = {name: [] for name in variants}
        for round_ in range(rounds + 3):
            for name, step in variants.items():
                _sync(device)
                start = time.perf_counter()
                step()
                _sync(device)
                if round_ >= 3:  # warm-up rounds are not counted
                    times[name].append(time.perf_counter() - start)
        plain_median = statistics.median(times["plain step"])
        for name, values in times.items():
            median = statistics.median(values)
            rows.append(
                {
                    "model": model_name,
                    "variant": name,
                    "median_ms": 1e3 * median,
                    "ratio_to_plain": median / plain_median,
                    "overhead_to_plain": (median - plain_median) / plain_median,
                    "rounds": rounds,
                }
            )
            print(
                f"{model_name:40s} {name:28s} {1e3 * median:9.2f} ms {median / plain_median:5.2f}×"
            )
    return rows


def markdown(rows: list[dict[str, Any]], device: torch.device, rounds: int) -> str:
    where = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU ({platform.processor() or platform.machine()}), "
        f"{torch.get_num_threads()} threads"
    )
    lines = [
        f"# DDTAS step cost ({device.type})",
        "",
        f"`python benchmarks/ddtas_cost.py`: batch {CLASSES} × {PER_CLASS} = "
        f"{CLASSES * PER_CLASS}, meta batch {META_CLASSES} × {META_PER_CLASS}; median of "
        f"{rounds} interleaved rounds; {where}; torch {torch.__version__}. A step includes the "
        "Adam update. Overhead = (step − plain step) / plain step.",
        "",
        "| Model | Step | Median | × plain step | Overhead |",
        "|---|---|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['model']} | {row['variant']} | {row['median_ms']:.2f} ms | "
            f"{row['ratio_to_plain']:.2f}× | {100 * row['overhead_to_plain']:+.0f}% |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    rows = measure(args.rounds, device)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / f"ddtas_cost_{device.type}"
    stem.with_suffix(".json").write_text(json.dumps(rows, indent=2))
    text = markdown(rows, device, args.rounds)
    stem.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
