"""Where the tests find the real data: ``$DMLKIT_DATA``, else ``../shared/data`` beside the
repository (the development machines' layout). Tests that need it skip, naming it, when absent."""

from __future__ import annotations

import os
from pathlib import Path

REAL_DATA = Path(
    os.environ.get("DMLKIT_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data")
)
