"""The edge sidecar as a real subprocess (`python -m haproxy_consul edge`), on free ports."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.http import get
from tests.support.procs import free_ports, require, stop_process, wait_until

REPO = Path(__file__).resolve().parents[2]


@dataclass
class EdgeProcess:
    consul_url: str | None          # None: the edge finds Consul from the CONSUL_* variables in `env`
    domains: tuple[str, ...] = ("test.example",)
    extra: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    state_dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="edge-", dir="/tmp")))
    port: int = 0
    admin_port: int = 0
    address: str = "127.0.0.1"       # every listener binds this loopback address
    https_port: int = 0              # non-zero: an HTTPS listener there
    haproxy: str = "haproxy"         # the HAProxy binary (tests.support.haproxy_versions: one per release)
    # --spare-backends. 0 here, not the edge's default: most modules use a new vhost as the way to
    # cause a reload, and check what only a reload does (the landing page lists a vhost from the
    # reload that brought it in). tests/integration/test_edge_spares.py runs the pool.
    spares: int = 0
    proc: subprocess.Popen | None = None

    def __post_init__(self):
        if not self.port:
            self.port, self.admin_port = free_ports(2, self.address)
        if not self.admin_port:
            self.admin_port = free_ports(1, self.address)[0]
        self.log_path = self.state_dir.parent / f"{self.state_dir.name}.log"

    def argv(self) -> list[str]:
        consul = ["--consul", self.consul_url] if self.consul_url else []
        args = [sys.executable, "-m", "haproxy_consul", "edge", *consul,
                "--bind", f"{self.address}:{self.port}", "--admin-bind", f"{self.address}:{self.admin_port}",
                "--state-dir", str(self.state_dir), "--consul-wait", "5", "--log-level", "DEBUG",
                "--handover-timeout", "0", "--haproxy", self.haproxy, "--spare-backends", str(self.spares)]
        if self.https_port:
            args += ["--https-bind", f"{self.address}:{self.https_port}"]
        for d in self.domains:
            args += ["--domain", d]
        return args + list(self.extra)

    def start(self, timeout: float = 20.0) -> EdgeProcess:
        require(self.haproxy)
        env = {k: v for k, v in os.environ.items() if not k.startswith("CONSUL_")}
        env.update(PYTHONUNBUFFERED="1", **self.env)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.argv(), stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env)
        wait_until(self._listening, timeout, what="edge HTTP listener")
        return self

    def _listening(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"edge exited {self.proc.returncode}:\n{self.log()[-3000:]}")
        return self.get("nobody.invalid")[0] == 404

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def get(self, host: str, path: str = "/") -> tuple[int, str]:
        return get(self.port, host, path, address=self.address)

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, timeout=15)
