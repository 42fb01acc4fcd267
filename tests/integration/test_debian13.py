"""The README's `make demo` on a fresh Debian 13 "trixie" machine (issue 19 item 5).

The machine is a minimal trixie root filesystem (`debootstrap --variant=minbase`: no make, no
Python), built once per machine by `make test` (scripts/debian-rootfs.sh) and never written to:
each run gets a new overlay on it (tests/support/debian_chroot.py) with this checkout's files in
/root/haproxy-consul, and runs there, as root, the README's "Two commands" block verbatim: its
first line (make), `bash scripts/install-deps.sh` on its own (timed), then `make demo`. So
trixie's own HAProxy 3.0 and Python 3.13, Consul 1.8.7 from bullseye (the pinned apt source next
to trixie's) and the package's dependencies on 3.13 are what the demo runs on. apt and pip reach
the host's mirror and index; everything the demo serves is on loopback.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest

from tests.support.debian_chroot import fresh_machine, pip_local_paths
from tests.support.edge import REPO
from tests.support.procs import free_ports

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]
CACHE = Path(os.environ.get("HAPROXY_CONSUL_CACHE", "/var/cache/haproxy-consul"))
ROOTFS = CACHE / "rootfs" / "debian13-ci"


@pytest.fixture(scope="module")
def trixie():
    if os.geteuid() != 0:
        pytest.fail("the Debian 13 install test chroots and mounts: run it as root (CI does)")
    stamp = ROOTFS / ".debian-rootfs"
    if not stamp.exists() or not stamp.read_text().startswith("suite=trixie "):
        pytest.fail(f"no Debian 13 rootfs at {ROOTFS}: `make test` builds it "
                    f"(bash scripts/debian-rootfs.sh trixie {ROOTFS} make)")
    with fresh_machine(ROOTFS, REPO, CACHE / "debian13-downloads") as machine:
        yield machine


def readme_block() -> list[str]:
    """The commands of the README's "Two commands" block, comments dropped."""
    section = (REPO / "README.md").read_text().split("## Two commands", 1)[1]
    block = section.split("```\n", 2)[1]
    return [line.split("#", 1)[0].strip() for line in block.splitlines() if line.split("#", 1)[0].strip()]


@pytest.fixture(scope="module")
def installed(trixie):
    first, *rest = readme_block()
    assert rest[:2] == ["make demo", "make test"], rest
    fresh = trixie.run("command -v make python3 || echo none", timeout=60)
    assert fresh.stdout.strip() == "none", "the rootfs is not a fresh Debian: " + fresh.stdout
    t0 = time.monotonic()
    out = trixie.run(f"{first} && bash scripts/install-deps.sh", timeout=600)
    elapsed = time.monotonic() - t0
    print(out.stdout[-5000:], out.stderr[-10000:], f"{first} and install-deps.sh on trixie took {elapsed:.0f}s")
    return out


def test_install_deps_installs_everything_on_trixie(trixie, installed):
    assert installed.returncode == 0, installed.stdout[-3000:] + installed.stderr[-6000:]
    # Trixie's own HAProxy 3.0 and Python 3.13; Consul 1.8.7 from the pinned bullseye source.
    out = trixie.run("haproxy -v | head -1; python3 --version; consul version | head -1; etcd --version | head -1; "
                     "bash scripts/install-deps.sh && echo again-ok; "
                     "apt-get -s dist-upgrade | grep '^Inst.*bullseye' || echo none-from-bullseye",
                     timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert re.search(r"HAProxy version 3\.0\.", out.stdout), out.stdout
    assert "Python 3.13." in out.stdout and "Consul v1.8.7" in out.stdout, out.stdout
    assert re.search(r"etcd Version: 3\.5\.", out.stdout), out.stdout
    assert "again-ok" in out.stdout, "a second install-deps.sh run finds nothing missing"
    # The pinned bullseye source serves only what is asked for by name: trixie's apt stays trixie's.
    assert "none-from-bullseye" in out.stdout and "Inst " not in out.stdout, out.stdout


def test_make_demo_serves_the_printed_urls_on_trixie(trixie, installed):
    assert installed.returncode == 0, "install-deps.sh failed: see the test above"
    port, https, admin = free_ports(3)
    env = {"DEMO_SECONDS": "1", "DEMO_PORT": str(port), "DEMO_ADMIN_PORT": str(admin), "DEMO_HTTPS_PORT": str(https)}
    t0 = time.monotonic()
    demo = readme_block()[1]
    out = trixie.run(demo, timeout=600, env=env)
    print(out.stdout[-5000:], out.stderr[-5000:], f"make demo on trixie took {time.monotonic() - t0:.0f}s")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-6000:]
    # What test_demo.py asks of it on the host (Debian 12).
    assert f"http://nginx-80.localhost:{port}/" in out.stdout
    answers = [line for line in out.stdout.splitlines() if line.startswith("  -> hello")]
    assert len(answers) == 3 and all("hello from nginx instance" in a for a in answers), out.stdout
    assert len(set(answers)) >= 2, "round-robin over the demo's instances"
    assert f"curl -s --cacert state/demo/ca.pem https://nginx-80.localhost:{https}/" in out.stdout
    https_answers = [line for line in out.stdout.splitlines() if line.startswith("  -> https:")]
    assert len(https_answers) == 1 and "hello from nginx instance" in https_answers[0], out.stdout
    assert "demo stopped" in out.stdout


@pytest.mark.parametrize(("lines", "paths"), [
    (["global.find-links='/opt/wheels'", ":env:.cert='/etc/ssl/certs/ca.crt'"],
     ["/opt/wheels", "/etc/ssl/certs/ca.crt"]),
    (["global.extra-index-url='file:///opt/a/simple file:///opt/b/simple'"], ["/opt/a", "/opt/b"]),
    (["global.index-url='https://pypi.example/simple'", "global.timeout='60'"], []),
    (["global.constraint='/etc/xdg/pip/c.txt'", "user.constraint='/etc/xdg/pip/c.txt'"], ["/etc/xdg/pip/c.txt"]),
])
def test_the_machine_gets_the_local_paths_pip_is_configured_with(lines, paths):
    assert pip_local_paths(lines) == paths
