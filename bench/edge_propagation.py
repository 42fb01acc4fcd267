"""Benchmark: Consul change → first request routed accordingly, through a real edge + HAProxy.

For each of N rounds: register a new instance (time from the Consul API call returning to the
first request answered by it), then deregister it (time until 5 requests in a row miss it).
Prints percentiles. Usage: .venv/bin/python bench/edge_propagation.py [rounds]
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.integration.edge_helpers import answers, deregister, register  # noqa: E402
from tests.support.edge import EdgeProcess  # noqa: E402
from tests.support.http import Backend, get  # noqa: E402
from tests.support.procs import consul_agent  # noqa: E402

HOST = "bench-80.bench.example"


def until(predicate, timeout=10.0) -> float:
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        if predicate():
            return time.perf_counter() - t0
    raise TimeoutError


def missed_in_a_row(port: int, name: str, n: int):
    """A predicate that holds once `n` requests in a row were not answered by `name`."""
    streak = 0

    def check() -> bool:
        nonlocal streak
        streak = streak + 1 if get(port, HOST)[1] != name else 0
        return streak >= n
    return check


def pct(values, p):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def main(rounds: int = 50) -> None:
    with consul_agent(Path(tempfile.mkdtemp(prefix="bench-consul-"))) as consul:
        edge = EdgeProcess(consul.url, domains=("bench.example",)).start()
        base = Backend("base")
        register(consul, "bench", "bench-base", base)
        answers(edge, HOST, {"base"})
        added, removed = [], []
        try:
            for i in range(rounds):
                fresh = Backend(f"new-{i}")
                register(consul, "bench", f"bench-{i}", fresh)
                added.append(until(lambda name=fresh.name: get(edge.port, HOST)[1] == name))
                deregister(consul, f"bench-{i}")
                removed.append(until(missed_in_a_row(edge.port, fresh.name, 5)))
                fresh.close()
        finally:
            reloads = edge.log().count("reloaded HAProxy in")
            edge.stop()
            base.close()
    print(f"edge propagation, {rounds} rounds, runtime API mode ({reloads} reload(s) in all, incl. the initial sync)")
    print(f"{'change':<14}{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}{'max ms':>9}{'mean ms':>9}")
    for name, values in (("registered", added), ("deregistered", removed)):
        ms = [v * 1000 for v in values]
        print(f"{name:<14}{pct(ms, 50):>9.1f}{pct(ms, 90):>9.1f}{pct(ms, 99):>9.1f}{max(ms):>9.1f}"
              f"{statistics.mean(ms):>9.1f}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 50)
