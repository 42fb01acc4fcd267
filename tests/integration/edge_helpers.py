"""Consul registration helpers and log probes for the edge integration tests."""

from __future__ import annotations

import base64
import hashlib
import re
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path

from tests.support.http import Backend
from tests.support.procs import ConsulAgent, require, wait_until


def register(consul: ConsulAgent, name: str, sid: str, backend: Backend, cport: int | None = 80,
             tags: tuple[str, ...] = (), ttl: bool = False) -> None:
    body = {"Name": name, "ID": sid, "Address": backend.host, "Port": backend.port, "Tags": list(tags)}
    if cport is not None:
        body["Meta"] = {"container_port": str(cport)}
    if ttl:
        body["Check"] = {"CheckID": f"ttl-{sid}", "TTL": "600s", "Status": "passing"}
    consul.api("PUT", "/v1/agent/service/register", body)


def register_on_node(consul: ConsulAgent, node: str, name: str, sid: str, backend: Backend, cport: int = 80) -> None:
    """An instance on another node, through the catalog API (as another agent would)."""
    consul.api("PUT", "/v1/catalog/register", {
        "Node": node, "Address": "127.0.0.1",
        "Service": {"ID": sid, "Service": name, "Address": backend.host, "Port": backend.port,
                    "Meta": {"container_port": str(cport)}},
    })


def deregister(consul: ConsulAgent, sid: str) -> None:
    consul.api("PUT", f"/v1/agent/service/deregister/{sid}")


def set_ttl(consul: ConsulAgent, sid: str, status: str) -> None:
    consul.api("PUT", f"/v1/agent/check/{'pass' if status == 'passing' else 'fail'}/ttl-{sid}")


def reloads(log: str) -> int:
    return len(re.findall(r"reloaded HAProxy in", log))


def logged(edge, text: str, timeout: float = 5.0) -> None:
    wait_until(lambda: text in edge.log(), timeout, what=f"log line {text!r}")


def bodies(edge, host: str, n: int = 12) -> set[str]:
    out = set()
    for _ in range(n):
        status, body = edge.get(host)
        if status == 200:
            out.add(body)
    return out


def answers(edge, host: str, expected: set[str], timeout: float = 10.0) -> None:
    """Wait until round-robin over `host` yields exactly `expected` bodies."""
    wait_until(lambda: bodies(edge, host, 3 * max(1, len(expected))) == expected, timeout,
               what=f"{host} answering with {sorted(expected)}")


def status_of(edge, host: str, status: int, timeout: float = 10.0) -> None:
    wait_until(lambda: edge.get(host)[0] == status, timeout, what=f"{host} answering {status}")


def config_text(edge) -> str:
    return Path(edge.state_dir, "haproxy.cfg").read_text()


def put_kv_many(consul: ConsulAgent, items: dict[str, str]) -> None:
    """Many KV writes, in Consul transactions of 64 operations (Consul's limit per transaction)."""
    ops = [{"KV": {"Verb": "set", "Key": k, "Value": base64.b64encode(v.encode()).decode()}} for k, v in items.items()]
    for i in range(0, len(ops), 64):
        consul.api("PUT", "/v1/txn", ops[i:i + 64], timeout=60)


PEEK = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)        # made once: a context per handshake costs ~40 ms
PEEK.check_hostname, PEEK.verify_mode = False, ssl.CERT_NONE


def presented_fingerprint(edge, host: str) -> str:
    """sha256 of the certificate the edge presents for `host` (SNI), unverified."""
    with socket.create_connection((edge.address, edge.https_port), timeout=2) as raw, \
            PEEK.wrap_socket(raw, server_hostname=host) as tls:
        return hashlib.sha256(tls.getpeercert(binary_form=True)).hexdigest()


def leaf_fingerprint(bundle: str) -> str:
    """sha256 of a bundle's first certificate."""
    leaf = re.search(r"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----", bundle, re.S).group(0)
    return hashlib.sha256(ssl.PEM_cert_to_DER_cert(leaf)).hexdigest()


def https_bodies(edge, host: str, context: ssl.SSLContext, n: int = 6) -> set[str]:
    """The bodies of `n` HTTPS requests to `host` answered 200, each a new verified connection."""
    out = set()
    for _ in range(n):
        with socket.create_connection((edge.address, edge.https_port), timeout=2) as raw, \
                context.wrap_socket(raw, server_hostname=host) as tls:
            tls.sendall(f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
            head, _, body = b"".join(iter(lambda t=tls: t.recv(65536), b"")).partition(b"\r\n\r\n")
        if head.startswith(b"HTTP/1.1 200"):
            out.add(body.decode())
    return out


def master_reload(edge) -> None:
    """HAProxy's master reloads from the files on disk, as a restart or an operator would."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(edge.state_dir / "master.sock"))
        s.sendall(b"reload\n")
        s.shutdown(socket.SHUT_WR)
        while s.recv(4096):
            pass


class Load:
    """wrk with keep-alive on one vhost for the whole test."""

    def __init__(self, edge, host: str, seconds: int):
        self.argv = [require("wrk"), "-t", "2", "-c", "8", "-d", f"{seconds}s", "--timeout", "5s",
                     "-H", f"Host: {host}", f"http://127.0.0.1:{edge.port}/"]
        self.out = ""
        self.thread = threading.Thread(target=self._run)

    def _run(self):
        self.out = subprocess.run(self.argv, capture_output=True, text=True, timeout=120).stdout

    def __enter__(self):
        self.thread.start()
        time.sleep(0.5)
        return self

    def __exit__(self, *exc):
        self.thread.join()
