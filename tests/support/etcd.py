"""A real etcd 3.4 on free loopback ports, for tests."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.support.procs import free_ports, require, stop_process, wait_until


@dataclass
class EtcdServer:
    workdir: Path
    client_port: int = 0
    enable_v2: bool = False             # also serve the v2 keys API (a keyspace separate from v3's)
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.client_port}"

    def start(self, timeout: float = 20.0) -> EtcdServer:
        etcd = require("etcd")
        self.client_port, peer = free_ports(2)
        self.workdir.mkdir(parents=True, exist_ok=True)
        log = open(self.workdir / "etcd.log", "ab")
        self.proc = subprocess.Popen(
            [etcd, "--name", "test", "--data-dir", str(self.workdir / "data"),
             "--listen-client-urls", self.url, "--advertise-client-urls", self.url,
             "--listen-peer-urls", f"http://127.0.0.1:{peer}", "--initial-advertise-peer-urls",
             f"http://127.0.0.1:{peer}", "--initial-cluster", f"test=http://127.0.0.1:{peer}",
             *(["--enable-v2"] if self.enable_v2 else [])],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_until(lambda: httpx.get(self.url + "/health", timeout=1).json().get("health") == "true", timeout,
                   what="etcd health")
        return self

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
