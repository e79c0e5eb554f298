"""``python -m tools.explorer_check`` (from the repository root): the same as ``tools/check_explorer_jupyterlab.py``."""

from __future__ import annotations

import sys

from .cli import main

sys.exit(main())
