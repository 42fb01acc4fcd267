"""`make demo`, the README's first command, runs end to end (bounded by DEMO_SECONDS)."""

import os
import subprocess

import pytest

from tests.support.edge import REPO
from tests.support.procs import free_ports

pytestmark = pytest.mark.integration


def test_make_demo_serves_the_printed_urls():
    port, admin = free_ports(2)
    env = {**os.environ, "DEMO_SECONDS": "1", "DEMO_PORT": str(port), "DEMO_ADMIN_PORT": str(admin)}
    out = subprocess.run(["make", "-s", "demo"], cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"http://nginx-80.localhost:{port}/" in out.stdout
    answers = [line for line in out.stdout.splitlines() if line.startswith("  -> ")]
    assert len(answers) == 3 and all("hello from nginx instance" in a for a in answers)
    assert len(set(answers)) >= 2, "round-robin over the demo's instances"
    assert "demo stopped" in out.stdout
