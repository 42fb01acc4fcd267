"""`make demo`, the README's first command, runs end to end (bounded by DEMO_SECONDS)."""

import os
import subprocess

import pytest

from tests.support.edge import REPO
from tests.support.procs import free_ports

pytestmark = pytest.mark.integration


def test_make_demo_serves_the_printed_urls():
    port, https, admin = free_ports(3)
    env = {**os.environ, "DEMO_SECONDS": "1", "DEMO_PORT": str(port), "DEMO_ADMIN_PORT": str(admin),
           "DEMO_HTTPS_PORT": str(https)}
    out = subprocess.run(["make", "-s", "demo"], cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"http://nginx-80.localhost:{port}/" in out.stdout
    answers = [line for line in out.stdout.splitlines() if line.startswith("  -> hello")]
    assert len(answers) == 3 and all("hello from nginx instance" in a for a in answers)
    assert len(set(answers)) >= 2, "round-robin over the demo's instances"
    # The printed HTTPS curl line, run by the demo itself, is verified against the demo's CA.
    assert f"curl -s --cacert state/demo/ca.pem https://nginx-80.localhost:{https}/" in out.stdout
    https_answers = [line for line in out.stdout.splitlines() if line.startswith("  -> https:")]
    assert len(https_answers) == 1 and "hello from nginx instance" in https_answers[0], out.stdout
    assert "demo stopped" in out.stdout
