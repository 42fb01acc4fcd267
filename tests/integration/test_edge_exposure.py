"""What the edge shows to whom (issue 19): the landing page's list of routes only to the
operator's networks (`--landing-list-from`), a plain 404 to everyone else; Consul's web UI on the
network read-only (`--consul-ui-bind`): its pages and reads, never KV, ACLs, agent endpoints or a
write. Real HAProxy, Consul (dev mode serves the UI) and Chromium on loopback; clients come from
chosen 127.0.0.0/8 source addresses. UPDATE_SCREENSHOTS=1 writes docs/img/consul-ui.png."""

from __future__ import annotations

import http.client
import json
import os

import pytest

from tests.integration.edge_helpers import answers, deregister, register
from tests.support.cdp import render_page
from tests.support.edge import REPO, EdgeProcess
from tests.support.http import Backend, get
from tests.support.procs import consul_per_module, free_ports

pytestmark = pytest.mark.integration
DOMAIN = "expo.example"
IMG = REPO / "docs" / "img"

consul = consul_per_module()


@pytest.fixture
def route(consul):
    backend = Backend("secret-app")
    register(consul, "secretapp", "secretapp-1", backend)
    yield backend
    deregister(consul, "secretapp-1")
    backend.close()


@pytest.mark.parametrize("extra, listed, unlisted", [
    ((), ("127.0.0.1", "127.0.0.3"), ()),                                    # default: loopback is private
    (("--landing-list-from", "127.0.0.2/32,10.0.0.0/8"), ("127.0.0.2",), ("127.0.0.1", "127.0.0.3")),
    (("--landing-list-from", "none"), (), ("127.0.0.1", "127.0.0.2")),
])
def test_only_listed_networks_see_the_routes_on_an_unknown_host(consul, route, extra, listed, unlisted):
    edge = EdgeProcess(consul.url, domains=(DOMAIN,), extra=extra).start()
    try:
        answers(edge, f"secretapp-80.{DOMAIN}", {"secret-app"})
        for source in listed:
            status, body = get(edge.port, "unknown.example", source=source)
            assert status == 404 and f"secretapp-80.{DOMAIN}" in body, (source, body)
        for source in unlisted:
            status, body = get(edge.port, "unknown.example", source=source)
            assert status == 404 and "secretapp" not in body and "route" not in body.lower(), (source, body)
            assert body == "<!doctype html><title>404 Not Found</title><h1>404 Not Found</h1>"
            # A known route still answers whoever asks: only the list is withheld.
            assert get(edge.port, f"secretapp-80.{DOMAIN}", source=source) == (200, "secret-app")
    finally:
        edge.stop()


# --- Consul's UI, read-only on the network (--consul-ui-bind) ------------------------------------
UI_ADDRESS = "127.0.0.2"        # "the host's address"; Consul's own API stays on 127.0.0.1


@pytest.fixture(scope="module")
def ui_edge(consul):
    port = free_ports(1, UI_ADDRESS)[0]
    edge = EdgeProcess(consul.url, domains=(DOMAIN,), extra=("--consul-ui-bind", f"{UI_ADDRESS}:{port}")).start()
    yield edge, port
    edge.stop()


def ui_request(port: int, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(UI_ADDRESS, port, timeout=10)
    try:
        conn.request(method, path, body=body, headers={"Connection": "close"})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def test_the_consul_ui_is_served_read_only_on_the_ui_address(consul, ui_edge, route):
    _, port = ui_edge
    consul.api("PUT", "/v1/kv/haproxy-consul/certs/secret", "PRIVATE KEY")
    status, page = ui_request(port, "GET", "/ui/")
    assert status == 200 and b"consul-ui" in page
    assert ui_request(port, "GET", "/")[0] in (200, 301)              # Consul sends / to /ui/
    status, services = ui_request(port, "GET", "/v1/internal/ui/services?dc=dc1")
    assert status == 200 and any(s["Name"] == "consul" for s in json.loads(services))
    for path in ("/v1/catalog/services", "/v1/health/service/consul", "/v1/catalog/datacenters",
                 "/v1/status/leader", "/v1/coordinate/nodes"):
        assert ui_request(port, "GET", path)[0] == 200, path
    refused = [("GET", "/v1/kv/?recurse"), ("GET", "/v1/kv/haproxy-consul/certs/secret?raw"),
               ("GET", "/v1/agent/self"), ("GET", "/v1/acl/tokens"), ("GET", "/v1/snapshot"),
               ("GET", "/v1/operator/raft/configuration"), ("PUT", "/v1/kv/x"),
               ("PUT", "/v1/agent/service/deregister/secretapp-1"), ("DELETE", "/v1/kv/haproxy-consul?recurse"),
               ("POST", "/v1/catalog/register"), ("PUT", "/v1/agent/leave"),
               ("GET", "/ui/../v1/kv/?recurse"), ("GET", "/v1/catalog/../kv/?recurse"),
               ("GET", "/ui/%2e%2e/v1/kv/?recurse"), ("GET", "//v1/kv/?recurse"), ("GET", "/v1/kv%2f?recurse")]
    for method, path in refused:
        status, body = ui_request(port, method, path, b"{}" if method != "GET" else None)
        assert status == 403 and b"PRIVATE KEY" not in body, (method, path, status, body[:200])
    assert [s["ServiceID"] for s in consul.api("GET", "/v1/catalog/service/secretapp")] == ["secretapp-1"]


def test_a_chromium_screenshot_of_the_consul_ui_through_the_edge(consul, ui_edge, tmp_path):
    _, port = ui_edge
    backends = [Backend("nginx"), Backend("nginx"), Backend("redis")]
    register(consul, "nginx", "nginx-1", backends[0])
    register(consul, "nginx", "nginx-2", backends[1])
    register(consul, "redis", "redis-1", backends[2], cport=6379)
    shots = IMG if os.environ.get("UPDATE_SCREENSHOTS") else tmp_path
    try:
        dom = render_page(f"http://{UI_ADDRESS}:{port}/ui/dc1/services",
                          "document.body.innerText.includes('2 Instances') && "
                          "document.body.innerText.includes('redis')",
                          tmp_path, shots / "consul-ui.png")
        assert "2 Instances" in dom and "Consul 1." in dom
        assert (shots / "consul-ui.png").stat().st_size > 10_000
        # The KV tab reaches the edge and is refused there: the keys are not shown.
        kv = render_page(f"http://{UI_ADDRESS}:{port}/ui/dc1/kv", "document.body.innerText.includes('403') || "
                         "document.body.innerText.toLowerCase().includes('error')", tmp_path)
        assert "haproxy-consul" not in kv.split("<body", 1)[1]
    finally:
        for sid in ("nginx-1", "nginx-2", "redis-1"):
            deregister(consul, sid)
        for b in backends:
            b.close()
