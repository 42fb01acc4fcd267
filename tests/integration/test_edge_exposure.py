"""What the edge shows to whom (issue 19): the landing page's list of routes only to the
operator's networks (`--landing-list-from`), a plain 404 to everyone else. Real HAProxy and
Consul on loopback; clients come from chosen 127.0.0.0/8 source addresses."""

from __future__ import annotations

import http.client

import pytest

from tests.integration.edge_helpers import answers, deregister, register
from tests.support.edge import EdgeProcess
from tests.support.http import Backend
from tests.support.procs import consul_per_module

pytestmark = pytest.mark.integration
DOMAIN = "expo.example"

consul = consul_per_module()


def get_from(source: str, port: int, host: str, address: str = "127.0.0.1", path: str = "/") -> tuple[int, str]:
    """GET with a Host header from a given source address."""
    conn = http.client.HTTPConnection(address, port, timeout=5, source_address=(source, 0))
    try:
        conn.request("GET", path, headers={"Host": host, "Connection": "close"})
        resp = conn.getresponse()
        return resp.status, resp.read().decode(errors="replace")
    finally:
        conn.close()


@pytest.fixture(scope="module")
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
            status, body = get_from(source, edge.port, "unknown.example")
            assert status == 404 and f"secretapp-80.{DOMAIN}" in body, (source, body)
        for source in unlisted:
            status, body = get_from(source, edge.port, "unknown.example")
            assert status == 404 and "secretapp" not in body and "route" not in body.lower(), (source, body)
            assert body == "<!doctype html><title>404 Not Found</title><h1>404 Not Found</h1>"
            # A known route still answers whoever asks: only the list is withheld.
            assert get_from(source, edge.port, f"secretapp-80.{DOMAIN}") == (200, "secret-app")
    finally:
        edge.stop()
