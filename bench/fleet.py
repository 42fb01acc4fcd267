"""Benchmark: a fleet of edges against a 3-server Consul cluster on 127.0.0.1, .2 and .3.

M edges (default 1, 10, 30) watch N services (default 1,000 and 10,000; 3 instances each over 3
nodes) with `stale` and with `consistent` reads, in the edge's default watch mode (or `--api`).
Each edge here is the edge's real Consul watcher (`edge.consul.watch.ConsulWatcher`) in its own process,
without HAProxy: what is measured is Consul's side and the edge's watch, not HAProxy's apply
(bench/propagation.py and bench/scale.py measure that). Edge i talks to server i mod 3, as edges
talk to the agent next to them.

Per (M, N, consistency) it prints: the Consul servers' CPU seconds per 100 changes (each server,
and the total), the per-change latency at the slowest edge (from the write returning to the last
edge publishing it: p50, p90, max), and how the reads spread over the servers (RPC requests each
server handled, from its own /v1/agent/metrics).

Usage: .venv/bin/python bench/fleet.py [--edges 1,10,30] [--services 1000,10000] [--changes 100]
       [--api auto|internal|public]
Writes bench/out/fleet.csv. Not run by the tests.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from harness import REPO, cpu_seconds, pct, write_csv

from tests.support.cluster import ConsulCluster
from tests.support.procs import wait_until

NODES = ("node-0", "node-1", "node-2")


# --- the edge side: one watcher per process ---------------------------------------------------
def edge_main(url: str, api: str, consistency: str) -> None:
    """A watcher printing one JSON line per marker instance it sees (`mark-<k>`), with the time."""
    sys.path.insert(0, str(REPO))
    from edge.consul.watch import ConsulWatcher
    from haproxy_consul import consul_api

    seen: set[str] = set()
    last: dict = {}

    def publish(snapshot) -> None:
        now = time.time()
        for name, insts in snapshot.services.items():
            if last.get(name) is insts:
                continue
            for inst in insts:
                if inst.service_id.startswith("mark-") and inst.service_id not in seen:
                    seen.add(inst.service_id)
                    print(json.dumps({"mark": inst.service_id, "t": now}), flush=True)
        last.clear()
        last.update(snapshot.services)
        print(json.dumps({"ready": True}), flush=True)

    stop = threading.Event()
    watcher = ConsulWatcher(consul_api.build(url), None, publish, stop, wait=30.0, api=api, consistency=consistency)
    watcher.run()


# --- the cluster ----------------------------------------------------------------------------
class Cluster(ConsulCluster):
    """The shared three-server cluster with Prometheus telemetry, and what this benchmark reads of it."""

    def __init__(self, root: Path):
        super().__init__(root, hcl=('telemetry { disable_hostname = true prometheus_retention_time = "1h" }',))

    def cpu(self) -> list[float]:
        return [cpu_seconds(p.pid) for p in self.procs]

    def rpc_requests(self) -> list[float]:
        """RPC requests each server handled so far (`consul_rpc_request`, cumulative in the
        Prometheus format): a forwarded read counts at the server that answers it."""
        out = []
        for i in range(3):
            with urllib.request.urlopen(self.url(i) + "/v1/agent/metrics?format=prometheus", timeout=30) as r:
                text = r.read().decode()
            out.append(sum(float(line.split()[-1]) for line in text.splitlines()
                           if line.startswith("consul_rpc_request ")))
        return out


def populate(cluster: Cluster, n: int) -> None:
    def one(i: int) -> None:
        for j, node in enumerate(NODES):
            cluster.put(i, "/v1/catalog/register", {
                "Node": node, "Address": "127.0.0.1",
                "Service": {"ID": f"svc{i}-{j}", "Service": f"svc{i}", "Address": "127.0.0.1",
                            "Port": 20000 + j, "Meta": {"container_port": "80"}}})
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(one, range(n)))


# --- one run ----------------------------------------------------------------------------------
def run(cluster: Cluster, m: int, n: int, consistency: str, api: str, changes: int, tag: int) -> dict:
    edges = []
    lines: list[list[dict]] = []
    for i in range(m):
        p = subprocess.Popen([sys.executable, __file__, "--edge", cluster.url(i), api, consistency],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=REPO,
                             env={**os.environ, "PYTHONPATH": str(REPO)})
        edges.append(p)
        out: list[dict] = []
        lines.append(out)
        threading.Thread(target=lambda p=p, out=out: [out.append(json.loads(line)) for line in p.stdout],
                         daemon=True).start()
    try:
        wait_until(lambda: all(any(e.get("ready") for e in out) for out in lines), 600, interval=0.2,
                   what="every edge's first sync")
        time.sleep(1)
        cpu0, rpc0 = cluster.cpu(), cluster.rpc_requests()
        rng = random.Random(tag)
        latencies = []
        writer = cluster.leader()
        for k in range(changes):
            service = f"svc{rng.randrange(n)}"
            mark = f"mark-{tag}-{k}"
            cluster.put(writer, "/v1/catalog/register", {
                "Node": NODES[k % 3], "Address": "127.0.0.1",
                "Service": {"ID": mark, "Service": service, "Address": "127.0.0.1", "Port": 30000 + k,
                            "Meta": {"container_port": "80"}}})
            t0 = time.time()

            def all_seen(mark: str = mark) -> float | None:
                times = [next((e["t"] for e in out if e.get("mark") == mark), None) for out in lines]
                return None if None in times else max(times)
            last = wait_until(all_seen, 120, interval=0.002, what=f"{mark} at every edge")
            latencies.append((last - t0) * 1000)
        cpu1, rpc1 = cluster.cpu(), cluster.rpc_requests()
        cpu = [(b - a) * 100 / changes for a, b in zip(cpu0, cpu1, strict=True)]
        rpc = [b - a for a, b in zip(rpc0, rpc1, strict=True)]
        r = {"edges": m, "services": n, "consistency": consistency, "api": api, "changes": changes,
             "leader": f"server{writer}", "cpu_s_per_100": round(sum(cpu), 2),
             "cpu_per_server": "/".join(f"{c:.2f}" for c in cpu),
             "slowest_p50_ms": round(pct(latencies, 50), 1), "slowest_p90_ms": round(pct(latencies, 90), 1),
             "slowest_max_ms": round(max(latencies), 1), "rpc_per_server": "/".join(f"{x:.0f}" for x in rpc)}
        print(r, flush=True)
        return r
    finally:
        for p in edges:
            p.kill()
            p.wait()


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--edge":
        edge_main(*sys.argv[2:5])
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--edges", default="1,10,30")
    ap.add_argument("--services", default="1000,10000")
    ap.add_argument("--changes", type=int, default=100)
    ap.add_argument("--api", default="auto", choices=("auto", "internal", "public"))
    args = ap.parse_args()
    results = []
    for n in (int(x) for x in args.services.split(",")):
        root = Path(tempfile.mkdtemp(prefix="fleet-"))
        cluster = Cluster(root).start()
        try:
            t0 = time.time()
            populate(cluster, n)
            print(f"{n} services x 3 instances registered in {time.time() - t0:.0f}s", flush=True)
            tag = 0
            for m in (int(x) for x in args.edges.split(",")):
                for consistency in ("stale", "consistent"):
                    tag += 1
                    results.append(run(cluster, m, n, consistency, args.api, args.changes, tag))
        finally:
            cluster.stop()
            shutil.rmtree(root, ignore_errors=True)
    keys = ["services", "edges", "consistency", "api", "changes", "leader", "cpu_s_per_100", "cpu_per_server",
            "rpc_per_server", "slowest_p50_ms", "slowest_p90_ms", "slowest_max_ms"]
    print("\n" + " | ".join(keys))
    for r in results:
        print(" | ".join(str(r[k]) for k in keys))
    print(f"csv: {write_csv('fleet.csv', keys, [[r[k] for k in keys] for r in results])}")


if __name__ == "__main__":
    main()
