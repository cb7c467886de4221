"""Headless Chromium for the tests that check what a page looks like in a browser (the HTML
report, the documentation site). Those tests skip with :data:`NO_CHROMIUM` when it is absent."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
from PIL import Image

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
NO_CHROMIUM = "Debian's chromium is not installed (apt-get install chromium)"


def _chromium(profile: Path, *arguments: str) -> str:
    """Run headless Chromium with a throwaway profile; returns its standard output."""
    assert CHROMIUM is not None
    # No sandbox (the tests may run as root), and no background networking (a closed network
    # refuses Chromium's own connections, and the pages must not need any).
    command = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
        f"--user-data-dir={profile}",
        *arguments,
    ]
    return subprocess.run(command, check=True, capture_output=True, text=True, timeout=180).stdout


def screenshot(url: str, out: Path, profile: Path, height: int = 5000) -> np.ndarray:
    """Render a page 1280 pixels wide and return the screenshot's RGB pixels."""
    _chromium(profile, f"--screenshot={out}", f"--window-size=1280,{height}", url)
    with Image.open(out) as image:
        return np.asarray(image.convert("RGB"))


def rendered_dom(url: str, profile: Path) -> str:
    """A page's DOM as HTML once its scripts have run (up to 10 s of virtual time)."""
    return _chromium(profile, "--virtual-time-budget=10000", "--dump-dom", url)
