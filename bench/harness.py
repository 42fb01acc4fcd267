"""Shared pieces of the benchmarks: a real Consul + edge per apply mode, timing and reporting.

Benchmarks are not tests: they print their figures and write CSV files to bench/out/.
"""

from __future__ import annotations

import contextlib
import csv
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.support.edge import EdgeProcess  # noqa: E402
from tests.support.http import get  # noqa: E402
from tests.support.procs import ConsulAgent, consul_agent  # noqa: E402

OUT = REPO / "bench" / "out"
MODES = ("runtime", "reload")


@contextlib.contextmanager
def stack(mode: str, domain: str = "bench.example", extra: tuple[str, ...] = ()) -> Iterator[
        tuple[ConsulAgent, EdgeProcess]]:
    """A fresh Consul dev agent and an edge in the given apply mode."""
    with consul_agent(Path(tempfile.mkdtemp(prefix="bench-consul-"))) as consul:
        edge = EdgeProcess(consul.url, domains=(domain,), extra=("--apply", mode, "--log-level", "INFO", *extra))
        edge.start(timeout=120)
        try:
            yield consul, edge
        finally:
            edge.stop()


def until(predicate: Callable[[], bool], timeout: float = 30.0) -> float:
    """Seconds until predicate() holds (polled as fast as it answers)."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        if predicate():
            return time.perf_counter() - t0
    raise TimeoutError(f"not within {timeout}s")


def hit(port: int, host: str, body: str) -> Callable[[], bool]:
    return lambda: get(port, host)[1] == body


def missed_in_a_row(port: int, host: str, body: str, n: int = 5) -> Callable[[], bool]:
    """Holds once `n` requests in a row were not answered with `body`."""
    streak = 0

    def check() -> bool:
        nonlocal streak
        streak = streak + 1 if get(port, host)[1] != body else 0
        return streak >= n
    return check


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def summary_row(name: str, ms: list[float]) -> str:
    return (f"{name:<22}{len(ms):>6}{pct(ms, 50):>9.1f}{pct(ms, 90):>9.1f}{pct(ms, 99):>9.1f}{max(ms):>9.1f}"
            f"{statistics.mean(ms):>9.1f}")


HEADER = f"{'':<22}{'n':>6}{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}{'max ms':>9}{'mean ms':>9}"


def write_csv(name: str, header: list[str], rows: list[list]) -> Path:
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / name
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def consul_requests(log: str) -> int:
    """Consul requests the edge had made by its latest counter line (long-polls, fetches, dumps)."""
    found = re.findall(r"long_polls=(\d+) fetches=(\d+) dumps=(\d+)", log)
    return sum(int(x) for x in found[-1]) if found else 0


def haproxy_pids(edge: EdgeProcess) -> list[int]:
    """The edge's HAProxy master and its workers."""
    master = int((edge.state_dir / "haproxy.pid").read_text().split()[0])
    workers = subprocess.run(["pgrep", "-P", str(master)], capture_output=True, text=True).stdout.split()
    return [master, *map(int, workers)]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    import os
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
