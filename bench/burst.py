"""The mixed burst of bench/live.py: thousands of Consul changes under load, and what HAProxy did.

`mixed_changes` (pure) lays out the changes: every few changes a vhost change, alternately the
oldest registered burst vhost removed and a new one added (a FIFO that keeps `in_flight` of them
registered, so the spare pool needs that many), the rest instance churn: an extra instance of one
of the existing services registered, then deregistered the next time round. `Burst` registers the
catalog (services, the pre-existing burst vhosts, a WebSocket echo service and a slow service for
h2load), then, against a running edge: opens the kept connections, starts wrk and h2load in 5 s
chunks and a poll of HAProxy's processes, writes the changes at the planned rate from WRITERS threads
(catalog API), waits until the last ones are routed, and reads the edge's log, HAProxy's master,
RSS, CPU and the kept connections again.
"""

from __future__ import annotations

import itertools
import re
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from harness import OUT, cpu_seconds, haproxy_pids, rss_mb, until
from kept import H2, WS, holder
from scale import populate

from tests.integration.edge_helpers import reloads
from tests.support.http import get
from tests.support.procs import require

CHUNK_S = 5
WRITERS = 16            # Consul takes a catalog write in ~5–40 ms (more when loaded): writes in parallel
WRK_HOSTS = 10             # svc0 … svc9: churned, but their 3 base instances stay the whole time
Op = tuple[str, str, str, str]          # ("up" | "down", service, instance id, farm backend)


@dataclass(frozen=True)
class BurstPlan:
    changes: int
    new_vhosts: int
    in_flight: int
    services: int
    rate: int


def mixed_changes(plan: BurstPlan) -> tuple[Op, ...]:
    vhost_ops, ops, extra, churn, k = 2 * plan.new_vhosts, [], set(), 0, 0
    for i in range(plan.changes):
        if (i + 1) * vhost_ops // plan.changes > i * vhost_ops // plan.changes:
            j = k // 2
            name = f"v{j}" if k % 2 == 0 else f"v{plan.in_flight + j}"
            ops.append(("down" if k % 2 == 0 else "up", name, f"{name}-1", "nv"))
            k += 1
        else:
            s, churn = churn % plan.services, churn + 1
            sid = f"svc{s}-x"
            ops.append(("down" if sid in extra else "up", f"svc{s}", sid, f"x{s % 4}"))
            extra ^= {sid}
    return tuple(ops)


class ToolLoop(threading.Thread):
    """A load tool run again and again in CHUNK_S chunks until `stop` is set (at most `limit` s)."""

    def __init__(self, argv: list[str], parse, stop: threading.Event, limit: float):
        super().__init__(daemon=True)
        self.argv, self.parse, self.stop, self.limit = argv, parse, stop, limit
        self.totals: dict[str, int] = {}
        self.outputs: list[str] = []

    def run(self) -> None:
        t0 = time.monotonic()
        while not self.stop.is_set() and time.monotonic() - t0 < self.limit:
            out = subprocess.run(self.argv, capture_output=True, text=True, timeout=CHUNK_S + 60).stdout
            self.outputs.append(out)
            for key, value in self.parse(out).items():
                self.totals[key] = self.totals.get(key, 0) + value


def parse_wrk(out: str) -> dict[str, int]:
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    done = re.search(r"(\d+) requests in", out)
    return {"requests": int(done.group(1)) if done else 0, "socket_errors": sum(map(int, sock.groups())) if sock else 0,
            "non_2xx": int(non2xx.group(1)) if non2xx else 0, "runs_unparsed": 0 if done else 1}


def parse_h2load(out: str) -> dict[str, int]:
    req = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, "
                    r"(\d+) errored, (\d+) timeout", out)
    codes = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", out)
    if not req or not codes:
        return {"runs_unparsed": 1}
    return {"requests": int(req.group(3)), "failed": int(req.group(5)), "errored": int(req.group(6)),
            "timeout": int(req.group(7)), "non_2xx": sum(map(int, codes.groups()[1:]))}


class ProcWatch(threading.Thread):
    """HAProxy's master and workers, every 20 ms: the most seen at once, and every pid seen."""

    def __init__(self, pidfile: Path, stop: threading.Event):
        super().__init__(daemon=True)
        self.pidfile, self.stop, self.most, self.seen = pidfile, stop, 0, set()

    def run(self) -> None:
        while not self.stop.wait(0.02):
            try:
                master = int(self.pidfile.read_text().split()[0])
                children = " ".join(p.read_text() for p in Path(f"/proc/{master}/task").glob("*/children")).split()
            except (OSError, ValueError, IndexError):      # the pid file rewritten at a reload
                continue
            self.most = max(self.most, 1 + len(children))
            self.seen.update([master, *map(int, children)])


class Keeper(threading.Thread):
    """Asks the kept WebSocket and HTTP/2 connection every 2 s; remembers the first failure of each."""

    def __init__(self, ws: WS, h2: H2, stop: threading.Event):
        super().__init__(daemon=True)
        self.ws, self.h2, self.stop = ws, h2, stop
        self.failed: dict[str, str] = {}
        self.asked = 0

    def ask(self) -> None:
        self.asked += 1
        for name, call in (("ws", lambda: self.ws.echo(f"keep {self.asked}")), ("h2", self._h2)):
            if name not in self.failed:
                try:
                    call()
                except (OSError, ConnectionError, TimeoutError, Exception) as exc:  # noqa: BLE001 - reported
                    self.failed[name] = f"after {self.asked} asks: {exc!r}"

    def _h2(self) -> None:
        self.h2.ping()
        code, body = self.h2.get()
        if code != 200:
            raise ConnectionError(f"h2 GET answered {code} {body[:60]!r}")

    def run(self) -> None:
        while not self.stop.wait(2.0):
            self.ask()


def haproxy_rss(edge) -> float:
    """MB resident in HAProxy's master and workers (an old worker may exit while they are read)."""
    total = 0.0
    for pid in haproxy_pids(edge):
        try:
            total += rss_mb(pid)
        except OSError:
            pass
    return total


def master_reloads(state_dir: Path) -> int:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(state_dir / "master.sock"))
        s.sendall(b"show proc\n")
        s.shutdown(socket.SHUT_WR)
        out = b"".join(iter(lambda: s.recv(65536), b"")).decode()
    m = re.search(r"^\d+\s+master\s+(\d+)", out, re.M)
    return int(m.group(1)) if m else -1


class Burst:
    def __init__(self, consul, farm, plan: BurstPlan, changes: tuple[Op, ...], domain: str):
        self.consul, self.farm, self.plan, self.changes, self.domain = consul, farm, plan, changes, domain

    def host(self, service: str) -> str:
        return f"{service}-80.{self.domain}"

    def write(self, verb: str, service: str, sid: str, backend: str, node: str = "node-0", port: int = 0) -> None:
        if verb == "down":
            self.consul.api("PUT", "/v1/catalog/deregister", {"Node": node, "ServiceID": sid}, timeout=30)
            return
        self.consul.api("PUT", "/v1/catalog/register", {
            "Node": node, "Address": "127.0.0.1",
            "Service": {"ID": sid, "Service": service, "Address": "127.0.0.1",
                        "Port": port or self.farm[backend].port, "Meta": {"container_port": "80"}}}, timeout=30)

    def prepare(self) -> None:
        populate(self.consul, self.plan.services, [self.farm["b0"], self.farm["b1"], self.farm["b2"]])
        self.write("up", "slow", "slow-1", "slow")
        self.write("up", "slow", "slow-2", "slow", node="node-1")
        self.write("up", "ws", "ws-1", "", port=self.farm.ws_port)
        for j in range(self.plan.in_flight):
            self.write("up", f"v{j}", f"v{j}-1", "nv")

    def _writes(self) -> float:
        counter, lock, t0 = itertools.count(), threading.Lock(), time.monotonic()

        def worker() -> None:
            while True:
                with lock:
                    i = next(counter)
                if i >= len(self.changes):
                    return
                delay = t0 + i / self.plan.rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                self.write(*self.changes[i])
        threads = [threading.Thread(target=worker) for _ in range(WRITERS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return time.monotonic() - t0

    def run(self, edge, label: str) -> dict:
        port = edge.port
        ok = lambda h, code=200: get(port, h, timeout=5)[0] == code  # noqa: E731
        for h in [*(f"svc{i}" for i in range(WRK_HOSTS)), "slow", f"v{self.plan.in_flight - 1}"]:
            until(lambda h=h: ok(self.host(h)), timeout=120)
        until(lambda: get(port, self.host("ws"))[0] in (200, 400, 426), timeout=60)
        time.sleep(1.0)
        ws, h2 = WS(port, self.host("ws")), H2(port, self.host("svc0"))
        stop = threading.Event()
        keeper = Keeper(ws, h2, stop)
        keeper.ask()
        held_before = (holder(port, ws.local_port), holder(port, h2.local_port))
        r = {"rss_before": haproxy_rss(edge)}
        log_at, master0, cpu0 = len(edge.log()), master_reloads(edge.state_dir), cpu_seconds(edge.proc.pid)
        limit = 3 * len(self.changes) / self.plan.rate + 120
        OUT.mkdir(parents=True, exist_ok=True)
        script = OUT / "live_wrk.lua"
        script.write_text("local hosts = {" + ", ".join(f'"{self.host(f"svc{i}")}"' for i in range(WRK_HOSTS))
                          + "}\nlocal n = 0\nrequest = function()\n  n = n + 1\n"
                          "  return wrk.format(\"GET\", \"/\", {Host = hosts[n % #hosts + 1]})\nend\n"
                          "function delay() return 10 end\n")
        url = f"http://127.0.0.1:{port}/"
        loops = [ToolLoop([require("wrk"), "-t1", "-c8", f"-d{CHUNK_S}s", "--timeout", "5s", "-s", str(script), url],
                          parse_wrk, stop, limit),
                 ToolLoop([require("h2load"), "-c2", "-m4", "-D", str(CHUNK_S), "-H",
                           f":authority: {self.host('slow')}", url], parse_h2load, stop, limit)]
        watch = ProcWatch(edge.state_dir / "haproxy.pid", stop)
        for t in (*loops, watch, keeper):
            t.start()
        time.sleep(1.0)
        r["write_s"] = self._writes()
        t0 = time.monotonic()
        last_new = f"v{self.plan.in_flight + self.plan.new_vhosts - 1}"
        until(lambda: ok(self.host(last_new)) and ok(self.host(f"v{self.plan.new_vhosts - 1}"), 404), timeout=300)
        r["catch_up_s"] = round(time.monotonic() - t0, 2)
        cpu1 = cpu_seconds(edge.proc.pid)
        time.sleep(2.0)
        stop.set()
        for t in (*loops, watch, keeper):
            t.join(CHUNK_S + 90)
        keeper.ask()
        held_after = (holder(port, ws.local_port), holder(port, h2.local_port))
        for name, before, after in (("ws", held_before[0], held_after[0]), ("h2", held_before[1], held_after[1])):
            r[name] = keeper.failed.get(name) or ("yes" if before and before == after else f"moved {before}->{after}")
        ws.close()
        h2.close()
        log = edge.log()[log_at:]
        wrk, h2l = loops[0].totals, loops[1].totals
        r.update(reloads=reloads(log), master_reloads=master_reloads(edge.state_dir) - master0,
                 exhausted=log.count("spare backends exhausted"), runtime_failed=log.count("runtime API failed"),
                 wrk_requests=wrk.get("requests", 0), wrk_failed=wrk.get("socket_errors", 0) + wrk.get("non_2xx", 0),
                 h2_requests=h2l.get("requests", 0), h2_failed=h2l.get("failed", 0) + h2l.get("non_2xx", 0),
                 h2_detail=h2l, wrk_detail=wrk, procs_max=watch.most, pids_seen=len(watch.seen),
                 rss_after=haproxy_rss(edge),
                 cpu_ms_per_change=(cpu1 - cpu0) * 1000 / len(self.changes))
        (OUT / f"live_burst_{label}.log").write_text(log)
        return r
