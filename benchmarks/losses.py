"""Forward+backward time of each dmlkit loss (with its usual miner) against PML 2.9.

Both libraries get identical inputs: P×4 batches of clustered embeddings at batch sizes 128, 512,
1024 and 4096 and embedding sizes 128 and 512. Each repetition times, in turn, the bare
similarity-matrix forward+backward (``x @ x.T`` and its gradient, the physical reference), the
dmlkit call and the PML call, so all three share the machine's noise; the table reports medians.

Usage::

    python benchmarks/losses.py                  # full grid, CPU (and CUDA if present)
    python benchmarks/losses.py --batch 1024 --dim 128 --only 'contrastive.*' HDCMiner

Results go to ``benchmarks/results/losses_<device>.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import dmlkit
import dmlkit.losses as dl
import dmlkit.miners as dm

try:
    import pytorch_metric_learning
    import pytorch_metric_learning.losses as pl
    import pytorch_metric_learning.miners as pm
except ImportError:  # the comparison needs the dev extra
    pytorch_metric_learning = None

LossCall = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
RESULTS = Path(__file__).parent / "results"
PML_MEMORY_LIMIT = 4 * 2**30


def _with_miner(loss: Callable, miner: Callable | None) -> LossCall:
    if miner is None:
        return lambda emb, labels: loss(emb, labels)
    return lambda emb, labels: loss(emb, labels, miner(emb, labels))


# How far PML can be run: None for any batch; "pos_by_neg" where it builds a (positive pairs ×
# negative pairs) matrix (its memory is estimated); an integer: the largest batch at which one
# PML call takes less than a few minutes and fits in memory (N³ tensors or N³ work beyond).
PMLLimit = str | int | None


@dataclass(frozen=True)
class Case:
    name: str
    miner: str
    dmlkit: Callable[[], LossCall]
    pml: Callable[[], LossCall] | None
    pml_limit: PMLLimit = None
    dmlkit_miner: Callable[[], Callable] | None = None


def _pml_bytes(case: Case, n: int) -> int:
    """PML's NTXent, lifted structure and tuplet margin losses compare every positive pair with
    every negative pair (bool, then float copies): about 13 bytes per (positive, negative)
    pair."""
    if case.pml_limit != "pos_by_neg":
        return 0
    positives, negatives = n * 3, n * (n - 4)
    return 13 * positives * negatives


def _pml_skip_note(case: Case, n: int) -> str:
    """Why PML is not run at batch ``n``, or "" where it is."""
    if _pml_bytes(case, n) > PML_MEMORY_LIMIT:
        return (
            f"PML not run: needs ~{_pml_bytes(case, n) / 2**30:.0f} GiB (positive × negative pairs)"
        )
    if isinstance(case.pml_limit, int) and n > case.pml_limit:
        return f"PML not run above batch {case.pml_limit} (N³ memory or minutes per call)"
    return ""


# (loss, loss kwargs, miner or None, miner kwargs, how far PML runs); dmlkit and PML share
# class names, so each row builds both.
CASES: list[tuple[str, dict, str | None, dict, PMLLimit]] = [
    ("ContrastiveLoss", {}, None, {}, None),
    ("ContrastiveLoss", {}, "PairMarginMiner", {}, None),
    ("TripletMarginLoss", {}, None, {}, None),
    ("TripletMarginLoss", {}, "TripletMarginMiner", {"type_of_triplets": "semihard"}, None),
    ("TripletMarginLoss", {}, "BatchHardMiner", {}, None),
    ("MultiSimilarityLoss", {}, "MultiSimilarityMiner", {}, None),
    ("CircleLoss", {}, None, {}, None),
    ("NPairsLoss", {}, None, {}, None),
    ("NTXentLoss", {}, None, {}, "pos_by_neg"),
    ("SupConLoss", {}, None, {}, None),
    ("LiftedStructureLoss", {}, None, {}, "pos_by_neg"),
    ("GeneralizedLiftedStructureLoss", {}, None, {}, None),
    ("SoftContrastiveLoss", {}, "ATASMSMiner", {}, None),
    ("SoftWeightedTripletLoss", {}, None, {}, None),
    ("MarginLoss", {}, None, {}, None),
    ("FastAPLoss", {}, None, {}, None),
    ("SignalToNoiseRatioContrastiveLoss", {}, None, {}, 1024),  # PML: out of memory at 4096
    ("AngularLoss", {}, None, {}, 1024),
    ("TupletMarginLoss", {}, None, {}, "pos_by_neg"),
    ("IntraPairVarianceLoss", {}, None, {}, None),
    ("InstanceLoss", {}, None, {}, None),
    ("HistogramLoss", {}, None, {}, 1024),
    ("RankedListLoss", {"margin": 0.4, "Tn": 1.0}, None, {}, None),
    ("PNPLoss", {}, None, {}, 512),
    ("SmoothAPLoss", {}, None, {}, 512),
    ("DynamicSoftMarginLoss", {}, None, {}, 1024),
    ("ThresholdConsistentMarginLoss", {}, None, {}, 1024),
    ("VICRegLoss", {}, None, {}, None),
    ("ContrastiveLoss", {}, "BatchEasyHardMiner", {}, None),
    ("ContrastiveLoss", {}, "HDCMiner", {}, None),
    ("ContrastiveLoss", {}, "UniformHistogramMiner", {}, None),
    ("TripletMarginLoss", {}, "AngularMiner", {}, 1024),
    ("TripletMarginLoss", {}, "DistanceWeightedMiner", {}, None),
]


def _two_views(loss: Callable) -> LossCall:
    """VICReg takes two views and no labels: the batch against itself reversed."""
    return lambda emb, _labels: loss(emb, ref_emb=emb.flip(0))


def _factory(loss_mod, miner_mod, loss, loss_kw, miner, miner_kw) -> Callable[[], LossCall] | None:
    if not hasattr(loss_mod, loss) or (miner is not None and not hasattr(miner_mod, miner)):
        return None  # PML has no such loss or miner
    if loss == "VICRegLoss":
        return lambda: _two_views(getattr(loss_mod, loss)(**loss_kw))
    if loss == "DynamicSoftMarginLoss":
        # PML's cannot backward twice through its histogram (its issue #731): a fresh loss per
        # call on both sides.
        return lambda: lambda emb, labels: getattr(loss_mod, loss)(**loss_kw)(emb, labels)
    return lambda: _with_miner(
        getattr(loss_mod, loss)(**loss_kw),
        None if miner is None else getattr(miner_mod, miner)(**miner_kw),
    )


def _miner_factory(miner: str, miner_kw: dict) -> Callable[[], Callable]:
    return lambda: getattr(dm, miner)(**miner_kw)


def _floor_call(mined: tuple[torch.Tensor, ...], labels: torch.Tensor) -> LossCall:
    """The floor of a loss over mined tuples under PML's contract (the miner hands over index
    tensors): the bare forward+backward, one ``nonzero`` listing the M mined tuples from a mask
    over the candidates the miner scans (every positive pair × every reference for a triplet
    miner, the anchors for one returning at most one triplet per anchor, every (anchor,
    reference) pair of each side for a pair miner), and a gather of the
    tuples' entries of the matrix (two per triplet, one per pair) with its backward, a scatter
    into the matrix's gradient. Everything else a miner and its loss do (the miner's own
    matrix, its rule, the index arithmetic, the loss formula) is left out: a lower bound."""
    n = len(labels)
    same = labels[:, None] == labels[None, :]
    if len(mined) == 3 and len(mined[0]) <= n:  # at most one triplet per anchor: scans anchors
        mask = torch.zeros(n, dtype=torch.bool, device=labels.device)
        mask[mined[0]] = True
        flat = torch.cat([mined[0] * n + mined[1], mined[0] * n + mined[2]])
    elif len(mined) == 3:
        a, p, neg = mined
        candidates = same & ~torch.eye(n, dtype=torch.bool, device=labels.device)
        row_of_pair = torch.full((n, n), -1, dtype=torch.long, device=labels.device)
        row_of_pair[candidates] = torch.arange(int(candidates.sum()), device=labels.device)
        mask = torch.zeros(int(candidates.sum()), n, dtype=torch.bool, device=labels.device)
        mask[row_of_pair[a, p], neg] = True
        flat = torch.cat([a * n + p, a * n + neg])
    else:
        a1, p, a2, neg = mined
        mask = torch.zeros(2, n, n, dtype=torch.bool, device=labels.device)
        mask[0, a1, p] = True
        mask[1, a2, neg] = True
        flat = torch.cat([a1 * n + p, a2 * n + neg])

    def floor(x: torch.Tensor, _labels: torch.Tensor) -> torch.Tensor:
        sim = x @ x.T
        mask.nonzero()
        return sim.sum() + sim.view(-1).index_select(0, flat).sum()

    return floor


def _cases() -> list[Case]:
    cases = []
    for loss, loss_kw, miner, miner_kw, pml_limit in CASES:
        label = miner or ("- (all triplets)" if loss == "TripletMarginLoss" else "-")
        if miner_kw:
            label += "(" + ", ".join(str(v) for v in miner_kw.values()) + ")"
        theirs = (
            _factory(pl, pm, loss, loss_kw, miner, miner_kw)
            if pytorch_metric_learning is not None
            else None
        )
        ours = _factory(dl, dm, loss, loss_kw, miner, miner_kw)
        assert ours is not None
        mine = None if miner is None else _miner_factory(miner, miner_kw)
        cases.append(Case(loss, label, ours, theirs, pml_limit, mine))
    return cases


def _batch(n: int, dim: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(n * 1000 + dim)
    labels = torch.arange(n) // 4
    emb = 0.5 * torch.randn(n // 4, dim, generator=g)[labels] + torch.randn(n, dim, generator=g)
    return emb.to(device), labels.to(device)


def _time_once(fn: LossCall, emb: torch.Tensor, labels: torch.Tensor) -> float:
    x = emb.clone().requires_grad_(True)
    if x.is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn(x, labels).backward()
    if x.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def _bare(x: torch.Tensor, _labels: torch.Tensor) -> torch.Tensor:
    return (x @ x.T).sum()


@dataclass
class Row:
    loss: str
    miner: str
    batch: int
    dim: int
    bare_ms: float
    dmlkit_ms: float
    pml_ms: float | None
    pml_reps: int
    reps: int
    note: str = ""
    floor_ms: float | None = None

    @property
    def speedup(self) -> float | None:
        return None if self.pml_ms is None else self.pml_ms / self.dmlkit_ms


def run_case(
    case: Case, n: int, dim: int, device: torch.device, budget_s: float, max_reps: int
) -> Row:
    emb, labels = _batch(n, dim, device)
    ours = case.dmlkit()
    theirs = case.pml() if case.pml is not None else None
    note = _pml_skip_note(case, n) if theirs is not None else ""
    if note:
        theirs = None
    floor = None
    if case.dmlkit_miner is not None:
        floor = _floor_call(case.dmlkit_miner()(emb, labels), labels)
    for _ in range(2):  # warm-up: allocator, caches, lazy initialisation
        _time_once(_bare, emb, labels)
        _time_once(ours, emb, labels)
        if floor is not None:
            _time_once(floor, emb, labels)
    first_pml = _time_once(theirs, emb, labels) if theirs is not None else 0.0
    # PML's slowest cases (all triplets at 4096) take minutes: fewer repetitions there.
    pml_reps = max(1, min(max_reps, int(budget_s / max(first_pml, 1e-6))))
    bare, mine, ref = [], [], [first_pml] if theirs is not None else []
    floors = []
    for rep in range(max_reps):
        bare.append(_time_once(_bare, emb, labels))
        mine.append(_time_once(ours, emb, labels))
        if floor is not None:
            floors.append(_time_once(floor, emb, labels))
        if theirs is not None and rep + 1 < pml_reps:
            ref.append(_time_once(theirs, emb, labels))
    return Row(
        case.name,
        case.miner,
        n,
        dim,
        1e3 * statistics.median(bare),
        1e3 * statistics.median(mine),
        1e3 * statistics.median(ref) if ref else None,
        len(ref),
        max_reps,
        note,
        1e3 * statistics.median(floors) if floors else None,
    )


def _markdown(rows: list[Row], device: str, meta: dict) -> str:
    lines = [
        f"# Loss forward+backward, {device}",
        "",
        f"dmlkit {meta['dmlkit']}, PML {meta['pml']}, torch {meta['torch']}, "
        f"{meta['threads']} threads, {meta['cpu']}. Medians over {meta['reps']} interleaved "
        "repetitions (fewer for PML where one call exceeds the time budget; the count is "
        "shown). `bare` is one `x @ x.T` forward+backward on the same batch. `floor / bare`, "
        "for a loss with a miner: what PML's contract (index tensors out of the miner) costs at "
        "least, timed in the same loop: the bare forward+backward, one `nonzero` listing the "
        "mined tuples from a mask over the miner's candidates, and the gather of their "
        "entries with its backward (`_floor_call`).",
        "",
        "| loss | miner | batch | dim | bare ms | dmlkit ms | PML ms (reps) | PML / dmlkit "
        "| dmlkit / bare | floor / bare |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        pml = (r.note or "—") if r.pml_ms is None else f"{r.pml_ms:.1f} ({r.pml_reps})"
        speed = "—" if r.speedup is None else f"{r.speedup:.1f}×"
        floor = "—" if r.floor_ms is None else f"{r.floor_ms / r.bare_ms:.1f}"
        lines.append(
            f"| {r.loss} | {r.miner} | {r.batch} | {r.dim} | {r.bare_ms:.2f} | "
            f"{r.dmlkit_ms:.2f} | {pml} | {speed} | {r.dmlkit_ms / r.bare_ms:.1f} | {floor} |"
        )
    return "\n".join(lines) + "\n"


MEMORY_SCRIPT = """
import json, resource, sys, time, torch
if sys.argv[1] == "dmlkit":
    import dmlkit.losses as L
else:
    import pytorch_metric_learning.losses as L
torch.manual_seed(0)
emb = torch.randn(4096, 128, requires_grad=True)
labels = torch.arange(4096) // 4
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
loss = L.TripletMarginLoss(margin=0.2)(emb, labels)
loss.backward()
seconds = time.perf_counter() - start
grew = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
print(json.dumps({"loss": loss.item(), "seconds": seconds, "peak_rss_growth_mib": grew}))
"""


def measure_all_triplets_memory() -> None:
    """Peak resident-memory growth of all-triplets forward+backward at batch 4096, dim 128
    (≈50M triplets), each library in a fresh process."""
    import subprocess
    import sys

    lines = [
        "# All-triplets TripletMarginLoss at batch 4096 (1024 classes × 4), dim 128, CPU",
        "",
        "One forward+backward in a fresh process each; peak resident memory growth (ru_maxrss).",
        "",
        "| library | loss value | seconds | peak RSS growth MiB |",
        "|---|---:|---:|---:|",
    ]
    libraries = ["dmlkit"] + (["pml"] if pytorch_metric_learning is not None else [])
    for library in libraries:
        out = subprocess.run(
            [sys.executable, "-c", MEMORY_SCRIPT, library],
            capture_output=True,
            text=True,
            check=True,
        )
        r = json.loads(out.stdout.strip().splitlines()[-1])
        lines.append(
            f"| {library} | {r['loss']:.6f} | {r['seconds']:.2f} | {r['peak_rss_growth_mib']:.0f} |"
        )
        print(lines[-1], flush=True)
    (RESULTS / "triplets_memory_cpu.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="*", default=[128, 512, 1024, 4096])
    parser.add_argument("--dim", type=int, nargs="*", default=[128, 512])
    parser.add_argument(
        "--only",
        nargs="*",
        default=None,
        help="regular expressions matching a loss's or a miner's whole name (any case)",
    )
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--pml-budget", type=float, default=30.0, help="seconds per PML case")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: each available)")
    parser.add_argument("--tag", default="", help="suffix for the result files")
    parser.add_argument("--results-dir", type=Path, default=RESULTS, help="where results go")
    parser.add_argument(
        "--memory", action="store_true", help="only the all-triplets memory measurement"
    )
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.memory:
        measure_all_triplets_memory()
        return

    devices = (
        [args.device] if args.device else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    )
    cases = [
        c
        for c in _cases()
        if not args.only
        or any(
            re.fullmatch(pattern, name, re.IGNORECASE)
            for pattern in args.only
            for name in (c.name, c.miner.split("(")[0])
        )
    ]
    RESULTS.mkdir(parents=True, exist_ok=True)
    for device_name in devices:
        device = torch.device(device_name)
        meta = {
            "dmlkit": dmlkit.__version__,
            "pml": getattr(pytorch_metric_learning, "__version__", "absent"),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine(),
            "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "reps": args.reps,
        }
        rows = []
        args.results_dir.mkdir(parents=True, exist_ok=True)
        stem = args.results_dir / f"losses_{device_name}{args.tag}"
        for dim in args.dim:
            for n in args.batch:
                for case in cases:
                    row = run_case(case, n, dim, device, args.pml_budget, args.reps)
                    rows.append(row)
                    print(_markdown([row], device_name, meta).splitlines()[-1], flush=True)
                    # Written after every row: a long grid killed midway keeps what it measured.
                    stem.with_suffix(".md").write_text(_markdown(rows, meta["device"], meta))
                    stem.with_suffix(".json").write_text(
                        json.dumps({"meta": meta, "rows": [asdict(r) for r in rows]}, indent=1)
                    )
        print(f"wrote {stem}.md and .json")


if __name__ == "__main__":
    main()
