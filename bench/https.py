"""Benchmark: HTTPS through the edge, all on loopback (issue 9's figures).

1. Requests/s over plain HTTP, HTTPS/1.1 and HTTP/2 through the same edge (wrk, h2load; the
   landing page, which HAProxy answers itself, so no backend limits the figure), and new TLS
   handshakes/s (`openssl s_time -new`).
2. From a certificate written to Consul KV until a handshake presents it on every edge (three
   edges on 127.0.0.1-3, one Consul; target p99 <= 100 ms), and the reloads that cost (target 0).
3. From a new service's registration to its first verified HTTPS answer, with the certificate
   ordered from pebble by the edge (the default 1 s HTTP-01 propagation wait included; target
   <= 5 s).

Usage: .venv/bin/python bench/https.py [certificate changes, default 50] [registrations, default 5]
Writes bench/out/https_kv.csv.
"""

from __future__ import annotations

import hashlib
import re
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from harness import HEADER, summary_row, write_csv

from tests.integration.edge_helpers import register, reloads
from tests.support.edge import EdgeProcess
from tests.support.http import Backend
from tests.support.pebble import pebble_server
from tests.support.procs import consul_agent, free_ports, require, wait_until
from tests.support.tlsgen import make_ca

DOMAIN = "bench.test"
CA = make_ca("bench CA")


def put_kv(consul_url: str, key: str, value: str) -> None:
    req = urllib.request.Request(f"{consul_url}/v1/kv/{key}", data=value.encode(), method="PUT")
    urllib.request.urlopen(req, timeout=5).read()


# Made once: loading the system's CA store for every handshake would cost ~40 ms each.
PEEK = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
PEEK.check_hostname, PEEK.verify_mode = False, ssl.CERT_NONE


def fingerprint(address: str, port: int, name: str) -> str:
    with socket.create_connection((address, port), timeout=2) as raw, \
            PEEK.wrap_socket(raw, server_hostname=name) as tls:
        return hashlib.sha256(tls.getpeercert(binary_form=True)).hexdigest()


def throughput(edge: EdgeProcess) -> None:
    wrk, h2load, openssl = require("wrk"), require("h2load"), require("openssl")

    def rps(out: str) -> float:
        m = re.search(r"Requests/sec:\s+([\d.]+)", out) or re.search(r"finished in [\d.]+s, ([\d.]+) req/s", out)
        return float(m.group(1)) if m else float("nan")

    runs = {
        "HTTP/1.1 plain": [wrk, "-t2", "-c20", "-d5s", "-H", "Host: nothing.bench.test",
                           f"http://127.0.0.1:{edge.port}/"],
        "HTTPS HTTP/1.1": [wrk, "-t2", "-c20", "-d5s", "-H", "Host: nothing.bench.test",
                           f"https://127.0.0.1:{edge.https_port}/"],
        "HTTPS HTTP/2": [h2load, "-D", "5", "-c", "20", "-m", "10", f"--connect-to=127.0.0.1:{edge.https_port}",
                         f"https://nothing.{DOMAIN}:{edge.https_port}/"],
    }
    print("\nthroughput through one edge (the landing page, answered by HAProxy; 2 cores shared with the load tool)")
    for label, argv in runs.items():
        out = subprocess.run(argv, capture_output=True, text=True, timeout=60).stdout
        print(f"  {label:<16} {rps(out):>10.0f} requests/s")
    out = subprocess.run([openssl, "s_time", "-connect", f"127.0.0.1:{edge.https_port}", "-new", "-time", "5"],
                         capture_output=True, text=True, timeout=60).stdout
    m = re.search(r"(\d+) connections in ([\d.]+)s", out)
    print(f"  {'new handshakes':<16} {int(m.group(1)) / float(m.group(2)):>10.0f} per second (openssl s_time -new)"
          if m else f"  new handshakes: {out[-300:]}")


def until_presented(edge: EdgeProcess, name: str, want: str, t0: float) -> float:
    """Seconds from t0 until `edge` presents the certificate with fingerprint `want` for `name`."""
    while time.perf_counter() - t0 < 10:
        try:
            if fingerprint(edge.address, edge.https_port, name) == want:
                return time.perf_counter() - t0
        except OSError:
            pass
    raise TimeoutError(f"{edge.address} never presented {want[:12]}")


def kv_to_every_edge(consul_url: str, edges: list[EdgeProcess], changes: int) -> list[float]:
    name = f"kv-80.{DOMAIN}"
    times = []
    with ThreadPoolExecutor(len(edges)) as pool:
        for i in range(changes):
            bundle = CA.bundle([name], days=30 + i)
            leaf = re.search(r"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----", bundle, re.S).group(0)
            want = hashlib.sha256(ssl.PEM_cert_to_DER_cert(leaf)).hexdigest()
            t0 = time.perf_counter()
            put_kv(consul_url, "haproxy-consul/certs/kv", bundle)
            times.append(max(pool.map(lambda e, w=want, t=t0: until_presented(e, name, w, t), edges)) * 1000)
            time.sleep(0.05)
    return times


def verified(port: int, name: str, context: ssl.SSLContext) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as raw, \
                context.wrap_socket(raw, server_hostname=name) as tls:
            tls.sendall(f"GET / HTTP/1.1\r\nHost: {name}\r\nConnection: close\r\n\r\n".encode())
            return tls.recv(12).startswith(b"HTTP/1.1 200")
    except (OSError, ssl.SSLError):
        return False


def registration_to_https(consul, edge: EdgeProcess, root: Path, n: int) -> list[float]:
    context = ssl.create_default_context(cafile=str(root))
    times = []
    backend = Backend("ordered")
    for i in range(n):
        name = f"svc{i}-80.{DOMAIN}"
        t0 = time.perf_counter()
        register(consul, f"svc{i}", f"svc{i}", backend)
        wait_until(lambda n=name: verified(edge.https_port, n, context), 60, interval=0.01,
                   what=f"{name} over verified HTTPS")
        times.append((time.perf_counter() - t0) * 1000)
    backend.close()
    return times


def main() -> int:
    changes = int(sys.argv[1]) if len(sys.argv) > 1 else 50
    registrations = int(sys.argv[2]) if len(sys.argv) > 2 else 5
    work = Path(tempfile.mkdtemp(prefix="bench-https-"))
    with consul_agent(work / "consul") as consul:
        http, https = free_ports(2)
        edges = [EdgeProcess(consul.url, domains=(DOMAIN,), address=f"127.0.0.{n}", port=http, https_port=https,
                             extra=("--log-level", "INFO", "--certs-kv", "haproxy-consul/certs"))
                 for n in (1, 2, 3)]
        for edge in edges:
            edge.start(timeout=60)
        try:
            throughput(edges[0])
            before = [reloads(e.log()) for e in edges]
            kv = kv_to_every_edge(consul.url, edges, changes)
            after = [reloads(e.log()) for e in edges]
        finally:
            for edge in edges:
                edge.stop()
        print(f"\ncertificate written to Consul KV -> presented by all 3 edges ({changes} changes)")
        print(HEADER)
        print(summary_row("KV -> every edge", kv))
        print(f"reloads caused by those {changes} certificate changes: {sum(after) - sum(before)} (target 0)")
        write_csv("https_kv.csv", ["change", "ms_until_every_edge"], [[i, f"{t:.2f}"] for i, t in enumerate(kv)])

        with pebble_server(work / "pebble", http_port=http) as pebble:
            root = work / "pebble-root.pem"
            root.write_text(pebble.root_pem())
            edge = EdgeProcess(consul.url, domains=(DOMAIN,), port=http, https_port=https,
                               extra=("--log-level", "INFO", "--acme-directory", pebble.directory,
                                      "--acme-ca-bundle", str(pebble.ca_bundle), "--certs-kv", "acme-bench/certs"))
            edge.start(timeout=60)
            try:
                reg = registration_to_https(consul, edge, root, registrations)
                cert_reloads = len(re.findall(r"reloaded HAProxy.*certificate", edge.log()))
            finally:
                edge.stop()
        print(f"\nnew service registered -> first verified HTTPS answer, certificate from pebble ({registrations})")
        print(HEADER)
        print(summary_row("registration -> HTTPS", reg))
        print(f"reloads caused by certificates: {cert_reloads} (target 0); every new vhost costs its own reload")
    return 0


if __name__ == "__main__":
    sys.exit(main())
