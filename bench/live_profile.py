"""Where the edge spends its time while new vhosts arrive at N services: py-spy samples the edge
(runtime mode, one HAProxy release) while new vhosts are registered and removed one after the
other for `--seconds`, then the samples are summed per thread and per edge function (the deepest
frame in edge/ or haproxy_consul/ of each sample). py-spy is not a project dependency: pass its
path (`pip install py-spy` in any virtualenv).

Usage: .venv/bin/python bench/live_profile.py --py-spy PATH [--services 10000] [--release 2.6] [--seconds 40]
"""

from __future__ import annotations

import argparse
import collections
import subprocess
import tempfile
import time
from pathlib import Path

from farm import Farm
from harness import OUT, until
from live import DOMAIN, quiet, start_edge, status
from scale import populate

from tests.integration.edge_helpers import deregister, register
from tests.support.procs import consul_agent


def summarise(raw: str, top: int = 16) -> list[tuple[str, int]]:
    """py-spy's raw (collapsed) stacks, `thread;frame;frame… count`: the control loop's samples
    (MainThread) by the two frames below `Edge.run` (what the loop was doing, and in which call),
    the other threads by their deepest frame."""
    counts: collections.Counter[str] = collections.Counter()
    for line in raw.splitlines():
        stack, _, n = line.rpartition(" ")
        thread, *frames = stack.split(";")
        frames = [f.split(" (")[0] for f in frames]
        at = next((i for i, f in enumerate(frames) if f == "Edge.run"), None)
        where = " > ".join(frames[at + 1:at + 3]) if at is not None else frames[-1]
        counts[f"{thread.split('): ')[-1]} :: {where}"] += int(n)
    return counts.most_common(top)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--py-spy", required=True)
    ap.add_argument("--services", type=int, default=10000)
    ap.add_argument("--release", default="2.6")
    ap.add_argument("--seconds", type=float, default=40)
    args = ap.parse_args()
    farm = Farm(["b0", "b1", "b2", "nv"])
    try:
        with consul_agent(Path(tempfile.mkdtemp(prefix="bench-consul-"))) as consul:
            populate(consul, args.services, [farm["b0"], farm["b1"], farm["b2"]])
            edge = start_edge(consul, args.release, "runtime", 32, "INFO")
            try:
                until(lambda: status(edge.port, f"svc{args.services - 1}-80.{DOMAIN}") == 200, timeout=300)
                until(lambda: quiet(edge), timeout=300)
                OUT.mkdir(parents=True, exist_ok=True)
                raw = OUT / "live_profile.txt"
                spy = subprocess.Popen([args.py_spy, "record", "--pid", str(edge.proc.pid), "--threads", "--format",
                                        "raw", "--rate", "200", "--duration", str(int(args.seconds)), "-o", str(raw)],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                t0, i = time.monotonic(), 0
                while time.monotonic() - t0 < args.seconds - 2:
                    host = f"nv{i}-80.{DOMAIN}"
                    register(consul, f"nv{i}", f"nv{i}-1", farm["nv"])
                    until(lambda h=host: status(edge.port, h) == 200, timeout=120)
                    deregister(consul, f"nv{i}-1")
                    i += 1
                spy.wait(args.seconds + 60)
            finally:
                edge.stop()
    finally:
        farm.close()
    wall = 200 * args.seconds            # samples a thread busy the whole time would have
    print(f"{i} new vhosts in {args.seconds:.0f} s at {args.services} services (HAProxy {args.release}); "
          f"samples at 200/s per thread, idle waits included, % of the run's wall time:")
    for where, n in summarise(raw.read_text()):
        print(f"{n:>7} {100 * n / wall:5.1f}%  {where}")


if __name__ == "__main__":
    main()
