"""A real Docker Engine for tests: `dockerd` on its own socket and data dir, publishing on loopback.

`--ip 127.0.0.1` makes `-P` bind published ports on 127.0.0.1 only; tests send traffic to
those loopback ports and never to container bridge addresses. The test image is imported from
a rootfs holding Debian's busybox-static (its `httpd` serves HTTP); no registry is needed.
"""

from __future__ import annotations

import contextlib
import io
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import docker

from tests.support.procs import require, stop_process, wait_until

IMAGE = "quay.io/acme/nginx:test"        # the base name is what the registrator names services after
APPLETS = ("sh", "httpd", "sleep", "cat", "echo", "hostname", "nc")


@dataclass
class DockerEngine:
    root: Path
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.root}/docker.sock"

    def start(self, timeout: float = 30.0) -> DockerEngine:
        dockerd = require("dockerd")
        require("containerd")
        self.root.mkdir(parents=True, exist_ok=True)
        log = open(self.root / "dockerd.log", "ab")
        self.proc = subprocess.Popen(
            [dockerd, "-H", self.url, "--data-root", str(self.root / "data"), "--exec-root", str(self.root / "exec"),
             "--pidfile", str(self.root / "docker.pid"), "--ip", "127.0.0.1"],
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
        if self.proc is not None:
            stop_process(self.proc, timeout=20)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def build_image(client: docker.DockerClient, name: str = IMAGE) -> str:
    """A ~2 MB image: busybox-static with an httpd serving /www/index.html, port 80 exposed."""
    busybox = Path("/bin/busybox")
    if not busybox.exists():
        raise RuntimeError("busybox-static is not installed: run `make deps`")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for d in ("bin", "www", "tmp"):
            info = tarfile.TarInfo(d)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
        tar.add(str(busybox), arcname="bin/busybox")
        for applet in APPLETS:
            info = tarfile.TarInfo(f"bin/{applet}")
            info.type, info.linkname = tarfile.SYMTYPE, "busybox"
            tar.addfile(info)
        page = b"hello from busybox httpd\n"
        info = tarfile.TarInfo("www/index.html")
        info.size = len(page)
        tar.addfile(info, io.BytesIO(page))
    repo, tag = name.rsplit(":", 1)
    client.api.import_image_from_data(buf.getvalue(), repository=repo, tag=tag,
                                      changes=["EXPOSE 80", 'CMD ["httpd", "-f", "-p", "80", "-h", "/www"]'])
    return name


def engine(root: Path | None = None) -> DockerEngine:
    # unix socket paths are limited to 108 bytes: keep the root short
    return DockerEngine(root or Path(tempfile.mkdtemp(prefix="dk-", dir="/tmp")))


def cleanup(root: Path) -> None:
    shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def running_engine(prepare=None) -> Iterator[DockerEngine]:
    """A started dockerd with the busybox test image (and whatever `prepare(engine)` adds);
    every container is removed and the daemon stopped afterwards."""
    eng = engine().start()
    try:
        if prepare is not None:
            prepare(eng)
        build_image(eng.client())
        yield eng
    finally:
        for c in eng.client().containers.list(all=True):
            c.remove(force=True)
        eng.stop()
        cleanup(eng.root)
