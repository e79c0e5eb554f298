"""Playwright driving: headless Chromium on the JupyterLab page, the explorer panel's widgets, the front end's errors.

What the page shows is read here; what it must show is decided in :mod:`.checks`.
"""

from __future__ import annotations

import hashlib
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from . import CheckFailed, log

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


@dataclass
class FrontEndErrors:
    """What reached the browser: error frames on the kernel websocket, uncaught page errors, console errors."""

    ws: list[str] = field(default_factory=list)
    page: list[str] = field(default_factory=list)
    console: list[str] = field(default_factory=list)


def run_in_browser(chromium: str, report: dict, art: Path, errors: FrontEndErrors, action: Callable) -> None:
    """Launch headless ``chromium``, record the front end's errors into ``errors``, call ``action(page)``.

    ``report["versions"]["chromium"]`` receives the browser's version; when ``action`` raises, the
    whole page is saved as ``art/failure_full.png`` before the exception goes on.
    """
    from playwright.sync_api import Error as PWError
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, headless=True,
                                     args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        report["versions"]["chromium"] = browser.version
        page = browser.new_page(viewport={"width": 1500, "height": 1300}, device_scale_factor=1)
        page.set_default_timeout(60_000)

        def on_ws(ws):
            def frame(payload):
                text = payload.decode("utf-8", "replace") if isinstance(payload, bytes) else payload
                if re.search(r'"msg_type":\s*"error"', text) or "Traceback" in text:
                    errors.ws.append(f"[during: {report.get('current_step', '?')}] {text[-1500:]}")
            ws.on("framereceived", frame)

        page.on("websocket", on_ws)
        page.on("pageerror", lambda e: errors.page.append(str(e)))
        page.on("console", lambda m: errors.console.append(m.text) if m.type == "error" else None)
        try:
            action(page)
        except Exception:
            try:
                page.screenshot(path=str(art / "failure_full.png"))
            except PWError:
                pass
            raise
        browser.close()


def open_and_run_all(page, url: str, nb_path: Path, report: dict, timeout: float) -> list[dict]:
    """Open the notebook copy, wait for an idle kernel, click *Run > Run All Cells* and wait for the run to end.

    Returns:
        The cells of the live front end's model (``nbformat`` dicts, outputs included).

    Raises:
        CheckFailed: when running all cells takes over ``timeout`` seconds.
    """
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
        if time.time() - t0 > timeout:
            raise CheckFailed(f"running all cells took over {timeout} s (kernel {st and st['kernel']})")
        time.sleep(2)
    report["run_all_s"] = round(time.time() - t0, 1)
    log(f"all cells ran in {report['run_all_s']} s")
    return st["cells"]


def rerun_last_cell(page) -> list[dict]:
    """Run the notebook's last cell (the probe) again and wait for an idle kernel; returns the cells."""
    page.evaluate("""async () => {
      const app = window.jupyterapp, nb = app.shell.currentWidget;
      nb.content.activeCellIndex = nb.content.widgets.length - 1;
      await app.commands.execute('notebook:run-cell');
    }""")
    time.sleep(1)
    page.wait_for_function("() => { const nb = window.jupyterapp.shell.currentWidget; "
                           "return nb.sessionContext.session.kernel.status === 'idle'; }")
    time.sleep(2)
    return page.evaluate(JS_STATE)["cells"]


def save_notebook(page) -> None:
    page.evaluate("() => window.jupyterapp.commands.execute('docmanager:save')")
    time.sleep(2)


def explorer_panel(page):
    """The explorer's panel: the widget box holding the 'axial slice' slider."""
    return page.locator(".widget-vbox", has=page.locator(".widget-label", has_text="axial slice")).first


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
    """The figures (``<img>``) the panel's output widget shows: size, pixel spread, sha1 of the source."""
    info = panel.evaluate(JS_IMAGES)
    for d in info:
        d["sha1"] = hashlib.sha1(d.pop("src").encode()).hexdigest()
    return info


def shoot(page, panel, art: Path, name: str) -> None:
    """Screenshots of the panel (``art/<name>.png``) and of the whole page (``art/<name>_full.png``)."""
    panel.scroll_into_view_if_needed()
    panel.screenshot(path=str(art / f"{name}.png"))
    page.screenshot(path=str(art / f"{name}_full.png"))
    log(f"screenshots {art / (name + '.png')} ({(art / (name + '.png')).stat().st_size // 1024} KB), {name}_full.png")
