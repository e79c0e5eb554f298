"""Execute the notebooks in order with papermill (the main job, and the notebook tests).

``python -m drasclr_lib.runner`` (or ``drasclr run-notebooks``) runs every
``notebooks/NN_*.ipynb`` in order on the synthetic default, writing the executed notebooks next to
the figures and ``metrics.json`` of each under ``$DRASCLR_OUT`` (default ``outputs/``).

Two parameter profiles:

- ``small`` (default of ``make demo``): :data:`SMALL_PARAMS`, the CPU-sized settings the test
  suite runs (16 subjects, a few dozen pretraining steps) — about 15-25 minutes on 2 cores. They
  live in ``drasclr_lib/notebook_params.json`` (package data, its notes under ``"_comment"``), read
  here (:func:`load_profile`), by the notebook tests and by ``tools/explorer_check``; edit them there.
- ``notebook``: each notebook's own defaults, i.e. the paper's settings (20 epochs, batch 128,
  queues of 4096, 3 seeds x 4 label fractions). Meant for a GPU and a cohort of hundreds of scans;
  on the small synthetic default a batch of 128 cannot be formed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Mapping

__all__ = ["SMALL_PARAMS", "PARAMS_FILE", "load_profile", "list_notebooks", "execute_notebook", "run_notebooks",
           "main"]

REPO_NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"

PARAMS_FILE = Path(__file__).resolve().parent / "notebook_params.json"


def load_profile(name: str = "small", path: str | os.PathLike = PARAMS_FILE) -> dict[str, dict]:
    """One parameter profile of ``notebook_params.json``: notebook stem -> papermill parameters.

    The file maps profile -> stem -> parameters; its top-level ``"_comment"`` holds the notes (JSON
    carries no comments) and is not a profile.

    Args:
        name: the profile (``"small"``).
        path: the JSON file of profiles (default: the one shipped with the package).

    Returns:
        ``{stem: {PARAMETER: value}}``, each entry overriding that notebook's ``parameters`` cell.

    Raises:
        KeyError: when the file has no profile ``name``.
    """
    profiles = {k: v for k, v in json.loads(Path(path).read_text(encoding="utf-8")).items() if not k.startswith("_")}
    if name not in profiles:
        raise KeyError(f"no parameter profile {name!r} in {path} (profiles: {sorted(profiles)})")
    return profiles[name]


# Small papermill parameters for each notebook: what CI runs on 2 CPU cores, and `make demo`.
SMALL_PARAMS: dict[str, dict] = load_profile("small")


def list_notebooks(nb_dir: str | os.PathLike = REPO_NOTEBOOKS) -> list[Path]:
    """The numbered notebooks (``NN_name.ipynb``) of ``nb_dir``, in execution order."""
    nbs = sorted(p for p in Path(nb_dir).glob("[0-9][0-9]_*.ipynb"))
    if not nbs:
        raise FileNotFoundError(f"no numbered notebooks (NN_*.ipynb) in {nb_dir}")
    return nbs


def execute_notebook(
    notebook: str | os.PathLike,
    out_root: str | os.PathLike,
    parameters: Mapping | None = None,
    *,
    cell_timeout: int | None = 1800,
    progress: bool = True,
) -> Path:
    """Execute one notebook with papermill.

    The kernel runs in the notebook's folder with ``DRASCLR_OUT=out_root``; the executed copy is
    written to ``out_root/<stem>/<stem>.executed.ipynb``.

    Returns:
        The notebook's own output folder ``out_root/<stem>`` (holding its ``metrics.json``).

    Raises:
        papermill.PapermillExecutionError: when a cell fails (the executed copy shows where).
    """
    import papermill as pm

    notebook = Path(notebook).resolve()
    out_root = Path(out_root).resolve()
    nb_out = out_root / notebook.stem
    nb_out.mkdir(parents=True, exist_ok=True)
    old = os.environ.get("DRASCLR_OUT")
    os.environ["DRASCLR_OUT"] = str(out_root)
    try:
        pm.execute_notebook(
            str(notebook),
            str(nb_out / f"{notebook.stem}.executed.ipynb"),
            parameters=dict(parameters or {}),
            cwd=str(notebook.parent),
            kernel_name="python3",
            execution_timeout=cell_timeout,
            progress_bar=progress,
        )
    finally:
        if old is None:
            os.environ.pop("DRASCLR_OUT", None)
        else:
            os.environ["DRASCLR_OUT"] = old
    return nb_out


def run_notebooks(
    out_root: str | os.PathLike = "outputs",
    nb_dir: str | os.PathLike = REPO_NOTEBOOKS,
    parameters: Mapping[str, Mapping] | None = None,
    only: list[str] | None = None,
) -> dict[str, float]:
    """Execute every numbered notebook in order; stop at the first failure.

    Args:
        out_root: the shared output folder (``DRASCLR_OUT``).
        nb_dir: folder of the notebooks.
        parameters: optional papermill parameters per notebook stem.
        only: optional list of stems (or prefixes like ``"00"``) to run.

    Returns:
        Seconds taken by each notebook.
    """
    timings = {}
    for nb in list_notebooks(nb_dir):
        if only and not any(nb.stem.startswith(o) for o in only):
            continue
        t0 = time.perf_counter()
        print(f"[drasclr] executing {nb.name} -> {Path(out_root) / nb.stem}", flush=True)
        execute_notebook(nb, out_root, (parameters or {}).get(nb.stem))
        timings[nb.stem] = time.perf_counter() - t0
        print(f"[drasclr] {nb.name} done in {timings[nb.stem]:.0f} s", flush=True)
    return timings


def main(argv: list[str] | None = None) -> int:
    from drasclr_lib.cli_help import HelpFormatter, examples_epilog

    ap = argparse.ArgumentParser(
        prog="drasclr run-notebooks", formatter_class=HelpFormatter,
        description=__doc__.splitlines()[0] + "\nEach notebook's executed copy, figures and metrics.json go to "
        "OUT/<notebook>/; notebook 00 makes\nthe synthetic cohort, so the whole pipeline runs offline.",
        epilog=examples_epilog([
            ("the whole pipeline with the CPU-sized settings (about 15-25 minutes on 2 cores)",
             "drasclr run-notebooks --out outputs"),
            ("only notebooks 03 and 04 (their inputs from earlier runs must be in OUT)",
             "drasclr run-notebooks --out outputs --only 03 04"),
            ("the paper's settings (a GPU and a cohort of hundreds of scans)",
             "drasclr run-notebooks --out outputs_full --profile notebook")]))
    ap.add_argument("--out", default=os.environ.get("DRASCLR_OUT", "outputs"),
                    help="output folder (default: $DRASCLR_OUT, else outputs; here %(default)s)")
    ap.add_argument("--notebooks", default=str(REPO_NOTEBOOKS),
                    help="folder of the NN_*.ipynb notebooks: a clone's notebooks/ (an installed wheel has none)")
    ap.add_argument("--only", nargs="*", metavar="NOTEBOOK",
                    help="run only these notebooks: stems or NN prefixes (default: all, in order)")
    ap.add_argument("--profile", choices=("small", "notebook"), default="small",
                    help="small: CPU-sized settings from notebook_params.json; notebook: each notebook's own "
                         "(paper) defaults")
    args = ap.parse_args(argv)
    params = SMALL_PARAMS if args.profile == "small" else None
    timings = run_notebooks(args.out, args.notebooks, parameters=params, only=args.only)
    print("[drasclr] all notebooks executed: " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
