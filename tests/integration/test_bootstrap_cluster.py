"""bootstrap against a real etcd and real Consul servers on 127.0.0.1, .2 and .3 (same ports).

The tests of this module share one etcd and one cluster and run in order: form it, lose a
server (lease expiry), restart it (rejoin), then bad input that must not make a second cluster.
"""

from __future__ import annotations

import base64
import json
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import httpx
import pytest

from tests.support.edge import REPO
from tests.support.etcd import EtcdServer
from tests.support.procs import LoggedProcess, free_ports, require, stop_process, wait_until

pytestmark = pytest.mark.integration
PREFIX = "/consul.io/bootstrap"
ADDRS = ("127.0.0.1", "127.0.0.2", "127.0.0.3")
HTTP, SERF_LAN, SERF_WAN, SERVER = free_ports(4)
# The console script the image runs, next to this interpreter (the venv's).
PROGRAM = Path(sys.executable).parent / "haproxy-consul"


@pytest.fixture(scope="module")
def etcd(tmp_path_factory):
    server = EtcdServer(tmp_path_factory.mktemp("etcd")).start()
    yield server
    server.stop()


def b64(text):
    return base64.b64encode(text.encode()).decode()


def etcd_keys(etcd) -> dict[str, str]:
    data = httpx.post(f"{etcd.url}/v3/kv/range", json={"key": b64(PREFIX), "range_end": b64(PREFIX[:-1] + "q")}).json()
    return {base64.b64decode(kv["key"]).decode(): base64.b64decode(kv["value"]).decode() for kv in data.get("kvs", [])}


class Bootstrap(LoggedProcess):
    def __init__(self, etcd_url, n, root, *extra, expect=3, ttl=3):
        addr = ADDRS[n]
        self.addr = addr
        super().__init__([
            require(str(PROGRAM)), "bootstrap", "--etcd", etcd_url, "--machine-id", f"machine{n}",
            "--advertise", addr, "--expect", str(expect), "--data-dir", str(root / f"data{n}"),
            "--consul", require("consul"), "--ttl", str(ttl), "--wait-timeout", "20", *extra, "--",
            f"-bind={addr}", f"-client={addr}", f"-node=server{n}", f"-http-port={HTTP}", "-dns-port=-1",
            f"-serf-lan-port={SERF_LAN}", f"-serf-wan-port={SERF_WAN}", f"-server-port={SERVER}", "-grpc-port=-1",
            "-retry-interval=1s", "-hcl=disable_update_check = true", "-hcl=performance { raft_multiplier = 1 }",
            "-hcl=autopilot { server_stabilization_time = \"1s\" }"], root / f"bootstrap{n}-{time.monotonic_ns()}.log")

    def api(self, path):
        with urllib.request.urlopen(f"http://{self.addr}:{HTTP}{path}", timeout=2) as r:
            return json.loads(r.read())


@pytest.fixture(scope="module")
def cluster(etcd, tmp_path_factory):
    root = tmp_path_factory.mktemp("cluster")
    httpx.post(f"{etcd.url}/v3/kv/put", json={"key": b64(f"{PREFIX}/machines/garbage"), "value": b64("not-an-ip")})
    httpx.post(f"{etcd.url}/v3/kv/put", json={"key": b64(f"{PREFIX}/machines/a/b"), "value": b64("10.9.9.9")})
    t0 = time.monotonic()
    servers = [Bootstrap(etcd.url, n, root).start() for n in range(3)]
    wait_until(lambda: one_cluster(servers), 60, interval=0.1, what="one leader and three peers")
    print(f"three simultaneous starts to an elected leader with 3 peers: {time.monotonic() - t0:.2f}s")
    yield root, servers
    for s in servers:   # killed, not stopped: the last servers could not leave without a quorum
        if s.proc and s.proc.poll() is None:
            s.proc.kill()
            s.proc.wait()


def one_cluster(servers) -> bool:
    leaders = {s.api("/v1/status/leader") for s in servers}
    peers = [sorted(s.api("/v1/status/peers")) for s in servers]
    return len(leaders) == 1 and "" not in leaders and all(len(p) == 3 and p == peers[0] for p in peers)


def voters(server) -> list[str]:
    config = server.api("/v1/operator/raft/configuration")
    return sorted(s["Node"] for s in config["Servers"] if s["Voter"])


def test_three_servers_form_one_cluster_and_ignore_garbage(cluster, etcd):
    _, servers = cluster
    assert voters(servers[0]) == ["server0", "server1", "server2"]
    assert {f"{PREFIX}/machines/machine{n}" for n in range(3)} <= set(etcd_keys(etcd))
    assert "ignoring" in servers[0].log() and "not an IP address" in servers[0].log()
    assert "10.9.9.9" not in servers[0].log().split("starting:")[1].splitlines()[0]


def test_killed_server_lease_expires_and_it_rejoins_the_same_cluster(cluster, etcd):
    root, servers = cluster
    victim = servers[2]
    before = voters(servers[0])
    victim.proc.send_signal(signal.SIGKILL)               # no revoke, no leave: the lease must expire
    victim.proc.wait()
    wait_until(lambda: f"{PREFIX}/machines/machine2" not in etcd_keys(etcd), 15, what="the lease to expire")
    servers[2] = Bootstrap(etcd.url, 2, root).start()      # same machine id and data dir
    wait_until(lambda: one_cluster(servers), 60, interval=0.2, what="the same cluster again")
    assert voters(servers[0]) == before
    assert "existing Raft data: rejoining" in servers[2].log()
    assert f"{PREFIX}/machines/machine2" in etcd_keys(etcd)


def test_unreachable_etcd_is_retried_and_starts_nothing(tmp_path):
    b = Bootstrap(f"http://127.0.0.1:{free_ports(1)[0]}", 0, tmp_path).start()
    try:
        wait_until(lambda: "unreachable" in b.log(), 15, what="etcd unreachable logged")
        time.sleep(1)
        assert "starting:" not in b.log() and b.proc.poll() is None
    finally:
        b.proc.send_signal(signal.SIGTERM)
        assert b.proc.wait(10) == 0


def test_wrong_expect_is_refused_and_no_second_cluster_forms(cluster, etcd, tmp_path):
    _, servers = cluster
    bad = subprocess.run(Bootstrap(etcd.url, 0, tmp_path, expect=0).argv, capture_output=True, text=True, timeout=30,
                         cwd=REPO)
    assert bad.returncode == 2 and "--expect must be at least 1" in bad.stderr
    # A fourth machine expecting 5 while the others expect 3: refused with a clear error.
    odd = Bootstrap(etcd.url, 0, tmp_path, expect=5)
    odd.argv[odd.argv.index("machine0")] = "machine9"
    result = subprocess.run(odd.argv, capture_output=True, text=True, timeout=30, cwd=REPO)
    assert result.returncode == 2 and "disagrees" in result.stderr
    assert f"{PREFIX}/machines/machine9" not in etcd_keys(etcd)   # its lease was revoked on the way out
    assert one_cluster(servers) and voters(servers[0]) == ["server0", "server1", "server2"]


def test_running_twice_on_one_machine_is_harmless(cluster, etcd):
    root, servers = cluster
    key = f"{PREFIX}/machines/machine0"
    twin = Bootstrap(etcd.url, 0, root).start()              # same machine id, address and data dir
    try:
        assert twin.proc.wait(30) != 0                       # its agent cannot have the ports of the running one
    finally:
        stop_process(twin.proc)
    assert "revoked lease" in twin.log()                     # which took the key with it ...
    wait_until(lambda: key in etcd_keys(etcd), 10, what="the running server to announce itself again")
    assert "announcing again" in servers[0].log()            # ... and the running server put it back
    assert servers[0].proc.poll() is None
    assert one_cluster(servers) and voters(servers[0]) == ["server0", "server1", "server2"]


def test_dry_run_prints_the_agent_command(cluster, etcd, tmp_path):
    out = subprocess.run(Bootstrap(etcd.url, 0, tmp_path, "--dry-run").argv, capture_output=True, text=True,
                         timeout=30, cwd=REPO)
    assert out.returncode == 0
    assert "-bootstrap-expect=3" in out.stdout and "-retry-join=127.0.0.2" in out.stdout
    assert "-retry-join=127.0.0.1 " not in out.stdout         # never joins itself


def test_sigterm_leaves_gracefully_and_revokes(cluster, etcd):
    """(The DNS drop-in on the same path: tests/integration/test_bootstrap_dns.py.)"""
    root, servers = cluster
    victim = servers[1]
    stop_process(victim.proc, timeout=30)                       # the SIGTERM path
    assert victim.proc.returncode == 0
    assert "leaving the cluster gracefully" in victim.log() and "revoked lease" in victim.log()
    assert f"{PREFIX}/machines/machine1" not in etcd_keys(etcd)
    wait_until(lambda: len(servers[0].api("/v1/status/peers")) == 2, 15, what="the leaver gone from the peers")
    servers[1] = Bootstrap(etcd.url, 1, root).start()
    wait_until(lambda: one_cluster(servers), 60, interval=0.2, what="three servers again")
