"""The device check, one command (``make bench-gpu``): run it whenever a GPU is lent.

In order, each step's output kept under ``--out`` (default ``benchmarks/results/gpu/``):

1. **Device tests**: ``tests/test_device.py`` on the device: every registered loss and miner,
   the kNN, a few training steps with mixed precision and a bf16 embedding, a DDTAS step, each
   against the CPU.
2. **Losses**: ``benchmarks/losses.py`` at batch 1024 and 4096, dim 128, PML side by side.
3. **Evaluation**: ``benchmarks/evaluation.py`` at 1M items (both data shapes), PML + faiss side
   by side.
4. **Training throughput**: images/s of a training step (forward, backward, SGD) of MobileNetV2
   and ResNet-50 at 224 px on a synthetic batch, float32 and bf16 autocast on CUDA.

``--small`` shrinks every step (batch 128, 5,000 items, 64 px, a few repetitions) so the check
runs on a CPU in a minute: the test suite runs it that way, so it cannot rot. Meant to finish in
under 8 minutes on one H100/H200; each step has its own time limit and a step that fails or
times out is recorded, and the next one still runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from dmlkit.models import build_model

ROOT = Path(__file__).resolve().parents[1]


def _run(name: str, command: list[str], timeout: float, env: dict[str, str]) -> dict[str, Any]:
    start = time.perf_counter()
    try:
        done = subprocess.run(
            command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
        )
        status = "ok" if done.returncode == 0 else f"failed (exit {done.returncode})"
        tail = (done.stdout + done.stderr).strip().splitlines()[-5:]
    except subprocess.TimeoutExpired:
        status, tail = f"timed out after {timeout:.0f} s", []
    seconds = time.perf_counter() - start
    print(f"[{name}] {status} in {seconds:.0f} s", flush=True)
    return {"step": name, "status": status, "seconds": seconds, "tail": tail}


def training_throughput(device: torch.device, small: bool) -> list[dict[str, Any]]:
    """Images/s of one training step of each backbone, median of the timed steps."""
    side, batch, steps = (64, 4, 2) if small else (224, 64, 10)
    precisions = ["float32", "bf16"] if device.type == "cuda" else ["float32"]
    rows = []
    for backbone in ("mobilenet_v2", "resnet50"):
        model = build_model(backbone, 128).to(device).train()
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
        x = torch.randn(batch, 3, side, side, device=device)
        for precision in precisions:
            times = []
            for step in range(steps + 2):  # two warm-up steps
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                start = time.perf_counter()
                with torch.autocast(device.type, torch.bfloat16, enabled=precision == "bf16"):
                    loss = model(x).float().pow(2).sum()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                if step >= 2:
                    times.append(time.perf_counter() - start)
            rows.append(
                {
                    "backbone": backbone,
                    "precision": precision,
                    "side": side,
                    "batch": batch,
                    "images_per_second": batch / statistics.median(times),
                }
            )
            print(f"[training] {backbone} {precision}: {rows[-1]['images_per_second']:.0f} img/s")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--small", action="store_true", help="tiny sizes, for a CPU smoke run")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "DMLKIT_TEST_DEVICE": device.type, "PYTHONPATH": str(ROOT / "tests")}
    python = sys.executable
    small = args.small
    loss_sizes = (
        ["--batch", "128", "--reps", "2", "--only", "ContrastiveLoss"]
        if small
        else ["--batch", "1024", "4096", "--reps", "9", "--pml-budget", "10"]
    )
    losses = [python, "benchmarks/losses.py", "--device", device.type, "--dim", "128"]
    evaluation = [python, "benchmarks/evaluation.py", "--device", device.type]
    evaluation_size = "5000" if small else "1000000"
    steps = [
        _run(
            "device tests",
            [python, "-m", "pytest", "-q", "-p", "no:randomly", "tests/test_device.py"],
            120 if small else 180,
            env,
        ),
        _run(
            "losses",
            [*losses, "--results-dir", str(out), "--tag", "_check", *loss_sizes],
            120 if small else 240,
            env,
        ),
        _run(
            "evaluation",
            [
                *evaluation,
                "--results-dir",
                str(out),
                "--name",
                f"evaluation_{device.type}_check",
                "--sizes",
                evaluation_size,
            ],
            120 if small else 180,
            env,
        ),
    ]
    start = time.perf_counter()
    try:
        throughput = training_throughput(device, small)
        steps.append({"step": "training", "status": "ok", "seconds": time.perf_counter() - start})
    except Exception as error:  # recorded, like a failed step
        throughput = []
        status = f"failed: {type(error).__name__}: {error}"
        steps.append({"step": "training", "status": status, "seconds": 0.0})
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine()
    summary = {
        "device": where,
        "torch": torch.__version__,
        "small": small,
        "steps": steps,
        "training": throughput,
    }
    (out / "gpu_check.json").write_text(json.dumps(summary, indent=2))
    lines = [
        f"# Device check: {where} ({device.type}{', small sizes' if small else ''})",
        "",
        f"`python benchmarks/gpu_check.py`; torch {torch.__version__}. Per-step files beside "
        "this one (losses, evaluation).",
        "",
        "| Step | Status | Seconds |",
        "|---|---|---:|",
        *(f"| {s['step']} | {s['status']} | {s['seconds']:.0f} |" for s in steps),
        "",
        "| Backbone | Precision | Side | Batch | Training images/s |",
        "|---|---|---:|---:|---:|",
        *(
            f"| {r['backbone']} | {r['precision']} | {r['side']} | {r['batch']} | "
            f"{r['images_per_second']:.0f} |"
            for r in throughput
        ),
    ]
    (out / "gpu_check.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    sys.exit(0 if all(s["status"] == "ok" for s in steps) else 1)


if __name__ == "__main__":
    main()
