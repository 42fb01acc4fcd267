"""Benchmark 2: zero errors under churn. wrk keep-alive at a steady rate through the edge while
200 instance changes and 20 vhost additions/removals happen, per apply mode.

Every instance that is registered serves 200, so any non-2xx answer or socket error is the
edge's or HAProxy's doing. Writes bench/out/churn_errors.csv.

Usage: .venv/bin/python bench/churn_errors.py [instance changes, default 200] [vhost changes, default 20]
"""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time

from harness import MODES, OUT, stack, write_csv

from tests.integration.edge_helpers import answers, deregister, register, set_ttl
from tests.support.http import Backend
from tests.support.procs import require

HOST = "load-80.bench.example"
PACE_LUA = "function delay() return 10 end\n"   # ms between requests on each connection: a steady rate


def churn(consul, extra: list[Backend], spare: Backend, instance_changes: int, vhost_changes: int,
          seconds: float) -> None:
    """Spread the changes evenly over `seconds`: instances cycle through register, critical,
    passing and deregister; vhosts are added then removed."""
    steps = [("i", k) for k in range(instance_changes)] + [("v", k) for k in range(vhost_changes)]
    steps.sort(key=lambda s: s[1] / (instance_changes if s[0] == "i" else vhost_changes))
    gap = seconds / len(steps)
    for kind, k in steps:
        if kind == "i":
            slot, phase = (k // 4) % len(extra), k % 4
            sid = f"load-x{slot}"
            if phase == 0:
                register(consul, "load", sid, extra[slot], ttl=True)
            elif phase == 1:
                set_ttl(consul, sid, "critical")
            elif phase == 2:
                set_ttl(consul, sid, "passing")
            else:
                deregister(consul, sid)
        elif k % 2 == 0:
            register(consul, f"vhost{k}", f"vhost-{k}", spare)
        else:
            deregister(consul, f"vhost-{k - 1}")
        time.sleep(gap)


def run(mode: str, instance_changes: int, vhost_changes: int) -> dict:
    wrk = require("wrk")
    base, spare = Backend("base"), Backend("spare")
    extra = [Backend(f"x{i}") for i in range(3)]
    script = OUT / "pace.lua"
    OUT.mkdir(parents=True, exist_ok=True)
    script.write_text(PACE_LUA)
    seconds = 12.0
    try:
        with stack(mode) as (consul, edge):
            register(consul, "load", "load-base", base)
            answers(edge, HOST, {"base"}, timeout=30)
            time.sleep(0.5)
            reloads_before = edge.log().count("reloaded HAProxy in")
            t = threading.Thread(target=churn, args=(consul, extra, spare, instance_changes, vhost_changes, seconds))
            t.start()
            out = subprocess.run([wrk, "-t", "2", "-c", "20", "-d", f"{int(seconds + 2)}s", "--timeout", "5s",
                                  "-s", str(script), "-H", f"Host: {HOST}", f"http://127.0.0.1:{edge.port}/"],
                                 capture_output=True, text=True, timeout=seconds + 60).stdout
            t.join()
            reloads = edge.log().count("reloaded HAProxy in") - reloads_before
    finally:
        for b in (base, spare, *extra):
            b.close()
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {
        "mode": mode,
        "requests": int(re.search(r"(\d+) requests in", out).group(1)),
        "socket_errors": sum(int(x) for x in sock.groups()) if sock else 0,
        "non_2xx": int(non2xx.group(1)) if non2xx else 0,
        "reloads": reloads,
        "latency": re.search(r"Latency\s+(\S+)\s+(\S+)\s+(\S+)", out).groups(),
    }


def main(instance_changes: int, vhost_changes: int) -> None:
    results = [run(mode, instance_changes, vhost_changes) for mode in MODES]
    print(f"\nwrk keep-alive, 20 connections paced at ~10 ms, while {instance_changes} instance changes and "
          f"{vhost_changes} vhost changes happen")
    print(f"{'mode':<10}{'requests':>10}{'socket err':>12}{'non-2xx':>10}{'reloads':>9}{'lat avg':>10}{'lat max':>10}")
    for r in results:
        print(f"{r['mode']:<10}{r['requests']:>10}{r['socket_errors']:>12}{r['non_2xx']:>10}{r['reloads']:>9}"
              f"{r['latency'][0]:>10}{r['latency'][2]:>10}")
    rt, rl = results
    errors = [r["socket_errors"] + r["non_2xx"] for r in results]
    print(f"errors: runtime {errors[0]}, reload {errors[1]}; reloads {rt['reloads']} vs {rl['reloads']}")
    rows = [[r["mode"], r["requests"], r["socket_errors"], r["non_2xx"], r["reloads"]] for r in results]
    print(f"csv: {write_csv('churn_errors.csv', ['mode', 'requests', 'socket_errors', 'non_2xx', 'reloads'], rows)}")


if __name__ == "__main__":
    args = [int(a) for a in sys.argv[1:3]]
    main(*(args + [200, 20][len(args):]))
