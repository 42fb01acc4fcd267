"""Benchmark: the registrator across a Docker Engine stop/start and a Consul agent restart.

Real dockerd, Consul dev agent and registrator on loopback, N containers of the busybox image whose
httpd exits on SIGTERM (as PID 1 it would ignore it: dockerd's shutdown would then wait Docker's
10 s stop timeout per container, and under load its own 15 s shutdown timeout runs out first and
leaves containers running without a daemon); half of them with `--restart always`. Per run:
1. SIGTERM to dockerd. Measured from it: until no service is routable any more (every instance
   critical or gone in the health API), and until every one is still registered and critical
   (held); how long dockerd took to exit; the WARNING/ERROR lines the registrator wrote meanwhile.
2. dockerd started again on the same data root (it restarts the `always` half before it answers:
   with 50 of them that takes a while). Measured from its first answer: until Consul equals what
   it runs (IDs and ports) and all of those pass.
3. The Consul dev agent stopped and started on the same port (it forgets every service). Measured
   from its having a leader again: until every service is registered and passing.

`--repo DIR` runs the registrator of another checkout (e.g. an export of main) for comparison;
`--no-drain` passes that flag. Writes bench/out/registrator_restarts.csv.

Usage: .venv/bin/python bench/registrator_restarts.py [N, default 100] [--repo DIR] [--no-drain]
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from harness import REPO, write_csv

from tests.support.docker_engine import IMAGE, build_image, cleanup, engine
from tests.support.procs import consul_agent, stop_process, wait_until

HOST = "bench"
SERVE = 'httpd -f -p 80 -h /www & trap "kill $!; exit 0" TERM; wait'
POLL = 0.05     # seconds between reads of the health API (polling harder slows the agent under test)
AGENT_LIMIT = 30.0   # seconds given to the registrator to register again what a restarted agent forgot


def health(url: str) -> dict[str, bool]:
    with urllib.request.urlopen(f"{url}/v1/health/service/nginx", timeout=5) as r:
        return {e["Service"]["ID"]: all(c["Status"] == "passing" for c in e["Checks"]) for e in json.loads(r.read())}


def ours(url: str) -> dict[str, int]:
    with urllib.request.urlopen(f"{url}/v1/agent/services", timeout=5) as r:
        return {sid: s["Port"] for sid, s in json.loads(r.read()).items() if sid.startswith(f"{HOST}:")}


def truth(client) -> dict[str, int]:
    return {f"{HOST}:{c.name}:80": int(c.attrs["NetworkSettings"]["Ports"]["80/tcp"][0]["HostPort"])
            for c in client.containers.list()}


def loud(log: Path, skip: int) -> list[str]:
    lines = log.read_text(errors="replace").splitlines()[skip:]
    return [line for line in lines if re.search(r" (WARNING|ERROR|CRITICAL) ", line)]


def logged_at(line: str) -> float:
    """The epoch time of a log line (`2026-12-03 11:23:19,585 ERROR …`, local time)."""
    return datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()


def main(n: int, repo: Path, drain: bool) -> None:
    dockerd = engine().start()
    client = dockerd.client()
    build_image(client)
    work = Path(tempfile.mkdtemp(prefix="bench-restarts-"))
    log_path = work / "registrator.log"
    with consul_agent(work / "consul") as consul:
        registrator = subprocess.Popen(
            [sys.executable, "-m", "haproxy_consul", "registrator", "--docker", dockerd.url, "--consul", consul.url,
             "--hostname", HOST, "--resync", "600", *(() if drain else ("--no-drain",))],
            cwd=repo, stdout=open(log_path, "ab"), stderr=subprocess.STDOUT)
        try:
            wait_until(lambda: "in sync; watching Docker events" in log_path.read_text(), 30, what="registrator")
            for i in range(n):
                client.containers.run(IMAGE, ["sh", "-c", SERVE], detach=True, name=f"w{i}", publish_all_ports=True,
                                      restart_policy={"Name": "always" if i % 2 == 0 else "no"})
            wait_until(lambda: len(health(consul.url)) == n and all(health(consul.url).values()), 120,
                       what=f"{n} services passing")
            skip = len(log_path.read_text().splitlines())

            stopping = threading.Thread(target=dockerd.stop)
            t0, wall0 = time.perf_counter(), time.time()
            stopping.start()
            unroutable = held = stopped = None
            while stopped is None or unroutable is None:       # bounded: dockerd.stop kills after 20 s
                now, h = time.perf_counter() - t0, health(consul.url)
                if unroutable is None and not any(h.values()):
                    unroutable = now
                if held is None and len(h) == n and not any(h.values()):
                    held = now
                if stopped is None and not stopping.is_alive():
                    stopped = now
                if now > 60:
                    break
                time.sleep(POLL)
            stopping.join(60)
            outage_lines = loud(log_path, skip)
            skip = len(log_path.read_text().splitlines())

            dockerd.start(timeout=300)                  # it restarts the `always` ones before it answers
            t1 = time.perf_counter()
            wait_until(lambda: ours(consul.url) == truth(client) and len(health(consul.url)) == len(truth(client))
                       and all(health(consul.url).values()), 120, interval=POLL, what="Consul equal to the engine")
            back = time.perf_counter() - t1
            running = len(truth(client))

            consul.stop()
            consul.start()
            t2 = time.perf_counter()
            expected = truth(client)
            agent_back = None
            while agent_back is None and time.perf_counter() - t2 < AGENT_LIMIT:
                h = health(consul.url)
                if ours(consul.url) == expected and len(h) == len(expected) and all(h.values()):
                    agent_back = time.perf_counter() - t2
                time.sleep(POLL)
            after_lines = loud(log_path, skip)
        finally:
            stop_process(registrator)
            try:
                for c in client.containers.list(all=True):
                    c.remove(force=True)
            finally:
                dockerd.stop()
                cleanup(dockerd.root)

    def s(value: float | None) -> str:
        return "never" if value is None else f"{value:.2f} s"
    print(f"registrator from {repo}, drain {'on' if drain else 'off'}, {n} containers")
    print(f"  dockerd SIGTERM → no service routable     {s(unroutable)}")
    print(f"  dockerd SIGTERM → all {n} held (critical)   {s(held)}")
    print(f"  dockerd exited after                      {s(stopped)}")
    first = logged_at(outage_lines[0]) - wall0 if outage_lines else None
    print(f"  dockerd SIGTERM → first WARNING/ERROR     {s(first)}")
    print(f"  WARNING/ERROR lines during the outage     {len(outage_lines)}")
    for line in outage_lines[:3]:
        print(f"    {line[:200]}")
    print(f"  dockerd back → Consul equal ({running} run)  {back:.2f} s")
    print(f"  agent restarted → all registered, passing {s(agent_back)} (given {AGENT_LIMIT:g} s)")
    print(f"  WARNING/ERROR lines after the outage      {len(after_lines)}")
    for line in after_lines[:3]:
        print(f"    {line[:200]}")
    rows = [[str(repo), drain, n, unroutable, held, first, stopped, len(outage_lines), round(back, 3),
             agent_back, len(after_lines)]]
    print("csv:", write_csv("registrator_restarts.csv", ["repo", "drain", "n", "unroutable_s", "held_s", "first_line_s",
                                                        "stopped_s", "outage_lines", "back_s", "agent_back_s",
                                                        "after_lines"], rows))


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("n", type=int, nargs="?", default=100)
    p.add_argument("--repo", type=Path, default=REPO)
    p.add_argument("--no-drain", action="store_true")
    a = p.parse_args()
    main(a.n, a.repo.resolve(), not a.no_drain)
