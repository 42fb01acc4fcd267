"""A real Docker Engine for tests and the walkthrough: `dockerd` on its own socket and data dir,
publishing on loopback, and images imported from files of this machine (no registry needed).

`--ip 127.0.0.1` makes `-P` bind published ports on 127.0.0.1 only; tests send traffic to
those loopback ports and never to container bridge addresses. Each engine has a bridge and a
subnet of its own (not the shared docker0): two engines running at once would otherwise hand out
the same container addresses on one bridge, and a published port could reach the other
engine's container. The test image is imported from a rootfs holding Debian's busybox-static
(its `httpd` serves HTTP).

Stopping an engine also unmounts what dockerd leaves mounted under its root (the host network
namespace it bind-mounts at `exec/netns/default` once a `--net host` container ran), and
`cleanup` refuses to report success while anything is left: the suite leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import random
import re
import shlex
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import docker

from tests.support.procs import require, stop_process, wait_until

IMAGE = "quay.io/acme/nginx:test"        # the base name is what the registrator names services after
APPLETS = ("sh", "httpd", "sleep", "cat", "echo", "hostname", "nc", "rm", "ls")
BUSYBOX = Path("/bin/busybox")


@dataclass
class DockerEngine:
    root: Path
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.root}/docker.sock"

    @property
    def socket(self) -> Path:
        return self.root / "docker.sock"

    @property
    def bridge(self) -> str:
        return "dk-" + hashlib.sha1(str(self.root).encode()).hexdigest()[:8]    # at most 15 characters

    def start(self, timeout: float = 30.0) -> DockerEngine:
        dockerd = require("dockerd")
        require("containerd")
        self.root.mkdir(parents=True, exist_ok=True)
        make_bridge(self.bridge)
        with open(self.root / "dockerd.log", "ab") as log:
            self.proc = subprocess.Popen(
                [dockerd, "-H", self.url, "--data-root", str(self.root / "data"),
                 "--exec-root", str(self.root / "exec"), "--pidfile", str(self.root / "docker.pid"),
                 "--ip", "127.0.0.1", "--bridge", self.bridge],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_until(self._ping, timeout, interval=0.1, what=f"dockerd on {self.url}")
        return self

    def _ping(self) -> bool:
        if self.proc.poll() is not None:
            log = (self.root / "dockerd.log").read_text()[-2000:]
            raise RuntimeError(f"dockerd exited {self.proc.returncode}: {log}")
        return docker.APIClient(base_url=self.url, timeout=2).ping()

    def client(self) -> docker.DockerClient:
        return docker.DockerClient(base_url=self.url, timeout=30)

    def stop(self) -> None:
        """Stop dockerd, unmount what it left under its root and remove its bridge (its data stays)."""
        if self.proc is not None:
            stop_process(self.proc, timeout=20)
        unmount_below(self.root)
        remove_bridge(self.bridge)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def make_bridge(name: str) -> None:
    """A bridge `name` with a /24 of 172.30.0.0/16 that no interface uses yet (kept if it exists)."""
    ip = require("ip")
    if subprocess.run([ip, "link", "show", name], capture_output=True).returncode == 0:
        return
    used = set(re.findall(r"inet 172\.30\.(\d+)\.", subprocess.run([ip, "-4", "addr"], capture_output=True,
                                                                     text=True).stdout))
    third = random.choice([n for n in range(1, 255) if str(n) not in used])
    for command in (["link", "add", name, "type", "bridge"], ["addr", "add", f"172.30.{third}.1/24", "dev", name],
                    ["link", "set", name, "up"]):
        subprocess.run([ip, *command], check=True, capture_output=True)


def remove_bridge(name: str) -> None:
    """The bridge and the iptables rules dockerd made for it (it leaves them when it stops)."""
    subprocess.run(["ip", "link", "del", name], capture_output=True, check=False)
    iptables = shutil.which("iptables")
    for table in ("filter", "nat") if iptables else ():
        rules = subprocess.run([iptables, "-t", table, "-S"], capture_output=True, text=True).stdout
        for rule in rules.splitlines():
            if rule.startswith("-A ") and re.search(rf"\b{re.escape(name)}\b", rule):
                subprocess.run([iptables, "-t", table, "-D", *shlex.split(rule)[1:]], capture_output=True)


def mounts_below(root: Path) -> list[Path]:
    """Mount points at or under `root`, deepest first (from /proc/self/mountinfo)."""
    root = root.resolve()
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        raw = line.split()[4]
        point = Path(raw.encode().decode("unicode_escape"))     # mountinfo escapes spaces as \040
        if point == root or root in point.parents:
            points.append(point)
    return sorted(points, key=lambda p: len(p.parts), reverse=True)


def unmount_below(root: Path) -> None:
    for point in mounts_below(root):
        subprocess.run(["umount", "--lazy", str(point)], check=False, capture_output=True)


def import_rootfs(client: docker.DockerClient, name: str, files: Mapping[str, bytes | Path],
                  links: Mapping[str, str] = {}, dirs: tuple[str, ...] = ("tmp",),   # noqa: B006 - read only
                  changes: tuple[str, ...] = ()) -> str:
    """`docker import` a rootfs made of `files` (archive name → content or a host file to copy, kept
    executable), symbolic `links` (name → target) and empty `dirs`, tagged `name`."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        leaves = {Path(n).parent for n in [*files, *links]} | {Path(d) for d in dirs}
        for directory in sorted({str(p) for leaf in leaves for p in [leaf, *leaf.parents] if str(p) != "."}):
            info = tarfile.TarInfo(directory)
            info.type, info.mode = tarfile.DIRTYPE, 0o1777 if directory == "tmp" else 0o755
            tar.addfile(info)
        for arcname, content in files.items():
            data = content.read_bytes() if isinstance(content, Path) else content
            info = tarfile.TarInfo(arcname)
            info.size, info.mode = len(data), 0o755 if isinstance(content, Path) else 0o644
            tar.addfile(info, io.BytesIO(data))
        for arcname, target in links.items():
            info = tarfile.TarInfo(arcname)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tar.addfile(info)
    repo, tag = name.rsplit(":", 1) if ":" in name.rsplit("/", 1)[-1] else (name, "latest")
    client.api.import_image_from_data(buf.getvalue(), repository=repo, tag=tag, changes=list(changes))
    return f"{repo}:{tag}"


def busybox_files(applets: tuple[str, ...] = APPLETS) -> tuple[dict[str, Path], dict[str, str]]:
    """Debian's busybox-static as /bin/busybox and a symlink per applet."""
    if not BUSYBOX.exists():
        raise RuntimeError("busybox-static is not installed: run `make deps`")
    return {"bin/busybox": BUSYBOX}, {f"bin/{applet}": "busybox" for applet in applets}


def build_image(client: docker.DockerClient, name: str = IMAGE) -> str:
    """A ~2 MB image: busybox-static with an httpd serving /www/index.html, port 80 exposed."""
    files, links = busybox_files()
    return import_rootfs(client, name, {**files, "www/index.html": b"hello from busybox httpd\n"}, links,
                         changes=("EXPOSE 80", 'CMD ["httpd", "-f", "-p", "80", "-h", "/www"]'))


def engine(root: Path | None = None) -> DockerEngine:
    # unix socket paths are limited to 108 bytes: keep the root short
    return DockerEngine(root or Path(tempfile.mkdtemp(prefix="dk-", dir="/tmp")))


def cleanup(root: Path) -> None:
    """Remove a stopped engine's root and bridge; fail loudly if a mount, a file or the bridge stays."""
    unmount_below(root)
    shutil.rmtree(root, ignore_errors=True)
    bridge = DockerEngine(root).bridge
    remove_bridge(bridge)
    left = mounts_below(root)
    bridge_left = subprocess.run(["ip", "link", "show", bridge], capture_output=True).returncode == 0
    if left or root.exists() or bridge_left:
        raise RuntimeError(f"docker engine root {root} not cleaned up: mounts {[str(p) for p in left]}, "
                           f"bridge {bridge} {'left' if bridge_left else 'gone'}")


@contextlib.contextmanager
def running_engine(prepare=None, root: Path | None = None) -> Iterator[DockerEngine]:
    """A started dockerd with the busybox test image (and whatever `prepare(engine)` adds);
    every container is removed and the daemon stopped afterwards, and its root removed unless it
    was given (then whoever made the root removes it)."""
    eng = engine(root).start()
    try:
        if prepare is not None:
            prepare(eng)
        build_image(eng.client())
        yield eng
    finally:
        try:
            for c in eng.client().containers.list(all=True):
                c.remove(force=True)
        finally:
            eng.stop()
            if root is None:
                cleanup(eng.root)
