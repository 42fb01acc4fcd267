"""scripts/build_image.py's decisions: what the slimmed base drops, the tags, the layer report,
and one line (never a traceback) when no Docker engine answers."""

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))
import build_image  # noqa: E402

RULES = build_image.dpkg_rules(build_image.DPKG_SLIM.read_text())


@pytest.mark.parametrize("path, dropped", [
    ("/usr/share/doc/apt/changelog.gz", True),
    ("/usr/share/doc/apt/copyright", False),                       # licences stay, as in Debian's -slim
    ("/usr/share/man/man8/apt.8.gz", True),
    ("/usr/share/locale/de/LC_MESSAGES/apt.mo", True),
    ("/usr/share/info/grep.info.gz", True),
    ("/var/cache/apt/pkgcache.bin", True),
    ("/var/cache/apt/srcpkgcache.bin", True),
    ("/var/cache/apt/archives/libc6_2.36-9_amd64.deb", True),
    ("/var/lib/apt/lists/deb.debian.org_debian_dists_bookworm_InRelease", True),
    ("/var/lib/apt/lists/lock", False),
    ("/var/log/dpkg.log", True),
    ("/var/lib/dpkg/status", False),
    ("/var/lib/dpkg/status-old", True),
    ("/usr/bin/apt-get", False),
    ("/usr/share/zoneinfo/UTC", False),
])
def test_what_the_slimmed_base_drops(path, dropped):
    assert build_image.slimmed_away(path, RULES) is dropped


def test_dpkg_rules_keep_their_order_so_the_last_match_wins():
    assert build_image.dpkg_rules("# c\npath-exclude=/a/*\npath-include=/a/b\nother=x\n") == (
        (True, "/a/*"), (False, "/a/b"))


def test_slim_rootfs_deletes_files_keeps_directories_and_leaves_the_rules_for_later_packages(tmp_path):
    for rel in ("usr/share/doc/pkg/changelog.gz", "usr/share/doc/pkg/copyright", "var/cache/apt/pkgcache.bin",
                "usr/bin/tool", "etc/dpkg/dpkg.cfg.d/.keep"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x" * 10)
    assert build_image.slim_rootfs(tmp_path) == 20
    left = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert left == ["etc/dpkg/dpkg.cfg.d/.keep", "etc/dpkg/dpkg.cfg.d/haproxy-consul-slim",
                    "usr/bin/tool", "usr/share/doc/pkg/copyright"]
    assert (tmp_path / "var/cache/apt").is_dir()


def test_tags_are_latest_and_the_version():
    assert build_image.image_tags("haproxy-consul", "0.1.0") == ("haproxy-consul:latest", "haproxy-consul:0.1.0")


def test_layer_report_names_each_step_base_first():
    rows = [(74_000_000, ""), (0, "/bin/sh -c #(nop)  USER haproxy-consul"),
            (121_300_000, "/bin/sh -c apt-get update && apt-get install -y haproxy")]
    assert build_image.layer_report(rows).splitlines() == [
        "     74.0 MB  (base image)", "    121.3 MB  apt-get update && apt-get install -y haproxy"]


def test_no_engine_is_one_line_naming_how_to_start_one(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(build_image, "wheels", lambda: pytest.fail("built wheels with no engine to build in"))
    assert build_image.main(["--docker", f"unix://{tmp_path}/nothing.sock"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"no Docker engine answers at unix://{tmp_path}/nothing.sock" in err and "DOCKER_HOST" in err


def test_the_image_consul_comes_from_debian_another_image_or_a_given_binary(tmp_path):
    directory = tmp_path / "consul"
    assert build_image.consul_source(None, None, None, directory) == {}          # Debian 11's 1.8.7 stage
    assert list(directory.iterdir()) == []                                      # made, empty: COPY needs it
    assert build_image.consul_source("hashicorp/consul:1.20", None, None, directory) == {
        "CONSUL_FROM": "hashicorp/consul:1.20", "CONSUL_PATH": "/bin/consul"}
    binary = tmp_path / "my-consul"
    binary.write_text("#!/bin/sh\necho Consul v9.9.9\n")
    binary.chmod(0o755)
    assert build_image.consul_source(None, None, str(binary), directory) == {
        "CONSUL_FROM": "consul-file", "CONSUL_PATH": "/bin/consul"}
    assert (directory / "consul").read_text() == binary.read_text()
    build_image.consul_source(None, None, None, directory)
    assert list(directory.iterdir()) == []                                      # a later default build drops it
    for bad in (("x:1", None, str(binary)), (None, None, str(tmp_path / "none"))):
        with pytest.raises(ValueError):
            build_image.consul_source(*bad[:2], bad[2], directory)


@pytest.mark.parametrize("wheel, runs", [
    ("msgspec-0.23.0-cp311-cp311-manylinux2014_x86_64.manylinux_2_17_x86_64.whl", False),   # the host's 3.11
    ("msgspec-0.23.0-cp313-cp313-manylinux2014_x86_64.manylinux_2_17_x86_64.whl", True),
    ("cryptography-50.0.2-cp311-abi3-manylinux_2_34_x86_64.whl", True),                    # abi3 from 3.11 on
    ("future-1.0-cp314-abi3-manylinux_2_34_x86_64.whl", False),                           # abi3 from 3.14 on
    ("watchdog-7.1.0-py3-none-manylinux_2_17_x86_64.whl", True),
    ("six-1.17.0-py2.py3-none-any.whl", True),
    ("old-1.0-py2-none-any.whl", False),
    ("cffi-2.1.1-cp313-cp313t-manylinux_2_17_x86_64.whl", False),                          # free-threaded build
])
def test_which_wheels_built_on_the_host_the_images_python_runs(wheel, runs):
    assert build_image.runs_on(wheel, (3, 13)) is runs


def test_manylinux_platforms_are_every_one_the_images_libc_runs():
    tags = build_image.manylinux_platforms("x86_64", (2, 41))
    assert tags[0] == "manylinux_2_41_x86_64" and tags.index("manylinux_2_5_x86_64") == 36
    assert "manylinux_2_4_x86_64" not in tags and tags[-3:] == [
        "manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"]


@pytest.mark.parametrize("deb822, one_line, release, mirror", [
    ("Types: deb\nURIs: http://m.example/debian\nSuites: bookworm bookworm-updates\nComponents: main\n\n"
     "Types: deb\nURIs: http://s.example/debian-security\nSuites: bookworm-security\n", None, "bookworm",
     "http://m.example/debian"),
    ("Types: deb\nURIs: http://s.example/debian-security\nSuites: trixie-security\n\n"
     "Types: deb\nURIs: http://m.example/debian\nSuites: trixie trixie-updates\n", None, "trixie",
     "http://m.example/debian"),
    (None, "deb http://m.example/debian trixie main\n", "trixie", "http://m.example/debian"),    # debootstrap's
    ("Types: deb\nURIs: http://m.example/debian\nSuites: bookworm\n", None, "trixie", None),
])
def test_the_mirror_is_the_one_apt_uses_for_the_machines_own_release(deb822, one_line, release, mirror):
    assert build_image.mirror_in(release, deb822, one_line) == mirror


def test_the_machines_release_is_its_codename(tmp_path):
    (tmp_path / "os-release").write_text('PRETTY_NAME="Debian GNU/Linux 13 (trixie)"\nVERSION_CODENAME=trixie\n')
    assert build_image.machine_release(tmp_path / "os-release") == "trixie"
    assert build_image.DEFAULT_BASE == "debian:trixie-slim" and build_image.IMAGE_PYTHON == (3, 13)
