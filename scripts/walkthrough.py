"""`make walkthrough`: the README's three-host walkthrough, run on one machine from its own text.

The README's marked blocks (scripts/walkthrough_blocks.py) run in bash, as hosts t1, t2, t3 on
127.0.0.1, .2, .3 (their own loopbacks 127.1.0.1, .2, .3), with the substitutions the README
documents: `make image`, etcd, three Consul servers formed by bootstrap, an edge on each host,
the registrator, `docker run -dP nginx` twice and `docker run -dP redis`, and the README's own
`curl` and `dig` checks. Then it checks what the walkthrough promises: each edge answers from
both nginx containers; Consul lists redis and answers it by DNS where each host's resolved
drop-in points (through resolved itself where it runs here); nothing else is routed (etcd is
not). It prints the URLs and commands to try, and waits for Ctrl-C, which stops the Consul
servers (so their drop-ins go) and removes every container and volume it started.

Environment: DOCKER_HOST (the engine; when none answers there, or at /var/run/docker.sock, a
dockerd of its own is started, data in WALKTHROUGH_ENGINE_ROOT, default
/tmp/haproxy-consul-walkthrough, kept for the next run); WALKTHROUGH_ONCE=1 (check, clean up
and exit, for CI); WALKTHROUGH_RESOLVED=0 (where systemd-resolved runs, leave it alone: t1's
drop-in goes to a directory of the walkthrough, as t2's and t3's always do). Traffic stays on
127.0.0.0/8.
"""

from __future__ import annotations

import json
import os
import re
import shutil
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

import dns.message  # noqa: E402
import dns.query  # noqa: E402
import dns.rdatatype  # noqa: E402
import docker  # noqa: E402
import walkthrough_blocks as wb  # noqa: E402 - the pure half, next to this file

from bootstrap import resolved  # noqa: E402 - the drop-in's name
from tests.support.docker_engine import DockerEngine, busybox_files, import_rootfs  # noqa: E402
from tests.support.http import get  # noqa: E402 - the repo's own loopback helpers
from tests.support.procs import wait_until  # noqa: E402

DEFAULT_ENGINE = "unix:///var/run/docker.sock"
# The ports the walkthrough's programs listen on: on each host's address 127.0.0.N, on its own
# loopback 127.1.0.N, and etcd's on t1's address.
ADDRESS_PORTS = {"edge": (80, 8500), "consul": (8300, 8301, 8302)}
LOOPBACK_PORTS = {"edge": (8404,), "consul": (8500, 8600)}
ETCD_PORTS = (2379, 2380)
# Host-side paths the blocks mount, and where resolved reads drop-ins on this machine.
DOCKER_SOCKET, MACHINE_ID, RESOLVED_DIR, DBUS_DIR = ("/var/run/docker.sock", "/etc/machine-id",
                                                     "/run/systemd/resolved.conf.d", "/run/dbus")
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
    wanted = [(f"127.0.0.{n}", p) for n in (1, 2, 3) for ports in ADDRESS_PORTS.values() for p in ports]
    wanted += [(wb.loopback(f"t{n}"), p) for n in (1, 2, 3) for ports in LOOPBACK_PORTS.values() for p in ports]
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


def resolved_runs() -> bool:
    """systemd-resolved is active on this machine (asked of systemd; never started by asking)."""
    systemctl = shutil.which("systemctl")
    return bool(systemctl) and subprocess.run([systemctl, "is-active", "--quiet", "systemd-resolved"],
                                              capture_output=True).returncode == 0


def dns_target(dropin: Path) -> tuple[str, int]:
    """The address and port a resolved drop-in sends `.consul` queries to."""
    m = re.search(r"^DNS=\[?([^\]\s]+?)\]?:(\d+)$", dropin.read_text(), re.M)
    if not m:
        raise Failed(f"{dropin} names no DNS=ADDRESS:PORT")
    return m.group(1), int(m.group(2))


def resolve(address: str, port: int, name: str) -> list[str]:
    """A records for name, asked of the DNS server at address:port (as dig @address -p port)."""
    answer = dns.query.udp(dns.message.make_query(name, "A"), address, port=port, timeout=2)
    return sorted(r.address for rrset in answer.answer if rrset.rdtype == dns.rdatatype.A for r in rrset)


class Walkthrough:
    def __init__(self, environ: dict[str, str]):
        self.environ = environ
        # Where systemd-resolved runs here, t1 is this machine: its drop-in goes where resolved reads it.
        self.use_resolved = environ.get("WALKTHROUGH_RESOLVED", "1") != "0" and resolved_runs()
        self.resolved_dirs: dict[str, Path] = {}
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
                steps.append((block, host, wb.on_host(block.text, host, self.host_paths(host))))
        return steps

    def host_paths(self, host: str) -> dict[str, str]:
        """Host-side paths of the blocks' mounts, as host `host` of one machine has them."""
        machine_id = self.work / f"machine-id-{host}"
        machine_id.write_text(f"{host}\n")
        paths = {DOCKER_SOCKET: self.socket, MACHINE_ID: str(machine_id)}
        if host == "t1" and self.use_resolved:
            self.resolved_dirs[host] = Path(RESOLVED_DIR)
            return paths
        self.resolved_dirs[host] = self.work / f"resolved-{host}"
        (self.work / f"dbus-{host}").mkdir(exist_ok=True)        # no bus: bootstrap says resolved was not reloaded
        return {**paths, RESOLVED_DIR: str(self.resolved_dirs[host]), DBUS_DIR: str(self.work / f"dbus-{host}")}

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
                         f"something outside it registers into {self.consul}")
        return {"seen": seen, "redis": redis, "dns": self.check_dns(redis), "exposed": self.check_exposed(),
                "ui": self.check_ui()}

    def check_ui(self) -> list[str]:
        """Port 8500 of each host's address shows Consul's UI and the cluster's services, read-only."""
        urls = []
        for n in (1, 2, 3):
            base = f"http://127.0.0.{n}:8500"
            try:
                status, page = get(8500, f"127.0.0.{n}:8500", "/ui/", address=f"127.0.0.{n}", timeout=5)
                services = json.loads(get(8500, f"127.0.0.{n}:8500", "/v1/catalog/services",
                                          address=f"127.0.0.{n}", timeout=5)[1])
                kv = get(8500, f"127.0.0.{n}:8500", "/v1/kv/?recurse", address=f"127.0.0.{n}", timeout=5)[0]
            except (OSError, ValueError) as exc:
                raise Failed(f"{base}/ui/: {exc}") from exc
            if status != 200 or "consul-ui" not in page or "nginx" not in services or kv != 403:
                raise Failed(f"{base}: UI {status}, services {sorted(services)}, KV {kv} (want 200, nginx, 403)")
            urls.append(f"{base}/ui/")
        return urls

    def check_dns(self, redis: list[dict]) -> dict[str, str]:
        """Each host's resolved drop-in names a server that answers redis.service.consul with the
        catalog's addresses; where resolved runs here, resolved itself answers it too."""
        want = sorted({e["ServiceAddress"] or e["Address"] for e in redis})
        how = {}
        for host in wb.HOSTS:
            dropin = self.resolved_dirs[host] / resolved.FILE_NAME
            try:
                wait_until(dropin.exists, 10, what=f"{host}'s resolved drop-in {dropin}")
                address, port = dns_target(dropin)
                wait_until(lambda a=address, p=port: resolve(a, p, "redis.service.consul") == want, 30, interval=0.5,
                           what=f"redis.service.consul = {want} from {address}:{port}, where {host}'s drop-in points")
            except TimeoutError as exc:
                raise Failed(str(exc)) from exc
            how[host] = f"dig +short -p {port} @{address} redis.service.consul"
        if self.use_resolved:
            def through_resolved() -> bool:
                out = subprocess.run(["resolvectl", "query", "redis.service.consul"], capture_output=True, text=True)
                return out.returncode == 0 and all(a in out.stdout for a in want)
            try:
                wait_until(through_resolved, 30, interval=0.5, what="resolvectl query redis.service.consul")
            except TimeoutError as exc:
                raise Failed(f"{exc}: systemd-resolved runs here but does not answer through t1's drop-in") from exc
            how["resolved"] = "resolvectl query redis.service.consul; getent hosts redis.service.consul"
        return how

    def check_exposed(self) -> list[str]:
        """Only what the walkthrough asked to route is routed: Consul lists no etcd, no edge serves it."""
        with urllib.request.urlopen(f"{self.consul}/v1/catalog/services", timeout=3) as r:
            services = sorted(json.loads(r.read()))
        if services != ["consul", "nginx", "redis"]:
            raise Failed(f"Consul lists {services}; the walkthrough asked for nginx and redis only")
        for n in (1, 2, 3):
            status, _ = get(80, f"etcd-2379.t{n}.example.com", address=f"127.0.0.{n}", timeout=3)
            if status != 404:
                raise Failed(f"t{n}'s edge answers etcd-2379.t{n}.example.com with {status}, not 404")
        return services

    @property
    def consul(self) -> str:
        """t1's Consul HTTP API: the README's http://127.0.0.1:8500 on t1."""
        return f"http://{wb.loopback('t1')}:8500"

    def catalog(self, service: str) -> list[dict]:
        with urllib.request.urlopen(f"{self.consul}/v1/catalog/service/{service}", timeout=3) as r:
            return json.loads(r.read())

    def report(self, found: dict, elapsed: float) -> None:
        lines = [f"\nThe walkthrough is up in {elapsed:.0f}s: t1, t2, t3 are 127.0.0.1, .2, .3, one Docker "
                 f"engine ({self.url}).\n"]
        for n in (1, 2, 3):
            answered = ", ".join(sorted(found["seen"][f"t{n}"]))
            lines.append(f"  curl -H 'Host: nginx-80.t{n}.example.com' http://127.0.0.{n}/    t{n}'s edge: {answered}")
        redis = found["redis"][0]
        lines += [
            f"  curl {self.consul}/v1/catalog/service/redis    redis at "
            f"{redis['ServiceAddress']}:{redis['ServicePort']} ({len(found['redis'])} instance)",
            *(f"  {command}    {host}'s Consul DNS, where its drop-in points"
              for host, command in found["dns"].items() if host in wb.HOSTS),
            *([f"  {found['dns']['resolved']}    this machine's resolver (t1's drop-in)"] if "resolved" in found["dns"]
              else []),
            f"  Consul lists {', '.join(found['exposed'])}; no edge routes etcd",
            f"  in a browser: {', '.join(found['ui'])}   Consul's UI, read-only (KV and writes: 403)",
            f"  http://{wb.loopback('t1')}:8404/  (and {wb.loopback('t2')}, {wb.loopback('t3')})   "
            "each edge's HAProxy stats",
            "  in a browser: http://nginx-80.t1.example.com/ once /etc/hosts maps that name to 127.0.0.1",
            f"  docker -H {self.url} ps    the {len(self.ours(self.client())[0])} containers it started",
        ]
        print("\n".join(lines), flush=True)

    def clean_up(self) -> None:
        t0 = time.monotonic()
        if answers(self.url):
            client = self.client()
            containers, volumes = self.ours(client)
            self.stop_consul(containers)
            for c in containers:
                c.remove(force=True)
            for v in volumes:
                v.remove(force=True)
            print(f"removed {len(containers)} containers and {len(volumes)} volumes in "
                  f"{time.monotonic() - t0:.1f}s", flush=True)
        left = [str(d / resolved.FILE_NAME) for d in self.resolved_dirs.values() if (d / resolved.FILE_NAME).exists()]
        if left:
            print(f"walkthrough: resolved drop-ins left behind: {', '.join(left)}", file=sys.stderr, flush=True)
        elif self.resolved_dirs:
            print(f"no resolved drop-in left ({len(self.resolved_dirs)} hosts)", flush=True)
        shutil.rmtree(self.work, ignore_errors=True)
        if self.engine is not None:
            self.engine.stop()
            print(f"stopped the walkthrough's dockerd ({self.engine.root} kept)", flush=True)

    def stop_consul(self, containers: list) -> None:
        """SIGTERM to the running Consul servers (what `docker stop` sends first), then a few
        seconds for bootstrap to withdraw its drop-in and announcement, which it does before its
        graceful leave. They are removed after that, mid-leave: leaving is not what is checked."""
        bootstraps = [c for c in containers if (c.attrs["Config"]["Cmd"] or [""])[0] == "bootstrap"]
        servers = [c for c in bootstraps if c.status == "running"]
        for c in servers:
            c.kill(signal="SIGTERM")
        dropins = [d / resolved.FILE_NAME for d in self.resolved_dirs.values()]
        try:
            wait_until(lambda: not any(f.exists() for f in dropins), 10, interval=0.1, what="the drop-ins withdrawn")
        except TimeoutError:                                        # reported by clean_up; why, here
            for c in bootstraps:
                c.reload()
                tail = c.logs(tail=15).decode(errors="replace").rstrip()
                print(f"--- {c.name} ({c.status}, restarts {c.attrs.get('RestartCount')}, "
                      f"{'signalled' if c in servers else 'not signalled'}) ---\n{tail}", file=sys.stderr, flush=True)

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
