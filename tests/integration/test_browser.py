"""What a user sees, in a real headless Chromium: the 404 landing page lists every vhost as a
working link with its healthy count, a link leads to the service, and the stats page renders.
Screenshots land in docs/img/ when UPDATE_SCREENSHOTS=1 (for the README)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.integration.edge_helpers import answers, register
from tests.support.edge import REPO, EdgeProcess
from tests.support.http import Backend

pytestmark = pytest.mark.integration
IMG = REPO / "docs" / "img"


def chromium(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> str:
    binary = shutil.which("chromium")
    if binary is None:
        raise RuntimeError("chromium is not installed: run `make deps`")
    # Flags: no sandbox as root, and none of the background calls a closed network refuses.
    out = subprocess.run([binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                          "--disable-background-networking", "--disable-component-update", "--disable-sync",
                          f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1100,700", *args],
                         capture_output=True, text=True, timeout=60, env=env)
    return out.stdout


@pytest.fixture
def edge_with_routes(consul):
    backends = [Backend(f"nginx instance {i}") for i in range(2)] + [Backend("whoami")]
    register(consul, "nginx", "nginx-1", backends[0])
    register(consul, "nginx", "nginx-2", backends[1])
    register(consul, "whoami", "whoami-1", backends[2], cport=8080)
    edge = EdgeProcess(consul.url, domains=("localhost",)).start()
    answers(edge, "whoami-8080.localhost", {"whoami"})
    answers(edge, "nginx-80.localhost", {"nginx instance 0", "nginx instance 1"})
    yield edge
    edge.stop()
    for b in backends:
        b.close()


def test_landing_page_links_and_stats_page_in_chromium(edge_with_routes, tmp_path):
    edge = edge_with_routes
    landing = f"http://nothing.localhost:{edge.port}/"       # *.localhost is loopback for Chromium
    dom = chromium(tmp_path, "--dump-dom", landing)
    links = dict(re.findall(r'<a href="([^"]+)">[^<]+</a></td><td class="healthy" data-route="[^"]+">(\d+)<', dom))
    assert links == {f"http://nginx-80.localhost:{edge.port}/": "2", f"http://whoami-8080.localhost:{edge.port}/": "1"}
    for url in links:                                         # each link works in the browser
        body = chromium(tmp_path, "--dump-dom", url)
        assert ("whoami" in body) if "whoami" in url else ("nginx instance" in body), body
    stats = chromium(tmp_path, "--dump-dom", f"http://127.0.0.1:{edge.admin_port}/")
    assert "be_nginx-80" in stats and "be_whoami-8080" in stats
    shots = IMG if os.environ.get("UPDATE_SCREENSHOTS") else tmp_path
    chromium(tmp_path, f"--screenshot={shots / 'landing.png'}", landing)
    chromium(tmp_path, f"--screenshot={shots / 'stats.png'}", "--window-size=1400,900",
             f"http://127.0.0.1:{edge.admin_port}/")
    for shot in ("landing.png", "stats.png"):
        assert (shots / shot).stat().st_size > 10_000, f"{shot} looks empty"
