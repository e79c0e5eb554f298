"""Write a notebook in the project's skeleton (for developers; not part of the package).

    from tools.nbtemplate import write_notebook
    write_notebook("notebooks/00_synthetic_cohort.ipynb",
                   title="# 00 · Synthetic cohort\n\nWhat this notebook does ...",
                   imports="import numpy as np\nfrom drasclr_lib.data import synthetic",
                   parameters='N_SUBJECTS = 16  # number of subjects\nSEED = 0  # cohort seed',
                   body=[("md", "## Generate"), ("code", "manifest = synthetic.make_cohort(...)")])

The result has: a markdown title cell, the setup cell (installs drasclr_lib when missing, from the
clone or ``REPO_URL``, for Colab; prints the output root), one imports cell, one cell tagged
``parameters``, then the body; no outputs, python3 kernelspec. Add the imports cell's
``print_config()``, the ``OUTPUT_ROOT`` / ``PROFILE`` parameters and the closing "What this run
found" cell that the format test asks for.
"""

from __future__ import annotations

from pathlib import Path

import nbformat

# The first code cell of every notebook (tests/notebooks/test_notebook_format.py checks that each has
# exactly this). REPO_URL stays empty: the project names no address of its own; users fill in the
# address of the repository they cloned (README, "Colab").
SETUP = '''# Setup. On Colab: first Runtime -> Change runtime type -> GPU, then run this cell. It installs
# drasclr_lib when it is missing: from the clone this notebook sits in (pip install -e), else from
# REPO_URL, the address of the repository you cloned this project from, such as
# "https://github.com/<owner>/<repo>" (README, "Colab"). No address is filled in for you.
REPO_URL = ""
try:
    import drasclr_lib
except ImportError:
    import importlib, subprocess, sys
    from pathlib import Path
    clone = next((p for p in (Path.cwd(), *Path.cwd().parents)
                  if (p / "pyproject.toml").is_file() and (p / "drasclr_lib").is_dir()), None)
    if clone is None and not REPO_URL:
        raise RuntimeError("drasclr_lib is not installed and this notebook is not inside a clone of the project: "
                           "set REPO_URL above to the address of the repository you cloned (README, 'Colab')")
    subprocess.check_call([sys.executable, "-m", "pip", "install", "-q",
                           *(["-e", str(clone)] if clone else [f"git+{REPO_URL}"])])
    if clone:
        sys.path.insert(0, str(clone))  # an editable install is seen by new kernels only
    importlib.invalidate_caches()
    import drasclr_lib
from drasclr_lib.utils import output_root

print("drasclr_lib", drasclr_lib.__version__, "from", drasclr_lib.__file__)
print("outputs:", output_root(), "($DRASCLR_OUT, else the clone's outputs/; the OUTPUT_ROOT parameter changes it)")'''


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
