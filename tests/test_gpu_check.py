"""``make bench-gpu`` at small sizes on the CPU: every step of the device check runs and
reports, so the check is ready whenever a GPU is lent."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_device_check_runs_on_the_cpu(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "benchmarks/gpu_check.py", "--device", "cpu", "--small", "--out",
         str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    summary = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [s["step"] for s in summary["steps"]] == [
        "device tests",
        "losses",
        "evaluation",
        "training",
    ]
    assert all(s["status"] == "ok" for s in summary["steps"])
    assert {r["backbone"] for r in summary["training"]} == {"mobilenet_v2", "resnet50"}
    for name in ("losses_cpu_check.md", "evaluation_cpu_check.md", "gpu_check.md"):
        assert (tmp_path / name).is_file(), name
