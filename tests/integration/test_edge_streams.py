"""TCP routers and SNI passthrough end to end, real Consul and HAProxy on loopback: a TCP service on
its own port of the edge (a new port is a reload, with its reason logged), and TLS for a chosen
name passed through untouched to a backend that terminates it with its own certificate, beside
names the edge terminates on the same port, with the clients' addresses kept on that side."""

from __future__ import annotations

import http.client
import socket
import socketserver
import ssl
import threading

import pytest
from cryptography import x509

from tests.integration.edge_helpers import logged, register
from tests.support.edge import EdgeProcess
from tests.support.http import Backend
from tests.support.procs import consul_per_module, free_ports, wait_until
from tests.support.tlsgen import make_ca

pytestmark = pytest.mark.integration
consul = consul_per_module(per_haproxy=True)
BACKEND_CA = make_ca("backend's own CA")


@pytest.fixture(scope="module")
def edge(consul, haproxy):
    address = "127.0.0.1"
    proc = EdgeProcess(consul.url, domains=("test.example",), https_port=free_ports(1, address)[0],
                       haproxy=haproxy.path, extra=("--tag-grammar", "edge,traefik", "--no-https-redirect")).start()
    yield proc
    proc.stop()
    print(proc.log()[-5000:])


class Echo(socketserver.ThreadingTCPServer):
    """A TCP service that is not HTTP: each line comes back prefixed."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self):
        class Handler(socketserver.StreamRequestHandler):
            def handle(self):
                for line in self.rfile:
                    self.wfile.write(b"echo " + line)
        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()


def tcp_roundtrip(port: int, text: str) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(text.encode() + b"\n")
        return s.makefile("rb").readline().decode().strip()


def test_a_tcp_service_on_its_own_port_of_the_edge(consul, edge):
    echo = Echo()
    port = free_ports(1)[0]
    logged(edge, "because initial sync", timeout=15)       # so that the new port has a reload of its own
    try:
        consul.api("PUT", "/v1/agent/service/register", {
            "Name": "redis", "ID": "redis-1", "Address": "127.0.0.1", "Port": echo.server_address[1],
            "Tags": [f"edge.tcp={port}"], "Meta": {"container_port": "6379"}})
        wait_until(lambda: _try(lambda: tcp_roundtrip(port, "PING")) == "echo PING", 10, what="TCP route")
        logged(edge, f"TCP/SNI router added: tcp :{port}")        # the reload's reason
    finally:
        echo.shutdown()
        echo.server_close()


def _try(call):
    try:
        return call()
    except OSError:
        return None


def tls_get(edge, name: str, source: str = "127.0.0.1") -> tuple[x509.Certificate, int, str]:
    """An HTTPS GET with SNI `name`, trusting anything: (the certificate served, status, body)."""
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    raw = socket.create_connection((edge.address, edge.https_port), timeout=5, source_address=(source, 0))
    with context.wrap_socket(raw, server_hostname=name) as s:
        cert = x509.load_der_x509_certificate(s.getpeercert(binary_form=True))
        s.sendall(f"GET / HTTP/1.1\r\nHost: {name}\r\nConnection: close\r\n\r\n".encode())
        response = http.client.HTTPResponse(s)
        response.begin()
        return cert, response.status, response.read().decode()


def test_sni_passthrough_beside_terminated_names_on_one_port(consul, edge, tmp_path):
    cert, key = BACKEND_CA.issue(["secure.example.org"])
    (tmp_path / "c.pem").write_text(cert)
    (tmp_path / "k.pem").write_text(key)
    own_tls = Backend("terminated by the backend", tls=(str(tmp_path / "c.pem"), str(tmp_path / "k.pem")))
    plain = Backend("terminated by the edge")
    try:
        register(consul, "secure", "secure-1", own_tls, tags=("edge.sni=secure.example.org",))
        register(consul, "site", "site-1", plain, tags=("edge.route=site.example.org/ allow=127.0.0.2",))
        wait_until(lambda: _try(lambda: tls_get(edge, "secure.example.org")[1:]) == (200, "terminated by the backend"),
                   15, what="TLS passed through by SNI")
        served, _, _ = tls_get(edge, "secure.example.org")
        assert served.issuer == BACKEND_CA.cert.subject, "the client sees the backend's own certificate"
        wait_until(lambda: _try(lambda: tls_get(edge, "site.example.org", "127.0.0.2")[1:]) ==
                   (200, "terminated by the edge"), 10, what="a terminated name on the same port")
        served, _, _ = tls_get(edge, "site.example.org", "127.0.0.2")
        assert served.issuer != BACKEND_CA.cert.subject
        # The terminating side sees the client's own address (PROXY protocol on the internal hop):
        # the allow list lets 127.0.0.2 in and keeps 127.0.0.1 out.
        assert tls_get(edge, "site.example.org", "127.0.0.1")[1] == 403
    finally:
        own_tls.close()
        plain.close()


def test_traefik_tcp_router_with_tls_passthrough(consul, edge, tmp_path):
    cert, key = BACKEND_CA.issue(["db.example.org"])
    (tmp_path / "c.pem").write_text(cert)
    (tmp_path / "k.pem").write_text(key)
    db = Backend("db over its own TLS", tls=(str(tmp_path / "c.pem"), str(tmp_path / "k.pem")))
    try:
        register(consul, "tdb", "tdb-1", db, tags=("traefik.tcp.routers.db.rule=HostSNI(`db.example.org`)",
                                                   "traefik.tcp.routers.db.tls.passthrough=true"))
        wait_until(lambda: _try(lambda: tls_get(edge, "db.example.org")[1:]) == (200, "db over its own TLS"), 15,
                   what="Traefik's passthrough router")
    finally:
        db.close()
