"""The ``dmlkit`` command: ``train``, ``evaluate``, ``embed``, ``sweep``, ``tune``, ``bench`` and
``report``.

``dmlkit train`` with no argument trains the built-in default (a small ConvNet on the Omniglot
copy embedded in the package, training on the 964 characters of the background alphabets and
testing on the 659 unseen characters of the evaluation alphabets) and prints the retrieval
metrics of the unseen classes before and after training.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .display import print_line
from .progress import quiet
from .training import (
    ConfigError,
    Trainer,
    embed_dataset,
    load_config,
    load_trained_model,
    split_dataset,
)
from .training.datasets import describe_classes


def _builtin_methods() -> str:
    """The protocol's built-in method names, read without importing the protocol (Optuna)."""
    import yaml

    presets = Path(__file__).with_name("protocol") / "presets" / "methods.yaml"
    return ", ".join(yaml.safe_load(presets.read_text()))


def _comparison(before: dict[str, float] | None, after: dict[str, float] | None) -> str:
    assert after is not None, "dmlkit train evaluates the test classes"
    width = max(len(name) for name in after)
    if before is None:
        lines = [f"{'metric':<{width}}   after"]
        lines += [f"{name:<{width}}  {value:.4f}" for name, value in after.items()]
        return "\n".join(lines)
    lines = [f"{'metric':<{width}}  before   after"]
    lines += [
        f"{name:<{width}}  {before.get(name, float('nan')):.4f}  {value:.4f}"
        for name, value in after.items()
    ]
    return "\n".join(lines)


def _launch_processes(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """``dmlkit train --nproc-per-node N``: the same command under torchrun, N processes."""
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    rest = list(argv)
    at = next(i for i, arg in enumerate(rest) if arg.startswith("--nproc"))  # or a prefix of it
    del rest[at : at + (1 if "=" in rest[at] else 2)]
    try:
        # --standalone: a rendezvous on a free port for each launch, so two launches on one
        # machine (or a relaunch while a killed run's sockets close) never share the default one.
        torchrun.main(
            ["--standalone", "--nproc-per-node", str(args.nproc_per_node), "-m", "dmlkit", *rest]
        )
    except ChildFailedError as error:
        # torchrun stops every process when one fails; the failed one printed its error.
        failed = ", ".join(f"rank {rank}" for rank in sorted(error.failures))
        print(f"dmlkit train: error: {failed} failed; all processes were stopped", file=sys.stderr)
        return 2
    return 0


def _in_process_group() -> bool:
    """Joins the process group torchrun describes in the environment, if any."""
    import os

    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return False
    import torch

    if torch.cuda.is_available():
        # One GPU per process; CUDA tensors go over NCCL, CPU tensors and objects over gloo.
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("cpu:gloo,cuda:nccl")
    else:
        dist.init_process_group("gloo")
    return True


def _train(args: argparse.Namespace) -> int:
    if args.nproc_per_node is not None:
        import os

        if args.nproc_per_node < 1:
            raise ConfigError(f"--nproc-per-node must be at least 1, got {args.nproc_per_node}")
        if "WORLD_SIZE" in os.environ:
            raise ConfigError("--nproc-per-node starts torchrun: do not give it under torchrun")
        if args.nproc_per_node > 1:
            return _launch_processes(args, args.argv)
    joined = _in_process_group()
    try:
        status = _train_here(args)
        if joined:
            import torch.distributed as dist

            # Every rank leaves together: a rank that tears its connections down while another
            # still reports can abort in gloo's threads at exit ("terminate called ...").
            # Not after an error: the others are then stopped by torchrun, not awaited.
            dist.barrier()
        return status
    finally:
        if joined:
            import torch.distributed as dist

            dist.destroy_process_group()


def _train_here(args: argparse.Namespace) -> int:
    config_path = args.config
    if args.resume and args.config is None and args.run_dir is not None:
        config_path = Path(args.run_dir) / "config.yaml"  # the run's own config
    config = load_config(config_path, args.set)
    if args.resume and args.run_dir is None and config.logging.run_dir is None:
        raise ConfigError("--resume needs the run folder: give --run-dir or logging.run_dir")
    trainer = Trainer(config, run_dir=args.run_dir)
    data = trainer.data
    name = config.data.name
    trained = describe_classes(name, "train", len(np.unique(data.train.labels)))
    unseen = describe_classes(name, "test", len(np.unique(data.test.labels)))
    if trainer.is_writer:
        print(
            f"dmlkit train: {name}, training on {trained}, {len(data.train)} items; testing on "
            f"{unseen}, {len(data.test)} items; run folder {trainer.run_dir}",
            flush=True,
        )
    result = trainer.fit(resume=args.resume)
    if not trainer.is_writer:
        return 0  # rank 0 reports and draws for the run
    stopped = ", stopped early" if result.stopped_early else ""
    speed = f", {result.images_per_second:.0f} images/s" if result.images_per_second else ""
    print(
        f"\n{result.steps} steps{stopped}{speed}. "
        f"Retrieval on the {unseen}, each test item querying the others:"
    )
    print(_comparison(result.before, result.after))
    if result.steps >= config.logging.log_every:
        from .viz import plot_training_log

        print(f"Training curves: {plot_training_log(trainer.run_dir)}")
    print(f"HTML report (curves, embedding maps, retrieval grids): dmlkit report {trainer.run_dir}")
    return 0


def _add_embedding_arguments(command: argparse.ArgumentParser) -> None:
    command.add_argument("--num-workers", type=int, default=0, help="DataLoader workers")
    command.add_argument("--device", default="cpu", help="auto, cpu, cuda or cuda:N (default cpu)")
    command.add_argument(
        "--autocast",
        choices=("bf16", "fp16"),
        help="run the model under bf16/fp16 mixed precision (CUDA only)",
    )
    command.add_argument(
        "--contiguous",
        action="store_true",
        help="keep the contiguous (NCHW) layout instead of channels-last",
    )


def _embedding_options(args: argparse.Namespace) -> dict[str, Any]:
    from .training import resolve_device

    return {
        "device": resolve_device(args.device),
        "num_workers": args.num_workers,
        "channels_last": False if args.contiguous else None,
        "autocast": args.autocast,
    }


def _evaluate(args: argparse.Namespace) -> int:
    from .evaluation import evaluate

    config, model = load_trained_model(args.checkpoint)
    dataset = split_dataset(config, args.split)
    options = _embedding_options(args)
    embeddings, labels = embed_dataset(
        model.to(options["device"]),
        dataset,
        batch_size=config.train.eval_batch_size,
        progress=True,
        description=f"embedding {args.split}",
        **options,
    )
    print(evaluate(embeddings, labels, metrics=config.validation.metrics))
    if args.verification:
        import torch

        from .evaluation import verification

        try:
            scores, same = verification.item_pairs(embeddings, torch.as_tensor(labels))
            numbers = verification.summary(scores, same)
        except ValueError as error:  # e.g. one item per class: no genuine pair
            print(f"\nVerification: not computed ({error})")
            return 0
        which = verification.pairs_description(len(labels))
        print(f"\nVerification over every pair of {which} (cosine):")
        for name, value in numbers.items():
            print(f"  {name:<24} {value:.6g}")
    return 0


def _index(args: argparse.Namespace) -> int:
    from .gallery import Gallery

    Gallery.check_save_folder(args.out)
    gallery = Gallery.from_checkpoint(
        args.checkpoint,
        args.data,
        metric=args.metric,
        batch_size=args.batch_size,
        progress=True,
        **_embedding_options(args),
    )
    kinds = list(dict.fromkeys(args.approximate_index))
    for kind in kinds:
        gallery.build_index(kind)
    out = gallery.save(args.out)
    built = f", with a faiss {' and '.join(kinds)} index" if kinds else ""
    print(f"indexed {len(gallery)} items of {args.data} ({gallery.metric}){built} into {out}")
    return 0


def _search(args: argparse.Namespace) -> int:
    from .gallery import ApproximateIndex, Gallery
    from .training import resolve_device

    gallery = Gallery.load(
        args.gallery, checkpoint=args.checkpoint, device=resolve_device(args.device)
    )
    # The saved index by default; HNSW (built now) when the gallery has none.
    index: ApproximateIndex = args.index or (gallery.approximate_indexes or ["hnsw"])[0]
    result = gallery.search(args.image, k=args.k, exact=not args.approximate, index=index)
    names = gallery.class_names

    def label_text(label: int) -> str:
        return names[label] if names is not None and 0 <= label < len(names) else str(label)

    if args.json:
        payload = result.to_dict()
        for rows in payload["queries"]:
            for row in rows:
                row["label_name"] = label_text(row["label"])
        payload["queries"] = [
            {"image": image, "neighbours": rows}
            for image, rows in zip(args.image, payload["queries"], strict=True)
        ]
        print(json.dumps(payload, indent=2))
        return 0
    print(f"{result.method}")
    for query, image in enumerate(args.image):
        rows = result.rows(query)
        ids = [str(row["id"]) for row in rows]
        labels = [label_text(row["label"]) for row in rows]
        id_width = max(len("id"), *map(len, ids))
        label_width = max(len("label"), *map(len, labels))
        print(f"\n{image}")
        print(f"{'rank':>4}  {'id':<{id_width}}  {'label':<{label_width}}  score")
        for row, id_, label in zip(rows, ids, labels, strict=True):
            print(
                f"{row['rank']:>4}  {id_:<{id_width}}  {label:<{label_width}}  {row['score']:.4f}"
            )
    return 0


def _export(args: argparse.Namespace) -> int:
    import torch

    from .models.export import check_export, export_model, read_sidecar, sidecar_path

    if args.check_images < 1:
        raise ValueError(f"--check-images must be at least 1, got {args.check_images}")
    path = export_model(args.checkpoint, args.format, args.out)
    print(f"exported {args.format} model: {path}")
    print(f"sidecar: {sidecar_path(path)}")
    config, model = load_trained_model(args.checkpoint)
    try:
        test = split_dataset(config, "test")
        count = min(args.check_images, len(test))
        step = max(1, len(test) // count)
        images = torch.stack([test[i * step][0] for i in range(count)])
        what = f"{count} test images"
    except FileNotFoundError as error:
        # The run's data is not on this machine: random inputs of the exported shape instead.
        channels, height, width = read_sidecar(path)["input_size"]
        images = torch.randn(args.check_images, channels, height, width)
        what = f"{args.check_images} random inputs (no test data: {error})"
    try:
        diff = check_export(path, model, images)
    except ImportError as error:
        print(f"parity check skipped: {error}")
        return 0
    print(f"parity check on {what}: max abs difference {diff:.3g}")
    if diff > 1e-4:
        print("dmlkit export: error: the exported model differs from PyTorch by more than 1e-4")
        return 1
    return 0


def _embed(args: argparse.Namespace) -> int:
    config, model = load_trained_model(args.checkpoint)
    dataset = split_dataset(config, args.split)
    options = _embedding_options(args)
    embeddings, labels = embed_dataset(
        model.to(options["device"]),
        dataset,
        batch_size=config.train.eval_batch_size,
        progress=True,
        description=f"embedding {args.split}",
        **options,
    )
    from .training.checkpoint import save_array_atomic

    out = Path(args.out)
    save_array_atomic(embeddings.numpy(), out / "embeddings.npy")
    save_array_atomic(np.asarray(labels), out / "labels.npy")
    print(f"wrote {embeddings.shape[0]} × {embeddings.shape[1]} embeddings and labels to {out}")
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from .protocol import parse_values, run_sweep, sweep_markdown
    from .viz.sweep import plot_sweep

    if args.smooth is not None and args.smooth < 1:
        raise ValueError(f"--smooth must be at least 1, got {args.smooth}")
    config = load_config(args.config, args.set)
    values = parse_values(args.values)
    out = Path(args.out) if args.out else Path("runs") / f"sweep-{args.param}"
    result = run_sweep(config, args.param, values, out, seeds=args.seeds)
    plot = plot_sweep(result, out / "plots" / "sweep.png", smoothing=args.smooth)
    print("\n" + sweep_markdown(result))
    print(f"Results: {out / 'sweep.md'}, sweep.csv, sweep.json; plot: {plot}")
    print(f"HTML report: dmlkit report {out}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from .viz.report import ReportOptions, write_report

    options = ReportOptions(
        checkpoint=args.checkpoint,
        queries=tuple(args.query),
        worst=args.worst,
        k=args.k,
        max_points=args.max_points,
        projection=args.projection,
        smoothing=args.smooth,
        embeddings=not args.no_embeddings,
        device=args.device,
        progress=True,
    )
    path = write_report(args.folder, args.out, options, say=print_line)
    print(f"Report: {path}")
    return 0


def _bench_config(args: argparse.Namespace) -> tuple[Any, list[str]]:
    from .protocol import load_bench_config

    overrides = list(args.set)
    for flag in ("trials", "workers", "storage", "out"):
        value = getattr(args, flag)
        if value is not None:
            # JSON is YAML: a path or URL stays the string it is ("#", digits and all).
            overrides.append(f"protocol.{flag}={json.dumps(value)}")
    bench = load_bench_config(args.config, overrides)
    methods = args.method or list(bench.methods)
    unknown = [name for name in methods if name not in bench.methods]
    if unknown:
        raise ConfigError(
            f"--method {', '.join(unknown)}: not in the config (its methods: "
            f"{', '.join(bench.methods)})"
        )
    return bench, methods


def _tune_all(bench: Any, methods: list[str]) -> None:
    from .protocol import tune
    from .viz import plot_study_history

    for method in methods:
        study = tune(bench, method)
        if any(trial.value is not None for trial in study.get_trials(deepcopy=False)):
            path = plot_study_history(study, bench.out / "plots" / f"{method}_history.png")
            print(f"[{method}] optimisation history: {path}", flush=True)


def _tune(args: argparse.Namespace) -> int:
    bench, methods = _bench_config(args)
    _tune_all(bench, methods)
    return 0


def _bench(args: argparse.Namespace) -> int:
    from .protocol import benchmark, results_markdown, write_results

    bench, methods = _bench_config(args)
    _tune_all(bench, methods)
    results = benchmark(bench, methods)
    paths = write_results(bench, results)
    print("\n" + results_markdown(bench, results))
    print(f"Results: {paths['md']}, {paths['csv']}, {paths['json']}")
    return 0


def _add_overrides(command: argparse.ArgumentParser, text: str) -> None:
    command.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=text)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dmlkit",
        description="Deep metric learning: train, evaluate, embed, sweep, tune, benchmark and "
        "report.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = commands.add_parser(
        "train",
        help="train an embedding network",
        description="Train an embedding network as a YAML config describes (the built-in "
        "default without one: the embedded Omniglot at 28x28), printing retrieval metrics of "
        "the unseen test classes before and after.",
    )
    train.add_argument("config", nargs="?", help="YAML config (see configs/); default: omniglot28")
    _add_overrides(train, "override a config field, e.g. --set optimizer.lr=1e-5 (repeatable)")
    train.add_argument("--run-dir", help="output folder (default: logging.run_dir or runs/<time>)")
    train.add_argument(
        "--resume", action="store_true", help="continue exactly from <run dir>/last.pt"
    )
    train.add_argument(
        "--nproc-per-node",
        type=int,
        metavar="N",
        help="train on N processes of this machine (torchrun; gloo on CPU, nccl on GPUs): "
        "each takes its share of every global P×K batch",
    )
    train.set_defaults(handler=_train)

    for name, handler, summary in (
        ("evaluate", _evaluate, "retrieval metrics of a trained model on a split"),
        ("embed", _embed, "write a split's embeddings and labels to .npy files"),
    ):
        command = commands.add_parser(name, help=summary, description=summary.capitalize() + ".")
        command.add_argument("checkpoint", help="a run's last.pt or best.pt")
        command.add_argument(
            "--split", choices=("train", "val", "test"), default="test", help="default: test"
        )
        _add_embedding_arguments(command)
        if name == "embed":
            command.add_argument(
                "--out", required=True, help="folder for embeddings.npy, labels.npy"
            )
        else:
            command.add_argument(
                "--verification",
                action="store_true",
                help="also same/different verification over every pair: FNMR at FMR 1e-2 and "
                "1e-3 with their thresholds, the best F1 and its threshold",
            )
        command.set_defaults(handler=handler)

    sweep = commands.add_parser(
        "sweep",
        help="train once per value of one hyperparameter and plot the final metrics and curves",
        description="Hyperparameter sensitivity: train the config once per value (and seed) of "
        "one setting, then tabulate the final test metrics and plot them with the loss curves. "
        "Finished runs are read back and cut-off runs resume, so a sweep can be re-started.",
    )
    sweep.add_argument("config", nargs="?", help="YAML training config; default: omniglot28")
    sweep.add_argument(
        "--param",
        required=True,
        metavar="KEY",
        help="the dotted config key to vary, e.g. loss.options.margin",
    )
    sweep.add_argument(
        "--values",
        required=True,
        metavar="SPEC",
        help="START:STOP:STEP (STOP included), e.g. 0.4:1.0:0.1, or a list, e.g. 0.1,0.3,1",
    )
    sweep.add_argument("--seeds", type=int, default=1, help="runs per value (seed, seed+1, ...)")
    _add_overrides(sweep, "override a config field, e.g. --set loss.name=CircleLoss (repeatable)")
    sweep.add_argument("--out", help="output folder (default: runs/sweep-<KEY>)")
    sweep.add_argument("--smooth", type=int, help="moving-average window of the loss curves")
    sweep.set_defaults(handler=_sweep)

    for name, handler, summary in (
        (
            "tune",
            _tune,
            "search each method's hyperparameters with the Reality Check protocol (class-"
            "disjoint cross-validation, TPE, mean validation MAP@R); resumable",
        ),
        (
            "bench",
            _bench,
            "tune, then re-run each method's best hyperparameters and report test P@1, "
            "R-Precision and MAP@R with confidence intervals (Markdown, CSV, JSON, plots)",
        ),
    ):
        command = commands.add_parser(
            name,
            help=summary,
            description=summary.capitalize() + ".",
            epilog=f"Built-in methods (a config's methods section names any): {_builtin_methods()}",
        )
        command.add_argument(
            "config", help="benchmark YAML, or a built-in one: digits, omniglot, cub200, ..."
        )
        command.add_argument(
            "--method",
            action="append",
            help="only this one of the config's methods (repeatable; default: all)",
        )
        _add_overrides(
            command, "override protocol.* or training.*, e.g. --set training.train.max_steps=100"
        )
        command.add_argument("--trials", type=int, help="finished trials per method")
        command.add_argument("--workers", type=int, help="local worker processes")
        command.add_argument("--storage", help="Optuna storage URL (default: SQLite in --out)")
        command.add_argument("--out", help="output folder (default: runs/bench-<config name>)")
        command.set_defaults(handler=handler)

    report = commands.add_parser(
        "report",
        help="write one self-contained HTML page for a run, a sweep or a benchmark",
        description="Write <FOLDER>/report.html: metrics tables and embedded plots (training "
        "curves; for a run or benchmark also UMAP maps of the embeddings and retrieval grids of "
        "chosen and of the worst queries; for a sweep the metrics against the swept value).",
    )
    report.add_argument("folder", help="a run folder, a sweep folder or a benchmark folder")
    report.add_argument("--out", help="HTML file (default: <FOLDER>/report.html)")
    report.add_argument(
        "--checkpoint",
        help="the run's checkpoint file to embed with (default: best.pt, else last.pt)",
    )
    report.add_argument(
        "--device", default="auto", help="where to embed: auto (CUDA when available), cpu, cuda"
    )
    report.add_argument(
        "--query",
        type=int,
        action="append",
        default=[],
        metavar="INDEX",
        help="show this test item's retrieval results (repeatable)",
    )
    report.add_argument(
        "--worst", type=int, default=6, help="worst queries shown, 0 to 50 (default 6)"
    )
    report.add_argument(
        "--k", type=int, default=5, help="neighbours per query, 1 to 20 (default 5)"
    )
    report.add_argument(
        "--max-points", type=int, default=2000, help="points per embedding map (default 2000)"
    )
    report.add_argument(
        "--projection",
        choices=("auto", "umap", "pca"),
        default="auto",
        help="2-D projection of the maps (auto: UMAP, or PCA without umap-learn)",
    )
    report.add_argument("--smooth", type=int, help="moving-average window of the curves")
    report.add_argument(
        "--no-embeddings",
        action="store_true",
        help="skip the maps and retrieval grids (no model or data needed)",
    )
    report.set_defaults(handler=_report)

    index = commands.add_parser(
        "index",
        help="embed an image folder or CSV manifest with a checkpoint into a searchable gallery",
        description="Embed every image of DATA (a folder <root>/<class>/<image> or a CSV "
        "manifest path,label[,split]) with the checkpoint's model and evaluation preprocessing, "
        "and save the gallery (embeddings, labels, ids = image paths, model fingerprint) to --out.",
    )
    index.add_argument("checkpoint", help="a run's last.pt or best.pt")
    index.add_argument("data", help="an image folder (one sub-folder per class) or a CSV manifest")
    index.add_argument("--out", required=True, help="gallery folder (written atomically)")
    index.add_argument(
        "--metric",
        choices=("cosine", "euclidean", "dot"),
        default="cosine",
        help="similarity of the gallery (default: cosine)",
    )
    index.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    index.add_argument(
        "--approximate-index",
        choices=("hnsw", "ivf"),
        action="append",
        default=[],
        help="also build and save a faiss index for dmlkit search --approximate (repeatable)",
    )
    _add_embedding_arguments(index)
    index.set_defaults(handler=_index)

    search = commands.add_parser(
        "search",
        help="the nearest gallery items of query images",
        description="Embed each IMAGE with the gallery's model and preprocessing and print its "
        "k nearest gallery items (rank, id, label, score; higher scores are nearer).",
    )
    search.add_argument("gallery", help="a folder written by dmlkit index")
    search.add_argument("image", nargs="+", help="query image files")
    search.add_argument("--k", type=int, default=10, help="neighbours per query (default 10)")
    search.add_argument("--json", action="store_true", help="print JSON instead of tables")
    search.add_argument(
        "--approximate",
        action="store_true",
        help="approximate search with faiss (--index; the gallery's saved index if it has one)",
    )
    search.add_argument(
        "--index",
        choices=("hnsw", "ivf"),
        help="faiss index of --approximate (default: the gallery's saved one, else hnsw)",
    )
    search.add_argument(
        "--checkpoint", help="the gallery's checkpoint, where it is now if it was moved"
    )
    search.add_argument("--device", default="cpu", help="auto, cpu, cuda or cuda:N (default cpu)")
    search.set_defaults(handler=_search)

    export = commands.add_parser(
        "export",
        help="export a trained model to ONNX or TorchScript, with a JSON sidecar",
        description="Export a run's model to ONNX or TorchScript: the file takes preprocessed "
        "images [N, C, H, W] (any N) and returns L2-normalised embeddings; <FILE>.json beside it "
        "gives the input size, the preprocessing (mean/std, resize, crop), the embedding size, "
        "the backbone and a fingerprint of the weights. Prints the largest difference from the "
        "PyTorch model on a few test images.",
    )
    export.add_argument("checkpoint", help="a run's last.pt or best.pt")
    export.add_argument(
        "--format", choices=("onnx", "torchscript"), required=True, help="onnx or torchscript"
    )
    export.add_argument("--out", required=True, metavar="FILE", help="the exported model file")
    export.add_argument(
        "--check-images", type=int, default=8, metavar="N", help="test images checked (default 8)"
    )
    export.set_defaults(handler=_export)

    quiet_help = "no progress bars (for logs); results still print"
    parser.add_argument("--quiet", action="store_true", help=quiet_help)
    for command in commands.choices.values():
        # Also after the command's name; SUPPRESS keeps a --quiet given before it.
        command.add_argument(
            "--quiet", action="store_true", default=argparse.SUPPRESS, help=quiet_help
        )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``dmlkit`` command; returns the exit status.

    Errors a user can fix (a bad config key, a missing file, an output path that is a folder) are
    printed as one line, without a traceback, with exit status 2.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    args.argv = argv
    try:
        with quiet(args.quiet):
            return int(args.handler(args))
    except (ConfigError, OSError, ImportError, ValueError) as error:
        print(f"dmlkit {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
