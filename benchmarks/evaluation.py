"""Retrieval evaluation: dmlkit against PML's AccuracyCalculator (faiss backend), side by side.

Measures wall time and peak memory of P@1 + R-Precision + MAP@R (``k="max_bin_count"``) on
clustered 128-d embeddings, with class sizes like Stanford Online Products (2–12 per class) and
like CUB (few, large classes: 100 classes of N/100 items). Every measurement runs in its own
process, so each peak resident memory (``ru_maxrss``) is that job's alone; a watcher kills a
job whose memory passes the limit and reports it. The reference column ('bare') is the cost
of the N×N similarity products alone (4096² tiles into one buffer, nothing else): the floor of
a search that does not exploit the symmetry of self-retrieval (dmlkit computes half of them).

Usage: python benchmarks/evaluation.py [--sizes 10000 60000 120000] [--repeats 1]
Writes benchmarks/results/evaluation_{cpu,cuda}.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"
METRICS = ("precision_at_1", "r_precision", "mean_average_precision_at_r")
# Name → class sizes (smallest, largest) at N items.
LAYOUTS = {
    "SOP-like (2-12 per class)": lambda n: (2, 12),
    "CUB-like (100 classes of N/100)": lambda n: (n // 100, n // 100),
}
DIM = 128
NOISE = 1.3

JOB = r"""
import json, resource, sys, time, torch
sys.path.insert(0, {bench_dir!r})
from evaluation import embeddings
n, low, high, library, device = {n}, {low}, {high}, {library!r}, {device!r}
x, labels = embeddings(n, low, high)
x, labels = x.to(device), labels.to(device)
metrics = {metrics!r}
if library == "dmlkit":  # imports outside the timing
    from dmlkit.evaluation import AccuracyCalculator
elif library == "pml":
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
start = time.perf_counter()
if library == "dmlkit":
    values = AccuracyCalculator(include=metrics, k="max_bin_count").get_accuracy(x, labels)
elif library == "pml":
    calc = AccuracyCalculator(include=metrics, k="max_bin_count", device=torch.device(device))
    values = calc.get_accuracy(x, labels)
else:  # the bare N×N similarity products, in 4096² tiles written to one buffer
    values = {{}}
    tile = x.new_empty(4096, 4096)
    for i in range(0, n, 4096):
        for j in range(0, n, 4096):
            a, b = x[i : i + 4096], x[j : j + 4096]
            torch.mm(a, b.T, out=tile[: a.shape[0], : b.shape[0]])
if device == "cuda":
    torch.cuda.synchronize()
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
gpu = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None
print(json.dumps({{"seconds": seconds, "peak_rss_mib": peak, "gpu_peak_mib": gpu,
                  "values": values}}))
"""


def embeddings(n: int, low: int, high: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """n L2-normalised 128-d embeddings around class centres, class sizes uniform in [low, high]."""
    gen = torch.Generator().manual_seed(seed)
    sizes = torch.randint(low, high + 1, (n // low + 1,), generator=gen)
    labels = torch.repeat_interleave(torch.arange(sizes.shape[0]), sizes)[:n]
    centres = torch.randn(int(labels.max()) + 1, DIM, generator=gen)
    x = centres[labels] + NOISE * torch.randn(n, DIM, generator=gen)
    return torch.nn.functional.normalize(x, dim=1), labels


def run_job(n: int, sizes: tuple[int, int], library: str, device: str, limit_gib: float) -> dict:
    """Runs one measurement in a fresh process; kills it if its memory passes the limit."""
    script = JOB.format(
        bench_dir=str(Path(__file__).parent), n=n, low=sizes[0], high=sizes[1],
        library=library, device=device, metrics=METRICS,
    )  # fmt: skip
    env = dict(os.environ, KMP_WARNINGS="0")
    proc = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, env=env,
    )  # fmt: skip
    killed = threading.Event()

    def watch() -> None:
        status = Path(f"/proc/{proc.pid}/status")
        while proc.poll() is None:
            try:
                rss_kib = next(
                    int(line.split()[1])
                    for line in status.read_text().splitlines()
                    if line.startswith("VmRSS")
                )
            except (OSError, StopIteration):
                return
            if rss_kib > limit_gib * 2**20:
                killed.set()
                proc.kill()
                return
            time.sleep(0.1)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    out, err = proc.communicate()
    watcher.join()
    if killed.is_set():
        return {"error": f"killed above {limit_gib:g} GiB"}
    if proc.returncode != 0:
        return {"error": err.strip().splitlines()[-1] if err.strip() else "failed"}
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 60_000, 120_000])
    parser.add_argument("--repeats", type=int, default=1, help="runs per cell (median reported)")
    parser.add_argument("--limit-gib", type=float, default=18.0, help="memory limit per job")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--name", help="results file stem (default: evaluation_<device>)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS, help="where results go")
    args = parser.parse_args()
    rows = []
    for layout_name, layout in LAYOUTS.items():
        for n in args.sizes:
            cell: dict[str, list[dict]] = {"bare": [], "dmlkit": [], "pml": []}
            for _ in range(args.repeats):  # interleaved, so drifts hit every library alike
                for library in cell:
                    cell[library].append(
                        run_job(n, layout(n), library, args.device, args.limit_gib)
                    )
            row = {"layout": layout_name, "n": n}
            for library, runs in cell.items():
                ok = [run for run in runs if "error" not in run]
                if not ok:
                    row[library] = {"error": runs[0]["error"]}
                    continue
                row[library] = {
                    "seconds": statistics.median(run["seconds"] for run in ok),
                    "peak_rss_mib": max(run["peak_rss_mib"] for run in ok),
                    "gpu_peak_mib": ok[0]["gpu_peak_mib"],
                    "values": ok[0]["values"],
                    "runs": len(ok),
                }
            rows.append(row)
            print(json.dumps(row), flush=True)
    write(rows, args)


def _fmt(entry: dict, key: str, unit: str) -> str:
    if "error" in entry:
        return entry["error"]
    return f"{entry[key]:,.2f} {unit}" if unit == "s" else f"{entry[key]:,.0f} {unit}"


def write(rows: list[dict], args: argparse.Namespace) -> None:
    results = args.results_dir
    results.mkdir(parents=True, exist_ok=True)
    name = args.name or f"evaluation_{args.device}"
    meta = {
        "device": args.device,
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "repeats": args.repeats,
        "metrics": METRICS,
    }
    (results / f"{name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = [
        f"# Retrieval evaluation: dmlkit vs PML AccuracyCalculator (faiss), {args.device}",
        "",
        f"P@1 + R-Precision + MAP@R, k='max_bin_count', {DIM}-d L2-normalised clustered "
        f"embeddings; {torch.get_num_threads()} threads; median of {args.repeats} run(s) per "
        "cell, each in a fresh process (peak RSS is that process's own).",
        "'bare': the N×N similarity products alone, 4096² tiles into one buffer (dmlkit's "
        "self-retrieval computes half of them, by symmetry).",
        "",
        "| classes | N | bare | dmlkit | PML+faiss | speed-up | dmlkit peak RSS | PML peak RSS "
        "| max abs metric difference |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        ours, theirs, bare = row["dmlkit"], row["pml"], row["bare"]
        speedup = diff = "n/a"
        if "error" not in ours and "error" not in theirs:
            speedup = f"{theirs['seconds'] / ours['seconds']:.2f}×"
            diff = f"{max(abs(ours['values'][m] - theirs['values'][m]) for m in METRICS):.1e}"
        lines.append(
            f"| {row['layout']} | {row['n']:,} | {_fmt(bare, 'seconds', 's')} "
            f"| {_fmt(ours, 'seconds', 's')} | {_fmt(theirs, 'seconds', 's')} | {speedup} "
            f"| {_fmt(ours, 'peak_rss_mib', 'MiB')} | {_fmt(theirs, 'peak_rss_mib', 'MiB')} "
            f"| {diff} |"
        )
    values = [
        f"- {row['layout']}, N={row['n']:,}: "
        + ", ".join(f"{m} {row['dmlkit']['values'][m]:.4f}" for m in METRICS)
        for row in rows
        if "error" not in row["dmlkit"]
    ]
    lines += ["", "Metric values (dmlkit):", *values, ""]
    (results / f"{name}.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
