"""Run the notebooks with papermill, in order, sharing one output folder for the session.

A test asks for ``run_notebook("02_pretraining")``; the notebooks before it run first (once per
session), as they hand their results on through files. Each runs **as committed** (no parameter
overrides), with the working directory set to ``notebooks/`` as JupyterLab does.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from drasclr_lib.runner import REPO_NOTEBOOKS, execute_notebook, list_notebooks


@pytest.fixture(scope="session")
def notebook_out(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("drasclr_out")


@pytest.fixture(scope="session")
def run_notebook(notebook_out):
    done: dict[str, Path] = {}
    failed: dict[str, str] = {}

    def run(stem: str) -> Path:
        order = [p.stem for p in list_notebooks(REPO_NOTEBOOKS)]
        if stem not in order:
            raise FileNotFoundError(f"notebook {stem}.ipynb not found in {REPO_NOTEBOOKS}")
        for prev in order[: order.index(stem) + 1]:
            if prev in failed:
                pytest.fail(f"{stem} needs {prev}, which failed: {failed[prev]}")
            if prev not in done:
                try:
                    done[prev] = execute_notebook(REPO_NOTEBOOKS / f"{prev}.ipynb", notebook_out, None,
                                                  cell_timeout=900, progress=False)
                except Exception as exc:  # noqa: BLE001 - recorded and re-raised
                    failed[prev] = f"{type(exc).__name__}: {str(exc)[-2000:]}"
                    raise
        return done[stem]

    return run


def read_metrics(nb_out: Path) -> dict:
    path = nb_out / "metrics.json"
    assert path.exists(), f"{path} was not written"
    return json.loads(path.read_text(encoding="utf-8"))


def printed(executed: Path) -> str:
    """Everything the code cells of an executed notebook printed or displayed as text."""
    text = []
    for cell in json.loads(Path(executed).read_text(encoding="utf-8"))["cells"]:
        for output in cell.get("outputs", []):
            text.append("".join(output.get("text", [])))
            text.append("".join(output.get("data", {}).get("text/plain", [])))
    return "\n".join(text)
