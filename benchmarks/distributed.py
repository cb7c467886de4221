"""The cost of computing a loss over the global batch of several processes (gloo, CPU): one
process with the whole batch against 2 processes with half each, gathering with
``dmlkit.distributed`` in global and efficient mode.

Each measurement is a loss forward+backward (with the gather and, on several processes, the
gradient averaging of a 128 × D linear layer that produces the embeddings). Every process gets
``--threads`` threads, so 2 processes use twice the cores: the question is what the gather and
the all-reduce add, not whether two processes are faster.

Usage::

    python benchmarks/distributed.py            # results/distributed_cpu.{md,json}
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import dmlkit.losses as dl
import dmlkit.miners as dm
from dmlkit.distributed import DistributedLossWrapper, DistributedMinerWrapper, average_gradients

RESULTS = Path(__file__).parent / "results"
CASES = {
    "ContrastiveLoss": (lambda: dl.ContrastiveLoss(), None),
    "MultiSimilarityLoss + miner": (lambda: dl.MultiSimilarityLoss(), dm.MultiSimilarityMiner),
    "NTXentLoss": (lambda: dl.NTXentLoss(), None),
    "TripletMarginLoss (all triplets)": (lambda: dl.TripletMarginLoss(), None),
}


def _inputs(batch: int, dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(batch)
    labels = torch.arange(batch) // 4
    x = torch.randn(batch // 4, 128, generator=g)[labels] + torch.randn(batch, 128, generator=g)
    return x, labels, torch.randn(128, dim, generator=g) / 11


def _time_steps(name: str, x, labels, weight, mode: str | None, reps: int) -> float:
    make_loss, miner_cls = CASES[name]
    loss = make_loss()
    miner = None if miner_cls is None else miner_cls()
    if mode is not None:
        efficient = mode == "efficient"
        loss = DistributedLossWrapper(loss, efficient)
        miner = None if miner is None else DistributedMinerWrapper(miner, efficient)
    times = []
    for _ in range(reps + 2):
        layer = weight.clone().requires_grad_(True)
        start = time.perf_counter()
        emb = x @ layer
        mined = None if miner is None else miner(emb, labels)
        loss(emb, labels, mined).backward()
        if mode is not None:
            average_gradients([layer])
        times.append(time.perf_counter() - start)
    return statistics.median(times[2:])  # the first two warm up


def _worker(rank: int, world: int, store: str, out: str, args: dict) -> None:
    torch.set_num_threads(args["threads"])
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    rows = {}
    for batch in args["batch"]:
        x, labels, weight = _inputs(batch, args["dim"])
        share = slice(rank * batch // world, (rank + 1) * batch // world)
        for name in CASES:
            for mode in ("global", "efficient"):
                dist.barrier()
                seconds = _time_steps(name, x[share], labels[share], weight, mode, args["reps"])
                rows[f"{name}|{batch}|{mode}"] = seconds
    if rank == 0:
        Path(out).write_text(json.dumps(rows))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="*", default=[512, 2048])
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    single = {}
    for batch in args.batch:
        x, labels, weight = _inputs(batch, args.dim)
        for name in CASES:
            single[(name, batch)] = _time_steps(name, x, labels, weight, None, args.reps)
    with tempfile.TemporaryDirectory() as folder:
        out = os.path.join(folder, "rows.json")
        mp.spawn(_worker, args=(2, os.path.join(folder, "store"), out, vars(args)), nprocs=2)
        two = json.loads(Path(out).read_text())
    lines = [
        "# A loss over 2 gloo processes against 1 process, CPU",
        "",
        f"dmlkit, torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{args.threads} thread(s) per process, embedding dim {args.dim}, medians of "
        f"{args.reps}. Forward+backward of one step (embedding layer, miner, loss; on 2 "
        "processes also the gather and the gradient average). *global*: each process computes "
        "the whole global batch's loss; *efficient*: its own anchors against the gathered batch.",
        "",
        "| loss | global batch | 1 process ms | 2 processes, global ms | ratio | "
        "2 processes, efficient ms | ratio |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    rows = []
    for (name, batch), seconds in single.items():
        g, e = two[f"{name}|{batch}|global"], two[f"{name}|{batch}|efficient"]
        rows.append({"loss": name, "batch": batch, "one": seconds, "global": g, "efficient": e})
        lines.append(
            f"| {name} | {batch} | {1e3 * seconds:.1f} | {1e3 * g:.1f} | {g / seconds:.2f} | "
            f"{1e3 * e:.1f} | {e / seconds:.2f} |"
        )
        print(lines[-1], flush=True)
    (RESULTS / "distributed_cpu.md").write_text("\n".join(lines) + "\n")
    (RESULTS / "distributed_cpu.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
