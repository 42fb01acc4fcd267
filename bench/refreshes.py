"""Benchmark: full refreshes per kind of write, in a churn run that has every kind, per watch mode.

A Consul dev agent (`check_update_interval = "0s"`, so every TTL output update reaches the
catalog, as a busy fleet's syncs do) with S services × 2 instances, each with a TTL check, and an
edge. Then phases of K writes each, one kind per phase: TTL output updates (status unchanged),
node meta changes, health flips, instances added and removed, service meta changes. Prints,
per phase and mode, the edge's full refreshes ("sweeping every service" in its log) and its
`/v1/health/service/<name>` fetches.

Usage: .venv/bin/python bench/refreshes.py [--services 200] [--writes 20] [--api internal,public]
"""

from __future__ import annotations

import argparse
import re
import tempfile
import time
from pathlib import Path

from harness import until

from tests.support.edge import EdgeProcess
from tests.support.http import Backend, get
from tests.support.procs import ConsulAgent, free_ports

DOMAIN = "refresh.example"


def register(consul, name, sid, port, meta=None):
    consul.api("PUT", "/v1/agent/service/register", {
        "Name": name, "ID": sid, "Address": "127.0.0.1", "Port": port,
        "Meta": {"container_port": "80", **(meta or {})},
        "Check": {"CheckID": f"ttl-{sid}", "TTL": "600s", "Status": "passing"}})


def counts(edge) -> tuple[int, int]:
    log = edge.log()
    fetches = re.findall(r"fetches=(\d+)", log)
    return log.count("sweeping every service"), int(fetches[-1]) if fetches else 0


def run(api: str, services: int, writes: int, backends: list[Backend]) -> list[tuple[str, int, int]]:
    consul = ConsulAgent(Path(tempfile.mkdtemp(prefix="refresh-")), free_ports(1)[0],
                         extra_config={"check_update_interval": "0s"}).start()
    edge = None
    try:
        for i in range(services):
            for j in range(2):
                register(consul, f"svc{i}", f"svc{i}-{j}", backends[j].port)
        edge = EdgeProcess(consul.url, domains=(DOMAIN,), extra=("--consul-api", api, "--log-level", "DEBUG",
                                                                  "--consul-wait", "30")).start(timeout=120)
        until(lambda: get(edge.port, f"svc{services - 1}-80.{DOMAIN}")[0] == 200, timeout=120)
        time.sleep(1)

        def phase(name, write) -> tuple[str, int, int]:
            refreshes0, fetches0 = counts(edge)
            for k in range(writes):
                write(k)
                time.sleep(0.05)
            time.sleep(2.5)                       # let the last writes land (and any verification)
            refreshes1, fetches1 = counts(edge)
            row = (name, refreshes1 - refreshes0, fetches1 - fetches0)
            print(f"{api:<9} {name:<28} full refreshes {row[1]:>3}   fetches {row[2]:>4}", flush=True)
            return row

        rows = [
            phase("TTL output update", lambda k: consul.api(
                "PUT", f"/v1/agent/check/update/ttl-svc{k % services}-0", {"Status": "passing", "Output": f"ok {k}"})),
            phase("node meta change", lambda k: consul.api("PUT", "/v1/catalog/register", {
                "Node": "far-node", "Address": "127.0.0.9", "NodeMeta": {"rack": f"r{k}"}})),
            phase("health flip", lambda k: consul.api(
                "PUT", f"/v1/agent/check/{'fail' if k % 2 == 0 else 'pass'}/ttl-svc{(k // 2) % services}-1")),
            phase("instance added / removed", lambda k: (
                register(consul, f"svc{k % services}", "extra-x", backends[2].port) if k % 2 == 0
                else consul.api("PUT", "/v1/agent/service/deregister/extra-x"))),
            phase("service meta change", lambda k: register(consul, f"svc{k % services}", f"svc{k % services}-0",
                                                            backends[0].port, meta={"version": str(k)})),
        ]
        return rows
    finally:
        if edge is not None:
            edge.stop()
        consul.stop()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--services", type=int, default=200)
    ap.add_argument("--writes", type=int, default=20)
    ap.add_argument("--api", default="internal,public")
    args = ap.parse_args()
    backends = [Backend(f"b{j}") for j in range(3)]
    try:
        results = {api: run(api, args.services, args.writes, backends) for api in args.api.split(",")}
    finally:
        for b in backends:
            b.close()
    print(f"\n{args.writes} writes of each kind, {args.services} services x 2 instances with TTL checks")
    print("| kind | " + " | ".join(f"{api} full refreshes | {api} fetches" for api in results) + " |")
    for i, (name, _, _) in enumerate(next(iter(results.values()))):
        print(f"| {name} | " + " | ".join(f"{rows[i][1]} | {rows[i][2]}" for rows in results.values()) + " |")


if __name__ == "__main__":
    main()
