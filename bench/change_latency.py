"""Benchmark: per-change latency at N services, per watch mode (`--consul-api internal|public`).

A Consul dev agent with N services × 3 instances (catalog API, as bench/scale.py), one edge in
runtime apply mode; then K times: register one more instance of an existing service and time
until the edge routes to it (the full path: Consul's answer, the edge's parse and diff, the
runtime API). Prints p50/p90/max per mode and the edge's Consul request counters.

Usage: .venv/bin/python bench/change_latency.py [N ...] [--changes K] [--api internal,public]
"""

from __future__ import annotations

import argparse
import random

from harness import HEADER, consul_requests, pct, stack, summary_row, until
from scale import DOMAIN, populate

from tests.integration.edge_helpers import register
from tests.support.http import Backend, get


def run(n: int, api: str, changes: int, backends: list[Backend]) -> dict:
    with stack("runtime", DOMAIN, extra=("--consul-api", api)) as (consul, edge):
        populate(consul, n, backends)
        until(lambda: get(edge.port, f"svc{n - 1}-80.{DOMAIN}")[0] == 200, timeout=300)
        rng = random.Random(n)
        ms = []
        before = consul_requests(edge.log())
        for k in range(changes):
            target = rng.randrange(n)
            marker = Backend(f"m{k}")
            try:
                register(consul, f"svc{target}", f"svc{target}-m{k}", marker)
                ms.append(until(lambda t=target, k=k: get(edge.port, f"svc{t}-80.{DOMAIN}")[1] == f"m{k}"
                                or _drain(edge.port, t, k), timeout=60) * 1000)
            finally:
                marker.close()
        refreshes = edge.log().count("sweeping every service")
        r = {"services": n, "api": api, "ms": ms, "refreshes": refreshes,
             "requests": consul_requests(edge.log()) - before}
        print(summary_row(f"{n} {api}", ms), f"  full refreshes {refreshes}", flush=True)
        return r


def _drain(port: int, target: int, k: int) -> bool:
    """Round-robin over 4 servers: ask until the new one answers or a full turn went by."""
    return any(get(port, f"svc{target}-80.{DOMAIN}")[1] == f"m{k}" for _ in range(4))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("sizes", nargs="*", type=int, default=[1000, 10000])
    ap.add_argument("--changes", type=int, default=20)
    ap.add_argument("--api", default="internal,public")
    args = ap.parse_args()
    backends = [Backend(f"b{j}") for j in range(3)]
    print(HEADER)
    results = []
    try:
        for n in args.sizes:
            for api in args.api.split(","):
                results.append(run(n, api, args.changes, backends))
    finally:
        for b in backends:
            b.close()
    print()
    for r in results:
        print(f"{r['services']} services, {r['api']}: p50 {pct(r['ms'], 50):.1f} ms, p90 {pct(r['ms'], 90):.1f} ms, "
              f"max {max(r['ms']):.1f} ms over {len(r['ms'])} changes; full refreshes {r['refreshes']}")


if __name__ == "__main__":
    main()
