"""What the edge asks Consul, seen through a recording proxy in front of a real agent: stale
long-polls by default, consistent reads on request; a slow sweep that holds back no change; and
the edge's own metrics on the admin listener."""

from __future__ import annotations

import http.server
import threading
import time
import urllib.parse
import urllib.request

import pytest

from tests.integration.edge_helpers import answers, register
from tests.support.edge import EdgeProcess
from tests.support.http import Backend
from tests.support.procs import consul_agent, wait_until

pytestmark = pytest.mark.integration
DOMAIN = "reads.example"


class RecordingProxy:
    """Forwards every request to Consul and records (path, query) of each. `slow`: path -> seconds
    a read of it waits first. `hold` set: the summary long-poll's next answer waits until `release`
    (`held` says it does), then is asked again, so that it covers every write made meanwhile."""

    def __init__(self, upstream: str):
        self.requests: list[tuple[str, dict]] = []
        self.slow: dict[str, float] = {}
        self.hold, self.held, self.release = threading.Event(), threading.Event(), threading.Event()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):
                url = urllib.parse.urlsplit(self.path)
                proxy.requests.append((url.path, urllib.parse.parse_qs(url.query, keep_blank_values=True)))
                time.sleep(proxy.slow.get(url.path, 0.0))
                status, headers, body = self.forward()
                if url.path == "/v1/internal/ui/services" and "index" in url.query and proxy.hold.is_set():
                    proxy.hold.clear()
                    proxy.held.set()
                    proxy.release.wait(30)
                    status, headers, body = self.forward()
                self.send_response(status)
                for k, v in headers.items():
                    if k.lower().startswith("x-consul") or k.lower() == "content-type":
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def forward(self):
                req = urllib.request.Request(upstream + self.path, headers={
                    k: v for k, v in self.headers.items() if k.lower() == "x-consul-token"})
                try:
                    with urllib.request.urlopen(req, timeout=60) as r:
                        return r.status, r.headers, r.read()
                except urllib.error.HTTPError as e:
                    return e.code, e.headers, e.read()

            def log_message(self, *args):
                pass
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def long_polls(self) -> list[dict]:
        return [q for _, q in self.requests if "index" in q]

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def consul(tmp_path_factory):
    with consul_agent(tmp_path_factory.mktemp("consul")) as agent:
        yield agent


@pytest.fixture
def proxy(consul):
    p = RecordingProxy(consul.url)
    yield p
    p.close()


@pytest.mark.parametrize("extra, mode", [((), "stale"), (("--consistency", "consistent"), "consistent")])
def test_reads_carry_the_consistency_mode(consul, proxy, extra, mode):
    backend = Backend("reads")
    edge = EdgeProcess(proxy.url, domains=(DOMAIN,), extra=extra).start()
    try:
        register(consul, "readme", f"readme-{mode}", backend)
        answers(edge, f"readme-80.{DOMAIN}", {"reads"})
        wait_until(lambda: proxy.long_polls(), 10, what="a long-poll through the proxy")
        polls = proxy.long_polls()
        assert all(mode in q for q in polls), polls
        # The watch's other reads (the ACL guard's confirmation reads are consistent on purpose).
        reads = [q for path, q in proxy.requests
                 if path.startswith(("/v1/internal/", "/v1/health/service/")) and "index" not in q]
        if mode == "consistent":
            assert reads and all("consistent" in q for q in reads), reads
        else:
            # A lone agent is the leader: it never shows that a follower's own state has caught up
            # (edge.consul.freshness), so what is not a long-poll is read from the leader's state.
            assert reads and not any("stale" in q or "consistent" in q for q in reads), reads
    finally:
        edge.stop()
        backend.close()


def test_a_slow_sweep_holds_back_no_new_vhost(consul, proxy):
    """docs/performance.md section 11: one answer covering two writes (an instance re-registered
    in place, a new vhost) gets a verification; its read of every service takes 5 s here. A
    vhost registered while it reads is routed at once, not after it; what it finds follows."""
    moved, new0, new1 = Backend("moved"), Backend("nv0"), Backend("nv1")
    first = Backend("first")
    edge = EdgeProcess(proxy.url, domains=(DOMAIN,), spares=4).start()
    try:
        register(consul, "inplace", "inplace-1", first)
        answers(edge, f"inplace-80.{DOMAIN}", {"first"})
        proxy.slow["/v1/internal/ui/nodes"] = 5.0          # every sweep's read from now on
        proxy.hold.set()
        register(consul, "inplace", "inplace-1", moved)     # in place: the summary shows nothing
        register(consul, "nv0", "nv0-1", new0)
        wait_until(lambda: consul.api("GET", "/v1/catalog/service/nv0") and
                   consul.api("GET", "/v1/catalog/service/inplace")[0]["ServicePort"] == moved.port, 10,
                   what="both writes in the catalog")
        wait_until(proxy.held.is_set, 10, what="the long-poll's answer held")
        proxy.release.set()                                 # one answer covering both writes
        answers(edge, f"nv0-80.{DOMAIN}", {"nv0"})
        register(consul, "nv1", "nv1-1", new1)
        t0 = time.monotonic()
        answers(edge, f"nv1-80.{DOMAIN}", {"nv1"}, timeout=20)
        took = time.monotonic() - t0
        assert took < 2.5, f"nv1 routed {took:.1f} s after its registration\n{edge.log()[-3000:]}"
        answers(edge, f"inplace-80.{DOMAIN}", {"moved"}, timeout=20)       # what the sweep found
        assert "sweep (verify) read every service" in edge.log()
    finally:
        edge.stop()
        for b in (first, moved, new0, new1):
            b.close()


def test_the_edge_serves_its_own_metrics_on_the_admin_listener(consul):
    backend = Backend("metered")
    edge = EdgeProcess(consul.url, domains=(DOMAIN,)).start()
    try:
        register(consul, "metered", "metered-1", backend)
        answers(edge, f"metered-80.{DOMAIN}", {"metered"})
        second = Backend("metered-2")
        register(consul, "metered", "metered-2", second)
        answers(edge, f"metered-80.{DOMAIN}", {"metered", "metered-2"})
        second.close()

        def scrape():
            with urllib.request.urlopen(f"http://127.0.0.1:{edge.admin_port}/edge/metrics", timeout=5) as r:
                return r.read().decode()
        text = wait_until(lambda: 'edge_changes_applied_total{how="live",reason="instances"}' in scrape()
                          and scrape(), 10, what="a live change in the metrics")
        assert 'edge_consul_requests_total{endpoint="/v1/internal/ui/services",outcome="ok"}' in text
        assert 'edge_changes_applied_total{how="reload",reason=' in text       # the new vhost (or initial sync)
        assert "edge_change_apply_seconds_bucket" in text
        assert "edge_routes " in text and "edge_servers " in text
        # HAProxy's own exporter still answers beside it, and the stats page.
        with urllib.request.urlopen(f"http://127.0.0.1:{edge.admin_port}/metrics", timeout=5) as r:
            assert b"haproxy_process" in r.read()
        with urllib.request.urlopen(f"http://127.0.0.1:{edge.admin_port}/", timeout=5) as r:
            assert b"Statistics Report" in r.read()
    finally:
        edge.stop()
        backend.close()
