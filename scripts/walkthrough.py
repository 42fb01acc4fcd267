"""`make walkthrough`: the README's three-host walkthrough, run on one machine from its own text.

The README's marked blocks (scripts/walkthrough_blocks.py) run in bash, as hosts t1, t2, t3 on
127.0.0.1, .2, .3, with the substitutions the README documents: `make image`, etcd, three Consul
servers formed by bootstrap, an edge on each host, the registrator, `docker run -dP nginx` twice
and `docker run -dP redis`, and the README's own `curl` checks. Then it checks that each edge
answers from both nginx containers and that Consul lists redis, prints the URLs and `curl` lines
to try, and waits for Ctrl-C, which removes every container and volume it started.

Environment: DOCKER_HOST (the engine; when none answers there, or at /var/run/docker.sock, a
dockerd of its own is started, data in WALKTHROUGH_ENGINE_ROOT, default
/tmp/haproxy-consul-walkthrough, kept for the next run); WALKTHROUGH_ONCE=1 (check, clean up
and exit, for CI). Traffic stays on 127.0.0.0/8.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

import docker  # noqa: E402
import walkthrough_blocks as wb  # noqa: E402 - the pure half, next to this file

from tests.support.docker_engine import DockerEngine, busybox_files, import_rootfs  # noqa: E402
from tests.support.http import get  # noqa: E402 - the repo's own loopback helpers
from tests.support.procs import wait_until  # noqa: E402

DEFAULT_ENGINE = "unix:///var/run/docker.sock"
# The ports the walkthrough's programs listen on, on each host's 127.0.0.N (etcd only on t1).
PORTS = {"edge": (80, 8404), "consul": (8300, 8301, 8302, 8500, 8600)}
ETCD_PORTS = (2379, 2380)
CHECK_TIMEOUT = 120.0
NGINX_PAGE = 'echo "nginx stand-in in container $(hostname)" > /www/index.html; exec httpd -f -p 80 -h /www'


class Stop(Exception):
    """Ctrl-C or SIGTERM: clean up and leave."""


class Failed(Exception):
    """A step of the walkthrough did not work; the message says which."""


def answers(url: str) -> bool:
    try:
        return docker.APIClient(base_url=url, timeout=3).ping()
    except docker.errors.DockerException:
        return False


def taken_ports() -> list[str]:
    """host:port pairs the walkthrough needs that something already listens on."""
    wanted = [(f"127.0.0.{n}", p) for n in (1, 2, 3) for ports in PORTS.values() for p in ports]
    wanted += [("127.0.0.1", p) for p in ETCD_PORTS]
    taken = []
    for host, port in wanted:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)    # TIME_WAIT from a last run is fine
            try:
                s.bind((host, port))
            except PermissionError:
                raise Failed(f"binding {host}:{port} needs root: run it as root (as make test and make demo)") from None
            except OSError:
                taken.append(f"{host}:{port}")
    return taken


@dataclass(frozen=True)
class StandIn:
    """An image imported from files of this machine, for when no registry has the real one."""
    made_of: str
    files: dict[str, bytes | Path]
    links: dict[str, str] = field(default_factory=dict)
    dirs: tuple[str, ...] = ("tmp",)
    changes: tuple[str, ...] = ()


def stand_ins() -> dict[str, StandIn]:
    """The images the README's blocks run, besides haproxy-consul."""
    busybox, applets = busybox_files()
    etcd = Path("/usr/bin/etcd")
    etcd_files: dict[str, bytes | Path] = {"usr/local/bin/etcd": etcd}
    for lib in linked_libraries(etcd):
        etcd_files[lib.lstrip("/")] = Path(lib).resolve()
    return {
        "nginx:latest": StandIn("busybox-static", busybox, applets, ("tmp", "www"),
                                ("EXPOSE 80", f'CMD ["sh", "-c", {json.dumps(NGINX_PAGE)}]')),
        "redis:latest": StandIn("busybox-static", {**busybox, "bin/pong": b"#!/bin/sh\necho +PONG\n"}, applets,
                                changes=("EXPOSE 6379", 'CMD ["nc", "-ll", "-p", "6379", "-e", "/bin/pong"]')),
        "quay.io/coreos/etcd:v3.4.23": StandIn("etcd 3.4", etcd_files, changes=("EXPOSE 2379 2380",)),
    }


def linked_libraries(binary: Path) -> list[str]:
    out = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, check=True).stdout
    libs = []
    for line in out.splitlines():
        path = line.split("=>")[-1].split("(")[0].strip()
        if path.startswith("/"):
            libs.append(path)
    return libs


def ensure_images(client: docker.DockerClient) -> set[str]:
    """Each image the blocks run: the engine's own, else pulled, else a stand-in; the stand-ins made."""
    made = set()
    for name, stand_in in stand_ins().items():
        try:
            client.images.get(name)
            continue
        except docker.errors.ImageNotFound:
            pass
        repo, tag = name.rsplit(":", 1)
        try:
            client.images.pull(repo, tag=tag)
            print(f"pulled {name}")
        except docker.errors.APIError:
            import_rootfs(client, name, stand_in.files, stand_in.links, stand_in.dirs, stand_in.changes)
            made.add(name)
            print(f"no registry answers for {name}: using a stand-in built from this machine's {stand_in.made_of}")
    return made


class Walkthrough:
    def __init__(self, environ: dict[str, str]):
        self.environ = environ
        self.engine: DockerEngine | None = None
        self.url = environ.get("DOCKER_HOST") or DEFAULT_ENGINE
        self.work = Path(tempfile.mkdtemp(prefix="walkthrough-"))
        self.names: set[str] = set()            # containers and volumes the blocks name
        self.volume_names: set[str] = set()
        self.existing: set[str] | None = None   # container IDs there before the first block

    def start_engine(self) -> None:
        if answers(self.url):
            if not self.url.startswith("unix://"):
                raise Failed(f"DOCKER_HOST={self.url}: the walkthrough mounts the engine's socket into the "
                             "registrator, so it needs an engine on this machine's unix socket")
            print(f"using the Docker engine at {self.url}")
            return
        root = Path(self.environ.get("WALKTHROUGH_ENGINE_ROOT") or "/tmp/haproxy-consul-walkthrough")
        print(f"no Docker engine answers at {self.url}: starting one for the walkthrough "
              f"(dockerd, data in {root}, kept for the next run)", flush=True)
        self.engine = DockerEngine(root)
        self.engine.start(timeout=60)
        self.url = self.engine.url

    @property
    def socket(self) -> str:
        return self.url.removeprefix("unix://")

    def client(self) -> docker.DockerClient:
        return docker.DockerClient(base_url=self.url, timeout=120)

    def plan(self) -> list[tuple[wb.Block, str, str]]:
        """(block, host, the block's text as that host) in the README's order."""
        steps = []
        for block in wb.blocks((REPO / "README.md").read_text()):
            for host in block.hosts:
                machine_id = self.work / f"machine-id-{host}"
                machine_id.write_text(f"{host}\n")
                steps.append((block, host, wb.on_host(block.text, host, self.socket, str(machine_id))))
        return steps

    def remove_leftovers(self, steps: list[tuple[wb.Block, str, str]]) -> None:
        """Containers and volumes named as the walkthrough's, left by a run that was killed."""
        client = self.client()
        for _block, _host, text in steps:
            containers, volumes = wb.names(text)
            self.names.update(containers)
            self.volume_names.update(volumes)
        for c in client.containers.list(all=True):
            if c.name in self.names:
                c.remove(force=True)
                print(f"removed the container {c.name} left by an earlier walkthrough")
        for v in client.volumes.list():
            if v.name in self.volume_names:
                v.remove(force=True)
                print(f"removed the volume {v.name} left by an earlier walkthrough")
        self.existing = {c.id for c in client.containers.list(all=True)}

    def ours(self, client: docker.DockerClient) -> tuple[list, list]:
        """What the blocks created: new containers named by them or running their images, their volumes.

        Found afresh rather than recorded per block, so a block cut short by Ctrl-C leaves nothing."""
        if self.existing is None:
            return [], []
        images = {*stand_ins(), "haproxy-consul:latest"}

        def image(c) -> str:
            name = c.attrs["Config"]["Image"]
            return name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"
        containers = [c for c in client.containers.list(all=True)
                      if c.id not in self.existing and (c.name in self.names or image(c) in images)]
        return containers, [v for v in client.volumes.list() if v.name in self.volume_names]

    def run_blocks(self, steps: list[tuple[wb.Block, str, str]]) -> None:
        for block, host, text in steps:
            print("".join(f"{host}$ {line}\n" for line in text.rstrip().splitlines()), end="", flush=True)
            env = {**self.environ, "DOCKER_HOST": self.url, "HOST_IP": f"127.0.0.{wb.host_number(host)}"}
            t0 = time.monotonic()
            result = subprocess.run(["bash", "-euo", "pipefail", "-c", text], cwd=REPO, env=env)
            if result.returncode != 0:
                raise Failed(f"the README block at line {block.line}, as {host}, exited {result.returncode}")
            print(f"({time.monotonic() - t0:.1f}s)\n", flush=True)

    def check(self, stand_in_nginx: bool) -> dict[str, object]:
        """Each edge answers nginx-80.tN.example.com from both nginx containers; Consul lists redis.

        Consul must list exactly the walkthrough's own containers (anything else was registered by
        a registrator outside it, writing to 127.0.0.1:8500). Stand-ins answer with their
        container's name, so both must also be seen through every edge."""
        client = self.client()
        ours = {c.id: c for c in self.ours(client)[0]}
        nginx_ids = {cid for cid, c in ours.items() if c.attrs["Config"]["Image"] in ("nginx", "nginx:latest")}
        pages = {f"nginx stand-in in container {cid[:12]}" for cid in nginx_ids}
        seen: dict[str, set[str]] = {f"t{n}": set() for n in (1, 2, 3)}

        strangers: list[str] = []

        def listed(service: str) -> list[dict]:
            entries = self.catalog(service)
            strangers.extend(e["ServiceID"] for e in entries if e["ServiceMeta"].get("container_id") not in ours)
            return entries

        def balanced() -> bool:
            entries = listed("nginx")
            if strangers:
                return True                                # stop waiting: that is an error below
            if len(entries) != len(nginx_ids):
                return False
            for n in (1, 2, 3):
                for _ in range(4):
                    status, body = get(80, f"nginx-80.t{n}.example.com", address=f"127.0.0.{n}", timeout=3)
                    if status != 200:
                        return False
                    seen[f"t{n}"].add(body.strip())
            return not stand_in_nginx or all(bodies == pages for bodies in seen.values())

        try:
            wait_until(balanced, CHECK_TIMEOUT, interval=0.5, what="every edge answering from both nginx containers")
            redis = wait_until(lambda: listed("redis") or strangers, 30, interval=0.5, what="redis in Consul's catalog")
        except TimeoutError as exc:
            raise Failed(f"{exc}; answers seen: {seen}") from exc
        if strangers:
            raise Failed(f"Consul lists instances the walkthrough did not start: {sorted(set(strangers))}; "
                         "something outside it registers into 127.0.0.1:8500")
        return {"seen": seen, "redis": redis}

    @staticmethod
    def catalog(service: str) -> list[dict]:
        with urllib.request.urlopen(f"http://127.0.0.1:8500/v1/catalog/service/{service}", timeout=3) as r:
            return json.loads(r.read())

    def report(self, found: dict, elapsed: float) -> None:
        lines = [f"\nThe walkthrough is up in {elapsed:.0f}s: t1, t2, t3 are 127.0.0.1, .2, .3, one Docker "
                 f"engine ({self.url}).\n"]
        for n in (1, 2, 3):
            answered = ", ".join(sorted(found["seen"][f"t{n}"]))
            lines.append(f"  curl -H 'Host: nginx-80.t{n}.example.com' http://127.0.0.{n}/    t{n}'s edge: {answered}")
        redis = found["redis"][0]
        lines += [
            f"  curl http://127.0.0.1:8500/v1/catalog/service/redis    redis at "
            f"{redis['ServiceAddress']}:{redis['ServicePort']} ({len(found['redis'])} instance)",
            "  http://127.0.0.1:8404/  (and 127.0.0.2:8404, 127.0.0.3:8404)   each edge's HAProxy stats",
            "  in a browser: http://nginx-80.t1.example.com/ once /etc/hosts maps that name to 127.0.0.1",
            f"  docker -H {self.url} ps    the {len(self.ours(self.client())[0])} containers it started",
        ]
        print("\n".join(lines), flush=True)

    def clean_up(self) -> None:
        t0 = time.monotonic()
        if answers(self.url):
            client = self.client()
            containers, volumes = self.ours(client)
            for c in containers:
                c.remove(force=True)
            for v in volumes:
                v.remove(force=True)
            print(f"removed {len(containers)} containers and {len(volumes)} volumes in "
                  f"{time.monotonic() - t0:.1f}s", flush=True)
        for f in self.work.iterdir():
            f.unlink()
        self.work.rmdir()
        if self.engine is not None:
            self.engine.stop()
            print(f"stopped the walkthrough's dockerd ({self.engine.root} kept)", flush=True)

    def logs(self) -> None:
        """On failure: the last lines of every container it started."""
        for c in self.ours(self.client())[0]:
            tail = c.logs(tail=12).decode(errors="replace").rstrip()
            print(f"--- {c.name} ({c.status}) ---\n{tail}", flush=True)


def interrupt(signum, _frame):
    raise Stop(signal.Signals(signum).name)


def main() -> int:
    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGINT, interrupt)
    once = os.environ.get("WALKTHROUGH_ONCE", "") not in ("", "0")
    try:
        taken = taken_ports()
    except Failed as exc:
        print(f"walkthrough: {exc}", file=sys.stderr)
        return 1
    if taken:
        print(f"walkthrough: these ports are taken, stop what listens there first: {', '.join(taken)}",
              file=sys.stderr)
        return 1
    w = Walkthrough(dict(os.environ))
    t0 = time.monotonic()
    try:
        w.start_engine()
        made = ensure_images(w.client())
        steps = w.plan()
        w.remove_leftovers(steps)
        w.run_blocks(steps)
        found = w.check("nginx:latest" in made)
        w.report(found, time.monotonic() - t0)
        if once:
            return 0
        print("Ctrl-C stops it and removes everything it started.", flush=True)
        while True:
            time.sleep(3600)
    except Failed as exc:
        print(f"walkthrough failed: {exc}", file=sys.stderr, flush=True)
        w.logs()
        return 1
    except Stop as exc:
        print(f"\n{exc}: cleaning up", flush=True)
        return 0
    except RuntimeError as exc:              # e.g. dockerd missing or not starting
        print(f"walkthrough: {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)    # a second Ctrl-C must not cut the clean-up short
        w.clean_up()


if __name__ == "__main__":
    sys.exit(main())
