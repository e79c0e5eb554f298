"""Every committed notebook follows the project's skeleton and carries no outputs."""

from __future__ import annotations

import json

import pytest

from drasclr_lib.runner import REPO_NOTEBOOKS, list_notebooks

NOTEBOOKS = list_notebooks(REPO_NOTEBOOKS)


def _code(nb):
    return [c for c in nb["cells"] if c["cell_type"] == "code"]


def _src(cell):
    return "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_skeleton(path):
    nb = json.loads(path.read_text())
    assert nb.get("metadata", {}).get("kernelspec", {}).get("name") == "python3", f"{path.name}: kernelspec must be python3"
    cells = nb["cells"]
    assert cells[0]["cell_type"] == "markdown" and _src(cells[0]).lstrip().startswith("# "), f"{path.name}: first cell must be a '# Title' markdown cell"
    code = _code(nb)
    setup = _src(code[0])
    installs = "pip install" in setup or ('"pip"' in setup and '"install"' in setup)
    assert "import drasclr_lib" in setup and "except ImportError" in setup and installs, \
        f"{path.name}: first code cell must install the package when `import drasclr_lib` fails"
    tagged = [c for c in code if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1, f"{path.name}: exactly one code cell must be tagged 'parameters'"
    # flat scalars only: every non-comment line of the parameters cell is NAME = literal
    import ast

    tree = ast.parse(_src(tagged[0]))
    for node in tree.body:
        assert isinstance(node, ast.Assign), f"{path.name}: parameters cell holds only assignments"
        value = ast.literal_eval(node.value)
        assert isinstance(value, (int, float, bool, str)), f"{path.name}: parameter {ast.unparse(node.targets[0])} is not a flat scalar"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_has_no_outputs(path):
    nb = json.loads(path.read_text())
    for i, cell in enumerate(_code(nb)):
        assert not cell.get("outputs"), f"{path.name}: code cell {i} carries outputs; strip them before committing"
        assert cell.get("execution_count") is None, f"{path.name}: code cell {i} has an execution count"
