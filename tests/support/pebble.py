"""Pebble (Let's Encrypt's ACME test server) and pebble-challtestsrv on free loopback ports.

`pebble_server(workdir, http_port=…)` starts both and yields a `Pebble`:
- `directory` (the ACME directory URL) and `ca_bundle` (the CA of pebble's own HTTPS listener,
  made here with cryptography for 127.0.0.1, since the Debian package ships none);
- `root_pem()`: the root of the certificates it issues (new at every start), from `/roots/0`;
- `add_a(name, address)`: point a name at an address in challtestsrv's DNS (which answers every
  other A query with 127.0.0.1 and no AAAA, so pebble never dials `::1` first);
- `issued()`: how many certificates it issued, from its `Issued certificate serial` log lines;
- `stop()` / `start()`: an ACME outage and recovery on the same ports (pebble forgets its
  accounts and makes a new root when it comes back, as a reset CA would).

Pebble validates HTTP-01 by connecting to the name's address at `http_port`: pass the port the
edges (or `ChallengeResponder`) listen on. `PEBBLE_VA_NOSLEEP=1` removes its random sleep before
validating; its default 5 % rejection of good nonces stays on unless `nonce_reject` says otherwise.
With `dns_server=(host, port)` pebble resolves through that server (BIND, for DNS-01) and no
challtestsrv is started. `validity` (seconds) shortens the certificates' lifetime.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import http.server
import ipaddress
import json
import os
import re
import ssl
import subprocess
import threading
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.support.procs import free_ports, require, stop_process, wait_until
from tests.support.tlsgen import cert_pem, key_pem


def loopback_tls(workdir: Path) -> tuple[Path, Path, Path]:
    """(certificate, key, CA) files: a CA and a leaf for 127.0.0.1 and localhost."""
    now = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pebble listener test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now)
          .not_valid_after(now + dt.timedelta(days=30))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    leaf = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pebble")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = workdir / "listener.pem", workdir / "listener.key", workdir / "listener-ca.pem"
    paths[0].write_text(cert_pem(leaf))
    paths[1].write_text(key_pem(key))
    paths[2].write_text(cert_pem(ca))
    return paths


class Pebble:
    def __init__(self, workdir: Path, http_port: int, dns_server: tuple[str, int] | None = None,
                 validity: int | None = None, nonce_reject: int | None = None):
        self.workdir = workdir
        self.http_port = http_port
        self.acme_port, self.mgmt_port, self.tls_port = free_ports(3)
        self.cert, self.key, self.ca_bundle = loopback_tls(workdir)
        self.dns_server = dns_server
        self.nonce_reject = nonce_reject
        self.challtest: subprocess.Popen | None = None
        self.challtest_port: int | None = None
        self.proc: subprocess.Popen | None = None
        self.log_path = workdir / "pebble.log"
        config = {"pebble": {
            "listenAddress": f"127.0.0.1:{self.acme_port}",
            "managementListenAddress": f"127.0.0.1:{self.mgmt_port}",
            "certificate": str(self.cert), "privateKey": str(self.key),
            "httpPort": http_port, "tlsPort": self.tls_port,
            "ocspResponderURL": "", "externalAccountBindingRequired": False,
        }}
        if validity is not None:
            config["pebble"]["certificateValidityPeriod"] = validity
        self.config = workdir / "pebble-config.json"
        self.config.write_text(json.dumps(config))
        self._ssl = ssl.create_default_context(cafile=str(self.ca_bundle))

    @property
    def directory(self) -> str:
        return f"https://127.0.0.1:{self.acme_port}/dir"

    def start_dns(self) -> None:
        dns_port, self.challtest_port = free_ports(2)
        self.dns_server = ("127.0.0.1", dns_port)
        log = open(self.workdir / "challtestsrv.log", "ab")
        self.challtest = subprocess.Popen(
            [require("pebble-challtestsrv"), "-dns01", f"127.0.0.1:{dns_port}", "-http01", "", "-https01", "",
             "-tlsalpn01", "", "-management", f"127.0.0.1:{self.challtest_port}",
             "-defaultIPv4", "127.0.0.1", "-defaultIPv6", ""],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_until(lambda: self._challtest("/clear-request-history", {"host": "x", "type": "http"}) is not None,
                   10, what="pebble-challtestsrv management API")

    def start(self) -> Pebble:
        env = {**os.environ, "PEBBLE_VA_NOSLEEP": "1"}
        if self.nonce_reject is not None:
            env["PEBBLE_WFE_NONCEREJECT"] = str(self.nonce_reject)
        host, port = self.dns_server
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([require("pebble"), "-config", str(self.config), "-dnsserver", f"{host}:{port}"],
                                     stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        wait_until(self._ready, 15, what=f"pebble at {self.directory}")
        return self

    def _ready(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"pebble exited with {self.proc.returncode}; see {self.log_path}")
        with urllib.request.urlopen(self.directory, timeout=2, context=self._ssl) as r:
            return "newOrder" in json.loads(r.read())

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)

    def close(self) -> None:
        self.stop()
        if self.challtest is not None:
            stop_process(self.challtest)

    # --- what tests look at --------------------------------------------------------------------
    def root_pem(self) -> str:
        with urllib.request.urlopen(f"https://127.0.0.1:{self.mgmt_port}/roots/0", timeout=5,
                                    context=self._ssl) as r:
            return r.read().decode()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def issued(self) -> int:
        return len(re.findall(r"Issued certificate serial", self.log()))

    def orders(self) -> int:
        """New orders it accepted (`Added order` log lines)."""
        return len(re.findall(r"Added order ", self.log()))

    def _challtest(self, path: str, body: dict):
        req = urllib.request.Request(f"http://127.0.0.1:{self.challtest_port}{path}", method="POST",
                                     data=json.dumps(body).encode())
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status

    def add_a(self, name: str, address: str) -> None:
        """Make pebble resolve `name` to `address` (challtestsrv only)."""
        assert self.challtest is not None, "add_a needs challtestsrv as pebble's DNS"
        self._challtest("/add-a", {"host": name, "addresses": [address]})


@contextlib.contextmanager
def pebble_server(workdir: Path, http_port: int, dns_server: tuple[str, int] | None = None,
                  validity: int | None = None, nonce_reject: int | None = None) -> Iterator[Pebble]:
    workdir.mkdir(parents=True, exist_ok=True)
    pebble = Pebble(workdir, http_port, dns_server, validity, nonce_reject)
    try:
        if dns_server is None:
            pebble.start_dns()
        pebble.start()
        yield pebble
    finally:
        pebble.close()


class ChallengeResponder:
    """A loopback HTTP-01 responder standing in for the edges' own: it answers
    `/.well-known/acme-challenge/<token>` with `<prefix>/_acme/challenges/<token>` read from Consul
    at each request, and counts the requests it answered. `sources` lists (Consul URL, prefix)
    pairs to look in, so tests with their own Consul or prefix can add theirs."""

    def __init__(self, host: str = "127.0.0.1", port: int | None = None):
        self.sources: list[tuple[str, str]] = []
        self.host, self.port = host, port or free_ports(1, host)[0]
        self.answered = 0
        responder = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                token = self.path.removeprefix("/.well-known/acme-challenge/")
                body = responder.lookup(token) if token != self.path and "/" not in token else None
                self.send_response(200 if body is not None else 404)
                self.send_header("Content-Type", "text/plain")
                self.end_headers()
                if body is not None:
                    responder.answered += 1
                    self.wfile.write(body.encode())

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer((self.host, self.port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def lookup(self, token: str) -> str | None:
        for consul_url, prefix in list(self.sources):
            key = urllib.parse.quote(f"{prefix.strip('/')}/_acme/challenges/{token}")
            try:
                with urllib.request.urlopen(f"{consul_url}/v1/kv/{key}?raw", timeout=5) as r:
                    return r.read().decode()
            except OSError:
                continue
        return None

    def __enter__(self) -> ChallengeResponder:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
