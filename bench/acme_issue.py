"""Benchmark: how long the ACME issuer takes from `want()` to a certificate in Consul KV, with
pebble (no validation sleep, its default 5 % bad-nonce rejection) on loopback, next to `lego`
(an independent ACME client) ordering from its own pebble. Writes bench/out/acme_issue.csv.

Usage: .venv/bin/python bench/acme_issue.py [names at once, default 20]

HTTP-01 tokens are answered by the loopback responder of the tests, which reads Consul at each
request, so the issuer's propagation wait is 0 here (an edge fleet needs its default 1 s).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path

from consul import Consul
from harness import write_csv

from edge.acme.issuer import AcmeSettings, Issuer
from edge.consul.kv import ConsulKV
from edge.tls.certs import CertSet
from tests.support.pebble import ChallengeResponder, pebble_server
from tests.support.procs import consul_agent, free_ports, require, wait_until

PREFIX = "bench/certs"


def issuer_times(consul_url: str, pebble, names_at_once: int) -> tuple[list[float], float]:
    parts = urllib.parse.urlsplit(consul_url)
    kv = ConsulKV(lambda: Consul(host=parts.hostname, port=parts.port))
    settings = AcmeSettings(directory=pebble.directory, suffixes=("bench.example",), ca_bundle=pebble.ca_bundle,
                            prefix=PREFIX, http_propagation_wait=0.0, max_orders_per_hour=1000)
    stop = threading.Event()
    issuer = Issuer(kv, settings, stop)
    thread = threading.Thread(target=issuer.run, daemon=True)
    thread.start()
    try:
        issuer.want({"warm-up.bench.example"}, CertSet())       # account registration, not timed
        wait_until(lambda: kv.get(f"{PREFIX}/warm-up.bench.example"), 30, what="warm-up")
        singles = []
        for i in range(5):
            name = f"single{i}.bench.example"
            started = time.monotonic()
            issuer.want({name}, CertSet())
            wait_until(lambda n=name: kv.get(f"{PREFIX}/{n}"), 30, interval=0.005, what=name)
            singles.append(time.monotonic() - started)
        names = {f"many{i}.bench.example" for i in range(names_at_once)}
        started = time.monotonic()
        issuer.want(names, CertSet())
        wait_until(lambda: all(kv.get(f"{PREFIX}/{n}") for n in names), 120, interval=0.01, what="all names")
        return singles, time.monotonic() - started
    finally:
        stop.set()
        thread.join(10)


def lego_times(workdir: Path, runs: int = 3) -> list[float]:
    lego = require("lego")
    port = free_ports(1)[0]
    times = []
    with pebble_server(workdir / "pebble-lego", http_port=port) as pebble:
        env = {**os.environ, "LEGO_CA_CERTIFICATES": str(pebble.ca_bundle)}
        for i in range(runs):
            started = time.monotonic()
            done = subprocess.run([lego, "--server", pebble.directory, "--accept-tos", "--email", "ops@bench.example",
                                   "--domains", f"lego{i}.bench.example", "--http", "--http.port", f"127.0.0.1:{port}",
                                   "--path", str(workdir / f"lego{i}"), "run"],
                                  env=env, capture_output=True, text=True, timeout=60)
            elapsed = time.monotonic() - started
            crt = workdir / f"lego{i}" / "certificates" / f"lego{i}.bench.example.crt"
            if done.returncode != 0 or not crt.exists():
                raise RuntimeError(f"lego run {i} got no certificate: {done.stderr[-2000:]}")
            times.append(elapsed)
    return times


def main(names_at_once: int) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="bench-acme-"))
    with consul_agent(workdir / "consul") as consul, ChallengeResponder() as responder, \
            pebble_server(workdir / "pebble", http_port=responder.port) as pebble:
        responder.sources.append((consul.url, PREFIX))
        singles, many = issuer_times(consul.url, pebble, names_at_once)
    legos = lego_times(workdir)
    print("\nACME with pebble on loopback (PEBBLE_VA_NOSLEEP=1, 5 % bad nonces)")
    print(f"issuer, one name, want() -> certificate in KV: median {statistics.median(singles):.2f} s "
          f"(min {min(singles):.2f}, max {max(singles):.2f}, {len(singles)} runs)")
    print(f"issuer, {names_at_once} names at once (4 workers): all in KV after {many:.2f} s")
    print(f"lego run, one name (new account each run, process start included): median "
          f"{statistics.median(legos):.2f} s (min {min(legos):.2f}, max {max(legos):.2f})")
    rows = [["issuer_single", f"{t:.3f}"] for t in singles] + [[f"issuer_{names_at_once}_at_once", f"{many:.3f}"]]
    rows += [["lego_single", f"{t:.3f}"] for t in legos]
    print(f"csv: {write_csv('acme_issue.csv', ['what', 'seconds'], rows)}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 20)
