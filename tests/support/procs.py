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
import subprocess
import time
import urllib.request
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
    """A `consul agent -dev` on loopback with every port moved to a free one."""

    workdir: Path
    http_port: int
    node_name: str = "edge-test"
    bind: str = "127.0.0.1"
    extra_config: dict = field(default_factory=dict)     # more agent configuration keys
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://{self.bind}:{self.http_port}"

    def start(self, timeout: float = 20.0) -> ConsulAgent:
        consul = require("consul")
        self.workdir.mkdir(parents=True, exist_ok=True)
        serf_lan, serf_wan, server = free_ports(3, self.bind)
        config = {
            "disable_update_check": True,
            "node_name": self.node_name,
            "bind_addr": self.bind,
            "client_addr": self.bind,
            "ports": {"http": self.http_port, "dns": -1, "grpc": -1,
                      "serf_lan": serf_lan, "serf_wan": serf_wan, "server": server},
            **self.extra_config,
        }
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
        with urllib.request.urlopen(self.url + "/v1/status/leader", timeout=1) as r:
            return json.loads(r.read()) not in ("", None)

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)

    def kill(self) -> None:
        """Stop it hard (SIGKILL), as a crash would."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)

    # Small HTTP helpers for tests (urllib: no client library in the way of what is asserted).
    def api(self, method: str, path: str, body: object | None = None, timeout: float = 5.0):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method)
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw = r.read()
        return json.loads(raw) if raw else None


@contextlib.contextmanager
def consul_agent(workdir: Path, **kwargs) -> Iterator[ConsulAgent]:
    agent = ConsulAgent(workdir=workdir, http_port=free_ports(1)[0], **kwargs).start()
    try:
        yield agent
    finally:
        agent.stop()


def consul_per_module():
    """A fixture: one Consul dev agent shared by a module's tests (`consul = consul_per_module()`)."""
    @pytest.fixture(scope="module", name="consul")
    def fixture(tmp_path_factory):
        with consul_agent(tmp_path_factory.mktemp("consul")) as agent:
            yield agent
    return fixture
