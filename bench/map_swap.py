"""Benchmark: what an atomic map swap costs against entry-by-entry map commands, by map size.

A swap (`prepare map`, `add map @VER` for every entry, `commit map @VER`) rewrites the whole map,
so it costs in proportion to the map; `add/set/del map` cost per changed entry. This starts one
HAProxy per release (the cached binaries, scripts/haproxy-rootfs.sh) with a host map of N
entries and times, through the edge's own HAProxy shell (edge.haproxy.process), a change of two
entries both ways, and `show map` (what a reconcile reads). The medians set SWAP_MAX_ENTRIES in
edge.routing.maps.

Usage: .venv/bin/python bench/map_swap.py [VERSION ...]   (default: 2.6 3.4)
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from edge.haproxy.process import HAProxy, Paths
from edge.routing.maps import HOSTS_MAP, map_commands, swap_commands
from tests.support.procs import free_ports

CACHE = Path(os.environ.get("HAPROXY_CONSUL_CACHE", "/var/cache/haproxy-consul"))
SIZES = (100, 1000, 2000, 5000, 10000)
RUNS = 15

CONFIG = """\
global
    default-path config
    stats socket {d}/haproxy.sock mode 600 level admin
defaults
    mode http
    timeout connect 1s
    timeout client 5s
    timeout server 5s
frontend http
    bind 127.0.0.1:{port}
    http-request set-var(txn.backend) req.hdr(host),map_str(hosts.map)
    use_backend %[var(txn.backend)] if {{ var(txn.backend) -m found }}
backend be_web
    server s1 127.0.0.1:1
"""


def timed(haproxy: HAProxy, commands: list[str]) -> float:
    t0 = time.perf_counter()
    haproxy.runtime(tuple(commands))
    return (time.perf_counter() - t0) * 1000


def measure(version: str, size: int) -> tuple[float, float, float]:
    """Medians in ms: a two-entry change by swap, the same entry by entry, `show map`."""
    with tempfile.TemporaryDirectory(prefix="map-swap-") as d:
        entries = {f"host{i}.bench.example": "be_web" for i in range(size)}
        Path(d, HOSTS_MAP).write_text("".join(f"{k} {v}\n" for k, v in entries.items()))
        Path(d, "haproxy.cfg").write_text(CONFIG.format(d=d, port=free_ports(1)[0]))
        haproxy = HAProxy(str(CACHE / "bin" / f"haproxy-{version}"), Paths(Path(d)))
        haproxy.start()
        try:
            haproxy.probe()
            swap, plain, show = [], [], []
            for i in range(RUNS):
                new = {**entries, f"a{i}.bench.example": "be_web", f"b{i}.bench.example": "be_web"}
                swap.append(timed(haproxy, swap_commands(HOSTS_MAP, new)))     # whatever SWAP_MAX_ENTRIES says
                plain.append(timed(haproxy, map_commands({HOSTS_MAP: new}, {HOSTS_MAP: entries}, atomic=False)))
                t0 = time.perf_counter()
                haproxy.maps((HOSTS_MAP,))
                show.append((time.perf_counter() - t0) * 1000)
            assert haproxy.maps((HOSTS_MAP,))[HOSTS_MAP] == entries
            return statistics.median(swap), statistics.median(plain), statistics.median(show)
        finally:
            haproxy.stop(grace=2)


def main(argv: list[str]) -> int:
    print(f"{'release':8} {'entries':>8} {'swap ms':>8} {'plain ms':>9} {'show map ms':>12}")
    for version in argv or ["2.6", "3.4"]:
        for size in SIZES:
            swap, plain, show = measure(version, size)
            print(f"{version:8} {size:>8} {swap:>8.2f} {plain:>9.2f} {show:>12.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
