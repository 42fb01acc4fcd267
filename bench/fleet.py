"""Benchmark: a fleet of edges against a 3-server Consul cluster on 127.0.0.1, .2 and .3.

Each edge is the edge's real Consul side in its own process, without HAProxy (what is measured is
Consul's side and the edges' watch; bench/scale.py measures the rest), talking to server i mod 3
as an edge talks to the agent next to it. Designs, side by side in one run:
- today: every edge reads the catalog itself (`ConsulWatcher`, `--consul-api auto`: the summary);
- fleet: `--fleet`: one elected edge reads the catalog per node and publishes to Consul KV, the
  others follow one key (`edge.consul.fleet`);
- fleet-summary: `--fleet --max-node-watches 0`: the publisher reads the summary instead;
- nodes: every edge reads per node itself (`NodesWatcher`), no KV.

N services × 3 instances over 3 nodes (catalog API). Per run (design, M edges, N services) it prints:
the servers' CPU seconds per 100 changes (and per server; first for the writes alone, with no
edge), the edges' CPU per change (all of them together), the RPC requests each server handled,
the per-change latency at the slowest edge (write returned → the last edge publishing it: p50,
p90, p99, max), the bytes Consul sent per change (per edge: mean and max; and in total), requests
per change, and the load average.

`--failover DESIGN:M:N`: churn (a change every 100 ms) while the fleet's publisher is killed with
SIGKILL: the time until every surviving edge applies changes again (the first change written after
the kill, seen by all), and the instances any edge lost on the way (target 0).

Usage: .venv/bin/python bench/fleet.py [--run DESIGN:EDGES:SERVICES ...] [--changes 100]
       [--failover DESIGN:EDGES:SERVICES | --no-failover] [--consistency stale|consistent]
Default runs: today:30:1000 fleet:30:1000 fleet:100:2000, failover fleet:30:1000.
Writes bench/out/fleet.csv. Not run by the tests.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
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
TELEMETRY = 'telemetry { disable_hostname = true prometheus_retention_time = "1h" }'
DESIGNS = ("today", "fleet", "fleet-summary", "nodes")


# --- the edge side: one edge per process ---------------------------------------------------------
def edge_main(url: str, design: str, consistency: str, prefix: str, expected: str) -> None:
    """An edge's Consul side printing JSON lines: `ready` once it sees `expected` services, one
    `mark` per marker instance (`mark-<k>`) with the time and the bytes and requests it received
    from Consul so far, and `lost` when an instance it had disappears."""
    sys.path.insert(0, str(REPO))
    import urllib3.response

    from edge.cli import fleet_member
    from edge.consul.nodes import NodesWatcher
    from edge.consul.watch import ConsulWatcher
    from edge.metrics import NoMetrics
    from edge.settings import parse
    from haproxy_consul import consul_api

    # Every byte Consul sends this process, whichever client reads it (urllib3 under both).
    counted = {"b": 0, "r": 0}
    lock = threading.Lock()
    init, read = urllib3.response.HTTPResponse.__init__, urllib3.response.HTTPResponse.read

    def counting_init(response, *args, **kwargs):
        init(response, *args, **kwargs)
        with lock:
            counted["b"] += sum(len(k) + len(v) + 4 for k, v in response.headers.items()) + 17
            counted["r"] += 1

    def counting_read(response, *args, **kwargs):
        data = read(response, *args, **kwargs)
        with lock:
            counted["b"] += len(data or b"")
        return data
    urllib3.response.HTTPResponse.__init__ = counting_init
    urllib3.response.HTTPResponse.read = counting_read

    seen: set[str] = set()
    state = {"ready": False, "instances": 0}
    last: dict = {}

    def publish(snapshot) -> None:
        now = time.time()
        for name, insts in snapshot.services.items():
            if last.get(name) is insts:
                continue
            for inst in insts:
                if inst.service_id.startswith("mark-") and inst.service_id not in seen:
                    seen.add(inst.service_id)
                    with lock:
                        b, r = counted["b"], counted["r"]
                    print(json.dumps({"mark": inst.service_id, "t": now, "b": b, "r": r}), flush=True)
        instances = sum(len(i) for i in snapshot.services.values())
        if instances < state["instances"]:
            print(json.dumps({"lost": state["instances"] - instances, "t": now}), flush=True)
        state["instances"] = max(state["instances"], instances)
        last.clear()
        last.update(snapshot.services)
        if not state["ready"] and len(snapshot.services) >= int(expected):
            state["ready"] = True
            print(json.dumps({"ready": True}), flush=True)

    stop = threading.Event()
    consul = consul_api.build(url)
    if design == "today":
        ConsulWatcher(consul, None, publish, stop, wait=30.0, consistency=consistency).run()
    elif design == "nodes":
        NodesWatcher(consul, None, publish, stop, wait=30.0, consistency=consistency).run()
    else:
        settings = parse(["--consul", url, "--fleet", "--fleet-prefix", prefix, "--consistency", consistency,
                          "--max-node-watches", "0" if design == "fleet-summary" else "64"], {})
        fleet_member(settings, stop, publish, NoMetrics()).run()


class Fleet:
    """M edge processes, their output lines collected."""

    def __init__(self, cluster: ConsulCluster, m: int, n: int, design: str, consistency: str, prefix: str):
        self.procs: list[subprocess.Popen] = []
        self.lines: list[list[dict]] = []
        self.errors = [cluster.root / f"{prefix.replace('/', '-')}-edge{i}.err" for i in range(m)]
        for i in range(m):
            with open(self.errors[i], "wb") as err:
                p = subprocess.Popen([sys.executable, __file__, "--edge", cluster.url(i), design, consistency, prefix,
                                      str(n)], stdout=subprocess.PIPE, stderr=err, text=True, cwd=REPO,
                                     env={**os.environ, "PYTHONPATH": str(REPO)})
            self.procs.append(p)
            out: list[dict] = []
            self.lines.append(out)
            threading.Thread(target=lambda p=p, out=out: [out.append(json.loads(line)) for line in p.stdout],
                             daemon=True).start()

    def ready(self, timeout: float = 600) -> None:
        """Every edge's first complete snapshot; an edge that died says why at once."""
        deadline = time.monotonic() + timeout
        while not all(any(e.get("ready") for e in out) for out in self.lines):
            for p, err in zip(self.procs, self.errors, strict=True):
                if p.poll() is not None:
                    raise RuntimeError(f"edge {p.pid} exited {p.returncode}: {err.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError("not every edge had its first complete snapshot")
            time.sleep(0.2)

    def seen(self, mark: str, alive: list[int] | None = None) -> list[dict | None]:
        return [next((e for e in self.lines[i] if e.get("mark") == mark), None)
                for i in (alive if alive is not None else range(len(self.lines)))]

    def lost(self) -> int:
        return sum(e["lost"] for out in self.lines for e in out if "lost" in e)

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait()


def rpc_requests(cluster: ConsulCluster) -> list[float]:
    """RPC requests each server handled so far (`consul_rpc_request`, cumulative in the Prometheus
    format): a forwarded read counts at the server that answers it."""
    out = []
    for i in range(3):
        with urllib.request.urlopen(cluster.url(i) + "/v1/agent/metrics?format=prometheus", timeout=30) as r:
            text = r.read().decode()
        out.append(sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith("consul_rpc_request ")))
    return out


def populate(cluster: ConsulCluster, start: int, end: int) -> None:
    def one(i: int) -> None:
        for j, node in enumerate(NODES):
            cluster.put(i, "/v1/catalog/register", {
                "Node": node, "Address": "127.0.0.1",
                "Service": {"ID": f"svc{i}-{j}", "Service": f"svc{i}", "Address": "127.0.0.1",
                            "Port": 20000 + j, "Meta": {"container_port": "80"}}})
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(one, range(start, end)))


def mark(cluster: ConsulCluster, writer: int, n: int, rng: random.Random, tag: str, k: int) -> str:
    service, mark_id = f"svc{rng.randrange(n)}", f"mark-{tag}-{k}"
    cluster.put(writer, "/v1/catalog/register", {
        "Node": NODES[k % 3], "Address": "127.0.0.1",
        "Service": {"ID": mark_id, "Service": service, "Address": "127.0.0.1", "Port": 30000 + k % 30000,
                    "Meta": {"container_port": "80"}}})
    return mark_id


# --- one run ------------------------------------------------------------------------------------------
def run(cluster: ConsulCluster, design: str, m: int, n: int, consistency: str, changes: int, tag: str) -> dict:
    fleet = Fleet(cluster, m, n, design, consistency, f"bench/{tag}")
    try:
        fleet.ready()
        time.sleep(3)
        load0 = os.getloadavg()[0]
        cpu0, rpc0 = [cpu_seconds(p.pid) for p in cluster.procs], rpc_requests(cluster)
        edges0 = sum(cpu_seconds(p.pid) for p in fleet.procs)
        rng = random.Random(tag)
        latencies, marks = [], []
        writer = cluster.leader()
        t_start = time.time()
        for k in range(changes):
            mark_id = mark(cluster, writer, n, rng, tag, k)
            t0 = time.time()
            entries = wait_until(lambda m=mark_id: (s := fleet.seen(m)) and None not in s and s, 120, interval=0.002,
                                 what=f"{mark_id} at every edge")
            latencies.append((max(e["t"] for e in entries) - t0) * 1000)
            marks.append(entries)
        elapsed = time.time() - t_start
        cpu = [(cpu_seconds(p.pid) - a) * 100 / changes for p, a in zip(cluster.procs, cpu0, strict=True)]
        edge_cpu = (sum(cpu_seconds(p.pid) for p in fleet.procs) - edges0) * 1000 / changes
        rpc = [b - a for a, b in zip(rpc0, rpc_requests(cluster), strict=True)]
        # Bytes and requests each edge received between the first and the last change it saw.
        per_edge_b = [(last["b"] - first["b"]) / (changes - 1) for first, last in zip(marks[0], marks[-1],
                                                                                    strict=True)]
        per_edge_r = [(last["r"] - first["r"]) / (changes - 1) for first, last in zip(marks[0], marks[-1],
                                                                                    strict=True)]
        r = {"design": design, "edges": m, "services": n, "consistency": consistency, "changes": changes,
             "cpu_s_per_100": round(sum(cpu), 2), "cpu_per_server": "/".join(f"{c:.2f}" for c in cpu),
             "cpu_ms_per_change": round(sum(cpu) * 10, 1), "edges_cpu_ms_per_change": round(edge_cpu, 1),
             "rpc_per_server": "/".join(f"{x:.0f}" for x in rpc),
             "slowest_p50_ms": round(pct(latencies, 50), 1), "slowest_p90_ms": round(pct(latencies, 90), 1),
             "slowest_p99_ms": round(pct(latencies, 99), 1), "slowest_max_ms": round(max(latencies), 1),
             "kb_per_change_edge_mean": round(sum(per_edge_b) / m / 1024, 2),
             "kb_per_change_edge_max": round(max(per_edge_b) / 1024, 2),
             "kb_per_change_total": round(sum(per_edge_b) / 1024, 1),
             "requests_per_change": round(sum(per_edge_r), 1), "lost": fleet.lost(),
             "changes_per_s": round(changes / elapsed, 1), "load": f"{load0:.1f}-{os.getloadavg()[0]:.1f}"}
        print(r, flush=True)
        return r
    finally:
        fleet.stop()


def writes_only(cluster: ConsulCluster, n: int, changes: int) -> dict:
    """The same changes with no edge at all: what the writes alone cost the servers."""
    cpu0, rng, writer = [cpu_seconds(p.pid) for p in cluster.procs], random.Random("w"), cluster.leader()
    for k in range(changes):
        mark(cluster, writer, n, rng, "w", k)
        time.sleep(0.05)
    cpu = [(cpu_seconds(p.pid) - a) * 100 / changes for p, a in zip(cluster.procs, cpu0, strict=True)]
    r = {"design": "writes only", "edges": 0, "services": n, "changes": changes, "cpu_s_per_100": round(sum(cpu), 2),
         "cpu_per_server": "/".join(f"{c:.2f}" for c in cpu), "cpu_ms_per_change": round(sum(cpu) * 10, 1)}
    print(r, flush=True)
    return r


def publisher_pid(cluster: ConsulCluster, prefix: str) -> int:
    import base64
    entry = cluster.get(0, f"/v1/kv/{prefix}/head")[0]
    return int(json.loads(base64.b64decode(entry["Value"]))["by"].rsplit(":", 1)[1])


def failover(cluster: ConsulCluster, design: str, m: int, n: int, consistency: str, tag: str) -> dict:
    """Churn, kill -9 the publisher, keep churning: when does every surviving edge apply changes again?"""
    prefix = f"bench/{tag}"
    fleet = Fleet(cluster, m, n, design, consistency, prefix)
    try:
        fleet.ready()
        time.sleep(3)
        rng, writer, k = random.Random(tag), cluster.leader(), 0
        written: list[tuple[str, float]] = []
        churn_stop = threading.Event()

        def churn():
            nonlocal k
            while not churn_stop.is_set():
                written.append((mark(cluster, writer, n, rng, tag, k), time.time()))
                k += 1
                churn_stop.wait(0.1)
        thread = threading.Thread(target=churn, daemon=True)
        thread.start()
        time.sleep(3)
        victim = publisher_pid(cluster, prefix)
        index = next(i for i, p in enumerate(fleet.procs) if p.pid == victim)
        load0 = os.getloadavg()[0]
        os.kill(victim, signal.SIGKILL)
        killed_at = time.time()
        alive = [i for i in range(m) if i != index]
        time.sleep(20)
        churn_stop.set()
        thread.join()
        after = [(mk, t) for mk, t in written if t > killed_at]
        first = after[0][0]
        entries = wait_until(lambda: (s := fleet.seen(first, alive)) and None not in s and s, 60,
                             what=f"{first} at every surviving edge")
        recovered = max(e["t"] for e in entries) - killed_at
        # Every change written during the run reaches every surviving edge.
        last = written[-1][0]
        wait_until(lambda: None not in fleet.seen(last, alive), 60, what="the last change at every surviving edge")
        missing = sum(None in fleet.seen(mk, alive) for mk, _ in written)
        new = publisher_pid(cluster, prefix)
        r = {"design": design, "edges": m, "services": n, "changes": len(written),
             "recovered_s": round(recovered, 2), "lost": fleet.lost(), "missing": missing,
             "new_publisher": new != victim, "load": f"{load0:.1f}-{os.getloadavg()[0]:.1f}"}
        print(r, flush=True)
        return r
    finally:
        fleet.stop()


def spec(text: str) -> tuple[str, int, int]:
    design, m, n = text.split(":")
    if design not in DESIGNS:
        raise argparse.ArgumentTypeError(f"design must be one of {', '.join(DESIGNS)}")
    return design, int(m), int(n)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--edge":
        edge_main(*sys.argv[2:7])
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=spec, action="append")
    ap.add_argument("--changes", type=int, default=100)
    ap.add_argument("--failover", type=spec, default=None)
    ap.add_argument("--no-failover", action="store_true")
    ap.add_argument("--consistency", default="stale", choices=("stale", "consistent"))
    args = ap.parse_args()
    runs = args.run or [spec("today:30:1000"), spec("fleet:30:1000"), spec("fleet:100:2000")]
    fail = None if args.no_failover else (args.failover or spec("fleet:30:1000"))
    sizes = sorted({n for _, _, n in runs} | ({fail[2]} if fail else set()))
    root = Path(tempfile.mkdtemp(prefix="fleet-"))
    cluster = ConsulCluster(root, hcl=(TELEMETRY,)).start()
    results, failovers = [], []
    try:
        populated = 0
        for n in sizes:
            t0 = time.time()
            populate(cluster, populated, n)
            populated = n
            print(f"{n} services x 3 instances registered ({time.time() - t0:.0f}s)", flush=True)
            results.append(writes_only(cluster, n, args.changes))
            for i, (design, m, size) in enumerate(runs):
                if size == n:
                    results.append(run(cluster, design, m, n, args.consistency, args.changes, f"r{i}"))
            if fail and fail[2] == n:
                failovers.append(failover(cluster, *fail, args.consistency, "failover"))
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)
    keys = ["design", "edges", "services", "consistency", "changes", "cpu_s_per_100", "cpu_per_server",
            "cpu_ms_per_change", "edges_cpu_ms_per_change", "rpc_per_server", "slowest_p50_ms", "slowest_p90_ms",
            "slowest_p99_ms",
            "slowest_max_ms",
            "kb_per_change_edge_mean", "kb_per_change_edge_max", "kb_per_change_total", "requests_per_change",
            "lost", "load"]
    print("\n" + " | ".join(keys))
    for r in results:
        print(" | ".join(str(r.get(k, "")) for k in keys))
    for r in failovers:
        print(f"failover ({r['design']}, {r['edges']} edges, {r['services']} services, {r['changes']} changes): "
              f"every surviving edge applies changes again {r['recovered_s']} s after the publisher's kill -9; "
              f"instances lost {r['lost']}; changes missing {r['missing']}; load {r['load']}")
    print(f"csv: {write_csv('fleet.csv', keys, [[r.get(k, '') for k in keys] for r in results])}")


if __name__ == "__main__":
    main()
