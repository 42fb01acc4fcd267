"""The control loop's pure stages per change at scale, without Consul or HAProxy.

Builds a table of N services (3 healthy instances each, one route each) with the default pool of
32 spares, then applies one change at a time as the control loop does (edge.control `step`):
`update_table`, `retire`, `mark`, `assign`, `make_plan`, the refill check (`Refill.due`) and the
metrics the loop records after a live change (`change_applied`, the spares taken, the free
spares before and after). Each change is applied to the same live table, timed per stage, and the
p50 of the repetitions printed in ms. The changes: an instance of one service moved to another
port (instance churn), a new service (a new vhost, onto a spare or, with 3.4's capabilities, its
own backend added live; also with an exact host from an `edge.host` tag, a router) and a removed
one (a vhost gone).

    nice -n 15 /work/main/.venv/bin/python -m bench.per_change [--services 10000] [--repeat 30] [--routers]
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace

from edge.haproxy.capabilities import Capabilities
from edge.metrics import EdgeMetrics
from edge.refill import Refill
from edge.routing.dynamic import mark
from edge.routing.model import Instance
from edge.routing.plan import make_plan
from edge.routing.spares import SparePool, assign, retire
from edge.routing.table import build_table, update_table

DOMAINS = ("example.test",)
POOL = SparePool(32, 4)
MAPS = frozenset({"prepare map", "add map", "commit map", "add server", "del server"})
CAPS = {"2.6": Capabilities("2.6.12", (2, 6), MAPS),
        "3.4": Capabilities("3.4.7", (3, 4), MAPS | {"add backend", "publish backend"})}
STAGES = ("update_table", "retire", "mark", "assign", "make_plan", "refill", "metrics", "total")


def instances(service: str, n: int = 3, port: int = 8000, routers: bool = False) -> tuple[Instance, ...]:
    """`n` healthy instances; with `routers`, tagged with an exact host and a path router of their own."""
    tags = (f"edge.host={service}.example.org", f"edge.route={service}.example.org/api strip") if routers else ()
    return tuple(Instance(service=service, node=f"n{i}", service_id=f"{service}-{i}", address=f"10.0.{i}.1",
                          port=port + i, container_port=80, healthy=True, tags=tags) for i in range(n))


def changes(services: dict, n: int) -> dict[str, tuple[dict, set[str]]]:
    """The new services and the changed names, per kind of change."""
    moved, churned = dict(services), f"svc-{n // 2}"
    moved[churned] = (replace(services[churned][0], port=9999),) + services[churned][1:]
    added = dict(services)
    added["new-svc"] = instances("new-svc")
    hosted = dict(services)
    hosted["new-svc"] = tuple(replace(i, tags=("edge.host=new.example.org",)) for i in instances("new-svc"))
    removed = dict(services)
    del removed[f"svc-{n // 2 + 1}"]
    return {"instance moved": (moved, {churned}), "new vhost": (added, {"new-svc"}),
            "new vhost+host": (hosted, {"new-svc"}), "removed vhost": (removed, {f"svc-{n // 2 + 1}"})}


def step(live, services, changed, caps, metrics, refill) -> dict[str, float]:
    """One change through the stages, as edge.control runs them; ms per stage."""
    times, t = {}, time.perf_counter()

    def lap(stage):
        nonlocal t
        now = time.perf_counter()
        times[stage], t = (now - t) * 1000, now

    table = update_table(live, services, changed)
    lap("update_table")
    table = retire(live, table, POOL)
    lap("retire")
    table = mark(live, table, caps, POOL)
    lap("mark")
    table = assign(live, table, POOL)
    lap("assign")
    plan = make_plan(live, table, DOMAINS, POOL, caps)
    lap("make_plan")
    refill.due(table, 0.0)
    lap("refill")
    len(POOL.free(table)), len(POOL.free(live))
    metrics.spares_taken({table.backend_of(name): name for name in table.spares.values()})
    metrics.change_applied("live", plan.reasons, 0.0, len(table.routes), lambda: 0)
    lap("metrics")
    assert not plan.reload, plan.reasons
    times["total"] = sum(times.values())
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--services", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--routers", action="store_true", help="every service with an exact host and a path router")
    args = parser.parse_args()
    services = {f"svc-{i}": instances(f"svc-{i}", routers=args.routers) for i in range(1, args.services + 1)}
    t0 = time.perf_counter()
    base = build_table(services)
    print(f"{args.services} services, {len(base.routes)} routes, {len(base.routers)} routers, pool {POOL.size}; "
          f"table built in "
          f"{time.perf_counter() - t0:.1f} s; p50 of {args.repeat} runs, ms")
    # A live table as after a few changes: some spares taken, so the stages have a pool to look at.
    live = base
    for i in range(4):
        grown = dict(services) | {f"old-{i}": instances(f"old-{i}", routers=args.routers)}
        desired = assign(live, retire(live, update_table(live, grown, {f"old-{i}"}), POOL), POOL)
        live, services = desired, grown
    refill = Refill(POOL, clock=lambda: 1e9)
    metrics = EdgeMetrics()
    print(f"{'caps':5} {'change':15} " + " ".join(f"{s:>12}" for s in STAGES))
    for version, caps in CAPS.items():
        for kind, (after, changed) in changes(services, args.services).items():
            runs = [step(live, after, changed, caps, metrics, refill) for _ in range(args.repeat)]
            p50 = {s: statistics.median(r[s] for r in runs) for s in STAGES}
            print(f"{version:5} {kind:15} " + " ".join(f"{p50[s]:12.3f}" for s in STAGES))


if __name__ == "__main__":
    main()
