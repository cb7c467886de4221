"""``dmlkit report``: self-contained HTML pages for a run, a sweep and a benchmark.

The pages are checked as documents (well-formed, every picture an embedded valid PNG, nothing
fetched from elsewhere, the numbers those of the run's files) and, where Debian's Chromium is
installed, rendered headless: the screenshot must show the embedded plots.
"""

from __future__ import annotations

import base64
import colorsys
import html.parser
import io
import json
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from browser import CHROMIUM, NO_CHROMIUM, screenshot
from dmlkit.cli import main
from dmlkit.training import (
    Trainer,
    embed_dataset,
    load_config,
    load_trained_model,
    split_dataset,
)
from dmlkit.viz import retrieval_lists, worst_queries
from dmlkit.viz.report import ReportOptions, render_html, report_kind, write_report
from run_helpers import DIGITS_RUN

PNG = b"\x89PNG\r\n\x1a\n"
# Digits 0-4 train, 5-9 test (8×8 images): a run of two epochs takes about a second.
RUN = [
    *DIGITS_RUN,
    "train.epochs=2",
    "logging.progress=false",
    "logging.log_every=1",
    "validation.every=1",
]
# A benchmark of one trial and two re-runs of two folds: a few seconds.
BENCH = [
    "training.train.epochs=1",
    "training.validation.every=1",
    "training.train.max_steps=3",
    "training.logging.log_every=1",
    "protocol.reruns=2",
]
# No UMAP in the fast tests: its first fit costs about 40 s of JIT compilation.
FAST_OPTIONS = ReportOptions(projection="pca", worst=3, k=4, max_points=300)


class _Page(html.parser.HTMLParser):
    """Collects the tags, images, links and text of a page, and checks the nesting."""

    VOID = frozenset({"meta", "img", "br", "hr", "link", "input"})

    def __init__(self) -> None:
        super().__init__()
        self.open: list[str] = []
        self.tags: list[str] = []
        self.images: list[str] = []
        self.references: list[str] = []
        self.text: list[str] = []
        self.tables: list[list[list[str]]] = []

    @property
    def cell_rows(self) -> list[list[str]]:
        """Every table row's cells, of every table."""
        return [row for table in self.tables for row in table]

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        values = dict(attrs)
        if tag == "img":
            self.images.append(values.get("src") or "")
        for name in ("href", "src"):
            if name in values and tag != "img":
                self.references.append(values[name] or "")
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self.tables[-1][-1].append("")
        if tag not in self.VOID:
            self.open.append(tag)

    def handle_endtag(self, tag: str) -> None:
        assert self.open and self.open[-1] == tag, f"</{tag}> closes {self.open[-1:]}"
        self.open.pop()

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        if self.open and self.open[-1] in ("td", "th"):
            self.tables[-1][-1][-1] += data


def _parse(path: Path) -> _Page:
    text = path.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>")
    page = _Page()
    page.feed(text)
    page.close()
    assert page.open == [], f"unclosed tags: {page.open}"
    assert not page.references, f"the page refers to other files: {page.references}"
    for source in page.images:
        assert source.startswith("data:image/png;base64,"), source[:60]
        data = base64.b64decode(source.split(",", 1)[1], validate=True)
        assert data[:8] == PNG
        with Image.open(io.BytesIO(data)) as image:
            image.verify()
    return page


def _train_run(folder: Path) -> Path:
    Trainer(load_config(None, RUN), run_dir=folder).fit()
    return folder


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _train_run(tmp_path_factory.mktemp("report") / "run")


def test_run_report_is_one_valid_page_with_the_runs_numbers(run_dir: Path) -> None:
    options = ReportOptions(
        projection="pca", worst=3, k=4, max_points=300, queries=(0, 7), smoothing=3
    )
    lines: list[str] = []
    path = write_report(run_dir, options=options, say=lines.append)
    assert path == run_dir / "report.html"
    page = _parse(path)
    text = " ".join(page.text)
    # Curves, the maps, the chosen and the worst queries' grids, the verification curves.
    assert len(page.images) == 5
    for name in (
        "training.png",
        "embeddings.png",
        "retrieval_chosen.png",
        "retrieval_worst.png",
        "verification.png",
    ):
        assert (run_dir / "plots" / name).read_bytes()[:8] == PNG
    assert "fnmr_at_fmr_0.01" in text and "Verification" in text
    results = json.loads((run_dir / "results.json").read_text())
    rows = {row[0]: row[1:] for row in page.cell_rows}
    for name, label in (("precision_at_1", "P@1"), ("mean_average_precision_at_r", "MAP@R")):
        before, after = results["before"][name], results["after"][name]
        assert rows[label] == [f"{before:.4f}", f"{after:.4f}"]
    assert rows["steps"] == [str(results["steps"])]
    validated = results["best_step"] is not None
    tested = "best validation checkpoint." if validated else "final model (no validation)."
    assert f"queries the others), with the {tested}" in text
    checkpoint = "best.pt" if (run_dir / "best.pt").is_file() else "last.pt"
    assert f"Embeddings of the {checkpoint} model." in text
    assert any("embedding" in line for line in lines)
    assert "loss:" in text  # the folded config

    # The query tables, against lists ranked afresh from the checkpoint's test embeddings.
    config, model = load_trained_model(run_dir / checkpoint)
    embeddings, labels = embed_dataset(model, split_dataset(config, "test"))
    lists = retrieval_lists(embeddings, labels, k=4)
    chosen, worst = [table for table in page.tables if table[0][0] == "query"]
    expected_worst = worst_queries(lists, 3).tolist()
    for table, queries in ((chosen, [0, 7]), (worst, expected_worst)):
        assert [row[0] for row in table[1:]] == [str(q) for q in queries]
        for row, query in zip(table[1:], queries, strict=True):
            assert row[1:] == [
                str(int(labels[query])),
                f"{lists.average_precision[query]:.4f}",
                str(int(lists.correct[query].sum())),
            ]


def test_report_without_embeddings_needs_no_model(run_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "copy"
    shutil.copytree(run_dir, folder, ignore=shutil.ignore_patterns("*.pt", "plots", "*.html"))
    page = _parse(write_report(folder, options=ReportOptions(embeddings=False)))
    assert len(page.images) == 1  # the curves only
    page = _parse(write_report(folder, options=FAST_OPTIONS))
    assert "no model" in " ".join(page.text)
    with pytest.raises(FileNotFoundError, match=r"no checkpoint .*nope\.pt"):
        write_report(run_dir, run_dir / "x.html", ReportOptions(checkpoint="nope.pt"))


def test_report_of_a_run_cut_off_before_its_first_log_row(run_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "cut"
    shutil.copytree(run_dir, folder, ignore=shutil.ignore_patterns("*.html", "plots"))
    (folder / "train.csv").write_text("step,epoch,loss,lr,images_per_second\n")
    (folder / "results.json").unlink()
    page = _parse(write_report(folder, options=FAST_OPTIONS))
    text = " ".join(page.text)
    assert "No training curves" in text and "has not finished" in text
    assert len(page.images) == 3  # the maps, the worst queries, verification; no curves
    (folder / "train.csv").unlink()
    assert report_kind(folder) == "run"  # config.yaml and its checkpoints


def test_report_with_worst_zero_and_a_page_elsewhere(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "pages" / "mine.html"
    options = ReportOptions(projection="pca", worst=0, queries=(2,), k=3)
    page = _parse(write_report(run_dir, out, options))
    assert len(page.images) == 4  # curves, maps, the chosen query, verification
    assert sorted(p.name for p in (tmp_path / "pages" / "mine_plots").iterdir()) == [
        "embeddings.png",
        "retrieval_chosen.png",
        "training.png",
        "verification.png",
    ]
    assert out.stat().st_mode & 0o777 == 0o644


def test_report_refuses_what_is_not_a_run(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        report_kind(tmp_path / "missing")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="is not a training run"):
        report_kind(tmp_path)
    (tmp_path / "results.json").write_text("{oops")
    (tmp_path / "sweep.json").unlink(missing_ok=True)
    with pytest.raises(ValueError, match="not valid JSON"):
        report_kind(tmp_path)


def test_report_options_are_checked(run_dir: Path) -> None:
    for options, message in (
        ({"worst": -1}, r"worst must be in \[0, 50\]"),
        ({"k": 21}, r"k must be in \[1, 20\]"),
        ({"queries": tuple(range(51))}, "at most 50 queries"),
        ({"smoothing": 0}, "smoothing must be at least 1"),
        ({"max_points": 2}, "max_points must be at least 3"),
    ):
        with pytest.raises(ValueError, match=message):
            ReportOptions(**options)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"query indices \[100000\] are outside"):
        options = ReportOptions(projection="pca", queries=(100000,))
        write_report(run_dir, run_dir / "bad.html", options)
    tiny = run_dir.parent / "tiny-test-set"
    with pytest.raises(ValueError, match="k=20 neighbours, but the test set has only 5 items"):
        from dmlkit.viz.report import _retrieval_section

        _retrieval_section(
            object(),  # type: ignore[arg-type]
            np.eye(5, dtype=np.float32),
            np.arange(5),
            tiny,
            ReportOptions(k=20),
            lambda _line: None,
        )


def test_cli_report_and_its_errors(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "page.html"
    args = ["report", str(run_dir), "--out", str(out), "--projection", "pca", "--worst", "2"]
    assert main([*args, "--query", "3", "--max-points", "200"]) == 0
    assert f"Report: {out}" in capsys.readouterr().out
    assert len(_parse(out).images) == 5
    for bad in (
        ["report", str(tmp_path / "nowhere")],
        ["report", str(run_dir), "--out", str(tmp_path)],  # a folder
        ["report", str(run_dir), "--out", str(out / "inside-a-file.html")],
        ["report", str(run_dir), "--checkpoint", "nope.pt"],
    ):
        assert main(bad) == 2
        error = capsys.readouterr().err
        assert error.startswith("dmlkit report: error:") and error.count("\n") == 1, error
    assert not (tmp_path.parent / f"{tmp_path.name}_plots").exists()
    # A checkpoint path as given (not only a file name in the run folder).
    given = str(run_dir / "last.pt")
    args = ["report", str(run_dir), "--out", str(out), "--checkpoint", given, "--worst", "1"]
    assert main([*args, "--projection", "pca", "--device", "cpu"]) == 0
    assert "Embeddings of the last.pt model." in " ".join(_parse(out).text)


def test_render_html_escapes_text(tmp_path: Path) -> None:
    from dmlkit.viz.report import Section, Table

    page = render_html(
        "<script>x</script>",
        [Section("a & b", paragraphs=["1 < 2"], tables=[Table(["<h>"], [["<td>"]])])],
    )
    path = tmp_path / "page.html"
    path.write_text(page)
    parsed = _parse(path)
    assert "script" not in parsed.tags
    assert "<script>x</script>" in " ".join(parsed.text)


def test_bench_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sets = [arg for override in BENCH for arg in ("--set", override)]
    assert main(["bench", "digits", "--out", str(tmp_path), "--trials", "1", *sets]) == 0
    capsys.readouterr()
    page = _parse(write_report(tmp_path, options=FAST_OPTIONS))
    text = " ".join(page.text)
    results = json.loads((tmp_path / "results.json").read_text())
    methods = results["methods"]
    for method in methods:
        summary = method["summary"]["concatenated"]["mean_average_precision_at_r"]
        assert f"{summary['mean']:.4f} ± {summary['half_width']:.4f}" in text
        assert method["method"] in text
    # Per method: search history, curves, embedding map, worst queries.
    assert len(page.images) == 4 * len(methods)


def test_sweep_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    overrides = [*DIGITS_RUN, "train.max_steps=4", "logging.progress=false", "logging.log_every=1"]
    sets = [arg for override in overrides for arg in ("--set", override)]
    args = ["sweep", "--param", "loss.options.base", "--values", "0.4,0.6", "--out", str(tmp_path)]
    assert main([*args, *sets]) == 0
    capsys.readouterr()
    page = _parse(write_report(tmp_path, options=FAST_OPTIONS))
    (table,) = [t for t in page.tables if t[0][0] == "loss.options.base"]
    assert [row[0] for row in table[1:]] == ["0.4", "0.6"]
    column = table[0].index("MAP@R")
    for row, value in zip(table[1:], ("0.4", "0.6"), strict=True):
        run = tmp_path / f"loss.options.base={value}" / "seed-0" / "results.json"
        after = json.loads(run.read_text())["after"]
        assert row[column] == f"{after['mean_average_precision_at_r']:.4f}"
    assert len(page.images) == 1
    assert (tmp_path / "plots" / "sweep.png").read_bytes()[:8] == PNG


# ------------------------------------------------------------------------------ in a browser


def _coloured_fraction(pixels: np.ndarray) -> float:
    """Fraction of pixels with a clear colour: plot lines, points and frames, not text."""
    sample = pixels[::4, ::4].reshape(-1, 3) / 255.0
    saturation = np.array([colorsys.rgb_to_hsv(*rgb)[1] for rgb in sample])
    return float(np.mean(saturation > 0.35))


@pytest.mark.skipif(
    CHROMIUM is None, reason=f"{NO_CHROMIUM}; the report's browser rendering is not checked here"
)
def test_report_renders_in_headless_chromium(run_dir: Path, tmp_path: Path) -> None:
    path = write_report(run_dir, tmp_path / "report.html", FAST_OPTIONS)
    pixels = screenshot(path.as_uri(), tmp_path / "shot.png", tmp_path / "profile")
    assert pixels.shape[1] == 1280 and pixels.shape[0] >= 1000
    # The same page with its images removed: only text and tables remain.
    bare = tmp_path / "bare.html"
    bare.write_text(re.sub(r"<img [^>]*>", "", path.read_text()))
    text_only = screenshot(bare.as_uri(), tmp_path / "bare.png", tmp_path / "profile-bare")
    assert (pixels < 250).any(axis=2).mean() > 0.02, "the page rendered blank"
    assert _coloured_fraction(text_only) < 0.002
    assert _coloured_fraction(pixels) > 0.004, "the embedded plots did not render"


@pytest.mark.umap
def test_report_maps_with_umap_by_default(
    run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dmlkit.viz import embedding_map

    used: list[str] = []
    project = embedding_map.project_2d

    def recorded(*args: Any, **kwargs: Any) -> tuple[np.ndarray, str]:
        coordinates, method = project(*args, **kwargs)
        used.append(method)
        return coordinates, method

    monkeypatch.setattr(embedding_map, "project_2d", recorded)
    out = tmp_path / "page.html"
    assert main(["report", str(run_dir), "--out", str(out), "--worst", "1"]) == 0
    assert used == ["UMAP", "UMAP"]  # the training and the held-out classes
    assert len(_parse(out).images) == 4
