"""Benchmark: three `haproxy-consul bootstrap` started at once (127.0.0.1, .2, .3, one etcd) →
an elected leader with three peers. Repeated with fresh data dirs; prints median and worst.

Usage: .venv/bin/python bench/bootstrap_leader.py [repetitions, default 5]
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

from harness import write_csv

from tests.integration.test_bootstrap_cluster import Bootstrap, one_cluster
from tests.support.etcd import EtcdServer
from tests.support.procs import wait_until


def once(run: int) -> float:
    root = Path(tempfile.mkdtemp(prefix=f"bench-bootstrap{run}-"))
    etcd = EtcdServer(root / "etcd").start()
    servers = []
    try:
        t0 = time.monotonic()
        servers = [Bootstrap(etcd.url, n, root).start() for n in range(3)]
        wait_until(lambda: one_cluster(servers), 60, interval=0.05, what="a leader")
        return time.monotonic() - t0
    finally:
        for s in servers:
            s.proc.kill()
            s.proc.wait()
        etcd.stop()


def main(n: int) -> None:
    times = [once(i) for i in range(n)]
    print(f"three simultaneous bootstraps → one leader, three peers ({n} runs): "
          f"median {statistics.median(times):.2f} s, worst {max(times):.2f} s")
    rows = [[i, round(t, 3)] for i, t in enumerate(times)]
    print(f"csv: {write_csv('bootstrap_leader.csv', ['run', 'seconds'], rows)}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 5)
