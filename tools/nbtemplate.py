"""Write a notebook in the project's skeleton (for developers; not part of the package).

    from tools.nbtemplate import write_notebook
    write_notebook("notebooks/00_synthetic_cohort.ipynb",
                   title="# 00 · Synthetic cohort\n\nWhat this notebook does ...",
                   imports="import numpy as np\nfrom drasclr_lib.data import synthetic",
                   parameters='N_SUBJECTS = 24  # CI: 8\nSEED = 0',
                   body=[("md", "## Generate"), ("code", "manifest = synthetic.make_cohort(...)")])

The result has: a markdown title cell, the setup cell (installs drasclr_lib when missing, for
Colab), one imports cell, one cell tagged ``parameters``, then the body; no outputs, python3
kernelspec.
"""

from __future__ import annotations

from pathlib import Path

import nbformat

REPO_URL = "https://github.com/drasclr/drasclr-toolkit"

SETUP = f'''# Setup: install drasclr_lib when it is missing (Colab or a fresh kernel); a no-op otherwise.
try:
    import drasclr_lib
except ImportError:
    import subprocess, sys
    from pathlib import Path
    local = Path.cwd().parent / "pyproject.toml"  # running from a clone's notebooks/ folder
    target = ["-e", str(local.parent)] if local.exists() else ["git+{REPO_URL}"]
    subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", *target])
    import drasclr_lib
print("drasclr_lib", drasclr_lib.__version__)'''


def write_notebook(path, title: str, imports: str, parameters: str, body: list[tuple[str, str]]) -> Path:
    """Build and write the notebook; ``body`` is a list of ("md" | "code", source)."""
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    cells = [nbformat.v4.new_markdown_cell(title), nbformat.v4.new_code_cell(SETUP), nbformat.v4.new_code_cell(imports)]
    params = nbformat.v4.new_code_cell(parameters)
    params.metadata["tags"] = ["parameters"]
    cells.append(params)
    for kind, src in body:
        cells.append(nbformat.v4.new_markdown_cell(src) if kind == "md" else nbformat.v4.new_code_cell(src))
    for c in cells:
        c.pop("id", None)
    nb.cells = cells
    nbformat.validate(nb)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, str(path))
    return path
