"""Benchmark: what a client under load sees when backend containers are stopped, with and
without the registrator's drain (maintenance on the `kill` event, before the process exits).

Real dockerd, Consul, registrator and edge on loopback. Per run: 4 backends of one service,
`wrk` keep-alive through the edge for 12 s, and `docker stop` of three of them at 2, 5 and 8 s.
Two kinds of backend: `graceful` keeps serving for 2 s after SIGTERM, then exits (what a
well-behaved server does); `abrupt` exits at once on SIGTERM. A first run stops nothing: the
baseline latency of busybox httpd behind the edge on this machine. Writes
bench/out/registrator_drain.csv.

Usage: .venv/bin/python bench/registrator_drain.py [runs per case, default 2]
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from harness import REPO, write_csv

from tests.support.docker_engine import IMAGE, build_image, cleanup, engine
from tests.support.edge import EdgeProcess
from tests.support.procs import consul_agent, require, stop_process, wait_until

HOST = "drainme-80.bench.example"
BACKENDS = {
    "graceful": 'httpd -f -p 80 -h /www & pid=$!; trap "sleep 2; kill $pid; exit 0" TERM; wait $pid',
    "abrupt": 'httpd -f -p 80 -h /www & pid=$!; trap "kill $pid; exit 0" TERM; wait $pid',
}
SECONDS, STOPS = 12, (2.0, 5.0, 8.0)
CONNECTIONS = 8
# A steady rate (each connection waits 10 ms between requests, ~600 requests/s in all) rather than
# saturation: busybox httpd forks per connection, and a saturated 2-core machine drops SYNs and
# resets connections whether a backend stops or not, which would drown what a stop costs.
PACE_LUA = "function delay() return 10 end\n"


def one_run(dockerd, consul, edge, backend: str, drain: bool, log_dir: Path, stops=STOPS) -> dict:
    client = dockerd.client()
    log = open(log_dir / f"registrator-{backend}-{drain}.log", "ab")
    registrator = subprocess.Popen(
        [sys.executable, "-m", "haproxy_consul", "registrator", "--docker", dockerd.url, "--consul", consul.url,
         "--hostname", "bench", *(() if drain else ("--no-drain",))], cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    containers = [client.containers.run(IMAGE, detach=True, name=f"b{i}", publish_all_ports=True,
                                        environment={"SERVICE_NAME": "drainme"},
                                        command=["sh", "-c", BACKENDS[backend]]) for i in range(4)]
    try:
        wait_until(lambda: edge.get(HOST)[0] == 200 and len(healthy(consul)) == 4, 30, what="4 backends routed")
        time.sleep(0.5)
        timers = [threading.Timer(t, lambda c=c: c.stop(timeout=10)) for t, c in zip(stops, containers, strict=False)]
        for t in timers:
            t.start()
        pace = log_dir / "pace.lua"
        pace.write_text(PACE_LUA)
        out = subprocess.run([require("wrk"), "-t", "2", "-c", str(CONNECTIONS), "-d", f"{SECONDS}s", "--timeout", "5s",
                              "--latency", "-s", str(pace), "-H", f"Host: {HOST}", f"http://127.0.0.1:{edge.port}/"],
                             capture_output=True, text=True, timeout=SECONDS + 60).stdout
        (log_dir / f"wrk-{backend}-{drain}-{len(stops)}-{time.monotonic():.0f}.txt").write_text(out)
        for t in timers:
            t.join()
    finally:
        for c in containers:
            c.remove(force=True)
        stop_process(registrator)
        wait_until(lambda: not healthy(consul), 10, what="services gone")
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {
        "backend": backend if stops else "no stop", "drain": drain,
        "requests": int(re.search(r"(\d+) requests in", out).group(1)),
        "socket_errors": sum(int(x) for x in sock.groups()) if sock else 0,
        "non_2xx": int(non2xx.group(1)) if non2xx else 0,
        "p99": re.search(r"99%\s+(\S+)", out).group(1),
        "max": re.search(r"Latency\s+\S+\s+\S+\s+(\S+)", out).group(1),
    }


def healthy(consul) -> list:
    return consul.api("GET", "/v1/health/service/drainme?passing=1")


def main(runs: int) -> None:
    dockerd = engine().start()
    build_image(dockerd.client())
    log_dir = Path(tempfile.mkdtemp(prefix="bench-drain-"))
    results = []
    try:
        with consul_agent(log_dir / "consul") as consul:
            edge = EdgeProcess(consul.url, domains=("bench.example",), extra=("--log-level", "INFO")).start()
            try:
                results.append(one_run(dockerd, consul, edge, "graceful", True, log_dir, stops=()))   # baseline
                print(results[-1], flush=True)
                for backend in BACKENDS:
                    for drain in (False, True):
                        for _ in range(runs):
                            results.append(one_run(dockerd, consul, edge, backend, drain, log_dir))
                            print(results[-1], flush=True)
            finally:
                edge.stop()
    finally:
        for c in dockerd.client().containers.list(all=True):
            c.remove(force=True)
        dockerd.stop()
        cleanup(dockerd.root)
    print(f"\nwrk -t2 -c{CONNECTIONS} keep-alive, paced at 10 ms per connection, through the edge, {SECONDS} s;\n"
          f"`docker stop` of 3 of 4 backends "
          f"at {', '.join(f'{t:g}' for t in STOPS)} s; one line per run (logs in {log_dir})")
    print(f"{'backend':<10}{'drain':<7}{'requests':>10}{'socket err':>12}{'non-2xx':>9}{'p99':>10}{'max':>10}")
    for r in results:
        print(f"{r['backend']:<10}{'yes' if r['drain'] else 'no':<7}{r['requests']:>10}{r['socket_errors']:>12}"
              f"{r['non_2xx']:>9}{r['p99']:>10}{r['max']:>10}")
    keys = ["backend", "drain", "requests", "socket_errors", "non_2xx", "p99", "max"]
    print(f"csv: {write_csv('registrator_drain.csv', keys, [[r[k] for k in keys] for r in results])}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 2)
