"""`haproxy-consul health`: the image's HEALTHCHECK, one probe per program.

It looks at what PID 1 of the container runs and checks that program's own job: the edge's
HAProxy answers `/healthz` on its admin listener; bootstrap's Consul agent knows a leader;
the registrator can reach both the Docker Engine and its Consul agent. Exit 0 healthy, 1 not.
"""

from __future__ import annotations

import sys
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path

from haproxy_consul.consul_api import ConsulHTTP, from_command_line


def program(cmdline: Sequence[str]) -> str | None:
    for name in ("edge", "registrator", "bootstrap"):
        if name in cmdline:
            return name
    return "edge" if any(arg.endswith("haproxy-consul") for arg in cmdline) else None


def flag(cmdline: Sequence[str], name: str, environ: Mapping[str, str], env: str, default: str) -> str:
    for i, arg in enumerate(cmdline):
        if arg == name and i + 1 < len(cmdline):
            return cmdline[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return environ.get(env) or default


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=3) as r:
        return r.read()


def check(cmdline: Sequence[str], environ: Mapping[str, str]) -> str:
    """'' when healthy, else why not."""
    which = program(cmdline)
    try:
        if which == "edge":
            admin = flag(cmdline, "--admin-bind", environ, "EDGE_ADMIN_BIND", "127.0.0.1:8404")
            host, _, port = admin.rpartition(":")
            _get(f"http://{host or '127.0.0.1'}:{port}/healthz")
        elif which == "bootstrap":
            consul = ConsulHTTP(from_command_line(cmdline, environ, "--consul-http-addr"), timeout=3)
            if not consul.get("/v1/status/leader").body:
                return "the Consul agent knows no leader"
        elif which == "registrator":
            # /v1/status/leader needs no ACL token: this checks reachability (TLS included) only.
            ConsulHTTP(from_command_line(cmdline, environ), timeout=3).get("/v1/status/leader")
            import docker
            docker.APIClient(base_url=flag(cmdline, "--docker", environ, "DOCKER_HOST",
                                           "unix:///var/run/docker.sock"), timeout=3).ping()
        else:
            return f"unknown program in {' '.join(cmdline)!r}"
    except Exception as exc:  # noqa: BLE001 - any failure is "unhealthy", with its reason
        return f"{which}: {exc}"
    return ""


def main(argv: Sequence[str], environ: Mapping[str, str]) -> int:
    cmdline = argv or Path("/proc/1/cmdline").read_bytes().decode(errors="replace").split("\0")
    reason = check([a for a in cmdline if a], environ)
    print(reason or "healthy", file=sys.stderr if reason else sys.stdout)
    return 1 if reason else 0
