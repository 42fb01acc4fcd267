"""Build the haproxy-consul image, offline-friendly (`make image`).

1. The Docker engine named by DOCKER_HOST (default /var/run/docker.sock) must answer; if none
   does, one line says how to start one and nothing else happens.
2. Wheels are built on the host: every dependency into build/image/deps (kept until
   pyproject.toml changes), the package into build/image/app (a code change then rebuilds only
   the image's last layers). The image's Python (3.13, Debian 13's) may not be the host's: a
   wheel built for the host's alone (compiled, e.g. msgspec's cp311) is replaced by the same
   release's wheel for the image's Python, fetched with `pip download --python-version`.
3. The base is Debian 13 "trixie" (HAProxy 3.0 LTS, Python 3.13): `--base IMAGE` when given; by
   default debian:trixie-slim if the engine has it or can pull it, otherwise (no registry
   answers) a `debootstrap --variant=minbase trixie` rootfs from this machine's own Debian
   mirror, slimmed like Debian's -slim images (no apt lists or caches, no docs, manuals or
   translations) and imported once per engine.
4. `docker build` (classic builder) through the Docker SDK, tagged `<repository>:latest` and
   `<repository>:<version>`; then the size of every layer.
5. The consul binary bootstrap runs: Debian 11's Consul 1.8.7 package by default; `--consul-from
   IMAGE` copies /bin/consul (`--consul-path`) out of another image, e.g. the official
   hashicorp/consul:<version> where a registry answers; `--consul-binary FILE` puts a binary of
   your own (e.g. from Consul's release zip) in build/image/consul/ and uses that.

Usage: python scripts/build_image.py [--docker URL] [--repository haproxy-consul] [--base IMAGE | --debootstrap]
       [--consul-from IMAGE [--consul-path PATH] | --consul-binary FILE]
"""

from __future__ import annotations

import argparse
import collections
import fnmatch
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import docker

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from haproxy_consul import __version__  # noqa: E402 - the version the image is tagged with

BUILD = REPO / "build" / "image"
SUITE = "trixie"                   # Debian 13: HAProxy 3.0 LTS
IMAGE_PYTHON = (3, 13)             # trixie's python3, which the image's venv runs
IMAGE_GLIBC = (2, 41)              # trixie's libc: the newest manylinux wheel it runs
DEFAULT_BASE = f"debian:{SUITE}-slim"
DEBOOTSTRAP_TAG = f"haproxy-consul-base:{SUITE}-slimmed"
DPKG_SLIM = REPO / "scripts" / "dpkg-slim.cfg"
# Beyond what dpkg-slim.cfg leaves out: what apt and debootstrap keep that a container never needs.
ROOTFS_JUNK = ("/var/cache/apt/*.bin", "/var/cache/apt/archives/*.deb", "/var/lib/apt/lists/*_*",
               "/var/log/*.log", "/var/log/apt/*", "/var/cache/debconf/*-old", "/var/lib/dpkg/*-old")


class NoEngine(Exception):
    """No Docker engine answers at the given address."""


def no_engine_line(url: str) -> str:
    return (f"build_image: no Docker engine answers at {url}: start one (`sudo systemctl start docker`, "
            "or `sudo dockerd &`) or set DOCKER_HOST to a running engine's socket (unix:///path/docker.sock)")


def image_tags(repository: str, version: str) -> tuple[str, ...]:
    return (f"{repository}:latest", f"{repository}:{version}")


def dpkg_rules(text: str) -> tuple[tuple[bool, str], ...]:
    """`path-exclude=`/`path-include=` lines → (excluded?, glob) in order; the last match wins, as in dpkg."""
    rules = []
    for line in text.splitlines():
        key, _, glob = line.strip().partition("=")
        if key in ("path-exclude", "path-include") and glob:
            rules.append((key == "path-exclude", glob))
    return tuple(rules)


def slimmed_away(path: str, rules: Sequence[tuple[bool, str]], junk: Iterable[str] = ROOTFS_JUNK) -> bool:
    """Is the rootfs file at `path` (absolute inside the rootfs) dropped from the base?"""
    if any(fnmatch.fnmatchcase(path, glob) for glob in junk):
        return True
    verdict = False
    for exclude, glob in rules:
        if fnmatch.fnmatchcase(path, glob):
            verdict = exclude
    return verdict


def slim_rootfs(rootfs: Path) -> int:
    """Delete from a debootstrapped rootfs what a container never needs; bytes freed. Directories stay."""
    rules = dpkg_rules(DPKG_SLIM.read_text())
    freed = 0
    for directory, _dirs, files in os.walk(rootfs):
        for name in files:
            full = Path(directory) / name
            if slimmed_away("/" + str(full.relative_to(rootfs)), rules):
                freed += full.lstat().st_size
                full.unlink()
    # Packages installed later in the image obey the same rules.
    (rootfs / "etc/dpkg/dpkg.cfg.d/haproxy-consul-slim").write_text(DPKG_SLIM.read_text())
    return freed


def machine_release(os_release: Path = Path("/etc/os-release")) -> str:
    """This machine's Debian codename (bookworm, trixie, ...)."""
    for line in os_release.read_text().splitlines():
        if line.startswith("VERSION_CODENAME="):
            return line.split("=", 1)[1].strip().strip('"')
    raise SystemExit(f"build_image: {os_release} names no VERSION_CODENAME")


def mirror_in(release: str, deb822: str | None, one_line: str | None) -> str | None:
    """The mirror of `release` in apt sources (deb822 `debian.sources`, or one-line `sources.list`)."""
    for stanza in (deb822 or "").split("\n\n"):
        lines = [line for line in stanza.splitlines() if ":" in line and not line.startswith("#")]
        fields = dict(line.split(":", 1) for line in lines)
        if release in fields.get("Suites", "").split() and fields.get("URIs", "").strip():
            return fields["URIs"].split()[0].strip()
    for line in (one_line or "").splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[0] == "deb" and parts[2] == release:
            return parts[1]
    return None


def debian_mirror() -> str:
    """The mirror this machine's apt uses for its own release; it carries trixie too."""
    deb822, one_line = Path("/etc/apt/sources.list.d/debian.sources"), Path("/etc/apt/sources.list")
    mirror = mirror_in(machine_release(), deb822.read_text() if deb822.exists() else None,
                       one_line.read_text() if one_line.exists() else None)
    if mirror is None:
        raise SystemExit("build_image: cannot find this machine's Debian mirror in its apt sources")
    return mirror


def connect(url: str) -> docker.DockerClient:
    try:
        client = docker.DockerClient(base_url=url, timeout=600)
        client.ping()
        return client
    except docker.errors.DockerException as exc:
        raise NoEngine(url) from exc


def runs_on(wheel: str, python: tuple[int, int] = IMAGE_PYTHON) -> bool:
    """Does the wheel file `wheel` install on CPython `python` (pure, abi3 up to it, or built for it)?"""
    *_, py_tags, abi_tags, _platform = wheel.removesuffix(".whl").split("-")
    own = f"cp{python[0]}{python[1]}"
    for py in py_tags.split("."):
        for abi in abi_tags.split("."):
            if abi == "none" and (py in ("py3", f"py{python[0]}{python[1]}", own)):
                return True
            if abi == "abi3" and py.startswith("cp3") and int(py[3:]) <= python[1]:
                return True
            if abi == own and py == own:
                return True
    return False


def manylinux_platforms(arch: str, glibc: tuple[int, int] = IMAGE_GLIBC) -> list[str]:
    """Every manylinux platform tag a glibc `glibc` on `arch` runs, newest first (legacy aliases too)."""
    tags = [f"manylinux_2_{minor}_{arch}" for minor in range(glibc[1], 4, -1)]
    return tags + [f"manylinux2014_{arch}", f"manylinux2010_{arch}", f"manylinux1_{arch}"]


def retarget_wheels(directory: Path, python: tuple[int, int] = IMAGE_PYTHON) -> list[str]:
    """Replace each wheel in `directory` that only the host's Python runs by the same release for `python`."""
    replaced = []
    for wheel in sorted(directory.glob("*.whl")):
        if runs_on(wheel.name, python):
            continue
        name, version = wheel.name.split("-")[:2]
        platforms = [arg for tag in manylinux_platforms(os.uname().machine) for arg in ("--platform", tag)]
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                        "--python-version", f"{python[0]}.{python[1]}", "--implementation", "cp",
                        *platforms, "-d", str(directory), f"{name}=={version}"], check=True)
        wheel.unlink()
        replaced.append(wheel.name)
    return replaced


def wheels() -> None:
    """Dependency wheels for the image's Python into build/image/deps (again only when pyproject.toml
    or that Python changed), the package into app."""
    stamp = BUILD / "deps" / ".pyproject-sha256"
    wanted = hashlib.sha256((REPO / "pyproject.toml").read_bytes()).hexdigest() + f" python{IMAGE_PYTHON}"
    if not stamp.exists() or stamp.read_text() != wanted:
        shutil.rmtree(BUILD / "deps", ignore_errors=True)
        subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "-w", str(BUILD / "deps"), str(REPO)], check=True)
        for own in (BUILD / "deps").glob("haproxy_consul-*.whl"):
            own.unlink()
        replaced = retarget_wheels(BUILD / "deps")
        if replaced:
            print(f"wheels for Python {IMAGE_PYTHON[0]}.{IMAGE_PYTHON[1]} instead of {', '.join(replaced)}", flush=True)
        stamp.write_text(wanted)
    shutil.rmtree(BUILD / "app", ignore_errors=True)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(BUILD / "app"), str(REPO)],
                   check=True)


def has_image(client: docker.DockerClient, name: str) -> bool:
    try:
        client.images.get(name)
        return True
    except docker.errors.ImageNotFound:
        return False


def debootstrap_base(client: docker.DockerClient, cache: Path) -> str:
    if has_image(client, DEBOOTSTRAP_TAG):
        return DEBOOTSTRAP_TAG
    rootfs, tarball = cache / f"rootfs-{SUITE}", cache / f"rootfs-{SUITE}-slim.tar"
    if not tarball.exists():
        mirror = debian_mirror()
        print(f"debootstrap --variant=minbase {SUITE} from {mirror} (once; kept in {tarball})", flush=True)
        shutil.rmtree(rootfs, ignore_errors=True)
        subprocess.run(["debootstrap", "--variant=minbase", SUITE, str(rootfs), mirror], check=True,
                       stdout=subprocess.DEVNULL)
        print(f"slimmed the rootfs by {slim_rootfs(rootfs) / 1e6:.0f} MB (apt lists and caches, docs, locales)")
        with tarfile.open(f"{tarball}.part", "w") as tar:
            tar.add(str(rootfs), arcname=".")
        os.replace(f"{tarball}.part", tarball)
        shutil.rmtree(rootfs, ignore_errors=True)
    repo, tag = DEBOOTSTRAP_TAG.split(":")
    client.api.import_image(src=str(tarball), repository=repo, tag=tag)
    return DEBOOTSTRAP_TAG


def choose_base(client: docker.DockerClient, base: str | None, use_debootstrap: bool, cache: Path) -> str:
    """An explicit --base or --debootstrap wins; else debian:trixie-slim if present or pullable, else debootstrap."""
    if base:
        return base
    if not use_debootstrap:
        if has_image(client, DEFAULT_BASE) or has_image(client, DEBOOTSTRAP_TAG):
            return DEFAULT_BASE if has_image(client, DEFAULT_BASE) else DEBOOTSTRAP_TAG
        try:
            client.images.pull(DEFAULT_BASE)
            return DEFAULT_BASE
        except docker.errors.APIError as exc:
            reason = str(getattr(exc, "explanation", None) or exc).splitlines()[0][:160]
            print(f"cannot pull {DEFAULT_BASE} ({reason}); building the base with debootstrap instead", flush=True)
    cache.mkdir(parents=True, exist_ok=True)
    return debootstrap_base(client, cache)


def consul_source(consul_from: str | None, consul_path: str | None, consul_binary: str | None,
                  directory: Path = BUILD / "consul") -> dict[str, str]:
    """The build arguments that pick the image's consul, with build/image/consul/ made to match
    (the Dockerfile's consul-file stage copies it whatever is chosen, so it always exists)."""
    if consul_from and consul_binary:
        raise ValueError("--consul-from and --consul-binary are two sources: give one")
    directory.mkdir(parents=True, exist_ok=True)
    for old in directory.iterdir():
        old.unlink()
    if consul_binary:
        source = Path(consul_binary)
        if not source.is_file() or not os.access(source, os.X_OK):
            raise ValueError(f"--consul-binary {consul_binary}: not an executable file")
        shutil.copy2(source, directory / "consul")
        return {"CONSUL_FROM": "consul-file", "CONSUL_PATH": "/bin/consul"}
    if consul_from:
        return {"CONSUL_FROM": consul_from, "CONSUL_PATH": consul_path or "/bin/consul"}
    return {}


def build(client: docker.DockerClient, tags: Sequence[str], base: str, consul: dict[str, str]) -> None:
    recent: collections.deque[str] = collections.deque(maxlen=40)   # the failing step's output, if one fails
    for chunk in client.api.build(path=str(REPO), tag=tags[0],
                                  buildargs={"BASE": base, "VERSION": __version__, **consul},
                                  rm=True, forcerm=True, decode=True):
        if "error" in chunk:
            raise SystemExit("".join(recent) + f"docker build failed: {chunk['error']}")
        stream = chunk.get("stream", "")
        if stream.startswith("Step "):
            recent.clear()
            print(stream.rstrip(), flush=True)
        elif stream:
            recent.append(stream)
    image = client.images.get(tags[0])
    for extra in tags[1:]:
        repo, tag = extra.rsplit(":", 1)
        image.tag(repo, tag)


def layers(client: docker.DockerClient, name: str) -> list[tuple[int, str]]:
    """(size in bytes, the step that made it) for every layer, base first."""
    return [(entry["Size"], entry["CreatedBy"]) for entry in reversed(client.api.history(name))]


def layer_report(rows: Sequence[tuple[int, str]]) -> str:
    lines = []
    for size, step in rows:
        if size:
            step = re.sub(r"^/bin/sh -c (#\(nop\) )?", "", step).strip() or "(base image)"
            lines.append(f"  {size / 1e6:7.1f} MB  {step[:100]}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--docker", default=os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock")
    p.add_argument("--repository", default="haproxy-consul", help="tagged REPOSITORY:latest and REPOSITORY:VERSION")
    p.add_argument("--base", help=f"base image (default {DEFAULT_BASE}, or debootstrap when it cannot be pulled)")
    p.add_argument("--debootstrap", action="store_true", help="base from debootstrap (no registry needed)")
    p.add_argument("--cache", default=str(REPO / "build" / "base"), help="where the debootstrap rootfs is kept")
    p.add_argument("--consul-from", help="take the consul binary from this image (e.g. hashicorp/consul:1.20) "
                   "instead of Debian 11's Consul 1.8.7 package")
    p.add_argument("--consul-path", help="where --consul-from's image keeps it (default /bin/consul)")
    p.add_argument("--consul-binary", help="use this consul binary (e.g. unzipped from a Consul release)")
    args = p.parse_args(argv)
    try:
        consul = consul_source(args.consul_from, args.consul_path, args.consul_binary)
    except ValueError as exc:
        p.error(str(exc))
    try:
        client = connect(args.docker)
    except NoEngine:
        print(no_engine_line(args.docker), file=sys.stderr)
        return 1
    wheels()
    base = choose_base(client, args.base, args.debootstrap, Path(args.cache))
    tags = image_tags(args.repository, __version__)
    build(client, tags, base, consul)
    size = client.images.get(tags[0]).attrs["Size"]
    version = client.containers.run(tags[0], ["version"], entrypoint="consul", remove=True).decode().splitlines()[0]
    print(f"consul in the image: {version} (from {consul.get('CONSUL_FROM', 'Debian 11 package')})")
    print(f"built {' and '.join(tags)} from {base}: {size / 1e6:.0f} MB; layers:")
    print(layer_report(layers(client, tags[0])), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
