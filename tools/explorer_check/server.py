"""Setup and the JupyterLab server: the inputs, the notebook copy, ``jupyter lab`` start/stop, docs images.

Everything here runs before or after the browser: it raises :class:`SetupError` (exit 2) for what
is missing, :class:`CheckFailed` (exit 1) only for a docs image over its size.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

from . import NOTEBOOK, CheckFailed, SetupError, log

PROBE_TAG = "check_explorer_jupyterlab: probe"
PROBE = f'''# {PROBE_TAG} (kernel-side state of the explorer widgets)
import json as _json, ipywidgets as _w
_c = shown.controls
print("EXPLORER_STATE " + _json.dumps({{
    "subject": int(_c["subject"].value), "sid": explorer.emb.sids[int(_c["subject"].value)],
    "patch": int(_c["patch"].value), "slice": int(_c["slice"].value), "slice_max": int(_c["slice"].max),
    "heatmap": bool(_c["heatmap"].value), "explorer_subject": int(explorer.subject),
    "on_slice_options": len(_c["on_slice"].options), "ipywidgets": _w.__version__}}))
'''
INJECT = '''# check_explorer_jupyterlab: --inject-error (a widget callback that fails)
shown.controls["heatmap"].observe(lambda change: 1 / 0, names="value")
'''
ARTIFACTS = ("before.png", "after.png", "before_full.png", "after_full.png", "failure_full.png", "report.json",
             "executed.ipynb")


def check_inputs(args) -> tuple[Path, Path, Path]:
    """The output folder of notebooks 00-02, the JupyterLab python and the emptied artifacts folder.

    Raises:
        SetupError: when notebooks 00-02's outputs, Chromium or the python are missing.
    """
    out = Path(args.out).resolve()
    for need in ("patch_store", "02_pretraining/checkpoint.pt"):
        if not (out / need).exists():
            raise SetupError(f"{out / need} does not exist: run notebooks 00-02 into {out} first "
                             f"(python -m drasclr_lib.runner --out {out} --only 00 01 02)")
    if not Path(args.chromium).exists():
        raise SetupError(f"Chromium not found at {args.chromium} (apt-get install -y chromium)")
    python = Path(os.path.abspath(args.python))  # not resolve(): a venv python is a symlink
    if not python.exists():
        raise SetupError(f"python for JupyterLab not found: {python}")
    art = Path(args.artifacts).resolve()
    art.mkdir(parents=True, exist_ok=True)
    for old in ARTIFACTS:
        (art / old).unlink(missing_ok=True)
    return out, python, art


def check_params() -> dict:
    """The parameters the check adds to notebook 03's copy: only ``INTERACTIVE = True``.

    The notebook otherwise runs as committed (the laptop profile, as CI and ``make demo`` run it);
    nothing of drasclr_lib is imported here (this runs in the Playwright environment).
    """
    return {"INTERACTIVE": True}


def prepare_notebook(dst_dir: Path, params: dict, inject_error: bool) -> Path:
    """Copy notebook 03 into ``dst_dir`` with ``params`` appended to its parameters cell and the probe."""
    nb = json.loads(NOTEBOOK.read_text())
    cells = nb["cells"]
    pcell = [c for c in cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    if len(pcell) != 1:
        raise SetupError(f"{NOTEBOOK}: expected one cell tagged 'parameters', found {len(pcell)}")
    src = "".join(pcell[0]["source"]).rstrip("\n")
    src += "\n# check_explorer_jupyterlab: injected parameters\n" + "\n".join(f"{k} = {v!r}" for k, v in params.items())
    pcell[0]["source"] = src.splitlines(keepends=True)
    if not any("show_explorer(" in "".join(c["source"]) for c in cells):
        raise SetupError(f"{NOTEBOOK}: no cell calls show_explorer(...)")
    extra = ([INJECT] if inject_error else []) + [PROBE]
    for code in extra:
        cells.append({"cell_type": "code", "execution_count": None, "metadata": {}, "outputs": [],
                      "source": code.splitlines(keepends=True)})
    for c in cells:
        if c["cell_type"] == "code":
            c["outputs"], c["execution_count"] = [], None
    path = dst_dir / NOTEBOOK.name
    path.write_text(json.dumps(nb, indent=1))
    return path


def jupyter_versions(python: Path) -> dict:
    """Versions of jupyterlab, ipywidgets and jupyterlab_widgets in ``python``'s environment.

    Raises:
        SetupError: when that environment cannot import them.
    """
    got = subprocess.run([str(python), "-c", "import jupyterlab, ipywidgets, jupyterlab_widgets; print(jupyterlab."
                          "__version__, ipywidgets.__version__, jupyterlab_widgets.__version__)"],
                         capture_output=True, text=True)
    if got.returncode:
        raise SetupError(f"{python} cannot import jupyterlab / ipywidgets: {got.stderr.strip()[-300:]}")
    return dict(zip(["jupyterlab", "ipywidgets", "jupyterlab_widgets"], got.stdout.split()))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_jupyter(python: Path, root: Path, out: Path, work: Path, log_path: Path, port: int):
    """Start a token-less ``jupyter lab`` on ``port`` serving ``root``, with ``DRASCLR_OUT=out``.

    Returns:
        ``(process, url)`` once ``/api/status`` answers.

    Raises:
        SetupError: when the server exits or does not answer within 120 s.
    """
    env = {k: v for k, v in os.environ.items() if k not in {"MPLBACKEND", "DRASCLR_INTERACTIVE", "JUPYTER_TOKEN"}}
    env.update(DRASCLR_OUT=str(out), JUPYTERLAB_SETTINGS_DIR=str(work / "settings"),
               JUPYTERLAB_WORKSPACES_DIR=str(work / "workspaces"), JUPYTER_RUNTIME_DIR=str(work / "runtime"))
    # no news / update toasts over the notebook
    notif = work / "settings" / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
    notif.parent.mkdir(parents=True, exist_ok=True)
    notif.write_text(json.dumps({"fetchNews": "false", "checkForUpdates": False}))
    cmd = [str(python), "-m", "jupyter", "lab", "--no-browser", f"--port={port}", "--ip=127.0.0.1",
           "--ServerApp.port_retries=0", "--IdentityProvider.token=", "--ServerApp.password=",
           f"--ServerApp.root_dir={root}", "--LabApp.expose_app_in_browser=True",
           "--ServerApp.disable_check_xsrf=True"] + (["--allow-root"] if os.geteuid() == 0 else [])
    fh = open(log_path, "w")
    proc = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, cwd=root, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    t0 = time.time()
    while time.time() - t0 < 120:
        if proc.poll() is not None:
            raise SetupError(f"jupyter lab exited with {proc.returncode}; see {log_path}")
        try:
            with urllib.request.urlopen(url + "/api/status", timeout=2) as r:
                if r.status == 200:
                    return proc, url
        except OSError:
            time.sleep(1)
    stop(proc)
    raise SetupError(f"jupyter lab did not answer on {url} within 120 s; see {log_path}")


def stop(proc) -> None:
    """Stop the server and its kernels (its own process group)."""
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)  # the server and its kernels (own session)
        proc.wait(timeout=20)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


DOWNSCALE = """
import sys
from PIL import Image
src, dst = sys.argv[1], sys.argv[2]
im = Image.open(src).convert("RGB")
im = im.resize((1100, round(im.height * 1100 / im.width)), Image.LANCZOS)
im.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(dst, optimize=True)
"""


def docs_images(python: Path, art: Path, dst: Path) -> list[str]:
    """Whole-page screenshots, 1100 px wide, 256 colours: ``explorer_jupyterlab_{before,after}.png``.

    Pillow comes from the JupyterLab environment (matplotlib needs it); Playwright's has none.

    Raises:
        CheckFailed: when an image is over 300 KB.
    """
    dst.mkdir(parents=True, exist_ok=True)
    made = []
    for name in ("before", "after"):
        target = dst / f"explorer_jupyterlab_{name}.png"
        tmp = target.with_suffix(".tmp.png")
        subprocess.run([str(python), "-c", DOWNSCALE, str(art / f"{name}_full.png"), str(tmp)], check=True)
        os.replace(tmp, target)
        kb = target.stat().st_size / 1024
        if kb > 300:
            raise CheckFailed(f"{target} is {kb:.0f} KB, over the 300 KB meant for docs images")
        made.append(f"{target} ({kb:.0f} KB)")
        log(f"docs image {made[-1]}")
    return made
