"""The checks: the interactions with the explorer panel and what each must show (raise :class:`CheckFailed`).

:func:`drive` is the scenario (run all cells, six interactions, the kernel's view afterwards);
:func:`verdict_on_errors` judges the errors collected outside the notebook (websocket, server log,
page).
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

from . import CheckFailed, log
from .browser import Controls, FrontEndErrors, explorer_panel, figure_info, open_and_run_all, rerun_last_cell, \
    save_notebook, shoot
from .server import PROBE_TAG


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


def probe_state(cells: list[dict]) -> dict:
    """The kernel-side widget state the probe cell printed (``EXPLORER_STATE {...}``)."""
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
    """After one interaction: a new figure, and controls reading what ``expect(ui)`` accepts."""
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


def drive(page, url: str, args, art: Path, report: dict, nb_path: Path) -> None:
    """Open the copy, run all cells, then exercise the explorer panel (raises CheckFailed)."""
    from playwright.sync_api import Error as PWError

    cells = open_and_run_all(page, url, nb_path, report, args.timeout)
    probs = output_problems(cells)
    unexecuted = [n for n, c in enumerate(cells) if c["cell_type"] == "code" and c.get("execution_count") is None]
    if probs or unexecuted:
        raise CheckFailed("notebook 03 failed in JupyterLab: " + "; ".join(probs) +
                          (f" (cells not executed: {unexecuted})" if unexecuted else ""))
    state0 = probe_state(cells)
    report["kernel_state_initial"] = state0
    log(f"kernel-side state after run-all: {state0}")

    # -- the panel ---------------------------------------------------------------------------
    panel = explorer_panel(page)
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
    cells = rerun_last_cell(page)
    state1 = probe_state(cells)
    report["kernel_state_final"] = state1
    ui1 = ctl.read()
    log(f"kernel-side state after the interactions: {state1}")
    compare_state(ui1, state1, "after the interactions")
    report["versions"]["ipywidgets_kernel"] = state1.get("ipywidgets")
    save_notebook(page)

    probs = output_problems(cells)
    if probs:
        raise CheckFailed("errors in the notebook after the interactions: " + "; ".join(probs))


def verdict_on_errors(errors: FrontEndErrors, jlog: Path) -> None:
    """No error may have reached the browser (websocket, page) or the Jupyter server / kernel log."""
    server_log = jlog.read_text(errors="replace")
    bad_log = [ln for ln in server_log.splitlines() if re.search(r"Traceback|Exception in comm|Error in observer", ln)]
    if errors.ws:
        raise CheckFailed(f"{len(errors.ws)} error message(s) from the kernel reached the browser (see report.json); "
                          f"first: {errors.ws[0][:80]} ... {errors.ws[0][-400:]}")
    if bad_log:
        raise CheckFailed(f"errors in the Jupyter server / kernel log {jlog}: {bad_log[:5]}")
    if errors.page:
        raise CheckFailed(f"uncaught errors in the page: {errors.page[:5]}")
