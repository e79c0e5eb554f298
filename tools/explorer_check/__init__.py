"""Check the patch explorer of notebook 03 in a live JupyterLab session, driven by a real browser.

papermill (the notebook tests) runs notebook 03 with ``INTERACTIVE = False``: it never renders the
ipywidgets panel. This check does what a user does: it starts ``jupyter lab``, opens a copy of
``notebooks/03_embeddings.ipynb`` in headless Chromium, runs all cells, waits for the explorer
panel to render, then drags the sliders, picks patches and subjects, toggles the heatmap, and
checks after each step that

- the figure shown in the panel changed (hash of the ``<img>`` the output widget shows) and is not
  blank (pixel spread of the decoded image), exactly one figure is shown;
- the controls moved as expected (picking a patch jumps to its slice, the readouts);
- the kernel saw the same values the browser shows (a probe cell appended to the copy prints the
  widgets' kernel-side state; it is re-run after the interactions);
- no error appears anywhere: no error output in any cell, no "Traceback" / error message on the
  kernel websocket (callback errors of widgets land there and in JupyterLab's log console, not in
  the notebook), none in the Jupyter server / kernel log, no uncaught page errors in the browser.

Requirements (none of them is a dependency of drasclr_lib):

- Chromium: ``apt-get install -y chromium`` (Debian; ``/usr/bin/chromium``).
- Playwright for Python in a separate environment, driving that Chromium (its own browser
  download is not needed): ``python3 -m venv /tmp/jlvenv && /tmp/jlvenv/bin/pip install playwright``.
- The repo's environment with JupyterLab and ipywidgets (``.venv``; ``--python`` to change it).
- An output folder holding the outputs of notebooks 00-02, e.g.
  ``.venv/bin/python -m drasclr_lib.runner --out /tmp/jl_out --only 00 01 02`` (as committed).

Usage (the documented entry point is ``tools/check_explorer_jupyterlab.py``; from the repository root
``python -m tools.explorer_check`` does the same)::

    /tmp/jlvenv/bin/python tools/check_explorer_jupyterlab.py --out /tmp/jl_out \\
        --artifacts /tmp/jl_check

The committed notebook is never touched: the copy lives in a temporary folder, with its committed
parameters (the ``laptop`` profile, what CI runs) and ``INTERACTIVE = True`` (its committed
``"auto"`` would also give widgets in a browser; the check states it). Notebook 03 itself writes its usual outputs (embeddings,
figures, metrics) into ``OUT/03_embeddings``. The artifacts folder receives ``before.png`` /
``after.png`` (the explorer panel), ``*_full.png`` (the whole page), ``executed.ipynb``,
``jupyter.log`` and ``report.json``; with ``--docs-img docs/img`` the whole-page screenshots are
also written, downscaled, to ``docs/img/explorer_jupyterlab_{before,after}.png``. Run as root, the
server gets ``--allow-root``.

``--inject-error`` appends a cell that registers a failing widget callback; the check must then
fail (exit 1). It shows that the checker sees errors that only reach the front end.

Exit status: 0 when every check passed, 1 when a check failed (the message says which), 2 for a
setup problem (missing inputs, Chromium, Playwright, JupyterLab not starting).

Modules: :mod:`.server` (inputs, the notebook copy, the JupyterLab server, docs images),
:mod:`.browser` (Playwright: the page, the panel's widgets, the front end's errors), :mod:`.checks`
(the interactions and what each must show), :mod:`.cli` (the command line, one run end to end).
Only the standard library and Playwright are imported: this runs in the Playwright environment.
"""

from __future__ import annotations

import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent
NOTEBOOK = REPO / "notebooks" / "03_embeddings.ipynb"


class CheckFailed(Exception):
    """A check of the explorer failed (exit 1)."""


class SetupError(Exception):
    """The check could not be set up (exit 2)."""


def log(msg: str) -> None:
    print(f"[check-explorer {time.strftime('%H:%M:%S')}] {msg}", flush=True)
