"""Real processes for integration tests, each on free ports on loopback.

`require(binary)` fails loudly (never skips) when a program the suite needs is missing, so a CI
machine without HAProxy, Consul, etcd or dockerd goes red instead of quietly green.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest


def require(binary: str) -> str:
    path = shutil.which(binary)
    if path is None:
        raise RuntimeError(f"{binary} is not installed: run `make deps` (scripts/install-deps.sh)")
    return path


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """n distinct free TCP ports on host (held open together so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def wait_until(predicate: Callable[[], object], timeout: float = 10.0, interval: float = 0.02,
               what: str = "condition"):
    """Poll predicate until it returns something truthy; its last exception or a timeout fails."""
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
            last_exc = None
        except Exception as exc:  # noqa: BLE001 - polled until it works or time runs out
            last_exc = exc
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}" + (f": {last_exc!r}" if last_exc else ""))


def stop_process(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


class LoggedProcess:
    """A program under test run as a subprocess of the repo, its output in a log file."""

    def __init__(self, argv: list[str], log_path: Path):
        self.argv, self.log_path = argv, log_path
        self.proc: subprocess.Popen | None = None

    def start(self):
        repo = Path(__file__).resolve().parents[2]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, cwd=repo,
                                         env={**os.environ, "PYTHONUNBUFFERED": "1"})
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is not None:
            stop_process(self.proc, timeout)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@dataclass
class ConsulAgent:
    """A `consul agent -dev` on loopback with every port moved to a free one.

    `tls=True`: HTTPS only, `verify_incoming = true`, certificates from `consul tls ca create` /
    `consul tls cert create` in the work dir (`client_env()` gives the CONSUL_* variables a client
    needs). `acl=True`: ACLs on with `default_policy = "deny"`; `master_token` is the bootstrap
    token, used by `api()`. `extra_config` is merged into the agent's configuration.
    """

    workdir: Path
    http_port: int
    node_name: str = "edge-test"
    bind: str = "127.0.0.1"
    tls: bool = False
    acl: bool = False
    extra_config: dict = field(default_factory=dict)     # more agent configuration keys
    proc: subprocess.Popen | None = None
    master_token: str = ""

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.bind}:{self.http_port}"

    def _make_certs(self) -> None:
        consul = require("consul")
        tls = self.workdir / "tls"
        if (tls / "consul-agent-ca.pem").exists():
            return
        tls.mkdir(parents=True, exist_ok=True)
        for args in (["ca", "create"], ["cert", "create", "-server", "-dc", "dc1"],
                     ["cert", "create", "-client", "-dc", "dc1"]):
            subprocess.run([consul, "tls", *args], cwd=tls, check=True, capture_output=True)

    def cert(self, name: str) -> str:
        """Path of a file made by `consul tls`: ca, server, server-key, client, client-key."""
        files = {"ca": "consul-agent-ca.pem", "server": "dc1-server-consul-0.pem",
                 "server-key": "dc1-server-consul-0-key.pem", "client": "dc1-client-consul-0.pem",
                 "client-key": "dc1-client-consul-0-key.pem"}
        return str(self.workdir / "tls" / files[name])

    def client_env(self, token: str | None = None) -> dict[str, str]:
        """The variables Consul's CLI (and our programs) need to talk to this agent."""
        env = {"CONSUL_HTTP_ADDR": self.url}
        if self.tls:
            env.update(CONSUL_CACERT=self.cert("ca"), CONSUL_CLIENT_CERT=self.cert("client"),
                       CONSUL_CLIENT_KEY=self.cert("client-key"))
        if token:
            env["CONSUL_HTTP_TOKEN"] = token
        return env

    def start(self, timeout: float = 20.0) -> ConsulAgent:
        consul = require("consul")
        self.workdir.mkdir(parents=True, exist_ok=True)
        serf_lan, serf_wan, server = free_ports(3, self.bind)
        ports = {"http": self.http_port, "dns": -1, "grpc": -1,
                 "serf_lan": serf_lan, "serf_wan": serf_wan, "server": server}
        config = {
            "disable_update_check": True,
            "node_name": self.node_name,
            "bind_addr": self.bind,
            "client_addr": self.bind,
            "ports": ports,
            **self.extra_config,
        }
        if self.tls:
            self._make_certs()
            ports.update(http=-1, https=self.http_port)
            config.update(ca_file=self.cert("ca"), cert_file=self.cert("server"), key_file=self.cert("server-key"),
                          verify_incoming=True, verify_outgoing=True)
        if self.acl:
            self.master_token = self.master_token or str(uuid.uuid4())
            config["acl"] = {"enabled": True, "default_policy": "deny", "enable_token_persistence": True,
                             "tokens": {"master": self.master_token, "agent": self.master_token}}
        (self.workdir / "config.json").write_text(json.dumps(config))
        log = open(self.workdir / "consul.log", "ab")
        self.proc = subprocess.Popen(
            [consul, "agent", "-dev", "-config-file", str(self.workdir / "config.json")],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_until(self._leader, timeout, what=f"consul dev agent on {self.url}")
        return self

    def _leader(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"consul exited with {self.proc.returncode}; see {self.workdir}/consul.log")
        return self.api("GET", "/v1/status/leader", timeout=1) not in ("", None)

    def _ssl(self) -> ssl.SSLContext | None:
        if not self.tls:
            return None
        ctx = ssl.create_default_context(cafile=self.cert("ca"))
        ctx.load_cert_chain(self.cert("client"), self.cert("client-key"))
        return ctx

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)

    def kill(self) -> None:
        """Stop it hard (SIGKILL), as a crash would."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)

    # Small HTTP helpers for tests (urllib: no client library in the way of what is asserted).
    def api(self, method: str, path: str, body: object | None = None, timeout: float = 5.0,
            token: str | None = None):
        """A request as the agent's administrator (the master token when ACLs are on)."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method)
        if token or self.master_token:
            req.add_header("X-Consul-Token", token or self.master_token)
        with urllib.request.urlopen(req, timeout=timeout, context=self._ssl()) as r:
            raw = r.read()
        return json.loads(raw) if raw else None


@contextlib.contextmanager
def consul_agent(workdir: Path, **kwargs) -> Iterator[ConsulAgent]:
    agent = ConsulAgent(workdir=workdir, http_port=free_ports(1)[0], **kwargs).start()
    try:
        yield agent
    finally:
        agent.stop()


def consul_per_module(per_haproxy: bool = False):
    """A fixture: one Consul dev agent shared by a module's tests (`consul = consul_per_module()`).
    `per_haproxy=True`: one per HAProxy release the module runs on (the `haproxy` fixture of
    tests/integration/conftest.py), so what one release's run leaves in Consul (services, KV
    certificates) is never seen by the next."""
    if per_haproxy:
        @pytest.fixture(scope="module", name="consul")
        def fixture(tmp_path_factory, haproxy):
            with consul_agent(tmp_path_factory.mktemp(f"consul-{haproxy.version}")) as agent:
                yield agent
        return fixture

    @pytest.fixture(scope="module", name="consul")
    def shared(tmp_path_factory):
        with consul_agent(tmp_path_factory.mktemp("consul")) as agent:
            yield agent
    return shared
