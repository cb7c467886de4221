"""Embedding throughput (decode + transform + model) and nearest-neighbour search cost.

Two parts, each measured in one run with interleaved repetitions and reported as medians:

- **Embedding**: MobileNetV2 (ImageNet weights when ``$DMLKIT_DATA/mobilenet_v2_imagenet`` has
  them, else random initialisation, which the results say) with a 128-d head on the first
  ``--images`` test images of ``$DMLKIT_DATA/cub100_subset`` (227×227 JPEGs, the evaluation
  transform: resize 256, centre crop 227), batch 32. End-to-end images/s of the old
  :func:`embed_dataset` loop (kept below as :func:`old_embed`: contiguous, ``no_grad``) and of
  the current one (inference mode, channels-last, DataLoader workers), side by side with the
  bare forward of the same model on the same images preloaded as tensors, contiguous and
  channels-last. The target is end-to-end ≥ 90% of the bare channels-last forward.
- **Search**: :class:`~dmlkit.gallery.Gallery` search, exact (TorchKNN) against faiss IVF and
  HNSW (the gallery's default settings), on synthetic clustered 128-d unit vectors at
  ``--sizes`` items (100k and 1M): index build time, search time per query (1,000 queries in
  one call, ids, scores and labels included) and recall@10 against the exact neighbours.

Run ``python benchmarks/embedding.py`` (about 10-15 minutes on 2 cores). Results go to
``benchmarks/results/<--name>.{md,json}``: ``embedding_cpu_throughput`` (``--skip-search``) and
``embedding_cpu_search`` (``--skip-embedding``) are the published runs. Without
``$DMLKIT_DATA/cub100_subset`` the embedding part is skipped with a message naming the missing
folder.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from dmlkit.data import LabelledDataset, eval_transform, subset
from dmlkit.data.benchmarks import cub100_subset
from dmlkit.gallery import ApproximateIndex, Gallery, SearchResult
from dmlkit.models import build_model
from dmlkit.training import embed_dataset

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
BATCH = 32
WEIGHTS = "mobilenet_v2_imagenet/mobilenet_v2-b0353104.pth"


@torch.no_grad()
def old_embed(
    model: nn.Module, dataset: LabelledDataset, *, batch_size: int, num_workers: int = 0
) -> Tensor:
    """The embedding loop before this change: contiguous layout, ``no_grad``, no pinning."""
    was_training = model.training
    model.eval()
    loader: DataLoader[tuple[Tensor, int]] = DataLoader(
        cast(Dataset[tuple[Tensor, int]], dataset),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
    )
    chunks = [model(x).float().cpu() for x, _ in loader]
    model.train(was_training)
    return torch.cat(chunks)


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def embedding_part(data_dir: Path, images: int, repeats: int) -> dict[str, Any] | None:
    folder = data_dir / "cub100_subset"
    if not folder.is_dir():
        print(f"{folder} not found; the embedding benchmark is skipped")
        return None
    weights = data_dir / WEIGHTS
    pretrained = weights.is_file()
    torch.manual_seed(0)
    model = build_model("mobilenet_v2", 128, pretrained=weights if pretrained else None).eval()
    dataset = subset(cub100_subset(folder, "test", transform=eval_transform()), range(images))
    batches = [
        torch.stack([dataset[i][0] for i in range(s, min(s + BATCH, images))])
        for s in range(0, images, BATCH)
    ]
    nhwc_model = copy.deepcopy(model)
    for tensor in [*nhwc_model.parameters(), *nhwc_model.buffers()]:
        if tensor.ndim == 4:
            tensor.data = tensor.data.contiguous(memory_format=torch.channels_last)
    nhwc_batches = [b.contiguous(memory_format=torch.channels_last) for b in batches]

    def bare(net: nn.Module, inputs: list[Tensor]) -> Tensor:
        with torch.inference_mode():
            return torch.cat([net(x) for x in inputs])

    variants: dict[str, Callable[[], Tensor]] = {
        "old loop (contiguous, no_grad, 0 workers)": lambda: old_embed(
            model, dataset, batch_size=BATCH
        ),
        "embed_dataset, 0 workers": lambda: embed_dataset(model, dataset, batch_size=BATCH)[0],
        "embed_dataset, 1 worker": lambda: embed_dataset(
            model, dataset, batch_size=BATCH, num_workers=1
        )[0],
        "embed_dataset, 2 workers": lambda: embed_dataset(
            model, dataset, batch_size=BATCH, num_workers=2
        )[0],
        "bare forward, contiguous (preloaded)": lambda: bare(model, batches),
        "bare forward, channels-last (preloaded)": lambda: bare(nhwc_model, nhwc_batches),
    }
    # Warm-up: one batch through each layout.
    bare(model, batches[:1])
    bare(nhwc_model, nhwc_batches[:1])
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    outputs: dict[str, Tensor] = {}
    for rep in range(repeats):
        for name, fn in variants.items():
            elapsed, out = _timed(fn)
            seconds[name].append(elapsed)
            outputs[name] = out
            print(f"rep {rep}  {name:42s} {images / elapsed:6.1f} images/s", flush=True)
    reference = outputs["old loop (contiguous, no_grad, 0 workers)"]
    rows: list[dict[str, Any]] = [
        {
            "variant": name,
            "seconds": times,
            "median_seconds": statistics.median(times),
            "images_per_second": images / statistics.median(times),
            "max_abs_diff_vs_old": float((outputs[name].float() - reference).abs().max()),
        }
        for name, times in seconds.items()
    ]
    by_name = {row["variant"]: row for row in rows}
    bare_nhwc = by_name["bare forward, channels-last (preloaded)"]["images_per_second"]
    best = max(
        (row for row in rows if row["variant"].startswith("embed_dataset")),
        key=lambda row: row["images_per_second"],
    )
    return {
        "images": images,
        "batch_size": BATCH,
        "repeats": repeats,
        "weights": "ImageNet" if pretrained else "random initialisation (weights file absent)",
        "rows": rows,
        "best_end_to_end": best["variant"],
        "ratio_to_bare_channels_last": best["images_per_second"] / bare_nhwc,
        "target_met": best["images_per_second"] >= 0.9 * bare_nhwc,
        "speedup_vs_old": best["images_per_second"]
        / by_name["old loop (contiguous, no_grad, 0 workers)"]["images_per_second"],
    }


def _clustered(n: int, dim: int, generator: torch.Generator, centres: Tensor) -> Tensor:
    labels = torch.randint(len(centres), (n,), generator=generator)
    points = centres[labels] + 0.35 * torch.randn(n, dim, generator=generator) / math.sqrt(dim)
    return torch.nn.functional.normalize(points, dim=1)


def _recall(found: list[list[str | None]], truth: list[list[str | None]]) -> float:
    hits = sum(len(set(f) & set(t)) for f, t in zip(found, truth, strict=True))
    return hits / sum(len(t) for t in truth)


def search_size(n: int, queries: int, repeats: int, k: int = 10) -> dict[str, Any]:
    """Gallery search at n items: exact, and faiss IVF and HNSW with the library's defaults."""
    dim = 128
    generator = torch.Generator().manual_seed(n)
    centres = torch.randn(max(100, n // 100), dim, generator=generator)
    gallery = Gallery.from_embeddings(_clustered(n, dim, generator, centres), np.zeros(n, np.int64))
    query = _clustered(queries, dim, generator, centres)
    rows: dict[str, dict[str, Any]] = {}
    approximate: dict[str, ApproximateIndex] = {"faiss IVF": "ivf", "faiss HNSW": "hnsw"}
    for name, kind in approximate.items():
        build, _ = _timed(functools.partial(gallery.build_index, kind))
        rows[name] = {"build_seconds": build}
        print(f"n={n:>9,}  {name:10s} built in {build:.1f} s", flush=True)
    rows = {"exact (TorchKNN)": {"build_seconds": 0.0}, **rows}
    searches: dict[str, Callable[[], SearchResult]] = {
        "exact (TorchKNN)": functools.partial(gallery.search, query, k),
        **{
            name: functools.partial(gallery.search, query, k, False, index=kind)
            for name, kind in approximate.items()
        },
    }
    found: dict[str, SearchResult] = {}
    times: dict[str, list[float]] = {name: [] for name in rows}
    for _ in range(repeats):
        for name, search in searches.items():
            elapsed, found[name] = _timed(search)
            times[name].append(elapsed)
    truth = found["exact (TorchKNN)"].ids
    for name, row in rows.items():
        row["description"] = found[name].method
        row["search_seconds"] = times[name]
        row["ms_per_query"] = 1e3 * statistics.median(times[name]) / queries
        row["recall_at_10"] = _recall(found[name].ids, truth)
        print(
            f"n={n:>9,}  {name:16s} {row['ms_per_query']:.3f} ms/query  "
            f"recall@10 {row['recall_at_10']:.3f}",
            flush=True,
        )
    return {"items": n, "queries": queries, "dim": dim, "k": k, "methods": rows}


def search_part(queries: int, repeats: int, sizes: list[int]) -> dict[str, Any]:
    return {
        "sizes": [search_size(n, queries, repeats) for n in sizes],
        "note": "Builds are one-off: a saved gallery keeps its index.",
    }


def _markdown(results: dict[str, Any]) -> str:
    lines = [
        "# Embedding throughput and search cost (CPU)",
        "",
        f"`python benchmarks/embedding.py`: medians of interleaved repetitions in one run "
        f"(other jobs may share the machine, so single timings are noisy), "
        f"{torch.get_num_threads()} torch threads, "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}.",
        "",
    ]
    emb = results.get("embedding")
    if emb is None:
        lines += [f"Embedding part skipped: {results['embedding_skipped']}.", ""]
    else:
        lines += [
            "## Embedding (decode + transform + model)",
            "",
            f"MobileNetV2 ({emb['weights']}) + 128-d head, {emb['images']} CUB-subset test "
            f"images (resize 256, centre crop 227), batch {emb['batch_size']}, "
            f"{emb['repeats']} repetitions.",
            "",
            "| Variant | Images/s (median) | Images/s per repetition | Max abs diff vs old loop |",
            "|---|---:|---:|---:|",
        ]
        for row in emb["rows"]:
            each = ", ".join(f"{emb['images'] / t:.1f}" for t in row["seconds"])
            lines.append(
                f"| {row['variant']} | {row['images_per_second']:.1f} | {each} | "
                f"{row['max_abs_diff_vs_old']:.1e} |"
            )
        verdict = "met" if emb["target_met"] else "NOT met"
        lines += [
            "",
            f"Best end-to-end: {emb['best_end_to_end']}, "
            f"{100 * emb['ratio_to_bare_channels_last']:.0f}% of the bare channels-last "
            f"forward (target ≥ 90%: **{verdict}**); {emb['speedup_vs_old']:.2f}× the old loop.",
            "",
        ]
        spread = max(max(r["seconds"]) / min(r["seconds"]) for r in emb["rows"])
        if spread > 1.3:
            lines[-1:] = [
                f"Caution: a variant's rate varied up to {spread:.1f}× between repetitions "
                "(other jobs were using the same 2 cores), so these ratios are indicative, not "
                "precise.",
                "",
            ]
    search = results["search"]
    if not search["sizes"]:
        return "\n".join([*lines, f"Search part skipped: {search['note']}."]) + "\n"
    lines += [
        "## Search (synthetic clustered 128-d unit vectors, k = 10)",
        "",
        "| Items | Method | Build (s) | Search ms/query | Recall@10 vs exact |",
        "|---:|---|---:|---:|---:|",
    ]
    for size in search["sizes"]:
        for name, row in size["methods"].items():
            lines.append(
                f"| {size['items']:,} | {name} ({row['description']}) | "
                f"{row['build_seconds']:.1f} | {row['ms_per_query']:.3f} | "
                f"{row['recall_at_10']:.3f} |"
            )
    queries = search["sizes"][0]["queries"] if search["sizes"] else 0
    lines += [
        "",
        f"{queries:,} queries searched in one call; ms/query is the call's time divided by "
        f"{queries:,}. Recall@10: the share of the exact 10 nearest neighbours each method "
        f"returns. {search['note']}",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument(
        "--sizes",
        default="100000,1000000",
        help="gallery sizes of the search part, comma-separated",
    )
    parser.add_argument("--name", default="embedding_cpu", help="results file stem")
    parser.add_argument("--skip-search", action="store_true")
    parser.add_argument("--skip-embedding", action="store_true")
    parser.add_argument(
        "--render-only",
        action="store_true",
        help="rewrite the .md from the existing .json without measuring",
    )
    args = parser.parse_args()
    if args.render_only:
        saved = json.loads((RESULTS / f"{args.name}.json").read_text())
        (RESULTS / f"{args.name}.md").write_text(_markdown(saved))
        return
    folder = os.environ.get("DMLKIT_DATA")
    results: dict[str, Any] = {}
    if args.skip_embedding:
        results["embedding_skipped"] = "--skip-embedding"
    elif not folder:
        results["embedding_skipped"] = "$DMLKIT_DATA is not set"
        print("$DMLKIT_DATA is not set; the embedding benchmark is skipped")
    else:
        emb = embedding_part(Path(folder).expanduser(), args.images, args.repeats)
        if emb is None:
            results["embedding_skipped"] = f"{Path(folder) / 'cub100_subset'} not found"
        else:
            results["embedding"] = emb
    if args.skip_search:
        results["search"] = {"sizes": [], "note": "search part skipped (--skip-search)"}
    else:
        sizes = [int(size) for size in args.sizes.split(",")]
        results["search"] = search_part(args.queries, args.repeats, sizes)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(results, indent=2))
    markdown = _markdown(results)
    (RESULTS / f"{args.name}.md").write_text(markdown)
    print(markdown)


if __name__ == "__main__":
    main()
