"""Benchmark: `docker run -P` returning → service in Consul's catalog, and → first request
answered by that container through the edge. Real dockerd, Consul, registrator and edge on
loopback; 20 containers (each serves its own name, so the edge's answer can be attributed).

Usage: .venv/bin/python bench/registrator_latency.py [containers, default 20]
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from harness import REPO, write_csv

from tests.support.docker_engine import IMAGE, build_image, cleanup, engine
from tests.support.edge import EdgeProcess
from tests.support.http import get
from tests.support.procs import consul_agent, stop_process

HOST = "nginx-80.bench.example"
SERVE_OWN_NAME = 'echo "$NAME" > /www/index.html; exec httpd -f -p 80 -h /www'


def in_catalog(url: str, sid: str) -> bool:
    with urllib.request.urlopen(f"{url}/v1/catalog/service/nginx", timeout=5) as r:
        return any(s["ServiceID"] == sid for s in json.loads(r.read()))


def give_up(t0: float, what: str, limit: float = 15.0) -> None:
    """Every wait is bounded: a broken registrator ends the run instead of hanging it."""
    if time.perf_counter() - t0 > limit:
        raise TimeoutError(f"no {what} after {limit:g}s")


def main(n: int) -> None:
    dockerd = engine().start()
    client = dockerd.client()
    build_image(client)
    with consul_agent(Path(tempfile.mkdtemp(prefix="bench-consul-"))) as consul:
        log = open(Path(tempfile.mkdtemp()) / "registrator.log", "ab")
        registrator = subprocess.Popen(
            [sys.executable, "-m", "haproxy_consul", "registrator", "--docker", dockerd.url, "--consul", consul.url,
             "--hostname", "bench"], cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        edge = EdgeProcess(consul.url, domains=("bench.example",)).start()
        catalog, routed = [], []
        try:
            time.sleep(1)
            for i in range(n):
                name = f"c{i}"
                client.containers.run(IMAGE, detach=True, name=name, publish_all_ports=True, environment={"NAME": name},
                                      command=["sh", "-c", SERVE_OWN_NAME])
                t0 = time.perf_counter()
                sid = f"bench:{name}:80"
                while not in_catalog(consul.url, sid):
                    give_up(t0, f"{sid} in the catalog")
                catalog.append(time.perf_counter() - t0)
                while get(edge.port, HOST)[1].strip() != name:
                    give_up(t0, f"{name} answering through the edge")
                routed.append(time.perf_counter() - t0)
        finally:
            edge.stop()
            stop_process(registrator)
            for c in client.containers.list(all=True):
                c.remove(force=True)
            dockerd.stop()
            cleanup(dockerd.root)
    print(f"docker run -P returned → ..., {n} containers")
    for what, values in (("in Consul's catalog", catalog), ("first request through the edge", routed)):
        ms = [v * 1000 for v in values]
        print(f"  {what:<32} median {statistics.median(ms):7.1f} ms   worst {max(ms):7.1f} ms")
    rows = [[i, round(c * 1000, 2), round(r * 1000, 2)] for i, (c, r) in enumerate(zip(catalog, routed, strict=True))]
    print(f"csv: {write_csv('registrator_latency.csv', ['i', 'catalog_ms', 'routed_ms'], rows)}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 20)
