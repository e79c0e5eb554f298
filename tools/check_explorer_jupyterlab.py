"""Check the patch explorer of notebook 03 in a live JupyterLab session, driven by a real browser.

papermill (the notebook tests) runs notebook 03 with ``INTERACTIVE = False``: it never renders the
ipywidgets panel. This script does what a user does: it starts ``jupyter lab``, opens a copy of
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
  ``.venv/bin/python -m drasclr_lib.runner --out /tmp/jl_out --profile small --only 00 01 02``.

Usage::

    /tmp/jlvenv/bin/python tools/check_explorer_jupyterlab.py --out /tmp/jl_out \\
        --artifacts /tmp/jl_check

The committed notebook is never touched: the copy lives in a temporary folder, with the parameters
of the ``small`` profile (:data:`drasclr_lib.runner.SMALL_PARAMS`) and ``INTERACTIVE = True``.
Notebook 03 itself writes its usual outputs (embeddings, figures, metrics) into
``OUT/03_embeddings``. The artifacts folder receives ``before.png`` / ``after.png`` (the explorer
panel), ``*_full.png`` (the whole page), ``executed.ipynb``, ``jupyter.log`` and ``report.json``;
with ``--docs-img docs/img`` the whole-page screenshots are also written, downscaled, to
``docs/img/explorer_jupyterlab_{before,after}.png``. Run as root, the server gets ``--allow-root``.

``--inject-error`` appends a cell that registers a failing widget callback; the check must then
fail (exit 1). It shows that the checker sees errors that only reach the front end.

Exit status: 0 when every check passed, 1 when a check failed (the message says which), 2 for a
setup problem (missing inputs, Chromium, Playwright, JupyterLab not starting).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
NOTEBOOK = REPO / "notebooks" / "03_embeddings.ipynb"
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


class CheckFailed(Exception):
    """A check of the explorer failed (exit 1)."""


class SetupError(Exception):
    """The check could not be set up (exit 2)."""


def log(msg: str) -> None:
    print(f"[check-explorer {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def small_params() -> dict:
    """Notebook 03's entry of ``SMALL_PARAMS`` in drasclr_lib/runner.py.

    Parsed from the source, not imported, so this script runs where drasclr_lib is not importable
    (the Playwright environment).
    """
    import ast

    tree = ast.parse((REPO / "drasclr_lib" / "runner.py").read_text())
    for node in ast.walk(tree):
        target = getattr(node, "target", None) or (getattr(node, "targets", [None]) or [None])[0]
        if isinstance(target, ast.Name) and target.id == "SMALL_PARAMS" and node.value is not None:
            return dict(ast.literal_eval(node.value)["03_embeddings"])
    raise SetupError("SMALL_PARAMS not found in drasclr_lib/runner.py")


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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_jupyter(python: Path, root: Path, out: Path, work: Path, log_path: Path, port: int):
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


# -- browser side ---------------------------------------------------------------------------------
JS_STATE = """() => {
  const nb = window.jupyterapp.shell.currentWidget;
  if (!nb || !nb.content || !nb.sessionContext) return null;
  const kernel = nb.sessionContext.session && nb.sessionContext.session.kernel;
  const prompts = Array.from(nb.node.querySelectorAll('.jp-InputArea-prompt')).map(p => p.textContent.trim());
  const cells = nb.content.widgets.map(w => w.model.toJSON());
  return {kernel: kernel ? kernel.status : null, running: prompts.filter(p => p.includes('*')).length, cells};
}"""

JS_IMAGES = """(panel) => {
  const imgs = Array.from(panel.querySelectorAll('.widget-output img'));
  return imgs.map(img => {
    let spread = null;
    if (img.complete && img.naturalWidth > 0) {
      const c = document.createElement('canvas');
      c.width = img.naturalWidth; c.height = img.naturalHeight;
      const ctx = c.getContext('2d'); ctx.drawImage(img, 0, 0);
      const d = ctx.getImageData(0, 0, c.width, c.height).data;
      let s = 0, s2 = 0, n = 0;
      for (let i = 0; i < d.length; i += 4 * 7) {  // every 7th pixel, grey level
        const v = (d[i] + d[i + 1] + d[i + 2]) / 3; s += v; s2 += v * v; n++;
      }
      spread = Math.sqrt(Math.max(s2 / n - (s / n) ** 2, 0));
    }
    return {src: img.src, w: img.naturalWidth, h: img.naturalHeight, spread};
  });
}"""


def cell_text(cell: dict) -> str:
    return "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]


def output_problems(cells: list[dict]) -> list[str]:
    """Error outputs and tracebacks in the notebook's cells (from the live front end's model)."""
    bad = []
    for n, c in enumerate(cells):
        for o in c.get("outputs", []) if c.get("cell_type") == "code" else []:
            if o.get("output_type") == "error":
                bad.append(f"cell {n}: {o.get('ename')}: {o.get('evalue')}")
            text = o.get("text", "")
            text = "".join(text) if isinstance(text, list) else text
            if "Traceback" in text:
                bad.append(f"cell {n}: traceback on {o.get('name')}: {text[-400:]}")
            for mime, data in (o.get("data") or {}).items():
                if mime.startswith("text/") and "Traceback" in ("".join(data) if isinstance(data, list) else str(data)):
                    bad.append(f"cell {n}: traceback in {mime} output")
    return bad


def run_check(args) -> dict:
    try:
        from playwright.sync_api import Error as PWError
        from playwright.sync_api import sync_playwright
    except ImportError as exc:
        raise SetupError(f"playwright is not importable from {sys.executable} ({exc}); "
                         "python3 -m venv /tmp/jlvenv && /tmp/jlvenv/bin/pip install playwright") from exc
    out = Path(args.out).resolve()
    for need in ("patch_store", "02_pretraining/checkpoint.pt"):
        if not (out / need).exists():
            raise SetupError(f"{out / need} does not exist: run notebooks 00-02 into {out} first "
                             f"(python -m drasclr_lib.runner --out {out} --profile small --only 00 01 02)")
    if not Path(args.chromium).exists():
        raise SetupError(f"Chromium not found at {args.chromium} (apt-get install -y chromium)")
    python = Path(os.path.abspath(args.python))  # not resolve(): a venv python is a symlink
    if not python.exists():
        raise SetupError(f"python for JupyterLab not found: {python}")
    art = Path(args.artifacts).resolve()
    art.mkdir(parents=True, exist_ok=True)
    for old in ("before.png", "after.png", "before_full.png", "after_full.png", "failure_full.png", "report.json",
                "executed.ipynb"):
        (art / old).unlink(missing_ok=True)

    params = small_params()
    params["INTERACTIVE"] = True
    work = Path(tempfile.mkdtemp(prefix="check_explorer_"))
    nb_dir = work / "nb"
    nb_dir.mkdir()
    nb_path = prepare_notebook(nb_dir, params, args.inject_error)
    got = subprocess.run([str(python), "-c", "import jupyterlab, ipywidgets, jupyterlab_widgets; print(jupyterlab."
                          "__version__, ipywidgets.__version__, jupyterlab_widgets.__version__)"],
                         capture_output=True, text=True)
    if got.returncode:
        raise SetupError(f"{python} cannot import jupyterlab / ipywidgets: {got.stderr.strip()[-300:]}")
    versions = dict(zip(["jupyterlab", "ipywidgets", "jupyterlab_widgets"], got.stdout.split()))
    report: dict = {"out": str(out), "params": params, "versions": versions, "steps": [], "ok": False}
    log(f"notebook copy {nb_path}; parameters {params}; {versions}")

    port = free_port()
    jlog = art / "jupyter.log"
    proc, url = start_jupyter(python, nb_dir, out, work, jlog, port)
    log(f"jupyter lab at {url} (log {jlog})")
    ws_errors: list[str] = []
    page_errors: list[str] = []
    console_errors: list[str] = []
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=args.chromium, headless=True,
                                         args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
            versions["chromium"] = browser.version
            page = browser.new_page(viewport={"width": 1500, "height": 1300}, device_scale_factor=1)
            page.set_default_timeout(60_000)

            def on_ws(ws):
                def frame(payload):
                    text = payload.decode("utf-8", "replace") if isinstance(payload, bytes) else payload
                    if re.search(r'"msg_type":\s*"error"', text) or "Traceback" in text:
                        ws_errors.append(f"[during: {report.get('current_step', '?')}] {text[-1500:]}")
                ws.on("framereceived", frame)

            page.on("websocket", on_ws)
            page.on("pageerror", lambda e: page_errors.append(str(e)))
            page.on("console", lambda m: console_errors.append(m.text) if m.type == "error" else None)
            try:
                drive(page, url, args, art, report, nb_path)
            except Exception:
                try:
                    page.screenshot(path=str(art / "failure_full.png"))
                except PWError:
                    pass
                raise
            browser.close()
    finally:
        stop(proc)
        report["ws_errors"], report["page_errors"], report["console_errors"] = ws_errors, page_errors, console_errors
        if (nb_dir / nb_path.name).exists():
            shutil.copy(nb_dir / nb_path.name, art / "executed.ipynb")
        (art / "report.json").write_text(json.dumps(report, indent=1, default=str))
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    server_log = jlog.read_text(errors="replace")
    bad_log = [ln for ln in server_log.splitlines() if re.search(r"Traceback|Exception in comm|Error in observer", ln)]
    if ws_errors:
        raise CheckFailed(f"{len(ws_errors)} error message(s) from the kernel reached the browser (see report.json); "
                          f"first: {ws_errors[0][:80]} ... {ws_errors[0][-400:]}")
    if bad_log:
        raise CheckFailed(f"errors in the Jupyter server / kernel log {jlog}: {bad_log[:5]}")
    if page_errors:
        raise CheckFailed(f"uncaught errors in the page: {page_errors[:5]}")
    report["ok"] = True
    if args.docs_img:
        report["docs_img"] = docs_images(python, art, Path(args.docs_img))
    (art / "report.json").write_text(json.dumps(report, indent=1, default=str))
    return report


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


def drive(page, url: str, args, art: Path, report: dict, nb_path: Path) -> None:
    """Open the copy, run all cells, then exercise the explorer panel (raises CheckFailed)."""
    from playwright.sync_api import Error as PWError


    page.goto(f"{url}/lab/tree/{nb_path.name}")
    page.wait_for_function("() => window.jupyterapp && window.jupyterapp.shell.currentWidget "
                           "&& window.jupyterapp.shell.currentWidget.sessionContext", timeout=120_000)
    page.evaluate("async () => { const nb = window.jupyterapp.shell.currentWidget; "
                  "await nb.context.ready; await nb.sessionContext.ready; }")
    page.wait_for_function("() => { const k = window.jupyterapp.shell.currentWidget.sessionContext"
                           ".session?.kernel; return k && k.status === 'idle'; }", timeout=120_000)
    log("notebook open, kernel idle; Run > Run All Cells")
    report["current_step"] = "run all cells"
    page.click("#jp-MainMenu .lm-MenuBar-item:has-text('Run')")
    page.click(".lm-Menu-item[data-command='runmenu:run-all']")

    # -- wait for the run to finish (or stop at an error) ----------------------------------
    t0 = time.time()
    quiet_since = None
    while True:
        st = page.evaluate(JS_STATE)
        started = st and any(c["cell_type"] == "code" and c.get("execution_count") is not None
                             for c in st["cells"])
        done = started and st["kernel"] == "idle" and st["running"] == 0
        quiet_since = (quiet_since or time.time()) if done else None
        if quiet_since and time.time() - quiet_since > 5:
            break
        if time.time() - t0 > args.timeout:
            raise CheckFailed(f"running all cells took over {args.timeout} s (kernel {st and st['kernel']})")
        time.sleep(2)
    cells = st["cells"]
    report["run_all_s"] = round(time.time() - t0, 1)
    log(f"all cells ran in {report['run_all_s']} s")
    probs = output_problems(cells)
    unexecuted = [n for n, c in enumerate(cells) if c["cell_type"] == "code" and c.get("execution_count") is None]
    if probs or unexecuted:
        raise CheckFailed("notebook 03 failed in JupyterLab: " + "; ".join(probs) +
                          (f" (cells not executed: {unexecuted})" if unexecuted else ""))
    state0 = probe_state(cells)
    report["kernel_state_initial"] = state0
    log(f"kernel-side state after run-all: {state0}")

    # -- the panel ---------------------------------------------------------------------------
    panel = page.locator(".widget-vbox", has=page.locator(".widget-label", has_text="axial slice")).first
    try:
        panel.wait_for(state="visible", timeout=60_000)
    except PWError as exc:
        cell = [c for c in cells if "show_explorer(" in cell_text(c)][0]
        raise CheckFailed(f"the explorer panel did not render; the cell's outputs: "
                          f"{json.dumps(cell.get('outputs'))[:1500]}") from exc
    if page.locator("text=Error displaying widget").count():
        raise CheckFailed("JupyterLab shows 'Error displaying widget'")
    panel.scroll_into_view_if_needed()
    ctl = Controls(page, panel)
    img0 = wait_figure(page, panel, None, "initial render", args.step_timeout)
    ui0 = ctl.read()
    report["steps"].append({"step": "initial render", "ui": ui0, "img": img0})
    log(f"panel rendered: {ui0}; figure {img0['w']}x{img0['h']} px, sha1 {img0['sha1'][:12]}")
    compare_state(ui0, state0, "after run-all")
    shoot(page, panel, art, "before")

    prev = img0
    # 1. drag the axial-slice slider
    ctl.drag("axial slice", -0.08)
    prev = step(report, page, panel, ctl, prev, "drag the 'axial slice' slider", args.step_timeout,
                expect=lambda ui: ui["slice"] != ui0["slice"] and ui["patch"] == ui0["patch"])
    # 2. pick another patch crossing this slice from the 'on slice' dropdown
    ui = ctl.read()
    choices = [o for o in ui["on_slice_options"] if o.startswith("#") and int(o[1:]) != ui["patch"]]
    if not choices:
        raise CheckFailed(f"the 'on slice' dropdown offers no other patch on slice {ui['slice']}: {ui}")
    pick = choices[len(choices) // 2]
    ctl.select("on slice", pick)
    prev = step(report, page, panel, ctl, prev, f"pick patch {pick} from 'on slice'", args.step_timeout,
                expect=lambda u: u["patch"] == int(pick[1:]) and u["slice"] == ui["slice"])
    # 3. drag the patch slider: the slice jumps to the new patch's centre
    ui = ctl.read()
    ctl.drag("patch #", 0.1)
    prev = step(report, page, panel, ctl, prev, "drag the 'patch #' slider", args.step_timeout,
                expect=lambda u: u["patch"] != ui["patch"])
    # 4. another subject
    ui = ctl.read()
    other = [o for o in ui["subject_options"] if o != ui["subject"]][0]
    ctl.select("subject", other)
    prev = step(report, page, panel, ctl, prev, f"select subject {other}", args.step_timeout,
                expect=lambda u: u["subject"] == other and u["patch"] == ui["patch"])
    # 5. heatmap off
    ctl.checkbox("similarity heatmap")
    prev = step(report, page, panel, ctl, prev, "untick 'similarity heatmap'", args.step_timeout,
                expect=lambda u: u["heatmap"] is False)
    # 6. heatmap on again, then one more slice move (keyboard on the slider handle)
    ctl.checkbox("similarity heatmap")
    prev = step(report, page, panel, ctl, prev, "tick 'similarity heatmap'", args.step_timeout,
                expect=lambda u: u["heatmap"] is True)
    ui = ctl.read()
    ctl.keys("axial slice", "ArrowRight", 3)
    prev = step(report, page, panel, ctl, prev, "ArrowRight x3 on the 'axial slice' handle",
                args.step_timeout, expect=lambda u: u["slice"] != ui["slice"])
    shoot(page, panel, art, "after")

    # -- the kernel agrees with the browser ----------------------------------------------------
    report["current_step"] = "re-run the probe cell"
    page.evaluate("""async () => {
      const app = window.jupyterapp, nb = app.shell.currentWidget;
      nb.content.activeCellIndex = nb.content.widgets.length - 1;
      await app.commands.execute('notebook:run-cell');
    }""")
    time.sleep(1)
    page.wait_for_function("() => { const nb = window.jupyterapp.shell.currentWidget; "
                           "return nb.sessionContext.session.kernel.status === 'idle'; }")
    time.sleep(2)
    cells = page.evaluate(JS_STATE)["cells"]
    state1 = probe_state(cells)
    report["kernel_state_final"] = state1
    ui1 = ctl.read()
    log(f"kernel-side state after the interactions: {state1}")
    compare_state(ui1, state1, "after the interactions")
    report["versions"]["ipywidgets_kernel"] = state1.get("ipywidgets")
    page.evaluate("() => window.jupyterapp.commands.execute('docmanager:save')")
    time.sleep(2)

    probs = output_problems(cells)
    if probs:
        raise CheckFailed("errors in the notebook after the interactions: " + "; ".join(probs))


def probe_state(cells: list[dict]) -> dict:
    for c in cells:
        if PROBE_TAG in cell_text(c):
            for o in c.get("outputs", []):
                text = "".join(o.get("text", "")) if isinstance(o.get("text"), list) else o.get("text", "")
                m = re.search(r"EXPLORER_STATE (\{.*\})", text or "")
                if m:
                    return json.loads(m.group(1))
    raise CheckFailed("the probe cell printed no EXPLORER_STATE (did the explorer cell run with INTERACTIVE=True?)")


def compare_state(ui: dict, state: dict, when: str) -> None:
    """The browser's readouts must equal the kernel's widget values."""
    diffs = {k: (ui[k], state[k2]) for k, k2 in
             (("subject", "sid"), ("patch", "patch"), ("slice", "slice"), ("heatmap", "heatmap"))
             if ui[k] != state[k2]}
    if state["explorer_subject"] != state["subject"]:
        diffs["explorer.subject"] = (state["explorer_subject"], state["subject"])
    if len(ui["on_slice_options"]) != state["on_slice_options"]:
        diffs["on_slice options"] = (len(ui["on_slice_options"]), state["on_slice_options"])
    if diffs:
        raise CheckFailed(f"{when}: the browser and the kernel disagree (browser, kernel): {diffs}")


class Controls:
    """The explorer's widgets in the page, found by their descriptions."""

    def __init__(self, page, panel):
        self.page, self.panel = page, panel

    def _widget(self, kind: str, label: str):
        if kind == "widget-checkbox":  # its description is a <span> beside the box, not a .widget-label
            return self.panel.locator(f".{kind}", has_text=label).first
        return self.panel.locator(f".{kind}", has=self.page.locator(".widget-label", has_text=label)).first

    def read(self) -> dict:
        def readout(label):
            return int(self._widget("widget-hslider", label).locator(".widget-readout").inner_text().strip())

        def select(label):
            sel = self._widget("widget-dropdown", label).locator("select")
            return sel.evaluate("s => ({value: s.options[s.selectedIndex] ? s.options[s.selectedIndex].text : null, "
                                "options: Array.from(s.options).map(o => o.text)})")

        subj, on = select("subject"), select("on slice")
        return {"subject": subj["value"], "subject_options": subj["options"], "patch": readout("patch #"),
                "slice": readout("axial slice"), "on_slice": on["value"], "on_slice_options": on["options"],
                "heatmap": self._widget("widget-checkbox", "similarity heatmap").locator("input").is_checked()}

    def drag(self, label: str, fraction: float) -> None:
        """Drag the slider's handle with the mouse by ``fraction`` of its track (released once: one 'change')."""
        slider = self._widget("widget-hslider", label)
        handle = slider.locator(".noUi-handle")
        handle.scroll_into_view_if_needed()
        track = slider.locator(".noUi-target").bounding_box()
        box = handle.bounding_box()
        x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
        dx = fraction * track["width"]
        self.page.mouse.move(x, y)
        self.page.mouse.down()
        self.page.mouse.move(x + dx, y, steps=12)
        self.page.mouse.up()

    def keys(self, label: str, key: str, times: int) -> None:
        handle = self._widget("widget-hslider", label).locator(".noUi-handle")
        handle.focus()
        for _ in range(times):
            self.page.keyboard.press(key)

    def select(self, label: str, option_text: str) -> None:
        self._widget("widget-dropdown", label).locator("select").select_option(label=option_text)

    def checkbox(self, label: str) -> None:
        self._widget("widget-checkbox", label).locator("input").click()


def figure_info(page, panel) -> list[dict]:
    info = panel.evaluate(JS_IMAGES)
    for d in info:
        d["sha1"] = hashlib.sha1(d.pop("src").encode()).hexdigest()
    return info


def wait_figure(page, panel, prev_sha: str | None, what: str, timeout: float) -> dict:
    """Wait until the panel shows exactly one loaded, non-blank figure different from ``prev_sha``."""
    t0 = time.time()
    last = None
    while time.time() - t0 < timeout:
        imgs = figure_info(page, panel)
        last = imgs
        if len(imgs) == 1 and imgs[0]["w"] > 0 and imgs[0]["sha1"] != prev_sha:
            time.sleep(1.5)  # let a late second redraw land, then look again
            again = figure_info(page, panel)
            if len(again) != 1:
                raise CheckFailed(f"{what}: the panel shows {len(again)} figures instead of one")
            img = again[0]
            if img["w"] < 200 or img["h"] < 200 or (img["spread"] is not None and img["spread"] < 5):
                raise CheckFailed(f"{what}: the figure looks blank or tiny: {img}")
            return img
        time.sleep(0.5)
    texts = panel.locator(".widget-output").inner_text()[-1500:]
    raise CheckFailed(f"{what}: the figure did not {'appear' if prev_sha is None else 'change'} within "
                      f"{timeout} s (images: {last}; output text: {texts!r})")


def step(report, page, panel, ctl, prev, what, timeout, expect) -> dict:
    report["current_step"] = what
    log(f"{what} ...")
    t0 = time.time()
    img = wait_figure(page, panel, prev["sha1"], what, timeout)
    ui = ctl.read()
    if not expect(ui):
        raise CheckFailed(f"{what}: the controls read {ui} (before: {report['steps'][-1]['ui']})")
    report["steps"].append({"step": what, "ui": ui, "img": img, "s": round(time.time() - t0, 1)})
    log(f"  -> subject {ui['subject']}, patch {ui['patch']}, slice {ui['slice']}, heatmap {ui['heatmap']}; "
        f"figure sha1 {img['sha1'][:12]} (was {prev['sha1'][:12]}) after {time.time() - t0:.1f} s")
    return img


def shoot(page, panel, art: Path, name: str) -> None:
    panel.scroll_into_view_if_needed()
    panel.screenshot(path=str(art / f"{name}.png"))
    page.screenshot(path=str(art / f"{name}_full.png"))
    log(f"screenshots {art / (name + '.png')} ({(art / (name + '.png')).stat().st_size // 1024} KB), {name}_full.png")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
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


if __name__ == "__main__":
    sys.exit(main())
