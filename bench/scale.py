"""Benchmark 3: scale. N services × 3 instances over 3 nodes, registered through the catalog API.

Per N, per design (today: the summary watcher; fleet: `--fleet`, a lone edge that publishes to KV
and reads per node) and per apply mode: cold start of the edge to a complete, routable table;
haproxy.cfg size, `haproxy -c` time and reload time; the edge's RSS (after the cold start and after
the changes) and HAProxy's; Consul requests at cold start and per change; connections to Consul;
and the time for an instance change (an instance registered through the agent, as the registrator
does) to be routed, p50 and p99 over `--changes` changes. Writes bench/out/scale.csv.

Usage: .venv/bin/python bench/scale.py [N ...] [--designs today,fleet] [--modes runtime,reload] [--changes 30]
       (default: 1000 5000 10000, both designs, both modes, 30 changes)
"""

from __future__ import annotations

import argparse
import os
import random
import re
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

from harness import MODES, consul_requests, haproxy_pids, pct, rss_mb, stack, until, write_csv

from tests.integration.edge_helpers import register
from tests.support.http import Backend, get

DOMAIN = "bench.example"
NODES = ("node-0", "node-1", "node-2")


def populate(consul, n: int, backends: list[Backend]) -> float:
    def one(i: int) -> None:
        for j, node in enumerate(NODES):
            consul.api("PUT", "/v1/catalog/register", {
                "Node": node, "Address": "127.0.0.1",
                "Service": {"ID": f"svc{i}-{j}", "Service": f"svc{i}", "Address": "127.0.0.1",
                            "Port": backends[j].port, "Meta": {"container_port": "80"}},
            }, timeout=30)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(one, range(n)))
    return time.perf_counter() - t0


def routable(port: int, sample: list[int]) -> bool:
    """Every sampled service answers; a refused connection (HAProxy swapping workers while this
    loop knocks thousands of times a second) is a no, not an error, and the next try waits a bit."""
    try:
        if all(get(port, f"svc{i}-80.{DOMAIN}")[0] == 200 for i in sample):
            return True
    except OSError:
        pass
    time.sleep(0.01)
    return False


def settled(edge) -> bool:
    """No reload for 2 s."""
    before = edge.log().count("reloaded HAProxy")
    time.sleep(2)
    return edge.log().count("reloaded HAProxy") == before


def consul_connections(edge_pid: int, consul_port: int) -> int:
    out = subprocess.run(["ss", "-tnpH", "state", "established", f"dport = :{consul_port}"],
                         capture_output=True, text=True).stdout
    return sum(f"pid={edge_pid}," in line for line in out.splitlines())


def run(n: int, mode: str, design: str, changes: int, backends: list[Backend]) -> dict:
    r = {"services": n, "mode": mode, "design": design, "load": f"{os.getloadavg()[0]:.1f}"}
    fleet = ("--fleet",) if design == "fleet" else ()
    with stack(mode, DOMAIN, extra=("--log-level", "DEBUG", *fleet)) as (consul, edge):
        r["register_s"] = round(populate(consul, n, backends), 1)
        # Cold start: a second edge on the populated catalog (the first one saw it grow).
        edge.stop()
        from tests.support.edge import EdgeProcess
        cold = EdgeProcess(consul.url, domains=(DOMAIN,), extra=("--apply", mode, "--log-level", "DEBUG", *fleet))
        t0 = time.perf_counter()
        try:
            cold.start(timeout=120)
            sample = random.Random(n).sample(range(n), 20)
            until(lambda: routable(cold.port, sample), timeout=300)
            r["cold_start_s"] = round(time.perf_counter() - t0, 2)
            log = cold.log()
            r["cold_requests"] = consul_requests(log)
            cfg = cold.state_dir / "haproxy.cfg"
            r["config_mb"] = round(cfg.stat().st_size / 1e6, 2)
            t0 = time.perf_counter()
            subprocess.run(["haproxy", "-c", "-q", "-C", str(cold.state_dir), "-f", str(cfg)], check=True)
            r["check_s"] = round(time.perf_counter() - t0, 2)
            # Settled: no reload for 2 s (the old worker of the initial sync gone; a fleet edge that
            # found an older table in KV reloads again once it has read the catalog itself).
            until(lambda: settled(cold), timeout=300)
            r["edge_rss_cold_mb"] = round(rss_mb(cold.proc.pid), 1)
            r["haproxy_rss_mb"] = round(sum(rss_mb(p) for p in haproxy_pids(cold)), 1)
            r["consul_connections"] = consul_connections(cold.proc.pid, int(consul.url.rsplit(":", 1)[1]))
            # Instance changes of existing services, one at a time.
            before = consul_requests(cold.log())
            rng, ms = random.Random(n + 1), []
            for k in range(changes):
                target, marker = rng.randrange(n), Backend(f"m{k}")
                try:
                    register(consul, f"svc{target}", f"svc{target}-m{k}", marker)
                    ms.append(until(lambda t=target, k=k: any(get(cold.port, f"svc{t}-80.{DOMAIN}")[1] == f"m{k}"
                                                              for _ in range(5)), timeout=120) * 1000)
                finally:
                    marker.close()
            r["change_p50_ms"], r["change_p99_ms"] = round(pct(ms, 50), 1), round(pct(ms, 99), 1)
            time.sleep(0.5)
            r["requests_per_change"] = round((consul_requests(cold.log()) - before) / changes, 1)
            r["edge_rss_mb"] = round(rss_mb(cold.proc.pid), 1)
            # A new vhost: a reload in either mode.
            extra = Backend("changed")
            try:
                register(consul, "brandnew", "brandnew-1", extra)
                until(lambda: get(cold.port, f"brandnew-80.{DOMAIN}")[1] == "changed", timeout=120)
                time.sleep(0.5)
                reload_ms = re.findall(r"reloaded HAProxy in (\d+) ms", cold.log())
                r["reload_ms"] = int(reload_ms[-1]) if reload_ms else None
            finally:
                extra.close()
        finally:
            cold.stop()
    print(r, flush=True)
    return r


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("sizes", nargs="*", type=int, default=[1000, 5000, 10000])
    ap.add_argument("--designs", default="today,fleet")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--changes", type=int, default=30)
    args = ap.parse_args()
    backends = [Backend(f"b{j}") for j in range(3)]
    results = []
    try:
        for n in args.sizes:
            for design in args.designs.split(","):
                for mode in args.modes.split(","):
                    results.append(run(n, mode, design, args.changes, backends))
    finally:
        for b in backends:
            b.close()
    keys = ["services", "design", "mode", "register_s", "cold_start_s", "cold_requests", "config_mb", "check_s",
            "reload_ms", "edge_rss_cold_mb", "edge_rss_mb", "haproxy_rss_mb", "consul_connections", "change_p50_ms",
            "change_p99_ms", "requests_per_change", "load"]
    print("\n" + " | ".join(keys))
    for r in results:
        print(" | ".join(str(r.get(k)) for k in keys))
    print(f"csv: {write_csv('scale.csv', keys, [[r.get(k) for k in keys] for r in results])}")


if __name__ == "__main__":
    main()
