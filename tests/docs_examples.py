"""The documentation examples: parsing a Markdown page's code blocks and markers, and running
them (this file is the driver that tests/test_docs_examples.py starts in a subprocess per page).

The convention, per page:

- ```` ```python ```` blocks run in order in one namespace, in a fresh temporary working
  directory, with ``$DMLKIT_DATA`` passed on;
- ```` ```bash ```` blocks run with ``bash -euo pipefail`` in that same directory (the virtual
  environment's ``bin`` first on ``PATH``), after the page's earlier blocks;
- a ```` ```yaml ```` block preceded by the line ``<!-- docs-example: file NAME -->`` is written to
  NAME in that directory before later blocks run; any other yaml block must parse;
- any block preceded by ``<!-- docs-example: skip REASON -->`` is not run; the skipped blocks are
  listed as a warning in the test output;
- a page whose examples need real data says so with ``<!-- docs-example: needs-data PATH -->``
  (PATH under ``$DMLKIT_DATA``) and skips, naming the path, when it is absent;
- other blocks (```` ```text ````, ```` ```console ````, no language, ...) are not run.

A page runs in a subprocess of its own, so examples share no state across pages and a hung
example is stopped by the page's timeout.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

RUN = ("python", "bash")
MARKER = re.compile(r"^\s*<!--\s*docs-example:\s*(?P<kind>\S+)\s*(?P<value>.*?)\s*-->\s*$")
FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`\s]*)")


@dataclass(frozen=True)
class Block:
    """One fenced code block of a page.

    Attributes:
        language: The first word of the fence's info string, lower case ("" when none).
        code: The block's text, without the page's indentation of the fence.
        line: The page's line number (1-based) of the opening fence.
        skip: The reason given by a skip marker, or None.
        file: The file name given by a file marker, or None.
    """

    language: str
    code: str
    line: int
    skip: str | None = None
    file: str | None = None

    @property
    def runs(self) -> bool:
        """Whether the block is executed: python, bash, and every yaml block (written or
        parsed), unless skipped."""
        return self.skip is None and self.language in (*RUN, "yaml")


@dataclass(frozen=True)
class Page:
    """A page's code blocks and the real data its examples need (paths under $DMLKIT_DATA)."""

    blocks: list[Block]
    needs_data: list[str]


def parse_examples(text: str, name: str = "<page>") -> Page:
    """Parse a Markdown page's fenced code blocks and docs-example markers.

    Raises:
        ValueError: A marker of an unknown kind, without its value, not directly followed by a
            code block (blank lines aside), a file marker on a non-yaml block or with a path
            outside the working directory, or an unclosed fence; each names the page and line.
    """
    lines = text.splitlines()
    blocks: list[Block] = []
    needs_data: list[str] = []
    pending: tuple[str, str, int] | None = None
    i = 0
    while i < len(lines):
        line = lines[i]
        marker = MARKER.match(line)
        fence = FENCE.match(line)
        if marker:
            kind, value = marker["kind"], marker["value"]
            if kind not in ("skip", "file", "needs-data"):
                raise ValueError(f"{name}:{i + 1}: unknown docs-example marker {kind!r}")
            if not value:
                raise ValueError(f"{name}:{i + 1}: docs-example {kind} marker without a value")
            if kind == "needs-data":
                needs_data.append(value)
            else:
                if pending is not None:
                    raise ValueError(f"{name}:{pending[2]}: marker not followed by a code block")
                pending = (kind, value, i + 1)
        elif fence:
            indent, ticks = fence["indent"], fence["fence"]
            start = i
            body: list[str] = []
            i += 1
            while i < len(lines) and not re.match(
                rf"^\s*{re.escape(ticks[0])}{{{len(ticks)},}}\s*$", lines[i]
            ):
                body.append(lines[i].removeprefix(indent))
                i += 1
            if i == len(lines):
                raise ValueError(f"{name}:{start + 1}: code block never closed")
            language = fence["info"].lower().lstrip(".{").rstrip("}")
            skip = file = None
            if pending is not None:
                kind, value, _ = pending
                if kind == "skip":
                    skip = value
                else:
                    if language != "yaml":
                        raise ValueError(f"{name}:{start + 1}: a file marker needs a yaml block")
                    if Path(value).is_absolute() or ".." in Path(value).parts:
                        raise ValueError(f"{name}:{start + 1}: file {value!r} is outside the page")
                    file = value
                pending = None
            code = "\n".join(body) + "\n" if body else ""
            blocks.append(Block(language, code, start + 1, skip, file))
        elif line.strip() and pending is not None:
            raise ValueError(f"{name}:{pending[2]}: marker not followed by a code block")
        i += 1
    if pending is not None:
        raise ValueError(f"{name}:{pending[2]}: marker not followed by a code block")
    return Page(blocks, needs_data)


def run_page(name: str, blocks: list[Block]) -> None:
    """Run a page's blocks in order in the current working directory (the driver's work)."""

    namespace: dict[str, object] = {"__name__": "__main__"}
    for block in blocks:
        where = f"{name}:{block.line}"
        print(f"--- {where} ({block.language})", flush=True)
        if block.file is not None:
            target = Path(block.file)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(block.code)
        elif block.language == "yaml":
            yaml.safe_load(block.code)
        elif block.language == "python":
            # Blank lines in front, so a traceback's line numbers are the page's.
            exec(compile("\n" * block.line + block.code, name, "exec"), namespace)
        else:
            done = subprocess.run(["bash", "-euo", "pipefail", "-c", block.code], check=False)
            if done.returncode:
                sys.exit(f"{where}: the bash block exited with status {done.returncode}")


if __name__ == "__main__":
    spec = json.loads(Path(sys.argv[1]).read_text())
    run_page(spec["name"], [Block(**block) for block in spec["blocks"]])
