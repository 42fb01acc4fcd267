"""Benchmark: certificates at scale (issue 20, item 4).

1. The served set alone (`edge.tls.plan.Served`, no I/O): building it from every certificate (what
   `serving()` computed on each step before) and one change, at 500, 2,000 and 10,000.
2. A real edge, HAProxy and Consul with N certificates in Consul KV (`--consul-wait 30`, the
   default): how long the first load takes; a certificate renewed in KV until a handshake presents
   it, and the certificate stage's own time for it (its log line, from taking the sets in to the
   runtime commands done); an instance added or removed (live); a new vhost (a reload, in which
   HAProxy's check and new worker load every certificate: its time is printed apart); the
   edge's CPU while idle for 70 s (the 60 s tick and two long-poll timeouts included).

Usage: .venv/bin/python bench/certs.py [N ...]   (default: 2000 10000)
Writes bench/out/certs.csv.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
import ssl
import sys
import tempfile
import time
from pathlib import Path

from harness import HEADER, cpu_seconds, summary_row, write_csv

from edge.tls.certs import Certificate
from edge.tls.plan import Served
from tests.integration.edge_helpers import (
    deregister,
    https_bodies,
    leaf_fingerprint,
    presented_fingerprint,
    put_kv_many,
    register,
)
from tests.support.edge import EdgeProcess
from tests.support.http import Backend
from tests.support.procs import consul_agent, free_ports, wait_until
from tests.support.tlsgen import make_ca

DOMAIN = "bench.test"
CA = make_ca("certs bench CA")
VERIFY = ssl.create_default_context(cadata=CA.pem)
IDLE = 70.0
RENEWALS = 20
INSTANCE_CHANGES = 10


def pure(n: int) -> tuple[float, float]:
    """(seconds to build the served set of n certificates, seconds for one change), best of 3."""
    now = dt.datetime.now(dt.UTC)

    def cert(i: int, version: str = "") -> Certificate:
        pem = f"{i} {version}"
        return Certificate(f"kv/site{i}", (f"site{i}-80.{DOMAIN}",), now - dt.timedelta(days=1),
                           now + dt.timedelta(days=30 + i % 60), hashlib.sha256(pem.encode()).hexdigest(), pem)
    offered = {f"kv/site{i}": cert(i) for i in range(n)}
    builds, changes = [], []
    for round_ in range(3):
        served = Served((DOMAIN,))
        t0 = time.perf_counter()
        served.update(offered, now)
        builds.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        served.update({"kv/site7": cert(7, str(round_))}, now)
        changes.append(time.perf_counter() - t0)
    return min(builds), min(changes)


def step_ms(log: str, since: int) -> list[float]:
    return [float(ms) for ms in re.findall(r"certificates applied live in ([\d.]+) ms", log[since:])]


def real(n: int, work: Path) -> dict[str, object]:
    figures: dict[str, object] = {"n": n}
    with consul_agent(work / f"consul-{n}") as consul:
        t0 = time.monotonic()
        put_kv_many(consul, {f"bench/certs/site{i}": CA.bundle([f"site{i}-80.{DOMAIN}"]) for i in range(n)})
        print(f"  {n} certificates made and written to KV in {time.monotonic() - t0:.1f} s")
        http, https = free_ports(2)
        edge = EdgeProcess(consul.url, domains=(DOMAIN,), port=http, https_port=https,
                           extra=("--certs-kv", "bench/certs", "--consul-wait", "30", "--log-level", "INFO"))
        backends = [Backend("one"), Backend("two")]
        host = f"site1-80.{DOMAIN}"
        crt_list = edge.state_dir / "certs" / "crt-list"
        try:
            t0 = time.monotonic()
            edge.start(timeout=120)
            wait_until(lambda: crt_list.is_file() and len(crt_list.read_text().splitlines()) == n, 3600,
                       interval=0.5, what=f"{n} certificates loaded")
            figures["load_s"] = time.monotonic() - t0
            t0 = time.monotonic()
            register(consul, "site1", "site1-1", backends[0])
            wait_until(lambda: https_bodies(edge, host, VERIFY) == {"one"}, 600, interval=0.05, what="the new vhost")
            figures["new_vhost_s"] = time.monotonic() - t0
            reload = wait_until(lambda: re.search(r"reloaded HAProxy in (\d+) ms .*vhost added", edge.log()), 600)
            figures["reload_s"] = int(reload.group(1)) / 1000
            instance = []
            for i in range(INSTANCE_CHANGES):
                expected = {"one", "two"} if i % 2 == 0 else {"one"}
                t0 = time.monotonic()
                if i % 2 == 0:
                    register(consul, "site1", "site1-2", backends[1])
                else:
                    deregister(consul, "site1-2")
                wait_until(lambda e=expected: https_bodies(edge, host, VERIFY) == e, 60, interval=0.005)
                instance.append((time.monotonic() - t0) * 1000)
            figures["instance_ms"] = instance
            since = len(edge.log())
            renewals = []
            for i in range(RENEWALS):
                name = f"site{(i * 37) % n}-80.{DOMAIN}"
                bundle = CA.bundle([name], days=60 + i)
                want = leaf_fingerprint(bundle)
                t0 = time.monotonic()
                put_kv_many(consul, {f"bench/certs/site{(i * 37) % n}": bundle})
                wait_until(lambda h=name, w=want: presented_fingerprint(edge, h) == w, 60, interval=0.005)
                renewals.append((time.monotonic() - t0) * 1000)
                time.sleep(0.2)
            figures["renewal_ms"] = renewals
            figures["stage_ms"] = step_ms(edge.log(), since)
            time.sleep(5)
            pid = edge.proc.pid
            before = cpu_seconds(pid)
            time.sleep(IDLE)
            figures["idle_cpu_s_per_min"] = (cpu_seconds(pid) - before) * 60 / IDLE
        finally:
            edge.stop()
            for backend in backends:
                backend.close()
    return figures


def main() -> int:
    sizes = [int(a) for a in sys.argv[1:]] or [2000, 10000]
    print("the served set alone (edge.tls.plan.Served, best of 3)")
    print(f"  {'certificates':>12} {'full build ms':>14} {'one change ms':>14}")
    for n in (500, 2000, 10000):
        build, change = pure(n)
        print(f"  {n:>12} {build * 1000:>14.1f} {change * 1000:>14.3f}")
    work = Path(tempfile.mkdtemp(prefix="bench-certs-"))
    rows = []
    for n in sizes:
        print(f"\na real edge with {n} certificates in Consul KV")
        f = real(n, work)
        print(f"  first load of {n} certificates: {f['load_s']:.1f} s (applied 50 ms a step, routes in between)")
        print(f"  new vhost (a reload) until HTTPS answers: {f['new_vhost_s']:.1f} s, "
              f"of which HAProxy's reload (check + new worker, each loading {n} certificates): {f['reload_s']:.1f} s")
        print(HEADER)
        print(summary_row("instance change", f["instance_ms"]))
        print(summary_row("KV renewal -> served", f["renewal_ms"]))
        print(summary_row("the stage's step", f["stage_ms"] or [float("nan")]))
        print(f"  edge CPU while idle: {f['idle_cpu_s_per_min']:.2f} s per minute")
        rows.append([n, f"{f['load_s']:.1f}", f"{f['new_vhost_s']:.1f}", f"{f['reload_s']:.1f}",
                     f"{max(f['instance_ms']):.1f}", f"{sorted(f['renewal_ms'])[len(f['renewal_ms']) // 2]:.1f}",
                     f"{max(f['stage_ms'] or [float('nan')]):.1f}", f"{f['idle_cpu_s_per_min']:.3f}"])
    write_csv("certs.csv", ["certificates", "load_s", "new_vhost_s", "reload_s", "instance_max_ms",
                            "renewal_p50_ms", "stage_max_ms", "idle_cpu_s_per_min"], rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
