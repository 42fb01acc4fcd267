"""Benchmark 7: routers from tags. Requests/s through a plain vhost, a path route (with prefix
stripping) and a TCP route to the same backend, in one run; then the propagation of a new path
route to a backend HAProxy already has (Consul API call returned → first request routed by it),
which is runtime map commands, not a reload. The backend is a second HAProxy answering a fixed
body, so the figures are the edge's, not a Python server's.

Usage: .venv/bin/python bench/routers.py [new path routes, default 50] [seconds per load run, default 5]
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from pathlib import Path

from harness import HEADER, OUT, stack, summary_row, until, write_csv

from tests.support.http import get
from tests.support.procs import free_ports, require, stop_process

HOST = "site.bench.example"


def rps(out: str) -> float:
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    return float(m.group(1)) if m else float("nan")


def load(url: str, host: str, seconds: int) -> float:
    """wrk, 2 threads, 20 keep-alive connections (HAProxy and the load tool share 2 cores)."""
    out = subprocess.run([require("wrk"), "-t2", "-c20", f"-d{seconds}s", "-H", f"Host: {host}", url],
                         capture_output=True, text=True, timeout=seconds + 60).stdout
    return rps(out)


def fixed_backend(port: int) -> subprocess.Popen:
    """An HAProxy on 127.0.0.1:port answering every request with 200 `bench`."""
    cfg = Path(tempfile.mkdtemp(prefix="bench-backend-")) / "backend.cfg"
    cfg.write_text(f"""defaults
    mode http
    timeout client 30s
frontend backend
    bind 127.0.0.1:{port}
    http-request return status 200 content-type text/plain string bench
""")
    return subprocess.Popen([require("haproxy"), "-db", "-f", str(cfg)], stdout=subprocess.DEVNULL)


def register(consul, port: int, tags: tuple[str, ...]) -> None:
    consul.api("PUT", "/v1/agent/service/register", {"Name": "site", "ID": "site-1", "Address": "127.0.0.1",
                                                     "Port": port, "Tags": list(tags),
                                                     "Meta": {"container_port": "80"}})


def main() -> int:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 50
    seconds = int(sys.argv[2]) if len(sys.argv) > 2 else 5
    backend_port, tcp_port = free_ports(2)
    backend = fixed_backend(backend_port)
    tags = ("edge.route=site.bench.example/api strip", f"edge.tcp={tcp_port}")
    try:
        with stack("runtime") as (consul, edge):
            register(consul, backend_port, tags)
            until(lambda: get(edge.port, HOST, "/api/x")[1] == "bench", timeout=60)
            until(lambda: get(tcp_port, "site-80.bench.example")[1] == "bench", timeout=60)
            base = f"http://127.0.0.1:{edge.port}"
            figures = {
                "plain vhost": load(f"{base}/", "site-80.bench.example", seconds),
                "path route + strip": load(f"{base}/api/x", HOST, seconds),
                "TCP route": load(f"http://127.0.0.1:{tcp_port}/", "site-80.bench.example", seconds),
            }
            print(f"\nrequests/s through the edge to one backend ({seconds} s per run, wrk -t2 -c20; the edge, the "
                  "backend and wrk share 2 cores)")
            for label, value in figures.items():
                print(f"  {label:<20} {value:>10.0f}")
            reloads_before = edge.log().count("reloaded HAProxy in")
            times = []
            for i in range(n):
                tags = (*tags, f"edge.route=site.bench.example/p{i}/")   # /p1/ is no prefix of /p10/
                register(consul, backend_port, tags)
                times.append(until(lambda i=i: get(edge.port, HOST, f"/p{i}/")[0] == 200) * 1000)
            reloads = edge.log().count("reloaded HAProxy in") - reloads_before
    finally:
        stop_process(backend)
    print(f"\nnew path route → first request routed by it ({n} routes, {reloads} reloads)")
    print(HEADER)
    print(summary_row("new path route", times))
    path = write_csv("routers.csv", ["kind", "value"],
                     [[label, f"{value:.0f}"] for label, value in figures.items()]
                     + [["new path route ms", f"{t:.1f}"] for t in times] + [["reloads", reloads]])
    print(f"\nwrote {path.relative_to(OUT.parent.parent)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
