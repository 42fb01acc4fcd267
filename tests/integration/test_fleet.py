"""`--fleet` against a real 3-server Consul cluster on 127.0.0.1-3, each edge a real edge with its
HAProxy, talking to its own server: one edge publishes, the others follow; the publisher killed
with SIGKILL, the Consul leader killed, an edge partitioned and healed. Throughout, no edge that
can still serve loses a route, and every edge converges within seconds once it can."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import threading
import time

import pytest

from tests.integration.edge_helpers import answers
from tests.support.cluster import ADDRS, ConsulCluster, Partition
from tests.support.edge import EdgeProcess
from tests.support.http import Backend
from tests.support.procs import wait_until

pytestmark = pytest.mark.integration
DOMAIN = "fleet.example"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = ConsulCluster(tmp_path_factory.mktemp("cluster")).start()
    yield c
    c.stop()


@pytest.fixture(scope="module")
def backends():
    found = {name: Backend(name) for name in ("a", "b", "c", "d")}
    yield found
    for b in found.values():
        b.close()


def register(cluster: ConsulCluster, node: str, name: str, backend: Backend):
    """An instance on `node` through the catalog API of the leader."""
    body = {"Node": node, "Address": "127.0.0.1",
            "Service": {"ID": f"{name}-{backend.name}", "Service": name, "Address": backend.host,
                        "Port": backend.port, "Meta": {"container_port": "80"}}}
    cluster.put(cluster.leader(), "/v1/catalog/register", body)


def head(cluster: ConsulCluster, prefix: str, via: int = 0) -> dict:
    entry = cluster.get(via, f"/v1/kv/{prefix}/head")[0]
    return {**json.loads(base64.b64decode(entry["Value"])), "session": entry.get("Session")}


def publisher_pid(cluster: ConsulCluster, prefix: str, via: int = 0) -> int | None:
    h = head(cluster, prefix, via)
    return int(h["by"].rsplit(":", 1)[1]) if h["session"] and h["r"] else None


def connections(edge: EdgeProcess, port: int) -> int:
    """Established TCP connections from the edge's process to Consul's HTTP port."""
    out = subprocess.run(["ss", "-tnpH", "state", "established", f"dport = :{port}"], capture_output=True,
                         text=True).stdout
    return sum(f"pid={edge.proc.pid}," in line for line in out.splitlines())


class Fleet:
    def __init__(self, urls: list[str], prefix: str):
        self.prefix = prefix
        self.edges = [EdgeProcess(url, domains=(DOMAIN,), extra=("--fleet", "--fleet-prefix", prefix))
                      for url in urls]

    def start(self, first_alone: bool = True) -> Fleet:
        for i, e in enumerate(self.edges):
            e.start(timeout=30)
            if i == 0 and first_alone:
                time.sleep(1.5)                  # the first one takes the lock
        return self

    def kill(self, edge: EdgeProcess) -> None:
        """kill -9 the edge (its HAProxy too: nothing of that host serves any more)."""
        master = int((edge.state_dir / "haproxy.pid").read_text().split()[0])
        edge.proc.kill()
        edge.proc.wait(10)
        os.kill(master, signal.SIGKILL)

    def stop(self) -> None:
        for e in self.edges:
            if e.proc is not None and e.proc.poll() is None:
                e.stop()


class RouteWatch:
    """Asks each edge for `host` every 50 ms in the background and records every answer that is not
    200 with one of `bodies`: a lost route."""

    def __init__(self, edges: list[EdgeProcess], host: str, bodies: set[str]):
        self.edges, self.host, self.bodies = edges, host, bodies
        self.bad: list[tuple[int, int, str]] = []
        self.asked = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> RouteWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            for i, e in enumerate(self.edges):
                status, body = e.get(self.host)
                self.asked += 1
                if status != 200 or body not in self.bodies:
                    self.bad.append((i, status, body[:60]))


def test_one_edge_publishes_and_the_others_follow(cluster, backends):
    fleet = Fleet([cluster.url(i) for i in range(3)], "t/follow").start()
    try:
        register(cluster, "host-1", "web", backends["a"])
        for e in fleet.edges:
            answers(e, f"web-80.{DOMAIN}", {"a"})
        assert publisher_pid(cluster, fleet.prefix) == fleet.edges[0].proc.pid
        register(cluster, "host-2", "web", backends["b"])
        t0 = time.monotonic()
        for e in fleet.edges:
            answers(e, f"web-80.{DOMAIN}", {"a", "b"})
        assert time.monotonic() - t0 < 5
        # The followers asked Consul for head and shards only: no catalog read at all, over their one
        # long-poll's connection (and the ACL guard's, idle); the publisher's do not grow with services.
        for e in fleet.edges[1:]:
            assert "reading the catalog ourselves" not in e.log()
            assert "publishes the route table" not in e.log()
            assert connections(e, cluster.http) <= 2
        nodes = len(cluster.get(0, "/v1/catalog/nodes"))
        # Long-polls: 3, one per node and head's; then the idle keep-alive connections of the
        # threads that write, elect, guard and did the cold sync (requests keep one per thread).
        assert connections(fleet.edges[0], cluster.http) <= (3 + nodes + 1) + 5
    finally:
        fleet.stop()


def test_the_publisher_killed_with_sigkill_loses_no_route_and_changes_resume(cluster, backends):
    fleet = Fleet([cluster.url(i) for i in range(3)], "t/kill").start()
    try:
        register(cluster, "host-1", "app", backends["a"])
        for e in fleet.edges:
            answers(e, f"app-80.{DOMAIN}", {"a"})
        victim = fleet.edges[0]
        assert publisher_pid(cluster, fleet.prefix) == victim.proc.pid
        rest = fleet.edges[1:]
        with RouteWatch(rest, f"app-80.{DOMAIN}", {"a", "b"}) as watch:
            fleet.kill(victim)
            killed_at = time.monotonic()
            register(cluster, "host-2", "app", backends["b"])             # a change while nobody publishes
            for e in rest:
                answers(e, f"app-80.{DOMAIN}", {"a", "b"}, timeout=15)
            resumed = time.monotonic() - killed_at
        assert watch.bad == [] and watch.asked > 20, watch.bad[:5]
        assert resumed <= 15
        new = wait_until(lambda: publisher_pid(cluster, fleet.prefix), 5, what="a new publisher")
        assert new in {e.proc.pid for e in rest}
        assert any("its session is destroyed" in e.log() for e in rest)
    finally:
        fleet.stop()


def test_a_partitioned_publisher_is_replaced_keeps_serving_and_converges_when_healed(cluster, backends):
    partition = Partition((ADDRS[0], cluster.http))
    fleet = Fleet([partition.url, cluster.url(1), cluster.url(2)], "t/partition").start()
    try:
        register(cluster, "host-1", "shop", backends["a"])
        for e in fleet.edges:
            answers(e, f"shop-80.{DOMAIN}", {"a"})
        cut = fleet.edges[0]
        assert publisher_pid(cluster, fleet.prefix) == cut.proc.pid
        with RouteWatch(fleet.edges, f"shop-80.{DOMAIN}", {"a", "c"}) as watch:
            partition.cut()
            register(cluster, "host-3", "shop", backends["c"])
            for e in fleet.edges[1:]:
                answers(e, f"shop-80.{DOMAIN}", {"a", "c"}, timeout=15)
            assert cut.get(f"shop-80.{DOMAIN}") == (200, "a"), "the cut edge serves what it had"
            new = publisher_pid(cluster, fleet.prefix, via=1)
            assert new in {e.proc.pid for e in fleet.edges[1:]}
            partition.heal()
            healed_at = time.monotonic()
            answers(cut, f"shop-80.{DOMAIN}", {"a", "c"}, timeout=15)
            converged = time.monotonic() - healed_at
        assert watch.bad == [], watch.bad[:5]
        assert converged < 10
        wait_until(lambda: "this edge stops publishing" in cut.log(), 10, what="the old publisher stepping down")
        assert publisher_pid(cluster, fleet.prefix, via=1) == new, "the healed edge did not take the lock back"
    finally:
        fleet.stop()
        partition.close()


def test_the_consul_leader_killed(cluster, backends):
    fleet = Fleet([cluster.url(i) for i in range(3)], "t/leader").start()
    try:
        register(cluster, "host-1", "api", backends["a"])
        for e in fleet.edges:
            answers(e, f"api-80.{DOMAIN}", {"a"})
        leader = cluster.leader()
        with RouteWatch(fleet.edges, f"api-80.{DOMAIN}", {"a", "d"}) as watch:
            cluster.kill(leader)
            others = [i for i in range(3) if i != leader]
            wait_until(lambda: cluster.leader() != leader, 30, interval=0.2, what="a new leader")
            register(cluster, "host-4", "api", backends["d"])
            for i in others:
                answers(fleet.edges[i], f"api-80.{DOMAIN}", {"a", "d"}, timeout=20)
            cluster.start_server(leader)                   # its edge converges once its server is back
            answers(fleet.edges[leader], f"api-80.{DOMAIN}", {"a", "d"}, timeout=30)
        assert watch.bad == [], watch.bad[:5]
    finally:
        fleet.stop()
        wait_until(lambda: all(cluster.get(i, "/v1/status/leader", timeout=2) for i in range(3)), 30, interval=0.2,
                   what="the cluster whole again")
