"""Every committed notebook follows the project's skeleton, carries no outputs, runs on its own committed
parameters (the laptop profile) and says what it found."""

from __future__ import annotations

import json
import re

import pytest

from drasclr_lib.notebook_setup import load_profile, notebook_parameters
from drasclr_lib.runner import REPO_NOTEBOOKS, list_notebooks
from tools.nbtemplate import SETUP

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


# -- what a user runs: committed parameters, profiles, comments papermill can read ---------------

def _parameters_cell(nb):
    return next(_src(c) for c in _code(nb) if "parameters" in c.get("metadata", {}).get("tags", []))


def _comments(nb) -> dict[str, str]:
    """``{NAME: comment}`` of the parameters cell."""
    out = {}
    for line in _parameters_cell(nb).splitlines():
        if "=" in line and not line.lstrip().startswith("#"):
            name = line.split("=", 1)[0].strip()
            out[name] = line.split("#", 1)[1] if "#" in line.split("=", 1)[1] else ""
    return out


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_papermill_reads_every_parameter(path):
    """papermill parses each parameter line (a comment holding "=" or ">=" makes it warn "Unable to
    parse line" and drop the parameter from `papermill --help-notebook`)."""
    from papermill.translators import PythonTranslator

    nb = json.loads(path.read_text(encoding="utf-8"))
    cell = next(c for c in _code(nb) if "parameters" in c.get("metadata", {}).get("tags", []))
    import nbformat

    parsed = [p.name for p in PythonTranslator.inspect(nbformat.v4.new_code_cell(_src(cell)))]
    assert parsed == list(notebook_parameters(path)), f"{path.name}: papermill cannot parse {set(notebook_parameters(path)) - set(parsed)}"


def _shown(value) -> str:
    return json.dumps(value) if isinstance(value, str) else str(value)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_parameters_are_the_laptop_profile_and_comments_say_the_paper_values(path):
    nb = json.loads(path.read_text(encoding="utf-8"))
    values, comments = notebook_parameters(path), _comments(nb)
    laptop, paper = load_profile("laptop").get(path.stem, {}), load_profile("paper").get(path.stem, {})
    assert laptop, f"{path.name}: no laptop entry in notebook_params.json"
    for name, value in laptop.items():
        assert values.get(name) == value, f"{path.name}: {name} = {values.get(name)!r} committed, laptop profile {value!r}"
    if paper:
        assert values.get("PROFILE") == "laptop", f"{path.name}: PROFILE = 'laptop' must be the committed default"
    for name, value in paper.items():
        assert name in values, f"{path.name}: the paper profile sets {name}, which the notebook lacks"
        assert f"paper: {_shown(value)}" in comments[name], f"{path.name}: {name}'s comment must say 'paper: {_shown(value)}'"
    for name, comment in comments.items():  # no second set of values that CI or a profile would use instead
        assert "CI:" not in comment and "CI " not in comment, f"{path.name}: {name}'s comment names CI values: {comment}"
        for shown in re.findall(r"paper: (\S+)", comment):
            assert name in paper and shown.rstrip(",;)") == _shown(paper[name]), \
                f"{path.name}: {name}'s comment says paper: {shown}, the paper profile has {paper.get(name)!r}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_text_for_users(path):
    text = path.read_text(encoding="utf-8")
    nb = json.loads(text)
    assert "SPEC" not in text, f"{path.name} cites SPEC, a document users do not have"
    assert "progress=False" not in text, f"{path.name}: a long call runs without a progress bar"
    assert "github.com/drasclr" not in text, f"{path.name}: an install address nothing confirms"
    setup = _src(_code(nb)[0])
    assert setup.strip() == SETUP.strip(), f"{path.name}: the setup cell differs from tools/nbtemplate.py's SETUP"
    assert 'REPO_URL = ""' in setup and "Runtime -> Change runtime type -> GPU" in setup, path.name
    assert "output_root()" in setup, f"{path.name}: the first cell prints the output root"
    assert any("print_config()" in _src(c) for c in _code(nb)[:3]), f"{path.name}: no print_config() cell"
    values = notebook_parameters(path)
    assert values.get("OUTPUT_ROOT") == "", f"{path.name}: OUTPUT_ROOT parameter (empty by default)"
    reads_cohort = any(k in values for k in ("STORE", "DATA_MANIFEST"))
    if reads_cohort:
        assert "DATA_MANIFEST" in values, f"{path.name} reads a cohort but has no DATA_MANIFEST parameter"
    # it ends with what it found: a heading, then a cell computing sentences from this run's metrics
    last_md, last = nb["cells"][-2], nb["cells"][-1]
    assert last_md["cell_type"] == "markdown" and "## What this run found" in _src(last_md), path.name
    body = _src(last)
    assert last["cell_type"] == "code" and "print(" in body and re.search(r"\bm(etrics)?\[|rows\[", body), path.name
    assert "Next:" in body, f"{path.name}: the closing cell says what to try next"
