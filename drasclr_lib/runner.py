"""Execute the notebooks in order with papermill (the main job, and the notebook tests).

``python -m drasclr_lib.runner`` (or ``drasclr run-notebooks``) runs every
``notebooks/NN_*.ipynb`` in order on the synthetic default, writing the executed notebooks next to
the figures and ``metrics.json`` of each under the output root (``$DRASCLR_OUT``, else the clone's
``outputs/``; :func:`drasclr_lib.utils.output_root`).

Two parameter profiles (``drasclr_lib/notebook_params.json``, :mod:`drasclr_lib.notebook_setup`):

- ``laptop`` (default, ``make demo`` and CI): the notebooks **as committed**, no parameter
  overrides: 16 synthetic subjects, a few dozen pretraining steps, about 10 minutes on 2 idle cores.
- ``paper``: ``PROFILE = "paper"`` passed to every notebook that has it: the published settings
  (20 epochs, batch 128, queues of 4096, 3 seeds x 4 label fractions). Meant for a GPU and a cohort
  of hundreds of scans; on the small synthetic default each batch shrinks to what the cohort forms.

``-p NAME=VALUE`` sets a papermill parameter in every notebook that has it; ``-p NN:NAME=VALUE``
(``02:LR=0.5`` or ``02_pretraining:LR=0.5``) in that notebook only.
"""

from __future__ import annotations

import argparse
import ast
import os
import sys
import time
from pathlib import Path
from typing import Mapping

from drasclr_lib.notebook_setup import PARAMS_FILE, PROFILES, load_profile, notebook_parameters
from drasclr_lib.utils import output_root

__all__ = ["PARAMS_FILE", "load_profile", "list_notebooks", "parse_parameter_args", "profile_parameters",
           "execute_notebook", "run_notebooks", "main"]

REPO_NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


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

    The kernel runs in the notebook's folder (as JupyterLab runs it) with ``DRASCLR_OUT=out_root``
    and ``DRASCLR_INTERACTIVE=0`` (an ``INTERACTIVE = "auto"`` notebook then draws static figures);
    the executed copy is written to ``out_root/<stem>/<stem>.executed.ipynb``.

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
    env = {"DRASCLR_OUT": str(out_root), "DRASCLR_INTERACTIVE": "0"}  # no front end renders widgets here
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
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
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return nb_out


def run_notebooks(
    out_root: str | os.PathLike | None = None,
    nb_dir: str | os.PathLike = REPO_NOTEBOOKS,
    parameters: Mapping[str, Mapping] | None = None,
    only: list[str] | None = None,
) -> dict[str, float]:
    """Execute every numbered notebook in order; stop at the first failure.

    Args:
        out_root: the shared output folder (``DRASCLR_OUT``; default :func:`~drasclr_lib.utils.output_root`).
        nb_dir: folder of the notebooks.
        parameters: optional papermill parameters per notebook stem.
        only: optional list of stems (or prefixes like ``"00"``) to run.

    Returns:
        Seconds taken by each notebook.
    """
    out_root = Path(out_root) if out_root is not None else output_root()
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


def _literal(text: str):
    """A ``-p`` value: a Python literal (``8``, ``0.5``, ``True``, ``"x"``), else the text itself."""
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text
    return value if isinstance(value, (int, float, bool, str)) else text


def parse_parameter_args(items: list[str], notebooks: list[Path]) -> dict[str, dict]:
    """``-p`` arguments as papermill parameters per notebook stem.

    Args:
        items: ``NAME=VALUE`` (every notebook whose parameters cell has ``NAME``) or
            ``NOTEBOOK:NAME=VALUE`` (``NOTEBOOK`` a stem or its ``NN`` prefix). ``VALUE`` is read as
            a Python literal when it is one (``8``, ``0.5``, ``False``), else as text.
        notebooks: the notebooks that will run.

    Returns:
        ``{stem: {NAME: value}}``.

    Raises:
        ValueError: a malformed item, an unknown notebook, or a parameter no targeted notebook has
            (papermill would only warn and run with the committed value).
    """
    params: dict[str, dict] = {}
    declared = {nb.stem: notebook_parameters(nb) for nb in notebooks}
    for item in items:
        target, sep, assignment = item.rpartition(":") if ":" in item.split("=", 1)[0] else ("", "", item)
        name, eq, value = assignment.partition("=")
        name = name.strip()
        if not eq or not name.isidentifier():
            raise ValueError(f"-p {item!r}: expected NAME=VALUE or NOTEBOOK:NAME=VALUE (e.g. 02:LR=0.5)")
        stems = [s for s in declared if not target or s == target or s.split("_")[0] == target]
        if target and not stems:
            raise ValueError(f"-p {item!r}: no notebook {target!r} among {sorted(declared)}")
        having = [s for s in stems if name in declared[s]]
        if not having:
            where = f"notebook {stems[0]}" if target else "any notebook"
            raise ValueError(f"-p {item!r}: {where} has no parameter {name} (see its parameters cell)")
        for stem in having:
            params.setdefault(stem, {})[name] = _literal(value.strip())
    return params


def profile_parameters(profile: str, notebooks: list[Path]) -> dict[str, dict]:
    """Papermill parameters of a profile: none for ``laptop`` (the notebooks as committed),
    ``PROFILE="paper"`` for each notebook that has a ``PROFILE`` parameter for ``paper``.

    Raises:
        ValueError: an unknown profile.
    """
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r} (profiles: {PROFILES})")
    if profile == "laptop":
        return {}
    return {nb.stem: {"PROFILE": profile} for nb in notebooks if "PROFILE" in notebook_parameters(nb)}


def main(argv: list[str] | None = None) -> int:
    from drasclr_lib.cli_help import HelpFormatter, examples_epilog

    ap = argparse.ArgumentParser(
        prog="drasclr run-notebooks", formatter_class=HelpFormatter,
        description=__doc__.splitlines()[0] + "\nEach notebook's executed copy, figures and metrics.json go to "
        "OUT/<notebook>/; notebook 00 makes\nthe synthetic cohort, so the whole pipeline runs offline.",
        epilog=examples_epilog([
            ("the whole pipeline as committed (about 10 minutes on 2 CPU cores)", "drasclr run-notebooks"),
            ("only notebooks 03 and 04 (each makes what it misses: cohort, store, a short pretraining)",
             "drasclr run-notebooks --only 03 04"),
            ("a parameter for every notebook that has it, and one for notebook 02 only",
             "drasclr run-notebooks -p SEED=1 -p 02:LR=0.5"),
            ("the paper's settings (a GPU and a cohort of hundreds of scans)",
             "drasclr run-notebooks --out outputs_paper --profile paper -p 01:DATA_MANIFEST=copdgene")]))
    ap.add_argument("--out", default=None,
                    help="output folder (default: $DRASCLR_OUT, else the clone's outputs/: drasclr_lib.utils.output_root)")
    ap.add_argument("--notebooks", default=str(REPO_NOTEBOOKS),
                    help="folder of the NN_*.ipynb notebooks: a clone's notebooks/ (an installed wheel has none)")
    ap.add_argument("--only", nargs="*", metavar="NOTEBOOK",
                    help="run only these notebooks: stems or NN prefixes (default: all, in order)")
    ap.add_argument("--profile", choices=PROFILES, default="laptop",
                    help="laptop: the notebooks as committed; paper: PROFILE='paper' in each notebook (published settings)")
    ap.add_argument("-p", "--parameter", action="append", default=[], metavar="[NOTEBOOK:]NAME=VALUE",
                    help="a papermill parameter: NAME=VALUE for every notebook that has NAME, NN:NAME=VALUE for one "
                         "(repeatable; applied after --profile)")
    args = ap.parse_args(argv)
    notebooks = [nb for nb in list_notebooks(args.notebooks)
                 if not args.only or any(nb.stem.startswith(o) for o in args.only)]
    try:
        params = profile_parameters(args.profile, notebooks)
        for stem, values in parse_parameter_args(args.parameter, notebooks).items():
            params.setdefault(stem, {}).update(values)
    except ValueError as exc:
        ap.error(str(exc))
    out = Path(args.out) if args.out else output_root()
    timings = run_notebooks(out, args.notebooks, parameters=params, only=args.only)
    print("[drasclr] all notebooks executed: " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
