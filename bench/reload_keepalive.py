"""Benchmark: keep-alive load (wrk) through the edge while vhosts come and go (each a reload).

Counts wrk's socket errors and non-2xx answers across N reloads. Usage:
.venv/bin/python bench/reload_keepalive.py [reloads]
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.integration.edge_helpers import answers, deregister, register, reloads  # noqa: E402
from tests.support.edge import EdgeProcess  # noqa: E402
from tests.support.http import Backend  # noqa: E402
from tests.support.procs import consul_agent, require  # noqa: E402


def main(count: int = 20) -> None:
    wrk = require("wrk")
    with consul_agent(Path(tempfile.mkdtemp(prefix="bench-consul-"))) as consul:
        edge = EdgeProcess(consul.url, domains=("bench.example",)).start()
        backend, spare = Backend("steady"), Backend("spare")
        register(consul, "load", "load-1", backend)
        answers(edge, "load-80.bench.example", {"steady"})
        time.sleep(0.5)
        before = reloads(edge.log())
        interval = 0.4
        duration = int(count * interval + 3)

        def churn():
            time.sleep(1)
            for i in range(count):           # alternately add and remove a vhost: a reload each
                if i % 2 == 0:
                    register(consul, "flap", "flap-1", spare)
                else:
                    deregister(consul, "flap-1")
                time.sleep(interval)

        t = threading.Thread(target=churn)
        t.start()
        out = subprocess.run([wrk, "-t", "2", "-c", "20", "-d", f"{duration}s", "--timeout", "5s",
                              "-H", "Host: load-80.bench.example", f"http://127.0.0.1:{edge.port}/"],
                             capture_output=True, text=True, timeout=duration + 30).stdout
        t.join()
        done = reloads(edge.log()) - before
        edge.stop()
        backend.close()
        spare.close()
    total = int(re.search(r"(\d+) requests in", out).group(1))
    socket_errors = re.search(r"Socket errors: (.*)", out)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    print(f"wrk keep-alive, 20 connections, {duration}s, across {done} reloads")
    print(f"requests: {total}; socket errors: {socket_errors.group(1) if socket_errors else 'none'}; "
          f"non-2xx: {non2xx.group(1) if non2xx else 0}")
    print(out)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 20)
