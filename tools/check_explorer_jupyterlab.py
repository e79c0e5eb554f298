"""Check the patch explorer of notebook 03 in a live JupyterLab session, driven by a real browser.

The documented entry point (README, docs/embeddings.md); the check itself is the package
``tools/explorer_check`` (its docstring: what is checked, requirements, artifacts, exit status)::

    /tmp/jlvenv/bin/python tools/check_explorer_jupyterlab.py --out /tmp/jl_out --artifacts /tmp/jl_check

Only the standard library and Playwright are needed here: it runs in the Playwright environment,
where drasclr_lib need not be importable.
"""

from __future__ import annotations

import sys

if __package__:  # python -m tools.check_explorer_jupyterlab
    from .explorer_check.cli import main
else:  # python tools/check_explorer_jupyterlab.py: tools/ is sys.path[0]
    from explorer_check.cli import main

if __name__ == "__main__":
    sys.exit(main())
