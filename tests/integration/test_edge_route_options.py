"""Per-route options end to end, real Consul and HAProxy on loopback: weights measured over a few
hundred requests, sticky cookies, allow/deny from two loopback source addresses, basic auth,
timeouts, a connection cap and the backend protocol (h2c, HTTPS with and without verification).

One Consul agent and one edge (every tag grammar) serve the module; each test has its own names.
"""

from __future__ import annotations

import http.client
import subprocess
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.integration.edge_helpers import logged, register
from tests.support.edge import EdgeProcess
from tests.support.http import Backend
from tests.support.procs import consul_per_module, free_ports, require, stop_process, wait_until
from tests.support.tlsgen import make_ca

pytestmark = pytest.mark.integration
consul = consul_per_module(per_haproxy=True)


@pytest.fixture(scope="module")
def edge(consul, haproxy):
    proc = EdgeProcess(consul.url, domains=("test.example",), haproxy=haproxy.path,
                       extra=("--tag-grammar", "edge,fabio,traefik")).start()
    yield proc
    proc.stop()
    print(proc.log()[-5000:])


@pytest.fixture
def backends():
    made = []

    def make(name, **kw):
        made.append(Backend(name, **kw))
        return made[-1]
    yield make
    for b in made:
        b.close()


def request(edge, host: str, path: str = "/", source: str = "127.0.0.1", headers=None
            ) -> tuple[int, str, dict[str, str]]:
    """GET from a chosen loopback source address: (status, body, headers)."""
    conn = http.client.HTTPConnection(edge.address, edge.port, timeout=10, source_address=(source, 0))
    try:
        conn.request("GET", path, headers={"Host": host, "Connection": "close", **(headers or {})})
        resp = conn.getresponse()
        return resp.status, resp.read().decode(errors="replace"), {k.lower(): v for k, v in resp.getheaders()}
    finally:
        conn.close()


def ready(edge, host: str, path: str = "/", status: int = 200, timeout: float = 10.0) -> None:
    wait_until(lambda: request(edge, host, path)[0] == status, timeout, what=f"{host}{path} answering {status}")


def shares(edge, host: str, n: int = 400) -> Counter:
    return Counter(request(edge, host, "/")[1] for _ in range(n))


def test_weights_between_services_canary(consul, edge, backends):
    register(consul, "wstable", "wstable-1", backends("stable"), tags=("edge.route=weights.example.org/",))
    register(consul, "wcanary", "wcanary-1", backends("canary"), tags=("edge.route=weights.example.org/ weight=20",))
    wait_until(lambda: {"stable", "canary"} <= set(shares(edge, "weights.example.org", 40)), 10,
               what="both services answering")
    counts = shares(edge, "weights.example.org", 400)
    assert 45 <= counts["canary"] <= 120 and counts["stable"] + counts["canary"] == 400, counts   # 20% of 400 = 80


def test_weights_between_instances(consul, edge, backends):
    register(consul, "wins", "wins-1", backends("light"), tags=("edge.weight=1",))
    register(consul, "wins", "wins-2", backends("heavy"), tags=("edge.weight=3",))
    wait_until(lambda: {"light", "heavy"} <= set(shares(edge, "wins-80.test.example", 40)), 10, what="both")
    counts = shares(edge, "wins-80.test.example", 400)
    assert 60 <= counts["light"] <= 140, counts         # 1/4 of 400 = 100 (round robin: exactly, give or take)


def test_sticky_cookie(consul, edge, backends):
    register(consul, "sticky", "sticky-1", backends("one"), tags=("edge.sticky=EDGESTICK",))
    register(consul, "sticky", "sticky-2", backends("two"), tags=("edge.sticky=EDGESTICK",))
    wait_until(lambda: {"one", "two"} <= set(shares(edge, "sticky-80.test.example", 10)), 10, what="both")
    _, first, headers = request(edge, "sticky-80.test.example")
    cookie = headers["set-cookie"].split(";")[0]
    assert cookie.startswith("EDGESTICK=s")
    assert {request(edge, "sticky-80.test.example", headers={"Cookie": cookie})[1] for _ in range(20)} == {first}


def test_allow_and_deny_by_source_address(consul, edge, backends):
    register(consul, "guarded", "guarded-1", backends("guarded"),
             tags=("edge.route=allow.example.org/ allow=127.0.0.1", "edge.route=deny.example.org/ deny=127.0.0.2"))
    ready(edge, "allow.example.org")
    assert request(edge, "allow.example.org", source="127.0.0.2")[0] == 403
    assert request(edge, "deny.example.org", source="127.0.0.1")[0] == 200
    assert request(edge, "deny.example.org", source="127.0.0.2")[0] == 403
    logged(edge, "access rules (allow, deny, basic auth) changed")


def test_basic_auth_with_a_hashed_password(consul, edge, backends):
    hashed = subprocess.run([require("openssl"), "passwd", "-6", "-salt", "edgesalt", "s3cret"], capture_output=True,
                            text=True, check=True).stdout.strip()
    register(consul, "private", "private-1", backends("private"),
             tags=(f"edge.route=private.example.org/ auth=alice:{hashed}",))
    ready(edge, "private.example.org", status=401)
    status, _, headers = request(edge, "private.example.org")
    assert status == 401 and headers["www-authenticate"].startswith("Basic realm=")
    assert request(edge, "private.example.org", headers={"Authorization": "Basic YWxpY2U6d3Jvbmc="})[0] == 401
    assert request(edge, "private.example.org", headers={"Authorization": "Basic YWxpY2U6czNjcmV0"})[:2] == \
        (200, "private")                                    # alice:s3cret


def test_server_timeout_and_connection_cap(consul, edge, backends):
    register(consul, "slow", "slow-1", backends("slow", delay=2.0), tags=("edge.timeout-server=500ms",))
    ready(edge, "slow-80.test.example", status=504, timeout=15)
    register(consul, "capped", "capped-1", backends("capped", delay=0.5), tags=("edge.maxconn=1",))
    ready(edge, "capped-80.test.example", timeout=15)
    t0 = time.monotonic()
    with ThreadPoolExecutor(4) as pool:
        statuses = list(pool.map(lambda _: request(edge, "capped-80.test.example")[0], range(4)))
    assert statuses == [200] * 4 and time.monotonic() - t0 >= 1.9, "4 requests, one at a time, 0.5 s each"


def h2c_server(port: int, tmp_path) -> subprocess.Popen:
    """An HAProxy answering HTTP/2 without TLS (prior knowledge), saying which version it got."""
    cfg = tmp_path / "h2c.cfg"
    cfg.write_text(f"""defaults
    mode http
    timeout client 5s
frontend h2c
    bind 127.0.0.1:{port} proto h2
    http-request return status 200 content-type text/plain lf-string "h2c %[req.ver]"
""")
    return subprocess.Popen([require("haproxy"), "-db", "-f", str(cfg)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def test_backend_protocols(consul, edge, backends, tmp_path):
    port = free_ports(1)[0]
    server = h2c_server(port, tmp_path)
    try:
        consul.api("PUT", "/v1/agent/service/register", {
            "Name": "grpcish", "ID": "grpcish-1", "Address": "127.0.0.1", "Port": port,
            "Tags": ["urlprefix-grpc.example.org/ proto=grpc"], "Meta": {"container_port": "80"}})
        wait_until(lambda: request(edge, "grpc.example.org")[1] == "h2c 2.0", 10, what="h2c to the instance")
    finally:
        stop_process(server)
    ca = make_ca("instance CA")
    cert, key = ca.issue(["selfsigned.example.org"])
    (tmp_path / "c.pem").write_text(cert)
    (tmp_path / "k.pem").write_text(key)
    tls = (str(tmp_path / "c.pem"), str(tmp_path / "k.pem"))
    register(consul, "tlsskip", "tlsskip-1", backends("tls-skip", tls=tls),
             tags=("urlprefix-skip.example.org/ proto=https tlsskipverify=true",))
    register(consul, "tlsverify", "tlsverify-1", backends("tls-verify", tls=tls),
             tags=("urlprefix-verify.example.org/ proto=https",))
    ready(edge, "skip.example.org")
    assert request(edge, "skip.example.org")[1] == "tls-skip"
    ready(edge, "verify.example.org", status=503)           # a certificate no system CA signed: refused
