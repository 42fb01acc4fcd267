"""Benchmark 1: propagation. Consul API call returned → first request routed accordingly.

Per apply mode (runtime API, and the reload-every-change baseline), N changes of each kind:
an instance registered (first request answered by it), deregistered (5 requests in a row miss
it), its health check turned critical (likewise), and back to passing (first request answered
by it). Prints a table per mode and the ratio, writes bench/out/propagation.csv and, when
matplotlib is installed (`pip install '.[bench]'`), bench/out/propagation.png.

Usage: .venv/bin/python bench/propagation.py [changes per kind, default 200]
"""

from __future__ import annotations

import sys

from harness import HEADER, MODES, OUT, hit, missed_in_a_row, pct, stack, summary_row, until, write_csv

from tests.integration.edge_helpers import answers, deregister, register, set_ttl
from tests.support.http import Backend

HOST = "prop-80.bench.example"
KINDS = ("registered", "deregistered", "critical", "passing")


def run(mode: str, n: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {k: [] for k in KINDS}
    base, probe = Backend("base"), Backend("probe")
    try:
        with stack(mode) as (consul, edge):
            register(consul, "prop", "prop-base", base)
            answers(edge, HOST, {"base"}, timeout=30)
            for i in range(n):
                sid = f"prop-{i}"
                register(consul, "prop", sid, probe, ttl=True)
                times["registered"].append(until(hit(edge.port, HOST, "probe")))
                set_ttl(consul, sid, "critical")
                times["critical"].append(until(missed_in_a_row(edge.port, HOST, "probe")))
                set_ttl(consul, sid, "passing")
                times["passing"].append(until(hit(edge.port, HOST, "probe")))
                deregister(consul, sid)
                times["deregistered"].append(until(missed_in_a_row(edge.port, HOST, "probe")))
            reloads = edge.log().count("reloaded HAProxy in")
    finally:
        base.close()
        probe.close()
    print(f"\nmode {mode}: {n} changes of each kind, {reloads} reloads in all (incl. the initial sync)")
    print(HEADER)
    for kind in KINDS:
        print(summary_row(kind, [t * 1000 for t in times[kind]]))
    return times


def chart(results: dict[str, dict[str, list[float]]]) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib not installed: no chart; pip install '.[bench]')")
        return
    fig, axes = plt.subplots(1, len(KINDS), figsize=(14, 4), sharey=True)
    for ax, kind in zip(axes, KINDS, strict=True):
        ax.boxplot([[t * 1000 for t in results[m][kind]] for m in MODES], tick_labels=list(MODES), showfliers=True)
        ax.set_title(kind)
        ax.set_yscale("log")
        ax.grid(True, axis="y", alpha=0.3)
    axes[0].set_ylabel("ms from Consul API call to routed request")
    fig.suptitle("haproxy-consul edge: propagation per apply mode (log scale)")
    fig.tight_layout()
    fig.savefig(OUT / "propagation.png", dpi=100)
    print(f"chart: {OUT / 'propagation.png'}")


def main(n: int) -> None:
    results = {mode: run(mode, n) for mode in MODES}
    rows = [[mode, kind, i, round(t * 1000, 3)] for mode in MODES for kind in KINDS
            for i, t in enumerate(results[mode][kind])]
    print(f"\ncsv: {write_csv('propagation.csv', ['mode', 'kind', 'i', 'ms'], rows)}")
    print(f"\n{'p50 ratio reload/runtime':<28}" + "".join(f"{k:>14}" for k in KINDS))
    print(f"{'':<28}" + "".join(f"{pct(results['reload'][k], 50) / pct(results['runtime'][k], 50):>13.1f}x"
                                for k in KINDS))
    chart(results)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 200)
