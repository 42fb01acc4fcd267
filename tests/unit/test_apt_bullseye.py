"""scripts/apt-bullseye.sh finds the machine's own mirror on Debian 12 and 13 (deb822) and in a
debootstrap rootfs (one-line sources.list), by the release's VERSION_CODENAME, and adds bullseye
pinned low. Run against a fake root (APT_ROOT)."""

import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "apt-bullseye.sh"
DEB822 = """Types: deb
URIs: http://mirror.test/debian-security
Suites: {rel}-security
Components: main

Types: deb
URIs: http://mirror.test/debian
Suites: {rel} {rel}-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
"""


def run(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT)], env={"APT_ROOT": str(root), "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True)


@pytest.mark.parametrize("release, layout", [("bookworm", "deb822"), ("trixie", "deb822"),
                                             ("trixie", "sources.list")])
def test_the_mirror_of_the_machines_own_release(tmp_path, release, layout):
    (tmp_path / "etc/apt/sources.list.d").mkdir(parents=True)
    (tmp_path / "etc/os-release").write_text(f'PRETTY_NAME="Debian"\nVERSION_CODENAME={release}\n')
    if layout == "deb822":
        (tmp_path / "etc/apt/sources.list.d/debian.sources").write_text(DEB822.format(rel=release))
    else:
        (tmp_path / "etc/apt/sources.list").write_text(f"deb http://mirror.test/debian {release} main\n")
    out = run(tmp_path)
    assert out.returncode == 0, out.stderr
    added = (tmp_path / "etc/apt/sources.list.d/haproxy-consul-bullseye.sources").read_text()
    assert "URIs: http://mirror.test/debian\n" in added and "Suites: bullseye\n" in added
    assert "Pin-Priority: 100" in (tmp_path / "etc/apt/preferences.d/haproxy-consul-bullseye").read_text()
    assert run(tmp_path).returncode == 0                                     # idempotent


def test_another_release_mirror_is_not_taken_for_this_one(tmp_path):
    (tmp_path / "etc/apt/sources.list.d").mkdir(parents=True)
    (tmp_path / "etc/os-release").write_text("VERSION_CODENAME=trixie\n")
    (tmp_path / "etc/apt/sources.list.d/debian.sources").write_text(DEB822.format(rel="bookworm"))
    out = run(tmp_path)
    assert out.returncode == 1 and "cannot find the trixie mirror" in out.stderr
