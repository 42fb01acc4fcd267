"""Three Consul servers on 127.0.0.1, .2 and .3 (the same ports on each address), for tests and
benchmarks that need a real cluster: one server killed and started again, reads spread over
servers, a leader elsewhere than the server an edge reads; and a TCP proxy that stops forwarding,
as a partition between an edge and its agent.

Each server is also an agent: a service registered through server i's HTTP API lives on node
`server<i>`, so killing that server makes the service's node (and the service) critical.
"""

from __future__ import annotations

import json
import select
import socket
import subprocess
import threading
import urllib.request
from pathlib import Path

from tests.support.procs import require, stop_process, wait_until

ADDRS = ("127.0.0.1", "127.0.0.2", "127.0.0.3")


def free_ports_everywhere(n: int, addrs: tuple[str, ...] = ADDRS) -> list[int]:
    """n distinct TCP ports free on every address of `addrs` (held open together while chosen)."""
    held: list[socket.socket] = []
    ports: list[int] = []
    try:
        for _ in range(100 * n):
            if len(ports) == n:
                return ports
            first = socket.socket()
            first.bind((addrs[0], 0))
            held.append(first)
            port = first.getsockname()[1]
            try:
                for addr in addrs[1:]:
                    s = socket.socket()
                    held.append(s)
                    s.bind((addr, port))
            except OSError:
                continue
            ports.append(port)
        raise RuntimeError(f"no {n} ports free on all of {addrs}")
    finally:
        for s in held:
            s.close()


class ConsulCluster:
    """`start()` three servers and wait for a leader; `kill(i)` (SIGKILL) and `start_server(i)`
    one of them. `hcl` lines are added to every server's configuration."""

    def __init__(self, root: Path, hcl: tuple[str, ...] = ()):
        self.root = root
        self.hcl = hcl
        self.http, self.serf_lan, self.serf_wan, self.server = free_ports_everywhere(4)
        self.procs: list[subprocess.Popen | None] = [None, None, None]

    def start(self, timeout: float = 60.0) -> ConsulCluster:
        for i in range(3):
            self.start_server(i, wait=False)
        wait_until(lambda: all(self.get(i, "/v1/status/leader") for i in range(3)), timeout, interval=0.2,
                   what="a leader known to all three servers")
        return self

    def start_server(self, i: int, wait: bool = True) -> None:
        consul = require("consul")
        addr = ADDRS[i]
        join = [f"-retry-join={a}:{self.serf_lan}" for a in ADDRS if a != addr]
        with open(self.root / f"server{i}.log", "ab") as log:
            self.procs[i] = subprocess.Popen(
                [consul, "agent", "-server", "-bootstrap-expect=3", f"-bind={addr}", f"-client={addr}",
                 f"-node=server{i}", f"-data-dir={self.root / f'data{i}'}", f"-http-port={self.http}",
                 "-dns-port=-1", "-grpc-port=-1", f"-serf-lan-port={self.serf_lan}",
                 f"-serf-wan-port={self.serf_wan}", f"-server-port={self.server}", "-retry-interval=1s",
                 "-hcl=disable_update_check = true", "-hcl=performance { raft_multiplier = 1 }",
                 # A restarted server is a non-voter until it has been stable this long.
                 '-hcl=autopilot { server_stabilization_time = "1s" }', *(f"-hcl={line}" for line in self.hcl), *join],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        if wait:
            wait_until(lambda: self.get(i, "/v1/status/leader"), 60, interval=0.2, what=f"server{i} to know a leader")

    def voters(self) -> int:
        """How many servers vote in the raft configuration, as the leader sees it."""
        leader = self.leader()
        return sum(s["Voter"] for s in self.get(leader, "/v1/operator/raft/configuration")["Servers"])

    def kill(self, i: int) -> None:
        """SIGKILL, as a crash: no leave, no snapshot."""
        proc = self.procs[i]
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(10)

    def url(self, i: int) -> str:
        return f"http://{ADDRS[i % 3]}:{self.http}"

    def get(self, i: int, path: str, timeout: float = 30):
        with urllib.request.urlopen(self.url(i) + path, timeout=timeout) as r:
            return json.loads(r.read() or b"null")

    def put(self, i: int, path: str, body=None, timeout: float = 60) -> None:
        data = None if body is None else json.dumps(body).encode()
        urllib.request.urlopen(urllib.request.Request(self.url(i) + path, data=data, method="PUT"),
                               timeout=timeout).read()

    def alive(self, i: int) -> bool:
        proc = self.procs[i]
        return proc is not None and proc.poll() is None

    def leader(self) -> int:
        """The leader's number, as the first running server knows it."""
        asked = next(i for i in range(3) if self.alive(i))
        address = self.get(asked, "/v1/status/leader").rsplit(":", 1)[0]
        return ADDRS.index(address)

    def stop(self) -> None:
        for proc in self.procs:
            if proc is not None:
                stop_process(proc, timeout=20)


class Partition:
    """A TCP proxy on 127.0.0.1 to `upstream` (host, port). `cut()` stops forwarding in both
    directions (bytes wait, connections stay open, new ones are accepted and wait too), as a
    network partition looks to both sides; `heal()` lets everything through again."""

    def __init__(self, upstream: tuple[str, int]):
        self.upstream = upstream
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._open = threading.Event()
        self._open.set()
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def cut(self) -> None:
        self._open.clear()

    def heal(self) -> None:
        self._open.set()

    def close(self) -> None:
        self._closed = True
        self._open.set()
        self.listener.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._pipe, args=(client,), daemon=True).start()

    def _pipe(self, client: socket.socket) -> None:
        self._open.wait()
        try:
            upstream = socket.create_connection(self.upstream, timeout=10)
        except OSError:
            client.close()
            return
        peers = {client: upstream, upstream: client}
        try:
            while not self._closed:
                ready, _, _ = select.select(list(peers), [], [], 0.2)
                for sock in ready:
                    self._open.wait()
                    data = sock.recv(65536)
                    if not data:
                        return
                    peers[sock].sendall(data)
        except OSError:
            return
        finally:
            client.close()
            upstream.close()
