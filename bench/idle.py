"""Benchmark 4: idle cost. CPU seconds (edge + HAProxy) and Consul requests over 60 s with no
change, with 100 services registered, per apply mode. Writes bench/out/idle.csv.

Usage: .venv/bin/python bench/idle.py [seconds, default 60]
"""

from __future__ import annotations

import sys
import time

from harness import MODES, consul_requests, cpu_seconds, haproxy_pids, stack, write_csv

from tests.integration.edge_helpers import answers, register
from tests.support.http import Backend


def run(mode: str, seconds: float) -> dict:
    backend = Backend("idle")
    try:
        with stack(mode, extra=("--log-level", "DEBUG", "--consul-wait", "30")) as (consul, edge):
            for i in range(100):
                register(consul, f"idle{i}", f"idle-{i}", backend)
            answers(edge, "idle99-80.bench.example", {"idle"}, timeout=30)
            time.sleep(2)
            pids = [edge.proc.pid, *haproxy_pids(edge)]
            cpu0 = sum(cpu_seconds(p) for p in pids)
            # The counters as of the last change; the edge logs them again when it stops. The
            # long-poll in flight at the start is counted before it (±1).
            req0 = consul_requests(edge.log())
            time.sleep(seconds)
            cpu = sum(cpu_seconds(p) for p in pids) - cpu0
        requests = consul_requests(edge.log()) - req0
    finally:
        backend.close()
    return {"mode": mode, "seconds": seconds, "cpu_s": round(cpu, 3), "consul_requests": requests}


def main(seconds: float) -> None:
    results = [run(mode, seconds) for mode in MODES]
    print(f"\nidle, {seconds:g} s, 100 services, no change (consul wait 30 s)")
    for r in results:
        print(f"{r['mode']:<8} cpu {r['cpu_s']:.3f} s (edge + HAProxy)  consul requests {r['consul_requests']}")
    keys = ["mode", "seconds", "cpu_s", "consul_requests"]
    print(f"csv: {write_csv('idle.csv', keys, [[r[k] for k in keys] for r in results])}")


if __name__ == "__main__":
    main(float(sys.argv[1]) if len(sys.argv) > 1 else 60)
