"""bootstrap on an etcd2-style fleet: the v2 keys API with TTL'd keys under
/consul.io/bootstrap/machines/<machine-id>, as the seed's CoreOS fleets used it.

Debian's etcd 3.4 stands in for etcd2: started with `--enable-v2` it serves the v2 keys API
beside v3 (separate keyspaces), and bootstrap is forced to v2 with `--etcd-api v2`.
"""

from __future__ import annotations

import signal
import subprocess

import httpx
import pytest

from tests.integration.test_bootstrap_cluster import PREFIX, Bootstrap, etcd_keys, one_cluster, voters
from tests.support.etcd import EtcdServer
from tests.support.procs import wait_until

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def etcd2(tmp_path_factory):
    server = EtcdServer(tmp_path_factory.mktemp("etcd2"), enable_v2=True).start()
    yield server
    server.stop()


def v2_machines(etcd) -> dict[str, dict]:
    answer = httpx.get(f"{etcd.url}/v2/keys{PREFIX}/machines", params={"recursive": "true"}).json()
    return {n["key"]: n for n in (answer.get("node") or {}).get("nodes") or ()}


def test_three_servers_form_one_cluster_through_v2_keys_with_ttls(etcd2, tmp_path):
    httpx.put(f"{etcd2.url}/v2/keys{PREFIX}/machines/seed-garbage", data={"value": "not-an-ip"})
    servers = [Bootstrap(etcd2.url, n, tmp_path, "--etcd-api", "v2", ttl=3).start() for n in range(3)]
    try:
        wait_until(lambda: one_cluster(servers), 60, interval=0.2, what="one leader and three peers over etcd v2")
        assert voters(servers[0]) == ["server0", "server1", "server2"]
        machines = v2_machines(etcd2)
        for n in range(3):
            key = machines[f"{PREFIX}/machines/machine{n}"]
            assert '"address": "127.0.0.' in key["value"] and 0 < key["ttl"] <= 3   # a TTL'd key, kept alive
        assert etcd_keys(etcd2) == {}                    # nothing in the v3 keyspace
        assert "not an IP address" in servers[0].log()
        # A server that exits deletes its key at once (here: refused for expecting 5, not 3) ...
        odd = Bootstrap(etcd2.url, 0, tmp_path / "odd", "--etcd-api", "v2", expect=5)
        odd.argv[odd.argv.index("machine0")] = "machine9"
        refused = subprocess.run(odd.argv, capture_output=True, text=True, timeout=30)
        assert refused.returncode == 2 and "disagrees" in refused.stderr and "revoked lease" in refused.stderr
        assert f"{PREFIX}/machines/machine9" not in v2_machines(etcd2)
        # ... and a crashed one (no revoke) lets it expire with its TTL, while the living are refreshed.
        servers[2].proc.send_signal(signal.SIGKILL)
        servers[2].proc.wait()
        wait_until(lambda: f"{PREFIX}/machines/machine2" not in v2_machines(etcd2), 15, what="the TTL to expire")
        assert f"{PREFIX}/machines/machine0" in v2_machines(etcd2)       # the living are refreshed
    finally:
        for s in servers:
            s.kill()


def test_auto_uses_v3_on_etcd3_even_with_v2_enabled(etcd2, tmp_path):
    dry = subprocess.run(Bootstrap(etcd2.url, 0, tmp_path, "--dry-run").argv, capture_output=True, text=True,
                         timeout=30)
    assert dry.returncode == 0 and "etcd 3.4" in dry.stderr and "using its v3 API" in dry.stderr
