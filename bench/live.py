"""Benchmark 10: every Consul change live on every HAProxy release (issue 16), beside `--apply reload`.

Per release (`--releases`) and apply mode (`--apply`), one table:
- **new vhost routed**: from the Consul write of a new service (agent API, as the registrator
  does) to the first 200 through the edge for its host, p50/p99 over K new vhosts, each removed
  again (write → first 404) before the next, with `--sizes` services (× 3 instances) in the
  catalog. One Consul per size, populated once, shared by every release and mode. In runtime
  mode the edge's DEBUG log splits each one: Consul (write → its answer at the edge), the edge's
  parse (answer → snapshot), plan and runtime commands (snapshot → "applied" line), HAProxy
  (applied → first 200).
- **mixed burst**: `--changes` changes, paced at `--rate` a second: `--new-vhosts` new vhosts and
  as many removed (a FIFO keeping `--in-flight` of them registered), the rest instance churn of
  the existing services (an extra instance registered, then deregistered), while wrk (keep-alive,
  paced, Host headers of services that stay routed) and h2load (h2c, a service answering 20 ms
  late) run against the edge in 5 s chunks. Runtime mode twice: a pool sized for the burst
  (`2 × --in-flight` spares) and the default pool (32: exhaustions expected).
- **kept connections**: a WebSocket and an HTTP/2 connection opened before the burst, asked
  every 2 s during it (echo; GET on a new stream) and after it, and the HAProxy process holding
  each (from `ss`) before and after.

Usage: .venv/bin/python bench/live.py [--releases 2.6,3.0,3.2,3.4] [--apply runtime,reload]
       [--sizes 100,10000] [--k 100] [--k-reload 10] [--changes 10000] [--quick]
Writes bench/out/live.csv.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from burst import Burst, BurstPlan, mixed_changes
from farm import Farm
from harness import pct, until, write_csv
from profile_log import breakdown
from scale import populate

from tests.integration.edge_helpers import deregister, register, reloads
from tests.support.edge import EdgeProcess
from tests.support.haproxy_versions import binary
from tests.support.http import get
from tests.support.procs import consul_agent

DOMAIN = "bench.example"
TARGET_P50, TARGET_P99 = 15.0, 50.0
DEFAULT_POOL = 32


def load_now() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def start_edge(consul, release: str, mode: str, spares: int, level: str, more: tuple[str, ...] = ()) -> EdgeProcess:
    edge = EdgeProcess(consul.url, domains=(DOMAIN,), haproxy=binary(release).path, spares=spares,
                       extra=("--apply", mode, "--log-level", level, *more))
    return edge.start(timeout=300)


def quiet(edge: EdgeProcess, seconds: float = 1.0) -> bool:
    """No reload for `seconds`."""
    before = reloads(edge.log())
    time.sleep(seconds)
    return reloads(edge.log()) == before


def status(port: int, host: str) -> int:
    try:
        return get(port, host, timeout=5)[0]
    except OSError:
        return 0


def sweeps(log: str) -> int:
    """Full refreshes of every service the watcher has made, by its latest counter line."""
    found = re.findall(r"full_refreshes=(\d+)", log)
    return int(found[-1]) if found else 0


def new_vhosts(consul, edge: EdgeProcess, farm: Farm, k: int, seconds: float, release: str, mode: str,
               size: int) -> dict:
    """Up to K new vhosts (at most `seconds`) one after the other, each removed before the next:
    with `size` ≤ 1,000 the removal is timed too (write → first 404); above, the next new vhost is
    written right after the removal, to keep the run short (a removal and an addition in one step)."""
    added, gone, walls = [], [], []
    before = edge.log()
    deadline = time.monotonic() + seconds
    for i in range(k):
        if time.monotonic() > deadline:
            break
        name, host = f"nv{i}", f"nv{i}-80.{DOMAIN}"
        w0, t0 = time.time(), time.perf_counter()
        register(consul, name, f"{name}-1", farm["nv"])
        until(lambda h=host: status(edge.port, h) == 200, timeout=120)
        added.append((time.perf_counter() - t0) * 1000)
        walls.append((name, w0, time.time()))
        t0 = time.perf_counter()
        deregister(consul, f"{name}-1")
        if size <= 1000:
            until(lambda h=host: status(edge.port, h) == 404, timeout=120)
            gone.append((time.perf_counter() - t0) * 1000)
    log = edge.log()
    r = {"release": release, "mode": mode, "services": size, "k": len(added),
         "new_p50": pct(added, 50), "new_p99": pct(added, 99), "new_max": max(added),
         "gone_p50": pct(gone, 50) if gone else None, "gone_p99": pct(gone, 99) if gone else None,
         "reloads": reloads(log) - reloads(before), "sweeps": sweeps(log) - sweeps(before),
         "exhausted": log.count("spare backends exhausted") - before.count("spare backends exhausted")}
    if mode == "runtime":
        r["stages"] = breakdown(log[len(before):], walls)
    print(f"  {release} {mode} {size} services: {r['k']} new vhosts p50 {r['new_p50']:.1f} ms "
          f"p99 {r['new_p99']:.1f} ms (max {r['new_max']:.1f}); {r['reloads']} reloads, {r['sweeps']} full refreshes, "
          f"{r['exhausted']} exhaustions; {stages(r) if r.get('stages') else ''}  [{load_now()}]", flush=True)
    return r


def phase_new_vhosts(args, farm: Farm) -> list[dict]:
    results = []
    for size in args.sizes:
        with consul_agent(Path(tempfile.mkdtemp(prefix="bench-consul-"))) as consul:
            took = populate(consul, size, [farm["b0"], farm["b1"], farm["b2"]])
            print(f"{size} services × 3 instances registered in {took:.1f} s", flush=True)
            for release in args.releases:
                for mode in args.apply:
                    edge = start_edge(consul, release, mode, DEFAULT_POOL, "DEBUG", tuple(shlex.split(args.edge_args)))
                    try:
                        last = f"svc{size - 1}-80.{DOMAIN}"
                        until(lambda e=edge, h=last: status(e.port, h) == 200, timeout=300)
                        until(lambda e=edge: quiet(e), timeout=300)
                        k = args.k if mode == "runtime" else args.k_reload
                        results.append(new_vhosts(consul, edge, farm, k, args.cell_seconds, release, mode, size))
                    except Exception as exc:  # noqa: BLE001 - one failed cell is reported, the others still run
                        print(f"  {release} {mode} {size} services FAILED: {exc!r}", flush=True)
                    finally:
                        edge.stop()
    return results


def phase_burst(args, farm: Farm) -> list[dict]:
    plan = BurstPlan(changes=args.changes, new_vhosts=args.new_vhosts, in_flight=args.in_flight,
                     services=args.burst_services, rate=args.rate)
    changes = mixed_changes(plan)
    results = []
    for release in args.releases:
        runs = [(m, 2 * args.in_flight if m == "runtime" else DEFAULT_POOL) for m in args.apply]
        if "runtime" in args.apply:
            runs.insert(1, ("runtime", DEFAULT_POOL))
        for mode, pool in runs:
            with consul_agent(Path(tempfile.mkdtemp(prefix="bench-consul-"))) as consul:
                burst = Burst(consul, farm, plan, changes, DOMAIN)
                burst.prepare()
                edge = start_edge(consul, release, mode, pool, "INFO", tuple(shlex.split(args.edge_args)))
                try:
                    r = burst.run(edge, f"{release}_{mode}_{pool}")
                except Exception as exc:  # noqa: BLE001 - one failed run is reported, the others still run
                    print(f"  {release} {mode} pool {pool} FAILED: {exc!r}", flush=True)
                    continue
                finally:
                    edge.stop()
            r.update(release=release, mode=mode, pool=pool)
            print(f"  {release} {mode} pool {pool}: {r}  [{load_now()}]", flush=True)
            results.append(r)
    return results


def stages(r: dict) -> str:
    return "where the time goes (p50 / p99 ms): " + ", ".join(
        f"{stage} {pct(ms, 50):.1f} / {pct(ms, 99):.1f}" for stage, ms in r.get("stages", {}).items() if ms)


def verdict(value: float, target: float) -> str:
    return f"{value:.1f} (≤ {target:.0f}: {'met' if value <= target else 'NOT met'})"


def report(args, vhosts: list[dict], bursts: list[dict]) -> None:
    for release in args.releases:
        print(f"\n=== HAProxy {binary(release).full} ===")
        print("new vhost routed (Consul write → first 200), ms; removed (write → first 404)")
        print(f"{'mode':<9}{'services':>9}{'K':>5}  {'p50':<24}{'p99':<24}{'max':>8}{'gone p50':>10}"
              f"{'gone p99':>10}{'reloads':>9}{'sweeps':>8}{'exhaust.':>9}")
        for r in (r for r in vhosts if r["release"] == release):
            runtime = r["mode"] == "runtime"
            p50 = verdict(r["new_p50"], TARGET_P50) if runtime else f"{r['new_p50']:.1f}"
            p99 = verdict(r["new_p99"], TARGET_P99) if runtime else f"{r['new_p99']:.1f}"
            gone = [f"{r[g]:.1f}" if r[g] is not None else "-" for g in ("gone_p50", "gone_p99")]
            print(f"{r['mode']:<9}{r['services']:>9}{r['k']:>5}  {p50:<24}{p99:<24}{r['new_max']:>8.1f}"
                  f"{gone[0]:>10}{gone[1]:>10}{r['reloads']:>9}{r['sweeps']:>8}{r['exhausted']:>9}")
            if r.get("stages"):
                print("         " + stages(r))
        print(f"mixed burst: {args.changes} changes ({args.new_vhosts} new vhosts, {args.new_vhosts} removed, "
              f"{args.in_flight} in flight, the rest instance churn) at ≤ {args.rate}/s under wrk + h2load")
        print(f"{'mode':<9}{'pool':>5}{'writes s':>9}{'reloads':>8}{'master':>7}{'exhaust.':>9}{'wrk req':>9}"
              f"{'wrk fail':>9}{'h2 req':>8}{'h2 fail':>8}{'procs max':>10}{'pids':>6}{'RSS MB before→after':>21}"
              f"{'CPU ms/chg':>11}{'  kept WS / h2 (same worker)'}")
        for r in (r for r in bursts if r["release"] == release):
            print(f"{r['mode']:<9}{r['pool']:>5}{r['write_s']:>9.1f}{r['reloads']:>8}{r['master_reloads']:>7}"
                  f"{r['exhausted']:>9}{r['wrk_requests']:>9}{r['wrk_failed']:>9}{r['h2_requests']:>8}"
                  f"{r['h2_failed']:>8}{r['procs_max']:>10}{r['pids_seen']:>6}"
                  f"{r['rss_before']:>10.1f}→{r['rss_after']:<10.1f}{r['cpu_ms_per_change']:>11.2f}"
                  f"  {r['ws']} / {r['h2']}")
    keys = ["release", "mode", "services", "k", "new_p50", "new_p99", "new_max", "gone_p50", "gone_p99", "reloads",
            "sweeps", "exhausted"]
    rows = [[r.get(k) for k in keys] for r in vhosts]
    bkeys = ["release", "mode", "pool", "write_s", "reloads", "master_reloads", "exhausted", "wrk_requests",
             "wrk_failed", "h2_requests", "h2_failed", "procs_max", "pids_seen", "rss_before", "rss_after",
             "cpu_ms_per_change", "ws", "h2", "catch_up_s"]
    print(f"\ncsv: {write_csv('live.csv', keys, rows)}, "
          f"{write_csv('live_burst.csv', bkeys, [[r.get(k) for k in bkeys] for r in bursts])}")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--releases", default="2.6,3.0,3.2,3.4")
    ap.add_argument("--apply", default="runtime,reload")
    ap.add_argument("--sizes", default="100,10000")
    ap.add_argument("--k", type=int, default=100, help="new vhosts per size, runtime mode")
    ap.add_argument("--k-reload", type=int, default=10, help="new vhosts per size, reload mode (the baseline)")
    ap.add_argument("--cell-seconds", type=float, default=60,
                    help="new vhosts for at most this long per size, release and mode")
    ap.add_argument("--changes", type=int, default=10000)
    ap.add_argument("--new-vhosts", type=int, default=1000)
    ap.add_argument("--in-flight", type=int, default=50)
    ap.add_argument("--burst-services", type=int, default=100)
    ap.add_argument("--rate", type=int, default=250, help="changes per second at most")
    ap.add_argument("--phases", default="vhosts,burst")
    ap.add_argument("--edge-args", default="", help="more arguments for every edge, e.g. --fleet")
    ap.add_argument("--quick", action="store_true", help="small sizes, for development")
    if "--quick" in sys.argv:
        ap.set_defaults(sizes="100,1000", k=20, k_reload=5, changes=1000, new_vhosts=100, in_flight=40)
    args = ap.parse_args()
    args.releases, args.apply = args.releases.split(","), args.apply.split(",")
    args.sizes = [int(s) for s in str(args.sizes).split(",")]
    print(f"command: {shlex.join([sys.executable, *sys.argv])}")
    print(f"load at start: {load_now()}  (nice {os.nice(0)})", flush=True)
    for release in args.releases:
        print(f"HAProxy {release}: {binary(release).full} ({binary(release).path})")
    farm = Farm(["b0", "b1", "b2", "x0", "x1", "x2", "x3", "nv", "slow"], delays={"slow": 0.02})
    t0 = time.time()
    try:
        phases = args.phases.split(",")
        vhosts = phase_new_vhosts(args, farm) if "vhosts" in phases else []
        bursts = phase_burst(args, farm) if "burst" in phases else []
    finally:
        farm.close()
    report(args, vhosts, bursts)
    print(f"\ntook {(time.time() - t0) / 60:.1f} min; load at end: {load_now()}")
    return 0


if __name__ == "__main__":
    threading.excepthook = lambda a: print(f"thread {a.thread.name} failed: {a.exc_value!r}", file=sys.stderr)
    sys.exit(main())
