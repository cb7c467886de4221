"""Where the tests find the real data: ``$DMLKIT_DATA`` (``make`` sets it to ``../shared/data``).
Tests that need it skip, naming the path they looked at, when it is absent or unset."""

from __future__ import annotations

import os
from pathlib import Path

REAL_DATA = Path(os.environ.get("DMLKIT_DATA", "$DMLKIT_DATA-is-not-set"))
