"""Build the haproxy-consul image, offline-friendly (`make image`).

1. Wheels are built on the host: every dependency into build/image/deps, the package into
   build/image/app (a code change then rebuilds only the image's last layer).
2. The base is `--base IMAGE` (default debian:bookworm-slim), or with `--debootstrap` a
   `debootstrap --variant=minbase bookworm` rootfs from this machine's own Debian mirror,
   imported as haproxy-consul-base:bookworm (cached: built once per Docker data root).
3. `docker build` (classic builder) through the Docker SDK.

Usage: python scripts/build_image.py [--docker URL] [--tag haproxy-consul:dev] [--base IMAGE | --debootstrap]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import docker

REPO = Path(__file__).resolve().parents[1]
BUILD = REPO / "build" / "image"
BASE_TAG = "haproxy-consul-base:bookworm"


def debian_mirror() -> str:
    """The mirror this machine's apt uses for bookworm (deb822 or one-line format)."""
    deb822 = Path("/etc/apt/sources.list.d/debian.sources")
    if deb822.exists():
        for stanza in deb822.read_text().split("\n\n"):
            lines = [line for line in stanza.splitlines() if ":" in line and not line.startswith("#")]
            fields = dict(line.split(":", 1) for line in lines)
            if re.search(r"\bbookworm\b", fields.get("Suites", "")):
                return fields["URIs"].split()[0].strip()
    one_line = Path("/etc/apt/sources.list")
    for line in one_line.read_text().splitlines() if one_line.exists() else []:
        parts = line.split()
        if len(parts) >= 3 and parts[0] == "deb" and parts[2] == "bookworm":
            return parts[1]
    raise SystemExit("build_image: cannot find this machine's Debian mirror in its apt sources")


def wheels() -> None:
    shutil.rmtree(BUILD, ignore_errors=True)
    all_wheels = BUILD / "all"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "-w", str(all_wheels), str(REPO)], check=True)
    for sub in ("deps", "app"):
        (BUILD / sub).mkdir(parents=True)
    for wheel in all_wheels.glob("*.whl"):
        wheel.rename(BUILD / ("app" if wheel.name.startswith("haproxy_consul-") else "deps") / wheel.name)
    all_wheels.rmdir()


def debootstrap_base(client: docker.DockerClient, cache: Path) -> str:
    try:
        client.images.get(BASE_TAG)
        return BASE_TAG
    except docker.errors.ImageNotFound:
        pass
    rootfs, tarball = cache / "rootfs", cache / "rootfs.tar"
    if not tarball.exists():
        shutil.rmtree(rootfs, ignore_errors=True)
        subprocess.run(["debootstrap", "--variant=minbase", "bookworm", str(rootfs), debian_mirror()], check=True,
                       stdout=subprocess.DEVNULL)
        with tarfile.open(tarball, "w") as tar:
            tar.add(str(rootfs), arcname=".")
        shutil.rmtree(rootfs, ignore_errors=True)
    repo, tag = BASE_TAG.split(":")
    client.api.import_image(src=str(tarball), repository=repo, tag=tag)
    return BASE_TAG


def build(client: docker.DockerClient, tag: str, base: str) -> str:
    for chunk in client.api.build(path=str(REPO), tag=tag, buildargs={"BASE": base}, rm=True, forcerm=True,
                                  decode=True):
        if "error" in chunk:
            raise SystemExit(f"docker build failed: {chunk['error']}")
        if chunk.get("stream", "").startswith("Step "):
            print(chunk["stream"].rstrip(), flush=True)
    return tag


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--docker", default=os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock"))
    p.add_argument("--tag", default="haproxy-consul:dev")
    p.add_argument("--base", default="debian:bookworm-slim")
    p.add_argument("--debootstrap", action="store_true", help="base from debootstrap (no registry needed)")
    p.add_argument("--cache", default=str(REPO / "build" / "base"), help="where the debootstrap rootfs is kept")
    args = p.parse_args(argv)
    client = docker.DockerClient(base_url=args.docker, timeout=600)
    wheels()
    base = args.base
    if args.debootstrap:
        Path(args.cache).mkdir(parents=True, exist_ok=True)
        base = debootstrap_base(client, Path(args.cache))
    build(client, args.tag, base)
    size = client.images.get(args.tag).attrs["Size"]
    print(f"built {args.tag} from {base}: {size / 1e6:.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
