#!/usr/bin/env python
"""Prove that ``pacsai.viz.view`` renders offline in JupyterLab 4: the headless JupyterLab + Chromium check.

What it does, all on loopback:

1. seeds an embedded store (``file://``) in a temporary folder with one synthetic patient;
2. starts JupyterLab on 127.0.0.1 (token auth, no news or update checks) with ``notebooks/01_explore_pacs``;
3. starts headless Chromium (Debian ``chromium``) whose DNS resolves nothing but 127.0.0.1, drives it through the
   Chrome DevTools protocol: opens the notebook, runs all cells, waits for the kernel;
4. fails unless the notebook opens unmodified (its metadata match the kernel's), every cell ran without error, the
   viewer cell shows the ipyniivue WebGL canvas with its legend (structure colours, dose scale), and the canvas
   shows a rendered volume (enough non-black pixels, and coloured structure/dose pixels);
5. writes a screenshot (default ``docs/viewer.png``) and lists every non-loopback request the page attempted
   (they cannot succeed; the check fails if the viewer needed one).

Usage::

    .venv/bin/python scripts/check_viewer.py [--out docs/viewer.png] [--keep] [--timeout 300]

Exit code 0 on success, 1 with a one-line reason otherwise.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import json
import logging
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "01_explore_pacs.ipynb"
CHROMIUM = "/usr/bin/chromium"
logger = logging.getLogger("check_viewer")


class CheckFailed(Exception):
    """The viewer did not render; the message says what was seen."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, *, timeout: float, what: str) -> bytes:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:  # loopback only
                return response.read()
        except OSError as err:
            last = err
            time.sleep(0.5)
    raise CheckFailed(f"{what} did not answer at {url} within {timeout:.0f} s ({last})")


@contextlib.contextmanager
def process(args: list[str], *, log: Path, env: dict[str, str] | None = None) -> Iterator[subprocess.Popen[bytes]]:
    """Run a child process for the duration of the block; stop it (and only it) afterwards."""
    with log.open("wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=15)


class DevTools:
    """A minimal Chrome DevTools protocol client over one page's websocket."""

    def __init__(self, ws_url: str) -> None:
        import websocket

        self.ws = websocket.create_connection(ws_url, timeout=60, suppress_origin=True)
        self.next_id = 0
        self.events: list[dict[str, Any]] = []

    def send(self, method: str, params: dict[str, Any] | None = None, *, timeout: float = 60) -> dict[str, Any]:
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params or {}}))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            message = json.loads(self.ws.recv())
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise CheckFailed(f"DevTools {method} failed: {message['error']}")
                return message.get("result", {})
            if "method" in message:
                self.events.append(message)
        raise CheckFailed(f"DevTools {method} did not answer within {timeout} s")

    def evaluate(self, expression: str, *, timeout: float = 60) -> Any:
        result = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                "awaitPromise": True}, timeout=timeout)
        if "exceptionDetails" in result:
            raise CheckFailed(f"page script failed: {result['exceptionDetails'].get('text')} in {expression[:80]!r}")
        return result.get("result", {}).get("value")

    def wait_for(self, expression: str, *, timeout: float, what: str, poll: float = 1.0) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(poll)
        raise CheckFailed(f"timed out after {timeout:.0f} s waiting for {what}")

    def close(self) -> None:
        self.ws.close()


# JavaScript run in the page (JupyterLab started with --LabApp.expose_app_in_browser=True). The notebook panel is
# looked up among the main-area widgets and activated: a headless page has no focus, so no "current" widget.
JS_PANEL = "[...window.jupyterapp.shell.widgets('main')].find(w => w.sessionContext && w.content && w.content.model)"
JS_NOTEBOOK_READY = """(() => {
  const app = window.jupyterapp; if (!app) return false;
  const w = PANEL; if (!w) return false;
  app.shell.activateById(w.id);
  const k = w.sessionContext.session && w.sessionContext.session.kernel;
  return !!k && k.status === 'idle' && app.shell.currentWidget === w;
})()""".replace("PANEL", JS_PANEL)
JS_DIRTY = "(() => { const w = PANEL; return w.context.model.dirty; })()".replace("PANEL", JS_PANEL)
JS_LEGEND = """(() => {
  const l = document.querySelector('.jp-OutputArea-output .pacsai-legend');
  return l && l.getBoundingClientRect().height > 0 && l.innerText.includes('Gy') ? l.innerText : null;
})()"""
JS_CELLS = """(() => {
  const w = PANEL; const model = w.content.model;
  const out = [];
  for (let i = 0; i < model.cells.length; i++) {
    const c = model.cells.get(i); if (c.type !== 'code') continue;
    const errors = [];
    for (let j = 0; j < c.outputs.length; j++) {
      const o = c.outputs.get(j).toJSON();
      if (o.output_type === 'error') errors.push(o.ename + ': ' + o.evalue);
    }
    out.push({count: c.executionCount, errors: errors});
  }
  const k = w.sessionContext.session.kernel;
  return {cells: out, kernel: k ? k.status : 'none'};
})()""".replace("PANEL", JS_PANEL)
JS_CANVAS = """(() => {
  const canvases = [...document.querySelectorAll('.jp-OutputArea-output canvas')]
    .filter(c => c.width > 100 && c.height > 100);
  if (!canvases.length) return null;
  const c = canvases[0];
  c.scrollIntoView({block: 'center'});
  const r = c.getBoundingClientRect();
  const gl = c.getContext('webgl2') || c.getContext('webgl');
  return {x: r.x, y: r.y, width: r.width, height: r.height, dpr: window.devicePixelRatio, webgl: !!gl};
})()"""


def seed(work: Path) -> str:
    os.environ["PACSAI_CACHE_DIR"] = str(work / "cache")
    from pacsai.pacs import connect
    from pacsai.synthetic import seed_pacs

    url = f"file://{work / 'pacs'}"
    # A modest grid: big enough for a telling picture, small enough to seed in seconds.
    seed_pacs(connect(url), patients=1, seed=7, shape=(64, 192, 192), spacing=(2.2, 2.2, 2.5), with_prior=False,
              progress=False)
    return url


def analyse(png: bytes, rect: dict[str, float]) -> dict[str, float]:
    """Fractions of the canvas region that are not background and that are coloured (overlays)."""
    import matplotlib.image as mpimg
    import numpy as np

    pixels = mpimg.imread(io.BytesIO(png))[..., :3]
    dpr = float(rect.get("dpr") or 1.0)
    x0, y0 = int(rect["x"] * dpr), int(rect["y"] * dpr)
    x1, y1 = int((rect["x"] + rect["width"]) * dpr), int((rect["y"] + rect["height"]) * dpr)
    region = pixels[max(y0, 0):y1, max(x0, 0):x1]
    if region.size == 0:
        raise CheckFailed(f"the viewer canvas lies outside the screenshot ({rect})")
    bright = region.max(axis=-1) > 0.15
    coloured = (region.max(axis=-1) - region.min(axis=-1)) > 0.25
    grey_levels = len(np.unique(np.round(region[bright & ~coloured].mean(axis=-1) * 50))) if bright.any() else 0
    return {"content": float(bright.mean()), "coloured": float(coloured.mean()), "grey_levels": float(grey_levels)}


def run(out: Path, *, timeout: float, keep: bool) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="pacsai-viewer-"))
    try:
        t0 = time.monotonic()
        url = seed(work)
        logger.info("seeded %s in %.0f s", url, time.monotonic() - t0)
        for suffix in (".ipynb", ".py"):
            shutil.copy(NOTEBOOK.with_suffix(suffix), work / NOTEBOOK.with_suffix(suffix).name)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("JUPYTER", "PACSAI_VIEWER"))}
        env.update(
            PACSAI_PACS_URL=url,
            PACSAI_CACHE_DIR=str(work / "cache"),
            JUPYTER_CONFIG_DIR=str(work / "jupyter-config"),
            JUPYTER_RUNTIME_DIR=str(work / "jupyter-runtime"),
            JUPYTERLAB_WORKSPACES_DIR=str(work / "workspaces"),
            JUPYTERLAB_SETTINGS_DIR=str(work / "lab-settings"),
            MLFLOW_ENABLE_TELEMETRY="false",
            DO_NOT_TRACK="1",
        )
        # No "get notified about Jupyter news?" prompt over the notebook (and no news fetch).
        news = work / "lab-settings" / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
        news.parent.mkdir(parents=True)
        news.write_text(json.dumps({"fetchNews": "false"}))
        lab_port, cdp_port, token = free_port(), free_port(), secrets.token_hex(16)
        lab = [
            sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ServerApp.ip=127.0.0.1",
            f"--ServerApp.port={lab_port}", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={work}",
            "--LabApp.expose_app_in_browser=True", "--LabApp.news_url=None",
            "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate", "--LabApp.extension_manager=readonly",
        ]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            lab.append("--allow-root")  # containers run as root; JupyterLab refuses that otherwise
        chromium = [
            CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run", "--no-default-browser-check",
            f"--user-data-dir={work / 'chromium'}", f"--remote-debugging-port={cdp_port}",
            "--remote-debugging-address=127.0.0.1", "--window-size=1500,1100", "--hide-scrollbars",
            # WebGL without a GPU: SwiftShader (software).
            "--use-angle=swiftshader", "--enable-unsafe-swiftshader",
            # Offline: no name resolves except loopback, no proxy.
            "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1", "--no-proxy-server",
            "about:blank",
        ]
        with process(lab, log=work / "jupyterlab.log", env=env), \
                process(chromium, log=work / "chromium.log"):
            wait_http(f"http://127.0.0.1:{lab_port}/api/status?token={token}", timeout=90, what="JupyterLab")
            targets = json.loads(wait_http(f"http://127.0.0.1:{cdp_port}/json/list", timeout=60, what="Chromium"))
            page = next(t for t in targets if t.get("type") == "page")
            cdp = DevTools(page["webSocketDebuggerUrl"])
            try:
                return drive(cdp, lab_port=lab_port, token=token, out=out, timeout=timeout, started=t0)
            except CheckFailed:
                failed = out.with_name(out.stem + ".failed.png")
                with contextlib.suppress(Exception):
                    failed.write_bytes(base64.b64decode(cdp.send("Page.captureScreenshot", {"format": "png"})["data"]))
                    logger.info("screenshot of the failure: %s; page at %s", failed, cdp.evaluate("location.href"))
                raise
            finally:
                cdp.close()
    finally:
        if keep:
            logger.info("kept %s", work)
        else:
            shutil.rmtree(work, ignore_errors=True)


def drive(cdp: DevTools, *, lab_port: int, token: str, out: Path, timeout: float, started: float) -> dict[str, Any]:
    for domain in ("Page", "Runtime", "Network"):
        cdp.send(f"{domain}.enable")
    cdp.send("Emulation.setFocusEmulationEnabled", {"enabled": True})
    cdp.send("Page.navigate", {"url": f"http://127.0.0.1:{lab_port}/lab/tree/01_explore_pacs.ipynb?reset&token={token}"})
    cdp.wait_for(JS_NOTEBOOK_READY, timeout=120, what="JupyterLab to open the notebook with an idle pacsai kernel")
    time.sleep(2.0)  # the kernel's info has arrived (idle): Lab has rewritten whatever metadata it would
    if cdp.evaluate(JS_DIRTY):
        raise CheckFailed("JupyterLab marks the committed notebook modified on opening (its kernelspec or "
                          "language_info differ from the pacsai kernel's); re-save it from Lab and commit it")
    cdp.evaluate("window.jupyterapp.shell.leftCollapsed || window.jupyterapp.commands.execute("
                 "'application:toggle-left-area')")
    t_run = time.monotonic()
    cdp.evaluate("window.jupyterapp.commands.execute('notebook:run-all-cells').then(() => true)")
    deadline = time.monotonic() + timeout
    state: dict[str, Any] = {}
    while time.monotonic() < deadline:
        state = cdp.evaluate(JS_CELLS)
        errors = [e for c in state["cells"] for e in c["errors"]]
        if errors:
            raise CheckFailed(f"the notebook failed in JupyterLab: {errors[0]}")
        if state["kernel"] == "idle" and all(c["count"] for c in state["cells"]):
            break
        time.sleep(1.0)
    else:
        raise CheckFailed(f"the notebook did not finish within {timeout:.0f} s: {state}")
    run_s = time.monotonic() - t_run
    rect = cdp.wait_for(JS_CANVAS, timeout=60, what="the ipyniivue canvas in the viewer output")
    if not rect.get("webgl"):
        raise CheckFailed("the viewer canvas has no WebGL context")
    legend = cdp.wait_for(JS_LEGEND, timeout=30, what="the viewer's legend (structure colours and dose scale)")
    # Let niivue finish loading the NIfTI layers and draw (software WebGL is slow), then measure the picture.
    metrics: dict[str, float] = {}
    for _ in range(20):
        time.sleep(2.0)
        rect = cdp.evaluate(JS_CANVAS)
        shot = base64.b64decode(cdp.send("Page.captureScreenshot", {"format": "png"})["data"])
        metrics = analyse(shot, rect)
        if metrics["content"] > 0.05 and metrics["coloured"] > 0.002 and metrics["grey_levels"] >= 10:
            break
    else:
        raise CheckFailed(f"the viewer canvas stayed (nearly) empty: {metrics}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(shot)
    outside = sorted({
        e["params"]["request"]["url"] for e in cdp.events
        if e.get("method") == "Network.requestWillBeSent"
        and not e["params"]["request"]["url"].startswith(
            (f"http://127.0.0.1:{lab_port}", f"ws://127.0.0.1:{lab_port}", "data:", "blob:", "about:"))
    })
    return {"screenshot": str(out), "run_all_s": round(run_s, 1), "total_s": round(time.monotonic() - started, 1),
            "canvas_px": [rect["width"], rect["height"]], **{k: round(v, 4) for k, v in metrics.items()},
            "legend": " ".join(str(legend).split()), "opened_unmodified": True,
            "non_loopback_requests": outside}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "viewer.png", help="screenshot path")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds for the notebook to run")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (logs, store)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logger.setLevel(logging.INFO)
    if not Path(CHROMIUM).is_file():
        print(f"check_viewer: {CHROMIUM} not found; install Debian's chromium (apt-get install -y chromium)")
        return 1
    try:
        result = run(args.out, timeout=args.timeout, keep=args.keep)
    except CheckFailed as err:
        print(f"check_viewer: FAILED: {err}")
        return 1
    print(json.dumps(result, indent=2))
    if result["non_loopback_requests"]:
        print("check_viewer: note: the page attempted non-loopback requests (all blocked); the viewer rendered "
              "without them")
    print("check_viewer: OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
