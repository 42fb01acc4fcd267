"""HTTPS through real edges, HAProxy, Consul and pebble (Let's Encrypt's ACME test server), all on
loopback (issue 9): certificates ordered once for the fleet and served by every edge, from
files and Consul KV, applied live, never by a reload. On every supported HAProxy
(tests/integration/conftest.py), each with a Consul of its own (certificates in KV stay with it)."""

from __future__ import annotations

import os
import re
import shutil
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.integration.edge_helpers import answers, deregister, logged, register, reloads
from tests.integration.test_browser import IMG, chromium
from tests.support.bind import bind_server
from tests.support.edge import EdgeProcess
from tests.support.http import Backend
from tests.support.pebble import pebble_server
from tests.support.procs import consul_agent, consul_per_module, free_ports, require, wait_until
from tests.support.tlsgen import make_ca

pytestmark = pytest.mark.integration
DOMAIN = "apps.test"
CA = make_ca("https test CA")


def curl(*args: str, timeout: float = 10) -> subprocess.CompletedProcess:
    return subprocess.run([require("curl"), "-sS", "--max-time", "5", *args], capture_output=True, text=True,
                          timeout=timeout)


def https_get(edge: EdgeProcess, host: str, cafile: Path, path: str = "/", *extra: str) -> tuple[str, str, str]:
    """(status, HTTP version, body) of a verified HTTPS request to `host` on this edge."""
    address = edge.address
    out = curl("--cacert", str(cafile), "--resolve", f"{host}:{edge.https_port}:{address}", "--http2",
               "-w", "\n%{http_code} %{http_version}", *extra, f"https://{host}:{edge.https_port}{path}")
    if out.returncode != 0:
        return "000", "", out.stderr
    body, _, status_line = out.stdout.rpartition("\n")
    status, version = status_line.split()
    return status, version, body


def presented(edge: EdgeProcess, host: str) -> str:
    """The certificate the edge presents for `host` (SNI), as `openssl s_client` prints it."""
    out = subprocess.run([require("openssl"), "s_client", "-connect", f"{edge.address}:{edge.https_port}",
                          "-servername", host], input="", capture_output=True, text=True, timeout=10)
    return out.stdout


def serial(edge: EdgeProcess, host: str) -> str:
    pem = re.search(r"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----", presented(edge, host), re.S)
    if pem is None:
        return ""
    out = subprocess.run([require("openssl"), "x509", "-noout", "-serial"], input=pem.group(0),
                         capture_output=True, text=True)
    return out.stdout.strip()


def Edge(consul_url: str, address: str, port: int, https_port: int, extra=(), **kwargs) -> EdgeProcess:
    """An edge on one loopback address with an HTTPS listener."""
    return EdgeProcess(consul_url, domains=(DOMAIN,), address=address, port=port, https_port=https_port,
                       extra=tuple(extra), **kwargs)


def two_free_ports() -> tuple[int, int]:
    """Ports free on both 127.0.0.1 and 127.0.0.2 (each edge binds its own address)."""
    for _ in range(50):
        ports = free_ports(2, "127.0.0.1")
        if all(free_ports_on("127.0.0.2", p) for p in ports):
            return ports[0], ports[1]
    raise RuntimeError("no common free ports on 127.0.0.1 and 127.0.0.2")


def free_ports_on(address: str, port: int) -> bool:
    import socket
    with socket.socket() as s:
        try:
            s.bind((address, port))
            return True
        except OSError:
            return False


consul = consul_per_module(per_haproxy=True)


@pytest.fixture
def cafile(tmp_path) -> Path:
    """The test CA's certificate, for clients that verify what the edges serve from it."""
    path = tmp_path / "ca.pem"
    path.write_text(CA.pem)
    return path


@pytest.fixture(scope="module")
def ports():
    return two_free_ports()


@pytest.fixture(scope="module")
def pebble(tmp_path_factory, ports):
    with pebble_server(tmp_path_factory.mktemp("pebble"), http_port=ports[0]) as p:
        root = tmp_path_factory.mktemp("roots") / "pebble-root.pem"
        root.write_text(p.root_pem())
        p.root_file = root
        yield p


@pytest.fixture(scope="module")
def fleet(consul, pebble, ports, tmp_path_factory, haproxy):
    """Edge A (127.0.0.1) orders through ACME; edge B (127.0.0.2) serves KV's certificates only
    (those under apps.test, and under other.test: --acme-allow widens what may be served)."""
    http, https = ports
    acme = ("--acme-directory", pebble.directory, "--acme-ca-bundle", str(pebble.ca_bundle),
            "--acme-email", "ops@apps.test", "--acme-propagation-wait", "1", "--hsts", "300")
    a = Edge(consul.url, "127.0.0.1", http, https, extra=acme, haproxy=haproxy.path).start()
    b = Edge(consul.url, "127.0.0.2", http, https,
             extra=("--certs-kv", "haproxy-consul/certs", "--acme-allow", "other.test"), haproxy=haproxy.path).start()
    yield a, b
    a.stop()
    b.stop()


def test_one_order_for_the_fleet_served_by_every_edge_over_http2(consul, pebble, fleet):
    a, b = fleet
    name = f"nginx-80.{DOMAIN}"
    pebble.add_a(name, "127.0.0.2")              # the CA validates against the edge that does not order
    orders = pebble.orders()
    backend = Backend("nginx over tls")
    t0 = time.monotonic()
    register(consul, "nginx", "nginx-1", backend)
    try:
        for edge in (a, b):
            wait_until(lambda e=edge: https_get(e, name, pebble.root_file)[0] == "200", 30,
                       what=f"a verified HTTPS answer from {edge.address}")
            assert https_get(edge, name, pebble.root_file) == ("200", "2", "nginx over tls")
        took = time.monotonic() - t0
        assert pebble.orders() == orders + 1 and pebble.issued() >= 1
        assert "ordering" not in b.log().lower() or "acme" not in b.log()
        assert serial(a, name) == serial(b, name) != ""
        print(f"registration -> verified HTTPS on both edges: {took:.2f} s")
        for edge in (a, b):
            assert "certificate change through the runtime API failed" not in edge.log()
            assert "certificates applied live" in edge.log()
    finally:
        deregister(consul, "nginx-1")
        backend.close()


def test_redirect_challenge_exemption_hsts_and_the_default_certificate(consul, pebble, fleet):
    a, _ = fleet
    name = f"web-80.{DOMAIN}"
    backend = Backend("web")
    register(consul, "web", "web-1", backend)
    try:
        wait_until(lambda: https_get(a, name, pebble.root_file)[0] == "200", 30, what="web over https")
        out = curl("-o", "/dev/null", "-w", "%{http_code} %{redirect_url}", "-H", f"Host: {name}",
                   f"http://127.0.0.1:{a.port}/some/path?q=1")
        assert out.stdout == f"308 https://{name}:{a.https_port}/some/path?q=1"
        # ACME challenges are never redirected; an unknown token goes to the service as usual.
        assert a.get(name, "/.well-known/acme-challenge/unknown-token") == (200, "web")
        # HSTS on HTTPS answers only (edge A has --hsts 300).
        headers = curl("-D", "-", "-o", "/dev/null", "--cacert", str(pebble.root_file), "--resolve",
                       f"{name}:{a.https_port}:127.0.0.1", f"https://{name}:{a.https_port}/").stdout
        assert "strict-transport-security: max-age=300" in headers.lower()
        plain = curl("-D", "-", "-o", "/dev/null", "-H", "Host: nothing.apps.test", f"http://127.0.0.1:{a.port}/")
        assert "strict-transport-security" not in plain.stdout.lower() and " 404" in plain.stdout
        # A name without a certificate gets the self-signed default one, and the landing page.
        assert "CN = haproxy-consul.invalid" in presented(a, "unknown.apps.test")
        out = curl("-k", "-w", "%{http_code}", "-o", "/dev/null", "--resolve",
                   f"unknown.apps.test:{a.https_port}:127.0.0.1", f"https://unknown.apps.test:{a.https_port}/")
        assert out.stdout == "404"
    finally:
        deregister(consul, "web-1")
        backend.close()


def test_nothing_is_ordered_outside_the_configured_domains(consul, pebble, fleet):
    a, _ = fleet
    backend = Backend("evil")
    orders = pebble.orders()
    register(consul, "evil", "evil-1", backend, tags=("edge.host=www.evil.example",))
    try:
        answers(a, "www.evil.example", {"evil"})
        wait_until(lambda: https_get(a, f"evil-80.{DOMAIN}", pebble.root_file)[0] == "200", 30,
                   what="the route's own name, under the domain, over https")
        time.sleep(1.5)
        assert pebble.orders() == orders + 1                    # evil-80.apps.test only
        assert "www.evil.example" not in pebble.log()
    finally:
        deregister(consul, "evil-1")
        backend.close()


def settled(edge: EdgeProcess, route: str) -> None:
    """Wait until the reload that brought `route` in has returned (reloads are counted from there):
    the route can answer before the reload's log line is written."""
    wait_until(lambda: re.search(rf"reloaded HAProxy.*{route}", edge.log()), 10, what=f"the reload adding {route}")


def metrics(edge: EdgeProcess) -> str:
    import urllib.request
    with urllib.request.urlopen(f"http://{edge.address}:{edge.admin_port}/edge/metrics", timeout=5) as r:
        return r.read().decode()


def put_kv(consul, key: str, value: str) -> None:
    import urllib.request
    req = urllib.request.Request(f"{consul.url}/v1/kv/{key}", data=value.encode(), method="PUT")
    with urllib.request.urlopen(req, timeout=5) as r:
        assert r.read().strip() == b"true"


def test_certificates_from_kv_apply_live_and_a_bad_one_is_refused_alone(consul, fleet, cafile):
    _, b = fleet
    name = "kv.other.test"                # an exact host outside the domains: no ACME order competes
    backend = Backend("kv site")
    register(consul, "kvsite", "kvsite-1", backend, tags=(f"edge.host={name}",))
    try:
        answers(b, name, {"kv site"})
        settled(b, "kvsite-80")
        before = reloads(b.log())
        t0 = time.monotonic()
        put_kv(consul, "haproxy-consul/certs/kvsite", CA.bundle([name]))
        wait_until(lambda: https_get(b, name, cafile)[0] == "200", 5, interval=0.01, what="the KV certificate")
        took = time.monotonic() - t0
        assert took < 1.0, took
        put_kv(consul, "haproxy-consul/certs/broken", "-----BEGIN CERTIFICATE-----\nnope\n")
        logged(b, "broken refused")
        old = serial(b, name)
        put_kv(consul, "haproxy-consul/certs/kvsite", CA.bundle([name], days=60))   # a renewal
        wait_until(lambda: serial(b, name) not in ("", old), 5, what="the renewed certificate")
        assert https_get(b, name, cafile)[0] == "200"
        expiry = re.search(r'edge_certificate_expiry_timestamp_seconds\{name="kv/kvsite"\} (\S+)', metrics(b))
        assert expiry and abs(float(expiry.group(1)) - (time.time() + 60 * 86400)) < 86400   # the renewed one
        consul.api("DELETE", "/v1/kv/haproxy-consul/certs/kvsite")
        wait_until(lambda: "CN = haproxy-consul.invalid" in presented(b, name), 5, what="the default again")
        assert 'name="kv/kvsite"' not in metrics(b)
        assert reloads(b.log()) == before                       # every certificate change was live
    finally:
        for key in ("kvsite", "broken"):
            consul.api("DELETE", f"/v1/kv/haproxy-consul/certs/{key}")
        deregister(consul, "kvsite-1")
        backend.close()


@pytest.fixture
def files_edge(consul, tmp_path, haproxy):
    certs = tmp_path / "certs"
    certs.mkdir()
    http, https = free_ports(2)
    # Its own KV prefix: the fleet's ACME edge stores certificates for every route under the default one.
    edge = Edge(consul.url, "127.0.0.1", http, https,
                extra=("--certs", str(certs), "--certs-kv", "files/certs"), haproxy=haproxy.path).start()
    yield edge, certs
    edge.stop()


def test_certificate_files_apply_live_and_a_bad_file_is_named(consul, files_edge, cafile):
    edge, certs = files_edge
    backend = Backend("files")
    register(consul, "files", "files-1", backend)
    try:
        answers(edge, f"files-80.{DOMAIN}", {"files"})
        settled(edge, "files-80")
        before = reloads(edge.log())
        t0 = time.monotonic()
        (certs / "wild.pem").write_text(CA.bundle([f"*.{DOMAIN}"]))
        wait_until(lambda: https_get(edge, f"files-80.{DOMAIN}", cafile)[0] == "200", 5, interval=0.01,
                   what="the wildcard file served")
        assert time.monotonic() - t0 < 1.0
        cert, key = CA.issue([f"files-80.{DOMAIN}"], days=7)
        (certs / "files.key").write_text(key)
        (certs / "files.crt").write_text(cert + CA.pem)                 # an exact name wins over the wildcard
        wait_until(lambda: "CN = files-80.apps.test" in presented(edge, f"files-80.{DOMAIN}"), 5,
                   what="the crt/key pair")
        (certs / "bad.pem").write_text("garbage")
        logged(edge, "bad.pem refused: no certificate in it")
        assert https_get(edge, f"files-80.{DOMAIN}", cafile)[0] == "200"
        (certs / "files.crt").unlink()
        wait_until(lambda: "CN = *.apps.test" in presented(edge, f"files-80.{DOMAIN}"), 5, what="back to the wildcard")
        assert reloads(edge.log()) == before
        key_file = edge.state_dir / "certs"
        assert all(oct(p.stat().st_mode)[-3:] == "600" for p in key_file.glob("*.pem"))
        assert "PRIVATE KEY" not in edge.log()
    finally:
        deregister(consul, "files-1")
        backend.close()


def test_a_restart_serves_the_same_certificates_before_any_source_answers(consul, files_edge, tmp_path):
    edge, certs = files_edge
    (certs / "site.pem").write_text(CA.bundle([f"restart-80.{DOMAIN}"]))
    wait_until(lambda: "CN = restart-80" in presented(edge, f"restart-80.{DOMAIN}"), 5, what="served")
    edge.stop()
    shutil.rmtree(certs)                                    # the source is gone: what was served stays
    certs.mkdir()
    again = Edge(edge.consul_url.replace("127.0.0.1", "127.0.0.9"), "127.0.0.1", edge.port, edge.https_port,
                 state_dir=edge.state_dir, extra=("--certs-kv", "haproxy-consul/certs"),  # Consul unreachable
                 haproxy=edge.haproxy)
    again.log_path = tmp_path / "again.log"
    again.start()
    try:
        assert "CN = restart-80" in presented(again, f"restart-80.{DOMAIN}")
    finally:
        again.stop()


def test_replacing_a_certificate_under_h2load_fails_no_request(consul, files_edge, cafile):
    edge, certs = files_edge
    backend = Backend("load")
    register(consul, "load", "load-1", backend)
    name = f"load-80.{DOMAIN}"
    try:
        (certs / "load.pem").write_text(CA.bundle([name]))
        answers(edge, name, {"load"})
        settled(edge, "load-80")
        wait_until(lambda: "CN = load-80" in presented(edge, name), 5, what="served")
        before = reloads(edge.log())
        out = {}

        def load():
            out["h2load"] = subprocess.run(
                [require("h2load"), "-D", "3", "-c", "8", "-m", "4", f"--connect-to=127.0.0.1:{edge.https_port}",
                 f"https://{name}:{edge.https_port}/"], capture_output=True, text=True, timeout=120)

        def handshakes():
            """New verified TLS connections all along, each one GET: they see every certificate."""
            context = ssl.create_default_context(cafile=str(cafile))
            out["handshakes"], out["handshake_errors"] = 0, []
            deadline = time.monotonic() + 3
            while time.monotonic() < deadline:
                try:
                    with socket.create_connection(("127.0.0.1", edge.https_port), timeout=5) as raw, \
                            context.wrap_socket(raw, server_hostname=name) as tls:
                        tls.sendall(f"GET / HTTP/1.1\r\nHost: {name}\r\nConnection: close\r\n\r\n".encode())
                        assert tls.recv(12).startswith(b"HTTP/1.1 200")
                    out["handshakes"] += 1
                except (OSError, AssertionError) as exc:
                    out["handshake_errors"].append(repr(exc))
        runners = [threading.Thread(target=load), threading.Thread(target=handshakes)]
        for runner in runners:
            runner.start()
        for i in range(5):
            time.sleep(0.4)
            (certs / "load.pem").write_text(CA.bundle([name], days=10 + i))
        for runner in runners:
            runner.join(130)
        assert out["handshake_errors"] == [] and out["handshakes"] > 20, out
        text = out["h2load"].stdout + out["h2load"].stderr
        m = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored",
                      text)
        assert m, text
        total, _, done, succeeded, failed, errored = map(int, m.groups())
        assert total > 1000 and (done, succeeded, failed, errored) == (total, total, 0, 0), text
        codes = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", text)
        assert int(codes.group(1)) >= total and codes.groups()[1:] == ("0", "0", "0"), text
        assert reloads(edge.log()) == before
        assert edge.log().count("certificates applied live") >= 5
    finally:
        deregister(consul, "load-1")
        backend.close()


def test_chromium_trusting_pebbles_root_loads_an_https_route(consul, pebble, fleet, tmp_path):
    a, _ = fleet
    name = f"hello-80.{DOMAIN}"
    backend = Backend("hello over https, from an edge-ordered certificate")
    register(consul, "hello", "hello-1", backend)
    try:
        wait_until(lambda: https_get(a, name, pebble.root_file)[0] == "200", 30, what="hello over https")
        home = tmp_path / "home"
        nssdb = home / ".pki" / "nssdb"
        nssdb.mkdir(parents=True)
        certutil = require("certutil")
        subprocess.run([certutil, "-d", f"sql:{nssdb}", "-N", "--empty-password"], check=True)
        subprocess.run([certutil, "-d", f"sql:{nssdb}", "-A", "-t", "C,,", "-n", "pebble root", "-i",
                        str(pebble.root_file)], check=True)
        env = {**os.environ, "HOME": str(home)}
        url = f"https://{name}:{a.https_port}/"
        resolve = f"--host-resolver-rules=MAP {name} 127.0.0.1"
        dom = chromium(tmp_path, resolve, "--dump-dom", url, env=env)
        assert "hello over https" in dom, dom[:500]
        shots = IMG if os.environ.get("UPDATE_SCREENSHOTS") else tmp_path
        chromium(tmp_path, resolve, f"--screenshot={shots / 'https.png'}", "--window-size=900,300", url, env=env)
        assert (shots / "https.png").stat().st_size > 3000
        # Without pebble's root, the same page is an interstitial, not the service.
        untrusted = chromium(tmp_path / "untrusted", resolve, "--dump-dom", url,
                             env={**os.environ, "HOME": str(tmp_path / "empty-home")})
        assert "hello over https" not in untrusted
    finally:
        deregister(consul, "hello-1")
        backend.close()


def test_a_wildcard_by_dns01_through_bind_serves_every_route(consul, tmp_path, haproxy):
    with bind_server(tmp_path / "bind", DOMAIN) as bind, \
            pebble_server(tmp_path / "pebble", http_port=free_ports(1)[0], dns_server=("127.0.0.1", bind.port)) as p:
        root = tmp_path / "root.pem"
        root.write_text(p.root_pem())
        http, https = free_ports(2)
        edge = Edge(consul.url, "127.0.0.1", http, https, extra=(
            "--certs-kv", "dns01/certs", "--acme-directory", p.directory, "--acme-ca-bundle", str(p.ca_bundle),
            "--acme-dns-rfc2136", f"127.0.0.1:{bind.port}", "--acme-dns-tsig-key-file", str(bind.key_file),
            "--acme-dns-propagation-wait", "0"), haproxy=haproxy.path).start()
        backends = [Backend("one"), Backend("two")]
        try:
            register(consul, "one", "one-1", backends[0])
            register(consul, "two", "two-1", backends[1])
            for route, body in (("one-80", "one"), ("two-80", "two")):
                wait_until(lambda r=route: https_get(edge, f"{r}.{DOMAIN}", root)[0] == "200", 40,
                           what=f"{route} over https")
                assert https_get(edge, f"{route}.{DOMAIN}", root) == ("200", "2", body)
                assert f"CN = *.{DOMAIN}" in presented(edge, f"{route}.{DOMAIN}")
            assert p.orders() == 1                                # one wildcard, not one per route
            assert f"adding an RR at '_acme-challenge.{DOMAIN}' TXT" in bind.log()
        finally:
            edge.stop()
            for sid in ("one-1", "two-1"):
                deregister(consul, sid)
            for b in backends:
                b.close()


def test_consul_down_keeps_https_serving_and_is_logged_once(tmp_path, cafile, haproxy):
    with consul_agent(tmp_path / "consul") as agent:
        http, https = free_ports(2)
        edge = Edge(agent.url, "127.0.0.1", http, https, extra=("--certs-kv", "haproxy-consul/certs"),
                    haproxy=haproxy.path).start()
        backend = Backend("steady")
        try:
            register(agent, "steady", "steady-1", backend)
            put_kv(agent, "haproxy-consul/certs/steady", CA.bundle([f"steady-80.{DOMAIN}"]))
            wait_until(lambda: https_get(edge, f"steady-80.{DOMAIN}", cafile)[0] == "200", 10, what="steady")
            agent.kill()
            time.sleep(3)
            assert https_get(edge, f"steady-80.{DOMAIN}", cafile) == ("200", "2", "steady")
            assert edge.get(f"steady-80.{DOMAIN}")[0] == 308                   # plain HTTP still answers
            assert edge.log().count("certificates in Consul KV under haproxy-consul/certs/: ") == 1
        finally:
            edge.stop()
            backend.close()
