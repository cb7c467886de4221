"""``python -m dmlkit``: the ``dmlkit`` command (what ``torchrun -m dmlkit`` starts)."""

import sys

from .cli import main

sys.exit(main())
