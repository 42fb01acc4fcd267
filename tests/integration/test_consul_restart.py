"""The edge's own Consul server killed and started again under load (issue 20).

A restarted server without a raft snapshot rebuilds its state by replaying its whole log: for a
while it answers stale reads from older states (its index goes back, then forward again) while
saying it knows the leader and heard from it moments ago. What an older state says (here: the
window in which another server was down and its service critical) must never remove what a
newer answer established: routes whose services did not change keep answering.
The log is long (raft snapshots off, KV transactions) so the replay lasts long enough to be seen;
the test checks that it was (the restarted server's own index went below the one it had), and
restarts it again (at most RESTARTS times) when the replay was over before it answered.
"""

from __future__ import annotations

import base64
import re
import subprocess
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.integration.edge_helpers import answers
from tests.support.cluster import ConsulCluster
from tests.support.edge import EdgeProcess
from tests.support.http import Backend
from tests.support.procs import require, wait_until

pytestmark = pytest.mark.integration
DOMAIN = "restart.example"
# Transactions of 32 sets each: before the other server goes down (a restarted server takes a
# while to replay them, so it answers from its own state before it reaches the critical window)
# and while its service is critical (a long window of older states in which it is).
KV_BEFORE, KV_DURING = 800, 300
DOWN = 5.0             # seconds the edge's server stays down
RESTARTS = 3           # at most: until one shows its replay (it may finish before its HTTP API is up)


@pytest.fixture
def cluster(tmp_path):
    # Snapshots effectively off: a restarted server replays its whole log.
    c = ConsulCluster(tmp_path, hcl=("raft_snapshot_threshold = 1000000",)).start()
    yield c
    c.stop()


def register(cluster, i, name, sid, backend):
    cluster.put(i, "/v1/agent/service/register", {
        "Name": name, "ID": sid, "Address": backend.host, "Port": backend.port,
        "Meta": {"container_port": "80"}})


def passing(cluster, i, name, stale=False):
    """Whether every instance of `name` passes, as server i answers (None: no instance)."""
    entries = cluster.get(i, f"/v1/health/service/{name}" + ("?stale" if stale else ""))
    return None if not entries else all(c["Status"] == "passing" for e in entries for c in e["Checks"])


def write_kv(cluster, i, prefix, txns) -> None:
    value = base64.b64encode(b"x" * 64).decode()
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda t: cluster.put(i, "/v1/txn", [
            {"KV": {"Verb": "set", "Key": f"{prefix}/{t}/{j}", "Value": value}} for j in range(64)]), range(txns)))


def stale_index(cluster, i) -> tuple[int, bool]:
    """Server i's catalog index, and whether it answered from its own state (a follower says how
    long ago it heard from the leader; a read it forwards to the leader says 0)."""
    with urllib.request.urlopen(cluster.url(i) + "/v1/internal/ui/services?stale", timeout=5) as r:
        return int(r.headers["X-Consul-Index"]), int(r.headers["X-Consul-LastContact"]) > 0


def restart_replaying(cluster, i) -> list[int]:
    """Kill server i, start it again after DOWN seconds and wait until it has caught up; the
    indexes it answered from its own state below the one it had (its replay), or []."""
    before = stale_index(cluster, i)[0]
    cluster.kill(i)
    time.sleep(DOWN)
    cluster.start_server(i, wait=False)
    older: list[int] = []

    def caught_up() -> bool:
        index, own = stale_index(cluster, i)
        if own and index < before:
            older.append(index)
        return own and index >= before
    wait_until(caught_up, 60, interval=0.005, what=f"server{i} to catch up after its restart")
    return older


class Load:
    """wrk, keep-alive, paced (the machine is shared), on one route until `stop()`."""

    def __init__(self, edge, host, pace_script):
        self.proc = subprocess.Popen(
            [require("wrk"), "-t", "1", "-c", "2", "-d", "300s", "--timeout", "5s", "-s", str(pace_script),
             "-H", f"Host: {host}", f"http://127.0.0.1:{edge.port}/"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def stop(self) -> str:
        self.proc.send_signal(2)             # SIGINT: wrk stops and prints its summary
        return self.proc.communicate(timeout=30)[0]


def test_a_restarted_server_replaying_its_log_removes_no_route(cluster, tmp_path):
    edge_server = cluster.leader()                      # as in the issue: the edge reads the leader
    a_server, b_server = (i for i in range(3) if i != edge_server)
    alpha, beta, churn_backend = Backend("alpha"), Backend("beta"), Backend("churn")
    register(cluster, a_server, "alpha", "alpha-1", alpha)
    register(cluster, b_server, "beta", "beta-1", beta)
    edge = EdgeProcess(cluster.url(edge_server), domains=(DOMAIN,)).start()
    stop = threading.Event()

    def churn():                                        # steady writes through another server
        k = 0
        while not stop.wait(0.1):
            try:
                register(cluster, b_server, "churn", f"churn-{k % 3}", churn_backend)
                cluster.put(b_server, f"/v1/agent/service/deregister/churn-{(k + 1) % 3}")
            except OSError:
                pass
            k += 1
    churner = threading.Thread(target=churn)
    loads = []
    try:
        answers(edge, f"alpha-80.{DOMAIN}", {"alpha"}, timeout=20)
        answers(edge, f"beta-80.{DOMAIN}", {"beta"}, timeout=20)
        churner.start()
        write_kv(cluster, edge_server, "before", KV_BEFORE)

        # Another server down for a while: its service goes critical, a long stretch of log is
        # written meanwhile, then it comes back and its service passes again.
        cluster.kill(a_server)
        wait_until(lambda: passing(cluster, edge_server, "alpha") is False, 30, interval=0.2,
                   what="alpha critical while its server is down")
        write_kv(cluster, edge_server, "during", KV_DURING)
        cluster.start_server(a_server)
        wait_until(lambda: passing(cluster, edge_server, "alpha"), 30, interval=0.2, what="alpha passing again")
        wait_until(lambda: cluster.voters() == 3, 30, interval=0.2, what="three voters")
        answers(edge, f"alpha-80.{DOMAIN}", {"alpha"}, timeout=20)

        pace = tmp_path / "pace.lua"
        pace.write_text("function delay() return 10 end\n")
        loads = [Load(edge, f"{name}-80.{DOMAIN}", pace) for name in ("alpha", "beta")]
        time.sleep(1)

        # The edge's own server: killed, started again, replaying its log.
        replays = [restart_replaying(cluster, edge_server)]
        while not replays[-1] and len(replays) < RESTARTS:
            replays.append(restart_replaying(cluster, edge_server))
        assert replays[-1], f"server{edge_server} never answered from an older state in {RESTARTS} restarts"
        wait_until(lambda: passing(cluster, edge_server, "alpha", stale=True)
                   and passing(cluster, edge_server, "beta", stale=True), 30, what="the restarted server caught up")
        time.sleep(3)                                   # the edge's polls after the catch-up
        outs = [load.stop() for load in loads]
        loads = []
    finally:
        stop.set()
        if churner.is_alive():
            churner.join()
        for load in loads:
            load.stop()
        edge.stop()
        for b in (alpha, beta, churn_backend):
            b.close()
    for name, out in zip(("alpha", "beta"), outs, strict=True):
        requests = int(re.search(r"(\d+) requests in", out).group(1))
        assert requests > 100, out
        assert "Non-2xx" not in out and "Socket errors" not in out, f"{name}:\n{out}\n{edge.log()[-6000:]}"
    # Reads other than long-polls went to the leader meanwhile; stale again once it caught up.
    log = edge.log()
    assert "has caught up" in log[log.index("consul answers again"):], log[-6000:]
