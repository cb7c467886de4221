"""The documentation site: it builds with ``mkdocs build --strict``, works offline (every script,
stylesheet and font from the site itself), and renders in headless Chromium with its navigation
and its formulas (KaTeX)."""

from __future__ import annotations

import html.parser
import http.server
import subprocess
import sys
import threading
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from browser import CHROMIUM, NO_CHROMIUM, rendered_dom, screenshot

ROOT = Path(__file__).resolve().parents[1]
# A page of the API reference whose docstrings hold formulas (LpDistance's).
MATH_PAGE = "api/distances-reducers-regularizers/"


def _nav_titles(section: str) -> list[str]:
    """The page titles of one top-level section of mkdocs.yml's nav."""
    nav = yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"]
    (entries,) = [item[section] for item in nav if isinstance(item, dict) and section in item]
    return [title for entry in entries if isinstance(entry, dict) for title in entry]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("site")
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, f"mkdocs build --strict failed:\n{done.stderr[-8000:]}"
    return out


class _Requests(http.server.SimpleHTTPRequestHandler):
    """Serves the site and records every request's path and status, instead of logging them."""

    log: list[tuple[str, int]]

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        self.log.append((self.path, int(code)))

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def served(site: Path) -> Iterator[tuple[str, list[tuple[str, int]]]]:
    """The site on localhost: its base URL and the list of the requests it answered."""
    log: list[tuple[str, int]] = []
    handler = type("Handler", (_Requests,), {"log": log})
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), partial(handler, directory=str(site))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/", log
    finally:
        server.shutdown()
        server.server_close()


class _Sources(html.parser.HTMLParser):
    """The URLs a page loads: script sources, stylesheets and icons."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        named = dict(attrs)
        if tag == "script" and named.get("src"):
            self.urls.append(str(named["src"]))
        if tag == "link" and named.get("href") and named.get("rel") in ("stylesheet", "icon"):
            self.urls.append(str(named["href"]))


class _NavText(html.parser.HTMLParser):
    """The texts inside a page's ``<nav>`` elements (Material's tabs, sidebars and table of
    contents), stripped."""

    def __init__(self) -> None:
        super().__init__()
        self.depth = 0
        self.texts: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.depth += tag == "nav"

    def handle_endtag(self, tag: str) -> None:
        self.depth -= tag == "nav"

    def handle_data(self, data: str) -> None:
        if self.depth and data.strip():
            self.texts.add(data.strip())


def test_site_builds_and_needs_no_network(site: Path) -> None:
    for page in ("index.html", f"{MATH_PAGE}index.html", "guides/losses-and-miners/index.html"):
        assert (site / page).is_file(), page
    for page in (site / "index.html", site / MATH_PAGE / "index.html"):
        sources = _Sources()
        sources.feed(page.read_text())
        assert any("katex" in url for url in sources.urls)
        external = [url for url in sources.urls if url.startswith(("http:", "https:", "//"))]
        assert not external, f"{page.relative_to(site)} loads {external}"
    css = (site / "assets" / "katex" / "katex.min.css").read_text()
    assert "fonts/KaTeX_Main-Regular.woff2" in css
    assert (site / "assets" / "katex" / "fonts" / "KaTeX_Main-Regular.woff2").is_file()


@pytest.mark.skipif(CHROMIUM is None, reason=f"{NO_CHROMIUM}; the site is not rendered here")
def test_start_page_and_api_page_render_with_navigation_and_formulas(
    served: tuple[str, list[tuple[str, int]]], tmp_path: Path
) -> None:
    base, log = served
    for name, url in (("start", base), ("api", base + MATH_PAGE)):
        pixels = screenshot(url, tmp_path / f"{name}.png", tmp_path / f"{name}-profile", 1600)
        assert pixels.shape == (1600, 1280, 3)
        # Text, the header bar and the navigation: far from a blank page.
        assert (pixels < 200).any(axis=2).mean() > 0.03, f"the {name} page rendered blank"
        assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50, f"the {name} page is flat"

    start = rendered_dom(base, tmp_path / "start-dom")
    assert 'class="md-tabs' in start and 'class="md-nav md-nav--primary' in start
    nav = _NavText()
    nav.feed(start)
    expected = ["Getting started", "Guides", "API reference", *_nav_titles("Guides")]
    assert not set(expected) - nav.texts, (
        f"missing from the navigation: {set(expected) - nav.texts}"
    )

    api = rendered_dom(base + MATH_PAGE, tmp_path / "api-dom")
    assert 'id="dmlkit.distances.LpDistance"' in api
    assert api.count('class="katex"') >= 2, "the docstring's formulas were not rendered"
    assert "katex-error" not in api
    assert 'class="arithmatex">\\(' not in api, "a formula was left as TeX"

    # Everything the browser asked for (scripts, styles, KaTeX's fonts) came from the site.
    assert any(path.endswith(".woff2") for path, _ in log), "KaTeX's fonts were not loaded"
    failed = [(path, status) for path, status in log if status >= 400]
    assert not failed, f"requests the site could not answer: {failed}"
