"""bootstrap --dns-resolved against a real etcd, a real Consul server and the real dbus-daemon.

The server advertises 127.0.0.2 (`-bind`) and serves HTTP and DNS on `-client=127.0.0.3`, as a
host's address and its loopback differ: the drop-in must name where DNS answers (the `-client`
address), and that address must answer `redis.service.consul`. systemd is a recording stand-in
on a private bus (DBUS_SYSTEM_BUS_ADDRESS): bootstrap asks it to reload systemd-resolved after
writing and after removing the drop-in. A stop that is cut short, as `docker stop` kills after
10 s while a graceful leave can take longer, must still leave no drop-in and no announcement.
"""

from __future__ import annotations

import base64
import json
import re
import signal
import sys
import time
import urllib.request
from pathlib import Path

import dns.message
import dns.query
import dns.rdatatype
import httpx
import pytest

from tests.support.dbus import FakeSystemd
from tests.support.etcd import EtcdServer
from tests.support.procs import LoggedProcess, free_ports, require, wait_until

pytestmark = pytest.mark.integration
PROGRAM = Path(sys.executable).parent / "haproxy-consul"
ADVERTISE, CLIENT = "127.0.0.2", "127.0.0.3"
KEY = "/consul.io/bootstrap/machines/dns1"


@pytest.fixture
def etcd(tmp_path):
    server = EtcdServer(tmp_path / "etcd").start()
    yield server
    server.stop()


@pytest.fixture
def systemd(tmp_path):
    fake = FakeSystemd(tmp_path).start()
    yield fake
    fake.stop()


def etcd_has(etcd, key) -> bool:
    data = httpx.post(f"{etcd.url}/v3/kv/range", json={"key": base64.b64encode(key.encode()).decode()}).json()
    return bool(data.get("kvs"))


class Server(LoggedProcess):
    def __init__(self, etcd, systemd, root: Path):
        self.http, self.dns, serf_lan, serf_wan, server = free_ports(5, CLIENT)
        self.dropins = root / "resolved.conf.d"
        super().__init__([
            require(str(PROGRAM)), "bootstrap", "--etcd", etcd.url, "--machine-id", "dns1", "--advertise", ADVERTISE,
            "--expect", "1", "--data-dir", str(root / "data"), "--consul", require("consul"), "--ttl", "30",
            "--dns-resolved", "--resolved-dir", str(self.dropins), "--",
            f"-bind={ADVERTISE}", f"-client={CLIENT}", "-node=dns1", f"-http-port={self.http}",
            f"-dns-port={self.dns}", f"-serf-lan-port={serf_lan}", f"-serf-wan-port={serf_wan}",
            f"-server-port={server}", "-grpc-port=-1", "-hcl=disable_update_check = true",
            "-hcl=performance { raft_multiplier = 1 }"], root / "bootstrap.log")
        self.systemd = systemd

    def start(self):
        import os
        os.environ["DBUS_SYSTEM_BUS_ADDRESS"] = self.systemd.address     # inherited by the child only here
        try:
            return super().start()
        finally:
            del os.environ["DBUS_SYSTEM_BUS_ADDRESS"]

    def api(self, method, path, body=None):
        req = urllib.request.Request(f"http://{CLIENT}:{self.http}{path}", method=method,
                                     data=json.dumps(body).encode() if body is not None else None)
        with urllib.request.urlopen(req, timeout=3) as r:
            data = r.read()
            return json.loads(data) if data.strip() else None

    def dropin(self) -> Path | None:
        found = list(self.dropins.glob("*.conf")) if self.dropins.exists() else []
        return found[0] if found else None


def resolve(address: str, port: int, name: str) -> list[str]:
    answer = dns.query.udp(dns.message.make_query(name, "A"), address, port=port, timeout=2)
    return sorted(r.address for rrset in answer.answer if rrset.rdtype == dns.rdatatype.A for r in rrset)


@pytest.fixture
def server(etcd, systemd, tmp_path):
    s = Server(etcd, systemd, tmp_path).start()
    try:
        wait_until(lambda: s.api("GET", "/v1/status/leader"), 30, interval=0.1, what="the server's leader")
        wait_until(s.dropin, 10, what="the resolved drop-in")
        yield s
    finally:
        s.kill()
        print(s.log()[-3000:])


def test_the_dropin_names_where_consul_answers_dns_and_resolved_is_reloaded(server, systemd):
    server.api("PUT", "/v1/agent/service/register", {"Name": "redis", "ID": "redis1", "Address": "127.0.0.1",
                                                    "Port": 6379})
    server.api("PUT", "/v1/agent/service/register", {"Name": "redis", "ID": "redis2", "Address": "127.0.0.4",
                                                    "Port": 6379})
    text = server.dropin().read_text()
    target = re.search(r"^DNS=(\S+):(\d+)$", text, re.M)
    assert target and "Domains=~consul" in text, text
    assert (target.group(1), int(target.group(2))) == (CLIENT, server.dns)       # -client, not -advertise
    assert wait_until(lambda: resolve(CLIENT, server.dns, "redis.service.consul") == ["127.0.0.1", "127.0.0.4"],
                      10, what="both redis instances through the drop-in's target")
    server.api("PUT", "/v1/agent/service/deregister/redis2")
    wait_until(lambda: resolve(CLIENT, server.dns, "redis.service.consul") == ["127.0.0.1"], 10,
               what="the stopped instance gone from the answer")
    assert [args for _, args in systemd.reloads()] == [("systemd-resolved.service", "replace")]


def test_a_stop_cut_short_mid_leave_leaves_no_dropin_and_no_announcement(server, systemd, etcd):
    """SIGTERM, then SIGKILL one second later (a `docker stop` whose grace period runs out)."""
    dropin = server.dropin()
    assert etcd_has(etcd, KEY)
    t0 = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    wait_until(lambda: not dropin.exists(), 2, what="the drop-in removed right after SIGTERM")
    removed = time.monotonic() - t0
    time.sleep(max(0.0, 1.0 - removed))
    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait(5)
    assert not dropin.exists() and not etcd_has(etcd, KEY)
    assert len(systemd.reloads()) == 2                         # after writing, after removing
    log = server.log()
    assert log.index("removed ") < log.index("revoked lease") < log.index("leaving the cluster gracefully")
    print(f"drop-in removed {removed:.2f}s after SIGTERM")


def test_without_a_bus_the_dropin_is_written_and_one_line_says_what_to_do(etcd, tmp_path):
    class NoBus:
        address = f"unix:path={tmp_path}/no-bus"
    s = Server(etcd, NoBus(), tmp_path).start()
    try:
        wait_until(s.dropin, 30, what="the drop-in")
        wait_until(lambda: "not reloaded" in s.log(), 5, what="the line about resolved")
        line = next(x for x in s.log().splitlines() if "not reloaded" in x)
        assert "systemctl restart systemd-resolved" in line and "/run/dbus" in line
    finally:
        s.stop(30)
    assert s.dropin() is None
