"""Open lesson 04 in a real JupyterLab in headless Chromium, run all cells, check the widgets and
figures rendered, and save a screenshot (``tests/browser/out/lesson04.png``). Run via ``run.sh``.

The notebook is copied into a temporary folder that JupyterLab serves, so autosave can never write
outputs into the repository's notebook. ``TITANS_FAST=1`` is set for the kernel (same code path,
small sizes).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from playwright.sync_api import sync_playwright

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOK = "notebooks/04_momentum_forgetting.ipynb"
OUT = ROOT / "tests" / "browser" / "out"
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]
RUN_TIMEOUT_S = 240
KERNEL_READY_JS = """() => {
  const w = window.jupyterapp && window.jupyterapp.shell.currentWidget;
  const k = w && w.sessionContext && w.sessionContext.session && w.sessionContext.session.kernel;
  return !!k && k.connectionStatus === 'connected' && k.status === 'idle';
}"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_server(url: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"JupyterLab exited early with code {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"JupyterLab did not answer at {url} within {timeout} s")


def start_lab(workdir: Path, port: int, token: str, log) -> subprocess.Popen:
    env = dict(os.environ, TITANS_FAST="1", MPLBACKEND="module://matplotlib_inline.backend_inline")
    # isolated settings: no news/update pop-ups over the notebook
    settings = workdir / ".lab-settings"
    notif = settings / "@jupyterlab" / "apputils-extension"
    notif.mkdir(parents=True)
    (notif / "notification.jupyterlab-settings").write_text(
        json.dumps({"fetchNews": "false", "checkForUpdates": False}))
    # render every cell (JupyterLab 4 otherwise only renders the cells in view)
    nbset = settings / "@jupyterlab" / "notebook-extension"
    nbset.mkdir(parents=True)
    (nbset / "tracker.jupyterlab-settings").write_text(json.dumps({"windowingMode": "none"}))
    env["JUPYTERLAB_SETTINGS_DIR"] = str(settings)
    env["JUPYTERLAB_WORKSPACES_DIR"] = str(workdir / ".lab-workspaces")
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", f"--port={port}",
           "--ServerApp.ip=127.0.0.1", f"--IdentityProvider.token={token}",
           f"--ServerApp.root_dir={workdir}", "--allow-root",
           "--ServerApp.port_retries=0", "--LabApp.expose_app_in_browser=True"]
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=workdir)


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="titans-browser-"))
    (workdir / "notebooks").mkdir()
    shutil.copy(ROOT / NOTEBOOK, workdir / NOTEBOOK)
    port, token = free_port(), secrets.token_hex(16)
    log_path = OUT / "jupyterlab.log"
    failures: list[str] = []
    with open(log_path, "w") as log:
        lab = start_lab(workdir, port, token, log)
        try:
            base = f"http://127.0.0.1:{port}"
            wait_for_server(f"{base}/api/status?token={token}", lab)
            print(f"JupyterLab up on port {port}")
            with sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True,
                                             args=CHROMIUM_FLAGS)
                page = browser.new_page(viewport={"width": 1400, "height": 1000})
                page.goto(f"{base}/lab/tree/{NOTEBOOK}?token={token}&reset")
                page.wait_for_selector(".jp-NotebookPanel .jp-Cell", timeout=120_000)
                # wait until the notebook's kernel is connected and idle: a run issued earlier
                # is silently dropped
                page.wait_for_function(KERNEL_READY_JS, timeout=120_000)
                print("notebook open, kernel connected and idle; running all cells")
                # JupyterLab's own command (the menu's Run > Run All Cells); not awaited here, so
                # that a hanging cell is caught by the timeout below
                t0 = time.time()
                page.evaluate("() => { window.jupyterapp.commands.execute('notebook:run-all-cells'); }")

                # done = the widget's sliders exist and no cell is still queued/running ([*])
                while True:
                    prompts = page.locator(".jp-CodeCell .jp-InputPrompt").all_inner_texts()
                    busy = any("*" in p for p in prompts)
                    sliders = page.locator(".jupyter-widgets.widget-slider").count()
                    if sliders >= 3 and not busy:
                        break
                    if time.time() - t0 > RUN_TIMEOUT_S:
                        failures.append(f"timed out after {RUN_TIMEOUT_S} s: {sliders} sliders, "
                                        f"busy={busy}")
                        break
                    time.sleep(1)
                print(f"ran all cells in {time.time() - t0:.0f} s")

                errors = page.locator(".jp-OutputArea-output[data-mime-type="
                                      "'application/vnd.jupyter.stderr']").all_inner_texts()
                tracebacks = [e for e in errors if "Traceback" in e or "Error" in e]
                if tracebacks:
                    failures.append("a cell printed an error: " + tracebacks[0][:300])
                n_sliders = page.locator(".jupyter-widgets.widget-slider").count()
                n_figures = page.locator(".jp-OutputArea-output img").count()
                widget_out = page.locator(".jupyter-widgets.widget-output img")
                n_widget_figs = widget_out.count()
                print(f"sliders: {n_sliders}, figure images: {n_figures}, "
                      f"figures inside the widget: {n_widget_figs}")
                if n_sliders < 3:
                    failures.append(f"expected the 3 sliders (θ, η, α), found {n_sliders}")
                if n_figures < 5:
                    failures.append(f"expected at least 5 figure images, found {n_figures}")
                if n_widget_figs < 1:
                    failures.append("the widget's output area has no figure")

                # interact: type a new α into its slider readout and wait for the redraw
                if n_widget_figs >= 1:
                    before = widget_out.first.get_attribute("src")
                    readout = page.locator(".jupyter-widgets.widget-slider").nth(2) \
                        .locator(".widget-readout")
                    readout.scroll_into_view_if_needed()
                    readout.click()
                    page.keyboard.press("Control+A")
                    page.keyboard.type("0.05")
                    page.keyboard.press("Enter")
                    t1 = time.time()
                    changed = False
                    while time.time() - t1 < 60:
                        imgs = page.locator(".jupyter-widgets.widget-output img")
                        if imgs.count() >= 1 and imgs.first.get_attribute("src") != before:
                            changed = True
                            break
                        time.sleep(0.5)
                    print(f"slider moved (α = 0.05): figure redrawn = {changed}")
                    if not changed:
                        failures.append("moving the α slider did not redraw the widget's figure")

                # screenshot: sliders at the top, the widget's figure below them
                page.locator(".jupyter-widgets.widget-slider").first.scroll_into_view_if_needed()
                page.mouse.wheel(0, -120)
                time.sleep(1.0)
                shot = OUT / "lesson04.png"
                page.screenshot(path=str(shot))
                print(f"screenshot: {shot.relative_to(ROOT)}")
                browser.close()
        finally:
            lab.terminate()
            try:
                lab.wait(timeout=20)
            except subprocess.TimeoutExpired:
                lab.kill()
            shutil.rmtree(workdir, ignore_errors=True)
    if failures:
        print("BROWSER TEST FAILED:\n  " + "\n  ".join(failures))
        print(f"(JupyterLab log: {log_path.relative_to(ROOT)})")
        return 1
    print("browser test passed: lesson 04 ran in JupyterLab; sliders and figures rendered")
    return 0


if __name__ == "__main__":
    sys.exit(main())
