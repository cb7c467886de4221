"""What DDTAS's Online Threshold Generator costs: one training step against a plain one.

Each variant is a whole training step on the same batch of 80 (16 classes × 5), optimiser step
included:

- **plain**: embed, AT-ASMS mining, Soft Contrastive loss, backward, Adam;
- **DDTAS without OTG**: the same through the :class:`~dmlkit.ddtas.DDTAS` object;
- **OTG, closed form**: plus one backward pass on a 5 × 2 meta batch and a forward-mode
  Jacobian-vector product carried on the training forward pass (docs/ddtas.md §5.3);
- **OTG, double backward**: the literal virtual step (docs/ddtas.md §5.1) through
  ``functional_call``;
- the OTG variants of docs/ddtas_ablation.md, closed (first-order) form: the memory meta loss
  (8 per class), per-pair loss weights, the online threshold (per side), and the virtual step
  restricted to the head and the last backbone block (ConvNet only: the head model is nothing
  but a head). Held-out meta classes cost what the released OTG costs (only the meta batches'
  source differs).

Peak memory: after the timed rounds, one more step of each variant is run with the tensor
memory it holds at its peak, beyond what existed before it, measured: the allocator's peak on
CUDA, the PyTorch profiler's memory timeline on CPU.

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


def _batch(
    shape: tuple[int, ...], classes: int, per_class: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
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

    dim = embeddings.shape[1]
    steps = {
        "bare x@x.T forward+backward": bare,
        "plain step": plain,
        "DDTAS without OTG": through(DDTAS(otg=None)),
        "OTG, closed form": through(DDTAS(otg=OTGSettings(method="closed_form"))),
        "OTG, double backward": through(DDTAS(otg=OTGSettings(method="double_backward"))),
        "v1 memory meta loss (8/class)": through(
            DDTAS(otg=OTGSettings(memory_size=8), num_classes=CLASSES, embedding_dim=dim)
        ),
        "v3 per-pair loss weights": through(DDTAS(otg=OTGSettings(reading="loss_weights"))),
        "v4 online threshold": through(
            DDTAS(otg=OTGSettings(reading="online_threshold", per_side=True))
        ),
    }
    if hasattr(model, "head"):
        steps["OTG on head + last block"] = through(
            DDTAS(otg=OTGSettings(scope="head_and_last_block"))
        )
    return steps


def peak_memory(step: Callable[[], None], device: torch.device) -> float:
    """MiB of tensor memory one step holds at its peak beyond what existed before it: the
    allocator's peak on CUDA; on CPU, the profiler's memory timeline (tensors created minus
    tensors freed, at its highest)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import Action, MemoryProfile

    with profile(
        activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True
    ) as prof:
        step()
    live = peak = 0
    for _, action, _, size in MemoryProfile(prof.profiler.kineto_results).timeline:
        if action == Action.CREATE:
            live += size
        elif action == Action.DESTROY:
            live -= size
        peak = max(peak, live)
    return peak / 2**20


def measure(rounds: int, device: torch.device, memory_rows: bool = True) -> list[dict[str, Any]]:
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
            memory = peak_memory(variants[name], device) if memory_rows else None
            rows.append(
                {
                    "model": model_name,
                    "variant": name,
                    "median_ms": 1e3 * median,
                    "ratio_to_plain": median / plain_median,
                    "overhead_to_plain": (median - plain_median) / plain_median,
                    "rounds": rounds,
                    "peak_rss_mib": memory,
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
        "Adam update. Overhead = (step − plain step) / plain step. Peak memory: the tensor memory "
        "one step holds at its peak beyond what existed before it (CPU: the PyTorch profiler's "
        "memory timeline; CUDA: the allocator's peak).",
        "",
        "| Model | Step | Median | × plain step | Overhead | Peak memory |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        memory = row.get("peak_rss_mib")
        lines.append(
            f"| {row['model']} | {row['variant']} | {row['median_ms']:.2f} ms | "
            f"{row['ratio_to_plain']:.2f}× | {100 * row['overhead_to_plain']:+.0f}% | "
            + (f"{memory:.1f} MiB |" if memory is not None else "– |")
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    args = parser.parse_args()
    device = torch.device(args.device)
    rows = measure(args.rounds, device, memory_rows=not args.no_memory)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / f"ddtas_cost_{device.type}"
    stem.with_suffix(".json").write_text(json.dumps(rows, indent=2))
    text = markdown(rows, device, args.rounds)
    stem.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
