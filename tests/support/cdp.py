"""Headless Chromium driven over its DevTools protocol, for pages that render after their own
requests: open a URL, wait until a JavaScript condition holds, then read the DOM and take a
screenshot. (`chromium --screenshot` shoots at the load event, before a single-page app such as
Consul's UI has drawn anything, and `--virtual-time-budget` never ends while the app holds a
long-poll open.)"""

from __future__ import annotations

import base64
import itertools
import json
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

from websockets.sync.client import connect

from tests.support.procs import free_ports, wait_until


def render_page(url: str, ready: str, workdir: Path, screenshot: Path | None = None, timeout: float = 30.0,
                size: tuple[int, int] = (1200, 700)) -> str:
    """Load `url`, wait until the JS expression `ready` is true, save a PNG to `screenshot`;
    return the DOM as HTML."""
    binary = shutil.which("chromium")
    if binary is None:
        raise RuntimeError("chromium is not installed: run `make deps`")
    port = free_ports(1)[0]
    proc = subprocess.Popen([binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                             "--disable-background-networking", "--disable-component-update", "--disable-sync",
                             f"--remote-debugging-port={port}", "--remote-allow-origins=*",
                             f"--user-data-dir={workdir / 'cdp-profile'}", f"--window-size={size[0]},{size[1]}",
                             "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        def page_socket() -> str | None:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=2) as r:
                pages = [t for t in json.loads(r.read()) if t.get("type") == "page"]
            return pages[0]["webSocketDebuggerUrl"] if pages else None
        ws_url = wait_until(page_socket, 20, interval=0.2, what="Chromium's DevTools endpoint")
        with connect(ws_url, max_size=None, open_timeout=10) as ws:
            ids = itertools.count(1)

            def call(method: str, **params) -> dict:
                n = next(ids)
                ws.send(json.dumps({"id": n, "method": method, "params": params}))
                while True:
                    msg = json.loads(ws.recv(timeout=20))
                    if msg.get("id") == n:
                        if "error" in msg:
                            raise RuntimeError(f"{method}: {msg['error']}")
                        return msg["result"]

            def evaluate(expression: str):
                return call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

            call("Page.navigate", url=url)
            deadline = time.monotonic() + timeout
            while not evaluate(f"Boolean({ready})"):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{url}: {ready} never held; page: {evaluate('document.body.innerText')!r:.500}")
                time.sleep(0.2)
            time.sleep(0.5)                                     # let the last frame paint
            if screenshot is not None:
                shot = call("Page.captureScreenshot", format="png")["data"]
                screenshot.write_bytes(base64.b64decode(shot))
            return evaluate("document.documentElement.outerHTML")
    finally:
        proc.kill()
        proc.wait(10)
