"""The command line: one check end to end (setup, server, browser, verdict, report) and its exit status."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

from . import REPO, CheckFailed, SetupError, log
from . import __doc__ as PACKAGE_DOC
from .browser import FrontEndErrors, run_in_browser
from .checks import drive, verdict_on_errors
from .server import check_inputs, docs_images, free_port, jupyter_versions, prepare_notebook, check_params, \
    start_jupyter, stop


def run_check(args) -> dict:
    """Run the whole check with the parsed command line ``args``; returns the report (also ``report.json``).

    Raises:
        SetupError: a missing input, Playwright, Chromium or JupyterLab (exit 2).
        CheckFailed: a check failed (exit 1).
    """
    try:
        import playwright.sync_api  # noqa: F401 - the Playwright environment is a requirement, checked first
    except ImportError as exc:
        raise SetupError(f"playwright is not importable from {sys.executable} ({exc}); "
                         "python3 -m venv /tmp/jlvenv && /tmp/jlvenv/bin/pip install playwright") from exc
    out, python, art = check_inputs(args)

    params = check_params()
    params["INTERACTIVE"] = True
    work = Path(tempfile.mkdtemp(prefix="check_explorer_"))
    nb_dir = work / "nb"
    nb_dir.mkdir()
    nb_path = prepare_notebook(nb_dir, params, args.inject_error)
    versions = jupyter_versions(python)
    report: dict = {"out": str(out), "params": params, "versions": versions, "steps": [], "ok": False}
    log(f"notebook copy {nb_path}; parameters {params}; {versions}")

    port = free_port()
    jlog = art / "jupyter.log"
    proc, url = start_jupyter(python, nb_dir, out, work, jlog, port)
    log(f"jupyter lab at {url} (log {jlog})")
    errors = FrontEndErrors()
    try:
        run_in_browser(args.chromium, report, art, errors, lambda page: drive(page, url, args, art, report, nb_path))
    finally:
        stop(proc)
        report["ws_errors"], report["page_errors"], report["console_errors"] = errors.ws, errors.page, errors.console
        if (nb_dir / nb_path.name).exists():
            shutil.copy(nb_dir / nb_path.name, art / "executed.ipynb")
        (art / "report.json").write_text(json.dumps(report, indent=1, default=str))
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    verdict_on_errors(errors, jlog)
    report["ok"] = True
    if args.docs_img:
        report["docs_img"] = docs_images(python, art, Path(args.docs_img))
    (art / "report.json").write_text(json.dumps(report, indent=1, default=str))
    return report


def main(argv=None) -> int:
    """Exit status: 0 every check passed, 1 a check failed, 2 a setup problem."""
    ap = argparse.ArgumentParser(description=PACKAGE_DOC.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output folder holding notebooks 00-02's outputs (DRASCLR_OUT)")
    ap.add_argument("--artifacts", default="outputs/check_explorer_jupyterlab",
                    help="folder for screenshots, the executed copy, the server log and report.json")
    ap.add_argument("--python", default=str(REPO / ".venv" / "bin" / "python"),
                    help="python of the environment with JupyterLab, ipywidgets and drasclr_lib")
    ap.add_argument("--chromium", default="/usr/bin/chromium", help="Chromium executable")
    ap.add_argument("--timeout", type=float, default=2400, help="seconds allowed for running all cells")
    ap.add_argument("--step-timeout", type=float, default=180, help="seconds allowed for each redraw")
    ap.add_argument("--inject-error", action="store_true", help="add a failing widget callback (must exit 1)")
    ap.add_argument("--docs-img", default=None,
                    help="on success, also write downscaled whole-page screenshots here (docs/img)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary notebook folder")
    args = ap.parse_args(argv)
    try:
        report = run_check(args)
    except SetupError as exc:
        log(f"SETUP ERROR: {exc}")
        return 2
    except CheckFailed as exc:
        log(f"FAILED: {exc}")
        return 1
    except Exception as exc:  # a browser action that timed out or found no element: a failed check
        if type(exc).__module__.startswith("playwright"):
            log(f"FAILED (browser): {type(exc).__name__}: {str(exc)[:1500]}")
            return 1
        raise
    v = report["versions"]
    log(f"OK: explorer rendered and reacted to {len(report['steps']) - 1} interactions in JupyterLab "
        f"{v.get('jupyterlab')} / ipywidgets {v.get('ipywidgets')} / Chromium {v.get('chromium')}; "
        f"artifacts in {Path(args.artifacts).resolve()}")
    return 0
