"""Forward+backward time of dmlkit's losses with per-class parameters (proxies, class weights)
against PML 2.9, and against the physical reference: one bare ``embeddings @ W`` forward+backward
(gradients for both) with ``W`` the loss's own size (one column per class, per sub-centre or per
SoftTriple centre).

Both libraries get identical inputs and weights (PML's initial parameters are loaded into
dmlkit's loss), at batch 128, 1024 and 4096, 100 and 10,000 classes, embedding sizes 128 and 512.
Each repetition times the bare product, the dmlkit call and the PML call in turn, so all three
share the machine's noise; the table reports medians.

Usage::

    python benchmarks/class_losses.py                          # full grid
    python benchmarks/class_losses.py --batch 1024 --classes 10000 --only ProxyAnchor

Results go to ``benchmarks/results/class_losses_cpu.{md,json}`` (CPU only for now).

``MarginLoss`` learns one β per class but no weight matrix; it, ``FastAPLoss`` and
``SignalToNoiseRatioContrastiveLoss`` are timed against the similarity-matrix reference in
``benchmarks/losses.py``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

import dmlkit
import dmlkit.losses as dl
from losses import RESULTS

try:
    import pytorch_metric_learning
    import pytorch_metric_learning.losses as pl
except ImportError:  # the comparison needs the dev extra
    pytorch_metric_learning = None

# (loss, extra constructor options); dmlkit and PML share class names and parameter names
# (P2SGradLoss names its embedding size ``descriptors_dim``, given in ``_sizes``).
CASES: list[tuple[str, dict]] = [
    ("ProxyNCALoss", {}),
    ("ProxyAnchorLoss", {}),
    ("SoftTripleLoss", {}),
    ("NormalizedSoftmaxLoss", {}),
    ("CosFaceLoss", {}),
    ("ArcFaceLoss", {}),
    ("SubCenterArcFaceLoss", {}),
    ("SphereFaceLoss", {}),
    ("LargeMarginSoftmaxLoss", {}),
    ("P2SGradLoss", {}),
]


def _sizes(name: str, classes: int, dim: int) -> dict[str, int]:
    size = "descriptors_dim" if name == "P2SGradLoss" else "embedding_size"
    return {"num_classes": classes, size: dim}


@dataclass
class Row:
    loss: str
    batch: int
    classes: int
    columns: int
    dim: int
    bare_ms: float
    dmlkit_ms: float
    pml_ms: float | None
    pml_reps: int
    reps: int

    @property
    def speedup(self) -> float | None:
        return None if self.pml_ms is None else self.pml_ms / self.dmlkit_ms


def _inputs(n: int, classes: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(n * 7 + classes * 3 + dim)
    labels = torch.randint(classes, (n,), generator=g)
    centres = torch.randn(classes, dim, generator=g)
    return 0.5 * centres[labels] + torch.randn(n, dim, generator=g), labels


def _time(call: Callable[[torch.Tensor], torch.Tensor], emb: torch.Tensor, params: list) -> float:
    x = emb.clone().requires_grad_(True)
    for p in params:
        p.grad = None
    start = time.perf_counter()
    call(x).backward()
    return time.perf_counter() - start


def run_case(
    name: str, options: dict, n: int, classes: int, dim: int, budget: float, reps: int
) -> Row:
    emb, labels = _inputs(n, classes, dim)
    ours = getattr(dl, name)(**_sizes(name, classes, dim), **options)
    theirs = None
    if pytorch_metric_learning is not None and hasattr(pl, name):
        theirs = getattr(pl, name)(**_sizes(name, classes, dim), **options)
        ours.load_state_dict(theirs.state_dict())
    (held,) = ours.parameters()
    columns = held.numel() // dim  # classes × centres per class (sub-centres, SoftTriple's)
    weight = torch.randn(dim, columns, requires_grad=True)
    calls = {
        "bare": (lambda x: (x @ weight).sum(), [weight]),
        "ours": (lambda x: ours(x, labels), list(ours.parameters())),
    }
    for _ in range(2):  # warm-up: allocator, caches, lazy initialisation
        for call, params in calls.values():
            _time(call, emb, params)
    first = _time(lambda x: theirs(x, labels), emb, list(theirs.parameters())) if theirs else 0.0
    pml_reps = max(1, min(reps, int(budget / max(first, 1e-6))))
    times: dict[str, list[float]] = {"bare": [], "ours": [], "pml": [first] if theirs else []}
    for rep in range(reps):
        for key, (call, params) in calls.items():
            times[key].append(_time(call, emb, params))
        if theirs is not None and rep + 1 < pml_reps:
            times["pml"].append(_time(lambda x: theirs(x, labels), emb, list(theirs.parameters())))
    return Row(
        name,
        n,
        classes,
        columns,
        dim,
        1e3 * statistics.median(times["bare"]),
        1e3 * statistics.median(times["ours"]),
        1e3 * statistics.median(times["pml"]) if times["pml"] else None,
        len(times["pml"]),
        reps,
    )


def _markdown(rows: list[Row], meta: dict) -> str:
    lines = [
        "# Losses with per-class parameters, forward+backward, CPU",
        "",
        f"dmlkit {meta['dmlkit']}, PML {meta['pml']}, torch {meta['torch']}, "
        f"{meta['threads']} threads, {meta['cpu']}. Medians over {meta['reps']} interleaved "
        "repetitions (fewer for PML where one call exceeds the time budget; the count is "
        "shown). `bare` is one `x @ W` forward+backward (gradients of both) with W of the "
        "loss's own size, dim × columns (columns = classes × centres per class: 3 sub-centres "
        "for SubCenterArcFace, 10 centres for SoftTriple, 1 otherwise); dmlkit's loss holds "
        "PML's initial parameters.",
        "",
        "| loss | batch | classes | columns | dim | bare ms | dmlkit ms | PML ms (reps) "
        "| PML / dmlkit | dmlkit / bare |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        pml = "—" if r.pml_ms is None else f"{r.pml_ms:.1f} ({r.pml_reps})"
        speed = "—" if r.speedup is None else f"{r.speedup:.1f}×"
        lines.append(
            f"| {r.loss} | {r.batch} | {r.classes} | {r.columns} | {r.dim} | {r.bare_ms:.2f} | "
            f"{r.dmlkit_ms:.2f} | {pml} | {speed} | {r.dmlkit_ms / r.bare_ms:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="*", default=[128, 1024, 4096])
    parser.add_argument("--classes", type=int, nargs="*", default=[100, 10_000])
    parser.add_argument("--dim", type=int, nargs="*", default=[128, 512])
    parser.add_argument("--only", nargs="*", default=None, help="substrings of loss names")
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--pml-budget", type=float, default=20.0, help="seconds per PML case")
    parser.add_argument("--tag", default="", help="suffix for the result files")
    args = parser.parse_args()
    meta = {
        "dmlkit": dmlkit.__version__,
        "pml": getattr(pytorch_metric_learning, "__version__", "absent"),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "reps": args.reps,
    }
    cases = [(n, o) for n, o in CASES if not args.only or any(s in n for s in args.only)]
    rows = []
    run_case(*cases[0], 128, 100, args.dim[0], args.pml_budget, 2)  # the process's first calls
    for dim in args.dim:
        for classes in args.classes:
            for n in args.batch:
                for name, options in cases:
                    rows.append(
                        run_case(name, options, n, classes, dim, args.pml_budget, args.reps)
                    )
                    print(_markdown(rows[-1:], meta).splitlines()[-1], flush=True)
    stem = RESULTS / f"class_losses_cpu{args.tag}"
    stem.with_suffix(".md").write_text(_markdown(rows, meta))
    stem.with_suffix(".json").write_text(
        json.dumps({"meta": meta, "rows": [asdict(r) for r in rows]}, indent=1)
    )
    print(f"wrote {stem}.md and .json")


if __name__ == "__main__":
    main()
