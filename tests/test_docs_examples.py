"""Every code example of README.md and docs/**/*.md runs (the convention is in docs_examples.py),
so the documentation cannot drift from the code: one test per page, plus the parser's and the
driver's own tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from dataclasses import asdict
from pathlib import Path

import pytest

import docs_examples
from docs_examples import Block, parse_examples
from real_data import REAL_DATA

ROOT = Path(__file__).resolve().parents[1]
PAGE_TIMEOUT_S = 600
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("**/*.md"))]


def _page_id(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def _drive(
    name: str, blocks: list[Block], work: Path, timeout: float
) -> subprocess.CompletedProcess:
    """Run blocks in a fresh interpreter in ``work``, the virtual environment first on PATH."""
    blocks_file = work.parent / f"{work.name}-blocks.json"
    blocks_file.write_text(json.dumps({"name": name, "blocks": [asdict(b) for b in blocks]}))
    env = {
        **os.environ,
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
        "MPLBACKEND": "Agg",
        "HF_HUB_OFFLINE": "1",
    }
    return subprocess.run(
        # -P: the examples must not import the test helpers beside the driver.
        [sys.executable, "-P", docs_examples.__file__, str(blocks_file)],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.mark.parametrize("path", PAGES, ids=[_page_id(p) for p in PAGES])
def test_page_examples_run(path: Path, tmp_path: Path) -> None:
    name = _page_id(path)
    page = parse_examples(path.read_text(), name)
    runs = [block for block in page.blocks if block.runs]
    if not runs:
        pytest.skip(f"{name}: no example to run")
    missing = [REAL_DATA / item for item in page.needs_data if not (REAL_DATA / item).exists()]
    if missing:
        pytest.skip(f"{name}: its examples need {', '.join(map(str, missing))}")
    work = tmp_path / "work"
    work.mkdir()
    try:
        done = _drive(name, runs, work, PAGE_TIMEOUT_S)
    except subprocess.TimeoutExpired as error:
        output = error.stdout.decode(errors="replace") if error.stdout else ""
        pytest.fail(f"{name}: examples still running after {PAGE_TIMEOUT_S} s\n{output[-4000:]}")
    assert done.returncode == 0, f"{name}: an example failed\n{(done.stdout + done.stderr)[-8000:]}"


def test_skipped_examples_are_listed() -> None:
    blocks = [
        (path, block)
        for path in PAGES
        for block in parse_examples(path.read_text(), _page_id(path)).blocks
    ]
    skipped = [
        f"{_page_id(path)}:{block.line} ({block.language or 'no language'}): {block.skip}"
        for path, block in blocks
        if block.skip is not None
    ]
    run = [block for _, block in blocks if block.runs]
    # Skips are for installs, GPUs and whole jobs: a few, never the bulk of the examples.
    assert len(skipped) * 4 <= len(run), "\n".join(skipped)
    if skipped:
        warnings.warn(
            "documentation examples not run:\n" + "\n".join(skipped), UserWarning, stacklevel=1
        )


SAMPLE = """\
# A page

```python
x = 1
```

<!-- docs-example: skip needs a GPU -->
```bash
nvidia-smi
```

- A list item with an indented example:

    ```python
    y = x + 1
    ```

<!-- docs-example: file conf/run.yaml -->

```yaml
loss: {name: ContrastiveLoss}
```

<!-- docs-example: needs-data omniglot -->

```text
P@1 0.68
```

~~~~bash
cat conf/run.yaml
~~~~
"""


def test_parser_reads_blocks_and_markers() -> None:
    page = parse_examples(SAMPLE)
    assert page.needs_data == ["omniglot"]
    assert [(b.language, b.line, b.skip, b.file) for b in page.blocks] == [
        ("python", 3, None, None),
        ("bash", 8, "needs a GPU", None),
        ("python", 14, None, None),
        ("yaml", 20, None, "conf/run.yaml"),
        ("text", 26, None, None),
        ("bash", 30, None, None),
    ]
    assert page.blocks[2].code == "y = x + 1\n"
    assert page.blocks[3].code == "loss: {name: ContrastiveLoss}\n"
    assert [b.runs for b in page.blocks] == [True, False, True, True, False, True]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("<!-- docs-example: skip -->\n```bash\nls\n```\n", "without a value"),
        ("<!-- docs-example: sikp typo -->\n```bash\nls\n```\n", "unknown docs-example"),
        ("<!-- docs-example: skip why -->\nText.\n```bash\nls\n```\n", "not followed"),
        ("<!-- docs-example: skip why -->\n", "not followed"),
        ("<!-- docs-example: file a.yaml -->\n```python\npass\n```\n", "needs a yaml"),
        ("<!-- docs-example: file ../a.yaml -->\n```yaml\na: 1\n```\n", "outside the page"),
        ("```python\npass\n", "never closed"),
    ],
)
def test_parser_refuses_bad_markers(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_examples(text, "page.md")


def test_driver_runs_blocks_in_order_and_names_the_failing_line(tmp_path: Path) -> None:
    page = parse_examples(SAMPLE + "\n```python\nassert y == 3, y\n```\n", "sample.md")
    work = tmp_path / "work"
    work.mkdir()
    done = _drive("sample.md", [b for b in page.blocks if b.runs], work, 120)
    assert done.returncode != 0
    # The bash block ran after the yaml block was written, in the same folder.
    assert "loss: {name: ContrastiveLoss}" in done.stdout
    assert f'File "sample.md", line {page.blocks[-1].line + 1}' in done.stderr
    assert "AssertionError: 2" in done.stderr
